"""Preemption and stop signals: turn SIGUSR1/SIGUSR2/SIGTERM/SIGINT into a flag the loop polls.

``install_preemption_handler()`` installs the handlers; the loop polls ``checkpoint_requested()``
once per step -- this rank's flag, which travels to the other ranks with the step's losses
(``veca_ssl.train.readout``) -- saves a checkpoint and returns.
``launchers.slurm.TrainJob`` then lets submitit requeue the job, which resumes from the output dir.

Schedulers and terminals signal the whole process group: ``scancel``/time limits, ``timeout``,
Kubernetes and Ctrl-C reach DataLoader workers too. A worker killed by the signal takes the run
down before it can checkpoint, so workers ignore the stop signals (``ignore_in_worker`` as their
``worker_init_fn``) and the main process alone decides. Until a worker reaches its init function it
runs with the mask of the thread that started it: ``stop_signals_blocked()`` around the loader's
start keeps the signals blocked there (they stay pending for the parent, nothing is lost).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from veca_ssl import distributed as _dist

log = logging.getLogger(__name__)


_PREEMPT_LOCK = threading.Lock()
_PREEMPT: dict[str, Any] = {"requested": False, "signum": None, "previous": {}}


def _default_preemption_signals() -> tuple[int, ...]:
    # submitit uses USR2 by default, many clusters USR1/TERM; SIGINT is Ctrl-C (a second one still
    # interrupts at once, see _on_preemption_signal)
    names = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT")
    return tuple(int(getattr(signal, n)) for n in names if hasattr(signal, n))


def _on_preemption_signal(signum: int, frame: Any) -> None:
    if not _PREEMPT["requested"]:
        _PREEMPT["requested"], _PREEMPT["signum"] = True, signum
        log.warning("received %s: will checkpoint and stop after this step (send it again to stop at once)",
                    signal_name(signum))
        return
    # A second signal while a save is pending means "now": hand over to whoever was there before us
    # (submitit's checkpoint-and-requeue handler, or the default action that terminates).
    previous = _PREEMPT["previous"].get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def signal_name(signum: int | None) -> str:
    """``"SIGTERM"`` for 15; ``"a stop request"`` for None (set by another rank or programmatically)."""
    if signum is None:
        return "a stop request"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def install_preemption_handler(signals: Sequence[int] | None = None) -> tuple[int, ...]:
    """Make ``signals`` (default SIGUSR1, SIGUSR2, SIGTERM, SIGINT) set the checkpoint flag instead of
    killing.

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
    requested = bool(_dist.all_reduce(torch.tensor([int(local)], dtype=torch.int32), "max").item())
    if requested:
        _PREEMPT["requested"] = True
    return requested


def ignore_in_worker(worker_id: int = 0) -> None:
    """``worker_init_fn`` for DataLoader workers: ignore the stop signals, so a signal to the process
    group leaves the workers running while the main process finishes its step and checkpoints.

    Workers still end with their parent: the DataLoader shuts them down, and a worker whose parent
    died exits by itself (torch's watchdog).
    """
    sigs = _default_preemption_signals()
    for sig in sigs:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)  # blocked by stop_signals_blocked() in the parent


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block the stop signals in this thread while child processes are started (e.g. ``iter(loader)``
    forks the DataLoader workers): children inherit the mask, so a signal cannot kill a worker before
    ``ignore_in_worker`` runs. Signals that arrive meanwhile reach this process when the block ends
    (or at once through another of its threads)."""
    sigs = _default_preemption_signals()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
