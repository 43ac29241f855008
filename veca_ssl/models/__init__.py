"""Backbones: VECA (elastic core attention) and dense ViT baselines, with one uniform API."""

from .base import Backbone
from .init import InitReport, init_from
from .io import load_backbone, read_backbone, save_backbone
from .registry import PRESETS, build_backbone, build_from_config, list_backbones
from .veca import VECA, nested_widths
from .vit import VisionTransformer

__all__ = ["Backbone", "VECA", "VisionTransformer", "PRESETS", "build_backbone", "build_from_config",
           "list_backbones", "load_backbone", "read_backbone", "save_backbone", "nested_widths", "init_from",
           "InitReport"]
