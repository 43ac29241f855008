"""Image decoding shared by every dataset: bytes → (lazily opened) PIL image → RGB.

Decoding is split in two so a transform can look at the header size *before* pixels are decoded
(``prepare``): a JPEG can then be decoded directly at 1/2, 1/4 or 1/8 scale (``Image.draft``) when
every crop that will be taken from it is that much larger than its output size.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DECODE_ERRORS, SkipCounter

#: Image file extensions recognised in folders, lists and shards (lower case, no dot).
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp")

#: A hook run on the opened, not yet decoded image (may call ``img.draft``).
Prepare = Callable[[Image.Image], object]


def open_lazy(data: bytes) -> Image.Image:
    """Parse the header of an encoded image held in memory; pixels are decoded later."""
    return Image.open(io.BytesIO(data))


def read_bytes(path: str | Path) -> bytes:
    """Read a whole file (one read; no file handle is left open if decoding fails later)."""
    with open(path, "rb") as f:
        return f.read()


def to_rgb(img: Image.Image) -> Image.Image:
    """Decode (if still lazy) and convert to 8-bit RGB; grayscale and palette sources become 3 channels.

    16-bit grayscale (``I;16``, common in medical/scientific PNGs) is scaled to 8 bits instead of being
    clipped at 255, which is what a plain ``convert("RGB")`` would do.
    """
    if img.mode == "RGB":
        img.load()
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's palette-transparency warning; alpha is dropped below
    return img.convert("RGB")


def decode_rgb(data: bytes, prepare: Prepare | None = None) -> Image.Image:
    """Decode encoded image bytes to RGB, running ``prepare`` on the header-only image first."""
    img = open_lazy(data)
    if prepare is not None:
        prepare(img)
    return to_rgb(img)


def try_decode(
    data: bytes | None, name: str, counter: SkipCounter, prepare: Prepare | None = None
) -> Image.Image | None:
    """Decode ``data`` or, when it is not a readable image, count and log the skip and return ``None``.

    ``data=None`` means the file could not even be read (missing, permission denied).
    """
    if data is None:
        counter.skip(name, "file could not be read")
        return None
    try:
        img = decode_rgb(data, prepare)
    except DECODE_ERRORS as err:
        counter.skip(name, err)
        return None
    counter.ok()
    return img


def has_image_extension(name: str) -> bool:
    """True if ``name`` ends with one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False
