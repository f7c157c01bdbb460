"""``python -m mmcam_fast.tiny_wsol``: the command lives in :mod:`mmcam_fast.cli.tiny_wsol`, the study
in :mod:`mmcam_fast.experiments.tiny_wsol_study`."""

from mmcam_fast.cli.tiny_wsol import cli

if __name__ == "__main__":
    cli()
