"""torch.distributed plumbing: initialisation, rank helpers, collectives, DDP/FSDP2 wrapping, preemption.

Everything here is a no-op (or identity) in single-process mode, so the training loop calls the same
functions on a laptop CPU, under ``torchrun`` and inside a SLURM job submitted through submitit.
Parallelisation is applied *outside* the model code (``wrap_ddp`` / ``apply_fsdp2``).

Elastic core budgets and DDP: a VECA backbone keeps its core bank as ONE parameter ``cores`` (M, D)
and a forward at budget C uses the slice ``cores[:C]``. Autograd then gives the whole parameter a
gradient whose rows >= C are exactly zero, so every parameter takes part in every backward and DDP
needs neither ``find_unused_parameters=True`` (an extra graph traversal per step) nor
``static_graph``. The training loop must pick the same budget on every rank (broadcast or a shared
seed), otherwise ranks would average gradients of different sub-networks.

Preemption: ``install_preemption_handler()`` turns SIGUSR1/SIGUSR2/SIGTERM into a flag; the loop polls
``checkpoint_requested()`` (synchronised across ranks) every step, saves a checkpoint and returns.
``launchers.slurm.TrainJob`` then lets submitit requeue the job, which resumes from the output dir.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import random
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

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
    "rank0_print",
    "setup_logging",
    "all_reduce_mean",
    "all_reduce_sum",
    "all_gather_tensor",
    "all_gather_with_grad",
    "broadcast_object",
    "wrap_ddp",
    "unwrap_model",
    "apply_fsdp2",
    "install_preemption_handler",
    "uninstall_preemption_handler",
    "request_checkpoint",
    "checkpoint_requested",
    "clear_checkpoint_request",
    "find_free_port",
    "run_two_process",
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
    ranks (the sampled core budget) or must not depend on the world size (per-sample augmentation)
    needs its own generator seeded from ``seed`` alone / the global sample index.
    """
    seed = int(seed) + (get_rank() if rank is None else int(rank))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def rank0_print(*args: Any, **kwargs: Any) -> None:
    if is_main_process():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


_LOG_TAG = "_veca_dist_handler"


def setup_logging(output_dir: str | Path | None, rank: int | None = None, name: str = "") -> logging.Logger:
    """Configure the ``name`` logger (root by default): INFO to stdout and ``<output_dir>/log.txt`` on
    rank 0, WARNING-and-above to stderr on the other ranks (so N ranks do not print N copies)."""
    rank = get_rank() if rank is None else rank
    logger = logging.getLogger(name)
    for h in [h for h in logger.handlers if getattr(h, _LOG_TAG, False)]:  # idempotent re-configuration
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = []
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
        if output_dir is not None:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(Path(output_dir) / "log.txt"))
        logger.setLevel(logging.INFO)
    else:
        handlers.append(logging.StreamHandler(sys.stderr))
        logger.setLevel(logging.WARNING)
    for h in handlers:
        h.setFormatter(fmt)
        setattr(h, _LOG_TAG, True)
        logger.addHandler(h)
    return logger


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


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Every rank returns ``src``'s (picklable) ``obj``; identity when single."""
    if not is_distributed():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ------------------------------------------------------------------------------------------- wrapping
def wrap_ddp(
    model: nn.Module,
    info: DistInfo,
    static_graph: bool = False,
    find_unused_parameters: bool = False,
    **ddp_kwargs: Any,
) -> nn.Module:
    """Move ``model`` to ``info.device`` and wrap it in DistributedDataParallel (unchanged when single).

    ``find_unused_parameters`` stays False for VECA: sliced core banks get zero gradient rows, not
    missing gradients (module docstring). Call backward once per step (sum the losses of several
    budgets first, or use ``model.no_sync()`` for all but the last backward).
    """
    model = model.to(info.device)
    if not info.is_distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(
        model,
        device_ids=device_ids,
        static_graph=static_graph,
        find_unused_parameters=find_unused_parameters,
        **ddp_kwargs,
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside a DDP wrapper (what to checkpoint, EMA from or export)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def apply_fsdp2(
    model: nn.Module,
    info: DistInfo,
    mp_policy: Any = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard ``model`` with FSDP2 (``torch.distributed.fsdp.fully_shard``): each of ``model.blocks``,
    then the root (patch embedding, core bank, norms). In place; returns ``model``.

    ``mp_policy=None`` means bf16 parameters/compute with fp32 gradient reduction on CUDA and full
    fp32 on CPU. Apply it alike to the EMA teacher so the EMA update runs shard-by-shard on local
    DTensor shards. Works on CPU with gloo (used by the tests). Unchanged when single-process.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(
            f"apply_fsdp2 needs model.blocks as an nn.ModuleList, got {type(blocks).__name__} "
            f"on {type(model).__name__}"
        )
    model = model.to(info.device)
    if not info.is_distributed:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mp_policy is None and info.device.type == "cuda":
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


# ----------------------------------------------------------------------------------------- preemption
_PREEMPT_LOCK = threading.Lock()
_PREEMPT: dict[str, Any] = {"requested": False, "signum": None, "previous": {}}


def _default_preemption_signals() -> tuple[int, ...]:
    names = ("SIGUSR1", "SIGUSR2", "SIGTERM")  # submitit uses USR2 by default, many clusters USR1/TERM
    return tuple(int(getattr(signal, n)) for n in names if hasattr(signal, n))


def _on_preemption_signal(signum: int, frame: Any) -> None:
    if not _PREEMPT["requested"]:
        _PREEMPT["requested"], _PREEMPT["signum"] = True, signum
        log.warning("received signal %d: will checkpoint and stop at the end of this step", signum)
        return
    # A second signal while a save is pending means "now": hand over to whoever was there before us
    # (submitit's checkpoint-and-requeue handler, or the default action that terminates).
    previous = _PREEMPT["previous"].get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def install_preemption_handler(signals: Sequence[int] | None = None) -> tuple[int, ...]:
    """Make ``signals`` (default SIGUSR1, SIGUSR2, SIGTERM) set the checkpoint flag instead of killing.

    Idempotent; the handlers found first are remembered (``previous_handler``) and receive any
    second signal. Only possible from the main thread: elsewhere it logs and installs nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        log.warning("install_preemption_handler called off the main thread: no handler installed")
        return ()
    sigs = tuple(signals) if signals is not None else _default_preemption_signals()
    with _PREEMPT_LOCK:
        for sig in sigs:
            current = signal.getsignal(sig)
            if current is not _on_preemption_signal:
                _PREEMPT["previous"][sig] = current
                signal.signal(sig, _on_preemption_signal)
    return sigs


def uninstall_preemption_handler() -> None:
    """Restore the handlers found by ``install_preemption_handler`` and clear the flag."""
    with _PREEMPT_LOCK:
        for sig, previous in _PREEMPT["previous"].items():
            if signal.getsignal(sig) is _on_preemption_signal:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        _PREEMPT["previous"] = {}
    clear_checkpoint_request()


def previous_handler(signum: int) -> Any:
    """The handler that was installed for ``signum`` before ``install_preemption_handler``."""
    return _PREEMPT["previous"].get(signum)


def request_checkpoint() -> None:
    """Ask the training loop to checkpoint and stop (what the signal handler does)."""
    _PREEMPT["requested"] = True


def clear_checkpoint_request() -> None:
    _PREEMPT["requested"], _PREEMPT["signum"] = False, None


def preemption_signal() -> int | None:
    """The signal that set the flag, None if it was set programmatically or not at all."""
    return _PREEMPT["signum"]


def checkpoint_requested(sync: bool = True) -> bool:
    """True when this rank (or, with ``sync``, ANY rank) was asked to checkpoint and stop.

    Poll it once per step, at the same point on every rank: with ``sync`` it is a collective (one
    tiny all-reduce) so all ranks stop after the same step even if the signal reached them at
    different moments. A positive answer also sets the local flag.
    """
    local = bool(_PREEMPT["requested"])
    if not (sync and is_distributed()):
        return local
    device = _INFO.device if _INFO is not None and dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([int(local)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        _PREEMPT["requested"] = True
    return bool(flag.item())


# ------------------------------------------------------------------------------------- test utilities
def find_free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (bind to port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawned_worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    import traceback

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)  # N processes share the machine's cores: avoid oversubscription
    try:
        init_distributed(device="cpu", backend="gloo", timeout_s=120)
        # plain pickle bytes: tensors sent as-is would live in this process's shared memory,
        # which disappears when it exits, possibly before the parent has read them
        queue.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # report every failure, including SystemExit, to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        cleanup()


def run_two_process(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout_s: float = 120.0) -> list:
    """TEST UTILITY: run ``fn(*args)`` in ``world_size`` spawned CPU processes joined by a gloo group.

    ``fn`` must be picklable (a module-level function); inside it ``init_distributed()`` has already
    run, so ``get_rank()`` etc. work. Returns the per-rank return values in rank order; raises
    RuntimeError with the remote traceback if a rank fails, TimeoutError if one hangs.
    """
    import queue as queue_mod

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    port = find_free_port()
    procs = [
        ctx.Process(target=_spawned_worker, args=(r, world_size, port, fn, args, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    try:
        for _ in range(world_size):  # drain before join: a full pipe would block the children
            rank, ok, value = results.get(timeout=timeout_s)
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = pickle.loads(value)
    except queue_mod.Empty as exc:
        raise TimeoutError(f"run_two_process: no answer from some rank within {timeout_s}s") from exc
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    return [out[r] for r in range(world_size)]
