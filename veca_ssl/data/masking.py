"""Block-wise patch masking of BEiT (arXiv:2106.08254) as used by iBOT (arXiv:2111.07832) and DINOv2.

Rectangles of random area (at least ``min_block_patches``, at most ``max_ratio`` of the grid) and
log-uniform aspect ratio (``min_aspect`` … ``1/min_aspect``) are added until the target count is
reached — the BEiT algorithm, which never overshoots. BEiT then stops wherever ten attempts fail to
add a rectangle, which can leave the mask short of the target; here the remainder is filled with
patches adjacent to the mask (keeping it blocky), so the count is exact.

Guarantee: ``MaskingGenerator(grid)(k, rng)`` masks exactly ``min(max(k, 0), Hp*Wp)`` patches.

:class:`BatchMasker` chooses which global crops of a batch are masked and how much, as DINOv2's
collate does (``dinov2/data/collate.py``).
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


class BatchMasker:
    """iBOT masks for the global crops of one batch, drawn as DINOv2's collate draws them.

    Of the ``B`` global crops, exactly ``int(B * mask_probability)`` are masked; the ``i``-th of those
    masks ``int(N * U(r_i, r_{i+1}))`` of the ``N`` patches, where ``r = linspace(min_ratio,
    max_ratio, n_masked + 1)`` — stratified ratios, so every batch spans the whole ratio range — and
    the masks are shuffled over the crops. (Drawing "masked or not" per crop instead gives a binomial
    number of masked crops per batch, and independent ratios.)

    Args:
        patch_size: pixels per patch: the mask grid is the global crop's side / ``patch_size``.
        mask_probability: fraction of the global crops that are masked (0 = no masks).
        mask_ratio: ``(min_ratio, max_ratio)`` of the masked fraction of a masked crop.
        template: block-masking settings (aspect range, smallest block, largest block as a fraction of
            the grid) for every grid size; default ``MaskingGenerator`` settings with
            ``max_ratio = mask_ratio[1]``.
    """

    def __init__(self, patch_size: int, mask_probability: float = 0.5, mask_ratio: tuple[float, float] = (0.1, 0.5),
                 template: MaskingGenerator | None = None) -> None:
        lo, hi = (float(r) for r in mask_ratio)
        if not 0.0 <= lo <= hi <= 1.0 or not 0.0 <= mask_probability <= 1.0 or patch_size < 1:
            raise ValueError(f"need 0 <= mask_ratio[0] <= mask_ratio[1] <= 1, a probability and a patch size >= 1, "
                             f"got {mask_ratio}, {mask_probability}, {patch_size}")
        self.patch_size, self.mask_probability, self.mask_ratio = int(patch_size), float(mask_probability), (lo, hi)
        self.template = template
        self._generators: dict[tuple[int, int], MaskingGenerator] = {}
        if template is not None:
            self._generators[template.grid] = template

    def generator(self, grid: tuple[int, int]) -> MaskingGenerator:
        if grid not in self._generators:
            t = self.template
            self._generators[grid] = (
                MaskingGenerator(grid, t.min_ratio, t.max_ratio, math.exp(t.log_aspect[0]), t.min_block_patches)
                if t is not None else MaskingGenerator(grid, self.mask_ratio[0], self.mask_ratio[1]))
        return self._generators[grid]

    def __call__(self, num_crops: int, grid: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """Bool masks ``(num_crops, Hp*Wp)`` for ``num_crops`` global crops of patch grid ``grid``."""
        n = int(grid[0]) * int(grid[1])
        n_masked = int(num_crops * self.mask_probability)
        out = np.zeros((num_crops, n), dtype=bool)
        ratios = np.linspace(self.mask_ratio[0], self.mask_ratio[1], n_masked + 1)
        gen = self.generator((int(grid[0]), int(grid[1]))) if n_masked else None
        for i in range(n_masked):
            out[i] = gen(int(n * rng.uniform(ratios[i], ratios[i + 1])), rng).reshape(-1)
        return out[rng.permutation(num_crops)]
