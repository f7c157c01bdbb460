"""``python -m mmcam_fast.localize``: the command lives in :mod:`mmcam_fast.cli.localize`."""

from mmcam_fast.cli.localize import cli

if __name__ == "__main__":
    cli()
