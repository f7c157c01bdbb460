"""``python -m mmcam_fast.localize --checkpoint CKPT IMAGES...``: localize objects in your own images.

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

import cv2
import numpy as np
import torch

from mmcam_fast.checkpoint import load_checkpoint
from mmcam_fast.cli import ArgumentParser, console_entry
from mmcam_fast.data.images import read_rgb
from mmcam_fast.data.transforms import eval_transform
from mmcam_fast.errors import ConfigError, DataError
from mmcam_fast.evaluation import SCOREMAP_SIZE, cams_to_scoremaps, overlay_image
from mmcam_fast.evaluation.box_reference import boxes_at_threshold
from mmcam_fast.localization import load_trained_model

DEFAULT_THRESHOLD = 0.2


def localize_images(checkpoint: str | Path, images: list[Path], *, device: str = "cpu", topk: int = 5,
                    cam_threshold: float | None = None, multi_contour: bool = False,
                    out_dir: Path | None = None) -> list[dict]:
    """Predicted classes and boxes for each image (see the module docstring)."""
    model, config, classes = load_trained_model(checkpoint, device)
    if cam_threshold is None:
        saved = load_checkpoint(checkpoint).get("val") or {}
        cam_threshold = float(saved.get("maxboxacc_threshold", DEFAULT_THRESHOLD))
    if not 0 <= cam_threshold < 1:
        raise ConfigError(f"--cam-threshold must be in [0, 1), got {cam_threshold}")
    transform = eval_transform(config.image_size)
    results = []
    for path in images:
        image = read_rgb(path)
        width, height = image.size
        with torch.no_grad():
            logits, features = model(transform(image)[None].to(device))
            probs, top = logits.float().softmax(1).topk(min(topk, logits.shape[1]), dim=1)
            scoremap = cams_to_scoremaps(model.cams(features, top[:, 0]))[0].cpu().numpy()
        u8 = (scoremap.astype(np.float64) * 255).astype(np.uint8)
        boxes_224 = boxes_at_threshold(u8[..., None], cam_threshold, multi_contour)
        sx, sy = width / SCOREMAP_SIZE, height / SCOREMAP_SIZE
        boxes = [[int(x0 * sx), int(y0 * sy), min(int((x1 + 1) * sx) - 1, width - 1),
                  min(int((y1 + 1) * sy) - 1, height - 1)] for x0, y0, x1, y1 in boxes_224]
        entry = {"image": str(path), "width": width, "height": height, "cam_threshold": cam_threshold,
                 "predictions": [{"class": int(c), "name": classes[int(c)], "score": float(p)}
                                 for c, p in zip(top[0].tolist(), probs[0].tolist(), strict=True)],
                 "boxes": boxes}
        if out_dir is not None:
            best = entry["predictions"][0]
            picture = overlay_image(np.asarray(image), scoremap, [], cam_threshold, multi_contour,
                                    image_id=str(path), prediction=(best["name"], best["score"]))
            overlay = out_dir / f"{len(results):04d}_{path.stem}.png"
            cv2.imwrite(str(overlay), picture)
            entry["overlay"] = str(overlay)
        results.append(entry)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="mmcam_fast.localize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a training checkpoint (best.pt)")
    parser.add_argument("images", nargs="+", type=Path, help="image files (JPEG, PNG, ...)")
    parser.add_argument("--out", type=Path, help="folder for localization.json and the overlays")
    parser.add_argument("--topk", type=int, default=5, help="predicted classes to report (default 5)")
    parser.add_argument("--cam-threshold", type=float, help="CAM threshold (default: the checkpoint's)")
    parser.add_argument("--multi-contour", action="store_true",
                        help="a box per contour, not only the largest one")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise DataError(f"image file(s) not found: {', '.join(missing[:5])}")
    if args.topk < 1:
        raise ConfigError(f"--topk must be at least 1, got {args.topk}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
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

if __name__ == "__main__":
    cli()
