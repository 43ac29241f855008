"""Dataset specs → dataset objects: ``build_dataset(spec, split=None, transform=None)``.

Spec strings::

    imagefolder:/path              class sub-folders (or a flat, unlabelled folder)
    filelist:/path/list.txt        one path per line, optionally "path<TAB>label"
    wds:/path/shard-{000000..000127}.tar   WebDataset shards (streaming, an IterableDataset)
    npz:/path/file.npz             images [+ labels, masks, depth]
    digits                         scikit-learn digits, fixed 80/20 train/val split
    synthetic:n=512,size=64,classes=4,seed=0   procedural shapes with masks and depth
    textures:n=2048,size=32,classes=8,seed=0   procedural oriented gratings (the CPU quickstart's data)

Splits. ``digits``, ``synthetic`` and ``textures`` have built-in ``"train"``/``"val"`` splits. A path with a
``{split}`` placeholder has a split per name (``npz:/d/{split}.npz``). An ``imagefolder`` whose
sub-folders are all split names (``train/``, ``val/``, … — the ImageNet root layout) has those splits.
Any other spec names one set of files — a ``wds:`` brace range, a folder of class sub-folders, a file
list, an npz file — and *is* that set: training (``split_if_present=True``, ``data.split``) uses it
whole, and an explicit request for a split it does not have (``digits@val`` style, in evaluation) is
an error rather than a silent train/val leak.

Config blocks are accepted too: a mapping with ``spec`` (a string as above) or ``type`` + ``path``,
plus constructor options (e.g. ``{"spec": "wds:/d/s-{0..9}.tar", "shuffle_buffer": 5000}``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from .decode import DEFAULT_MAX_PIXELS
from .digits import DigitsDataset
from .errors import SkipCounter
from .folder import FileListDataset, ImageFolderDataset
from .npz import NpzDataset
from .shardset import ShardSet, expand_shards
from .synthetic import SyntheticDataset, parse_synthetic_options
from .textures import TexturesDataset, parse_texture_options
from .wds import WdsDataset

#: Spec kinds and the one-line form users see in errors.
SPEC_KINDS: dict[str, str] = {
    "imagefolder": "imagefolder:/path",
    "filelist": "filelist:/path/list.txt",
    "wds": "wds:/path/shard-{000000..000127}.tar",
    "npz": "npz:/path/file.npz",
    "digits": "digits",
    "synthetic": "synthetic:n=512,size=64,classes=4,seed=0",
    "textures": "textures:n=2048,size=32,classes=8,seed=0",
}

#: Constructor options each kind accepts through ``build_dataset(..., **options)``.
_OPTIONS: dict[str, set[str]] = {
    "imagefolder": {"dense"},
    "filelist": {"dense"},
    "npz": {"dense"},
    "digits": {"dense"},
    "synthetic": {"dense"},
    "wds": {"shuffle_buffer", "shard_shuffle", "resampled", "endless", "seed", "rank", "world_size", "start",
            "batch_size", "workers"},
    "textures": {"dense"},
}

#: Sub-folder names that make an image folder a root of splits (ImageNet layout) rather than classes.
SPLIT_NAMES: frozenset[str] = frozenset({"train", "val", "valid", "validation", "test", "trainval"})


def _valid_forms() -> str:
    return ", ".join(SPEC_KINDS.values())


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``kind:argument``; ``ValueError`` naming the spec when the kind is unknown or incomplete."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"malformed dataset spec {spec!r}: expected one of {_valid_forms()}")
    kind, sep, arg = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in SPEC_KINDS:
        raise ValueError(f"malformed dataset spec {spec!r}: unknown kind {kind!r}; expected one of {_valid_forms()}")
    if kind == "digits" and arg.strip():
        raise ValueError(f"malformed dataset spec {spec!r}: 'digits' takes no argument (use split='train'/'val')")
    if kind in ("imagefolder", "filelist", "wds", "npz") and not arg.strip():
        raise ValueError(f"malformed dataset spec {spec!r}: {kind} needs a path, e.g. {SPEC_KINDS[kind]!r}")
    return kind, arg.strip()


def _split_root(path: str) -> list[str]:
    """Sub-folder names of ``path`` when they are all split names (else ``[]``)."""
    try:
        subdirs = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return []
    return subdirs if subdirs and all(d.lower() in SPLIT_NAMES for d in subdirs) else []


def _resolve_path(kind: str, path: str, split: str | None, spec: str, split_if_present: bool) -> str:
    path = os.path.expanduser(path)
    if "{split}" in path:
        if split is None:
            raise ValueError(f"dataset spec {spec!r} has a {{split}} placeholder but no split was given")
        return path.replace("{split}", split)
    if kind == "imagefolder":
        splits = _split_root(path)
        if splits:
            if split is None:
                raise ValueError(f"dataset spec {spec!r} is a folder of splits ({', '.join(splits)}); choose one "
                                 f"(e.g. 'imagefolder:{os.path.join(path, splits[0])}' or a split name)")
            if split not in splits:
                raise FileNotFoundError(f"dataset spec {spec!r} has splits {', '.join(splits)}, not {split!r} "
                                        f"({os.path.join(path, split)!r} does not exist)")
            return os.path.join(path, split)
    if split is None or split_if_present:
        return path  # the spec names one set of files: that set, whatever the split
    raise ValueError(
        f"dataset spec {spec!r} names one set of files and has no split {split!r}; name the split's own "
        f"files (e.g. '{kind}:/data/val…'), put a {{split}} placeholder in the path, or give no split"
    )


def stream_length(spec: str, split: str | None = None, split_if_present: bool = False) -> int | None:
    """Samples in the shards of a ``wds:`` spec when a manifest counts every one of them (no shard is
    opened), else ``None``."""
    return stream_count(spec, split, split_if_present)[0]


def stream_count(spec: str, split: str | None = None, split_if_present: bool = False) -> tuple[int | None, str | None]:
    """``(samples, None)`` when a manifest counts every shard of a ``wds:`` spec, else ``(None, why not)``
    (``(None, None)`` for other specs)."""
    kind, arg = parse_spec(spec)
    if kind != "wds":
        return None, None
    shards = ShardSet(expand_shards(_resolve_path(kind, arg, split, spec, split_if_present)))
    if not shards.fully_counted:
        return None, shards.why_not_counted()
    return int(sum(shards.counts())), None


def check_spec(spec: str, split: str | None = None, split_if_present: bool = False) -> str:
    """Validate ``spec`` cheaply (kind, options, paths, split) without reading any image; return the
    resolved path (or argument). Raises ``ValueError``/``FileNotFoundError`` naming the problem."""
    kind, arg = parse_spec(spec)
    if kind == "digits":
        if split not in (None, "train", "val", "test"):
            raise ValueError(f"digits: unknown split {split!r}; use 'train', 'val' or none (all images)")
        return arg
    if kind in ("synthetic", "textures"):
        (parse_synthetic_options if kind == "synthetic" else parse_texture_options)(spec, arg)
        if split not in (None, "train", "val"):
            raise ValueError(f"{kind}: unknown split {split!r}; use 'train', 'val' or none (= train)")
        return arg
    path = _resolve_path(kind, arg, split, spec, split_if_present)
    if kind == "wds":
        expand_shards(path)
    elif kind == "imagefolder" and not os.path.isdir(path):
        raise FileNotFoundError(f"imagefolder: directory {path!r} does not exist (dataset spec {spec!r})")
    elif kind in ("filelist", "npz") and not os.path.isfile(path):
        raise FileNotFoundError(f"{kind}: file {path!r} does not exist (dataset spec {spec!r})")
    return path


def build_dataset(
    spec: str | Mapping[str, Any],
    split: str | None = None,
    transform: Callable[..., Any] | None = None,
    *,
    max_skip_fraction: float = 0.01,
    skip_counter: SkipCounter | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    split_if_present: bool = False,
    allow_empty_classes: bool = False,
    **options: Any,
) -> Any:
    """Build the dataset named by ``spec`` (see the module docstring).

    Args:
        spec: spec string or config mapping.
        split: ``"train"``/``"val"`` (or another folder / placeholder name), or ``None``.
        split_if_present: apply ``split`` only where the spec has splits (training's ``data.split``);
            otherwise a spec without that split is an error.
        transform: applied to each PIL RGB image (map-style items become ``(transform(img), target)``).
        max_skip_fraction: tolerated fraction of unreadable images (config ``data.max_skip_fraction``).
        skip_counter: share one counter between datasets (overrides ``max_skip_fraction``).
        max_pixels: images declaring more pixels are skipped before decoding (``data.max_pixels``).
        allow_empty_classes: ``imagefolder``: keep a class folder without images as a class with zero
            images instead of refusing it (other kinds ignore it).
        options: kind-specific options: ``dense`` (map-style: None/True/False, see ``MapImageDataset``),
            WebDataset streaming options (``shuffle_buffer``, ``endless``, ``seed``, ``rank``, …).

    Returns:
        A map-style dataset (``MapImageDataset``) or, for ``wds:``, a ``WdsDataset`` (iterable).

    Raises:
        ValueError: malformed spec or unknown option (message names them).
        FileNotFoundError: the path does not exist.
    """
    if isinstance(spec, Mapping):
        block = dict(spec)
        if "spec" in block:
            spec_str = str(block.pop("spec"))
        elif "type" in block:
            kind_ = str(block.pop("type"))
            spec_str = f"{kind_}:{block.pop('path', '') or block.pop('options', '')}".rstrip(":")
        else:
            raise ValueError(f"dataset config {spec!r} needs a 'spec' string or a 'type' (and 'path')")
        split = block.pop("split", split)
        options = {**block, **options}
    else:
        spec_str = spec
    kind, arg = parse_spec(spec_str)
    allow_empty_classes = bool(options.pop("allow_empty_classes", allow_empty_classes))  # from a config block
    unknown = set(options) - _OPTIONS[kind]
    if unknown:
        raise ValueError(
            f"dataset spec {spec_str!r}: unknown option(s) {sorted(unknown)}; {kind} accepts {sorted(_OPTIONS[kind])}"
        )
    common: dict[str, Any] = {"skip_counter": skip_counter, "max_skip_fraction": max_skip_fraction,
                              "max_pixels": max_pixels}
    if kind == "digits":
        return DigitsDataset(split=split, transform=transform, **common, **options)
    if kind == "synthetic":
        parsed = parse_synthetic_options(spec_str, arg)
        return SyntheticDataset(split=split, transform=transform, **parsed, **common, **options)
    if kind == "textures":
        parsed = parse_texture_options(spec_str, arg)
        return TexturesDataset(split=split, transform=transform, **parsed, **common, **options)
    path = _resolve_path(kind, arg, split, spec_str, split_if_present)
    if kind == "imagefolder":
        return ImageFolderDataset(path, transform=transform, allow_empty_classes=allow_empty_classes, **common,
                                  **options)
    if kind == "filelist":
        return FileListDataset(path, transform=transform, **common, **options)
    if kind == "npz":
        return NpzDataset(path, transform=transform, **common, **options)
    return WdsDataset(path, transform=transform, **common, **options)
