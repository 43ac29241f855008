"""``veca data inspect SPEC``: counts, classes, image sizes, dense-label ranges and a sample grid."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from .base import MapImageDataset
from .decode import DEFAULT_MAX_PIXELS, oriented_size, read_bytes
from .errors import UnreadableItem
from .folder import FileImageDataset
from .specs import build_dataset
from .tario import lost_sample, read_sample
from .wds import WdsDataset


def save_grid(images: list[Image.Image], captions: list[str], path: str | Path, thumb: int = 96, cols: int = 8) -> Path:
    """Tile ``images`` (each fitted into ``thumb``²) with a caption under each into a PNG at ``path``."""
    if not images:
        raise ValueError("save_grid needs at least one image")
    cols = min(cols, len(images))
    rows = (len(images) + cols - 1) // cols
    cell_h = thumb + 14
    grid = Image.new("RGB", (cols * thumb, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (img, caption) in enumerate(zip(images, captions)):
        # contain() also enlarges small images (32-px digits would otherwise be specks)
        tile = ImageOps.contain(img.convert("RGB"), (thumb, thumb), Image.BICUBIC)
        x, y = (i % cols) * thumb, (i // cols) * cell_h
        grid.paste(tile, (x + (thumb - tile.size[0]) // 2, y + (thumb - tile.size[1]) // 2))
        draw.text((x + 2, y + thumb), caption[:16], fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _size_stats(sizes: list[tuple[int, int]]) -> dict[str, Any]:
    if not sizes:
        return {}
    arr = np.asarray(sizes)
    return {
        "measured": len(sizes),
        "width": {"min": int(arr[:, 0].min()), "median": float(np.median(arr[:, 0])), "max": int(arr[:, 0].max())},
        "height": {"min": int(arr[:, 1].min()), "median": float(np.median(arr[:, 1])), "max": int(arr[:, 1].max())},
    }


def _caption(label: int, classes: list[str] | None) -> str:
    if label < 0:
        return "unlabelled"
    if classes and label < len(classes) and classes[label] != str(label):
        return f"{label}:{classes[label]}"
    return str(label)


def _header_size(ds: MapImageDataset, i: int) -> tuple[int, int]:
    """Upright size of item ``i`` from its header only (raises UnreadableItem)."""
    if isinstance(ds, FileImageDataset):
        try:
            data = read_bytes(ds.path(i))
        except OSError as err:
            raise UnreadableItem(ds._name(i), f"{type(err).__name__}: {err}", "missing") from None
        return oriented_size(ds.decoder.open(data, ds._name(i)))
    return ds.load(i)[0].size


def _inspect_map(ds: MapImageDataset, max_images: int, num_samples: int) -> tuple[dict[str, Any], list, list]:
    n = len(ds)
    probe = np.unique(np.linspace(0, n - 1, min(n, max_images)).astype(int))
    sizes: list[tuple[int, int]] = []
    mask_values: set[int] = set()
    depth_range = [np.inf, -np.inf]
    for i in probe.tolist():
        try:  # header only for files: cheap even for large folders, and nothing oversized is decoded
            sizes.append(_header_size(ds, i))
            ds.skip_counter.ok()
        except UnreadableItem as err:
            ds.skip_counter.skip(err)
        if ds.has_dense:
            dense = ds._dense(i)
            if "mask" in dense:
                mask_values |= set(np.unique(dense["mask"]).tolist())
            if "depth" in dense:
                depth_range = [min(depth_range[0], float(dense["depth"].min())), max(depth_range[1], float(dense["depth"].max()))]
    labels = Counter(int(t) for t in ds.targets)
    summary: dict[str, Any] = {"type": type(ds).__name__, "num_items": n, "label_counts": dict(sorted(labels.items()))}
    summary["sizes"] = _size_stats(sizes)
    if ds.has_dense:
        summary["mask_values"] = sorted(mask_values)
        summary["depth_range"] = depth_range if np.isfinite(depth_range[0]) else None
    images, captions = [], []
    probed = set(probe.tolist())
    for i in np.unique(np.linspace(0, n - 1, min(n, num_samples)).astype(int)).tolist():
        try:  # an item is counted once: the size probe counted it already when it probed it
            img, target, _ = ds.load(i, count=i not in probed)
        except UnreadableItem:
            continue
        images.append(img)
        captions.append(_caption(target, ds.classes))
    return summary, images, captions


def _inspect_wds(ds: WdsDataset, max_images: int, num_samples: int) -> tuple[dict[str, Any], list, list]:
    """Every sample's label (no decoding); header sizes of the first ``max_images``; a few decoded."""
    labels: Counter[int] = Counter()
    sizes: list[tuple[int, int]] = []
    images: list[Image.Image] = []
    captions: list[str] = []
    n = 0
    for s in range(len(ds.shards)):
        idx = ds.shards.index(s)
        with open(idx.path, "rb") as f:
            for o in range(ds.shards.count(s)):
                n += 1
                raw = read_sample(f, idx, o) if o < len(idx) else lost_sample(idx.path, o, ds.shards.count(s), idx.problem)
                try:
                    if raw.problem is not None:
                        raise raw.problem
                    if len(sizes) < max_images:
                        assert raw.data is not None
                        sizes.append(oriented_size(ds.decoder.open(raw.data, raw.name)))
                    if len(images) < num_samples:
                        images.append(ds.decoder.decode(raw.data, raw.name))
                        captions.append(_caption(raw.label, ds.classes))
                except UnreadableItem as err:
                    ds.skip_counter.skip(err)
                    continue
                ds.skip_counter.ok()
                labels[raw.label] += 1
    summary = {"type": "WdsDataset", "num_shards": len(ds.shards), "num_items": n,
               "label_counts": dict(sorted(labels.items()))}
    summary["sizes"] = _size_stats(sizes)
    return summary, images, captions


def inspect_dataset(
    spec: str,
    split: str | None = None,
    out: str | Path | None = None,
    max_images: int = 1000,
    num_samples: int = 16,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    allow_empty_classes: bool = False,
) -> dict[str, Any]:
    """Summarise the dataset named by ``spec``; write a grid of ``num_samples`` images to ``out``.

    Image sizes are measured on up to ``max_images`` items spread over the dataset (headers only for
    image files; sizes are upright, EXIF orientation applied). Shards are read in stored order, one
    pass. Unusable images (corrupt, above ``max_pixels``, bad labels) are counted and listed, never
    decoded in full.
    """
    if max_images < 1 or num_samples < 0:
        raise ValueError(f"max_images must be >= 1 and num_samples >= 0, got {max_images}, {num_samples}")
    ds = build_dataset(spec, split=split, max_pixels=max_pixels, allow_empty_classes=allow_empty_classes)
    if isinstance(ds, WdsDataset):
        summary, images, captions = _inspect_wds(ds, max_images, num_samples)
    else:
        summary, images, captions = _inspect_map(ds, max_images, num_samples)
    summary = {"spec": spec, "split": split, **summary, "classes": ds.classes, "skipped": ds.skip_counter.skipped,
               "skipped_items": ds.skip_counter.state()["first"]}
    if out is not None and images:
        summary["grid"] = str(save_grid(images, captions, out))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable multi-line rendering of :func:`inspect_dataset`'s result."""
    lines = [f"dataset   {summary['spec']}" + (f"  (split {summary['split']})" if summary.get("split") else "")]
    lines.append(f"type      {summary['type']}" + (f", {summary['num_shards']} shards" if "num_shards" in summary else ""))
    lines.append(f"items     {summary['num_items']}  (skipped unreadable: {summary['skipped']})")
    for rec in summary.get("skipped_items", [])[:5]:
        lines.append(f"  skipped {rec['item']} ({rec['kind']}: {rec['reason']})")
    classes = summary.get("classes")
    counts = summary.get("label_counts", {})
    if classes:
        shown = ", ".join(f"{c}={counts.get(i, 0)}" for i, c in enumerate(classes[:20]))
        lines.append(f"classes   {len(classes)}: {shown}{' …' if len(classes) > 20 else ''}")
    else:
        lines.append(f"labels    {counts}")
    sizes = summary.get("sizes")
    if sizes:
        w, h = sizes["width"], sizes["height"]
        lines.append(
            f"sizes     width {w['min']}/{w['median']:g}/{w['max']}, height {h['min']}/{h['median']:g}/{h['max']} "
            f"(min/median/max over {sizes['measured']})"
        )
    if "mask_values" in summary:
        lines.append(f"masks     values {summary['mask_values']}")
        lines.append(f"depth     range {summary['depth_range']}")
    if "grid" in summary:
        lines.append(f"grid      {summary['grid']}")
    return "\n".join(lines)
