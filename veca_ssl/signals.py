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

A second stop signal always ends the process: the first one resets a default disposition so the
next terminates in the kernel, and a second one the main thread cannot handle (blocked in C code)
is killed by a watchdog process (``_StuckWatch``).
"""

from __future__ import annotations

import atexit
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
#: Seconds a second stop signal waits for the main thread to handle it before the process is killed.
STUCK_GRACE_S = 1.0


def _default_preemption_signals() -> tuple[int, ...]:
    # submitit uses USR2 by default, many clusters USR1/TERM; SIGINT is Ctrl-C (a second one still
    # interrupts at once, see _on_preemption_signal)
    names = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT")
    return tuple(int(getattr(signal, n)) for n in names if hasattr(signal, n))


def _on_preemption_signal(signum: int, frame: Any) -> None:
    if _WATCH["watch"] is not None:
        _WATCH["watch"].acknowledge()
    if not _PREEMPT["requested"]:
        _PREEMPT["requested"], _PREEMPT["signum"] = True, signum
        if _PREEMPT["previous"].get(signum, signal.SIG_DFL) in (signal.SIG_DFL, None):
            # The next one terminates in the kernel, without waiting for Python: a process stuck in C
            # code (a collective, a hung file system) runs no Python handler, and must still end.
            signal.signal(signum, signal.SIG_DFL)
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


# The watchdog process of _StuckWatch: counts the stop signals the parent received (its wakeup fd) and
# handled (acknowledged by its handler); kills the parent when a second one stays unhandled. Ends when
# the parent closes the pipes (uninstall) or exits.
_WATCHDOG = """
import os, select, signal, sys, time
wake, ack, parent, grace = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sigs = {int(s) for s in sys.argv[5].split(",")}
for s in sigs:
    signal.signal(s, signal.SIG_IGN)  # the group's stop signals are for the parent
arrived = handled = 0
deadline = None
while True:
    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
    for fd in select.select([wake, ack], [], [], wait)[0]:
        data = os.read(fd, 256)
        if not data:
            sys.exit(0)
        if fd == wake:
            arrived += sum(1 for b in data if b in sigs)
        else:
            handled += len(data)
    if arrived < 2 or handled >= arrived:
        deadline = None
    elif deadline is None:
        deadline = time.monotonic() + grace
    elif time.monotonic() >= deadline:
        os.write(2, b"second stop signal while the process is blocked: stopping it at once\\n")
        os.kill(parent, signal.SIGKILL)
        sys.exit(0)
"""


class _StuckWatch:
    """Ends the process on a second stop signal that its main thread cannot handle.

    Python runs signal handlers in the main thread, between bytecodes: a main thread blocked in C code
    (a collective waiting for a dead rank, a store or file system that hangs), often holding the GIL,
    handles no signal at all, so "send it again to stop at once" would do nothing. The C-level handler
    still writes each signal's number to the wakeup fd (``signal.set_wakeup_fd``), and the Python
    handler acknowledges each one it runs; a small watchdog process (no thread of this process could
    run while the GIL is held) kills this process when a second stop signal stays unacknowledged for
    ``STUCK_GRACE_S`` seconds.
    """

    def __init__(self, sigs: tuple[int, ...]) -> None:
        import subprocess
        import sys

        wake_r, self.wake_w = os.pipe()
        ack_r, self.ack_w = os.pipe()
        for fd in (self.wake_w, self.ack_w):
            os.set_blocking(fd, False)  # set_wakeup_fd requires it; a handler must never block
        self.previous_fd = signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        if self.previous_fd != -1:  # someone else's (an asyncio loop): leave it alone, no watchdog
            signal.set_wakeup_fd(self.previous_fd)
            self.process = None
        else:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(wake_r), str(ack_r), str(os.getpid()),
                 str(STUCK_GRACE_S), ",".join(map(str, sigs))], pass_fds=(wake_r, ack_r), stdin=subprocess.DEVNULL)
        os.close(wake_r)
        os.close(ack_r)

    def acknowledge(self) -> None:
        try:
            os.write(self.ack_w, b"x")
        except OSError:  # pipe full or closed: nothing to wait for
            pass

    def close_in_child(self) -> None:
        for fd in (self.wake_w, self.ack_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def stop(self) -> None:
        if self.process is not None:
            try:
                signal.set_wakeup_fd(-1)
            except ValueError:  # not the main thread
                pass
        self.close_in_child()
        if self.process is not None:
            try:
                self.process.wait(timeout=5)
            except Exception:
                self.process.kill()


_WATCH: dict[str, _StuckWatch | None] = {"watch": None}


def _forget_watch_in_child() -> None:
    # a forked child (a DataLoader worker) must neither write to the watchdog's pipes nor keep them open
    watch, _WATCH["watch"] = _WATCH["watch"], None
    if watch is not None:
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass
        watch.close_in_child()


os.register_at_fork(after_in_child=_forget_watch_in_child)


@atexit.register
def _end_watch() -> None:
    # the watchdog leaves when its pipes close; waiting for it here leaves no defunct process behind
    watch, _WATCH["watch"] = _WATCH["watch"], None
    if watch is not None:
        watch.stop()


def install_preemption_handler(signals: Sequence[int] | None = None) -> tuple[int, ...]:
    """Make ``signals`` (default SIGUSR1, SIGUSR2, SIGTERM, SIGINT) set the checkpoint flag instead of
    killing.

    Idempotent; the handlers found first are remembered (``previous_handler``) and receive any
    second signal. A second signal that the main thread cannot handle because it is blocked in C
    code kills the process (``_StuckWatch``), unless the process already has a wakeup fd (an asyncio
    loop). Only possible from the main thread: elsewhere it logs and installs nothing.
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
        if _WATCH["watch"] is None:
            _WATCH["watch"] = _StuckWatch(sigs)
    return sigs


def uninstall_preemption_handler() -> None:
    """Restore the handlers found by ``install_preemption_handler`` and clear the flag."""
    with _PREEMPT_LOCK:
        for sig, previous in _PREEMPT["previous"].items():
            if signal.getsignal(sig) is _on_preemption_signal:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        _PREEMPT["previous"] = {}
        watch, _WATCH["watch"] = _WATCH["watch"], None
        if watch is not None:
            watch.stop()
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
