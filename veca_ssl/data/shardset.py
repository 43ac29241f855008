"""The shard files a ``wds:`` spec names, with the number of samples each one holds.

Counts come from the ``manifest.json`` that ``veca data make-shards`` writes next to the shards (one
entry per shard: name, sample count, byte size) — so a resumed run can skip whole shards by count
without opening them. A shard the manifest does not describe is counted from its tar headers
instead (``tario.scan_shard``; a warning says so).

A shard whose byte size differs from the manifest's (truncated by a copy cut short or a full disk,
unreadable, or replaced) keeps the manifest's count when it holds fewer samples: the missing samples
are then reported one by one as ``lost`` skips (training counts them against
``data.max_skip_fraction``; extraction lists them and every later row keeps its global index), so
every lost sample counts. A warning names the shard.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from typing import Any

from webdataset.shardlists import expand_urls

from .errors import DataError
from .tario import ShardIndex, scan_shard

MANIFEST_NAME = "manifest.json"
#: Written by ``make-shards`` while it swaps a new shard set in; readers refuse a half-swapped set.
COMMIT_JOURNAL = ".make-shards-commit.json"
logger = logging.getLogger("veca_ssl.data")


def expand_shards(pattern: str) -> list[str]:
    """Expand a brace pattern (``shard-{000000..000009}.tar``) and check that every shard exists."""
    urls = list(expand_urls(pattern))
    if not urls:
        raise ValueError(f"wds pattern {pattern!r} names no shard")
    remote = [u for u in urls if "://" in u or u.startswith("pipe:")]
    if remote:
        raise ValueError(
            f"wds: {remote[0]!r} is not a local file; shards are read by position from local or mounted "
            "file systems (copy or mount them, e.g. with a network file system)"
        )
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(
            f"wds: {len(missing)} of {len(urls)} shards do not exist, first {missing[0]!r} "
            f"(pattern {pattern!r}; `veca data make-shards` prints the pattern to use)"
        )
    return urls


def read_manifest(directory: str) -> dict[str, Any] | None:
    """The shard manifest in ``directory`` (``None`` when there is none); refuses a half-swapped set."""
    if os.path.exists(os.path.join(directory, COMMIT_JOURNAL)):
        raise DataError(
            f"wds: the shards in {directory} are being replaced by an interrupted `veca data make-shards` "
            f"({COMMIT_JOURNAL} is present); rerun the same make-shards command to finish it"
        )
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        logger.warning("wds: ignoring unreadable %s (%s); counting samples from the tar headers", path, err)
        return None
    return meta if isinstance(meta, dict) else None


class ShardSet:
    """Shard paths + per-shard sample counts (manifest first, tar headers otherwise).

    Args:
        urls: shard paths (see :func:`expand_shards`).
        cache: how many shard indices (member offsets) to keep in memory per process.
    """

    def __init__(self, urls: list[str], cache: int = 4) -> None:
        if not urls:
            raise ValueError("wds: empty shard list")
        self.urls = list(urls)
        self.classes: list[str] | None = None
        self._counts: list[int | None] = [None] * len(self.urls)
        self._cache: OrderedDict[int, ShardIndex] = OrderedDict()
        self._cache_size = max(1, int(cache))
        self._warned = False
        self._unlisted: list[int] = []  # shards in a directory whose manifest does not list them
        self._manifests: dict[str, bool] = {}  # directory -> has a readable manifest
        by_dir: dict[str, list[int]] = {}
        for i, u in enumerate(self.urls):
            by_dir.setdefault(os.path.dirname(os.path.abspath(u)), []).append(i)
        for directory, members in by_dir.items():
            meta = read_manifest(directory)
            self._manifests[directory] = meta is not None
            if meta is None:
                continue
            self.classes = self.classes or meta.get("classes")
            listed = {str(e.get("name")): e for e in meta.get("shards", []) if isinstance(e, dict)}
            for i in members:
                entry = listed.get(os.path.basename(self.urls[i]))
                if entry is None:
                    self._unlisted.append(i)
                    continue
                self._counts[i] = int(entry["count"])
                size = os.path.getsize(self.urls[i])
                if int(entry.get("bytes", -1)) != size:
                    # truncated (a copy cut short, a full disk) or replaced: every sample the manifest
                    # promises keeps its position, and those the file lacks are counted as lost; a file
                    # holding more samples than promised is counted from its headers
                    found = len(self.index(i))
                    self._counts[i] = max(self._counts[i], found)
                    logger.warning("wds: shard %s has %d bytes but %s lists %s; it holds %d of the %d samples "
                                   "listed%s", self.urls[i], size, os.path.join(directory, MANIFEST_NAME),
                                   entry.get("bytes"), found, int(entry["count"]),
                                   "; the missing ones count as lost" if found < int(entry["count"]) else "")

    def __len__(self) -> int:
        return len(self.urls)

    @property
    def fully_counted(self) -> bool:
        """Whether every count is known without reading shards (a manifest describes them all)."""
        return all(c is not None for c in self._counts)

    def why_not_counted(self) -> str | None:
        """Why some counts are unknown (no manifest, or one that does not list a shard); None when all are."""
        missing = [d for d, found in self._manifests.items() if not found]
        if missing:
            return f"{missing[0]} has no readable {MANIFEST_NAME}"
        if self._unlisted:
            first = self.urls[self._unlisted[0]]
            return (f"the {MANIFEST_NAME} in {os.path.dirname(os.path.abspath(first))} does not list "
                    f"{len(self._unlisted)} of the shards (e.g. {os.path.basename(first)})")
        return None

    def count(self, i: int) -> int:
        """Samples in shard ``i`` (the manifest's promise, else what its headers hold)."""
        c = self._counts[i]
        if c is None:
            if not self._warned:
                self._warned = True
                logger.warning("wds: no manifest entry for some shards (e.g. %s); counting samples from tar "
                               "headers (`veca data make-shards` writes a manifest)", self.urls[i])
            c = self._counts[i] = len(self.index(i))
        return c

    def counts(self) -> list[int]:
        """Every shard's count (reads the headers of shards without a manifest entry)."""
        return [self.count(i) for i in range(len(self.urls))]

    def index(self, i: int) -> ShardIndex:
        """Member offsets of shard ``i`` (cached for the last few shards)."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        idx = scan_shard(self.urls[i])
        if idx.problem is not None:
            logger.warning("wds: shard %s: %s (%d complete samples)", self.urls[i], idx.problem, len(idx))
        self._cache[i] = idx
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return idx

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()  # DataLoader workers build their own
        return state
