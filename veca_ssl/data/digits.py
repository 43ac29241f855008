"""``digits`` — scikit-learn's bundled handwritten digits, the embedded default dataset (no download).

Source: ``sklearn.datasets.load_digits`` — 1797 grayscale 8×8 images with 17 intensity levels (0–16),
labels 0–9. Each image is scaled to 0–255 (``round(v * 255 / 16)``), upscaled to 32×32 with bicubic
interpolation (so a 16-px patch grid is 2×2 and an 8-px grid 4×4) and replicated to 3 channels (RGB).

Fixed split (seeded, stratified by label, ``sklearn.model_selection.train_test_split`` with
``test_size=0.2, random_state=0``): ``split="train"`` → 1437 images, ``split="val"`` → 360 images,
``split=None`` → all 1797 in the original order. Every class is in both splits in its overall
proportion.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from .base import ArrayImageDataset

#: Output side of the upscaled digits (pixels).
DIGITS_SIZE = 32
#: Seed and validation fraction of the fixed split (changing them would change every benchmark).
DIGITS_SPLIT_SEED = 0
DIGITS_VAL_FRACTION = 0.2


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images N×32×32×3 uint8, labels N, train indices, val indices), computed once per process."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    raw = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
    up = np.stack(
        [np.asarray(Image.fromarray(im, "L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.BICUBIC)) for im in raw]
    )
    images = np.repeat(up[..., None], 3, axis=-1)
    labels = bunch.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, val_idx = train_test_split(
        idx, test_size=DIGITS_VAL_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=labels
    )
    for a in (images, labels):
        a.setflags(write=False)
    return images, labels, np.sort(train_idx), np.sort(val_idx)


class DigitsDataset(ArrayImageDataset):
    """Handwritten digits as 32×32 RGB PIL images with labels 0–9; see the module docstring.

    Args:
        split: ``"train"``, ``"val"`` or ``None`` (all images).
    """

    def __init__(self, split: str | None = None, **kwargs: Any) -> None:
        images, labels, train_idx, val_idx = _digits_arrays()
        if split is None:
            idx = np.arange(len(labels))
        elif split == "train":
            idx = train_idx
        elif split in ("val", "test"):
            idx = val_idx
        else:
            raise ValueError(f"digits: unknown split {split!r}; use 'train', 'val' or None (all images)")
        self.split = split
        self.indices = idx
        self.classes = [str(c) for c in range(10)]
        super().__init__(images[idx], labels[idx], name=f"digits[{split or 'all'}]", **kwargs)

    def extra_repr(self) -> str:
        return f"split={self.split!r}"
