"""Decode any image a user may hand us into HxWx3 uint8 RGB, or fail with a clear reason.

Handled: EXIF orientation, grayscale, palette, 16-bit and float images, CMYK, alpha (composited
on white), truncated or corrupt files, empty files, non-images, tiny images, and images over a
pixel cap (decompression bombs).
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from features.core import ImageReadError

logger = logging.getLogger(__name__)

ImageInput = str | Path | np.ndarray | Image.Image

MIN_SIDE = 32
"""Smallest side (px) accepted: below it no network here produces features."""
MAX_PIXELS = 150_000_000
"""Largest pixel count decoded (about 12k x 12k); bigger files are refused as bombs."""


def load_image(source: ImageInput, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Return the image as an (H, W, 3) uint8 RGB array.

    `source` is a path, an (H, W, 3) uint8 RGB array (used as is), an (H, W) gray array, or a PIL
    image. Raises ImageReadError naming the input and the problem.
    """
    if isinstance(source, np.ndarray):
        return _check_size(_array_to_rgb(source, "<array>"), "<array>")
    if isinstance(source, Image.Image):
        return _check_size(_pil_to_rgb(source, "<PIL image>", max_pixels), "<PIL image>")
    path = Path(source)
    problem = path_problem(path)
    if problem is not None:
        raise ImageReadError(path, problem)
    try:
        data = path.read_bytes()
    except OSError as exc:  # permissions, I/O errors, a file that vanished
        raise ImageReadError(path, f"unreadable file ({exc.strerror or exc})") from None
    return decode_bytes(data, path, max_pixels)


def path_problem(path: Path) -> str | None:
    """Why `path` cannot be read as an image file (no such file, a dangling link, a link loop,
    a directory, a device, pipe or socket), or None for a regular file or a link to one. The
    one list of reasons: queries and builds name an entry the same way."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        if path.is_symlink():
            return f"dangling symbolic link (to {os.readlink(path)})"
        if exc.errno == errno.ENOENT:
            return "no such file"
        return f"unreadable entry: {exc.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return "a directory, not an image file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a device, pipe or socket)"
    return None


def decode_bytes(data: bytes, name: object, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An encoded image file's bytes (an upload, a file read elsewhere) as (H, W, 3) uint8 RGB;
    ImageReadError naming `name` otherwise, with the same reasons as `load_image`."""
    if not data:
        raise ImageReadError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # retr applies its own cap (max_pixels) before decoding, so Pillow's warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            pil = Image.open(io.BytesIO(data))
            _check_pixels(pil, name, max_pixels)
            pil.load()
    except UnidentifiedImageError:
        raise ImageReadError(name, "not an image, or a format Pillow cannot read") from None
    except Image.DecompressionBombError:  # Pillow's own limit, above retr's cap
        raise ImageReadError(
            name, f"too large (more than the cap of {max_pixels} px); downscale it first"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(
            name, f"corrupt or truncated image ({exc}); re-export the file"
        ) from None
    return _check_size(_pil_to_rgb(pil, name, max_pixels), name)


def _check_pixels(pil: Image.Image, name: object, max_pixels: int) -> None:
    w, h = pil.size
    if w * h > max_pixels:
        raise ImageReadError(
            name, f"too large ({w}x{h} = {w * h} px > cap {max_pixels}); downscale it first"
        )


def _pil_to_rgb(pil: Image.Image, name: object, max_pixels: int) -> np.ndarray:
    _check_pixels(pil, name, max_pixels)
    try:
        pil = ImageOps.exif_transpose(pil) or pil
    except Exception as exc:  # a broken EXIF block must not lose the pixels
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", name, exc)
    mode = pil.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _array_to_rgb(np.asarray(pil), name)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in pil.info):
        rgba = pil.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode != "RGB":
        pil = pil.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
    return np.asarray(pil)


def _array_to_rgb(arr: np.ndarray, name: object) -> np.ndarray:
    """Bring a gray / RGB / RGBA array of any numeric dtype to (H, W, 3) uint8."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ImageReadError(name, f"expected an HxWx3 RGB array, got shape {arr.shape}")
    if arr.shape[2] == 4:
        alpha = arr[:, :, 3:4].astype(np.float32) / _full_scale(arr)
        arr = arr[:, :, :3] * alpha + _full_scale(arr) * (1 - alpha)
    if arr.dtype != np.uint8:
        arr = np.clip(arr.astype(np.float64) * (255.0 / _full_scale(arr)), 0, 255).round()
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def _full_scale(arr: np.ndarray) -> float:
    """The value that means 'white' for this array."""
    if arr.dtype == np.uint8:
        return 255.0
    if np.issubdtype(arr.dtype, np.floating):
        return 1.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 255.0
    peak = int(arr.max(initial=0))
    return 255.0 if peak <= 255 else 65535.0


def _check_size(rgb: np.ndarray, name: object) -> np.ndarray:
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ImageReadError(name, f"too small ({w}x{h}); every side must be >= {MIN_SIDE} px")
    return rgb


def resize_max(image: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
    """Downscale so that the longer side is at most `max_side` (never upscale).

    Returns the image and the scale factor s (new = old * s). Area interpolation avoids aliasing.
    """
    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return image, 1.0
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), s


def to_pixel_frame(xy: Any, scale_x: float, scale_y: float) -> np.ndarray:
    """Map (x, y) from a resized image back to the original (pixel centres at integers)."""
    xy = np.asarray(xy, np.float32)
    out = np.empty_like(xy)
    out[:, 0] = (xy[:, 0] + 0.5) / scale_x - 0.5
    out[:, 1] = (xy[:, 1] + 0.5) / scale_y - 0.5
    return out
