"""Which core budgets the student trains at, step by step (SPEC §3.1 "nested (elastic) training").

The choice is a pure function of (seed, step): every rank draws the same budgets without any
communication, and a resumed run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

REFERENCE_WEIGHTS = (1, 1, 2, 2, 3, 3, 4, 4)  # for budgets 8, 16, ..., 64 (the VECA reference)


class BudgetPolicy:
    """``sample``: one weighted budget per step; ``sandwich``: largest + smallest + one random in
    between (losses summed); ``full``: always the whole bank. Dense models train at ``[None]``."""

    def __init__(self, budgets: Sequence[int], policy: str = "sample", weights: Sequence[float] | None = None,
                 seed: int = 0) -> None:
        self.budgets = tuple(budgets)
        self.policy, self.seed = policy, seed
        if policy not in ("sample", "sandwich", "full"):
            raise ValueError(f"budgets.policy={policy!r}; valid: 'sample', 'sandwich', 'full'")
        if not self.budgets:  # a dense model: nothing to choose
            self.probs = np.ones(0)
            return
        if weights is None:
            weights = REFERENCE_WEIGHTS if self.budgets == tuple(range(8, 65, 8)) else [1.0] * len(self.budgets)
        if len(weights) != len(self.budgets):
            raise ValueError(f"budgets.weights has {len(weights)} entries but there are {len(self.budgets)} "
                             f"budgets {self.budgets}; give one weight per budget")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"budgets.weights must be non-negative with a positive sum, got {list(weights)}")
        self.probs = w / w.sum()

    def __call__(self, step: int) -> list[int | None]:
        if not self.budgets:
            return [None]
        if self.policy == "full":
            return [self.budgets[-1]]
        rng = np.random.default_rng([self.seed, step, 0x5EED])
        if self.policy == "sample":
            return [int(rng.choice(self.budgets, p=self.probs))]
        middle = self.budgets[1:-1]
        chosen = [self.budgets[-1], self.budgets[0]]
        if middle:
            chosen.append(int(rng.choice(middle)))
        return list(dict.fromkeys(chosen))  # a 1- or 2-budget bank gives no duplicates


def resolve_budgets(model_budgets: Sequence[int], values: Sequence[int] | None) -> tuple[int, ...]:
    """The configured subset of the model's budgets; raises naming any budget the bank cannot reach."""
    if values is None:
        return tuple(model_budgets)
    if not model_budgets:
        raise ValueError(f"budgets.choices={list(values)} given for a dense model, which has no core budgets; "
                         f"set budgets.choices=null")
    bad = [v for v in values if v not in model_budgets]
    if bad:
        raise ValueError(f"budgets.choices contains {bad}, not reachable with this core bank; valid budgets: "
                         f"{tuple(model_budgets)} (raise model.num_cores to reach more)")
    return tuple(sorted(set(int(v) for v in values)))
