"""Every image mode becomes 8-bit RGB; unreadable files fail with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmcam_fast.data.images import UNREADABLE_IMAGE_ERRORS, describe_unreadable, load_rgb, missing_files


def _save(path, image, **kw):
    image.save(path, **kw)
    return path


@pytest.fixture
def pixels():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)


def test_rgb_jpeg_and_png(tmp_path, pixels):
    png = load_rgb(_save(tmp_path / "a.png", Image.fromarray(pixels)))
    assert png.mode == "RGB" and png.size == (30, 20)
    assert np.array_equal(np.asarray(png), pixels), "PNG is lossless"
    jpg = load_rgb(_save(tmp_path / "a.jpg", Image.fromarray(pixels), quality=95))
    assert jpg.mode == "RGB" and jpg.size == (30, 20)


def test_grayscale_becomes_three_equal_channels(tmp_path, pixels):
    gray = pixels[..., 0]
    for name in ("g.jpg", "g.png"):
        image = load_rgb(_save(tmp_path / name, Image.fromarray(gray, mode="L")))
        array = np.asarray(image)
        assert image.mode == "RGB" and array.shape == (20, 30, 3)
        assert np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 1], array[..., 2])


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (16, 12), (0, 255, 255, 0))  # pure red in CMYK
    image = load_rgb(_save(tmp_path / "c.jpg", cmyk, quality=100))
    assert image.mode == "RGB"
    r, g, b = np.asarray(image)[6, 8].tolist()
    assert r > 200 and g < 60 and b < 60, (r, g, b)


def test_rgba_and_palette_with_transparency(tmp_path, pixels):
    rgba = np.dstack([pixels, np.full(pixels.shape[:2], 128, np.uint8)])
    image = load_rgb(_save(tmp_path / "a.png", Image.fromarray(rgba, mode="RGBA")))
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), pixels), "alpha is dropped"
    palette = Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    image = load_rgb(_save(tmp_path / "p.png", palette, transparency=0))
    assert image.mode == "RGB" and image.size == (30, 20)
    expected = np.asarray(palette.convert("RGB"))
    assert np.array_equal(np.asarray(image), expected)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    image = load_rgb(_save(tmp_path / "d.png", Image.fromarray(values)))
    array = np.asarray(image)[..., 0].astype(int)
    assert image.mode == "RGB"
    assert array.min() == 0 and array.max() == 255
    assert len(np.unique(array)) > 32, "a clip to 255 would leave almost everything white"


@pytest.mark.parametrize("content,reason", [
    (b"", "zero-byte"),
    (b"this is not an image at all", "UnidentifiedImageError"),
])
def test_unreadable_files(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(UNREADABLE_IMAGE_ERRORS) as info:
        load_rgb(path)
    assert reason in describe_unreadable(path, info.value)


def test_truncated_jpeg_fails_at_load(tmp_path, pixels):
    full = _save(tmp_path / "full.jpg", Image.fromarray(np.tile(pixels, (8, 8, 1))), quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(UNREADABLE_IMAGE_ERRORS) as info:
        load_rgb(cut)
    assert "truncated" in describe_unreadable(cut, info.value)


def test_missing_files_lists_each_directory_once(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.jpg").write_bytes(b"x")
    (tmp_path / "top.jpg").write_bytes(b"x")
    wanted = ["a/b/x.jpg", "a/b/y.jpg", "top.jpg", "nope/z.jpg", "gone.jpg"]
    assert missing_files(tmp_path, wanted) == ["a/b/y.jpg", "nope/z.jpg", "gone.jpg"]
