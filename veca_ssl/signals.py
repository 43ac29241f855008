"""Preemption and stop signals: turn SIGUSR1/SIGUSR2/SIGTERM into a flag the training loop polls.

``install_preemption_handler()`` installs the handlers; the loop polls ``checkpoint_requested()``
(synchronised across ranks) once per step, saves a checkpoint and returns.
``launchers.slurm.TrainJob`` then lets submitit requeue the job, which resumes from the output dir.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from veca_ssl import distributed as _dist

log = logging.getLogger(__name__)


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
    if not (sync and _dist.is_distributed()):
        return local
    device = _dist._INFO.device if _dist._INFO is not None and dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([int(local)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        _PREEMPT["requested"] = True
    return bool(flag.item())
