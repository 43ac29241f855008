"""Base class of the map-style datasets: decoding with skip accounting, targets, dense labels, transforms.

Items are ``(image, target)`` — a PIL RGB image (after ``transform`` if one is given) and an int
(−1 when unlabelled) — or ``(image, target, dense)`` for datasets with dense labels, where ``dense``
holds ``"mask"`` (uint8 H×W, 255 = ignore) and/or ``"depth"`` (float32 H×W).

A transform whose ``joint`` attribute is true (e.g. :class:`~veca_ssl.data.transforms.DenseEvalTransform`)
is called as ``transform(image, dense) -> (image, dense)`` so geometric changes stay aligned;
any other transform is called as ``transform(image)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .decode import DEFAULT_MAX_PIXELS, Decoder, Prepare
from .errors import SkipCounter, UnreadableItem


class MapImageDataset(Dataset):
    """Map-style image dataset; subclasses implement ``__len__``, ``_load_rgb`` and ``_name``.

    An unreadable item is never replaced by a blank image, and by default never by another item:
    ``dataset[i]`` raises :class:`~veca_ssl.data.errors.UnreadableItem` (after counting it), so an
    evaluation or extraction can drop the row and list its index instead of mislabelling it. Training
    asks :meth:`load` to ``substitute``: the next readable index is used instead (``index+1``,
    ``index+2``, … wrapping around), deterministically, so a given index always yields the same item.

    Args:
        transform: applied to the PIL image (see module docstring for joint dense transforms).
        skip_counter: counter of this process; a new, recording-only one is made when ``None``.
        max_skip_fraction: tolerated fraction of unreadable images (``data.max_skip_fraction``).
        dense: ``None`` → items carry dense labels iff the dataset has them; ``False`` → always
            ``(image, target)``; ``True`` → require dense labels (``ValueError`` if there are none).
        max_pixels: images declaring more pixels are skipped before decoding (``data.max_pixels``).
    """

    #: Subclasses with masks/depth set this in ``__init__``.
    has_dense: bool = False

    def __init__(
        self,
        transform: Callable[..., Any] | None = None,
        skip_counter: SkipCounter | None = None,
        max_skip_fraction: float = 0.01,
        dense: bool | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.transform = transform
        # records and logs; the threshold is judged where counts of all processes meet (train loop,
        # feature engine, make-shards), never on one DataLoader worker's share
        self.skip_counter = skip_counter if skip_counter is not None else SkipCounter(max_skip_fraction, enforce=False)
        self.decoder = Decoder(max_pixels)
        self._dense_request = dense
        #: Class names (index = label) when known, else ``None``.
        self.classes: list[str] | None = getattr(self, "classes", None)
        #: Integer label per item (−1 = unlabelled).
        self.targets: np.ndarray = getattr(self, "targets", np.zeros(0, dtype=np.int64))

    # -- subclass hooks ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.targets)

    def _load_rgb(self, index: int, prepare: Prepare | None) -> Image.Image:
        """Return item ``index`` as an RGB image; raise :class:`UnreadableItem` if it is unusable."""
        raise NotImplementedError

    def _name(self, index: int) -> str:
        """How item ``index`` is named in logs (a path, or ``file.npz[17]``)."""
        return f"{type(self).__name__}[{index}]"

    def _dense(self, index: int) -> dict[str, np.ndarray]:
        """Dense labels of item ``index`` (only called when ``has_dense``)."""
        return {}

    # -- public API ----------------------------------------------------------------------------
    @property
    def returns_dense(self) -> bool:
        """Whether items are ``(image, target, dense)`` triples."""
        if self._dense_request is True and not self.has_dense:
            raise ValueError(f"{type(self).__name__} has no dense labels (masks/depth) but dense=True was asked")
        return self.has_dense if self._dense_request is None else bool(self._dense_request)

    def load(
        self,
        index: int,
        prepare: Prepare | None = None,
        substitute: bool = False,
        skipped: list[dict[str, str]] | None = None,
        count: bool = True,
    ) -> tuple[Image.Image, int, int]:
        """Decode item ``index``; return ``(rgb_image, target, used_index)``.

        ``prepare`` runs on the header-only image before pixels are decoded (see ``decode.py``).
        Unusable items are counted in ``skip_counter`` (usable ones as seen; neither with ``count``
        off, for an item the caller counted already) and appended to ``skipped`` (records to carry to
        the main process). Without ``substitute`` the first one raises :class:`UnreadableItem`; with
        it the next readable index is returned instead (``used_index`` tells which).
        """
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} items")
        index %= n
        for offset in range(n if substitute else 1):
            j = (index + offset) % n
            try:
                img = self._load_rgb(j, prepare)
            except UnreadableItem as err:
                if count:
                    self.skip_counter.skip(err)
                if skipped is not None:
                    skipped.append(err.record())
                if not substitute:
                    raise
                continue
            if count:
                self.skip_counter.ok()
            return img, int(self.targets[j]), j
        raise UnreadableItem(type(self).__name__, f"no readable image among its {n} items", "unreadable")

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        img, target, j = self.load(int(index))
        if self.returns_dense:
            dense = self._dense(j)
            if self.transform is not None:
                if getattr(self.transform, "joint", False):
                    img, dense = self.transform(img, dense)
                else:
                    img = self.transform(img)
            return img, target, dense
        if self.transform is not None:
            img = self.transform(img)
        return img, target

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        extra = self.extra_repr()
        return f"{type(self).__name__}(n={len(self)}{', ' + extra if extra else ''})"


class ArrayImageDataset(MapImageDataset):
    """Images held in memory as a uint8 array (N,H,W,3); the base of ``npz`` and ``digits``."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, name: str, **kwargs: Any) -> None:
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self._source = name
        super().__init__(**kwargs)

    def _load_rgb(self, index: int, prepare: Prepare | None) -> Image.Image:
        return Image.fromarray(self.images[index], "RGB")  # in memory: nothing can be unreadable

    def _name(self, index: int) -> str:
        return f"{self._source}[{index}]"
