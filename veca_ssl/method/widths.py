"""Which core widths the student trains at, step by step (nested, elastic training).

The choice is a pure function of (seed, step): every rank draws the same widths without any
communication, and a resumed run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

REFERENCE_WEIGHTS = (1, 1, 2, 2, 3, 3, 4, 4)  # for widths 8, 16, ..., 64 (the VECA reference)


class WidthPolicy:
    """``sample``: one weighted width per step; ``sandwich``: largest + smallest + one random in
    between (losses summed); ``full``: always the whole bank. Dense models train at ``[None]``."""

    def __init__(self, widths: Sequence[int], policy: str = "sample", weights: Sequence[float] | None = None,
                 seed: int = 0) -> None:
        self.widths = tuple(widths)
        self.policy, self.seed = policy, seed
        if policy not in ("sample", "sandwich", "full"):
            raise ValueError(f"widths.policy={policy!r}; valid: 'sample', 'sandwich', 'full'")
        if not self.widths:  # a dense model: nothing to choose
            self.probs = np.ones(0)
            return
        if weights is None:
            weights = REFERENCE_WEIGHTS if self.widths == tuple(range(8, 65, 8)) else [1.0] * len(self.widths)
        if len(weights) != len(self.widths):
            raise ValueError(f"widths.weights has {len(weights)} entries but there are {len(self.widths)} "
                             f"widths {self.widths}; give one weight per width")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"widths.weights must be non-negative with a positive sum, got {list(weights)}")
        self.probs = w / w.sum()

    def __call__(self, step: int) -> list[int | None]:
        if not self.widths:
            return [None]
        if self.policy == "full":
            return [self.widths[-1]]
        rng = np.random.default_rng([self.seed, step, 0x5EED])
        if self.policy == "sample":
            return [int(rng.choice(self.widths, p=self.probs))]
        middle = self.widths[1:-1]
        chosen = [self.widths[-1], self.widths[0]]
        if middle:
            chosen.append(int(rng.choice(middle)))
        return list(dict.fromkeys(chosen))  # a bank of 1 or 2 widths gives no duplicates


def training_widths(model_widths: Sequence[int], values: Sequence[int] | None) -> tuple[int, ...]:
    """The configured subset of the model's widths; raises naming any width the bank cannot reach."""
    if values is None:
        return tuple(model_widths)
    if not model_widths:
        raise ValueError(f"widths.choices={list(values)} given for a dense model, which has no core widths; "
                         f"set widths.choices=null")
    bad = [v for v in values if v not in model_widths]
    if bad:
        raise ValueError(f"widths.choices contains {bad}, not reachable with this core bank; valid widths: "
                         f"{tuple(model_widths)} (raise model.num_cores to reach more)")
    return tuple(sorted(set(int(v) for v in values)))
