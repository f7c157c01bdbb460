"""``python -m mmcam_fast.evaluate``: the command lives in :mod:`mmcam_fast.cli.evaluate`."""

from mmcam_fast.cli.evaluate import cli

if __name__ == "__main__":
    cli()
