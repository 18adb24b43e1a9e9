"""Every odd input a user may hand retr decodes to HxWx3 uint8 RGB or fails with its reason."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from features.core import ImageReadError
from features.image import decode_bytes, load_image, resize_max, to_pixel_frame
from tests.conftest import DATA

PHOTO = next((DATA / "landmarks-mini/images/sacre_coeur").glob("*.jpg"))


def _save(img: Image.Image, path: Path, **kw: object) -> Path:
    img.save(path, **kw)
    return path


def test_rgb_jpeg_decodes_to_uint8_rgb() -> None:
    rgb = load_image(PHOTO)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert np.array_equal(rgb, np.asarray(Image.open(PHOTO).convert("RGB")))


@pytest.mark.parametrize(
    ("mode", "fill"),
    [("L", 128), ("CMYK", (255, 0, 0, 0)), ("P", None), ("1", 1), ("LA", (90, 255))],
)
def test_odd_modes_become_rgb(tmp_path: Path, mode: str, fill: object) -> None:
    img = Image.new(mode, (64, 48), fill) if fill is not None else Image.new(mode, (64, 48))
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    rgb = load_image(_save(img, tmp_path / f"x.{fmt.lower()}", format=fmt))
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    if mode == "CMYK":  # cyan ink -> no red, full green and blue
        assert tuple(rgb[0, 0]) == (0, 255, 255)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.full((40, 40), 65535 // 2, np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / "g16.png")
    rgb = load_image(path)
    assert rgb.shape == (40, 40, 3) and abs(int(rgb[0, 0, 0]) - 127) <= 1


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red
    rgb = load_image(_save(img, tmp_path / "a.png"))
    assert tuple(rgb[0, 0]) == (255, 255, 255)


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (80, 40), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 40))  # white stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rgb = load_image(_save(img, tmp_path / "r.jpg", exif=exif, quality=95))
    assert rgb.shape == (80, 40, 3)
    assert rgb[:5].mean() > 200  # the left stripe is now at the top


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"this is not an image at all", "not an image"),
    ],
)
def test_non_images_fail_with_reason(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_jpeg_fails_with_reason(tmp_path: Path) -> None:
    data = PHOTO.read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError, match="corrupt or truncated"):
        load_image(path)


def test_tiny_and_huge_images_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="too small"):
        load_image(_save(Image.new("RGB", (20, 200)), tmp_path / "tiny.png"))
    big = _save(Image.new("L", (3000, 3000)), tmp_path / "big.png")
    with pytest.raises(ImageReadError, match="too large"):
        load_image(big, max_pixels=1_000_000)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="no such file"):
        load_image(tmp_path / "nope.jpg")


def test_array_and_pil_inputs() -> None:
    rgb = load_image(PHOTO)
    assert np.array_equal(load_image(rgb), rgb)
    assert np.array_equal(load_image(Image.fromarray(rgb)), rgb)
    gray = load_image(rgb[:, :, 0])
    assert gray.shape == rgb.shape
    with pytest.raises(ImageReadError, match="HxWx3"):
        load_image(np.zeros((50, 50, 7), np.uint8))


def test_resize_and_pixel_frame_round_trip() -> None:
    img = np.zeros((1000, 2000, 3), np.uint8)
    small, s = resize_max(img, 500)
    assert small.shape[:2] == (250, 500) and s == 0.25
    # pixel centre convention: pixel 0 of the small image covers pixels 0..3 of the big one
    back = to_pixel_frame(np.array([[0.0, 0.0], [499.0, 249.0]]), 0.25, 0.25)
    np.testing.assert_allclose(back, [[1.5, 1.5], [1997.5, 997.5]])
    assert resize_max(img, None)[1] == 1.0 and resize_max(img, 4000)[0] is img


def test_bytes_io_pil_image_with_exif_orientation() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 32)).save(buf, format="PNG")
    assert load_image(Image.open(buf)).shape == (32, 64, 3)


def test_a_query_names_what_the_path_is_like_a_build_does(tmp_path: Path) -> None:
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    cases = {
        tmp_path: "a directory, not an image file",
        tmp_path / "loop_a": "symbolic link loop",
        tmp_path / "zero.jpg": "not a regular file",
        tmp_path / "gone.jpg": "dangling symbolic link",
        tmp_path / "missing.jpg": "no such file",
    }
    for path, reason in cases.items():
        with pytest.raises(ImageReadError, match=reason):
            load_image(path)


def test_a_bomb_is_refused_with_retrs_cap_not_pillows(monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses above 2000 px
    buf = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buf, format="PNG")
    with pytest.raises(ImageReadError) as err:
        decode_bytes(buf.getvalue(), "bomb.png")
    assert "cap of 150000000 px" in str(err.value) and "2000" not in str(err.value)
