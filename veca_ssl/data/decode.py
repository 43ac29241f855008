"""Image decoding shared by every reader — training, evaluation, extraction, shards and ``inspect``.

This module is the one home of "these bytes are not a usable image": :data:`DECODE_ERRORS` lists every
exception class a decoder may raise on bad input, and :class:`Decoder` turns each of them into an
:class:`~veca_ssl.data.errors.UnreadableItem` naming the item. Callers catch that one class only.

Decoding happens in two steps so that nothing large is decoded by accident:

1. the header is parsed (:meth:`Decoder.open`): size, format and EXIF orientation are known, no pixels;
   an image with more pixels than ``max_pixels`` is refused here (a 164 KB palette PNG can declare
   13000² pixels and cost a gigabyte to decode);
2. ``prepare`` may look at the header-only image (in the orientation the image will be shown in) and
   ask for a reduced-scale JPEG decode (``Image.draft``), then pixels are decoded, converted to RGB and
   turned upright according to their EXIF orientation (``ImageOps.exif_transpose``).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UnreadableItem

#: Image file extensions recognised in folders, lists and shards (lower case, no dot).
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp")

#: Every exception class that means "these bytes are not a readable image" (as opposed to a bug in
#: our code). PIL raises UnidentifiedImageError (an OSError) for non-images, OSError for truncated
#: files, SyntaxError for broken PNG chunks, ValueError/TypeError/IndexError/KeyError for malformed
#: headers of some formats, struct/zlib errors for damaged headers and streams, EOFError for early
#: ends, and DecompressionBombError above its own (twice ``Image.MAX_IMAGE_PIXELS``) limit.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)

#: Default pixel limit: PIL's own warning threshold (~89.5 megapixels, e.g. 9459 × 9459).
DEFAULT_MAX_PIXELS: int = 89_478_485

#: A hook run on the opened, not yet decoded image (may call ``img.draft``).
Prepare = Callable[[Any], object]

#: EXIF orientations (tag 0x0112) whose transform swaps width and height.
_SWAPS_AXES = (5, 6, 7, 8)
_ORIENTATION_TAG = 0x0112


def read_bytes(path: str | Path) -> bytes:
    """Read a whole file (one read; no file handle is left open if decoding fails later)."""
    with open(path, "rb") as f:
        return f.read()


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1–8) of an opened image; 1 when absent or unreadable."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except DECODE_ERRORS:
        return 1
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of the image as displayed, i.e. after its EXIF orientation is applied."""
    w, h = img.size
    return (h, w) if exif_orientation(img) in _SWAPS_AXES else (w, h)


class _OrientedHeader:
    """What ``prepare`` sees of a header-only image whose EXIF orientation swaps its axes.

    ``prepare`` draws crop boxes in the upright frame, so it must see the upright size; a draft
    request is translated back to the stored frame and its answer into the upright one.
    """

    def __init__(self, img: Image.Image) -> None:
        self._img = img
        self.size = img.size[::-1]
        self.format = img.format
        self.mode = img.mode

    def draft(self, mode: str, size: tuple[int, int]) -> Any:
        result = self._img.draft(mode, (size[1], size[0]))
        if result is None:
            return None
        out_mode, box = result
        return out_mode, (box[1], box[0], box[3], box[2])


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


class Decoder:
    """Encoded bytes → upright RGB PIL image, or :class:`UnreadableItem`; see the module docstring.

    Args:
        max_pixels: images whose header declares more pixels are refused before decoding
            (config ``data.max_pixels``; ``None`` or 0 = no limit beyond PIL's own).

    Picklable (DataLoader workers get a copy).
    """

    def __init__(self, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        if max_pixels is not None and int(max_pixels) < 0:
            raise ValueError(f"data.max_pixels must be >= 0 (0 = no limit), got {max_pixels}")
        self.max_pixels = int(max_pixels) if max_pixels else None

    def open(self, data: bytes, name: str) -> Image.Image:
        """Parse the header of an encoded image (no pixels decoded); refuse oversized images."""
        try:
            with warnings.catch_warnings():
                # the pixel limit below is ours; PIL's warning at its own threshold would be noise
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as err:
            raise UnreadableItem(name, f"{err}", "too large") from None
        except DECODE_ERRORS as err:
            raise UnreadableItem(name, _describe(err), "unreadable") from None
        w, h = img.size
        if self.max_pixels is not None and w * h > self.max_pixels:
            raise UnreadableItem(
                name, f"{w}x{h} = {w * h} pixels is above data.max_pixels={self.max_pixels} (not decoded)",
                "too large")
        return img

    def decode(self, data: bytes | None, name: str, prepare: Prepare | None = None) -> Image.Image:
        """Decode ``data`` to an upright RGB image; ``data=None`` means the file could not be read."""
        if data is None:
            raise UnreadableItem(name, "file could not be read", "missing")
        img = self.open(data, name)
        try:
            orientation = exif_orientation(img)
            if prepare is not None:
                prepare(_OrientedHeader(img) if orientation in _SWAPS_AXES else img)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.load()
                if orientation != 1:
                    img = ImageOps.exif_transpose(img)
                rgb = to_rgb(img)
        except UnreadableItem:
            raise
        except DECODE_ERRORS as err:
            raise UnreadableItem(name, _describe(err), "unreadable") from None
        return rgb

    def read(self, path: str | Path, prepare: Prepare | None = None) -> Image.Image:
        """Read and decode the file at ``path`` (a missing/unopenable file is a ``"missing"`` skip)."""
        try:
            data = read_bytes(path)
        except OSError as err:
            raise UnreadableItem(str(path), _describe(err), "missing") from None
        return self.decode(data, str(path), prepare)

    def __repr__(self) -> str:
        return f"Decoder(max_pixels={self.max_pixels})"


def _describe(err: BaseException) -> str:
    if isinstance(err, UnidentifiedImageError):  # its message holds a memory address: say it plainly
        return "UnidentifiedImageError: not an image in a known format"
    text = str(err) or type(err).__name__
    return f"{type(err).__name__}: {text}"[:300]


def has_image_extension(name: str) -> bool:
    """True if ``name`` ends with one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False
