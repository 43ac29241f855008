"""Bootstrap confidence intervals of one evaluation metric over its test items.

Every metric here is a function of per-item sums: accuracy = hits summed / n, mIoU = IoU of the summed
per-image confusion matrices, depth RMSE = per-image RMSEs summed / n. A bootstrap draw resamples the
test items with replacement, i.e. gives each item a count; the resampled sums are then one matrix
product ``counts @ per_item`` for a whole batch of draws, whatever the statistic.

The interval measures the noise of *this* test set (which items happened to be in it) at one width;
for the difference between two widths on the same items, ``veca_ssl.knn.paired_bootstrap`` is tighter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: Confidence level of every interval in the reports.
CI_LEVEL = 0.95


def bootstrap_ci(per_item: torch.Tensor, statistic: Callable[[torch.Tensor], torch.Tensor],
                 samples: int = 1000, level: float = CI_LEVEL, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(sum over a resample of per_item)``.

    Args:
        per_item: (n, ...) per-item contributions (hits, confusion matrices, errors).
        statistic: maps a batch of resampled sums (B, ...) to the metric (B,).
        samples: number of bootstrap draws.
        level: confidence level of the two-sided interval.

    Returns:
        ``(low, high)``; NaNs when there are fewer than 2 items or no samples.
    """
    n = per_item.shape[0]
    if n < 2 or samples < 1:
        return float("nan"), float("nan")
    flat = per_item.reshape(n, -1).double()
    gen = torch.Generator().manual_seed(seed)
    per_batch = max(1, min(samples, 20_000_000 // max(n, flat.shape[1])))  # bounded memory
    draws = []
    for start in range(0, samples, per_batch):
        b = min(per_batch, samples - start)
        idx = torch.randint(0, n, (b, n), generator=gen)
        counts = torch.zeros(b, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(b, n, dtype=torch.float64))
        draws.append(statistic((counts @ flat).reshape(b, *per_item.shape[1:])).double())
    values = torch.cat(draws)
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return float("nan"), float("nan")
    lo, hi = torch.quantile(values, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return float(lo), float(hi)


def mean_ci(values: torch.Tensor, samples: int = 1000, level: float = CI_LEVEL, seed: int = 0,
            scale: float = 1.0) -> tuple[float, float]:
    """Interval of ``scale × mean(values)`` (e.g. hits → accuracy in % with ``scale=100``)."""
    n = values.shape[0]
    return bootstrap_ci(values.reshape(n).double(), lambda sums: sums * scale / n, samples, level, seed)


def with_ci(metrics: dict, name: str, ci: tuple[float, float]) -> None:
    """Store an interval next to its metric as ``<name>_ci_lo`` / ``<name>_ci_hi`` report columns."""
    metrics[f"{name}_ci_lo"], metrics[f"{name}_ci_hi"] = ci
