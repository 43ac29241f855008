"""Self-supervised training samples: multi-crop views plus iBOT masks, reproducible from one seed.

A sample is ``{"global": [t0, t1], "local": [...], "mask_seed": int, "label": int, "skips": [...]}``
(``skips``: records of the unusable items replaced to make it, carried to the main process so skips
are counted over all DataLoader workers). Every random choice — crop boxes, colour jitter, the seed of
the masks — comes from
``numpy.random.default_rng(sample_seed)``, so the sample is the same in any process or worker.
Masking follows iBOT (arXiv:2111.07832) / DINOv2: the collate (``self.collate_fn``) masks exactly
``mask_probability`` of the batch's global crops with stratified ratios in ``mask_ratio`` and BEiT
block masks (:class:`~veca_ssl.data.masking.BatchMasker`), seeded by the batch's ``mask_seed`` values.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from .collate import collate_multicrop
from .masking import BatchMasker, MaskingGenerator
from .sampler import derive_seed
from .tario import RawSample
from .transforms import CropPlan, MultiCropTransform


class _SampleMaker:
    """Shared by the map-style and streaming SSL datasets: crops + the masks' seed from an image and an rng;
    ``batch_masker`` draws a batch's masks in the collate."""

    def __init__(
        self,
        transform: MultiCropTransform,
        mask_generator: MaskingGenerator | None,
        patch_size: int,
        mask_probability: float,
        mask_ratio: tuple[float, float],
    ) -> None:
        if patch_size < 1 or transform.global_size % patch_size:
            raise ValueError(
                f"global crop size {transform.global_size} must be a multiple of patch_size={patch_size}"
            )
        self.grid = (transform.global_size // patch_size,) * 2
        if mask_generator is not None and mask_generator.grid != self.grid:
            raise ValueError(
                f"mask_generator grid {mask_generator.grid} does not match the global crop's patch grid "
                f"{self.grid} ({transform.global_size}px / patch {patch_size})"
            )
        lo, hi = (float(r) for r in mask_ratio)
        if not 0.0 <= lo <= hi <= 1.0 or not 0.0 <= mask_probability <= 1.0:
            raise ValueError(f"need 0 <= mask_ratio[0] <= mask_ratio[1] <= 1 and a probability, got {mask_ratio}, {mask_probability}")
        self.transform, self.mask_generator, self.patch_size = transform, mask_generator, int(patch_size)
        self.mask_probability, self.mask_ratio = float(mask_probability), (lo, hi)
        # the generator's grid is checked above; the batch masker draws every batch's masks
        self.batch_masker = BatchMasker(self.patch_size, self.mask_probability if mask_generator else 0.0,
                                        self.mask_ratio, mask_generator)

    def make(self, img: Image.Image, plan: CropPlan | None, label: int, rng: np.random.Generator) -> dict[str, Any]:
        if plan is None:  # the loader did not run the pre-decode hook (in-memory images)
            plan = self.transform.prepare(img, rng)
        crops = self.transform.apply(img, plan, rng)
        return {"global": crops["global"], "local": crops["local"], "mask_seed": int(rng.integers(0, 2**63)),
                "label": int(label)}


class SSLDataset(Dataset):
    """Map-style SSL view of ``base``; ``__getitem__((index, sample_seed))`` → one training sample.

    Use with :class:`~veca_ssl.data.sampler.InfiniteSampler` (which yields those pairs) and
    :func:`~veca_ssl.data.collate.collate_multicrop` (``self.collate_fn``). A plain int index is
    accepted too; its seed is then derived from ``(seed, index)``.

    ``base`` is any map-style dataset whose items start with ``(image, label)``; datasets of this
    package are read through their ``load`` method so the crop boxes are drawn before decoding and
    large JPEGs are decoded at reduced scale when the crops allow it (see ``transforms.py``).
    """

    def __init__(
        self,
        base: Any,
        transform: MultiCropTransform,
        mask_generator: MaskingGenerator | None,
        patch_size: int,
        mask_probability: float = 0.5,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        seed: int = 0,
    ) -> None:
        if len(base) == 0:
            raise ValueError(f"SSLDataset: the base dataset {base!r} is empty")
        self.base, self.seed = base, int(seed)
        self.maker = _SampleMaker(transform, mask_generator, patch_size, mask_probability, mask_ratio)
        self.transform, self.mask_generator = transform, mask_generator
        self.collate_fn = partial(collate_multicrop, local_size=transform.local_size,
                                  masker=self.maker.batch_masker)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, (tuple, list)):
            index, seed = int(key[0]), int(key[1])
        else:
            index = int(key)
            seed = derive_seed(self.seed, index)
        rng = np.random.default_rng(seed)
        load = getattr(self.base, "load", None)
        if load is None:
            item = self.base[index]
            return {**self.maker.make(item[0], None, item[1], rng), "skips": []}
        plans: list[CropPlan] = []
        skipped: list[dict[str, str]] = []
        # training replaces an unusable image by the next readable index (deterministic; counted)
        img, label, _ = load(index, lambda im: plans.append(self.transform.prepare(im, rng)), substitute=True,
                             skipped=skipped)
        return {**self.maker.make(img, plans[-1] if plans else None, label, rng), "skips": skipped}


class SSLIterableDataset(IterableDataset):
    """Streaming SSL samples from the training stream of a :class:`~veca_ssl.data.wds.WdsDataset`.

    Each position of the stream carries its own seed (``WdsDataset.iter_train``); an unusable sample
    is replaced by the next usable one of its shuffle window and recorded in the sample's ``skips``.
    """

    def __init__(
        self,
        base: Any,
        transform: MultiCropTransform,
        mask_generator: MaskingGenerator | None,
        patch_size: int,
        mask_probability: float = 0.5,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
    ) -> None:
        super().__init__()
        self.base = base
        self.maker = _SampleMaker(transform, mask_generator, patch_size, mask_probability, mask_ratio)
        self.transform = transform
        self.collate_fn = partial(collate_multicrop, local_size=transform.local_size,
                                  masker=self.maker.batch_masker)

    def _make(self, raw: RawSample, seed: int) -> dict[str, Any]:
        rng = np.random.default_rng(seed)
        plans: list[CropPlan] = []
        img = self.base.decoder.decode(raw.data, raw.name, lambda im: plans.append(self.transform.prepare(im, rng)))
        return self.maker.make(img, plans[-1] if plans else None, raw.label, rng)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for sample, skipped in self.base.iter_train(self._make):
            sample["skips"] = skipped
            yield sample
