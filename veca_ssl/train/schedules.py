"""Training schedules as pure functions of the step (no state: resuming needs only the step).

Shapes follow DINO (arXiv:2104.14294 App. and ``utils.cosine_scheduler``) and DINOv2
(arXiv:2304.07193, ``CosineScheduler``): an optional frozen phase at 0, a linear warm-up, then a
half-cosine from ``base`` to ``final``. Learning rates scale with the global batch (Goyal et al.,
arXiv:1706.02677 for the linear rule; DINOv2 uses the square-root rule with reference batch 1024).

Conventions (chosen so each phase joins the next continuously):

* ``step < freeze_steps``: 0.
* warm-up, ``0 <= k = step - freeze_steps < warmup_steps``: ``warmup_start + (base - warmup_start) * k / warmup_steps``.
* cosine, ``k = step - freeze_steps - warmup_steps``, ``n = total_steps - freeze_steps - warmup_steps``:
  ``final + (base - final) * (1 + cos(pi * k / n)) / 2`` — ``base`` at ``k = 0``, ``final`` at ``k = n``.
* ``step >= total_steps``: ``final``.

(DINOv2's table differs slightly: its warm-up is ``linspace`` including ``base`` at the last warm-up
step, and its cosine stops one step short of ``final``.)
"""

from __future__ import annotations

import math


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def cosine_schedule(
    step: int,
    total_steps: int,
    base: float,
    final: float,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
    freeze_steps: int = 0,
) -> float:
    """Value at ``step`` of freeze (0) → linear warm-up → cosine ``base → final`` (module docstring)."""
    _check_step(step)
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0 or freeze_steps < 0:
        raise ValueError(f"warmup_steps and freeze_steps must be >= 0, got {warmup_steps}, {freeze_steps}")
    if freeze_steps + warmup_steps > total_steps:
        raise ValueError(
            f"freeze_steps ({freeze_steps}) + warmup_steps ({warmup_steps}) exceed total_steps ({total_steps}); "
            "shorten the warm-up or train longer"
        )
    if step >= total_steps:
        return float(final)
    if step < freeze_steps:
        return 0.0
    k = step - freeze_steps
    if k < warmup_steps:
        fraction = k / warmup_steps
        # Convex-combination form: endpoints come out exactly (no a + (b - a) rounding).
        return warmup_start * (1.0 - fraction) + base * fraction
    k -= warmup_steps
    n = total_steps - freeze_steps - warmup_steps
    weight = 0.5 * (1.0 + math.cos(math.pi * k / n))
    return base * weight + final * (1.0 - weight)


def scaled_lr(base_lr: float, global_batch: int, reference: int = 1024, rule: str = "sqrt") -> float:
    """Peak learning rate for a global batch: ``base_lr * sqrt(B / reference)`` (``"sqrt"``, DINOv2),
    ``base_lr * B / reference`` (``"linear"``, DINO / Goyal et al.) or ``base_lr`` (``"none"``)."""
    if global_batch < 1 or reference < 1:
        raise ValueError(f"global_batch and reference must be >= 1, got {global_batch}, {reference}")
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / reference)
    if rule == "linear":
        return base_lr * global_batch / reference
    if rule == "none":
        return float(base_lr)
    raise ValueError(f"unknown lr scaling rule {rule!r}; use 'sqrt', 'linear' or 'none'")


def teacher_temperature(step: int, warmup_steps: int, start: float = 0.04, end: float = 0.07) -> float:
    """DINO teacher temperature: linear ``start → end`` over ``warmup_steps``, then ``end``.

    (DINO §4 / DINOv2: 0.04 → 0.07 over the first 30 epochs; a too-high temperature early makes
    training unstable.)
    """
    _check_step(step)
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step >= warmup_steps:
        return float(end)
    fraction = step / warmup_steps
    return start * (1.0 - fraction) + end * fraction


def momentum_schedule(step: int, total_steps: int, base: float = 0.992, final: float = 1.0) -> float:
    """EMA teacher momentum, cosine ``base → final`` (DINO §3.1: 0.996 → 1; DINOv2: 0.992 → 1)."""
    return cosine_schedule(step, total_steps, base, final)


def weight_decay_schedule(step: int, total_steps: int, base: float = 0.04, final: float = 0.4) -> float:
    """AdamW weight decay, cosine ``base → final`` (DINO/DINOv2: 0.04 → 0.4)."""
    return cosine_schedule(step, total_steps, base, final)


def lr_schedule(
    step: int,
    total_steps: int,
    peak_lr: float,
    min_lr: float,
    warmup_steps: int,
    freeze_steps: int = 0,
) -> float:
    """Learning rate: linear warm-up from 0 to ``peak_lr`` then cosine to ``min_lr``.

    With ``freeze_steps`` (e.g. one epoch) the value is 0 first: DINO/DINOv2 freeze the head's last
    layer this way.
    """
    return cosine_schedule(step, total_steps, peak_lr, min_lr, warmup_steps, 0.0, freeze_steps)
