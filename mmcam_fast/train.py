"""``python -m mmcam_fast.train`` (and ``torchrun -m mmcam_fast.train``): the command lives in
:mod:`mmcam_fast.cli.train`."""

from mmcam_fast.cli.train import cli

if __name__ == "__main__":
    cli()
