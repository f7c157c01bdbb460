"""``python -m mmcam_fast.experiments``: the command lives in :mod:`mmcam_fast.cli.experiments`."""

from mmcam_fast.cli.experiments import cli

if __name__ == "__main__":
    cli()
