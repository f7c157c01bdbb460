"""``python -m mmcam_fast.scratch_study``: the command lives in :mod:`mmcam_fast.cli.scratch_study`,
the study (Tiny-ImageNet-5 from scratch) in :mod:`mmcam_fast.experiments.plan` and ``report``."""

from mmcam_fast.cli.scratch_study import cli

if __name__ == "__main__":
    cli()
