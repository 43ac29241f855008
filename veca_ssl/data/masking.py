"""Block-wise patch masking of BEiT (arXiv:2106.08254) as used by iBOT (arXiv:2111.07832) and DINOv2.

Rectangles of random area (at least ``min_block_patches``, at most ``max_ratio`` of the grid) and
log-uniform aspect ratio (``min_aspect`` … ``1/min_aspect``) are added until the target count is
reached — the BEiT algorithm, which never overshoots. BEiT then stops wherever ten attempts fail to
add a rectangle, which can leave the mask short of the target; here the remainder is filled with
patches adjacent to the mask (keeping it blocky), so the count is exact.

Guarantee: ``MaskingGenerator(grid)(k, rng)`` masks exactly ``min(max(k, 0), Hp*Wp)`` patches.
"""

from __future__ import annotations

import math

import numpy as np


class MaskingGenerator:
    """BEiT/iBOT block masks over a ``grid`` = (Hp, Wp) of patches.

    Args:
        grid: patch grid (rows, columns).
        min_ratio / max_ratio: default masking ratio range for ``__call__(None, rng)``; ``max_ratio``
            also caps a single block at ``max_ratio * Hp * Wp`` patches (DINOv2 uses 0.1–0.5).
        min_aspect: smallest block aspect ratio (the largest is ``1 / min_aspect``).
        min_block_patches: smallest block area tried (BEiT's 4; capped by what is left to mask).
    """

    def __init__(
        self,
        grid: tuple[int, int],
        min_ratio: float = 0.1,
        max_ratio: float = 0.5,
        min_aspect: float = 0.3,
        min_block_patches: int = 4,
    ) -> None:
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"grid must be (rows, cols) >= 1, got {grid}")
        if not 0.0 <= min_ratio <= max_ratio <= 1.0:
            raise ValueError(f"need 0 <= min_ratio <= max_ratio <= 1, got {min_ratio}, {max_ratio}")
        if not 0.0 < min_aspect <= 1.0:
            raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
        self.height, self.width = int(grid[0]), int(grid[1])
        self.num_patches = self.height * self.width
        self.min_ratio, self.max_ratio = float(min_ratio), float(max_ratio)
        self.log_aspect = (math.log(min_aspect), -math.log(min_aspect))
        self.min_block_patches = max(1, int(min_block_patches))
        self.max_block_patches = max(1, int(self.max_ratio * self.num_patches))

    @property
    def grid(self) -> tuple[int, int]:
        return (self.height, self.width)

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Try (10 times) to add one rectangle adding 1..``budget`` new patches; return how many."""
        low = min(self.min_block_patches, budget)
        for _ in range(10):
            area = rng.uniform(low, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (1 <= h <= self.height and 1 <= w <= self.width):
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= budget:
                block[...] = True
                return new
        return 0

    def _fill_adjacent(self, mask: np.ndarray, missing: int, rng: np.random.Generator) -> None:
        """Mask ``missing`` more patches, preferring unmasked 4-neighbours of the current mask."""
        while missing > 0:
            grow = np.zeros_like(mask)
            grow[1:] |= mask[:-1]
            grow[:-1] |= mask[1:]
            grow[:, 1:] |= mask[:, :-1]
            grow[:, :-1] |= mask[:, 1:]
            candidates = np.flatnonzero(grow & ~mask)
            if candidates.size == 0:  # empty mask (or nothing adjacent): any free patch will do
                candidates = np.flatnonzero(~mask)
            pick = rng.choice(candidates, size=min(missing, candidates.size), replace=False)
            mask.flat[pick] = True
            missing -= pick.size

    def __call__(self, num_masked: int | None, rng: np.random.Generator) -> np.ndarray:
        """Return a bool (Hp, Wp) mask with exactly ``num_masked`` True patches (clipped to the grid).

        ``num_masked=None`` draws the ratio uniformly in ``[min_ratio, max_ratio]`` (count rounded down).
        """
        if num_masked is None:
            num_masked = int(self.num_patches * rng.uniform(self.min_ratio, self.max_ratio))
        target = min(max(int(num_masked), 0), self.num_patches)
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < target:
            added = self._add_block(mask, min(target - count, self.max_block_patches), rng)
            if added == 0:
                break
            count += added
        if count < target:
            self._fill_adjacent(mask, target - count, rng)
        return mask

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator(grid={self.grid}, ratio=({self.min_ratio}, {self.max_ratio}), "
            f"max_block={self.max_block_patches})"
        )
