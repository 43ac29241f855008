"""Atomic file writes that honour the umask, their leftovers, and sha256 checksum files.

Every file the project writes for others to read (checkpoints, exports, configs, reports, feature
shards) goes through ``atomic_path`` / ``atomic_open``: the data is written to a temporary file in
the target's directory (``.tmp-<name>-<random>``), flushed to disk, then renamed over the target,
and the directory is synced so the rename itself survives a crash. A reader, or a process killed at
any moment, sees either the old file or the new one, never a partial one.

The temporary file is created with mode 0o666 and the kernel applies the process umask, exactly as
``open(path, "w")`` would: files come out 0644 under the usual umask 022, so teammates on a shared
filesystem can read them (``tempfile.mkstemp`` makes 0600 files, which the rename would keep).

A writer killed between creating and renaming its temporary file leaves it behind;
``remove_orphans`` deletes such files, and must only run where no other writer is active (the
training run does it while holding its output-directory lock).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import stat
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

#: Prefix of every temporary file; ``remove_orphans`` deletes files that carry it.
TMP_PREFIX = ".tmp-"
#: Suffix of a checksum file, ``<name>.sha256`` beside ``<name>``, in ``sha256sum`` format.
CHECKSUM_SUFFIX = ".sha256"

__all__ = ["TMP_PREFIX", "CHECKSUM_SUFFIX", "CorruptFileError", "atomic_path", "atomic_open", "atomic_write_bytes",
           "atomic_write_text", "atomic_write_json", "remove_orphans", "sha256_file", "checksum_path",
           "verify_checksum", "verify_file", "is_disk_full"]


class CorruptFileError(OSError):
    """A file that cannot be trusted: empty, truncated, or contents that fail its checksum."""


def _create_temporary(target: Path) -> Path:
    """A new, empty file beside ``target``; O_EXCL so two writers never share one."""
    while True:
        # the target's name last, so writers that look at the suffix (.onnx, .pt) see the right one
        tmp = target.with_name(f"{TMP_PREFIX}{secrets.token_hex(4)}-{target.name}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # umask applies
            return tmp
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot sync a directory; the rename is still atomic
        if not directory or exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, checksum: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that takes a file name (``torch.save``,
    ``safetensors.save_file``); when the block ends without error the file is synced and renamed to
    ``path``, otherwise it is removed. The parent directory is created if needed.

    With ``checksum`` the file's sha256 is written to ``<path>.sha256`` (itself atomically) *before*
    the rename, so a file under its final name always has its checksum beside it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(path)
    mode = stat.S_IMODE(tmp.stat().st_mode)  # 0o666 less the umask
    try:
        yield tmp
        if stat.S_IMODE(tmp.stat().st_mode) != mode:  # a writer that recreated the file (safetensors: 0600)
            os.chmod(tmp, mode)
        _fsync_path(tmp)
        if checksum:
            atomic_write_text(checksum_path(path), f"{sha256_file(tmp)}  {path.name}\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent, directory=True)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """``open(path, mode)`` ("w" or "wb") that replaces ``path`` atomically when the block ends."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
        yield f


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2, **dumps_kwargs: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n")


def remove_orphans(directory: str | Path) -> list[Path]:
    """Delete the temporary files killed writers left in ``directory`` (not recursive); returns them.

    Only safe while no other process writes there (e.g. under the run's output-directory lock).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        if entry.name.startswith(TMP_PREFIX) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def verify_checksum(path: str | Path) -> bool:
    """True when ``<path>.sha256`` exists and matches; False when there is no checksum file.

    Raises ``CorruptFileError`` (naming the file) when the contents differ from the recorded digest.
    """
    path = Path(path)
    sidecar = checksum_path(path)
    try:
        recorded = sidecar.read_text().split()
    except FileNotFoundError:
        return False
    if not recorded or len(recorded[0]) != 64:
        raise CorruptFileError(f"{sidecar} is not a sha256 checksum file")
    actual = sha256_file(path)
    if actual != recorded[0].lower():
        size = path.stat().st_size
        raise CorruptFileError(f"contents ({size} bytes) do not match the sha256 in {sidecar.name}: "
                               "the file is corrupt or truncated")
    return True


def verify_file(path: str | Path) -> str:
    """Check ``path`` before loading it; returns how: ``"sha256"`` (against ``<path>.sha256``),
    ``"zip CRC-32"`` (a zip archive, e.g. any ``torch.save`` file, without a checksum file: each
    record's own CRC) or ``"unverified"`` (neither). Raises ``CorruptFileError`` saying what is wrong
    (``FileNotFoundError`` when it does not exist)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CorruptFileError("empty file (0 bytes): its write was cut short")
    if verify_checksum(path):
        return "sha256"
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic == b"PK":  # a zip whose central directory is gone
            raise CorruptFileError(f"truncated zip archive ({size} bytes)")
        return "unverified"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CorruptFileError(f"damaged zip archive ({exc})") from None
    if bad is not None:
        raise CorruptFileError(f"record {bad!r} fails its CRC-32 check: the file is corrupt")
    return "zip CRC-32"


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is "no space left" / "quota exceeded"."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def describe_os_error(exc: BaseException) -> str:
    """One line for an output path that cannot be created, naming the path and the way out; other
    errors (OS or not) keep their own message. (``[Errno 17] File exists: 'out'`` says neither what was
    wanted there nor what to do.)"""
    name = getattr(exc, "filename", None)
    if name is not None and isinstance(exc, FileExistsError | NotADirectoryError):
        return (f"cannot create {str(name)!r}: a file is in the way (a directory is needed there); remove it or "
                f"choose another output path")
    if name is not None and isinstance(exc, PermissionError):
        return f"cannot write {str(name)!r}: permission denied; choose a writable output path"
    return str(exc)
