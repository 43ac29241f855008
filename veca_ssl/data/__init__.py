"""Data pipeline (SPEC §4, §3.1): datasets from spec strings, WebDataset streaming, multi-crop
augmentation without torchvision, iBOT block masking, batching, an exact-resume distributed sampler,
and skipping of unreadable images.

Typical self-supervised training input::

    base = build_dataset("imagefolder:/data/train")
    ds = SSLDataset(base, MultiCropTransform(), MaskingGenerator((14, 14)), patch_size=16)
    sampler = InfiniteSampler(len(ds), seed=0, rank=rank, world_size=world, start=step * global_batch)
    loader = DataLoader(ds, batch_size=b, sampler=sampler, collate_fn=ds.collate_fn, num_workers=8)
"""

from .augment import IMAGENET_MEAN, IMAGENET_STD, Normalize
from .base import ArrayImageDataset, MapImageDataset
from .collate import collate_multicrop
from .decode import IMAGE_EXTENSIONS
from .digits import DigitsDataset
from .errors import DECODE_ERRORS, SKIP_CONFIG_KEY, SkipCounter
from .folder import FileImageDataset, FileListDataset, ImageFolderDataset
from .masking import MaskingGenerator
from .npz import NpzDataset
from .sampler import InfiniteSampler, derive_seed, sample_seed
from .shards import make_shards
from .specs import SPEC_KINDS, build_dataset, parse_spec
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
from .wds import WdsDataset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "DECODE_ERRORS",
    "SKIP_CONFIG_KEY",
    "SPEC_KINDS",
    "ArrayImageDataset",
    "CropPlan",
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
    "SyntheticDataset",
    "TexturesDataset",
    "WdsDataset",
    "build_dataset",
    "collate_multicrop",
    "derive_seed",
    "make_dense_eval_transform",
    "make_eval_transform",
    "make_shards",
    "parse_spec",
    "sample_seed",
]
