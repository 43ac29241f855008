"""Parts of ``veca bench data`` that run real DataLoaders: throughput with worker processes (folder vs
shards) and the cost of resuming a WebDataset stream deep into a run.

Samples/s per core are counted from the CPU time the worker processes spend (``/proc/<pid>/stat``), so
they stay meaningful on a machine shared with other jobs, where wall-clock throughput also measures the
queue for a core. Each timed call is a fresh chunk of batches after warm-up calls (benchmark hygiene).
"""

from __future__ import annotations

import io
import json
import os
import statistics
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from veca_ssl.data import (
    InfiniteSampler,
    MaskingGenerator,
    MultiCropTransform,
    SSLDataset,
    SSLIterableDataset,
    WdsDataset,
)
from veca_ssl.timing import measure, time_round_robin

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``; ``None`` elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15 of stat)


def _worker_pids(it: Any) -> list[int]:
    return [w.pid for w in getattr(it, "_workers", [])] or [os.getpid()]


def _cpu(pids: list[int]) -> float:
    values = [process_cpu_seconds(p) for p in pids]
    return sum(v for v in values if v is not None)


def loader_throughput(name: str, make_loader: Callable[[int], DataLoader], workers: int, batches: int,
                      batch_size: int, warmup: int, repeats: int) -> dict[str, Any]:
    """One row: samples/s (wall) and samples/s per core (worker CPU time) of ``batches`` batches."""
    loader = make_loader(workers)
    it = iter(loader)
    pids = _worker_pids(it)
    cpu: list[float] = []

    def chunk() -> None:
        c0 = _cpu(pids) if workers else time.process_time()
        for _ in range(batches):
            next(it)
        cpu.append((_cpu(pids) if workers else time.process_time()) - c0)

    stats = measure(chunk, warmup=warmup, repeats=repeats)
    getattr(it, "_shutdown_workers", lambda: None)()  # before the next loader's workers start
    n = batches * batch_size
    timed = [c for c in cpu[-repeats:] if c > 0]
    per_core = [n / c for c in timed]
    return {
        "source": name, "workers": workers,
        "samples/s": n / stats.median, "wall min": n / stats.max, "wall max": n / stats.min,
        "samples/s/core": statistics.median(per_core) if per_core else float("nan"),
        "core min": min(per_core) if per_core else float("nan"),
        "core max": max(per_core) if per_core else float("nan"),
    }


def folder_loader(folder_ds: Any, transform: MultiCropTransform, masks: MaskingGenerator, patch: int,
                  batch_size: int) -> Callable[[int], DataLoader]:
    """What training builds for an image folder: position-seeded samples from an infinite sampler."""
    def make(workers: int) -> DataLoader:
        ds = SSLDataset(folder_ds, transform, masks, patch)
        return DataLoader(ds, batch_size=batch_size, sampler=InfiniteSampler(len(ds), seed=0), drop_last=True,
                          num_workers=workers, collate_fn=ds.collate_fn, prefetch_factor=2 if workers else None)
    return make


def shard_loader(spec: str, transform: MultiCropTransform, masks: MaskingGenerator, patch: int, batch_size: int,
                 start: int = 0, window: int = 1000) -> Callable[[int], DataLoader]:
    """What training builds for shards: the endless stream laid out for ``workers``, resumed at ``start``."""
    def make(workers: int) -> DataLoader:
        base = WdsDataset(spec.removeprefix("wds:"), endless=True, shuffle_buffer=window, seed=0)
        base.resume(None, start, rank=0, world_size=1, workers=workers, batch_size=batch_size)
        ds = SSLIterableDataset(base, transform, masks, patch)
        return DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=ds.collate_fn,
                          prefetch_factor=2 if workers else None)
    return make


def write_synthetic_shards(root: Path, shards: int, per_shard: int, seed: int = 0) -> str:
    """``shards`` tar files of ``per_shard`` small JPEG samples plus a manifest; returns the ``wds:`` spec."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(16):
        buf = io.BytesIO()
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((160, 120), Image.BICUBIC).save(buf, format="JPEG", quality=85)
        images.append(buf.getvalue())
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for s in range(shards):
        name = f"shard-{s:06d}.tar"
        with open(root / name, "wb") as f:
            sink = wds.TarWriter(f, mtime=0.0)
            for i in range(per_shard):
                key = s * per_shard + i
                sink.write({"__key__": f"{key:09d}", "jpg": images[key % len(images)], "cls": str(key % 10)})
            sink.close()
        entries.append({"name": name, "count": per_shard, "bytes": (root / name).stat().st_size})
    (root / "manifest.json").write_text(json.dumps({"num_samples": shards * per_shard, "num_shards": shards,
                                                    "shards": entries, "classes": None}))
    return f"wds:{root}/shard-{{000000..{shards - 1:06d}}}.tar"


def replay_seconds_per_sample(spec: str) -> float:
    """What a resume that reads through the skipped samples (without decoding) pays per sample: one
    sequential pass over every member of the shards, bytes read, nothing decoded."""
    from webdataset.shardlists import expand_urls

    t0, n = time.perf_counter(), 0
    for url in expand_urls(spec.removeprefix("wds:")):
        with tarfile.open(url, "r|") as tar:
            for member in tar:
                f = tar.extractfile(member)
                if f is not None:
                    f.read()
                    n += member.name.endswith(".jpg")
    return (time.perf_counter() - t0) / max(n, 1)


def _decoded_for_first_batch(spec: str, start: int, transform: MultiCropTransform, masks: MaskingGenerator,
                             patch: int, batch_size: int) -> int:
    """Images decoded (in this process, no workers) until the first batch is ready."""
    loader = shard_loader(spec, transform, masks, patch, batch_size, start=start)(0)
    decoder = loader.dataset.base.decoder
    calls: list[int] = []
    real = decoder.decode
    decoder.decode = lambda *a, **kw: calls.append(1) or real(*a, **kw)  # type: ignore[method-assign]
    next(iter(loader))
    return len(calls)


def resume_rows(spec: str, resume_at: int, workers: list[int], transform: MultiCropTransform,
                masks: MaskingGenerator, patch: int, batch_size: int, warmup: int, repeats: int) -> list[dict]:
    """Seconds from building the loader to the first batch, fresh vs resumed at ``resume_at``, plus the
    number of images decoded for that first batch (the skipped ones are never decoded)."""
    cases = [(start, k) for k in workers for start in (0, resume_at)]
    calls = [lambda start=start, k=k: next(iter(shard_loader(spec, transform, masks, patch, batch_size,
                                                             start=start)(k))) for start, k in cases]
    # round-robin: load from other jobs on the machine hits the fresh and the resumed loader alike
    times = time_round_robin(calls, warmup=warmup, repeats=repeats)
    rows = [{"start sample": start, "workers": k, "s to first batch": statistics.median(t), "min": min(t),
             "max": max(t)} for (start, k), t in zip(cases, times)]
    decoded = {start: _decoded_for_first_batch(spec, start, transform, masks, patch, batch_size)
               for start in (0, resume_at)}
    for row in rows:
        row["images decoded"] = decoded[row["start sample"]]
    return rows


__all__ = ["folder_loader", "loader_throughput", "process_cpu_seconds", "replay_seconds_per_sample",
           "resume_rows", "shard_loader", "write_synthetic_shards"]
