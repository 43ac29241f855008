"""Named backbone presets (timm-style registry; no ``__dict__`` look-ups).

Reference VECA families (the paper's): M = 64 cores, widths 8…64 in chunks of 8, SwiGLU hidden
``int(D * 8/3)`` (1024, 2048, 2730 for small, base, large), LayerNorm eps 1e-5 — the numbers of the
reference code, so its checkpoints load into these presets unchanged. ``tiny`` is ours, for CPU
work. ``vit_*`` are dense baselines of identical width, depth, FFN and norms (and, with overrides
such as ``ffn_layer="mlp"``, the layouts of DINOv2/DINOv3/timm teachers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .base import Backbone
from .veca import VECA
from .vit import VisionTransformer


@dataclass(frozen=True)
class Preset:
    name: str
    cls: type[Backbone]
    defaults: dict = field(default_factory=dict)
    description: str = ""


_FAMILIES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}

PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    if preset.name in PRESETS:
        raise ValueError(f"backbone preset {preset.name!r} registered twice")
    PRESETS[preset.name] = preset
    return preset


# the VECA reference's numbers (its LayerNorm default eps and int(dim * 2.66667) SwiGLU width)
_REFERENCE_NUMBERS = dict(norm_eps=1e-5, ffn_align=1)

for _family, _dims in _FAMILIES.items():
    register(Preset(f"veca_{_family}", VECA, dict(_dims, num_cores=64, **_REFERENCE_NUMBERS),
                    f"VECA-{_family[0].upper()}: {_dims['embed_dim']}-d, {_dims['depth']} blocks, 64 cores"))
    register(Preset(f"vit_{_family}", VisionTransformer, dict(_dims, **_REFERENCE_NUMBERS),
                    f"dense ViT-{_family[0].upper()} baseline of the same width and depth"))
register(Preset("vit_giant2", VisionTransformer, dict(embed_dim=1536, depth=40, num_heads=24),
                "dense ViT-g (DINOv2 giant2 layout with SwiGLU)"))

ARCHS: dict[str, type[Backbone]] = {"veca": VECA, "vit": VisionTransformer}
# Values for config keys that a saved config lacks because it was written before the key existed:
# the value that reproduces what that version built. (VECA's SwiGLU width used to be rounded up to a
# multiple of 8; its default is now the reference's plain int. Every other key added since defaults
# to the old behaviour, and norm_eps was always stored.)
_LEGACY_DEFAULTS: dict[str, dict] = {"veca": {"ffn_align": 8}, "vit": {}}


def list_backbones() -> list[str]:
    return sorted(PRESETS)


def build_backbone(name: str, patch_size: int = 16, num_cores: int | None = None, **overrides) -> Backbone:
    """Build a preset: ``build_backbone("veca_small", patch_size=16, num_cores=64, embed_dim=…)``.

    ``num_cores`` sets the size M of the core bank (widths 8, 16, …, M); dense ViTs take none.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown backbone preset {name!r}; valid presets: {', '.join(list_backbones())}")
    preset = PRESETS[name]
    kwargs = dict(preset.defaults, patch_size=patch_size, **overrides)
    if num_cores is not None:
        if preset.cls is not VECA:
            raise ValueError(f"num_cores={num_cores} given to dense preset {name!r}, which has no cores; "
                             f"use num_registers=… for register tokens")
        kwargs["num_cores"] = num_cores
    return _construct(preset.cls, kwargs, name)


def build_from_config(config: dict) -> Backbone:
    """Rebuild a backbone from its ``model.config`` dict (``{"arch": …, **constructor args}``)."""
    config = dict(config)
    arch = config.pop("arch", None)
    if arch not in ARCHS:
        raise ValueError(f"backbone config has arch {arch!r}; valid: {', '.join(ARCHS)}")
    for key, value in _LEGACY_DEFAULTS[arch].items():
        config.setdefault(key, value)
    return _construct(ARCHS[arch], config, arch)


def _construct(cls: Callable[..., Backbone], kwargs: dict, label: str) -> Backbone:
    try:
        return cls(**kwargs)
    except TypeError as exc:  # unknown override: name it with the valid ones
        import inspect

        valid = [p for p in inspect.signature(cls).parameters if p != "self"]
        raise ValueError(f"invalid option for backbone {label!r}: {exc}; valid options: {', '.join(valid)}") \
            from None
