"""Teacher-side target normalisation: EMA centring and Sinkhorn-Knopp.

A DINO teacher would collapse onto one prototype (or onto the uniform distribution) if its outputs
were used raw. Two remedies are implemented here, both as pure functions so they can be tested in
isolation and reused by the image-level (:class:`~veca_ssl.loss.dino.DINOLoss`) and patch-level
(:class:`~veca_ssl.loss.ibot.iBOTPatchLoss`) losses:

* **Centring + sharpening** (DINO, Caron et al., arXiv:2104.14294, §3.1): subtract an exponential
  moving average of the teacher's logits, then apply a low-temperature softmax.
* **Sinkhorn-Knopp** (SwAV, Caron et al., arXiv:2006.09882, §3.1 and Alg. 1; adopted by DINOv2,
  Oquab et al., arXiv:2304.07193, §4): a few alternating row/column normalisations that make every
  prototype equally used over the (global) batch.

Both are *distributed-aware*: when ``torch.distributed`` is initialised the statistics are reduced
over all ranks, so the result is exactly the one a single process would compute on the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from veca_ssl import distributed as vd


def _distributed() -> bool:
    """Whether reductions must run across ranks."""
    return vd.is_distributed()


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"{name} must be 2-D (batch, prototypes), got shape {tuple(logits.shape)}")


def _check_temperature(temp: float) -> None:
    if not temp > 0:
        raise ValueError(f"temperature must be > 0, got {temp}")


@torch.no_grad()
def teacher_softmax_centered(teacher_logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """Centred, sharpened teacher distribution ``softmax((logits - center) / temp)`` (DINO eq. 4).

    Args:
        teacher_logits: ``(B, K)`` raw teacher head outputs.
        center: ``(1, K)`` (or ``(K,)``) EMA centre, see :func:`update_center`.
        temp: teacher temperature (DINO: 0.04 warmed up to 0.07).

    Returns:
        ``(B, K)`` float32 probabilities, rows summing to 1. No gradient flows (the teacher is a target).
    """
    _check_logits("teacher_logits", teacher_logits)
    _check_temperature(temp)
    if center.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"center has {center.shape[-1]} prototypes but teacher_logits has {teacher_logits.shape[-1]}"
        )
    # Softmax in float32: low temperatures amplify bf16 rounding into visibly wrong targets.
    return F.softmax((teacher_logits.float() - center.float()) / temp, dim=-1)


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """EMA update of the centre with the *global* batch mean of the teacher logits (DINO eq. 4).

    ``new = momentum * center + (1 - momentum) * mean_over_global_batch(teacher_logits)``.

    When ``torch.distributed`` is initialised the row sum and the row count are all-reduced, so the mean
    is over every rank's rows even when ranks hold different numbers of rows (e.g. masked patches).

    Args:
        center: ``(1, K)`` current centre (not modified).
        teacher_logits: ``(N, K)`` raw teacher outputs of this rank (N may be 0 on some ranks).
        momentum: EMA momentum in [0, 1] (DINO: 0.9).

    Returns:
        The new ``(1, K)`` centre, in ``center``'s dtype. The caller copies it into its buffer.
    """
    _check_logits("teacher_logits", teacher_logits)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"center momentum must be in [0, 1], got {momentum}")
    batch_sum = teacher_logits.float().sum(dim=0, keepdim=True)
    # new_full: a fill on the device, not a host-to-device copy of a Python list (which waits for it)
    count = batch_sum.new_full((1,), float(teacher_logits.shape[0]))
    if _distributed():
        vd.all_reduce_(batch_sum)
        vd.all_reduce_(count)
        # No .item() check here (it would stall the CUDA stream every step): an empty global batch
        # yields a zero mean instead of NaN.
        count = count.clamp_min(1.0)
    elif teacher_logits.shape[0] == 0:
        raise ValueError("update_center got an empty batch (0 rows)")
    batch_mean = batch_sum / count
    new_center = center.float() * momentum + batch_mean * (1.0 - momentum)
    return new_center.to(center.dtype)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp soft assignment of samples to prototypes (SwAV Alg. 1, DINOv2 variant).

    With ``P = exp(logits / temp)`` (a ``B x K`` matrix over the *global* batch of ``B`` samples), the
    algorithm looks for ``Q = diag(u) P diag(v)`` whose prototype (column) sums are all ``B / K`` —
    equipartition: each prototype gets the same share of the batch — and whose sample (row) sums are
    all 1, so that each row is a probability distribution usable as a cross-entropy target.
    Each iteration normalises the prototype sums to ``1/K`` then the sample sums to ``1/B`` (on the
    matrix scaled to total mass 1); the result is finally multiplied by ``B``. Consequently the rows of
    the output sum to exactly 1 (up to rounding) after any number of iterations, and the columns sum to
    ``B / K`` in the limit (3 iterations in SwAV/DINOv2 get close; the last step fixes the rows).

    Distributed: prototype sums, the total mass and the batch size are all-reduced, so each rank
    returns its own rows of the assignment of the global batch.

    Args:
        teacher_logits: ``(B_local, K)`` raw teacher head outputs.
        temp: teacher temperature (DINOv2 uses the same warmed-up temperature as for centring).
        n_iterations: number of row/column normalisation rounds (>= 1).

    Returns:
        ``(B_local, K)`` float32 assignments; rows sum to 1.
    """
    _check_logits("teacher_logits", teacher_logits)
    _check_temperature(temp)
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    scaled = teacher_logits.float() / temp
    # A global constant shift cancels in the first normalisation (Q /= sum(Q)) and keeps exp() finite.
    # It must be the same constant on every rank, hence the MAX reduction.
    shift = scaled.max() if scaled.numel() else scaled.new_full((), float("-inf"))
    if _distributed():
        vd.all_reduce_(shift, "max")
    q = torch.exp(scaled - shift).t()  # (K, B_local): prototypes as rows, as in the SwAV paper.
    n_prototypes = q.shape[0]
    tiny = torch.finfo(q.dtype).tiny
    batch = q.new_full((1,), float(q.shape[1]))
    total = q.sum()
    if _distributed():
        vd.all_reduce_(batch)
        vd.all_reduce_(total)
    q /= total
    for _ in range(n_iterations):
        prototype_sums = q.sum(dim=1, keepdim=True)
        if _distributed():
            vd.all_reduce_(prototype_sums)
        # clamp: a prototype whose mass underflowed to 0 stays 0 instead of turning into NaN.
        q /= prototype_sums.clamp_min(tiny)
        q /= n_prototypes
        # Sample sums are local: each sample lives on one rank only.
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)
        q /= batch
    q *= batch
    return q.t()
