"""A spy on every torch.distributed collective, loaded into the ranks of a 2-process CLI run as their
``sitecustomize`` (tests/test_collective_devices.py copies this file into a directory put first on
PYTHONPATH; Python imports it at start-up). Nothing of it lives in the product.

Each collective called from the project's code (not from inside torch: DDP, FSDP2 and DCP place their
own tensors) records the device of every tensor it is handed and fails the rank at once -- a message
naming the call site on stderr, exit status 97 -- when one is not on the device the helpers of
``veca_ssl.distributed`` were told the backend serves:

* ``VECA_SPY_DEVICE=own``: the process's own device, the CPU. Tensors must be on it, and
  ``communication_device()`` must say so.
* ``VECA_SPY_DEVICE=fakeacc``: a different, fake accelerator, ``fakeacc:0``. Gloo still moves the
  bytes, so the tensors stay CPU tensors; "on fakeacc:0" means placed there by the helpers, i.e.
  returned by ``veca_ssl.distributed._to_comm`` / ``_comm_empty`` (registered here). A CPU tensor that
  reaches a collective any other way -- a flag built on the CPU and all-reduced as it is -- is exactly
  what NCCL refuses on a GPU machine ("No backend type associated with device type cpu"), and fails.
  ``communication_device()`` answers ``meta`` so that code allocating on it directly fails too, and
  every helper's result must come back through ``_from_comm`` (the caller's device), never a
  communication buffer.

Object collectives (pickled values) carry no tensor of the caller: torch sends them over the group's
CPU side channel; they are recorded, not device-checked. Every call is appended to
``$VECA_SPY_LOG.rank<R>.jsonl``. ``VECA_SPY_STOP_RANK=R`` + ``VECA_SPY_STOP_AT=N``: rank R sends itself
SIGUSR1 when the training loop polls the stop flag for the N-th time (a signal that reaches one rank).
"""

from __future__ import annotations

import json
import os
import sys

TENSOR_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
                      "reduce_scatter_tensor", "gather", "scatter", "all_to_all", "all_to_all_single", "send", "recv",
                      "isend", "irecv")
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list", "barrier",
                      "monitored_barrier")
FAKE = "fakeacc:0"
EXIT = 97


def _install() -> None:
    import signal
    import weakref

    import torch
    import torch.distributed as dist

    mode = os.environ.get("VECA_SPY_DEVICE", "own")
    rank = os.environ.get("RANK", "?")
    log_path = f"{os.environ['VECA_SPY_LOG']}.rank{rank}.jsonl"
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    here = os.path.abspath(__file__)
    placed_refs: dict[int, weakref.ref] = {}  # tensors the helpers put on the fake accelerator, by id

    def place(t) -> None:
        placed_refs[id(t)] = weakref.ref(t)

    def is_placed(t) -> bool:
        ref = placed_refs.get(id(t))
        return ref is not None and ref() is t

    def write(entry: dict) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def frames() -> list[tuple[str, int, str]]:
        """(file, line, function) of the callers, innermost first, without torch's and the spy's frames."""
        out, frame = [], sys._getframe(2)
        while frame is not None:
            path = frame.f_code.co_filename
            if not path.startswith(torch_dir) and os.path.abspath(path) != here:
                out.append((path, frame.f_lineno, frame.f_code.co_name))
            frame = frame.f_back
        return out

    def short(entry: tuple[str, int, str]) -> str:
        path, line, fn = entry
        for root in sys.path:
            if root and path.startswith(os.path.join(os.path.abspath(root), "")):
                path = os.path.relpath(path, root)
                break
        return f"{path}:{line} in {fn}"

    def fail(message: str) -> None:
        write({"violation": message})
        sys.stderr.write(f"collective spy (rank {rank}): {message}\n")
        sys.stderr.flush()
        os._exit(EXIT)

    def declared() -> str:
        if mode == "fakeacc":
            return FAKE
        return "cpu"

    def tensors_of(args: tuple, kwargs: dict) -> list:
        found = []
        for value in [*args, *kwargs.values()]:
            if torch.is_tensor(value):
                found.append(value)
            elif isinstance(value, (list, tuple)):
                found += [v for v in value if torch.is_tensor(v)]
        return found

    def on_declared(t) -> bool:
        if mode == "fakeacc":
            return is_placed(t)
        return t.device.type == "cpu"

    def wrap(name: str, fn):
        def spy(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(torch_dir):  # DDP, FSDP2, DCP and object collectives' own traffic
                return fn(*args, **kwargs)
            stack = frames()
            via = short(stack[0]) if stack else "?"
            site = next((short(f) for f in stack if not f[0].endswith(os.path.join("veca_ssl", "distributed.py"))),
                        via)
            ts = tensors_of(args, kwargs)
            entry = {"fn": name, "site": site, "via": via, "devices": [str(t.device) for t in ts],
                     "placed": [on_declared(t) for t in ts], "declared": declared()}
            write(entry)
            if name in TENSOR_COLLECTIVES:
                if mode == "own":
                    import veca_ssl.distributed as vd

                    told = str(vd.communication_device()) if hasattr(vd, "communication_device") else "cpu"
                    if told != "cpu":
                        fail(f"torch.distributed.{name} at {site} (via {via}): the helpers were told the backend "
                             f"serves {told}, the process's device is cpu")
                for i, t in enumerate(ts):
                    if not on_declared(t):
                        fail(f"torch.distributed.{name} at {site} (via {via}): tensor {i} ({tuple(t.shape)}, "
                             f"{t.dtype}) is on {t.device}, not placed on the communication device the backend "
                             f"serves ({declared()})")
            return fn(*args, **kwargs)
        spy.__wrapped__ = fn
        return spy

    for name in (*TENSOR_COLLECTIVES, *OBJECT_COLLECTIVES):
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))

    import veca_ssl.distributed as vd

    if mode == "fakeacc":
        def to_comm(t):
            moved = t.detach().clone(memory_format=torch.contiguous_format)
            place(moved)
            return moved

        def comm_empty(shape, dtype):
            buf = torch.empty(tuple(shape), dtype=dtype)
            place(buf)
            return buf

        def from_comm(t, device):
            return t.detach().to(device).clone()  # a tensor "copied back" from the accelerator

        def communication_device():
            return torch.device("meta")  # anything allocated on it directly cannot be communicated

        for name, fn in (("_to_comm", to_comm), ("_comm_empty", comm_empty), ("_from_comm", from_comm),
                         ("communication_device", communication_device)):
            if hasattr(vd, name):  # (an older distributed.py has none of them: nothing is placed)
                setattr(vd, name, fn)

        def check_result(helper: str, fn):
            def checked(*args, **kwargs):
                result = fn(*args, **kwargs)
                if torch.is_tensor(result) and is_placed(result):
                    site = short(frames()[0]) if frames() else "?"
                    fail(f"veca_ssl.distributed.{helper} at {site} handed back a communication buffer "
                         f"({FAKE}) instead of a tensor on the caller's device")
                return result
            return checked

        for helper in ("all_reduce", "all_reduce_", "all_reduce_sum", "all_reduce_mean", "all_gather_tensor",
                       "all_gather_with_grad"):
            if hasattr(vd, helper):
                setattr(vd, helper, check_result(helper, getattr(vd, helper)))

    stop_rank, stop_at = os.environ.get("VECA_SPY_STOP_RANK"), int(os.environ.get("VECA_SPY_STOP_AT", "0"))
    if stop_rank == rank and stop_at:
        import veca_ssl.signals as signals

        polls = {"n": 0}
        original = signals.checkpoint_requested

        def checkpoint_requested(*args, **kwargs):
            polls["n"] += 1
            if polls["n"] == stop_at:
                os.kill(os.getpid(), signal.SIGUSR1)
            return original(*args, **kwargs)

        signals.checkpoint_requested = checkpoint_requested


if os.environ.get("VECA_SPY_LOG") and "RANK" in os.environ:
    _install()
