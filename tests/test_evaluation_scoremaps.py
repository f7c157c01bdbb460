"""Score maps: CAM -> 224x224 map, the on-disk layout of the protocol, and the validity check."""

import cv2
import numpy as np
import pytest
import torch

from mmcam_fast.errors import DataError
from mmcam_fast.evaluation import (
    cams_to_scoremaps,
    check_scoremap,
    iter_scoremaps,
    load_scoremap,
    save_scoremaps,
)
from mmcam_fast.evaluation.scoremaps import scoremap_path


def protocol_scoremap(cam: np.ndarray) -> np.ndarray:
    """The protocol's inference (Choe et al., wsolevaluation ``inference.py``), written out.

    ``cv2.resize(cam, (224, 224), interpolation=cv2.INTER_CUBIC)`` of the float32 CAM, then
    ``normalize_scoremap``: zeros for a map with NaN or a constant one, else ``cam -= min`` and
    ``cam /= max``. Independent of the code under test (OpenCV's bicubic, not torch's).
    """
    resized = cv2.resize(cam, (224, 224), interpolation=cv2.INTER_CUBIC)
    if np.isnan(resized).any() or resized.min() == resized.max():
        return np.zeros_like(resized)
    resized = resized - resized.min()
    return resized / resized.max()


@pytest.mark.parametrize("shape", [(7, 7), (14, 14), (28, 28), (5, 9), (1, 7), (13, 1)])
def test_cams_to_scoremaps_is_the_protocols_bicubic_then_min_max(shape):
    cams = torch.from_numpy(np.random.default_rng(sum(shape)).standard_normal((3, *shape)).astype(np.float32))
    maps = cams_to_scoremaps(cams)
    assert maps.shape == (3, 224, 224) and maps.dtype == torch.float32
    for cam, got in zip(cams.numpy(), maps.numpy(), strict=True):
        want = protocol_scoremap(cam.copy())
        # Both resize in float32 with the same cubic kernel (a = -0.75), half-pixel centres and
        # clamped borders; they differ in rounding only: 16 taps of two operations each, ~2^-24 of
        # the largest tap apiece (at most max|cam|), and the min-max divides that by the resized
        # map's range. Measured: 2.4e-7 (square maps) to 1.2e-6 (13x1); the bound: 1.6e-6 to 4e-6.
        up = cv2.resize(cam, (224, 224), interpolation=cv2.INTER_CUBIC)
        tolerance = 64 * 2.0**-24 * float(np.abs(cam).max()) / float(up.max() - up.min())
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)
    # bicubic overshoots the CAM's range, the min-max after it still lands exactly on [0, 1]
    assert maps.amin(dim=(1, 2)).tolist() == [0.0] * 3 and maps.amax(dim=(1, 2)).tolist() == [1.0] * 3


def test_constant_cam_gives_zeros():
    maps = cams_to_scoremaps(torch.full((2, 14, 14), 3.5))
    assert torch.count_nonzero(maps) == 0
    with pytest.raises(DataError, match=r"\[B, h, w\]"):
        cams_to_scoremaps(torch.zeros(14, 14))


def test_files_follow_the_protocol_layout(tmp_path):
    # ids keep folders and extension; the protocol loads image_id + '.npy'
    ids = ["val2/0/0.jpeg", "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"]
    maps = cams_to_scoremaps(torch.rand(2, 14, 14))
    save_scoremaps(tmp_path, ids, maps)
    assert (tmp_path / "val2" / "0" / "0.jpeg.npy").is_file()
    assert scoremap_path(tmp_path, ids[1]) == tmp_path / (ids[1] + ".npy")
    stored = np.load(tmp_path / "val2" / "0" / "0.jpeg.npy")
    assert stored.dtype == np.float32 and stored.shape == (224, 224)
    loaded = load_scoremap(tmp_path, ids[0])
    assert loaded.dtype == np.float64  # evaluated in float64 like the protocol (after its t2n cast)
    np.testing.assert_array_equal(loaded, maps[0].numpy().astype(np.float64))
    assert [i for i, _ in iter_scoremaps(tmp_path, ids)] == ids


@pytest.mark.parametrize("bad_id", ["../escape.jpg", "/abs/path.jpg", ""])
def test_ids_leaving_the_root_are_refused(tmp_path, bad_id):
    with pytest.raises(DataError, match="not a relative path"):
        scoremap_path(tmp_path, bad_id)


@pytest.mark.parametrize(("array", "message"), [
    (np.zeros((224, 225)), r"expected shape \(224, 224\), got \(224, 225\)"),
    (np.zeros((224, 224, 1)), "expected a 2-D array"),
    (np.zeros((224, 224), dtype=np.int64), "expected a float array"),
    (np.full((224, 224), np.nan), "NaN"),
    (np.full((224, 224), 1.5), r"in \[0, 1\], got min 1.5, max 1.5"),
    (np.full((224, 224), -0.25), r"in \[0, 1\], got min -0.25"),
])
def test_invalid_maps_name_the_image_and_file(tmp_path, array, message):
    np.save(tmp_path / "x.jpg.npy", array)
    with pytest.raises(DataError, match=message) as err:
        load_scoremap(tmp_path, "x.jpg")
    assert "x.jpg" in str(err.value) and str(tmp_path / "x.jpg.npy") in str(err.value)
    with pytest.raises(DataError, match=message):
        check_scoremap(array, "x.jpg")
    with pytest.raises(DataError, match="numpy array"):
        check_scoremap([[0.0]], "x.jpg")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"score map of image a/b\.jpg: file .*a/b\.jpg\.npy is missing"):
        load_scoremap(tmp_path, "a/b.jpg")


def test_many_bad_maps_are_listed_first_few_and_counted(tmp_path):
    ids = [f"img{i}.jpg" for i in range(10)]
    good = np.zeros((224, 224), dtype=np.float32)
    for i, image_id in enumerate(ids):
        bad = i in (2, 3, 5, 6, 7, 8, 9)
        if i != 9:  # img9 has no file at all
            np.save(tmp_path / f"{image_id}.npy", good + 2.0 if bad else good)
    seen = []
    with pytest.raises(DataError) as err:
        for image_id, _ in iter_scoremaps(tmp_path, ids):
            seen.append(image_id)
    message = str(err.value)
    assert seen == ["img0.jpg", "img1.jpg"]
    assert message.startswith("7 invalid score map(s)")
    assert all(f"img{i}.jpg" in message for i in (2, 3, 5, 6, 7)) and "img8.jpg" not in message
    assert "(and 2 more)" in message
    # the CLI prints it as one line: the problems stay apart
    assert " ".join(message.split()).count("; score map of image") == 4
