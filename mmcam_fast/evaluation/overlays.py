"""Overlay pictures a person can read: the image with its heatmap, its boxes and a caption.

One picture (BGR uint8, for ``cv2.imwrite``) per image:

* The image at **its own aspect ratio**: at its own size when its longer side is between
  ``DISPLAY_MIN`` and ``DISPLAY_MAX`` pixels, else scaled (both sides by the same factor) so that the
  longer side is the nearer bound. The 224x224 score map is resized onto it (bilinear) and blended
  as a JET heatmap (blue low, red high).
* Ground-truth boxes as **solid green** lines, the estimated box(es) as **dashed red** lines, each
  line with a thin dark outline so that it stands out on the heatmap. Lines are drawn inside the
  box's edge pixels (inset by the line's half width), so a box covering the whole image stays
  visible, and a prediction equal to the ground truth shows green between its red dashes.
* A caption band of ``CAPTION_HEIGHT`` pixels below the image: the class name, the classifier's
  prediction and score (when known) and the IoU of the estimated box with the ground truth (the
  protocol's IoU, computed at 224x224); then a legend of the two line styles with the CAM threshold.

Coordinates: ground-truth boxes are inclusive pixels of an image of ``box_size`` (the metadata's
image size; by default the image's own). The estimate is the protocol's box of the 224x224 map at
CAM threshold tau (:func:`~mmcam_fast.evaluation.box_reference.boxes_at_threshold`); a 224-pixel
column ``x`` covers ``[x * W / 224, (x + 1) * W / 224)`` of an image ``W`` wide, and boxes are drawn
that way.

:func:`select_overlay_ids` picks which images of a split get a picture (``--overlays K``): one
image per class in turn, round-robin over the classes, so K pictures show min(K, classes) classes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from mmcam_fast.data.images import read_rgb
from mmcam_fast.data.metadata import WSOLMetadata
from mmcam_fast.errors import DataError
from mmcam_fast.evaluation.box_reference import boxes_at_threshold
from mmcam_fast.evaluation.boxes import box_iou, check_boxes, resize_box
from mmcam_fast.evaluation.scoremaps import SCOREMAP_SIZE, check_scoremap, load_scoremap, scoremap_path

GT_COLOR = (0, 255, 0)  # BGR green, solid lines
ESTIMATE_COLOR = (0, 0, 255)  # BGR red, dashed lines
OUTLINE_COLOR = (20, 20, 20)
CAPTION_BACKGROUND = (40, 40, 40)
TEXT_COLOR = (255, 255, 255)
DISPLAY_MIN = 448  # longer side of small images after upscaling
DISPLAY_MAX = 1024  # longer side of large images after downscaling
MIN_PICTURE_WIDTH = 360  # narrower images are padded on the right so the caption fits
LINE_WIDTH = 3
OUTLINE_WIDTH = LINE_WIDTH + 2
DASH, GAP = 12, 8
LINE_HEIGHT = 24
CAPTION_HEIGHT = 2 * LINE_HEIGHT + 8
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FONT_SCALE = 0.55
_MIN_FONT_SCALE = 0.4


def display_size(width: int, height: int) -> tuple[int, int]:
    """The ``(width, height)`` an image of that size is drawn at: its own aspect ratio, longer side
    within ``[DISPLAY_MIN, DISPLAY_MAX]`` (its own size when already inside)."""
    longer = max(width, height)
    scale = min(max(longer, DISPLAY_MIN), DISPLAY_MAX) / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def select_overlay_ids(image_ids: Sequence[str], labels: Mapping[str, int], count: int) -> list[str]:
    """``count`` image ids spread over the classes: round-robin over the classes in label order, each
    class's images in split order (deterministic). Fewer when the split has fewer images."""
    per_class: dict[int, deque[str]] = {}
    for image_id in image_ids:
        per_class.setdefault(int(labels[image_id]), deque()).append(image_id)
    queues = [per_class[label] for label in sorted(per_class)]
    chosen: list[str] = []
    while len(chosen) < count and queues:
        for queue in queues:
            if len(chosen) < count:
                chosen.append(queue.popleft())
        queues = [q for q in queues if q]
    return chosen


def _scale_box(box: Sequence[int], sx: float, sy: float) -> tuple[int, int, int, int]:
    """An inclusive pixel box of one frame in another frame ``sx``, ``sy`` times as large."""
    x0, y0, x1, y1 = box
    return (int(x0 * sx), int(y0 * sy), max(int(x0 * sx), int(np.ceil((x1 + 1) * sx)) - 1),
            max(int(y0 * sy), int(np.ceil((y1 + 1) * sy)) - 1))


def _inset(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """Clamp a box's line centres so that a line of ``OUTLINE_WIDTH`` stays inside the picture."""
    half = OUTLINE_WIDTH // 2
    x0, y0, x1, y1 = box
    xs = [min(max(v, half), max(half, width - 1 - half)) for v in (x0, x1)]
    ys = [min(max(v, half), max(half, height - 1 - half)) for v in (y0, y1)]
    return xs[0], ys[0], xs[1], ys[1]


def _segments(box: tuple[int, int, int, int], dashed: bool) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The line segments of a rectangle's four edges: whole edges, or dashes starting at each corner."""
    x0, y0, x1, y1 = box
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    out = []
    for (ax, ay), (bx, by) in zip(corners, corners[1:] + corners[:1], strict=True):
        length = max(abs(bx - ax), abs(by - ay))
        if not dashed or length <= DASH:
            out.append(((ax, ay), (bx, by)))
            continue
        for start in range(0, length, DASH + GAP):
            end = min(start + DASH, length)
            out.append(((ax + (bx - ax) * start // length, ay + (by - ay) * start // length),
                        (ax + (bx - ax) * end // length, ay + (by - ay) * end // length)))
    return out


def _draw_box(picture: np.ndarray, box: tuple[int, int, int, int], color: tuple[int, int, int],
              dashed: bool) -> None:
    segments = _segments(_inset(box, picture.shape[1], picture.shape[0]), dashed)
    for width, shade in ((OUTLINE_WIDTH, OUTLINE_COLOR), (LINE_WIDTH, color)):
        for a, b in segments:
            cv2.line(picture, a, b, shade, width, lineType=cv2.LINE_8)


def _fit_text(text: str, width: int) -> tuple[str, float]:
    """The text and font scale that fit ``width`` pixels: a smaller font, then an ellipsis."""
    scale = _FONT_SCALE
    while scale > _MIN_FONT_SCALE and cv2.getTextSize(text, _FONT, scale, 1)[0][0] > width:
        scale = round(scale - 0.05, 2)
    while len(text) > 4 and cv2.getTextSize(text, _FONT, scale, 1)[0][0] > width:
        text = text[:-4] + "..."
    return text, scale


def _caption(width: int, line1: str, threshold: float) -> np.ndarray:
    """The band below the image: ``line1``, then the legend of the line styles."""
    band = np.empty((CAPTION_HEIGHT, width, 3), np.uint8)
    band[:] = CAPTION_BACKGROUND
    text, scale = _fit_text(line1, width - 12)
    cv2.putText(band, text, (6, LINE_HEIGHT - 6), _FONT, scale, TEXT_COLOR, 1, cv2.LINE_AA)
    y = 2 * LINE_HEIGHT - 2  # baseline of the legend
    x = 6
    for color, spans, label in ((GT_COLOR, [(0, 28)], "ground truth"),
                                (ESTIMATE_COLOR, [(0, 10), (18, 28)], f"prediction (tau {threshold:.2f})")):
        for start, end in spans:  # a sample of the line style
            cv2.line(band, (x + start, y - 6), (x + end, y - 6), color, LINE_WIDTH)
        x += 36
        text, scale = _fit_text(label, max(10, (width - 12) // 2 - 36))
        cv2.putText(band, text, (x, y), _FONT, scale, TEXT_COLOR, 1, cv2.LINE_AA)
        x += cv2.getTextSize(text, _FONT, scale, 1)[0][0] + 16
    return band


def overlay_image(image: np.ndarray, scoremap: np.ndarray, gt_boxes: Sequence[Sequence[int]],
                  threshold: float, multi_contour: bool = False, alpha: float = 0.5,
                  image_id: str = "?", *, box_size: tuple[int, int] | None = None,
                  class_name: str | None = None, prediction: tuple[str, float] | None = None) -> np.ndarray:
    """The overlay picture of one image (layout in the module docstring).

    Args:
        image: ``[H, W, 3]`` uint8 RGB, any size (the image itself, not a 224x224 resize).
        scoremap: its ``[224, 224]`` score map in [0, 1].
        gt_boxes: ground-truth boxes (inclusive pixels of an image of ``box_size``), drawn solid green;
            may be empty.
        threshold: CAM threshold tau of the estimated box(es), drawn dashed red (the protocol's rule).
        multi_contour: draw every contour's box instead of the largest contour's.
        alpha: weight of the heatmap.
        image_id: named in errors and, without ``class_name``, in the caption.
        box_size: ``(width, height)`` of the frame of ``gt_boxes`` (the metadata's image size);
            default the image's own size.
        class_name: the ground-truth class, shown in the caption.
        prediction: ``(predicted class name, its probability)``, shown in the caption.

    Returns:
        ``[h + CAPTION_HEIGHT, max(w, MIN_PICTURE_WIDTH), 3]`` uint8 BGR, where ``(w, h)`` is
        :func:`display_size` of the image (its aspect ratio).

    Raises:
        DataError: an image that is not uint8 RGB, an invalid score map or box, naming the image id.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) == 0:
        raise DataError(f"overlay of image {image_id}: expected a uint8 RGB image of shape (H, W, 3), "
                        f"got {image.dtype} {image.shape}")
    scoremap = check_scoremap(scoremap, image_id)
    height, width = image.shape[:2]
    frame = (width, height) if box_size is None else (int(box_size[0]), int(box_size[1]))
    if len(frame) != 2 or min(frame) <= 0:
        raise DataError(f"overlay of image {image_id}: box_size must be a positive (width, height), "
                        f"got {box_size}")
    gt = check_boxes(gt_boxes, image_id, allow_empty=True, size=frame)
    canvas_w, canvas_h = display_size(width, height)

    scoremap_u8 = (scoremap * 255).astype(np.uint8)
    estimates = boxes_at_threshold(scoremap_u8[..., None], threshold, multi_contour)
    shown = cv2.resize(scoremap.astype(np.float32), (canvas_w, canvas_h), interpolation=cv2.INTER_LINEAR)
    heatmap = cv2.applyColorMap((np.clip(shown, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    interpolation = cv2.INTER_AREA if canvas_w < width else cv2.INTER_CUBIC
    photo = cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), (canvas_w, canvas_h),
                       interpolation=interpolation)
    picture = cv2.addWeighted(photo, 1 - alpha, heatmap, alpha, 0)
    for box in gt.tolist():
        _draw_box(picture, _scale_box(box, canvas_w / frame[0], canvas_h / frame[1]), GT_COLOR, False)
    for box in estimates:
        _draw_box(picture, _scale_box(box, canvas_w / SCOREMAP_SIZE, canvas_h / SCOREMAP_SIZE),
                  ESTIMATE_COLOR, True)

    parts = [class_name if class_name is not None else Path(image_id).name]
    if prediction is not None:
        parts.append(f"predicted {prediction[0]} {prediction[1]:.2f}")
    if len(gt):
        gt_224 = [resize_box(box, frame, check=False) for box in gt.tolist()]
        iou = max(box_iou(e, g, check=False) for e in estimates for g in gt_224)
        parts.append(f"IoU {iou:.2f}")
    picture_w = max(canvas_w, MIN_PICTURE_WIDTH)
    if picture_w > canvas_w:
        pad = np.empty((canvas_h, picture_w - canvas_w, 3), np.uint8)
        pad[:] = CAPTION_BACKGROUND
        picture = np.concatenate([picture, pad], axis=1)
    return np.concatenate([picture, _caption(picture_w, "  |  ".join(parts), threshold)], axis=0)


def write_overlays(images: Sequence[np.ndarray], scoremaps: Sequence[np.ndarray],
                   gt_boxes: Sequence[Sequence[Sequence[int]]], threshold: float, out_dir: str | Path,
                   ids: Sequence[str], multi_contour: bool = False, *,
                   box_sizes: Sequence[tuple[int, int] | None] | None = None,
                   class_names: Sequence[str | None] | None = None,
                   predictions: Sequence[tuple[str, float] | None] | None = None) -> list[Path]:
    """Write one PNG per image, ``<out_dir>/<image_id>.png`` (sub-folders created).

    Args:
        images: ``[H, W, 3]`` uint8 RGB images, each at its own size.
        scoremaps: their score maps.
        gt_boxes: per image, its ground-truth boxes in the frame of its ``box_sizes`` entry.
        threshold: CAM threshold of the drawn estimate (e.g. MaxBoxAcc's best threshold).
        out_dir: output folder.
        ids: image ids (folders kept).
        multi_contour: draw every contour's box.
        box_sizes, class_names, predictions: per image, as :func:`overlay_image`'s arguments.

    Returns:
        The written paths.
    """
    count = len(images)
    extras = {"box_sizes": box_sizes, "class_names": class_names, "predictions": predictions}
    if not count == len(scoremaps) == len(gt_boxes) == len(ids) or any(
            v is not None and len(v) != count for v in extras.values()):
        given = ", ".join(f"{len(v)} {k}" for k, v in extras.items() if v is not None)
        raise DataError(f"write_overlays: {count} images, {len(scoremaps)} score maps, {len(gt_boxes)} box "
                        f"lists and {len(ids)} ids{', ' + given if given else ''} must be as many")
    written = []
    for k, (image, scoremap, boxes, image_id) in enumerate(zip(images, scoremaps, gt_boxes, ids,
                                                               strict=True)):
        path = scoremap_path(out_dir, image_id).with_suffix(".png")
        picture = overlay_image(image, scoremap, boxes, threshold, multi_contour, image_id=image_id,
                                box_size=box_sizes[k] if box_sizes is not None else None,
                                class_name=class_names[k] if class_names is not None else None,
                                prediction=predictions[k] if predictions is not None else None)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DataError(f"overlay of image {image_id}: cannot create {path.parent} ({error})") from None
        if not cv2.imwrite(str(path), picture):
            raise DataError(f"overlay of image {image_id}: cannot write {path}")
        written.append(path)
    return written


def write_split_overlays(metadata: WSOLMetadata, scoremap_root: str | Path, image_root: str | Path,
                         threshold: float, out_dir: str | Path, count: int,
                         class_names: Sequence[str] | None = None) -> list[Path]:
    """Overlays of ``count`` images of a split spread over its classes (:func:`select_overlay_ids`),
    their score maps read from ``<scoremap_root>/<image_id>.npy`` and the images (at their own size)
    from ``<image_root>/<image_id>``, the box drawn at ``threshold``; returns the written paths."""
    image_ids = select_overlay_ids(metadata.image_ids, metadata.labels, count)

    def name(image_id: str) -> str:
        label = metadata.labels[image_id]
        known = class_names is not None and label < len(class_names)
        return class_names[label] if known else f"class {label}"

    return write_overlays(
        images=[np.asarray(read_rgb(Path(image_root) / i, f"image {i}", hint="check --image-root"))
                for i in image_ids],
        scoremaps=[load_scoremap(scoremap_root, i) for i in image_ids],
        gt_boxes=[metadata.boxes[i] for i in image_ids], threshold=threshold, out_dir=out_dir, ids=image_ids,
        box_sizes=[metadata.sizes[i] for i in image_ids], class_names=[name(i) for i in image_ids])
