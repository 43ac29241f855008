"""Frozen dense-ViT teachers from external state dicts, offline.

``backbone_from_state_dict`` turns a DINOv2 (arXiv:2304.07193) torch-hub ``.pth``, a DINOv3
(arXiv:2508.10104) ``.pth`` or a timm ViT state dict into this project's ``VisionTransformer`` with
the uniform backbone API (``veca_ssl.models.base.Backbone``). The architecture is read from key names and tensor shapes (or named with ``arch=``);
every key is consumed or explicitly ignored, and missing or unexpected keys are errors that list them.
``load_backbone(path)`` calls it for any ``.pth``/``.pt`` file that is not a veca-ssl checkpoint.

Real checkpoints and the configuration they load as (all: final LayerNorm, GELU MLP unless noted):

DINOv2 hub files ``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`` — learned positions on a 37×37 grid
(518 px) plus the class position, layer-scale, LayerNorm eps 1e-6:
  * ``dinov2_vits14_pretrain.pth``  → embed 384, 6 heads, 12 blocks, MLP ×4, no registers, positions
    interpolated bicubically in DINOv2's scale-factor form with the +0.1 offset (``pos_interp_offset=0.1``)
  * ``dinov2_vitb14_pretrain.pth``  → 768, 12 heads, 12 blocks;  ``dinov2_vitl14`` → 1024, 16, 24
  * ``dinov2_vitg14_pretrain.pth``  → 1536, 24 heads, 40 blocks, SwiGLU ``w12``/``w3`` with hidden 4096
    (``ffn_ratio=4``: 2/3 · 4 · 1536 rounded up to 8)
  * ``dinov2_vit*14_reg4_pretrain.pth`` → the same plus 4 registers; the hub builds these with
    antialiased bicubic and no offset (``pos_interp_antialias=True``, ``pos_interp_offset=0``)
  * training checkpoints (``{"teacher": {"backbone.…"}}``, ``{"model": {"teacher.backbone.…"}}``,
    BlockChunk keys ``blocks.<chunk>.<i>.…``) load the same way; heads are left out.

DINOv3 files ``dinov3_vit{s,b,l}16_pretrain_<data>-<hash>.pth`` — 2D RoPE (base 100, the stored
``rope_embed.periods`` checked against ours), 4 storage tokens (our registers; unrotated like the class
token), layer-scale, the masked k-bias folded (``qkv.bias * qkv.bias_mask``), LayerNorm eps 1e-5:
  * ``dinov3_vits16`` → 384, 6 heads, 12 blocks, MLP ×4;  ``vitb16`` → 768, 12, 12;  ``vitl16`` → 1024, 16, 24
  * ``dinov3_vits16plus`` / ``vith16plus`` → SwiGLU ``w1``/``w2``/``w3`` (fused into ``w12``), ratio 6
    (384/6/12 and 1280/20/32). ``local_cls_norm`` (training-only) is ignored; untied ``cls_norm`` is refused.

timm ``VisionTransformer`` state dicts (``pytorch_model.bin``/``.pth``) — learned positions resampled
like ``timm.layers.resample_abs_pos_embed`` (antialiased bicubic), LayerNorm eps 1e-6, ``head.*`` and
``fc_norm.*`` (pooling-side) ignored:
  * ``vit_{tiny,small,base,large}_patch16_224.*`` → 192/3, 384/6, 768/12, 1024/16 (12/12/12/24 blocks),
    grid 14 (224 px), class position included in ``pos_embed``, no layer-scale
  * ``vit_{small,base,large}_patch14_dinov2.lvd142m`` → as DINOv2 above (grid 37) with timm's resampling
  * ``vit_*_reg4_dinov2`` (``no_embed_class``: positions cover patches only → class position 0;
    ``reg_token`` → 4 registers); ``vit_giant_patch14_dinov2`` (``SwiGLUPacked`` ``fc1``/``fc2`` → ``w12``/``w3``)
  * refused with a named reason: no class token, CLIP pre-norm (``norm_pre``), qk-norm, average-pooled
    models without a final ``norm``, distillation tokens.

This project's own exports and checkpoints are read by ``io.load_backbone`` directly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from .layers import ffn_hidden_dim
from .rope import rope_inv_periods
from .vit import VisionTransformer

LAYOUTS = ("dinov2", "dinov3", "timm")
# head dim 64 everywhere except where a family says otherwise (num_heads is not stored in the weights)
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1536: 24}
_HEADS_EXTRA = {"dinov3": {1280: 20, 4096: 32}, "timm": {1280: 16, 1408: 16, 1664: 16}}
# containers tried, in order, when the object is not itself a state dict (teacher first: it is the
# EMA model DINO-style recipes evaluate)
_CONTAINERS = ("teacher", "model", "state_dict", "model_ema", "state_dict_ema", "module", "backbone")
_IGNORABLE = {"dinov2": (), "dinov3": ("local_cls_norm.",), "timm": ("head.", "fc_norm.")}
# constructor options that cannot be read from the weights and may be overridden by the caller
OVERRIDABLE = ("pos_interp_offset", "pos_interp_antialias", "norm_eps", "attn_backend", "drop_path_rate",
               "grad_checkpointing", "rope_base")
_PATCH_KEY = "patch_embed.proj.weight"


def backbone_from_state_dict(state_or_checkpoint: object, source: str = "<memory>", arch: str | None = None,
                             img_size: int | tuple[int, int] | None = None, num_heads: int | None = None,
                             **overrides) -> VisionTransformer:
    """Build a frozen-teacher ``VisionTransformer`` from a DINOv2/DINOv3/timm state dict (see module doc).

    ``state_or_checkpoint`` may be wrapped (``{"model"|"state_dict"|"teacher": …}``, ``module.``/
    ``backbone.``/``teacher.backbone.`` prefixes). ``arch`` names the layout (``dinov2``, ``dinov3``,
    ``timm``) when detection from the keys is not wanted. ``img_size``, when given, is the resolution the
    stored position table was trained at and is checked against it (learned positions only; the model
    itself runs at any multiple of the patch size). ``num_heads`` overrides the
    width → heads table. ``overrides`` set options the weights do not determine (``OVERRIDABLE``).
    Returns the model in eval mode; raises ``ValueError`` naming ``source`` for anything that does not fit.
    """
    bad = sorted(set(overrides) - set(OVERRIDABLE))
    if bad:
        raise ValueError(f"{source}: unknown option(s) {bad} for an external teacher; valid: num_heads, "
                         f"{', '.join(OVERRIDABLE)}")
    state = extract_state_dict(state_or_checkpoint, source)
    layout = arch if arch is not None else detect_layout(state, source)
    if layout not in LAYOUTS:
        raise ValueError(f"{source}: unknown arch {layout!r}; valid: {', '.join(LAYOUTS)}")
    config, mapped = _convert(state, layout, source, num_heads, img_size)
    config.update(overrides)
    if "rope_base" in overrides and "rope_embed.periods" in state:
        _check_rope_periods(state["rope_embed.periods"], config, source)
    model = VisionTransformer(**config)
    _load_exact(model, mapped, source, layout)
    # where the weights came from, for init_from's report (timm files have no mask token: zeros)
    model.source_layout = layout
    model.synthesized_keys = () if "mask_token" in state else ("mask_token",)
    return model.eval()


# ------------------------------------------------------------------------------------- unwrapping
def extract_state_dict(obj: object, source: str = "<memory>") -> dict[str, Tensor]:
    """The backbone's own tensors with wrapper prefixes removed and DINOv2 block chunks flattened."""
    found = _find_state(obj, source, depth=0)
    roots = sorted({k[: -len(_PATCH_KEY)] for k in found if k.endswith(_PATCH_KEY)})
    if len(roots) > 1:  # several models in one dict (student + teacher): take the teacher
        preferred = [r for r in roots if "teacher" in r] or [r for r in roots if "ema" in r]
        if len(preferred) != 1:
            raise ValueError(f"{source}: holds several backbones (key prefixes {roots}); save the one "
                             f"to use as a plain state dict")
        roots = preferred
    root = roots[0]
    # keys outside the root (heads, optimiser state …) belong to other modules and are left out
    state = {k[len(root):]: v for k, v in found.items() if k.startswith(root)}
    flat: dict[str, Tensor] = {}
    for key, value in state.items():
        # DINOv2 BlockChunk: blocks.<chunk>.<global index>.… -> blocks.<global index>.…
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)
        if key in flat:
            raise ValueError(f"{source}: key {key!r} appears twice after flattening block chunks")
        flat[key] = value
    return flat


def _find_state(obj: object, source: str, depth: int) -> Mapping:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a state dict (a mapping of names to tensors), got "
                         f"{type(obj).__name__}; is this a model weights file?")
    if any(isinstance(k, str) and k.endswith(_PATCH_KEY) and isinstance(v, Tensor) for k, v in obj.items()):
        return obj
    if depth < 3:
        for name in _CONTAINERS:
            if isinstance(obj.get(name), Mapping):
                try:
                    return _find_state(obj[name], source, depth + 1)
                except ValueError:
                    continue
    keys = sorted(map(str, obj))[:12]
    raise ValueError(f"{source}: not a ViT state dict: no '{_PATCH_KEY}' tensor found (top-level keys: "
                     f"{keys}{' …' if len(obj) > 12 else ''}); expected a DINOv2/DINOv3/timm ViT or a "
                     f"veca-ssl checkpoint")


def detect_layout(state: Mapping[str, Tensor], source: str = "<memory>") -> str:
    """``dinov3`` (storage tokens / RoPE periods / masked k-bias), ``dinov2`` (``pos_embed`` +
    ``mask_token``) or ``timm`` (``pos_embed`` without ``mask_token``)."""
    if ("storage_tokens" in state or "rope_embed.periods" in state
            or any(k.endswith("attn.qkv.bias_mask") for k in state)):
        return "dinov3"
    if "pos_embed" in state and "mask_token" in state:
        return "dinov2"
    if "pos_embed" in state:
        return "timm"
    raise ValueError(f"{source}: cannot tell the ViT layout from its keys (no pos_embed, storage_tokens or "
                     f"rope_embed.periods); pass arch= one of {', '.join(LAYOUTS)}")


# ------------------------------------------------------------------------------------- conversion
class _Taker:
    """Pops external keys into our names, recording the ones that are missing."""

    def __init__(self, state: Mapping[str, Tensor]) -> None:
        self.remaining = dict(state)
        self.missing: list[str] = []
        self.out: dict[str, Tensor] = {}

    def get(self, key: str) -> Tensor | None:
        if key in self.remaining:
            return self.remaining.pop(key)
        self.missing.append(key)
        return None

    def put(self, ours: str, theirs: str | None = None) -> None:
        value = self.get(theirs or ours)
        if value is not None:
            self.out[ours] = value


def _convert(state: dict[str, Tensor], layout: str, source: str, num_heads: int | None,
             img_size) -> tuple[dict, dict[str, Tensor]]:
    patch_w = state.get(_PATCH_KEY)
    if not isinstance(patch_w, Tensor) or patch_w.ndim != 4 or patch_w.shape[2] != patch_w.shape[3]:
        shape = tuple(patch_w.shape) if isinstance(patch_w, Tensor) else None
        raise ValueError(f"{source}: '{_PATCH_KEY}' must be a (D, C, p, p) conv weight, got shape {shape}")
    dim, in_chans, patch = (int(s) for s in patch_w.shape[:3])
    indices = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not indices:
        raise ValueError(f"{source}: no transformer blocks (keys 'blocks.<i>.…') in the state dict")
    depth = max(indices) + 1
    t = _Taker(state)
    reg_key = {"dinov2": "register_tokens", "dinov3": "storage_tokens", "timm": "reg_token"}[layout]
    regs = state.get(reg_key)
    num_registers = int(regs.shape[1]) if isinstance(regs, Tensor) and regs.ndim == 3 else 0
    heads = _num_heads(state, layout, dim, num_heads, source)
    config: dict = dict(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, in_chans=in_chans,
                        num_registers=num_registers, norm_eps=1e-5 if layout == "dinov3" else 1e-6)
    config.update(_blocks(t, state, layout, depth, dim, source))
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "norm.weight", "norm.bias"):
        t.put(name)
    if num_registers:
        t.put("register_tokens", reg_key)

    if layout == "dinov3":
        t.put("mask_token")
        config.update(pos_embed="rope", rope_zero_fraction=0.0)
        periods = t.remaining.pop("rope_embed.periods", None)
        config["rope_base"] = _rope_base_from_periods(periods, config, source) if periods is not None else 100.0
    else:
        pos = t.get("pos_embed")
        grid = _pos_grid(pos, layout, num_registers, source) if pos is not None else None
        if pos is not None and grid is not None:
            t.out["pos_embed"] = _our_pos_embed(pos, grid, layout, num_registers, t)
            config["pos_embed_grid"] = grid
            _check_img_size(img_size, grid, patch, source)
        config["pos_embed"] = "learned"
        if layout == "dinov2":
            t.put("mask_token")
            # the hub's settings: +0.1 scale-factor kludge without registers, antialiased with them
            config.update(pos_interp_offset=0.0 if num_registers else 0.1, pos_interp_antialias=bool(num_registers))
        else:
            config.update(pos_interp_offset=0.0, pos_interp_antialias=True)  # timm resample_abs_pos_embed
            t.remaining.pop("mask_token", None)
    if "mask_token" in t.out:
        t.out["mask_token"] = t.out["mask_token"].reshape(-1)  # (1, D) upstream, (D,) here
    else:
        t.out["mask_token"] = torch.zeros(dim)  # timm has none; only used for iBOT-style masking

    ignorable = _IGNORABLE[layout]
    unexpected = sorted(k for k in t.remaining if not k.startswith(ignorable))
    if t.missing or unexpected:
        raise ValueError(f"{source}: does not match the {layout} ViT layout (embed {dim}, depth {depth}, "
                         f"patch {patch}): missing keys {_short(t.missing)}; unexpected keys "
                         f"{_short(unexpected)}{_hint(layout, t.missing, unexpected)}")
    return config, t.out


def _blocks(t: _Taker, state: Mapping[str, Tensor], layout: str, depth: int, dim: int, source: str) -> dict:
    """Map every block; option flags (biases, layer-scale, FFN type) are read from block 0."""
    b0 = "blocks.0."
    has = {name: b0 + name in state for name in
           ("attn.qkv.bias", "attn.proj.bias", "ls1.gamma", "mlp.fc1.weight", "mlp.w12.weight", "mlp.w1.weight",
            "mlp.fc1_g.weight")}
    if has["mlp.w12.weight"]:
        ffn, out_key = "w12", "mlp.w3.weight"
    elif has["mlp.w1.weight"]:
        ffn, out_key = "w1w2", "mlp.w3.weight"
    elif has["mlp.fc1_g.weight"]:
        ffn, out_key = "gx", "mlp.fc2.weight"
    elif has["mlp.fc1.weight"]:
        fc1, fc2 = state[b0 + "mlp.fc1.weight"], state.get(b0 + "mlp.fc2.weight")
        packed = isinstance(fc2, Tensor) and fc1.shape[0] == 2 * fc2.shape[1]  # timm SwiGLUPacked
        ffn, out_key = ("packed" if packed else "mlp"), "mlp.fc2.weight"
    else:
        raise ValueError(f"{source}: block 0 has no feed-forward weights (mlp.fc1 / mlp.w12 / mlp.w1 / "
                         f"mlp.fc1_g); not a ViT this loader knows")
    out_w = state.get(b0 + out_key)  # the output projection's input width is the hidden width
    if not isinstance(out_w, Tensor) or out_w.ndim != 2:
        raise ValueError(f"{source}: missing or malformed {b0 + out_key}")
    hidden = int(out_w.shape[1])
    ffn_layer = "mlp" if ffn == "mlp" else "swiglu"
    ffn_bias = state.get(b0 + ("mlp.w3.bias" if ffn in ("w12", "w1w2") else "mlp.fc2.bias")) is not None
    for i in range(depth):
        p = f"blocks.{i}."
        for name in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "norm2.weight",
                     "norm2.bias"):
            t.put(p + name)
        if has["attn.qkv.bias"]:
            bias = t.get(p + "attn.qkv.bias")
            mask = t.remaining.pop(p + "attn.qkv.bias_mask", None)
            if bias is not None and mask is not None:  # DINOv3 LinearKMaskedBias: k-bias zeroed by the mask
                if not torch.isfinite(mask).all():
                    raise ValueError(f"{source}: {p}attn.qkv.bias_mask holds NaN/inf (uninitialised?)")
                bias = bias * mask.to(bias.dtype)
            if bias is not None:
                t.out[p + "attn.qkv.bias"] = bias
        if has["attn.proj.bias"]:
            t.put(p + "attn.proj.bias")
        if has["ls1.gamma"]:
            t.put(p + "ls1.gamma")
            t.put(p + "ls2.gamma")
        _ffn(t, p, ffn, ffn_bias)
    return dict(ffn_layer=ffn_layer, ffn_ratio=_ffn_ratio(dim, ffn_layer, hidden, source),
                qkv_bias=has["attn.qkv.bias"], proj_bias=has["attn.proj.bias"], ffn_bias=ffn_bias,
                layerscale_init=1e-5 if has["ls1.gamma"] else None)


def _ffn(t: _Taker, p: str, ffn: str, bias: bool) -> None:
    suffixes = ("weight", "bias") if bias else ("weight",)
    for s in suffixes:
        if ffn == "mlp":
            t.put(f"{p}mlp.fc1.{s}")
            t.put(f"{p}mlp.fc2.{s}")
        elif ffn == "w12":
            t.put(f"{p}mlp.w12.{s}")
            t.put(f"{p}mlp.w3.{s}")
        elif ffn == "packed":
            t.put(f"{p}mlp.w12.{s}", f"{p}mlp.fc1.{s}")
            t.put(f"{p}mlp.w3.{s}", f"{p}mlp.fc2.{s}")
        else:  # two gate/value projections: silu(first) * second, fused in that order
            first, second, out = ("w1", "w2", "w3") if ffn == "w1w2" else ("fc1_g", "fc1_x", "fc2")
            a, b = t.get(f"{p}mlp.{first}.{s}"), t.get(f"{p}mlp.{second}.{s}")
            if a is not None and b is not None:
                t.out[f"{p}mlp.w12.{s}"] = torch.cat([a, b], dim=0)
            t.put(f"{p}mlp.w3.{s}", f"{p}mlp.{out}.{s}")


def _ffn_ratio(dim: int, ffn_layer: str, hidden: int, source: str) -> float:
    """A ratio that reproduces ``hidden`` through ``ffn_hidden_dim``, the plainest one first."""
    exact = hidden * 3 / (2 * dim) if ffn_layer == "swiglu" else hidden / dim
    for ratio in (*(round(exact, k) for k in range(4)), exact, exact + 1e-9):
        if ratio > 0 and ffn_hidden_dim(dim, ffn_layer, ratio) == hidden:
            return float(ratio)
    raise ValueError(f"{source}: {ffn_layer} hidden width {hidden} at embed {dim} is not expressible "
                     f"(SwiGLU widths must be multiples of 8)")


def _num_heads(state: Mapping[str, Tensor], layout: str, dim: int, override: int | None, source: str) -> int:
    periods = state.get("rope_embed.periods")
    from_rope = dim // (4 * periods.numel()) if isinstance(periods, Tensor) and periods.numel() else None
    if override is not None:
        if from_rope is not None and override != from_rope:
            raise ValueError(f"{source}: num_heads={override} but rope_embed.periods has {periods.numel()} "
                             f"entries, i.e. head dim {4 * periods.numel()} → {from_rope} heads")
        heads = override
    elif from_rope is not None:
        heads = from_rope
    else:
        table = {**_HEADS_BY_WIDTH, **_HEADS_EXTRA.get(layout, {})}
        if dim not in table:
            raise ValueError(f"{source}: cannot infer the number of attention heads for embed {dim} (known "
                             f"widths: {sorted(table)}); pass num_heads=")
        heads = table[dim]
    if heads <= 0 or dim % heads:
        raise ValueError(f"{source}: num_heads={heads} does not divide embed {dim}")
    return heads


def _pos_grid(pos: Tensor, layout: str, num_registers: int, source: str) -> int | None:
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise ValueError(f"{source}: pos_embed must be (1, L, D), got {tuple(pos.shape)}")
    length = int(pos.shape[1])
    # DINOv2 and timm's default hold the class position first; timm may also hold register positions
    # (num_prefix_tokens) or, with no_embed_class, patch positions only
    candidates = [1, 1 + num_registers, 0] if layout == "timm" else [1]
    for prefix in dict.fromkeys(candidates):
        m = math.isqrt(max(length - prefix, 0))
        if m > 0 and m * m == length - prefix:
            return m
    raise ValueError(f"{source}: pos_embed has {length} positions, not a square patch grid plus "
                     f"{'/'.join(map(str, candidates))} prefix positions; non-square tables are unsupported")


def _our_pos_embed(pos: Tensor, grid: int, layout: str, num_registers: int, t: _Taker) -> Tensor:
    """(1, 1 + grid², D) with the class position first; timm's variants folded into that form."""
    prefix = int(pos.shape[1]) - grid * grid
    if prefix == 0:  # timm no_embed_class: class token has no position
        return torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    if prefix > 1 and "register_tokens" in t.out:  # timm positions on registers: constants, fold them in
        t.out["register_tokens"] = t.out["register_tokens"] + pos[:, 1:prefix].to(t.out["register_tokens"].dtype)
        return torch.cat([pos[:, :1], pos[:, prefix:]], dim=1)
    return pos


def _check_img_size(img_size, grid: int, patch: int, source: str) -> None:
    if img_size is None:
        return
    hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if hw[0] // patch != grid or hw[1] // patch != grid:
        raise ValueError(f"{source}: img_size={img_size} but the stored position table is a {grid}x{grid} grid "
                         f"({grid * patch} px at patch {patch}); pass img_size={grid * patch} or leave it unset")


def _rope_base_from_periods(periods: Tensor, config: dict, source: str) -> float:
    """DINOv3 stores ``periods = base ** (k / (d/4))``; recover ``base`` and check every entry."""
    n = periods.numel()
    raw = float(periods.double()[1]) ** n if n > 1 else 100.0
    for base in (float(round(raw)), round(raw, 3), raw):  # the plain value when it fits (100 for DINOv3)
        config["rope_base"] = base
        try:
            _check_rope_periods(periods, config, source)
            return base
        except ValueError:
            if base == raw:
                raise
    return raw


def _check_rope_periods(periods: Tensor, config: dict, source: str) -> None:
    head_dim = config["embed_dim"] // config["num_heads"]
    ours = 2 * math.pi / rope_inv_periods(head_dim, config["rope_base"], 0.0).double()
    tol = 1e-5 if periods.dtype in (torch.float32, torch.float64) else 1e-2  # bf16-stored periods
    if periods.shape != ours.shape or not torch.allclose(periods.double(), ours, rtol=tol, atol=0):
        raise ValueError(f"{source}: rope_embed.periods {periods.flatten()[:4].tolist()}… do not match RoPE "
                         f"base {config['rope_base']} at head dim {head_dim} (min/max-period RoPE is unsupported)")


def _load_exact(model: VisionTransformer, mapped: dict[str, Tensor], source: str, layout: str) -> None:
    expected = model.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} vs expected {tuple(expected[k].shape)}" for k, v in mapped.items()
             if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{source}: tensor shapes inconsistent with the inferred {layout} architecture: "
                         f"{_short(wrong)}")
    missing, unexpected = sorted(set(expected) - set(mapped)), sorted(set(mapped) - set(expected))
    if missing or unexpected:  # a converter bug, not a user error: say so
        raise RuntimeError(f"{source}: internal conversion error: missing {missing}, unexpected {unexpected}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in mapped.items()})


def _short(keys: list[str], limit: int = 20) -> str:
    if not keys:
        return "none"
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + "]" + more


def _hint(layout: str, missing: list[str], unexpected: list[str]) -> str:
    if "norm.weight" in missing and layout == "timm":
        return " (an average-pooled timm model without a final norm is not supported)"
    if any(k.startswith("norm_pre.") for k in unexpected):
        return " (CLIP-style pre-norm ViTs are not supported)"
    if any(k.startswith("cls_norm.") for k in unexpected):
        return " (DINOv3 untied class/patch norms are not supported)"
    if "cls_token" in missing:
        return " (models without a class token are not supported)"
    return f" (wrong file, or pass arch= to override the detected '{layout}' layout)"
