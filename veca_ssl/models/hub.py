"""The torch.hub entry points of ``hubconf.py``: one function per backbone preset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .base import Backbone
from .io import load_backbone
from .registry import PRESETS, build_backbone

# what a pretrained file must share with the preset it is loaded as
_ARCH_KEYS = ("embed_dim", "depth", "num_heads")


def hub_model(name: str, pretrained: str | Path | None = None, **kwargs) -> Backbone:
    """Preset ``name``, randomly initialised, or with the weights of ``pretrained`` (a local path)."""
    if name not in PRESETS:
        raise ValueError(f"unknown backbone preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    if pretrained is None:
        return build_backbone(name, **kwargs)
    model = load_backbone(pretrained, **kwargs)
    preset = PRESETS[name]
    wrong = {k: (model.config.get(k), v) for k, v in preset.defaults.items()
             if k in _ARCH_KEYS and model.config.get(k) != v}
    if not isinstance(model, preset.cls) or wrong:
        found = f"{model.config.get('arch')} " + ", ".join(f"{k}={model.config.get(k)}" for k in _ARCH_KEYS)
        raise ValueError(f"pretrained={str(pretrained)!r} holds a {found}, not a {name} "
                         f"({', '.join(f'{k}={v}' for k, v in preset.defaults.items() if k in _ARCH_KEYS)}); "
                         f"load it with the matching entry point or veca_ssl.models.load_backbone")
    return model.eval()


def _entry(name: str) -> Callable[..., Backbone]:
    preset = PRESETS[name]

    def entry(pretrained: str | Path | None = None, **kwargs) -> Backbone:
        return hub_model(name, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"{preset.description}.\n\n``pretrained=PATH`` loads local weights (load_backbone); "
                     f"otherwise a random init, ``kwargs`` as build_backbone.")
    return entry


def entrypoints() -> dict[str, Callable[..., Backbone]]:
    """``{preset name: entry point}`` for every registered preset."""
    return {name: _entry(name) for name in sorted(PRESETS)}
