"""``npz:/path/file.npz`` — images held in one NumPy archive, optionally with labels and dense targets.

Keys:
    ``images``  uint8, N×H×W (grayscale, made RGB), N×H×W×1 or N×H×W×3 — required
    ``labels``  integer, N — optional (targets are −1 without it)
    ``masks``   uint8, N×H×W, 255 = ignore — optional, for dense evaluation
    ``depth``   float, N×H×W — optional, for dense evaluation (stored as float32)
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .base import ArrayImageDataset


def _as_rgb_stack(images: np.ndarray, path: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise ValueError(f"npz {path}: 'images' must be uint8, got {images.dtype} (scale to 0..255 and cast)")
    if images.ndim == 3:
        return np.repeat(images[..., None], 3, axis=-1)
    if images.ndim == 4 and images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    if images.ndim == 4 and images.shape[-1] == 3:
        return images
    raise ValueError(f"npz {path}: 'images' must be N×H×W or N×H×W×3, got shape {images.shape}")


class NpzDataset(ArrayImageDataset):
    """Images (and optional labels / masks / depth) from a ``.npz`` file; see the module docstring.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not an npz archive, lacks ``images``, or a key has the wrong
            dtype/shape (the message names the key).
    """

    def __init__(self, path: str | Path, **kwargs: Any) -> None:
        path = os.path.expanduser(str(path))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"npz: file {path!r} does not exist")
        try:
            archive = np.load(path, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise ValueError(f"npz: {path!r} is not a readable .npz archive ({err})") from err
        with archive:
            if not hasattr(archive, "files") or "images" not in archive.files:
                keys = getattr(archive, "files", "not an npz archive")
                raise ValueError(f"npz {path}: missing required key 'images' (found {keys})")
            images = _as_rgb_stack(archive["images"], path)
            n, h, w = images.shape[:3]
            if n == 0:
                raise ValueError(f"npz {path}: 'images' is empty")
            labels = archive["labels"] if "labels" in archive.files else np.full(n, -1)
            if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"npz {path}: 'labels' must be {n} integers, got {labels.dtype} {labels.shape}")
            self.masks = archive["masks"] if "masks" in archive.files else None
            self.depth = archive["depth"].astype(np.float32) if "depth" in archive.files else None
        if self.masks is not None and (self.masks.shape != (n, h, w) or self.masks.dtype != np.uint8):
            raise ValueError(f"npz {path}: 'masks' must be uint8 of shape {(n, h, w)}, got {self.masks.dtype} {self.masks.shape}")
        if self.depth is not None and self.depth.shape != (n, h, w):
            raise ValueError(f"npz {path}: 'depth' must have shape {(n, h, w)}, got {self.depth.shape}")
        self.path = path
        self.has_dense = self.masks is not None or self.depth is not None
        present = np.unique(labels[labels >= 0])
        self.classes = [str(c) for c in range(int(present.max()) + 1)] if present.size else None
        super().__init__(images, labels, name=path, **kwargs)

    def _dense(self, index: int) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if self.masks is not None:
            out["mask"] = self.masks[index]
        if self.depth is not None:
            out["depth"] = self.depth[index]
        return out

    @property
    def num_mask_classes(self) -> int | None:
        """Number of segmentation classes (largest mask value below 255, plus one)."""
        if self.masks is None:
            return None
        valid = self.masks[self.masks != 255]
        return int(valid.max()) + 1 if valid.size else 0

    def extra_repr(self) -> str:
        return f"path={self.path!r}, dense={self.has_dense}"
