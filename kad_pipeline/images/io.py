"""Decode radiograph files (8/16-bit PNG, JPEG; gray, RGB, RGBA) into 8-bit grayscale arrays.

Every decoded image becomes a 2-D ``uint8`` array. Files that cannot be decoded raise
``ImageDecodeError`` with a short reason code, which batch callers turn into quarantine rows.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

QUARANTINE_SCHEMA = {"image_id": pl.String, "path": pl.String, "reason": pl.String, "detail": pl.String}

# Decompression-bomb guard: full-size radiographs are at most about 4,300 x 3,500 pixels.
MAX_PIXELS = 60_000_000


class ImageDecodeError(Exception):
    """An image that cannot be used; ``reason`` is a short code such as "truncated" or "missing"."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _to_gray_uint8(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # High-bit-depth radiographs often use 10 to 14 of their 16 bits, so fixed division by
        # 65535 would leave them nearly black. The window is the image's own min..max instead.
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        if high <= low:
            return np.zeros(values.shape, dtype=np.uint8)
        return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Composite over black: a transparent pixel carries no X-ray signal.
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba)
    if image.mode != "L":
        image = image.convert("L")  # ITU-R 601-2 luma for RGB
    return np.asarray(image, dtype=np.uint8)


def decode_image(source: str | os.PathLike | bytes) -> np.ndarray:
    """Decode a file path or encoded bytes into a (H, W) uint8 grayscale array.

    Raises ``ImageDecodeError`` with reason "missing", "empty", "unreadable", "truncated",
    "too-large" or "unsupported-mode".
    """
    if isinstance(source, bytes):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageDecodeError("missing", f"file not found: {path}")
        data = path.read_bytes()
    if not data:
        raise ImageDecodeError("empty", "file has zero bytes")

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ImageDecodeError("too-large", f"{image.width}x{image.height} exceeds {MAX_PIXELS} pixels")
            image.load()
            return _to_gray_uint8(image)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as error:
        raise ImageDecodeError("unreadable", f"not a recognised image format ({error})") from error
    except (OSError, SyntaxError, ValueError) as error:
        message = str(error)
        reason = "truncated" if "truncated" in message or "broken data stream" in message else "unreadable"
        raise ImageDecodeError(reason, message) from error
    except Image.DecompressionBombError as error:
        raise ImageDecodeError("too-large", str(error)) from error


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize a (H, W) uint8 image to (size, size) with antialiased bilinear filtering.

    NOTE: the aspect ratio is not kept; chest radiographs are close to square, and the KAD
    reference code also resizes straight to a square.
    """
    if pixels.shape == (size, size):
        return pixels
    image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(image, dtype=np.uint8)


def quarantine_frame(rows: list[dict[str, str]]) -> pl.DataFrame:
    """Build a quarantine table (image_id, path, reason, detail) from row dicts."""
    return pl.DataFrame(rows, schema=QUARANTINE_SCHEMA)
