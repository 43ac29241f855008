"""WebDataset tar shards read by sample position: an index from the headers, then only the bytes asked for.

A shard is a tar file whose members ``<key>.<ext>`` are grouped into samples by ``<key>`` (the
WebDataset convention: the key is the path up to the first dot of the file name, the extension is
everything after it, consecutive members with one key form one sample): ``<key>.jpg``/``.png``/… holds
the encoded image and ``<key>.cls`` the integer label. :func:`scan_shard` walks the tar headers only
(each member's data is skipped by a seek), so a reader can jump to sample ``o`` of a shard, or count
the samples of a shard, without reading — let alone decoding — the samples before it.

A truncated shard (a copy cut short, a disk that filled up) keeps the samples that are complete;
the shard's manifest count tells how many were lost (see ``shardset.py``).
"""

from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO

from .decode import IMAGE_EXTENSIONS
from .errors import UnreadableItem


@dataclass
class ShardIndex:
    """Samples of one shard: ``keys[o]`` and ``members[o] = {ext: (offset, size)}`` in stored order."""

    path: str
    keys: list[str] = field(default_factory=list)
    members: list[dict[str, tuple[int, int]]] = field(default_factory=list)
    #: Why the shard ends early (``None`` when it ends with a proper tar end-of-archive).
    problem: str | None = None

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class RawSample:
    """One undecoded sample: its name (``shard.tar:key``), image bytes, label, or what is wrong with it."""

    name: str
    data: bytes | None
    label: int
    problem: UnreadableItem | None = None


#: ``dir/key.ext.more`` → (``dir/key``, ``ext.more``): WebDataset's key/extension split.
_KEY_EXT = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")


def _add(index: ShardIndex, name: str, offset: int, size: int) -> None:
    match = _KEY_EXT.match(name)
    if match is None or os.path.basename(match.group(1)).startswith("__"):
        return
    prefix, ext = match.group(1), match.group(2)
    if not index.keys or index.keys[-1] != prefix:
        index.keys.append(prefix)
        index.members.append({})
    index.members[-1][ext.lower()] = (offset, size)


def _drop_partial(index: ShardIndex, cut_member: str) -> None:
    """The sample a cut-off member belongs to is incomplete: leave it out (it counts as lost)."""
    match = _KEY_EXT.match(cut_member)
    if match is not None and index.keys and index.keys[-1] == match.group(1):
        index.keys.pop()
        index.members.pop()


def _octal(field: bytes) -> int:
    text = field.rstrip(b"\0 ").lstrip(b" ")
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """``{key: value}`` of a pax extended header (``"<len> <key>=<value>\\n"`` records)."""
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key] = value
        pos += length
    return out


def _scan_ustar(path: str, size: int) -> ShardIndex | None:
    """Fast path: ustar headers plus pax/GNU long-name records (what ``webdataset.TarWriter`` writes),
    read with one seek and one 512-byte read per header. ``None`` when the shard needs the general
    reader (global pax headers, base-256 sizes)."""
    index = ShardIndex(path)
    pending: dict[bytes, bytes] = {}  # pax/GNU overrides of the next member's name and size
    with open(path, "rb") as f:
        offset = 0
        while True:
            f.seek(offset)
            header = f.read(512)
            if len(header) < 512:
                if header.strip(b"\0") or offset < size:
                    index.problem = f"tar headers end early at byte {offset}"
                else:  # every tar writer ends with zero blocks: a file that stops at a header was cut
                    index.problem = f"the file ends at byte {size} without the tar end-of-archive blocks"
                return index
            if not header.strip(b"\0"):  # end-of-archive block
                return index
            if header[124] & 0x80:  # base-256 size: rare, leave it to tarfile
                return None
            try:
                member_size = _octal(header[124:136])
                checksum = _octal(header[148:156])
            except ValueError:
                index.problem = f"damaged tar header at byte {offset}"
                return index
            if checksum != sum(header[:148]) + 256 + sum(header[156:]):
                index.problem = f"damaged tar header at byte {offset}"
                return index
            kind = header[156:157]
            data = offset + 512
            if kind == b"g":
                return None
            if kind in (b"x", b"L", b"K"):
                f.seek(data)
                payload = f.read(member_size)
                if len(payload) != member_size:
                    index.problem = f"tar headers end early at byte {offset}"
                    return index
                try:
                    if kind == b"x":
                        pending.update(_pax_records(payload))
                    elif kind == b"L":
                        pending[b"path"] = payload.split(b"\0", 1)[0]
                except ValueError:
                    index.problem = f"damaged pax header at byte {offset}"
                    return index
            elif kind in (b"0", b"\0", b"7"):
                if b"size" in pending:
                    member_size = int(pending[b"size"])
                name = header[:100].split(b"\0", 1)[0]
                if header[257:262] == b"ustar" and header[345]:
                    name = header[345:500].split(b"\0", 1)[0] + b"/" + name
                name = pending.get(b"path", name).decode("utf-8", "surrogateescape")
                if data + member_size > size:  # header present, data cut off
                    index.problem = f"member {name} is cut off at byte {size}"
                    _drop_partial(index, name)
                    return index
                _add(index, name, data, member_size)
                pending = {}
            else:
                pending = {}
            offset = data + (member_size + 511) // 512 * 512


def _scan_tarfile(path: str, size: int) -> ShardIndex:
    """General path through :mod:`tarfile` (pax and GNU extensions)."""
    index = ShardIndex(path)
    try:
        tar = tarfile.open(path, "r:")
    except (OSError, tarfile.TarError, EOFError) as err:
        index.problem = f"not a readable tar file ({type(err).__name__}: {err})"
        return index
    with tar:
        while True:
            try:
                info = tar.next()
            except (OSError, tarfile.TarError, EOFError) as err:
                index.problem = f"tar headers end early ({type(err).__name__}: {err})"
                break
            if info is None:
                break
            if not info.isfile():
                continue
            if info.offset_data + info.size > size:  # header present, data cut off
                index.problem = f"member {info.name} is cut off at byte {size}"
                _drop_partial(index, info.name)
                break
            _add(index, info.name, info.offset_data, info.size)
    return index


def scan_shard(path: str) -> ShardIndex:
    """Index the samples of the tar file at ``path`` from its headers (no member data is read)."""
    try:
        size = os.path.getsize(path)
        fast = _scan_ustar(path, size)
    except OSError as err:
        return ShardIndex(path, problem=f"not readable ({type(err).__name__}: {err})")
    return fast if fast is not None else _scan_tarfile(path, size)


def _read(f: BinaryIO, where: tuple[int, int]) -> bytes:
    offset, size = where
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise EOFError(f"expected {size} bytes at offset {offset}, got {len(data)}")
    return data


def read_sample(f: BinaryIO, index: ShardIndex, o: int) -> RawSample:
    """Sample ``o`` of the shard open as ``f``: image bytes and label, or the reason it is unusable."""
    key = index.keys[o]
    members = index.members[o]
    name = f"{index.path}:{key}"
    try:
        label = -1
        if "cls" in members:
            raw = _read(f, members["cls"])
            try:
                label = int(raw.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                problem = UnreadableItem(f"{name}.cls", f"label {raw[:40]!r} is not an integer", "bad label")
                return RawSample(name, None, -1, problem)
        ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        if ext is None:
            problem = UnreadableItem(name, f"no image member (.{'/.'.join(IMAGE_EXTENSIONS)}); has {sorted(members)}")
            return RawSample(name, None, label, problem)
        return RawSample(f"{name}.{ext}", _read(f, members[ext]), label)
    except (OSError, EOFError) as err:
        return RawSample(name, None, -1, UnreadableItem(name, f"read failed: {err}"))


def lost_sample(path: str, o: int, promised: int, problem: str | None) -> RawSample:
    """Placeholder for sample ``o`` that the manifest promises (``promised`` samples) but the file lacks."""
    reason = f"sample {o} of {promised} promised by the manifest is missing: {problem or 'the shard ends early'}"
    return RawSample(f"{path}[{o}]", None, -1, UnreadableItem(f"{path}[{o}]", reason, "lost"))
