"""``python -m mmcam_fast.localize --checkpoint CKPT IMAGES...``: localize objects in your own images.

IMAGES are image files or folders; a folder stands for the image files under it (torchvision's image
extensions, any case, in sorted path order, subfolders included).

For every image: the predicted classes with their probabilities, the CAM of the top-1 class turned
into a score map (224x224 bicubic, min-max), the box(es) at a CAM threshold by the protocol's rule
(largest contour, or every contour with ``--multi-contour``) in the image's own pixel coordinates,
and an overlay PNG (heatmap + red box). Prints one JSON object (a list of per-image results) as the
last line; ``--out DIR`` also writes it to ``DIR/localization.json`` with the overlays beside it.

The threshold defaults to the one the checkpoint's validation chose (MaxBoxAcc's best tau), else 0.2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from mmcam_fast.cli import ArgumentParser, console_entry, device_value
from mmcam_fast.errors import ConfigError, DataError
from mmcam_fast.localization import localize_images
from mmcam_fast.run_folder import check_output_folder


def expand_images(paths: list[Path]) -> list[Path]:
    """The image files named: files as given, folders as the image files under them (sorted).

    Raises:
        DataError: a path that does not exist, or a folder with no image file under it.
    """
    images: list[Path] = []
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataError(f"image file(s) not found: {', '.join(missing[:5])}")
    for path in paths:
        if not path.is_dir():
            images.append(path)
            continue
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        if not found:
            raise DataError(f"{path}: a folder with no image file under it (expected one of "
                            f"{', '.join(IMG_EXTENSIONS)})")
        images.extend(found)
    return images


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="mmcam_fast.localize", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a training checkpoint (best.pt)")
    parser.add_argument("images", nargs="+", type=Path,
                        help="image files (JPEG, PNG, ...) or folders of them")
    parser.add_argument("--out", type=Path, help="folder for localization.json and the overlays")
    parser.add_argument("--topk", type=int, default=5, help="predicted classes to report (default 5)")
    parser.add_argument("--cam-threshold", type=float, help="CAM threshold (default: the checkpoint's)")
    parser.add_argument("--multi-contour", action="store_true",
                        help="a box per contour, not only the largest one")
    parser.add_argument("--device", type=device_value, default="cpu")
    args = parser.parse_args(argv)
    args.images = expand_images(args.images)
    if args.topk < 1:
        raise ConfigError(f"--topk must be at least 1, got {args.topk}")
    if args.out is not None:
        check_output_folder(args.out)
    results = localize_images(args.checkpoint, args.images, device=args.device, topk=args.topk,
                              cam_threshold=args.cam_threshold, multi_contour=args.multi_contour,
                              out_dir=args.out)
    if args.out is not None:
        (args.out / "localization.json").write_text(json.dumps(results, indent=2))
    for entry in results:
        best = entry["predictions"][0]
        print(f"{entry['image']}: {best['name']} ({best['score']:.3f}), boxes {entry['boxes']}")
    print(json.dumps(results))


cli = console_entry(main, "mmcam-localize")
