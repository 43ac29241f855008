"""Data pipeline: datasets from spec strings, WebDataset streaming, multi-crop
augmentation without torchvision, iBOT block masking, batching, an exact-resume distributed sampler,
and skipping of unusable images (counted over workers and ranks).

Typical self-supervised training input::

    base = build_dataset("imagefolder:/data/train")
    ds = SSLDataset(base, MultiCropTransform(), MaskingGenerator((14, 14)), patch_size=16)
    sampler = InfiniteSampler(len(ds), seed=0, rank=rank, world_size=world, start=step * global_batch)
    loader = DataLoader(ds, batch_size=b, sampler=sampler, collate_fn=ds.collate_fn, num_workers=8)
"""

import importlib
from typing import TYPE_CHECKING, Any

# Names are imported on first use (PEP 562), so `import veca_ssl.data.<module>` and light tools such
# as `veca data --help` do not pay for torch and every dataset module up front.
_EXPORTS: dict[str, str] = {
    "IMAGENET_MEAN": "augment",
    "IMAGENET_STD": "augment",
    "Normalize": "augment",
    "ArrayImageDataset": "base",
    "MapImageDataset": "base",
    "collate_multicrop": "collate",
    "DECODE_ERRORS": "decode",
    "DEFAULT_MAX_PIXELS": "decode",
    "IMAGE_EXTENSIONS": "decode",
    "Decoder": "decode",
    "DigitsDataset": "digits",
    "SKIP_CONFIG_KEY": "errors",
    "DataError": "errors",
    "DataSkipError": "errors",
    "SkipCounter": "errors",
    "UnreadableItem": "errors",
    "FileImageDataset": "folder",
    "FileListDataset": "folder",
    "ImageFolderDataset": "folder",
    "MaskingGenerator": "masking",
    "NpzDataset": "npz",
    "InfiniteSampler": "sampler",
    "derive_seed": "sampler",
    "sample_seed": "sampler",
    "make_shards": "shards",
    "SPEC_KINDS": "specs",
    "build_dataset": "specs",
    "check_spec": "specs",
    "parse_spec": "specs",
    "stream_length": "specs",
    "SSLDataset": "ssl",
    "SSLIterableDataset": "ssl",
    "SyntheticDataset": "synthetic",
    "TexturesDataset": "textures",
    "CropPlan": "transforms",
    "DenseEvalTransform": "transforms",
    "EvalTransform": "transforms",
    "MultiCropTransform": "transforms",
    "make_dense_eval_transform": "transforms",
    "make_eval_transform": "transforms",
    "Skipped": "wds",
    "WdsDataset": "wds",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static analysis sees the real imports
    from .augment import IMAGENET_MEAN, IMAGENET_STD, Normalize
    from .base import ArrayImageDataset, MapImageDataset
    from .collate import collate_multicrop
    from .decode import DECODE_ERRORS, DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, Decoder
    from .digits import DigitsDataset
    from .errors import SKIP_CONFIG_KEY, DataError, DataSkipError, SkipCounter, UnreadableItem
    from .folder import FileImageDataset, FileListDataset, ImageFolderDataset
    from .masking import MaskingGenerator
    from .npz import NpzDataset
    from .sampler import InfiniteSampler, derive_seed, sample_seed
    from .shards import make_shards
    from .specs import SPEC_KINDS, build_dataset, check_spec, parse_spec, stream_length
    from .ssl import SSLDataset, SSLIterableDataset
    from .synthetic import SyntheticDataset
    from .textures import TexturesDataset
    from .transforms import (
        CropPlan,
        DenseEvalTransform,
        EvalTransform,
        MultiCropTransform,
        make_dense_eval_transform,
        make_eval_transform,
    )
    from .wds import Skipped, WdsDataset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "DECODE_ERRORS",
    "DEFAULT_MAX_PIXELS",
    "SKIP_CONFIG_KEY",
    "SPEC_KINDS",
    "ArrayImageDataset",
    "CropPlan",
    "DataError",
    "DataSkipError",
    "Decoder",
    "DenseEvalTransform",
    "DigitsDataset",
    "EvalTransform",
    "FileImageDataset",
    "FileListDataset",
    "ImageFolderDataset",
    "InfiniteSampler",
    "MapImageDataset",
    "MaskingGenerator",
    "MultiCropTransform",
    "Normalize",
    "NpzDataset",
    "SSLDataset",
    "SSLIterableDataset",
    "SkipCounter",
    "Skipped",
    "SyntheticDataset",
    "TexturesDataset",
    "UnreadableItem",
    "WdsDataset",
    "build_dataset",
    "check_spec",
    "collate_multicrop",
    "derive_seed",
    "make_dense_eval_transform",
    "make_eval_transform",
    "make_shards",
    "parse_spec",
    "sample_seed",
    "stream_length",
]
