"""Training data for the loop: the dataset, the loader, the resume position and global skip accounting.

The loop uses four things from here::

    dataset = build_train_dataset(cfg)
    data = TrainData(cfg, dataset, patch_size, info, start_sample, state=checkpoint.get("data"))
    batch = next(data)                          # batches exactly as an uninterrupted run would see them
    record.update(data.log_record(counts))      # at log time, on every rank (counts: summed over ranks)
    checkpoint["data"] = data.state(); summary["data"] = data.summary()

Map-style data is addressed by global sample position (``InfiniteSampler``): resuming at
``start_sample`` is exact with any number of ranks or workers. Streaming shards (``wds:``) are
resumed by ``WdsDataset.resume`` from the stream layout stored in the checkpoint (exact for the same
world size, workers and batch; a changed layout continues without repeating a sample within an epoch,
and a message says what happened).

Skips are counted where they can be seen whole: every batch carries what it cost (attempts and the
unusable items replaced to make it) from the DataLoader workers to this process, and ranks sum their
counts at log time; ``data.max_skip_fraction`` is judged on that sum, on every rank alike, so all
ranks stop together with the same message.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from omegaconf import DictConfig

from veca_ssl import distributed as dist
from veca_ssl import signals
from veca_ssl.config import ConfigError
from veca_ssl.data.errors import SkipCounter
from veca_ssl.train.multires import MultiResSchedule

log = logging.getLogger("veca_ssl.train")

#: Loaders not closed yet: closed at interpreter exit at the latest (``TrainData.close``). This module
#: is imported after torch, so the handler runs before torch's and multiprocessing's exit handlers.
_OPEN: weakref.WeakSet[TrainData] = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    for data in list(_OPEN):
        data.close()


def build_train_dataset(cfg: DictConfig) -> Any:
    """The dataset of ``cfg.data.train`` (``data.split`` where the spec has splits; a spec naming one
    set of files is used whole). Bad specs and paths raise :class:`ConfigError` naming ``data.train``."""
    from veca_ssl.data import build_dataset, parse_spec

    d = cfg.data
    options: dict[str, Any] = {}
    try:
        if parse_spec(str(d.train))[0] == "wds":  # the endless, resumable training stream
            options = {"endless": True, "shuffle_buffer": d.shuffle_buffer, "resampled": d.resampled, "seed": cfg.seed}
        return build_dataset(str(d.train), split=d.split, split_if_present=True, max_pixels=d.max_pixels,
                             max_skip_fraction=d.max_skip_fraction, allow_empty_classes=d.allow_empty_classes,
                             **options)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"data.train={d.train}: {exc}") from None


def build_train_loader(cfg: DictConfig, dataset, patch_size: int, info: dist.DistInfo, start_sample: int,
                       multires: MultiResSchedule | None = None, start_step: int = 0):
    """Multi-crop + masks per sample, seeded by the sample's global position (map-style data: exact
    resume and world-size independent crops), or streamed from WebDataset shards (``dataset`` laid out
    for this run by ``WdsDataset.resume``). With ``multires`` (a ``MultiResSchedule``) each step's global
    crop side and batch size follow the schedule from ``start_step`` on (``start_sample`` is then
    unused: the schedule knows it)."""
    from veca_ssl.data import (
        InfiniteSampler,
        MaskingGenerator,
        MultiCropTransform,
        SSLDataset,
        SSLIterableDataset,
    )

    c, a = cfg.crops, cfg.augment
    mask_kw = dict(mask_probability=cfg.ibot.mask_probability, mask_ratio=tuple(cfg.ibot.mask_ratio))

    def transform_and_masks(global_size: int) -> tuple[MultiCropTransform, MaskingGenerator]:
        transform = MultiCropTransform(
            global_size=global_size, local_size=c.local_size, num_local_crops=c.num_local,
            global_scale=tuple(c.global_scale), local_scale=tuple(c.local_scale),
            color_jitter=tuple(a.color_jitter), jitter_p=a.jitter_p, grayscale_p=a.grayscale_p, flip_p=a.flip_p,
            global_blur_p=tuple(a.global_blur_p), local_blur_p=a.local_blur_p, solarize_p=a.solarize_p,
            jitter_mode=a.jitter_mode)
        grid = global_size // patch_size
        return transform, MaskingGenerator(grid=(grid, grid), min_ratio=cfg.ibot.mask_ratio[0],
                                           max_ratio=cfg.ibot.mask_ratio[1])

    nw = cfg.data.num_workers
    # a private generator: creating the loader must not consume the global RNG (exact resume)
    loader_kw = dict(num_workers=nw, pin_memory=info.device.type == "cuda", persistent_workers=nw > 0,
                     prefetch_factor=4 if nw > 0 else None, generator=torch.Generator().manual_seed(cfg.seed),
                     worker_init_fn=signals.ignore_in_worker)  # stop signals: the main process decides
    if multires is not None:  # one SSL dataset per global crop side; the batch sampler picks per step
        from veca_ssl.data.multires import MultiResBatchSampler, MultiResSSLDataset

        ssl_data = MultiResSSLDataset({size: SSLDataset(dataset, *transform_and_masks(size), patch_size,
                                                        seed=cfg.seed, **mask_kw) for size in multires.sizes})
        batches = MultiResBatchSampler(len(dataset), multires, seed=cfg.seed, rank=info.rank,
                                       world_size=info.world_size, start_step=start_step)
        return torch.utils.data.DataLoader(ssl_data, batch_sampler=batches, collate_fn=ssl_data.collate_fn,
                                           **loader_kw)
    loader_kw.update(batch_size=cfg.optim.batch_size_per_gpu, drop_last=True)
    transform, mask_gen = transform_and_masks(c.global_size)
    if isinstance(dataset, torch.utils.data.IterableDataset):  # streaming shards (split by node/worker)
        ssl_data = SSLIterableDataset(dataset, transform, mask_gen, patch_size, **mask_kw)
        return torch.utils.data.DataLoader(ssl_data, collate_fn=ssl_data.collate_fn, **loader_kw)
    ssl_data = SSLDataset(dataset, transform, mask_gen, patch_size, seed=cfg.seed, **mask_kw)
    sampler = InfiniteSampler(len(dataset), seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                              shuffle=True, start=start_sample)
    return torch.utils.data.DataLoader(ssl_data, sampler=sampler, collate_fn=ssl_data.collate_fn, **loader_kw)


class TrainData:
    """Batches of one training process plus the data bookkeeping: resume layout and skip counts.

    Args:
        cfg: the run's config (``data.*``, ``optim.batch_size_per_gpu``, crops, …).
        dataset: from :func:`build_train_dataset`.
        patch_size: the backbone's patch size (mask grid).
        info: this process's place in the job.
        start_sample: global samples consumed before this run (``schedule.samples_before(step)``).
        multires / start_step: see :func:`build_train_loader`.
        state: the checkpoint's ``"data"`` entry (:meth:`state` of the run that wrote it), if any.
    """

    def __init__(self, cfg: DictConfig, dataset: Any, patch_size: int, info: dist.DistInfo, start_sample: int,
                 multires: MultiResSchedule | None = None, start_step: int = 0,
                 state: dict[str, Any] | None = None) -> None:
        self.info, self.dataset = info, dataset
        self.max_skip_fraction = float(cfg.data.max_skip_fraction)
        self.streaming = isinstance(dataset, torch.utils.data.IterableDataset)
        self._base: dict[str, Any] = dict((state or {}).get("skips") or {})  # global counts before this run
        single = info.world_size == 1
        # one process: the local count is the global count and is judged on every batch;
        # several ranks: judged on the all-reduced count at log time (all ranks stop together)
        self.local = SkipCounter(self.max_skip_fraction, enforce=single, log=False)  # datasets log their skips
        if single and self._base:
            self.local.load_state(self._base)
        self.totals = self.local if single else self._global([0, 0], [])
        self._reported: set[str] = {r["item"] for r in self._base.get("first", [])}
        self.note: str | None = None
        if self.streaming:
            self.note = dataset.resume((state or {}).get("stream"), start_sample, info.rank, info.world_size,
                                       cfg.data.num_workers, cfg.optim.batch_size_per_gpu)
            if self.note and info.is_main:
                print(self.note, flush=True)
            if self.note:
                log.warning(self.note)
        self.loader = build_train_loader(cfg, dataset, patch_size, info, start_sample, multires=multires,
                                         start_step=start_step)
        self._batches: Iterator[dict[str, Any]] | None = None
        _OPEN.add(self)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        """The next batch; what it cost (attempts, replaced unusable items) is counted here."""
        if self._batches is None:
            with signals.stop_signals_blocked():  # workers start with stop signals blocked, then ignore them
                self._batches = iter(self.loader)
        batch = next(self._batches)
        self.local.add(batch.pop("data_seen", 0), batch.pop("data_skips", ()))
        return batch

    def close(self) -> None:
        """Shut the loader's worker processes down now (idempotent; the next batch would start new ones).

        Called when a run ends, by error too: the workers ignore stop signals (``ignore_in_worker``),
        so a loader left to the interpreter's exit would have ``multiprocessing`` SIGTERM and then wait
        for them forever. A worker that does not leave within the loader's own grace time is killed."""
        batches, self._batches = self._batches, None
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is None:  # no iterator yet, or no worker processes
            return
        try:
            shutdown()
        finally:
            for worker in getattr(batches, "_workers", []):
                if worker.is_alive():
                    worker.kill()
                    worker.join(timeout=5)

    def _global(self, counts: list[int], records: list[dict[str, str]]) -> SkipCounter:
        total = SkipCounter(self.max_skip_fraction, log=False)
        total.load_state(self._base)
        total.enforce = False
        total.add(counts[0], records, skipped=counts[1])
        total.enforce = True
        return total

    def local_counts(self) -> tuple[int, int]:
        """Samples this process has seen and skipped in this run (the training step sums them over the
        ranks together with its losses, in its one exchange)."""
        return self.local.seen, self.local.skipped

    def log_record(self, global_counts: tuple[int, int] | None = None) -> dict[str, Any]:
        """Global skip counts for the metrics record (collective: call on every rank); raises
        :class:`~veca_ssl.data.errors.DataSkipError` on every rank when the threshold is passed.

        ``global_counts``: :meth:`local_counts` summed over the ranks, when the caller has them already;
        otherwise they are all-reduced here."""
        if self.info.world_size > 1:
            if global_counts is None:
                counts = torch.tensor(self.local_counts(), dtype=torch.float64)
                global_counts = tuple(int(v) for v in dist.all_reduce_sum(counts).tolist())
            seen, skipped = (int(v) for v in global_counts)
            records: list[dict[str, str]] = []
            if skipped:  # the first unusable items of every rank (pickled: the CPU side channel)
                records = [r for part in dist.all_gather_object(self.local.first) for r in part]
            self.totals = self._global([seen, skipped], records)
        self.totals.check()
        new = [r for r in self.totals.first if r["item"] not in self._reported]
        self._reported.update(r["item"] for r in new)
        record: dict[str, Any] = {"data_seen": self.totals.seen, "data_skipped": self.totals.skipped,
                                  "data_skip_fraction": self.totals.fraction}
        if new:
            record["data_bad"] = [f"{r['item']} ({r['kind']}: {r['reason']})" for r in new]
        return record

    def state(self) -> dict[str, Any]:
        """For the checkpoint (plain data): the stream layout and the global skip counts as of the last
        :meth:`log_record` (exact with one process)."""
        out: dict[str, Any] = {"skips": self.totals.state()}
        if self.streaming:
            out["stream"] = self.dataset.state()
        return out

    def summary(self) -> dict[str, Any]:
        """For ``summary.json``: skip counts, the first unusable items, the resume note if any."""
        out = dict(self.totals.state())
        if self.note:
            out["resume_note"] = self.note
        return out
