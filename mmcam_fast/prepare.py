"""``python -m mmcam_fast.prepare``: the command lives in :mod:`mmcam_fast.cli.prepare`, the converters
in :mod:`mmcam_fast.data.converters`, the folder format in :mod:`mmcam_fast.data.manifest`."""

from mmcam_fast.cli.prepare import cli

if __name__ == "__main__":
    cli()
