"""A seeded, epoch-aware, infinite, distributed sampler for map-style datasets, resumable exactly.

All ranks walk one *global* sequence of positions p = 0, 1, 2, …: epoch ``e = p // size`` uses its own
permutation (seeded by ``(seed, e)``) and position p reads ``perm_e[p % size]``. Rank r of W takes
positions ``start + r, start + r + W, …``. Hence, per training step, one process with batch 2b and two
processes with batch b read exactly the same samples, and a run resumes exactly by passing
``start = samples consumed globally`` (= step × global batch). Each position also carries a
deterministic 63-bit ``sample_seed`` — a function of ``(seed, p)`` only, so the augmentation a sample
receives does not depend on the number of processes or DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64 finaliser (Steele et al., 2014): a fast, well-mixed 64-bit hash of ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from non-negative integers (order matters)."""
    h = 0x5EED
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h & _MASK63


def sample_seed(seed: int, position: int) -> int:
    """The 63-bit augmentation seed of global position ``position`` under base ``seed``."""
    return derive_seed(seed, position)


class InfiniteSampler(Sampler):
    """Infinite iterator of ``(index, sample_seed)`` for rank ``rank`` of ``world_size`` (see module doc).

    Args:
        size: dataset length.
        seed: base seed of the permutations and sample seeds (>= 0).
        rank / world_size: this process's slot in the global sequence.
        shuffle: ``False`` reads ``p % size`` in order (sample seeds still vary per position).
        start: global positions already consumed (resume point), the same on every rank.
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        start: int = 0,
    ) -> None:
        if size < 1:
            raise ValueError(f"InfiniteSampler needs a non-empty dataset, got size={size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0 or start < 0:
            raise ValueError(f"seed and start must be >= 0, got seed={seed}, start={start}")
        super().__init__()
        self.size, self.seed, self.rank, self.world_size = int(size), int(seed), int(rank), int(world_size)
        self.shuffle, self.start = bool(shuffle), int(start)
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """Index order of ``epoch`` (identity when not shuffling)."""
        if not self.shuffle:
            return np.arange(self.size)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            self._epoch = epoch
        assert self._perm is not None
        return self._perm

    def at(self, position: int) -> tuple[int, int]:
        """``(index, sample_seed)`` of global position ``position``."""
        epoch, offset = divmod(position, self.size)
        return int(self.permutation(epoch)[offset]), sample_seed(self.seed, position)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start + self.rank
        while True:
            yield self.at(position)
            position += self.world_size

    def __repr__(self) -> str:
        return (
            f"InfiniteSampler(size={self.size}, seed={self.seed}, rank={self.rank}/{self.world_size}, "
            f"shuffle={self.shuffle}, start={self.start})"
        )
