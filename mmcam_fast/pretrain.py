"""``python -m mmcam_fast.pretrain``: the command lives in :mod:`mmcam_fast.cli.pretrain`, the
pretraining in :mod:`mmcam_fast.pretraining`."""

from mmcam_fast.cli.pretrain import cli

if __name__ == "__main__":
    cli()
