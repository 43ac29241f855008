"""``veca data inspect SPEC``: counts, classes, image sizes, dense-label ranges and a sample grid."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from .base import MapImageDataset
from .decode import open_lazy, try_decode
from .folder import FileImageDataset
from .specs import build_dataset
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


def _inspect_map(ds: MapImageDataset, max_images: int, num_samples: int) -> tuple[dict[str, Any], list, list]:
    n = len(ds)
    probe = np.unique(np.linspace(0, n - 1, min(n, max_images)).astype(int))
    sizes: list[tuple[int, int]] = []
    mask_values: set[int] = set()
    depth_range = [np.inf, -np.inf]
    for i in probe.tolist():
        if isinstance(ds, FileImageDataset):  # header only: cheap even for large folders
            try:
                sizes.append(open_lazy(ds.read_encoded(i)).size)
            except (OSError, SyntaxError, ValueError):
                ds.skip_counter.skip(ds._name(i), "unreadable header")
        else:
            sizes.append(ds.load(i)[0].size)
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
    picks = np.unique(np.linspace(0, n - 1, min(n, num_samples)).astype(int)).tolist()
    loaded = [ds.load(i) for i in picks]
    return summary, [img for img, _, _ in loaded], [_caption(t, ds.classes) for _, t, _ in loaded]


def _inspect_wds(ds: WdsDataset, max_images: int, num_samples: int) -> tuple[dict[str, Any], list, list]:
    labels: Counter[int] = Counter()
    sizes: list[tuple[int, int]] = []
    images: list[Image.Image] = []
    captions: list[str] = []
    n = 0
    for raw in ds.iter_raw():
        n += 1
        labels[raw.label] += 1
        if len(sizes) < max_images or len(images) < num_samples:
            img = try_decode(raw.data, raw.name, ds.skip_counter)
            if img is None:
                continue
            if len(sizes) < max_images:
                sizes.append(img.size)
            if len(images) < num_samples:
                images.append(img)
                captions.append(_caption(raw.label, ds.classes))
    summary = {"type": "WdsDataset", "num_shards": len(ds.urls), "num_items": n, "label_counts": dict(sorted(labels.items()))}
    summary["sizes"] = _size_stats(sizes)
    return summary, images, captions


def inspect_dataset(
    spec: str,
    split: str | None = None,
    out: str | Path | None = None,
    max_images: int = 1000,
    num_samples: int = 16,
) -> dict[str, Any]:
    """Summarise the dataset named by ``spec``; write a grid of ``num_samples`` images to ``out``.

    Image sizes are measured on up to ``max_images`` items spread over the dataset (headers only for
    image files). Shards are read in stored order, one pass, with no shuffling.
    """
    if max_images < 1 or num_samples < 0:
        raise ValueError(f"max_images must be >= 1 and num_samples >= 0, got {max_images}, {num_samples}")
    ds = build_dataset(spec, split=split, **({"shuffle_buffer": 0, "shard_shuffle": False} if spec.startswith("wds:") else {}))
    if isinstance(ds, WdsDataset):
        summary, images, captions = _inspect_wds(ds, max_images, num_samples)
    else:
        summary, images, captions = _inspect_map(ds, max_images, num_samples)
    summary = {"spec": spec, "split": split, **summary, "classes": ds.classes, "skipped": ds.skip_counter.skipped}
    if out is not None and images:
        summary["grid"] = str(save_grid(images, captions, out))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable multi-line rendering of :func:`inspect_dataset`'s result."""
    lines = [f"dataset   {summary['spec']}" + (f"  (split {summary['split']})" if summary.get("split") else "")]
    lines.append(f"type      {summary['type']}" + (f", {summary['num_shards']} shards" if "num_shards" in summary else ""))
    lines.append(f"items     {summary['num_items']}  (skipped unreadable: {summary['skipped']})")
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
