"""Image folder / npz / any map-style spec → WebDataset tar shards (``veca data make-shards``).

Each sample is written as ``<key>.jpg`` or ``<key>.png`` (the original file bytes when the source is
a JPEG or PNG file, so nothing is re-compressed; other formats and in-memory arrays are encoded as
lossless PNG), ``<key>.cls`` (the integer label, ASCII; −1 when unlabelled) and ``<key>.json``
(source name and class name). ``<key>`` is the source index, zero-padded. Samples are shuffled
across shards by default (a class-sorted folder would otherwise give single-class shards, which a
streaming shuffle buffer cannot fully mix). A ``manifest.json`` records counts and class names.
"""

from __future__ import annotations

import glob
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from tqdm import tqdm

from .base import MapImageDataset
from .decode import open_lazy, to_rgb
from .errors import DECODE_ERRORS, SkipCounter
from .folder import FileImageDataset, ImageFolderDataset
from .npz import NpzDataset
from .specs import SPEC_KINDS, build_dataset
from .wds import MANIFEST_NAME

SHARD_NAME = "shard-%06d.tar"


def _source_dataset(src: str, split: str | None, counter: SkipCounter) -> MapImageDataset:
    kind = src.partition(":")[0].lower()
    if kind in SPEC_KINDS and ":" in src or src in SPEC_KINDS:
        ds = build_dataset(src, split=split, skip_counter=counter, dense=False)
    elif os.path.isdir(src):
        ds = ImageFolderDataset(src, skip_counter=counter, dense=False)
    elif src.endswith(".npz"):
        ds = NpzDataset(src, skip_counter=counter, dense=False)
    elif not os.path.exists(src):
        raise FileNotFoundError(f"make-shards: source {src!r} does not exist")
    else:
        raise ValueError(f"make-shards: source {src!r} is neither an image folder, an .npz file nor a dataset spec")
    if not isinstance(ds, MapImageDataset):
        raise ValueError(f"make-shards: source {src!r} must be a map-style dataset (not already shards)")
    return ds


def _encoded(ds: MapImageDataset, index: int, verify: bool) -> tuple[str, bytes]:
    """(extension, bytes) for item ``index``; raises a ``DECODE_ERRORS`` member when unreadable."""
    if isinstance(ds, FileImageDataset):
        data = ds.read_encoded(index)
        img = open_lazy(data)
        if verify:
            img.load()
        if img.format == "JPEG":
            return "jpg", data
        if img.format == "PNG":
            return "png", data
        rgb = to_rgb(img)
    else:
        rgb, _, _ = ds.load(index)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return "png", buf.getvalue()


def brace_pattern(dst: str | Path, num_shards: int) -> str:
    """``wds:`` spec covering shards 0..num_shards-1 written by :func:`make_shards`."""
    name = SHARD_NAME.replace("%06d", f"{{{0:06d}..{num_shards - 1:06d}}}")
    return "wds:" + os.path.join(os.path.abspath(str(dst)), name)


def make_shards(
    src: str,
    dst: str | Path,
    shard_size: int = 1000,
    *,
    split: str | None = None,
    shuffle: bool = True,
    seed: int = 0,
    verify: bool = False,
    overwrite: bool = False,
    max_skip_fraction: float = 0.01,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Write ``dst/shard-000000.tar …`` from ``src``; return the manifest (with ``"spec"``).

    Args:
        src: image folder, ``.npz`` file or a map-style dataset spec (``digits``, ``filelist:…``).
        shard_size: samples per shard (>= 1).
        verify: fully decode JPEG/PNG sources before copying their bytes (slower; catches truncation).
        overwrite: replace existing ``shard-*.tar`` files in ``dst`` instead of refusing.
    """
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    counter = SkipCounter(max_skip_fraction)
    ds = _source_dataset(str(src), split, counter)
    dst = Path(dst).expanduser()
    dst.mkdir(parents=True, exist_ok=True)
    old = sorted(glob.glob(str(dst / "shard-*.tar")))
    if old and not overwrite:
        raise FileExistsError(f"make-shards: {dst} already holds {len(old)} shard(s); pass --overwrite to replace them")
    for path in old:
        os.remove(path)
    order = np.random.default_rng(seed).permutation(len(ds)) if shuffle else np.arange(len(ds))
    width = max(6, len(str(len(ds))))
    classes = ds.classes
    written = 0
    show = sys.stderr.isatty() if progress is None else progress
    with wds.ShardWriter(str(dst / SHARD_NAME), maxcount=shard_size, verbose=0, mtime=0.0) as sink:
        for index in tqdm(order.tolist(), desc="make-shards", unit="img", disable=not show):
            name = ds._name(index)
            try:
                ext, data = _encoded(ds, index, verify)
            except DECODE_ERRORS as err:
                counter.skip(name, err)
                continue
            counter.ok()
            label = int(ds.targets[index])
            meta = {"source": name, "label": label, "class": classes[label] if classes and label >= 0 else None}
            sink.write({"__key__": f"{index:0{width}d}", ext: data, "cls": str(label), "json": json.dumps(meta)})
            written += 1
    if written == 0:
        raise ValueError(f"make-shards: no readable image in {src!r}")
    num_shards = len(glob.glob(str(dst / "shard-*.tar")))
    manifest = {
        "spec": brace_pattern(dst, num_shards),
        "num_samples": written,
        "num_shards": num_shards,
        "shard_size": shard_size,
        "classes": classes,
        "source": str(src),
        "skipped": counter.skipped,
    }
    (dst / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return manifest
