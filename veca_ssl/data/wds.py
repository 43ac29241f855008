"""``wds:/path/shard-{000000..000127}.tar`` — streaming WebDataset shards, split by node and worker.

Built on the ``webdataset`` package (``wds.WebDataset`` with explicit node/worker splitters and a
seeded ``.shuffle`` buffer). Each epoch the shard list is permuted with a seed derived from
``(seed, epoch)`` — the same permutation on every rank — and then dealt out: rank r of W takes shards
``r, r+W, …`` of it and DataLoader worker w of K takes every K-th of those, so within an epoch no two
readers share a shard and together they cover every shard. Samples are then shuffled in a buffer seeded
by ``(seed, epoch, rank, worker)``, which makes every reader's stream deterministic.

Training uses ``endless=True`` (epochs follow one another forever, so ranks never run dry at
different times). The resume position ``start`` is the number of samples consumed *globally* (as for
:class:`~veca_ssl.data.sampler.InfiniteSampler`); each reader skips its share of them without decoding.
The share is exact when the DataLoader uses ``batch_size`` (with any number of workers, which it serves
round-robin; see :meth:`WdsDataset.reader_slot`); unreadable members inside the skipped part shift the
position by their number.

Samples are ``(PIL RGB image, label)`` (label −1 without a ``cls`` member). Members that cannot be
read (bad tar entries, undecodable images) are skipped and counted by the shared ``SkipCounter``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count, islice
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.shardlists import expand_urls

from .decode import IMAGE_EXTENSIONS, try_decode
from .errors import SkipCounter
from .sampler import derive_seed

MANIFEST_NAME = "manifest.json"
logger = logging.getLogger("veca_ssl.data")


@dataclass
class RawSample:
    """One undecoded shard sample: encoded image bytes, label and its augmentation seed."""

    key: str
    data: bytes | None
    label: int
    seed: int
    name: str  # "<shard>:<key>" for logs


def _take_every(src: Iterator[Any], first: int, step: int) -> Iterator[Any]:
    """Node/worker splitter: items ``first, first+step, …`` of the shard stream."""
    return islice(src, first, None, step)


class _Split:
    """Picklable splitter bound to (first, step) — DataLoader workers may pickle the dataset."""

    def __init__(self, first: int, step: int) -> None:
        self.first, self.step = first, step

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        return _take_every(src, self.first, self.step)


def dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size: the given values, else torch.distributed's when initialised, else (0, 1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
    rank, world_size = int(rank or 0), int(world_size or 1)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def _worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def expand_shards(pattern: str) -> list[str]:
    """Expand a brace pattern (``shard-{000000..000009}.tar``) and check that local shards exist."""
    urls = list(expand_urls(pattern))
    if not urls:
        raise ValueError(f"wds pattern {pattern!r} names no shard")
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(
            f"wds: {len(missing)} of {len(urls)} shards do not exist, first {missing[0]!r} "
            f"(pattern {pattern!r}; `veca data make-shards` prints the pattern to use)"
        )
    return urls


class WdsDataset(IterableDataset):
    """Streaming WebDataset of ``(image, label)``; see the module docstring for splitting and resume.

    Args:
        urls: brace pattern or list of shard paths/URLs.
        transform: applied to each decoded PIL image.
        shuffle_buffer: sample shuffle buffer per reader (0/1 = keep shard order).
        shard_shuffle: permute the shard list each epoch.
        endless: loop over epochs forever (training); otherwise one epoch (set with ``set_epoch``).
        seed: base seed of shard permutations, shuffle buffers and per-sample seeds.
        rank / world_size: this process's place; ``None`` → torch.distributed or single process.
        start: samples consumed globally before this run (resume position; multiple of world_size).
        batch_size: per-rank DataLoader batch size, needed for an exact ``start`` with several workers.
    """

    def __init__(
        self,
        urls: str | list[str],
        transform: Callable[[Any], Any] | None = None,
        *,
        shuffle_buffer: int = 1000,
        shard_shuffle: bool = True,
        endless: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        start: int = 0,
        batch_size: int | None = None,
        epoch: int = 0,
        skip_counter: SkipCounter | None = None,
        max_skip_fraction: float = 0.01,
    ) -> None:
        super().__init__()
        self.urls = expand_shards(urls) if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("wds: empty shard list")
        if shuffle_buffer < 0 or start < 0 or seed < 0:
            raise ValueError(f"shuffle_buffer, start and seed must be >= 0, got {shuffle_buffer}, {start}, {seed}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.transform = transform
        self.shuffle_buffer, self.shard_shuffle, self.endless = int(shuffle_buffer), bool(shard_shuffle), bool(endless)
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.start, self.batch_size, self.epoch = int(start), batch_size, int(epoch)
        self.skip_counter = skip_counter if skip_counter is not None else SkipCounter(max_skip_fraction)
        self.classes: list[str] | None = None
        self.num_samples: int | None = None
        manifest = os.path.join(os.path.dirname(self.urls[0]), MANIFEST_NAME)
        if os.path.isfile(manifest):  # written by `veca data make-shards`
            with open(manifest, encoding="utf-8") as f:
                meta = json.load(f)
            self.classes = meta.get("classes")
            if len(self.urls) == meta.get("num_shards"):
                self.num_samples = meta.get("num_samples")

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (shard permutation and shuffle seeds) of the next iteration."""
        self.epoch = int(epoch)

    def shards_for_epoch(self, epoch: int) -> list[str]:
        """The shard order of ``epoch`` before dealing out (identical on every rank)."""
        if not self.shard_shuffle:
            return list(self.urls)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
        return [self.urls[i] for i in order]

    def reader_slot(self, rank: int, world_size: int, worker: int, num_workers: int) -> tuple[int, int]:
        """``(stream, skip)``: which worker stream this reader replays and how many samples it skips.

        A DataLoader takes batch j from worker ``j % K`` and always starts at worker 0. After ``S``
        consumed batches the next batch belonged to stream ``S % K``, so a resumed worker w replays
        stream ``(w + S) % K`` — the order of batches then continues exactly.
        """
        if self.start % world_size:
            raise ValueError(f"start={self.start} must be a multiple of world_size={world_size} (step × global batch)")
        per_rank = self.start // world_size
        if num_workers == 1:
            return worker, per_rank
        if self.batch_size is None:
            if per_rank:
                raise ValueError("resuming a multi-worker WebDataset needs batch_size (the DataLoader's)")
            return worker, 0
        if per_rank % self.batch_size:
            raise ValueError(f"start per rank ({per_rank}) must be a multiple of batch_size={self.batch_size}")
        batches = per_rank // self.batch_size
        stream = (worker + batches) % num_workers
        mine = batches // num_workers + (1 if stream < batches % num_workers else 0)
        return stream, mine * self.batch_size

    def _epoch_samples(self, epoch: int, rank: int, world: int, worker: int, workers: int) -> Iterator[dict]:
        shards = self.shards_for_epoch(epoch)
        pipeline = wds.WebDataset(
            shards,
            handler=self.skip_counter.wds_handler,
            shardshuffle=False,  # the shard order was already permuted identically on every rank
            nodesplitter=_Split(rank, world),
            workersplitter=_Split(worker, workers),
            empty_check=False,
            seed=self.seed,
        )
        if self.shuffle_buffer > 1:
            pipeline = pipeline.shuffle(
                self.shuffle_buffer, initial=self.shuffle_buffer, seed=derive_seed(self.seed, epoch, rank, worker)
            )
        return iter(pipeline)

    def iter_raw(self) -> Iterator[RawSample]:
        """Undecoded samples of this reader, after resume skipping (used by SSL streaming)."""
        rank, world = dist_info(self.rank, self.world_size)
        worker, workers = _worker_info()
        readers = world * workers
        if len(self.urls) < readers and self.endless:
            raise ValueError(
                f"{len(self.urls)} shards cannot feed {world} rank(s) × {workers} worker(s) = {readers} "
                "readers; write smaller shards (`veca data make-shards --shard-size`) or use fewer workers"
            )
        if len(self.urls) < readers:
            logger.warning(
                "wds: %d shards for %d readers (%d ranks × %d workers): some readers get no data",
                len(self.urls), readers, world, workers,
            )
        worker, to_skip = self.reader_slot(rank, world, worker, workers)
        position = 0
        epochs = count(self.epoch) if self.endless else [self.epoch]
        for epoch in epochs:
            produced = 0
            for sample in self._epoch_samples(epoch, rank, world, worker, workers):
                produced += 1
                position += 1
                if position <= to_skip:
                    continue
                yield self._raw(sample, derive_seed(self.seed, rank, worker, position))
            if produced == 0 and self.endless:
                raise RuntimeError(f"wds: reader (rank {rank}, worker {worker}) got no sample in epoch {epoch}")

    def _raw(self, sample: dict, seed: int) -> RawSample:
        key = str(sample.get("__key__"))
        name = f"{sample.get('__url__')}:{key}"
        data = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
        label = -1
        if "cls" in sample:
            try:
                label = int(bytes(sample["cls"]).decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                data = None  # an unreadable label makes the sample unusable: skip it, counted
        return RawSample(key, data, label, seed, name)

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        for raw in self.iter_raw():
            img = try_decode(raw.data, raw.name, self.skip_counter)
            if img is None:
                continue
            yield (self.transform(img) if self.transform is not None else img), raw.label

    def __repr__(self) -> str:
        return (
            f"WdsDataset(shards={len(self.urls)}, endless={self.endless}, shuffle_buffer={self.shuffle_buffer}, "
            f"seed={self.seed}, start={self.start})"
        )
