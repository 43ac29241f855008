"""torch.distributed process groups, rank helpers and collectives.

Everything here is a no-op (or identity) in single-process mode, so the training loop calls the same
functions on a laptop CPU, under ``torchrun`` and inside a SLURM job submitted through submitit.
Wrapping models for data/model parallelism lives in ``veca_ssl.parallelize``; stop signals in
``veca_ssl.signals``.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

__all__ = [
    "DistInfo",
    "init_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "is_distributed",
    "barrier",
    "cleanup",
    "seed_everything",
    "all_reduce_mean",
    "all_reduce_sum",
    "all_gather_tensor",
    "all_gather_with_grad",
]


@dataclass
class DistInfo:
    """Where this process sits in the job. ``backend`` is None in single-process mode."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None and self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_INFO: DistInfo | None = None


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} requested but CUDA is not available; use device='cpu' or 'auto'")
        return torch.device(device) if ":" in device else torch.device("cuda", local_rank)
    raise ValueError(f"unknown device {device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _port_from_job_id(job_id: str) -> int:
    """A rendezvous port all tasks of one job agree on without talking: derived from the job id."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits[-9:]) % 20000


def _rank_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun variables, else from a submitit job, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        return rank, world, int(os.environ.get("LOCAL_RANK", rank))
    if os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local"):
        import submitit  # lazy: only needed inside a job

        try:
            env = submitit.JobEnvironment()
        except RuntimeError:  # variables half-set outside a real job: treat as single process
            return None
        if env.num_tasks > 1:
            # One node: loopback always resolves; several nodes: the first host of the allocation.
            addr = "127.0.0.1" if env.num_nodes == 1 else env.hostnames[0]
            os.environ.setdefault("MASTER_ADDR", addr)
            os.environ.setdefault("MASTER_PORT", str(_port_from_job_id(str(env.job_id))))
        return env.global_rank, env.num_tasks, env.local_rank
    return None


def init_distributed(device: str = "auto", backend: str | None = None, timeout_s: int = 1800) -> DistInfo:
    """Initialise torch.distributed from torchrun / submitit (SLURM or local) variables, or not at all.

    Idempotent: later calls return the first result, unless they name an explicit device that
    contradicts it (then the group is rebuilt on that device). NCCL on CUDA, gloo on CPU unless ``backend``
    says otherwise; ``torch.cuda.set_device(local_rank)`` before the process group is created so
    NCCL binds each rank to its own GPU. A world size of 1 creates no process group.
    """
    global _INFO
    if _INFO is not None:
        if device == "auto" or _resolve_device(device, _INFO.local_rank) == _INFO.device:
            return _INFO
        # An explicit device that contradicts the first call (e.g. a launcher initialised with "auto",
        # the config says "cpu"): the explicit request wins, with a fresh process group.
        log.warning("re-initialising distributed on %s (was %s)", device, _INFO.device)
        cleanup()
    if dist.is_available() and dist.is_initialized():  # someone else (a test, a user) did it already
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        dev = _resolve_device(device, local_rank)
        _INFO = DistInfo(rank, world, local_rank, dev, dist.get_backend())
        return _INFO
    ranks = _rank_env()
    rank, world, local_rank = ranks if ranks is not None else (0, 1, 0)
    if not 0 <= rank < world:
        raise ValueError(f"inconsistent rank {rank} for world size {world}; check RANK/WORLD_SIZE")
    dev = _resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1:
        _INFO = DistInfo(0, 1, local_rank, dev, None)
        return _INFO
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(f"{var} is not set for a {world}-process job; launch with torchrun or submitit")
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    _INFO = DistInfo(rank, world, local_rank, dev, backend)
    log.info("initialised %s process group: rank %d/%d on %s", backend, rank, world, dev)
    return _INFO


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group (if any) and forget the cached ``DistInfo``."""
    global _INFO
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _INFO = None


def seed_everything(seed: int, rank: int | None = None) -> int:
    """Seed python, numpy and torch (CPU and CUDA) with ``seed + rank``; returns the seed used.

    Per-rank seeds decorrelate per-rank randomness (dropout, masks). Anything that must agree across
    ranks (the sampled core width) or must not depend on the world size (per-sample augmentation)
    needs its own generator seeded from ``seed`` alone / the global sample index.
    """
    seed = int(seed) + (get_rank() if rank is None else int(rank))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


# ----------------------------------------------------------------------------------------- collectives
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, returned as a new tensor (the input is left untouched); identity when single."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (floating tensors), returned as a new tensor; identity when single."""
    if not is_distributed():
        return tensor
    if not tensor.is_floating_point():
        raise ValueError(f"all_reduce_mean needs a floating tensor, got {tensor.dtype}; use all_reduce_sum")
    return all_reduce_sum(tensor) / get_world_size()


@torch.no_grad()
def all_gather_tensor(tensor: torch.Tensor, uneven: bool = False) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order (no gradient).

    ``uneven=True`` allows different dim-0 sizes per rank (e.g. the last shard of an eval set) at
    the cost of one extra small collective.
    """
    if not is_distributed():
        return tensor
    tensor = tensor.contiguous()
    world = get_world_size()
    if not uneven:
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=0)
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":  # reduce-scatter moves 1/W of the data of an all-reduce
            out = torch.empty((ctx.rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        grad = grad.clone()  # gloo has no reduce-scatter; never modify autograd's buffer in place
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable gather along dim 0 (equal sizes on every rank), in rank order.

    Backward sums, over ranks, the gradients that reach each rank's slice and hands every rank the
    gradient of its own slice. With DDP's gradient averaging this gives exactly the gradient of a
    loss computed over the global batch (KoLeo, batch centring), as one process with the whole batch.
    """
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor.contiguous())
