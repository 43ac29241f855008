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
