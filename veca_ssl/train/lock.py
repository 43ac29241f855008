"""One run per output directory: an exclusive lock held for the whole run.

``RunLock(output_dir).acquire()`` takes ``fcntl.flock`` on ``<output_dir>/train.lock`` and writes
who holds it (pid, host, start time, command) into the file. The kernel drops the lock when its
holder exits, however it exits (SIGKILL, out-of-memory kill), so the lock of a dead run is simply
free: the file's old contents are then reported as a stale lock being taken over. Forked children
(DataLoader workers) close their copy of the lock file at fork, so a killed run's orphaned workers do
not keep its directory locked.

Some cluster filesystems refuse ``flock`` (e.g. Lustre mounted without ``-o flock``: ENOLCK,
EOPNOTSUPP, ENOSYS). There the file's existence is the lock: a holder on this host whose pid no longer
runs is stale and taken over; a holder on another host cannot be checked, and the message says which
file to delete once no run is active.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: only the pid-file lock is available
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "train.lock"
#: errno values meaning "this filesystem does not do flock", not "somebody holds it"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_HELD_FDS: set[int] = set()
_HELD_LOCKS: dict[Path, RunLock] = {}  # by resolved directory, for release_held()


def _close_in_child() -> None:
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLockedError(RuntimeError):
    """Another run holds the output directory."""


@dataclass
class Holder:
    """Who holds (or held) a run lock."""

    pid: int
    host: str
    since: str
    command: str

    @classmethod
    def me(cls) -> Holder:
        return cls(pid=os.getpid(), host=socket.gethostname(), since=time.strftime("%Y-%m-%d %H:%M:%S"),
                   command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "")

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            data = json.loads(text)
            return cls(pid=int(data["pid"]), host=str(data["host"]), since=str(data.get("since", "?")),
                       command=str(data.get("command", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, since {self.since}: {self.command}"

    def alive(self) -> bool | None:
        """Whether the process still runs; None when it is on another host (cannot tell)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process
            return True
        return True


class RunLock:
    """An exclusive lock on a run's output directory (see the module docstring)."""

    def __init__(self, directory: str | Path, use_flock: bool = True, wait_for_dead_s: float = 15.0) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.use_flock = use_flock and fcntl is not None
        self.wait_for_dead_s = wait_for_dead_s
        self._fd: int | None = None
        self._pid_file = False

    @property
    def held(self) -> bool:
        return self._fd is not None or self._pid_file

    def acquire(self) -> Holder | None:
        """Take the lock or raise ``RunLockedError`` naming the holder. Returns the holder of a stale
        lock that was taken over (a run that died without releasing it), else None."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.use_flock:
            try:
                return self._acquire_flock()
            except OSError as exc:
                if exc.errno not in _NO_FLOCK:
                    raise
        return self._acquire_pid_file()

    def _acquire_flock(self) -> Holder | None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        deadline = time.monotonic() + self.wait_for_dead_s
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = Holder.parse(self._read(fd))
                    # a holder that just died may leave children (exiting any moment) sharing the lock
                    if holder is not None and holder.alive() is False and time.monotonic() < deadline:
                        time.sleep(0.2)
                        continue
                    raise self._locked(holder) from None
            previous = Holder.parse(self._read(fd))
            data = json.dumps(asdict(Holder.me())).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _HELD_FDS.add(fd)
        _HELD_LOCKS[self.directory.resolve()] = self
        return previous

    def _acquire_pid_file(self) -> Holder | None:
        previous = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder = Holder.parse(self.path.read_text() if self.path.exists() else "")
                if holder is not None and holder.alive() is False:
                    previous = holder
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._locked(holder, f" This filesystem does not support flock, so the lock is the file "
                                           f"itself: if no run is active, delete {self.path}.") from None
            try:
                os.write(fd, json.dumps(asdict(Holder.me())).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            self._pid_file = True
            _HELD_LOCKS[self.directory.resolve()] = self
            return previous
        raise self._locked(None)

    def _locked(self, holder: Holder | None, extra: str = "") -> RunLockedError:
        who = holder.describe() if holder is not None else "holder unknown"
        return RunLockedError(f"output_dir {self.directory} is in use by another `veca train` ({who}). One run per "
                              f"directory: wait for it to end, stop it (SIGTERM checkpoints and exits), or choose "
                              f"another output_dir.{extra}")

    @staticmethod
    def _read(fd: int) -> str:
        return os.pread(fd, 4096, 0).decode(errors="replace")

    def release(self) -> None:
        """Give the lock back; its file is emptied so nobody mistakes it for a stale lock."""
        if _HELD_LOCKS.get(self.directory.resolve()) is self:
            del _HELD_LOCKS[self.directory.resolve()]
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _HELD_FDS.discard(fd)
            try:
                os.ftruncate(fd, 0)
            except OSError:  # e.g. a full disk: the lock itself is still released below
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        if self._pid_file:
            self._pid_file = False
            self.path.unlink(missing_ok=True)

    @staticmethod
    def release_held(directory: str | Path) -> None:
        """Release the lock this process holds on ``directory``, if any (cleanup after an error)."""
        held = _HELD_LOCKS.get(Path(directory).resolve())
        if held is not None:
            held.release()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
