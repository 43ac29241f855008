"""What the host learns from a training step, in one read.

On an accelerator every ``float(tensor)`` or ``.item()`` waits for all the work queued before it, so
a step that reads its loss terms, its finiteness flag and its gradient norms one by one pays that
wait many times. The step instead stacks everything the host needs into one float64 vector on the
device, all of it still unread::

    [stop flag, loss terms..., gradient norms..., samples seen, samples skipped]

gathers the vectors of every rank in one collective when distributed (``veca_ssl.distributed``: on the
communication device) and reads the result with one ``.tolist()``. From that one read every rank
knows the same things: whether any rank's loss is NaN/Inf (and which terms, on which rank), whether
any rank was asked to stop, the losses averaged over the ranks (what is logged), the gradient norms
(equal on every rank: gradients are averaged before clipping) and the skip counts summed over ranks.
float64 keeps the counts exact (integers up to 2**53) and every float32 loss value unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from veca_ssl import distributed as dist


@dataclass(frozen=True)
class StepReadout:
    """The host's view of one step, identical on every rank."""

    losses: dict[str, float]  # mean over ranks
    rank_losses: list[dict[str, float]]  # every rank's own values, in rank order
    grad_norms: dict[str, float]  # per sub-module, before clipping
    stop: bool  # some rank was asked to checkpoint and stop
    seen: int  # samples seen over all ranks in this run
    skipped: int  # of which unusable

    @property
    def non_finite_ranks(self) -> list[int]:
        """The ranks whose loss terms hold a NaN or Inf."""
        return [r for r, values in enumerate(self.rank_losses)
                if not all(math.isfinite(v) for v in values.values())]


def read_step(losses: dict[str, torch.Tensor], grad_norms: dict[str, torch.Tensor], stop: bool,
              counts: tuple[int, int]) -> StepReadout:
    """One collective (when distributed) and one host read for everything the step reports.

    ``losses``: the method's terms (0-dim tensors on the device; ``"loss"`` may carry a graph);
    ``grad_norms``: :func:`veca_ssl.train.optim.clip_grad_norms_`; ``stop``: this rank's stop flag;
    ``counts``: this rank's (seen, skipped) samples. Every rank must call it at the same step.
    """
    names, norm_names = list(losses), list(grad_norms)
    values = torch.stack([losses[k].detach().reshape(()).to(torch.float64) for k in names])
    # host numbers enter as fills on the device, not as host-to-device copies (which would wait); the
    # finiteness of the terms is judged on the host from the values themselves (NaN/Inf survive float64)
    parts = [values.new_full((1,), float(stop)), values]
    if norm_names:
        parts.append(torch.stack([grad_norms[k].detach().reshape(()).to(torch.float64) for k in norm_names]))
    parts += [values.new_full((1,), float(counts[0])), values.new_full((1,), float(counts[1]))]
    gathered = dist.all_gather_tensor(torch.cat(parts).unsqueeze(0))  # (world, L); itself when single
    rows = gathered.tolist()  # the one host read of the step
    k, g = len(names), len(norm_names)
    rank_losses = [dict(zip(names, row[1:1 + k])) for row in rows]
    world = len(rows)
    mean = {name: sum(r[name] for r in rank_losses) / world for name in names} if world > 1 else rank_losses[0]
    return StepReadout(
        losses=mean,
        rank_losses=rank_losses,
        grad_norms=dict(zip(norm_names, rows[0][1 + k:1 + k + g])),
        stop=any(row[0] > 0 for row in rows),
        seen=int(sum(row[1 + k + g] for row in rows)),
        skipped=int(sum(row[2 + k + g] for row in rows)),
    )
