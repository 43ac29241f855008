"""Multi-resolution SSL batches: a batch sampler that follows a resolution schedule, and a dataset that
renders each sample at the resolution its batch asks for.

Samples keep the addressing of :class:`~veca_ssl.data.sampler.InfiniteSampler`: one global sequence
of positions, each with its own ``(index, sample_seed)``. Step ``t`` consumes the global positions
``S_t .. S_t + W * b_t - 1`` where ``S_t = schedule.samples_before(t)`` and ``b_t`` is the step's
per-process batch; rank ``r`` takes ``S_t + r, S_t + r + W, …`` — exactly what ``InfiniteSampler``
with a fixed batch does, so a single-size schedule reads the same samples, and a resumed run (which
starts at ``samples_before(step)``) continues exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from torch.utils.data import Dataset, Sampler

from .sampler import InfiniteSampler
from .ssl import SSLDataset


class ResolutionSchedule(Protocol):
    """What the batch sampler needs from ``veca_ssl.train.multires.MultiResSchedule``."""

    world_size: int

    def resolution_at(self, step: int) -> tuple[int, int]: ...

    def samples_before(self, step: int) -> int: ...


class MultiResSSLDataset(Dataset):
    """``__getitem__((index, sample_seed, size))`` → the sample of ``index`` from the
    :class:`~veca_ssl.data.ssl.SSLDataset` of global crop side ``size``.

    Args:
        datasets: one ``SSLDataset`` per global crop side (same base data, same local crop size).
    """

    def __init__(self, datasets: Mapping[int, SSLDataset]) -> None:
        if not datasets:
            raise ValueError("MultiResSSLDataset needs at least one (size -> SSLDataset) entry")
        self.datasets = {int(k): v for k, v in datasets.items()}
        for size, ds in self.datasets.items():
            if ds.transform.global_size != size:
                raise ValueError(f"the dataset registered for size {size} crops at {ds.transform.global_size} px")
        lengths = {len(ds) for ds in self.datasets.values()}
        local = {ds.transform.local_size for ds in self.datasets.values()}
        if len(lengths) != 1 or len(local) != 1:
            raise ValueError(f"every size needs the same base data and local crop size, got lengths {lengths}, "
                             f"local sizes {local}")
        self.length, self.local_size = lengths.pop(), local.pop()

    def collate_fn(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """A batch (one global crop size) collated by that size's dataset (its masks' patch grid)."""
        return self.datasets[int(samples[0]["global"][0].shape[-1])].collate_fn(samples)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        index, seed, size = (int(k) for k in key)
        try:
            dataset = self.datasets[size]
        except KeyError:
            raise KeyError(f"no dataset for global crop size {size}; sizes: {sorted(self.datasets)}") from None
        return dataset[(index, seed)]


class MultiResBatchSampler(Sampler):
    """Infinite batches of ``(index, sample_seed, size)`` for rank ``rank``, one batch per step from
    ``start_step`` on, following ``schedule`` (module docstring). Use as ``DataLoader(batch_sampler=…)``.

    Args:
        size: dataset length.
        schedule: gives each step's ``(size, per-process batch)`` and the samples before it; its
            ``world_size`` must be ``world_size``.
        seed / shuffle: as :class:`~veca_ssl.data.sampler.InfiniteSampler` (permutations, sample seeds).
        rank / world_size: this process's slot.
        start_step: first step to produce (resume).
    """

    def __init__(self, size: int, schedule: ResolutionSchedule, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, shuffle: bool = True) -> None:
        if schedule.world_size != world_size:
            raise ValueError(f"schedule is for world_size={schedule.world_size}, the sampler for {world_size}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        super().__init__()
        # InfiniteSampler validates the arguments and owns the position -> (index, seed) mapping
        self.positions = InfiniteSampler(size, seed=seed, rank=rank, world_size=world_size, shuffle=shuffle)
        self.schedule, self.rank, self.world_size = schedule, int(rank), int(world_size)
        self.start_step = int(start_step)

    def batch(self, step: int, first_position: int) -> list[tuple[int, int, int]]:
        """This rank's part of ``step``, whose global batch starts at ``first_position``."""
        size, batch_size = self.schedule.resolution_at(step)
        out = []
        for i in range(batch_size):
            index, seed = self.positions.at(first_position + self.rank + i * self.world_size)
            out.append((index, seed, size))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        step = self.start_step
        position = self.schedule.samples_before(step)
        while True:
            items = self.batch(step, position)
            position += len(items) * self.world_size
            step += 1
            yield items

    def __repr__(self) -> str:
        return (f"MultiResBatchSampler(size={self.positions.size}, rank={self.rank}/{self.world_size}, "
                f"start_step={self.start_step})")
