"""The one feature-extraction engine behind every evaluation protocol and ``veca extract``.

A frozen backbone, a dataset and a list of core widths → per width a :class:`FeatureSet` holding the
image ("CLS" = core 0) feature of the last ``n`` blocks, optionally the mean patch token and the patch
tokens, with the labels and dataset indices. Each batch is decoded and transformed once and then run
at every width, so adding widths costs forward passes only, never data loading.

Distributed: when ``torch.distributed`` is initialised each rank extracts a contiguous shard of the
dataset and the shards are all-gathered, so every rank ends up with the full set in dataset order
(the DINOv2 evaluation setup, arXiv:2304.07193).

Unusable images: a row is never filled with another image's features or label. An item that cannot
be decoded is left out; its dataset index, name and reason are listed in ``FeatureSet.skipped``
(counted over all DataLoader workers and ranks), and extraction stops with
:class:`~veca_ssl.data.errors.DataSkipError` when they pass ``max_skip_fraction``.

Streaming datasets (``wds:``) need no length: each rank and worker reads its own part, every row
carries its global sample index, and rows are put in index order after gathering.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset

from veca_ssl import distributed as vd
from veca_ssl.data.errors import SKIP_CONFIG_KEY, SkipCounter, UnreadableItem
from veca_ssl.data.wds import Skipped
from veca_ssl.progress import track
from veca_ssl.widths import Width, resolve_widths


@dataclass
class FeatureSet:
    """Frozen features of one dataset at one core width (row ``i`` = dataset item ``indices[i]``)."""

    width: Width
    cls: torch.Tensor  # (N, n_blocks, D): image feature of the last n blocks; [:, -1] = last block
    labels: torch.Tensor  # (N,) int64, -1 = unlabelled
    indices: torch.Tensor  # (N,) int64 dataset indices
    patch_mean: torch.Tensor | None = None  # (N, D) mean patch token of the last block
    patches: torch.Tensor | None = None  # (N, Hp*Wp, D) patch tokens of the last block
    grid: tuple[int, int] | None = None  # (Hp, Wp) of ``patches``
    #: Items left out because they could not be used: ``{"index", "item", "kind", "reason"}`` each.
    skipped: list[dict[str, Any]] = field(default_factory=list)
    #: Items attempted (rows + skipped).
    seen: int = 0

    @property
    def image(self) -> torch.Tensor:
        """(N, D) image feature of the last block — what k-NN and logistic regression use."""
        return self.cls[:, -1]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class _Indexed(Dataset):
    """Yields ``(image_tensor, target, index)`` from items ``(image, target[, dense])``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], resolution: int | tuple[int, int]):
        self.dataset, self.indices = dataset, list(indices)
        self.resolution = resolution
        self._pil_transform = None

    def __len__(self) -> int:
        return len(self.indices)

    def _to_tensor(self, image: object) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            return image
        if isinstance(image, np.ndarray):
            return torch.from_numpy(image)
        # A PIL image: the dataset came without a transform; apply the standard eval transform.
        if self._pil_transform is None:
            from veca_ssl.data.transforms import make_eval_transform

            size = self.resolution if isinstance(self.resolution, int) else max(self.resolution)
            self._pil_transform = make_eval_transform(size)
        return self._pil_transform(image)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int] | Skipped:
        index = self.indices[i]
        try:
            item = self.dataset[index]
        except UnreadableItem as err:  # left out and listed; never replaced by another item
            return Skipped(index, err.record())
        if isinstance(item, tuple | list):
            image, target = item[0], (item[1] if len(item) > 1 else -1)
        else:
            image, target = item, -1
        return self._to_tensor(image), int(target), index


class _IndexedStream(IterableDataset):
    """Iterable datasets: ``(image, target, index)`` or :class:`Skipped`; the dataset splits itself by
    rank and worker. ``WdsDataset`` rows carry their global sample index; other iterables their position."""

    def __init__(self, dataset: IterableDataset, resolution: int | tuple[int, int]):
        self.dataset, self.convert = dataset, _Indexed(dataset, [], resolution)

    def __iter__(self):
        indexed = getattr(self.dataset, "iter_indexed", None)
        items = indexed() if indexed is not None else enumerate(self.dataset)
        for entry in items:
            if isinstance(entry, Skipped):
                yield entry
                continue
            if indexed is not None:
                image, target, index = entry
            else:
                index, item = entry
                image, target = (item[0], item[1]) if isinstance(item, tuple | list) else (item, -1)
            yield self.convert._to_tensor(image), int(target), int(index)


def _collate_rows(items: list) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, list[Skipped]]:
    """Stack the usable items of a batch; pass the skipped ones on separately (they have no image)."""
    good = [it for it in items if not isinstance(it, Skipped)]
    skipped = [it for it in items if isinstance(it, Skipped)]
    images = torch.stack([g[0] for g in good]) if good else None
    targets = torch.tensor([int(g[1]) for g in good], dtype=torch.long)
    indices = torch.tensor([int(g[2]) for g in good], dtype=torch.long)
    return images, targets, indices, skipped


def _gather_objects(local: list) -> list:
    """Concatenate every rank's list (rank order); the list itself when not distributed."""
    return [x for p in vd.all_gather_object(local) for x in p]


def _shard_range(n: int) -> range:
    """Contiguous slice of ``range(n)`` of this rank (all of it when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return range(n)
    world, rank = dist.get_world_size(), dist.get_rank()
    bounds = np.linspace(0, n, world + 1).round().astype(int)
    return range(int(bounds[rank]), int(bounds[rank + 1]))


def _all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0 in rank order (ranks may hold different counts)."""
    return vd.all_gather_tensor(t, uneven=True)


def _prepare(images: torch.Tensor, resolution: tuple[int, int], device: torch.device) -> torch.Tensor:
    images = images.to(device, non_blocking=True).float()
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if tuple(images.shape[-2:]) != resolution:
        # Tensor datasets of another size: resize rather than fail (transforms normally handle this).
        images = F.interpolate(images, size=resolution, mode="bicubic", antialias=True, align_corners=False)
    return images


def _forward_blocks(model: torch.nn.Module, images: torch.Tensor, width: Width, n_blocks: int) -> list[dict]:
    kwargs = {} if width is None else {"num_cores": width}
    if n_blocks == 1:
        return [model.forward_features(images, **kwargs)]
    return list(model.get_intermediate_features(images, n=n_blocks, **kwargs))


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    dataset: Dataset,
    widths: Sequence[int | None] | None,
    resolution: int | tuple[int, int],
    batch_size: int,
    device: torch.device | str,
    n_last_blocks: int = 1,
    with_patch_mean: bool = False,
    with_patches: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    max_skip_fraction: float | None = 0.01,
    skip_option: str = SKIP_CONFIG_KEY,
) -> dict[Width, FeatureSet]:
    """Extract frozen features of ``dataset`` at every width in one pass over the data.

    Args:
        model: a backbone of ``veca_ssl.models`` (``forward_features``/``get_intermediate_features``),
            in its current feature space (``set_feature_space``).
        dataset: map-style dataset of ``(image, target[, dense])``; images are normalised tensors
            (or PIL images, then the standard eval transform is applied).
        widths: core widths (``None`` = all widths of the model; a dense ViT has only ``None``).
        resolution: eval side (or ``(H, W)``), a multiple of the patch size.
        n_last_blocks: image features of the last ``n`` blocks (DINOv2 linear probe uses 1 and 4).
        with_patch_mean: also keep the mean patch token of the last block.
        with_patches: also keep all patch tokens of the last block (dense probes).
        dtype: storage dtype of the features (CPU tensors).
        max_skip_fraction: stop (``DataSkipError``, after the pass, on every rank alike) when more than
            this fraction of items is unusable; ``None`` = never stop, only list them.
        skip_option: the setting the error names (a command's ``--max-skip-fraction``).

    Returns:
        ``{width: FeatureSet}`` in the order of ``widths``, rows in dataset-index order; unusable items
        are absent and listed in ``FeatureSet.skipped``.
    """
    device = torch.device(device)
    widths = resolve_widths(model, widths)
    res = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    patch = int(getattr(model, "patch_size", 1))
    if res[0] % patch or res[1] % patch:
        raise ValueError(f"resolution {res} is not a multiple of the patch size {patch}")
    depth = getattr(model, "depth", None)
    if n_last_blocks < 1 or (depth is not None and n_last_blocks > depth):
        raise ValueError(f"n_last_blocks={n_last_blocks} must be in [1, depth={depth}]")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    model.eval().to(device)
    if isinstance(dataset, IterableDataset):
        # Streaming data shards itself across ranks (and workers); indices are stream positions.
        wrapped: Dataset = _IndexedStream(dataset, res)
    else:
        wrapped = _Indexed(dataset, _shard_range(len(dataset)), res)  # type: ignore[arg-type]
    loader = DataLoader(wrapped, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", collate_fn=_collate_rows)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    parts: dict[Width, dict[str, list[torch.Tensor]]] = {w: {} for w in widths}
    grids: dict[Width, tuple[int, int]] = {}
    labels: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    skipped: list[dict[str, Any]] = []
    # A bar in a terminal and progress lines in the log (batch jobs have no terminal).
    for images, targets, idx, bad in track(loader, desc="extract", unit="batch", bar=progress):
        skipped += [{"index": int(b.index), **b.record} for b in bad]
        if images is None:
            continue
        images = _prepare(images, res, device)
        labels.append(targets.long())
        indices.append(idx.long())
        for w in widths:
            with autocast:
                blocks = _forward_blocks(model, images, w, n_last_blocks)
            store = parts[w]
            store.setdefault("cls", []).append(
                torch.stack([b["cls"] for b in blocks], dim=1).to("cpu", dtype))
            last = blocks[-1]["patches"]
            if with_patch_mean:
                store.setdefault("patch_mean", []).append(last.float().mean(dim=1).to("cpu", dtype))
            if with_patches:
                store.setdefault("patches", []).append(last.to("cpu", dtype))
                grid = blocks[-1].get("grid")
                grids[w] = tuple(int(g) for g in grid) if grid is not None else (res[0] // patch, res[1] // patch)

    d = int(getattr(model, "num_features", getattr(model, "embed_dim", 0)))

    def cat(chunks: list[torch.Tensor] | None, empty_shape: tuple[int, ...], dt: torch.dtype) -> torch.Tensor:
        local = torch.cat(chunks) if chunks else torch.zeros(empty_shape, dtype=dt)
        return _all_gather_rows(local)

    n_p = (res[0] // patch) * (res[1] // patch)
    all_labels = cat(labels, (0,), torch.long)
    all_indices = cat(indices, (0,), torch.long)
    # index order: ranks and workers of a stream interleave; map-style rows are in order already
    order = torch.argsort(all_indices, stable=True)
    in_order = bool((order == torch.arange(len(order))).all())
    all_skipped = sorted(_gather_objects(skipped), key=lambda r: r["index"])
    # the whole pass is known: judge the fraction over all of it (min_seen=1); workers logged the items
    counter = SkipCounter(max_skip_fraction if max_skip_fraction is not None else 1.0, min_seen=1, enforce=False,
                          log=False, option=skip_option)
    counter.add(len(all_indices) + len(all_skipped), all_skipped)
    if max_skip_fraction is not None:
        counter.check()  # the same gathered counts on every rank: all stop together

    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or in_order else t[order]

    out: dict[Width, FeatureSet] = {}
    for w in widths:
        store = parts[w]
        out[w] = FeatureSet(
            width=w,
            cls=rows(cat(store.get("cls"), (0, n_last_blocks, d), dtype)),
            labels=rows(all_labels),
            indices=rows(all_indices),
            patch_mean=rows(cat(store.get("patch_mean"), (0, d), dtype)) if with_patch_mean else None,
            patches=rows(cat(store.get("patches"), (0, n_p, d), dtype)) if with_patches else None,
            grid=grids.get(w, (res[0] // patch, res[1] // patch)) if with_patches else None,
            skipped=all_skipped,
            seen=counter.seen,
        )
    return out


def skip_summary(features: dict[Width, FeatureSet] | FeatureSet, max_listed: int = 100) -> dict[str, Any]:
    """Unusable items of one extraction for reports: counts, their indices and the first few names."""
    fs = features if isinstance(features, FeatureSet) else next(iter(features.values()))
    return {"seen": fs.seen, "skipped": len(fs.skipped),
            "skipped_indices": [r["index"] for r in fs.skipped[:max_listed]],
            "first": [f"{r['item']} ({r['kind']}: {r['reason']})" for r in fs.skipped[:5]]}
