"""Multi-resolution training schedule (VECA's multi-resolution fine-tuning stage).

A run is a sequence of *phases*; each phase lasts ``epochs`` epochs and, at every step, trains at one
global-crop side drawn from ``sizes`` with probabilities ``probs``, with the per-process batch size
that goes with that side (``batch_sizes``: large crops, small batches). The reference stage trains at
256/384/512/768 px. Phases run back to back; the last one continues until ``optim.epochs``.

Everything is a pure function of ``(seed, step)`` — every rank draws the same resolution without any
communication, and a resumed run draws exactly what the uninterrupted run drew — and of the phase
layout, which only needs the config, the dataset length and the world size.

Definitions (integers, so the data position of a resumed run is exact):

* an epoch of phase ``i`` is ``max(1, floor(N / (W * m_i)))`` steps, with ``N`` the samples per
  epoch (``data.samples_per_epoch`` or the dataset length), ``W`` the world size and
  ``m_i = sum_k probs[k] * batch_sizes[k]`` the expected per-process batch of the phase. With one size
  this is exactly the single-resolution ``N // global_batch``.
* ``samples_before(step)`` is the exact sum of the global batch sizes of steps ``0 .. step - 1``:
  samples are addressed by their global position (``veca_ssl.data.InfiniteSampler``), so this is
  where a resumed run's data continues.
* epoch-denominated settings (warm-ups, frozen last layer) are converted with ``step_of_epoch``,
  which counts each phase's epochs at that phase's rate.

The per-step draw uses the SplitMix64 sequence (Steele et al., 2014) keyed by the seed rather than a
fresh ``numpy.random.default_rng`` per step: ``samples_before`` of a late step sums over every earlier
step, which this makes a vectorised numpy pass (milliseconds for a million steps) instead of ~17 µs
per step on resume.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from veca_ssl.config import ConfigError
from veca_ssl.data.sampler import derive_seed

PHASE_KEYS = ("epochs", "sizes", "probs", "batch_sizes")
_STREAM = 0x4D52  # separates this random stream from others keyed by the same seed ("MR")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_BLOCK = 1 << 16  # steps per cached prefix sum of samples_before


@dataclass(frozen=True)
class Phase:
    """One phase: ``epochs`` epochs at sides ``sizes`` (pixels), drawn per step with ``probs``, with
    per-process batch sizes ``batch_sizes``."""

    epochs: int
    sizes: tuple[int, ...]
    probs: tuple[float, ...]
    batch_sizes: tuple[int, ...]

    @property
    def expected_batch(self) -> float:
        """Expected per-process batch size of one step of this phase."""
        return float(sum(p * b for p, b in zip(self.probs, self.batch_sizes)))


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _as_list(value: Any, key: str) -> list:
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{key} must be a non-empty list, got {value!r}")
    return list(value)


def parse_phases(multires: DictConfig | Mapping | None, patch_size: int, total_epochs: int) -> list[Phase]:
    """Validate the ``multires`` config block and return its phases (``[]``: single resolution).

    Raises ``ConfigError`` naming the key: a phase without one of ``epochs/sizes/probs/batch_sizes``
    or with another key, sizes that are not positive multiples of ``patch_size`` or repeat, lists of
    different lengths, negative probabilities or ones not summing to 1, batch sizes < 1, or phases
    longer in total than ``total_epochs`` (``optim.epochs``).
    """
    if multires is None:
        return []
    phases_cfg = multires.get("phases") if isinstance(multires, (DictConfig, Mapping)) else None
    if phases_cfg is None:
        return []
    if isinstance(phases_cfg, ListConfig):
        phases_cfg = OmegaConf.to_container(phases_cfg, resolve=True)
    if not isinstance(phases_cfg, (list, tuple)):
        raise ConfigError(f"multires.phases must be a list of phases, got {phases_cfg!r}")
    phases = []
    for i, raw in enumerate(phases_cfg):
        key = f"multires.phases[{i}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{key} must be a mapping with keys {', '.join(PHASE_KEYS)}, got {raw!r}")
        unknown = sorted(set(raw) - set(PHASE_KEYS))
        missing = [k for k in PHASE_KEYS if k not in raw]
        if unknown or missing:
            raise ConfigError(f"{key}: unknown keys {unknown}, missing keys {missing}; a phase is "
                              f"{{epochs: E, sizes: [...], probs: [...], batch_sizes: [...]}}")
        epochs = raw["epochs"]
        if not _is_int(epochs) or epochs < 1:
            raise ConfigError(f"{key}.epochs must be an integer >= 1, got {epochs!r}")
        sizes = _as_list(raw["sizes"], f"{key}.sizes")
        probs = _as_list(raw["probs"], f"{key}.probs")
        batch_sizes = _as_list(raw["batch_sizes"], f"{key}.batch_sizes")
        for s in sizes:
            if not _is_int(s) or s < patch_size or s % patch_size:
                near = max(patch_size, round(s / patch_size) * patch_size) if _is_int(s) else patch_size
                raise ConfigError(f"{key}.sizes: {s!r} is not a positive multiple of model.patch_size="
                                  f"{patch_size}; use e.g. {near}")
        if len(set(sizes)) != len(sizes):
            raise ConfigError(f"{key}.sizes has repeated sizes {sizes}; list each size once")
        for name, values in (("probs", probs), ("batch_sizes", batch_sizes)):
            if len(values) != len(sizes):
                raise ConfigError(f"{key}.{name} has {len(values)} entries but sizes {sizes} has {len(sizes)}; "
                                  f"give one per size")
        if any(not isinstance(p, (int, float)) or isinstance(p, bool) or not math.isfinite(p) or p < 0
               for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
            raise ConfigError(f"{key}.probs must be non-negative and sum to 1, got {probs} (sum {sum(probs)})")
        if any(not _is_int(b) or b < 1 for b in batch_sizes):
            raise ConfigError(f"{key}.batch_sizes must be integers >= 1 (per process), got {batch_sizes}")
        phases.append(Phase(int(epochs), tuple(int(s) for s in sizes), tuple(float(p) for p in probs),
                            tuple(int(b) for b in batch_sizes)))
    used = sum(p.epochs for p in phases)
    if used > total_epochs:
        raise ConfigError(f"multires.phases last {used} epochs in total but optim.epochs={total_epochs}; the "
                          f"last phase continues up to optim.epochs, so raise optim.epochs to >= {used} or "
                          f"shorten the phases")
    return phases


def _uniforms(key: int, steps: np.ndarray) -> np.ndarray:
    """Floats in [0, 1): output ``step`` of the SplitMix64 sequence seeded with ``key``."""
    with np.errstate(over="ignore"):  # uint64 arithmetic is meant to wrap modulo 2**64
        x = np.uint64(key) + (steps.astype(np.uint64) + np.uint64(1)) * _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


class MultiResSchedule:
    """Resolution and batch size of every step, and the step/epoch/sample bookkeeping around them.

    Args:
        phases: from :func:`parse_phases` (non-empty).
        samples_per_epoch: ``N`` (module docstring).
        world_size: processes; batch sizes in ``phases`` are per process.
        total_epochs: ``optim.epochs``; the last phase runs until then.
        seed: base seed (``cfg.seed``).
    """

    def __init__(self, phases: Sequence[Phase], samples_per_epoch: int, world_size: int, total_epochs: int,
                 seed: int = 0) -> None:
        if not phases:
            raise ValueError("MultiResSchedule needs at least one phase (no phases = single resolution)")
        if samples_per_epoch < 1 or world_size < 1:
            raise ValueError(f"need samples_per_epoch, world_size >= 1, got {samples_per_epoch}, {world_size}")
        self.phases, self.world_size, self.seed = tuple(phases), int(world_size), int(seed)
        self.steps_per_epoch = tuple(max(1, math.floor(samples_per_epoch / (world_size * p.expected_batch)))
                                     for p in self.phases)
        starts_e, starts_s = [0], [0]
        for p, spe in zip(self.phases[:-1], self.steps_per_epoch):
            starts_e.append(starts_e[-1] + p.epochs)
            starts_s.append(starts_s[-1] + p.epochs * spe)
        self.start_epochs, self.start_steps = tuple(starts_e), tuple(starts_s)
        self.total_epochs = int(total_epochs)
        if self.total_epochs < self.start_epochs[-1] + self.phases[-1].epochs:
            raise ValueError(f"the phases last {self.start_epochs[-1] + self.phases[-1].epochs} epochs, "
                             f"more than total_epochs={total_epochs}")
        self.total_steps = self.step_of_epoch(self.total_epochs)
        self.sizes = tuple(sorted({s for p in self.phases for s in p.sizes}))
        self._key = derive_seed(self.seed, _STREAM)
        self._cum_probs = [np.cumsum(p.probs) for p in self.phases]
        self._prefix = [0]  # samples_before(k * _BLOCK), extended on demand

    # -- steps and epochs ----------------------------------------------------------------------
    def step_of_epoch(self, epoch: int) -> int:
        """First step of ``epoch`` (epochs past the end continue at the last phase's rate)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        i = int(np.searchsorted(self.start_epochs, epoch, side="right")) - 1
        return self.start_steps[i] + (int(epoch) - self.start_epochs[i]) * self.steps_per_epoch[i]

    def phase_at(self, step: int) -> int:
        """Index of the phase ``step`` belongs to."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return int(np.searchsorted(self.start_steps, step, side="right")) - 1

    def epoch_at(self, step: int) -> int:
        """Epoch ``step`` belongs to."""
        i = self.phase_at(step)
        return self.start_epochs[i] + (int(step) - self.start_steps[i]) // self.steps_per_epoch[i]

    # -- resolutions ---------------------------------------------------------------------------
    def _choices(self, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(phase index, size index) of each of ``steps`` (int64 array)."""
        phase = np.searchsorted(np.asarray(self.start_steps), steps, side="right") - 1
        u = _uniforms(self._key, steps)
        choice = np.empty(steps.shape, dtype=np.int64)
        for i, cum in enumerate(self._cum_probs):
            sel = phase == i
            # side="right" never picks a zero-probability size; the clip guards cum[-1] < 1 by rounding
            choice[sel] = np.minimum(np.searchsorted(cum, u[sel], side="right"), len(cum) - 1)
        return phase, choice

    def resolution_at(self, step: int) -> tuple[int, int]:
        """``(global crop side, per-process batch size)`` of ``step`` — the same on every rank."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        phase, choice = self._choices(np.array([step], dtype=np.int64))
        p = self.phases[int(phase[0])]
        return p.sizes[int(choice[0])], p.batch_sizes[int(choice[0])]

    def global_batches(self, start: int, stop: int) -> np.ndarray:
        """Global batch sizes (all processes) of steps ``start .. stop - 1``."""
        steps = np.arange(start, stop, dtype=np.int64)
        phase, choice = self._choices(steps)
        table = np.zeros((len(self.phases), max(len(p.sizes) for p in self.phases)), dtype=np.int64)
        for i, p in enumerate(self.phases):
            table[i, : len(p.batch_sizes)] = p.batch_sizes
        return table[phase, choice] * self.world_size

    def samples_before(self, step: int) -> int:
        """Samples consumed by all processes in steps ``0 .. step - 1`` (the resume data position)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        block = step // _BLOCK
        while len(self._prefix) <= block:  # cache whole blocks: the loop asks for this every few steps
            k = len(self._prefix) - 1
            self._prefix.append(self._prefix[-1] + int(self.global_batches(k * _BLOCK, (k + 1) * _BLOCK).sum()))
        return self._prefix[block] + int(self.global_batches(block * _BLOCK, step).sum())

    def describe(self) -> str:
        """One line per phase: epochs, steps, sizes / probabilities / batch sizes."""
        lines = []
        for i, p in enumerate(self.phases):
            e0, s0 = self.start_epochs[i], self.start_steps[i]
            last = i == len(self.phases) - 1
            e1 = self.total_epochs if last else e0 + p.epochs
            mix = ", ".join(f"{s}px p={q:g} b={b}" for s, q, b in zip(p.sizes, p.probs, p.batch_sizes))
            lines.append(f"multires phase {i}: epochs {e0}-{e1} steps {s0}-{self.step_of_epoch(e1)} "
                         f"({self.steps_per_epoch[i]}/epoch): {mix}")
        return "\n".join(lines)


class FixedSchedule:
    """The single-resolution case with :class:`MultiResSchedule`'s bookkeeping interface:
    ``steps_per_epoch = max(1, N // global_batch)`` steps per epoch, every step ``global_batch``."""

    def __init__(self, size: int, batch_size: int, samples_per_epoch: int, world_size: int,
                 total_epochs: int) -> None:
        self.size, self.batch_size, self.world_size = int(size), int(batch_size), int(world_size)
        self.global_batch = self.batch_size * self.world_size
        self.steps_per_epoch = max(1, int(samples_per_epoch) // self.global_batch)
        self.total_epochs = int(total_epochs)
        self.total_steps = self.total_epochs * self.steps_per_epoch

    def step_of_epoch(self, epoch: int) -> int:
        return int(epoch) * self.steps_per_epoch

    def epoch_at(self, step: int) -> int:
        return int(step) // self.steps_per_epoch

    def resolution_at(self, step: int) -> tuple[int, int]:
        return self.size, self.batch_size

    def samples_before(self, step: int) -> int:
        return int(step) * self.global_batch
