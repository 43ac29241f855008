"""WebDataset tar shards read by sample position: an index from the headers, then only the bytes asked for.

A shard is a tar file whose members ``<key>.<ext>`` are grouped into samples by ``<key>`` (the
WebDataset convention, ``webdataset.tariterators.base_plus_ext``): ``<key>.jpg``/``.png``/… holds
the encoded image and ``<key>.cls`` the integer label. :func:`scan_shard` walks the tar headers only
(each member's data is skipped by a seek), so a reader can jump to sample ``o`` of a shard, or count
the samples of a shard, without reading — let alone decoding — the samples before it.

A truncated shard (a copy cut short, a disk that filled up) keeps the samples that are complete;
the shard's manifest count tells how many were lost (see ``shardset.py``).
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO

from webdataset.tariterators import base_plus_ext

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


def scan_shard(path: str) -> ShardIndex:
    """Index the samples of the tar file at ``path`` from its headers (no member data is read)."""
    index = ShardIndex(path)
    try:
        size = os.path.getsize(path)
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
                break
            prefix, ext = base_plus_ext(info.name)
            if prefix is None or os.path.basename(prefix).startswith("__"):
                continue
            if not index.keys or index.keys[-1] != prefix:
                index.keys.append(prefix)
                index.members.append({})
            index.members[-1][ext.lower()] = (info.offset_data, info.size)
    return index


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
