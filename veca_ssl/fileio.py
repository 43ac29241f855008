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
import pickletools
import re
import secrets
import shutil
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
           "verify_checksum", "verify_file", "is_disk_full", "is_plain_pickle", "os_error_in", "write_failure",
           "WriteError", "writing", "describe_os_error"]


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


def os_error_in(exc: BaseException | None) -> OSError | None:
    """The operating-system error behind ``exc``: ``exc`` itself, one in its cause/context chain, or, for
    writers that report it only in text (safetensors' Rust core: ``"... (os error 28)"``), one rebuilt
    from its errno. None when there is none (a bug, not the file system)."""
    seen: set[int] = set()
    texts: list[str] = []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        texts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    for text in texts:
        found = re.search(r"\(os error (\d+)\)|Os \{ code: (\d+)", text)
        if found:
            code = int(found.group(1) or found.group(2))
            return OSError(code, os.strerror(code))
    return None


#: How torch.save's legacy (pre-zip) format begins: pickle protocol 2, then its magic number.
_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def is_plain_pickle(path: str | Path) -> bool:
    """Whether ``path`` is a bare Python pickle (``pickle.dump``; protocol 2 or later), not a
    ``torch.save`` file (a zip archive, or the legacy format that starts with torch's magic number).
    Such a file can only be read by unpickling arbitrary objects, which veca-ssl never does."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    if not (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head.startswith(_TORCH_LEGACY_MAGIC):
        return False
    # random bytes may start like a pickle too: its first opcodes must also disassemble (pickletools reads
    # opcodes and their arguments only; nothing is constructed or imported)
    ops = 0
    try:
        for opcode, _, _ in pickletools.genops(head):
            ops += 1
            if opcode.name == "STOP" or ops >= 16:
                return True
    except Exception:  # a broken opcode, or the head ends inside one
        return ops >= 16
    return False


PLAIN_PICKLE = ("a plain Python pickle (pickle.dump), not a torch.save checkpoint: loading it means unpickling "
                "arbitrary objects, which veca-ssl never does. Save its tensors with torch.save (a dict of "
                "tensors and plain values) or safetensors, and give that file")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is "no space left" / "quota exceeded"."""
    error = os_error_in(exc)
    return error is not None and error.errno in (errno.ENOSPC, errno.EDQUOT)


def _free_space(directory: Path) -> str:
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        usage = shutil.disk_usage(directory)
    except OSError:
        return "free space unknown"
    return f"{human_bytes(usage.free)} of {human_bytes(usage.total)} free now"


def human_bytes(n: float) -> str:
    """``"512 KiB"``, ``"98 MiB"``, ``"1.4 GiB"``."""
    if n < 10 * 2**20:
        return f"{n / 2**10:.0f} KiB"
    if n < 10 * 2**30:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / 2**30:.1f} GiB"


def write_failure(exc: BaseException, path: str | Path) -> tuple[str, str]:
    """Why writing ``path`` failed, in words, and what to do: ``(cause, remedy)``.

    The cause names the directory and the real reason (``no space left on DIR (0 KiB of 2 MiB free
    now)``, ``DIR is on a read-only file system``, ``permission denied: cannot create files in DIR``
    or ``cannot write FILE`` for an existing file, ``disk quota exceeded on DIR``), whatever the
    writer wrapped it in (torch's ``inline_container.cc`` text, safetensors' ``SafetensorError``).
    The remedy is an imperative to put before "and rerun". Errors that do not come from the file
    system keep their first line."""
    directory = Path(path).parent
    error = os_error_in(exc)
    code = error.errno if error is not None else None
    if code == errno.ENOSPC:
        return f"no space left on {directory} ({_free_space(directory)})", "free space"
    if code == errno.EDQUOT:
        return f"disk quota exceeded on {directory}", "free space within your quota"
    if code == errno.EROFS:
        return f"{directory} is on a read-only file system", "remount it read-write (or move the directory)"
    if code in (errno.EACCES, errno.EPERM):
        # the file when it exists and is what refused; the directory when a new file could not be made in it
        name = Path(path) if Path(path).exists() and not Path(path).is_dir() else None
        where = f"cannot write {name}" if name is not None else f"cannot create files in {directory}"
        return f"permission denied: {where}", "make it writable"
    if error is not None:
        return f"{error.strerror or error} ({directory})", "check that file system"
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__), "fix that"


class WriteError(OSError):
    """A file of a run that could not be written; the message names it, the cause and the way out."""


@contextmanager
def writing(path: str | Path, what: str, after: str = "rerun the same command") -> Iterator[None]:
    """Turn a failed write of ``path`` (an OSError, or a writer's wrapper of one) into a
    :class:`WriteError`: ``cannot write <what> <path>: <cause>. <remedy> and <after>``."""
    try:
        yield
    except WriteError:
        raise
    except Exception as exc:
        if os_error_in(exc) is None:
            raise
        cause, remedy = write_failure(exc, path)
        raise WriteError(f"cannot write {what} {path}: {cause}. {remedy[0].upper()}{remedy[1:]} and {after}") from exc


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
