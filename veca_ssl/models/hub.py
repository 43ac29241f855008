"""The torch.hub entry points of ``hubconf.py``: one function per backbone preset.

Each entry point takes DINOv2's and DINOv3's hub keywords: ``pretrained`` (bool, as DINOv2;
``pretrained=PATH`` is kept as a shorthand for ``weights=PATH``), ``weights`` (a local file, as DINOv3's
``weights=<path>``) and DINOv2's model keywords, translated to ours (``_DINOV2_KWARGS``). veca-ssl bundles
no weights and downloads nothing, so ``pretrained=True`` needs ``weights=``. The model comes back in
eval mode, like ``load_backbone``'s (``.train()`` to train it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .base import Backbone
from .io import load_backbone
from .registry import PRESETS, build_backbone
from .veca import VECA

# what a pretrained file must share with the preset it is loaded as
_ARCH_KEYS = ("embed_dim", "depth", "num_heads")

# DINOv2's model keywords (dinov2/hub/backbones.py, vision_transformer.py) -> ours
_DINOV2_KWARGS = {"init_values": "layerscale_init", "num_register_tokens": "num_registers",
                  "interpolate_antialias": "pos_interp_antialias", "interpolate_offset": "pos_interp_offset"}
# DINOv2/DINOv3 keywords that change nothing here: block_chunks only groups blocks for FSDP, for_onnx picks
# an export-friendly attention (ours always is), check_hash checks a download's file name (we download
# nothing); img_size sizes a position table (VECA has none: RoPE works at any resolution; for a dense ViT
# it is translated to pos_embed_grid below)
_NO_EFFECT = ("block_chunks", "for_onnx", "check_hash")
# the position-table keywords of a dense ViT, meaningless for VECA (no table to size or interpolate)
_POS_TABLE = ("img_size", "interpolate_antialias", "interpolate_offset", "pos_interp_antialias",
              "pos_interp_offset")


class HubError(ValueError):
    """A hub call that cannot be served (e.g. ``pretrained=True`` without ``weights=``)."""


def _model_kwargs(name: str, kwargs: dict) -> dict:
    """DINOv2's keywords of a random init, in our constructor's terms."""
    kwargs = {_DINOV2_KWARGS.get(k, k): v for k, v in kwargs.items() if k not in _NO_EFFECT}
    if kwargs.get("ffn_layer") in ("swiglufused", "swiglu"):  # DINOv2's fused SwiGLU is the same function
        kwargs["ffn_layer"] = "swiglu"
    if PRESETS[name].cls is VECA:
        if kwargs.get("num_registers"):
            raise HubError(f"{name}: num_register_tokens={kwargs['num_registers']}: VECA has no register tokens "
                           f"(its core tokens play that role; num_cores= sets the bank)")
        kwargs.pop("num_registers", None)
        for key in _POS_TABLE:
            kwargs.pop(key, None)
    elif "img_size" in kwargs:
        img_size = kwargs.pop("img_size")
        side = img_size if isinstance(img_size, int) else img_size[0]
        kwargs.setdefault("pos_embed_grid", side // int(kwargs.get("patch_size", 16)))
    return kwargs


def _weights_path(name: str, pretrained: bool | str | Path | None, weights: str | Path | None) -> str | Path | None:
    """The local weights file a call asks for (None: random init); HubError for contradictory arguments."""
    if isinstance(pretrained, str | Path):  # our older spelling: pretrained=PATH
        if weights is not None and str(weights) != str(pretrained):
            raise HubError(f"{name}: pretrained={str(pretrained)!r} and weights={str(weights)!r} name two files; "
                           f"pass weights=PATH alone")
        weights, pretrained = pretrained, True
    if pretrained is False and weights is not None:
        raise HubError(f"{name}: pretrained=False but weights={str(weights)!r}; drop pretrained=False to load "
                       f"the weights, or drop weights= for a random init")
    if pretrained and weights is None:
        raise HubError(f"{name}: pretrained=True, but veca-ssl bundles no weights and downloads nothing; pass "
                       f"weights=<path> (an export, checkpoint, run directory or VECA reference checkpoint), or "
                       f"pretrained=False for a random init")
    if weights is not None:
        text = str(weights)
        if "://" in text:
            raise HubError(f"{name}: weights={text!r} is a URL; veca-ssl downloads nothing: download the file "
                           f"and pass weights=<its local path>")
        if not Path(text).expanduser().exists():
            raise HubError(f"{name}: weights={text!r} is not a local file or directory; pass weights=<path> (an "
                           f"export, checkpoint, run directory or VECA reference checkpoint) — no named weights "
                           f"are bundled")
        weights = Path(text).expanduser()
    return weights


def hub_model(name: str, pretrained: bool | str | Path | None = None, weights: str | Path | None = None,
              **kwargs) -> Backbone:
    """Preset ``name`` in eval mode: randomly initialised (``kwargs``: ``build_backbone``'s and DINOv2's model
    keywords), or with the weights of the local file ``weights`` (``kwargs`` then go to ``load_backbone``,
    e.g. ``which="student"``), checked to have the preset's architecture."""
    if name not in PRESETS:
        raise ValueError(f"unknown backbone preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    path = _weights_path(name, pretrained, weights)
    if path is None:
        return build_backbone(name, **_model_kwargs(name, kwargs)).eval()
    model = load_backbone(path, **{k: v for k, v in kwargs.items() if k not in _NO_EFFECT})
    preset = PRESETS[name]
    wrong = {k: (model.config.get(k), v) for k, v in preset.defaults.items()
             if k in _ARCH_KEYS and model.config.get(k) != v}
    if not isinstance(model, preset.cls) or wrong:
        found = f"{model.config.get('arch')} " + ", ".join(f"{k}={model.config.get(k)}" for k in _ARCH_KEYS)
        raise ValueError(f"weights={str(path)!r} holds a {found}, not a {name} "
                         f"({', '.join(f'{k}={v}' for k, v in preset.defaults.items() if k in _ARCH_KEYS)}); "
                         f"load it with the matching entry point or veca_ssl.models.load_backbone")
    return model.eval()


def _entry(name: str) -> Callable[..., Backbone]:
    preset = PRESETS[name]

    def entry(*args, pretrained: bool | str | Path | None = None, weights: str | Path | None = None,
              **kwargs) -> Backbone:
        if args:  # DINOv2's entry points are keyword-only too; a positional path is the likely mistake
            raise HubError(f"{name}: arguments are keywords only, e.g. weights={args[0]!r} or pretrained=False")
        return hub_model(name, pretrained, weights, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"{preset.description}, in eval mode.\n\n``weights=PATH`` loads local weights (load_backbone; "
                     f"``pretrained=True`` needs it: no weights are bundled); otherwise a random init, ``kwargs`` as "
                     f"build_backbone or DINOv2's (img_size, init_values, ffn_layer, num_register_tokens, …).")
    return entry


def entrypoints() -> dict[str, Callable[..., Backbone]]:
    """``{preset name: entry point}`` for every registered preset."""
    return {name: _entry(name) for name in sorted(PRESETS)}
