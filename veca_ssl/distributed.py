"""torch.distributed process groups, rank helpers and collectives.

Everything here is a no-op (or identity) in single-process mode, so the training loop calls the same
functions on a laptop CPU, under ``torchrun`` and inside a SLURM job submitted through submitit.
Wrapping models for data/model parallelism lives in ``veca_ssl.parallelize``; stop signals in
``veca_ssl.signals``.

This is the one module that calls ``torch.distributed`` collectives; the rest of the code base calls
the helpers at the end of this file (``all_reduce``, ``all_reduce_``, ``all_gather_tensor``,
``all_gather_with_grad``, ``all_gather_object``, ``broadcast_object``, ``barrier``). A helper moves
the tensor it sends onto the *communication device* (``communication_device()``: the device the
group's backend serves for tensors -- the rank's GPU under NCCL, the CPU under gloo) and hands the
result back on the caller's device, so no caller can give a CPU tensor to NCCL.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import re
from collections.abc import Sequence
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
    "communication_device",
    "all_reduce",
    "all_reduce_",
    "all_reduce_mean",
    "all_reduce_sum",
    "all_gather_tensor",
    "all_gather_with_grad",
    "all_gather_object",
    "broadcast_object",
]


@dataclass
class DistInfo:
    """Where this process sits in the job. ``backend`` is None in single-process mode, else what the
    process group was initialised with (e.g. ``"cuda:nccl,cpu:gloo"``, ``"gloo"``)."""

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

#: The process group of a CUDA job: NCCL for tensors on the GPUs, gloo for objects and CPU tensors
#: (``init_process_group``'s per-device form, ``"<device>:<backend>,…"``, available since torch 2.0).
CUDA_BACKEND = "cuda:nccl,cpu:gloo"


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
    contradicts it (then the group is rebuilt on that device). Backends, unless ``backend`` says
    otherwise: ``cuda:nccl,cpu:gloo`` on CUDA (tensors over NCCL on the GPU, plus a gloo side channel
    so that pickled objects and CPU tensors never meet a backend without a CPU implementation),
    ``gloo`` on CPU. ``torch.cuda.set_device(local_rank)`` before the process group is created so
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
    backend = backend or (CUDA_BACKEND if dev.type == "cuda" else "gloo")
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
    """Wait until every rank got here; nothing when single."""
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
# The only module that calls torch.distributed collectives (tests/test_layering.py enforces it).
# Every tensor helper puts what it sends on the communication device (``communication_device``) and
# hands its result back on the caller's device, so a caller never has to know which device the
# group's backend serves: a flag built on the CPU in a CUDA job goes through NCCL on the GPU, as
# the same code goes through gloo in a CPU job. Object helpers (pickled Python values) go through
# whatever torch picks for objects: the CPU side channel of a ``cuda:nccl,cpu:gloo`` group.
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _served_devices() -> dict[str, str]:
    """Device type -> backend of the default process group (``{"cuda": "nccl", "cpu": "gloo"}``)."""
    config = dist.get_backend_config()  # "cuda:nccl,cpu:gloo"; a plain "gloo" reads "cpu:gloo,cuda:gloo"
    pairs = (item.split(":", 1) for item in config.split(",") if ":" in item)
    return {device.strip(): backend.strip() for device, backend in pairs}


def communication_device() -> torch.device:
    """The device of every tensor the helpers below hand to a collective.

    Defined as: the process's own device (``DistInfo.device``: its GPU in a CUDA job, the CPU in a
    CPU job) when the group has a backend for that device type, else the CPU when the group has a
    CPU backend. A CUDA job's ``cuda:nccl,cpu:gloo`` group therefore communicates tensors over
    NCCL on the rank's GPU (the fast path; its CPU side channel carries objects), a CPU job over
    gloo on the CPU. Single process: the process's device (the helpers send nothing). Raises
    RuntimeError when the group serves neither (e.g. a plain ``nccl`` group in a CPU process).
    """
    if _INFO is not None:
        own = _INFO.device
    elif torch.cuda.is_available() and is_distributed() and "cuda" in _served_devices():
        own = torch.device("cuda", torch.cuda.current_device())
    else:
        own = torch.device("cpu")
    if not is_distributed():
        return own
    served = _served_devices()
    if own.type in served:
        return own
    if "cpu" in served:
        return torch.device("cpu")
    raise RuntimeError(f"the process group ({dist.get_backend_config()}) serves neither this process's device "
                       f"({own}) nor the CPU; initialise it with veca_ssl.distributed.init_distributed")


def _to_comm(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a contiguous tensor on the communication device (itself when it already is one)."""
    return tensor.to(communication_device()).contiguous()


def _comm_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised buffer on the communication device (what a collective writes into)."""
    return torch.empty(tuple(shape), dtype=dtype, device=communication_device())


def _from_comm(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A collective's result handed back on the caller's ``device``."""
    return tensor.to(device)


def _reduce_op(op: str) -> Any:
    if op not in _OPS:
        raise ValueError(f"unknown reduction {op!r}; valid: {', '.join(_OPS)}")
    return _OPS[op]


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``op`` (``"sum" | "max" | "min"``) over ranks, as a new tensor on ``tensor``'s device (the input
    is left untouched); identity when single."""
    if not is_distributed():
        return tensor
    src = tensor.detach()
    buf = _to_comm(src)
    if buf is src:  # already on the communication device: never reduce the caller's tensor in place
        buf = buf.clone()
    dist.all_reduce(buf, op=_reduce_op(op))
    return _from_comm(buf, tensor.device)


@torch.no_grad()
def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place: ``tensor`` becomes the ``op`` over ranks (loss buffers, statistics); returns it."""
    if not is_distributed():
        return tensor
    buf = _to_comm(tensor)
    dist.all_reduce(buf, op=_reduce_op(op))
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, returned as a new tensor (the input is left untouched); identity when single."""
    return all_reduce(tensor, "sum")


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (floating tensors), returned as a new tensor; identity when single."""
    if not is_distributed():
        return tensor
    if not tensor.is_floating_point():
        raise ValueError(f"all_reduce_mean needs a floating tensor, got {tensor.dtype}; use all_reduce_sum")
    return all_reduce(tensor, "sum") / get_world_size()


@torch.no_grad()
def all_gather_tensor(tensor: torch.Tensor, uneven: bool = False) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order (no gradient), on ``tensor``'s device.

    ``uneven=True`` allows different dim-0 sizes per rank (e.g. the last shard of an eval set) at
    the cost of one extra small collective.
    """
    if not is_distributed():
        return tensor
    world = get_world_size()
    local = _to_comm(tensor)
    if not uneven:
        parts = [_comm_empty(local.shape, local.dtype) for _ in range(world)]
        dist.all_gather(parts, local)
        return _from_comm(torch.cat(parts, dim=0), tensor.device)
    size = _to_comm(torch.tensor([local.shape[0]], dtype=torch.long))
    sizes = [_comm_empty(size.shape, size.dtype) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = torch.cat(sizes).tolist()  # one host read: the buffers' shapes depend on it
    padded = _comm_empty((max(counts), *local.shape[1:]), local.dtype)
    padded[: local.shape[0]] = local
    parts = [_comm_empty(padded.shape, padded.dtype) for _ in range(world)]
    dist.all_gather(parts, padded)
    return _from_comm(torch.cat([p[:n] for p, n in zip(parts, counts)], dim=0), tensor.device)


def _reduce_scatter_available() -> bool:
    """gloo has no reduce-scatter; NCCL (and the other accelerator backends) do."""
    return _served_devices().get(communication_device().type) not in (None, "gloo")


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        local = _to_comm(tensor)
        parts = [_comm_empty(local.shape, local.dtype) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        ctx.rank, ctx.rows, ctx.device = dist.get_rank(), tensor.shape[0], tensor.device
        return _from_comm(torch.cat(parts, dim=0), tensor.device)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        if _reduce_scatter_available():  # reduce-scatter moves 1/W of the data of an all-reduce
            full = _to_comm(grad)
            out = _comm_empty((ctx.rows, *grad.shape[1:]), grad.dtype)
            dist.reduce_scatter_tensor(out, full, op=dist.ReduceOp.SUM)
            return _from_comm(out, ctx.device)
        summed = all_reduce(grad, "sum")  # a new tensor: autograd's buffer is never modified in place
        return summed[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable gather along dim 0 (equal sizes on every rank), in rank order.

    Backward sums, over ranks, the gradients that reach each rank's slice and hands every rank the
    gradient of its own slice. With DDP's gradient averaging this gives exactly the gradient of a
    loss computed over the global batch (KoLeo, batch centring), as one process with the whole batch.
    """
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor.contiguous())


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order; ``[obj]`` when single."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (the others pass anything, e.g. None)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
