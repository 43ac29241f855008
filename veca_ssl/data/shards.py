"""Image folder / npz / any map-style spec → WebDataset tar shards (``veca data make-shards``).

Each sample is written as ``<key>.jpg`` or ``<key>.png`` (the original file bytes when the source is
a JPEG or PNG file, so nothing is re-compressed; other formats and in-memory arrays are encoded as
lossless PNG), ``<key>.cls`` (the integer label, ASCII; −1 when unlabelled) and ``<key>.json``
(source name and class name). ``<key>`` is the source index, zero-padded. Samples are shuffled
across shards by default (a class-sorted folder would otherwise give single-class shards, which a
streaming shuffle window cannot fully mix): shard ``i`` holds the sources at positions
``[i × shard_size, (i+1) × shard_size)`` of one seeded permutation, less the unreadable ones.

``manifest.json`` lists every shard with its sample count and byte size; readers use it to skip
whole shards by count (see ``shardset.py``).

Crash safety — an interrupted run leaves either the old set or the new one, and a rerun finishes:

1. New shards are written to ``DST/.make-shards-staging/`` (temporary ``.partial`` names, fsync, then
   renamed); a progress file lists the finished shards, so a rerun of the same command continues
   after the last finished shard instead of starting over — unless a source changed meanwhile (its
   name, label, size or modification time: a file replaced under the same name), then it starts over.
   ``DST`` is untouched meanwhile.
2. When every shard (and, with ``--verify``, every re-read sample) is good, the new manifest is
   written into the staging folder and a commit journal into ``DST``; then the new shards are renamed
   into ``DST``, old shards that the new set does not have are removed, the manifest is renamed last
   and the journal removed. A crash in this short step leaves the journal: readers refuse the
   half-swapped folder with a message, and a rerun rolls the swap forward.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from tqdm import tqdm

from veca_ssl.fileio import writing

from .base import MapImageDataset
from .decode import DEFAULT_MAX_PIXELS, Decoder, read_bytes
from .errors import DataError, SkipCounter, UnreadableItem
from .folder import FileImageDataset, ImageFolderDataset
from .npz import NpzDataset
from .shardset import COMMIT_JOURNAL, MANIFEST_NAME
from .specs import SPEC_KINDS, build_dataset
from .tario import read_sample, scan_shard

SHARD_NAME = "shard-%06d.tar"
#: What to do after a failed write (the finished shards stay staged: a rerun continues after them).
_CONTINUE = "rerun the same command: it continues after the shards finished so far"
STAGING = ".make-shards-staging"
PROGRESS = "progress.json"


def _source_dataset(src: str, split: str | None, counter: SkipCounter, max_pixels: int | None,
                    allow_empty_classes: bool = False) -> MapImageDataset:
    kind = src.partition(":")[0].lower()
    # the dataset keeps its own (recording) counter: make_shards counts each source once, in ``counter``
    common: dict[str, Any] = {"dense": False, "max_pixels": max_pixels, "max_skip_fraction": counter.max_skip_fraction}
    if kind in SPEC_KINDS and ":" in src or src in SPEC_KINDS:
        ds = build_dataset(src, split=split, allow_empty_classes=allow_empty_classes, **common)
    elif os.path.isdir(src):
        ds = ImageFolderDataset(src, allow_empty_classes=allow_empty_classes, **common)
    elif src.endswith(".npz"):
        ds = NpzDataset(src, **common)
    elif not os.path.exists(src):
        raise FileNotFoundError(f"make-shards: source {src!r} does not exist")
    else:
        raise ValueError(f"make-shards: source {src!r} is neither an image folder, an .npz file nor a dataset spec")
    if not isinstance(ds, MapImageDataset):
        raise ValueError(f"make-shards: source {src!r} must be a map-style dataset (not already shards)")
    return ds


def _encoded(ds: MapImageDataset, index: int, verify: bool) -> tuple[str, bytes]:
    """(extension, bytes) for item ``index``; raises :class:`UnreadableItem` when it is unusable."""
    name = ds._name(index)
    if isinstance(ds, FileImageDataset):
        try:
            data = read_bytes(ds.path(index))
        except OSError as err:
            raise UnreadableItem(name, f"{type(err).__name__}: {err}", "missing") from None
        img = ds.decoder.open(data, name)  # header: type and pixel limit
        if verify:
            ds.decoder.decode(data, name)  # every pixel, so a truncated source is not copied
        if img.format == "JPEG":
            return "jpg", data
        if img.format == "PNG":
            return "png", data
        rgb = ds.decoder.decode(data, name)
    else:
        rgb, _, _ = ds.load(index)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return "png", buf.getvalue()


class _Sink:
    """The shard file as the tar writer sees it: after a failed write (a full disk) every later write
    is dropped, so the writer's stream, closed when it is collected, does not report a second error
    on top of the first (the one that ends the run, naming the file)."""

    def __init__(self, f: Any) -> None:
        self.f, self.failed = f, False

    def write(self, data: bytes) -> int:
        if self.failed:
            return len(data)
        try:
            return self.f.write(data)
        except (OSError, ValueError):
            self.failed = True
            raise

    def flush(self) -> None:
        if not self.failed and not self.f.closed:
            self.f.flush()


def brace_pattern(dst: str | Path, num_shards: int) -> str:
    """``wds:`` spec covering shards 0..num_shards-1 written by :func:`make_shards`."""
    name = SHARD_NAME.replace("%06d", f"{{{0:06d}..{num_shards - 1:06d}}}")
    return "wds:" + os.path.join(os.path.abspath(str(dst)), name)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def finish_commit(dst: Path) -> bool:
    """Roll an interrupted swap forward (see the module docstring); True if there was one."""
    journal = dst / COMMIT_JOURNAL
    if not journal.exists():
        return False
    plan = json.loads(journal.read_text())
    staging = dst / STAGING
    for name in plan["new"]:
        if (staging / name).exists():
            os.replace(staging / name, dst / name)
    for name in plan["remove"]:
        if (dst / name).exists():
            os.remove(dst / name)
    if (staging / MANIFEST_NAME).exists():
        os.replace(staging / MANIFEST_NAME, dst / MANIFEST_NAME)
    _fsync_dir(dst)
    shutil.rmtree(staging, ignore_errors=True)
    journal.unlink()
    _fsync_dir(dst)
    return True


def _stamp(path: str) -> str:
    """Size and modification time (ns) of a source file; ``-`` when it cannot be read (skipped later)."""
    try:
        st = os.stat(path)
    except OSError:
        return "-"
    return f"{st.st_size}\t{st.st_mtime_ns}"


def _identity(src: str, ds: MapImageDataset, split: str | None, shard_size: int, shuffle: bool, seed: int,
              verify: bool, max_pixels: int | None) -> dict[str, Any]:
    """What a finished shard of an interrupted run must share with this run to be reused: the options,
    and every source's name, label, size and modification time.

    Size and mtime, not the bytes' hash: a replaced file gets a new mtime (cp, mv, a re-export), and a
    stat per file costs a fraction of reading every image once more before any work starts (the same
    trade make and rsync make). Files are stamped one by one; an in-memory source (an npz array) by
    the file it was read from."""
    h = hashlib.sha256()
    files = isinstance(ds, FileImageDataset)
    whole = _stamp(ds.path) if isinstance(ds, NpzDataset) else ""
    for i in range(len(ds)):
        stamp = _stamp(ds.path(i)) if files else whole
        h.update(f"{ds._name(i)}\t{int(ds.targets[i])}\t{stamp}\n".encode("utf-8", "surrogateescape"))
    return {"source": src, "split": split, "items": len(ds), "sources_sha256": h.hexdigest(),
            "shard_size": shard_size, "shuffle": shuffle, "seed": seed, "verify": verify, "max_pixels": max_pixels}


def _resume_progress(staging: Path, identity: dict[str, Any]) -> list[dict[str, Any]]:
    """Finished shards of an interrupted run with the same identity (files checked), else a clean folder."""
    progress = staging / PROGRESS
    if progress.exists():
        try:
            state = json.loads(progress.read_text())
        except ValueError:
            state = {}
        if state.get("identity") == identity:
            done: list[dict[str, Any]] = []
            for entry in state.get("shards", []):
                path = staging / entry["name"]
                if entry["name"] != SHARD_NAME % len(done) or not path.is_file() or path.stat().st_size != entry["bytes"]:
                    break
                done.append(entry)
            return done
    shutil.rmtree(staging, ignore_errors=True)
    return []


def _verify_shard(path: Path, expected: list[tuple[str, int, str]], decoder: Decoder) -> None:
    """Re-read every sample of a written shard: same keys, labels and image bytes, and it decodes."""
    index = scan_shard(str(path))
    if index.problem is not None or len(index) != len(expected):
        raise DataError(f"make-shards --verify: {path} reads back {len(index)} of {len(expected)} samples "
                        f"({index.problem or 'count differs'})")
    with open(path, "rb") as f:
        for o, (key, label, digest) in enumerate(expected):
            raw = read_sample(f, index, o)
            if (index.keys[o] != key or raw.problem is not None or raw.label != label or raw.data is None
                    or hashlib.sha256(raw.data).hexdigest() != digest):
                raise DataError(f"make-shards --verify: sample {key} of {path} does not read back as written")
            decoder.decode(raw.data, raw.name)


def make_shards(
    src: str,
    dst: str | Path,
    shard_size: int = 1000,
    *,
    split: str | None = None,
    shuffle: bool = True,
    seed: int = 0,
    verify: bool = False,
    overwrite: bool = False,
    max_skip_fraction: float = 0.01,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool | None = None,
    on_shard: Callable[[int], None] | None = None,
    allow_empty_classes: bool = False,
) -> dict[str, Any]:
    """Write ``dst/shard-000000.tar …`` from ``src`` crash-safely; return the manifest (with ``"spec"``).

    Args:
        src: image folder, ``.npz`` file or a map-style dataset spec (``digits``, ``filelist:…``).
        shard_size: source items per shard (>= 1); shards hold fewer when sources are unreadable.
        verify: fully decode every source image before copying it, and re-read every written sample
            (bytes, label, decode) before the new set replaces the old one.
        overwrite: replace an existing shard set in ``dst`` instead of refusing.
        on_shard: called with the shard number after each staged shard (tests interrupt here).
        allow_empty_classes: keep an image folder's class folder without images as a class (listed in
            the manifest's ``classes``) instead of refusing it.
    """
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    dst = Path(dst).expanduser()
    counter = SkipCounter(max_skip_fraction, option="--max-skip-fraction")
    ds = _source_dataset(str(src), split, counter, max_pixels, allow_empty_classes)  # nothing made if it is bad
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FileExistsError(f"make-shards: destination {dst} exists and is not a directory; give a directory "
                              f"path") from None
    finished_swap = finish_commit(dst)
    old = sorted(p.name for p in dst.glob("shard-*.tar"))
    identity = _identity(str(src), ds, split, shard_size, shuffle, seed, verify, max_pixels)
    previous = json.loads((dst / MANIFEST_NAME).read_text()) if (dst / MANIFEST_NAME).exists() else {}
    if finished_swap and previous.get("identity") == identity:
        return previous  # the interrupted swap of this very command is now complete
    if old and not overwrite:
        raise FileExistsError(f"make-shards: {dst} already holds {len(old)} shard(s); pass --overwrite to replace them")
    staging = dst / STAGING
    done = _resume_progress(staging, identity)
    staging.mkdir(exist_ok=True)
    for entry in done:  # counts of the shards an interrupted run finished
        counter.add(entry["count"] + len(entry["skipped"]), entry["skipped"])
    order = np.random.default_rng(seed).permutation(len(ds)) if shuffle else np.arange(len(ds))
    num_shards = -(-len(ds) // shard_size)
    width = max(6, len(str(len(ds))))
    classes = ds.classes
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=len(ds), initial=len(done) * shard_size, desc="make-shards", unit="img", disable=not show)
    for i in range(len(done), num_shards):
        name = SHARD_NAME % i
        partial = staging / (name + ".partial")
        written: list[tuple[str, int, str]] = []
        skipped: list[dict[str, str]] = []
        with writing(partial, "shard", _CONTINUE):  # the cause is read once the partial file is gone
            try:
                with open(partial, "wb") as raw_file:
                    f = _Sink(raw_file)
                    sink = wds.TarWriter(f, mtime=0.0)
                    for index in order[i * shard_size:(i + 1) * shard_size].tolist():
                        bar.update(1)
                        try:
                            ext, data = _encoded(ds, index, verify)
                        except UnreadableItem as err:
                            skipped.append(err.record())
                            counter.skip(err)
                            continue
                        counter.ok()
                        label = int(ds.targets[index])
                        key = f"{index:0{width}d}"
                        meta = {"source": ds._name(index), "label": label,
                                "class": classes[label] if classes and label >= 0 else None}
                        sink.write({"__key__": key, ext: data, "cls": str(label), "json": json.dumps(meta)})
                        written.append((key, label, hashlib.sha256(data).hexdigest()))
                    sink.close()
                    raw_file.flush()
                    os.fsync(raw_file.fileno())
            except BaseException:
                partial.unlink(missing_ok=True)  # its space is free for the rerun the message asks for
                raise
        os.replace(partial, staging / name)
        if verify:
            _verify_shard(staging / name, written, ds.decoder)
        done.append({"name": name, "count": len(written), "bytes": (staging / name).stat().st_size,
                     "skipped": skipped})
        with writing(staging / PROGRESS, "the progress file", _CONTINUE):
            _write_json(staging / PROGRESS, {"identity": identity, "shards": done})
        if on_shard is not None:
            on_shard(i)
    bar.close()
    if counter.seen - counter.skipped == 0:
        raise ValueError(f"make-shards: no readable image in {src!r}")
    manifest = {
        "spec": brace_pattern(dst, num_shards),
        "num_samples": sum(e["count"] for e in done),
        "num_shards": num_shards,
        "shard_size": shard_size,
        "classes": classes,
        "source": str(src),
        "skipped": counter.skipped,
        "skipped_items": counter.state()["first"],
        "shards": [{"name": e["name"], "count": e["count"], "bytes": e["bytes"]} for e in done],
        "identity": identity,
    }
    with writing(staging / MANIFEST_NAME, "the manifest", _CONTINUE):
        _write_json(staging / MANIFEST_NAME, manifest)
    new = [e["name"] for e in done]
    with writing(dst / COMMIT_JOURNAL, "the commit journal", _CONTINUE):
        _write_json(dst / COMMIT_JOURNAL, {"new": new, "remove": [n for n in old if n not in new]})
    finish_commit(dst)
    return manifest
