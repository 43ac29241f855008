"""Dataset specs (SPEC §4) → dataset objects: ``build_dataset(spec, split=None, transform=None)``.

Spec strings::

    imagefolder:/path              class sub-folders (or a flat, unlabelled folder)
    filelist:/path/list.txt        one path per line, optionally "path<TAB>label"
    wds:/path/shard-{000000..000127}.tar   WebDataset shards (streaming, an IterableDataset)
    npz:/path/file.npz             images [+ labels, masks, depth]
    digits                         scikit-learn digits, fixed 80/20 train/val split
    synthetic:n=512,size=64,classes=4,seed=0   procedural shapes with masks and depth
    textures:n=2048,size=32,classes=8,seed=0   procedural oriented gratings (the CPU quickstart's data)

Splits: ``digits``, ``synthetic`` and ``textures`` have built-in ``"train"``/``"val"`` splits. For path specs a
``{split}`` placeholder in the path is replaced by the split name (``npz:/d/{split}.npz``); an
``imagefolder`` without the placeholder uses ``<path>/<split>`` (the ImageNet layout). Any other
path spec asked for a split it cannot express is an error rather than a silent train/val leak.

Config blocks are accepted too: a mapping with ``spec`` (a string as above) or ``type`` + ``path``,
plus constructor options (e.g. ``{"spec": "wds:/d/s-{0..9}.tar", "shuffle_buffer": 5000}``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from .digits import DigitsDataset
from .errors import SkipCounter
from .folder import FileListDataset, ImageFolderDataset
from .npz import NpzDataset
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
    "textures": {"dense"},
    "wds": {"shuffle_buffer", "shard_shuffle", "endless", "seed", "rank", "world_size", "start", "batch_size", "epoch"},
}


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


def _resolve_path(kind: str, path: str, split: str | None, spec: str) -> str:
    path = os.path.expanduser(path)
    if "{split}" in path:
        if split is None:
            raise ValueError(f"dataset spec {spec!r} has a {{split}} placeholder but no split was given")
        return path.replace("{split}", split)
    if split is None:
        return path
    if kind == "imagefolder":
        sub = os.path.join(path, split)
        if os.path.isdir(sub):
            return sub
        raise FileNotFoundError(
            f"dataset spec {spec!r} asked for split {split!r} but {sub!r} does not exist "
            "(use a folder with <split>/ sub-folders, or put {split} in the path)"
        )
    raise ValueError(
        f"dataset spec {spec!r} cannot select split {split!r}; put a {{split}} placeholder in the path "
        f"(e.g. '{kind}:/data/{{split}}...') or pass split=None"
    )


def build_dataset(
    spec: str | Mapping[str, Any],
    split: str | None = None,
    transform: Callable[..., Any] | None = None,
    *,
    max_skip_fraction: float = 0.01,
    skip_counter: SkipCounter | None = None,
    **options: Any,
) -> Any:
    """Build the dataset named by ``spec`` (see the module docstring).

    Args:
        spec: spec string or config mapping.
        split: ``"train"``/``"val"`` (or another folder / placeholder name), or ``None``.
        transform: applied to each PIL RGB image (map-style items become ``(transform(img), target)``).
        max_skip_fraction: tolerated fraction of unreadable images (config ``data.max_skip_fraction``).
        skip_counter: share one counter between datasets (overrides ``max_skip_fraction``).
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
    unknown = set(options) - _OPTIONS[kind]
    if unknown:
        raise ValueError(
            f"dataset spec {spec_str!r}: unknown option(s) {sorted(unknown)}; {kind} accepts {sorted(_OPTIONS[kind])}"
        )
    common: dict[str, Any] = {"skip_counter": skip_counter, "max_skip_fraction": max_skip_fraction}
    if kind == "digits":
        return DigitsDataset(split=split, transform=transform, **common, **options)
    if kind == "synthetic":
        parsed = parse_synthetic_options(spec_str, arg)
        return SyntheticDataset(split=split, transform=transform, **parsed, **common, **options)
    if kind == "textures":
        parsed = parse_texture_options(spec_str, arg)
        return TexturesDataset(split=split, transform=transform, **parsed, **common, **options)
    path = _resolve_path(kind, arg, split, spec_str)
    if kind == "imagefolder":
        return ImageFolderDataset(path, transform=transform, **common, **options)
    if kind == "filelist":
        return FileListDataset(path, transform=transform, **common, **options)
    if kind == "npz":
        return NpzDataset(path, transform=transform, **common, **options)
    return WdsDataset(path, transform=transform, **common, **options)
