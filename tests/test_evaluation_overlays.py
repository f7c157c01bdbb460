"""Overlay pictures: the image's own aspect ratio, distinct box colours and line styles, whole-image
boxes, the caption, and which images ``--overlays K`` picks."""

import cv2
import numpy as np
import pytest

from mmcam_fast.errors import DataError
from mmcam_fast.evaluation import overlay_image, write_overlays
from mmcam_fast.evaluation.overlays import (
    CAPTION_BACKGROUND,
    CAPTION_HEIGHT,
    DISPLAY_MAX,
    DISPLAY_MIN,
    ESTIMATE_COLOR,
    GT_COLOR,
    display_size,
    select_overlay_ids,
)

GREEN, RED = np.array(GT_COLOR), np.array(ESTIMATE_COLOR)


def blob_map(x0, y0, x1, y1):
    scoremap = np.zeros((224, 224), np.float32)
    scoremap[y0:y1 + 1, x0:x1 + 1] = 1.0
    return scoremap


def is_colour(pixels, colour):
    return (pixels == colour).all(axis=-1)


@pytest.mark.parametrize(("width", "height", "shown"), [
    (500, 333, (500, 333)),  # inside the display range: its own size
    (64, 64, (DISPLAY_MIN, DISPLAY_MIN)),  # small: upscaled, aspect kept
    (120, 300, (179, DISPLAY_MIN)),
    (3160, 4605, (703, DISPLAY_MAX)),  # large: downscaled, aspect kept
])
def test_picture_has_the_images_aspect_ratio(width, height, shown):
    assert display_size(width, height) == shown
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    picture = overlay_image(image, blob_map(50, 60, 120, 150), [(10, 10, width // 2, height // 2)], 0.5)
    assert picture.dtype == np.uint8 and picture.shape[0] == shown[1] + CAPTION_HEIGHT
    assert picture.shape[1] == max(shown[0], 360)
    assert abs(shown[0] / shown[1] - width / height) < 2 / min(shown)


def test_boxes_have_distinct_colours_and_line_styles():
    image = np.full((450, 600, 3), 128, np.uint8)  # inside the display range: drawn at its own size
    # ground truth in image pixels; the estimate comes from the map's blob (224 frame)
    picture = overlay_image(image, blob_map(112, 112, 200, 200), [(20, 30, 150, 120)], 0.5)
    shown = picture[:450]
    assert picture.shape == (450 + CAPTION_HEIGHT, 600, 3)
    assert is_colour(shown, GREEN).any() and is_colour(shown, RED).any()
    # ground truth solid: its top edge (y 30, line 3 px wide) is green all along
    assert is_colour(shown[30, 25:146], GREEN).all()
    # the estimate dashed: its top edge alternates red dashes and gaps
    box_top = int(112 * 450 / 224)
    row = is_colour(shown[box_top, int(112 * 600 / 224) + 5:int(201 * 600 / 224) - 5], RED)
    assert row.any() and not row.all()
    assert np.count_nonzero(np.diff(row.astype(int))) >= 6  # several dashes
    # the caption band holds text on its background
    band = picture[450:]
    assert band.shape[0] == CAPTION_HEIGHT and is_colour(band, np.array(CAPTION_BACKGROUND)).mean() > 0.5
    assert (band.max(axis=-1) == 255).any()


def test_a_box_covering_the_whole_image_stays_visible():
    image = np.full((200, 260, 3), 90, np.uint8)
    ones = np.ones((224, 224), np.float32)  # the estimate covers the whole image too
    picture = overlay_image(image, ones, [(0, 0, 259, 199)], 0.5, box_size=(260, 200))
    w, h = display_size(260, 200)
    shown = picture[:h, :w]
    for edge in (shown[:, :5], shown[:, -5:], shown[:5], shown[-5:]):  # every border strip
        assert is_colour(edge, GREEN).any() and is_colour(edge, RED).any()


def test_boxes_are_mapped_from_their_frame_and_caption_inputs_are_checked():
    image = np.zeros((100, 200, 3), np.uint8)
    # a box given in the metadata's 400x200 frame lands at half the coordinates on a 200x100 image
    picture = overlay_image(image, np.zeros((224, 224)), [(100, 50, 300, 150)], 0.5, box_size=(400, 200),
                            class_name="koala", prediction=("koala", 0.87))
    w, h = display_size(200, 100)
    scale = w / 200
    assert is_colour(picture[int(25 * scale) + 2, int(100 * scale):int(150 * scale)], GREEN).all()
    with pytest.raises(DataError, match=r"image x: .*beyond the 400x200"):
        overlay_image(image, np.zeros((224, 224)), [(0, 0, 400, 10)], 0.5, box_size=(400, 200), image_id="x")
    with pytest.raises(DataError, match=r"overlay of image x: expected a uint8 RGB image"):
        overlay_image(np.zeros((10, 10)), np.zeros((224, 224)), [], 0.5, image_id="x")
    with pytest.raises(DataError, match=r"score map of image x: .*NaN"):
        overlay_image(image, np.full((224, 224), np.nan), [], 0.5, image_id="x")


def test_write_overlays_names_files_by_id(tmp_path):
    images = [np.zeros((50, 80, 3), np.uint8), np.zeros((90, 60, 3), np.uint8)]
    maps = [blob_map(10, 10, 100, 100)] * 2
    written = write_overlays(images, maps, [[(1, 1, 40, 30)], []], 0.5, tmp_path, ["a/b.jpg", "c.png"],
                             class_names=["x", None], predictions=[("x", 0.5), None])
    assert written == [tmp_path / "a" / "b.jpg.png", tmp_path / "c.png.png"]
    assert cv2.imread(str(written[1])).shape[0] == DISPLAY_MIN + CAPTION_HEIGHT
    with pytest.raises(DataError, match="must be as many"):
        write_overlays(images, maps, [[], []], 0.5, tmp_path, ["a", "b"], class_names=["x"])


def test_overlays_are_spread_over_the_classes_round_robin():
    ids = [f"i{k}" for k in range(9)]
    labels = dict(zip(ids, [0, 0, 0, 0, 2, 2, 1, 1, 3], strict=True))
    assert select_overlay_ids(ids, labels, 4) == ["i0", "i6", "i4", "i8"]  # one of each class, label order
    assert select_overlay_ids(ids, labels, 6) == ["i0", "i6", "i4", "i8", "i1", "i7"]
    assert sorted(select_overlay_ids(ids, labels, 20)) == sorted(ids)  # all when asked for more
    assert select_overlay_ids(ids, labels, 0) == []
    assert select_overlay_ids(ids, labels, 6) == select_overlay_ids(list(ids), dict(labels), 6)
