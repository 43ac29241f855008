"""``veca extract``: frozen features of a dataset at one core width, written to disk in shards.

Each shard holds ``image`` (N, D), optionally ``patch_mean`` (N, D) and ``patches`` (N, Hp*Wp, D),
plus ``labels`` and dataset ``indices`` — one ``.safetensors`` file per shard (default) or one
``.npy`` file per array. Shard ``i`` covers dataset items ``[i × shard_size, (i+1) × shard_size)``;
an unusable image is left out (never replaced by another item's row), and the manifest lists its
index, name and reason under the shard and counts all of them under ``skipped``; extraction stops
when they pass ``--max-skip-fraction``. ``wds:`` shards work like folders: the counts in their
manifest give the length, and each extraction shard reads only its own range of samples. ``manifest.json`` describes the run (model, checkpoint, width, resolution,
dataset, count, dtype, shard size) and lists the finished shards with their byte sizes and SHA-256.
Shards and manifest are written atomically (temporary file + rename) and the manifest is updated
after every shard, so an interrupted extraction resumes where it stopped: listed shards whose files
verify are skipped. Each shard is extracted on its own (same batches whatever happened before), so
resumed shards are byte-identical to those of an uninterrupted run.

``read_features(dir)`` returns the arrays concatenated over shards.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Subset

from eval.common import SKIP_OPTION
from eval.extract_cli import FORMATS
from veca_ssl.data.errors import DataSkipError, SkipCounter
from veca_ssl.distributed import is_main_process
from veca_ssl.fileio import atomic_write_bytes as _atomic_write_bytes
from veca_ssl.fileio import sha256_file as _sha256
from veca_ssl.fileio import writing
from veca_ssl.widths import Width, resolve_widths

MANIFEST = "manifest.json"
#: What to do after a failed write (the finished shards stay: a rerun continues after them).
_RESUME = "rerun the same command: it continues after the shards listed in manifest.json"
DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16)}
#: Manifest fields that must match for a resume to continue an existing extraction.
IDENTITY = ("model", "checkpoint", "width", "resolution", "dataset", "count", "dtype", "format",
            "shard_size", "features")


def _write_shard(out_dir: Path, index: int, arrays: dict[str, np.ndarray], fmt: str,
                 meta: dict[str, str]) -> list[dict]:
    """Write one shard atomically; return ``[{"file", "bytes", "sha256"}]`` of its files."""
    name = f"shard-{index:05d}"
    if fmt == "safetensors":
        from safetensors.numpy import save

        blobs = {f"{name}.safetensors": save({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                                             metadata=meta)}
    else:
        import io

        blobs = {}
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
            blobs[f"{name}.{key}.npy"] = buf.getvalue()
    files = []
    for fname, data in blobs.items():
        with writing(out_dir / fname, "feature shard", _RESUME):
            _atomic_write_bytes(out_dir / fname, data)
        files.append({"file": fname, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return files


def _shard_ok(out_dir: Path, entry: dict) -> bool:
    for f in entry["files"]:
        p = out_dir / f["file"]
        if not p.is_file() or p.stat().st_size != f["bytes"] or _sha256(p) != f["sha256"]:
            return False
    return True


def _part(dataset: Dataset, start: int, stop: int) -> tuple[Dataset, int]:
    """Items ``[start, stop)`` and the offset to add to the part's row indices to get dataset indices."""
    if isinstance(dataset, IterableDataset):
        subset = getattr(dataset, "subset", None)
        if subset is None:
            raise ValueError(f"{type(dataset).__name__} streams without positions; extraction needs a map-style "
                             "dataset or wds: shards")
        return subset(start, stop), 0  # rows carry global sample indices already
    return Subset(dataset, range(start, stop)), start


def _skip_totals(manifest: dict) -> dict:
    """Counts over the finished shards: attempted items, skipped items and their indices."""
    listed = [r for e in manifest["shards"] for r in e.get("skipped", [])]
    return {"seen": sum(e["count"] for e in manifest["shards"]), "count": len(listed),
            "indices": [r["index"] for r in listed]}


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    with writing(out_dir / MANIFEST, "the extraction manifest", _RESUME):
        _atomic_write_bytes(out_dir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def extract_to_shards(
    model: torch.nn.Module,
    dataset: Dataset,
    output_dir: str | Path,
    width: Width,
    resolution: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    shard_size: int = 10000,
    fmt: str = "safetensors",
    dtype: str = "float32",
    with_patch_mean: bool = True,
    with_patches: bool = False,
    info: dict | None = None,
    max_shards: int | None = None,
    on_shard: Callable[[int], None] | None = None,
    num_workers: int = 0,
    progress: bool = True,
    max_skip_fraction: float = 0.01,
) -> dict:
    """Extract ``dataset`` features at ``width`` into shards under ``output_dir``; resume if possible.

    Args:
        info: identity of the run recorded in the manifest (``model``, ``checkpoint``, ``dataset``).
        max_shards: stop after writing this many new shards (the rest is done by a later call).
        on_shard: called with the shard index after each shard and its manifest entry are on disk.
        max_skip_fraction: raise ``DataSkipError`` when more than this fraction of the whole set is
            unusable, judged once every shard is written (the shards stay valid); earlier only when every
            item so far was unusable.

    Returns:
        The manifest (``manifest["complete"]`` tells whether every shard is written).
    """
    from veca_ssl.features import extract_features

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    budgets = tuple(getattr(model, "budgets", ()) or ())
    if width is None:
        width = max(budgets) if budgets else None  # default: the full width
    else:
        resolve_widths(model, [width])  # ValueError naming the width and the valid widths
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = dict(info or {})
    features = ["image"] + (["patch_mean"] if with_patch_mean else []) + (["patches"] if with_patches else [])
    manifest = {"model": info.get("model"), "checkpoint": info.get("checkpoint"), "width": width,
                "resolution": resolution, "dataset": info.get("dataset"), "count": len(dataset),
                "dtype": dtype, "format": fmt, "shard_size": shard_size,
                "features": features + ["labels", "indices"],
                "embed_dim": int(getattr(model, "num_features", getattr(model, "embed_dim", 0))),
                "shards": [], "complete": False, "skipped": {"seen": 0, "count": 0, "indices": []}}
    path = out / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in IDENTITY if old.get(k) != manifest[k]]
        if diff:
            raise ValueError(
                f"{path} belongs to another extraction (differs in {', '.join(diff)}: "
                f"{ {k: old.get(k) for k in diff} } vs { {k: manifest[k] for k in diff} }); "
                "use a new --output-dir or delete it")
        for entry in old.get("shards", []):  # keep the verified prefix of finished shards
            if entry["index"] != len(manifest["shards"]) or not _shard_ok(out, entry):
                break
            manifest["shards"].append(entry)
        manifest["skipped"] = _skip_totals(manifest)  # theirs count, even when no shard is left to do
    n = len(dataset)
    n_shards = max(1, -(-n // shard_size))
    torch_dtype, np_dtype = DTYPES[dtype]
    written = 0
    for index in range(len(manifest["shards"]), n_shards):
        if max_shards is not None and written >= max_shards:
            break
        start, stop = index * shard_size, min(n, (index + 1) * shard_size)
        part, offset = _part(dataset, start, stop)
        fs = extract_features(model, part, [width], resolution, batch_size, device,
                              with_patch_mean=with_patch_mean, with_patches=with_patches, num_workers=num_workers,
                              progress=progress, dtype=torch_dtype, max_skip_fraction=None)[width]
        arrays = {"image": fs.image.numpy().astype(np_dtype)}
        if with_patch_mean:
            arrays["patch_mean"] = fs.patch_mean.numpy().astype(np_dtype)
        if with_patches:
            arrays["patches"] = fs.patches.numpy().astype(np_dtype)
        arrays["labels"] = fs.labels.numpy().astype(np.int64)
        arrays["indices"] = (fs.indices + offset).numpy().astype(np.int64)
        skipped = [{**r, "index": int(r["index"]) + offset} for r in fs.skipped]
        if is_main_process():
            # One metadata key only: safetensors serialises metadata from a hash map, so with several
            # keys their order (hence the file bytes) would differ between runs.
            meta = {"veca_extract": json.dumps({"shard": index, "start": start, "count": stop - start})}
            files = _write_shard(out, index, arrays, fmt, meta)
            manifest["shards"].append({"index": index, "start": start, "count": stop - start, "files": files,
                                       "rows": len(fs), "skipped": skipped})
            manifest["complete"] = len(manifest["shards"]) == n_shards
            manifest["skipped"] = _skip_totals(manifest)
            _write_manifest(out, manifest)
        else:
            manifest["shards"].append({"index": index, "count": stop - start, "skipped": skipped})
            manifest["skipped"] = _skip_totals(manifest)
        # only "every item so far unusable" stops early (a wrong path or format); the fraction is judged
        # over the whole set once it is done, never on the part that happens to come first
        _skip_totals_counter(manifest, max_skip_fraction, min_seen=n + 1).check()  # same on every rank
        written += 1
        if on_shard is not None:
            on_shard(index)
    manifest["complete"] = len(manifest["shards"]) == n_shards
    if is_main_process():
        _write_manifest(out, manifest)
    if manifest["complete"]:
        try:
            _skip_totals_counter(manifest, max_skip_fraction, min_seen=1).check()
        except DataSkipError as exc:
            raise DataSkipError(f"{exc}. The features of the usable images are written to {out} (the unusable "
                                f"ones are listed in its {MANIFEST}); rerun with a higher --max-skip-fraction to "
                                f"accept them") from None
    return manifest


def _skip_totals_counter(manifest: dict, max_skip_fraction: float, min_seen: int) -> SkipCounter:
    """The skip counts over every finished shard (``min_seen``: attempts before the fraction is judged)."""
    totals = SkipCounter(max_skip_fraction, min_seen=min_seen, log=False, option=SKIP_OPTION)
    totals.load_state({"seen": manifest["skipped"]["seen"], "skipped": manifest["skipped"]["count"],
                       "first": [r for e in manifest["shards"] for r in e.get("skipped", [])][:10]})
    return totals


def read_features(directory: str | Path) -> dict[str, np.ndarray]:
    """All arrays of an extraction directory, concatenated over shards in order.

    Raises ValueError when the extraction is incomplete (resume it with ``veca extract`` first).
    """
    d = Path(directory)
    if not (d / MANIFEST).is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {str(d)!r}; is it a `veca extract` output directory?")
    manifest = json.loads((d / MANIFEST).read_text())
    if not manifest.get("complete"):
        raise ValueError(f"extraction in {str(d)!r} is incomplete ({len(manifest['shards'])} shards written); "
                         "run `veca extract` again with the same options to resume")
    parts: dict[str, list[np.ndarray]] = {}
    for entry in manifest["shards"]:
        if manifest["format"] == "safetensors":
            from safetensors.numpy import load_file

            arrays = load_file(str(d / entry["files"][0]["file"]))
        else:
            arrays = {f["file"].split(".")[-2]: np.load(d / f["file"], allow_pickle=False) for f in entry["files"]}
        for k, v in arrays.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def main(argv: list[str] | None = None) -> int:
    """``python -m eval.extract`` = ``veca extract`` (the command line lives in ``eval.extract_cli``)."""
    from eval.extract_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
