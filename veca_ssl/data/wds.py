"""``wds:/path/shard-{000000..000127}.tar`` — WebDataset shards, streamed by position.

Two ways to read a shard set:

**Training stream** (``endless=True``): endless, split by node and by DataLoader worker, seeded, and
resumable at any sample without decoding — or even opening — what came before.

- The *visit sequence* Σ lists shards forever: block ``b`` of ``len(shards)`` entries is the
  permutation of all shards seeded by ``(seed, b)`` — one epoch — or, with ``resampled=True``, as
  many independent uniform draws (DINOv3/WebDataset-style resampled shards: no epochs at all).
- A *reader* is one DataLoader worker of one rank; there are ``R = world_size × workers`` readers and
  reader ``i`` takes the visits ``Σ[i], Σ[i + R], Σ[i + 2R], …``. Readers therefore advance through
  Σ in lock-step (one shard each), each epoch block is shared out without overlap, and any number of
  shards feeds any number of readers.
- A reader's samples are the samples of its visits one after the other; positions are shuffled
  inside windows of ``shuffle_buffer`` consecutive positions by a permutation seeded by
  ``(seed, reader, window)``. Unlike a rolling shuffle buffer (whose state depends on everything
  read before), a window's order is a function of positions only, so a resume can start inside
  any window. This is where we deviate from ``webdataset``'s ``.shuffle`` on purpose.
- Resume: the loop's convention is that ``start`` = samples consumed globally (step × global batch).
  Per rank that is ``start / world_size``; a DataLoader takes batch ``j`` from worker ``j mod K`` and
  starts at worker 0, so each reader's own count follows, and worker ``w`` of a resumed loader plays
  reader stream ``(w + batches) mod K``. Whole visits are skipped by their counts from the manifest;
  inside the current window only the samples still to come are read (by seek), none is decoded.
- An unusable sample (corrupt image, bad label, sample lost from a truncated shard) is counted once,
  at its own position, and replaced by the next usable one of the same window (in window order), so
  every position yields exactly one sample and positions stay exact whatever the data holds.
- Changing the world size, the number of workers, the per-rank batch or the window on resume starts
  a new *segment*: its readers continue at the first visit of Σ that no old reader had started.
  Nothing is read twice (no sample repeats within an epoch); the unread rest of the interrupted visits
  is skipped, and a message says so. The segment list is part of the checkpoint (:meth:`WdsDataset.state`).

**One pass** (``endless=False``; evaluation, extraction, ``inspect``): samples in stored order, each
rank and worker reading one contiguous range of global sample indices (shard offset + position), so
every row carries its own index. Unusable samples are reported (``iter_indexed``) or counted and left
out (plain iteration) — never replaced.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, NamedTuple, TypeVar

import numpy as np
import torch
from torch.utils.data import IterableDataset

from .decode import DEFAULT_MAX_PIXELS, Decoder
from .errors import DataError, SkipCounter, UnreadableItem
from .sampler import derive_seed
from .shardset import MANIFEST_NAME, ShardSet, expand_shards
from .tario import RawSample, lost_sample, read_sample

__all__ = ["MANIFEST_NAME", "Segment", "Skipped", "WdsDataset", "dist_info", "expand_shards"]

logger = logging.getLogger("veca_ssl.data")
T = TypeVar("T")


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


class Skipped(NamedTuple):
    """A one-pass position whose sample is unusable: its global index and the skip record."""

    index: int
    record: dict[str, str]


@dataclass(frozen=True)
class Segment:
    """A stretch of the training stream read with one layout (see the module docstring)."""

    start_sample: int  # global samples consumed before the segment began
    first_visit: int  # index into the visit sequence where its readers start
    world_size: int
    workers: int  # DataLoader workers per rank (a loader without workers counts as 1)
    batch_size: int  # per-rank batch size
    window: int  # shuffle window (1 = stored order)

    @property
    def readers(self) -> int:
        return self.world_size * self.workers

    def layout(self) -> tuple[int, int, int, int]:
        return self.world_size, self.workers, self.batch_size, self.window

    def describe(self) -> str:
        return (f"{self.world_size} rank(s) x {self.workers} worker(s), batch {self.batch_size} per rank, "
                f"shuffle window {self.window}")


class _ReaderMap:
    """Positions of one reader's stream → (visit number, sample offset in that visit's shard)."""

    def __init__(self, ds: WdsDataset, seg: Segment, reader: int) -> None:
        self.ds, self.seg, self.reader = ds, seg, reader
        self.starts = [0]  # stream index where visit k starts
        self.shards: list[int] = []
        self._empty_run = 0

    def _extend(self) -> None:
        t = self.seg.first_visit + self.reader + len(self.shards) * self.seg.readers
        s = self.ds.visit_shard(t)
        n = self.ds.shards.count(s)
        self._empty_run = self._empty_run + 1 if n == 0 else 0
        if self._empty_run > 2 * len(self.ds.shards) + 2:
            raise DataError(f"wds: the shards hold no sample (e.g. {self.ds.shards.urls[s]})")
        self.shards.append(s)
        self.starts.append(self.starts[-1] + n)

    def locate(self, q: int) -> tuple[int, int]:
        """``(visit, offset)`` of stream index ``q``."""
        while self.starts[-1] <= q:
            self._extend()
        k = bisect.bisect_right(self.starts, q) - 1
        return k, q - self.starts[k]


#: Positions after its window a substitute may come from when a whole window is unusable.
_SUBSTITUTE_REACH = 10_000


def _rotation(order: np.ndarray, j: int, lo: int) -> Iterator[int]:
    """Stream indices of window position ``j``, then of its substitutes: ``j+1, j+2, …`` of the window
    (wrapping), then — when the whole window is unusable (a truncated shard) — the stream after it."""
    n = len(order)
    for c in range(n):
        yield lo + int(order[(j + c) % n])
    yield from range(lo + n, lo + n + _SUBSTITUTE_REACH)


class _Files:
    """One open shard file at a time (readers go through shards one after the other)."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.f: BinaryIO | None = None

    def get(self, path: str) -> BinaryIO:
        if self.path != path:
            self.close()
            self.f, self.path = open(path, "rb"), path  # noqa: SIM115 - kept open across calls
        assert self.f is not None
        return self.f

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        self.f, self.path = None, None


class WdsDataset(IterableDataset):
    """WebDataset shards read by position; see the module docstring for the two modes.

    Args:
        urls: brace pattern or list of local shard paths.
        transform: applied to each decoded PIL image (one-pass iteration).
        endless: the training stream (else one pass in stored order).
        shuffle_buffer: shuffle window of the training stream (0/1 = stored order).
        resampled: visit shards by independent uniform draws instead of per-epoch permutations.
        shard_shuffle: permute shards per epoch (training stream without ``resampled``).
        seed: base seed of visits, windows and per-sample augmentation seeds.
        rank / world_size: this process's place; ``None`` → torch.distributed's (at construction) or a
            single process.
        start: samples consumed globally before this run (resume position).
        batch_size: per-rank DataLoader batch size (needed to resume with several workers).
        workers: DataLoader workers per rank the stream is laid out for (``None``: whatever the
            DataLoader has; :meth:`resume` fixes it).
        skip_counter, max_skip_fraction: counting of unusable samples in this process.
        max_pixels: images declaring more pixels are skipped before decoding.
    """

    def __init__(
        self,
        urls: str | list[str],
        transform: Callable[[Any], Any] | None = None,
        *,
        endless: bool = False,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        shard_shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        start: int = 0,
        batch_size: int | None = None,
        workers: int | None = None,
        skip_counter: SkipCounter | None = None,
        max_skip_fraction: float = 0.01,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__()
        if shuffle_buffer < 0 or start < 0 or seed < 0:
            raise ValueError(f"shuffle_buffer, start and seed must be >= 0, got {shuffle_buffer}, {start}, {seed}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.shards = ShardSet(expand_shards(urls) if isinstance(urls, str) else list(urls))
        self.urls = self.shards.urls
        self.classes = self.shards.classes
        self.transform = transform
        self.endless, self.resampled, self.shard_shuffle = bool(endless), bool(resampled), bool(shard_shuffle)
        self.window = max(1, int(shuffle_buffer))
        self.seed = int(seed)
        # resolved now, in the process that builds the dataset: DataLoader worker processes must not
        # depend on seeing torch.distributed's state
        self.rank, self.world_size = dist_info(rank, world_size)
        self.start, self.batch_size, self.workers = int(start), batch_size, workers
        # records and logs; thresholds are judged on counts summed over workers and ranks (see errors.py)
        self.skip_counter = skip_counter if skip_counter is not None else SkipCounter(max_skip_fraction, enforce=False)
        self.decoder = Decoder(max_pixels)
        self.segments: list[Segment] | None = None  # set by resume(); else one segment from the arguments
        self.range: tuple[int, int] | None = None  # one-pass: global indices [lo, hi) (see subset)
        self._block: tuple[int, np.ndarray] | None = None

    # -- sizes and the visit sequence ----------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Samples in the shard set (manifest counts; shards without one are counted from headers)."""
        return int(sum(self.shards.counts()))

    def visit_shard(self, t: int) -> int:
        """Shard index of visit ``t`` of the visit sequence Σ (identical on every rank and worker)."""
        n = len(self.shards)
        block, offset = divmod(int(t), n)
        if self._block is None or self._block[0] != block:
            if self.resampled:
                order = np.random.default_rng([self.seed, 1, block]).integers(0, n, n)
            elif self.shard_shuffle:
                order = np.random.default_rng([self.seed, block]).permutation(n)
            else:
                order = np.arange(n)
            self._block = (block, order)
        return int(self._block[1][offset])

    # -- resume --------------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What must not change for stream positions to keep their meaning."""
        return {"num_shards": len(self.shards), "seed": self.seed, "resampled": self.resampled,
                "shard_shuffle": self.shard_shuffle}

    def state(self) -> dict[str, Any]:
        """Plain data for the checkpoint: the fingerprint and the segment list."""
        segments = self.segments if self.segments is not None else []
        return {"version": 1, **self.fingerprint(), "segments": [asdict(s) for s in segments]}

    def resume(self, state: Mapping[str, Any] | None, start: int, rank: int, world_size: int, workers: int,
               batch_size: int) -> str | None:
        """Lay the stream out for this run (this process being ``rank``) at global sample ``start``; return
        a note for the user if the layout differs from the checkpoint's (``state``: a previous
        :meth:`state`, or ``None``). DataLoader workers get the rank from here, not from torch.distributed."""
        layout = Segment(start, 0, int(world_size), max(1, int(workers)), int(batch_size), self.window)
        self.start, self.rank, self.world_size = int(start), int(rank), layout.world_size
        self.workers, self.batch_size = layout.workers, layout.batch_size
        old = [Segment(**s) for s in (state or {}).get("segments", [])]
        if not old:
            self.segments = [Segment(0, 0, *layout.layout())]
            if start:
                return ("data: the checkpoint holds no stream layout; assuming it was written with this one "
                        f"({layout.describe()})")
            return None
        changed = {k: (state or {}).get(k) for k, v in self.fingerprint().items() if (state or {}).get(k) != v}
        if changed:
            self.segments = [Segment(start, 0, *layout.layout())]
            return (f"data: the shard set or stream settings differ from the checkpoint's ({changed} vs "
                    f"{self.fingerprint()}); the shard stream starts over at sample {start}")
        last = old[-1]
        if start < last.start_sample:
            raise DataError(f"data: resume position {start} lies before the stream segment starting at "
                            f"{last.start_sample}; the checkpoint's data state is inconsistent")
        if last.layout() == layout.layout():
            self.segments = old
            return None
        first = self._next_unstarted_visit(last, start)
        new = Segment(start, first, *layout.layout())
        self.segments = old[:-1] + [new] if start == last.start_sample else old + [new]
        epoch = "" if self.resampled else f" (epoch {first // len(self.shards)})"
        return (f"data: resuming with {layout.describe()}; the checkpoint was written with {last.describe()}. "
                f"The shard stream continues at shard visit {first}{epoch}: visits that were started are "
                "not read again (no sample repeats within an epoch) and their unread samples are skipped")

    def _reader_starts(self, seg: Segment, start: int, rank: int) -> list[int]:
        """Samples each of rank ``rank``'s reader streams has produced at global sample ``start``."""
        consumed = start - seg.start_sample
        if consumed % seg.world_size:
            raise DataError(f"data: {consumed} samples cannot be shared by {seg.world_size} ranks "
                            "(the resume position must be step x global batch)")
        per_rank = consumed // seg.world_size
        if seg.workers == 1:
            return [per_rank]
        if per_rank % seg.batch_size:
            raise DataError(f"data: {per_rank} samples per rank is not a whole number of batches of "
                            f"{seg.batch_size}")
        batches = per_rank // seg.batch_size
        return [(batches // seg.workers + (1 if s < batches % seg.workers else 0)) * seg.batch_size
                for s in range(seg.workers)]

    def _next_unstarted_visit(self, seg: Segment, start: int) -> int:
        """First visit index that no reader of ``seg`` had started by global sample ``start``."""
        first = seg.first_visit
        for rank in range(seg.world_size):
            for s, n in enumerate(self._reader_starts(seg, start, rank)):
                if n == 0:
                    continue
                reader = rank * seg.workers + s
                touched = ((n - 1) // seg.window + 1) * seg.window - 1  # last index of the open window
                k, _ = _ReaderMap(self, seg, reader).locate(touched)
                first = max(first, seg.first_visit + reader + k * seg.readers + 1)
        return first

    # -- the training stream -------------------------------------------------------------------------
    def _current_segment(self, world: int, workers: int) -> Segment:
        if self.segments is None:
            batch = self.batch_size if self.batch_size is not None else 1
            if workers > 1 and self.start and self.batch_size is None:
                raise ValueError("resuming a multi-worker WebDataset stream needs batch_size (the DataLoader's)")
            return Segment(0, 0, world, workers, batch, self.window)
        seg = self.segments[-1]
        if (seg.world_size, seg.workers) != (world, workers):
            raise DataError(f"data: the stream was laid out for {seg.describe()} but runs with {world} rank(s) "
                            f"x {workers} worker(s)")
        return seg

    def _window_order(self, seg: Segment, reader: int, w: int) -> np.ndarray:
        if seg.window == 1:
            return np.zeros(1, dtype=np.int64)
        return np.random.default_rng([self.seed, 7, seg.first_visit, reader, w]).permutation(seg.window)

    def _load_window(self, rmap: _ReaderMap, lo: int, wanted: list[int], files: _Files,
                     into: dict[int, RawSample]) -> None:
        """Read the raw samples at stream indices ``wanted`` (sorted: file order) into ``into``."""
        for q in wanted:
            k, o = rmap.locate(q)
            s = rmap.shards[k]
            idx = self.shards.index(s)
            if o < len(idx):
                into[q] = read_sample(files.get(idx.path), idx, o)
            else:
                into[q] = lost_sample(idx.path, o, self.shards.count(s), idx.problem)

    def iter_train(self, make: Callable[[RawSample, int], T]) -> Iterator[tuple[T, list[dict[str, str]]]]:
        """This reader's training samples: ``(make(raw, sample_seed), skip records)`` per position.

        ``make`` decodes and transforms one raw sample (raising :class:`UnreadableItem` when it cannot);
        an unusable sample is replaced by the next one of its window and recorded.
        """
        if not self.endless:
            raise ValueError("iter_train needs endless=True (the training stream)")
        rank, world = dist_info(self.rank, self.world_size)
        worker, workers = _worker_info()
        seg = self._current_segment(world, workers)
        batches = 0
        if seg.workers > 1:
            per_rank = (self.start - seg.start_sample) // seg.world_size
            batches = per_rank // seg.batch_size if seg.batch_size else 0
        stream = (worker + batches) % seg.workers
        reader = rank * seg.workers + stream
        position = self._reader_starts(seg, self.start, rank)[stream]
        rmap, files, L = _ReaderMap(self, seg, reader), _Files(), seg.window
        try:
            w, j0 = divmod(position, L)
            while True:
                lo, order = w * L, self._window_order(seg, reader, w)
                raw: dict[int, RawSample] = {}
                self._load_window(rmap, lo, sorted(lo + int(order[j]) for j in range(j0, L)), files, raw)
                for j in range(j0, L):
                    seed = derive_seed(self.seed, seg.first_visit, reader, lo + j)
                    yield self._usable(make, seed, _rotation(order, j, lo), rmap, lo, files, raw)
                w, j0 = w + 1, 0
        finally:
            files.close()

    def _usable(self, make: Callable[[RawSample, int], T], seed: int, candidates: Iterator[int], rmap: _ReaderMap,
                lo: int, files: _Files, raw: dict[int, RawSample]) -> tuple[T, list[dict[str, str]]]:
        """The sample of one position: its own (the first candidate) or the first usable substitute.

        Only the position's own sample is recorded when unusable: every substitute is some position's own
        sample in this window or a later one of this reader, and is counted there, so each unusable
        sample counts once per visit however many positions try it."""
        skipped: list[dict[str, str]] = []
        first: UnreadableItem | None = None
        tried = 0
        for q in candidates:
            if q not in raw:  # a substitute from the part of the window read before a resume
                self._load_window(rmap, lo, [q], files, raw)
            sample = raw[q]
            try:
                if sample.problem is not None:
                    raise sample.problem
                item = make(sample, seed)
            except UnreadableItem as err:
                if not tried:
                    self.skip_counter.skip(err)
                    skipped.append(err.record())
                first, tried = first or err, tried + 1
                continue
            self.skip_counter.ok()
            return item, skipped
        assert first is not None
        raise DataError(f"wds: {tried} consecutive samples are unusable (e.g. {first.item}: {first.reason}); check "
                        f"the shards")

    # -- one pass ------------------------------------------------------------------------------------
    def subset(self, start: int, stop: int) -> WdsDataset:
        """A one-pass view of global sample indices ``[start, stop)`` (shares the shard index)."""
        view = object.__new__(WdsDataset)
        view.__dict__.update(self.__dict__)
        view.endless, view.range = False, (int(start), int(stop))
        return view

    def __len__(self) -> int:
        """Samples of one pass over all ranks (the training stream: one epoch's worth). Per rank and
        worker, streams yield their share; nothing here relies on ``len`` per reader."""
        lo, hi = self.range if self.range is not None and not self.endless else (0, self.num_samples)
        return max(0, hi - lo)

    def _my_range(self) -> tuple[list[int], int, int]:
        counts = self.shards.counts()
        prefix = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
        lo, hi = self.range if self.range is not None else (0, prefix[-1])
        lo, hi = max(0, lo), min(hi, prefix[-1])
        rank, world = dist_info(self.rank, self.world_size)
        worker, workers = _worker_info()
        readers, me = world * workers, rank * workers + worker
        bounds = np.linspace(lo, max(lo, hi), readers + 1).round().astype(int)
        return prefix, int(bounds[me]), int(bounds[me + 1])

    def iter_indexed(self) -> Iterator[tuple[Any, int, int] | Skipped]:
        """One pass over this reader's range: ``(image, label, index)`` or :class:`Skipped` per sample."""
        prefix, lo, hi = self._my_range()
        files = _Files()
        try:
            s = max(0, bisect.bisect_right(prefix, lo) - 1)
            index = lo
            while index < hi:
                while prefix[s + 1] <= index:
                    s += 1
                idx, o = self.shards.index(s), index - prefix[s]
                if o < len(idx):
                    raw = read_sample(files.get(idx.path), idx, o)
                else:
                    raw = lost_sample(idx.path, o, self.shards.count(s), idx.problem)
                try:
                    if raw.problem is not None:
                        raise raw.problem
                    img = self.decoder.decode(raw.data, raw.name)
                except UnreadableItem as err:
                    self.skip_counter.skip(err)
                    yield Skipped(index, err.record())
                else:
                    self.skip_counter.ok()
                    yield (self.transform(img) if self.transform is not None else img), raw.label, index
                index += 1
        finally:
            files.close()

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        """One pass: ``(image, label)`` of the usable samples (skips are counted in ``skip_counter``)."""
        if self.endless:
            raise TypeError("iterate the training stream through SSLIterableDataset (iter_train)")
        for item in self.iter_indexed():
            if not isinstance(item, Skipped):
                yield item[0], item[1]

    def __repr__(self) -> str:
        return (f"WdsDataset(shards={len(self.shards)}, endless={self.endless}, window={self.window}, "
                f"resampled={self.resampled}, seed={self.seed}, start={self.start})")
