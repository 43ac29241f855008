"""Run a function in N local CPU processes joined by a gloo group (``veca bench ddp`` and the tests)."""

from __future__ import annotations

import os
import pickle
import socket
from collections.abc import Callable
from typing import Any

import torch

from veca_ssl.distributed import cleanup, init_distributed


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
    # N processes share the machine's cores: each takes its share (veca train's policy; OMP_NUM_THREADS wins)
    from veca_ssl.threads import plan_threads

    torch.set_num_threads(plan_threads(0, 0).threads)
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
    """Run ``fn(*args)`` in ``world_size`` spawned CPU processes joined by a gloo group.

    ``fn`` must be picklable (a module-level function); inside it ``init_distributed()`` has already
    run, so ``get_rank()`` etc. work. Returns the per-rank return values in rank order; raises
    RuntimeError with the remote traceback if a rank fails (or dies without answering, e.g. killed),
    TimeoutError if one hangs.
    """
    import queue as queue_mod
    import time

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
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world_size:  # drain before join: a full pipe would block the children
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue_mod.Empty:
                # a rank that died without answering (a crash in C code, a kill) would otherwise cost
                # the whole timeout
                dead = [r for r, p in enumerate(procs) if r not in out and not p.is_alive() and p.exitcode]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} before "
                                       f"answering") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run_two_process: no answer from some rank within {timeout_s}s") from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    return [out[r] for r in range(world_size)]
