"""Checkpoints of the VECA reference code (arXiv 2605.12491), converted to and from our VECA.

The reference saves ``{"student": state_dict, "config": {plain values}, ...}`` (training state
such as optimiser moments is left out here) or a bare state dict; keys may carry ``module.`` and/or
``student.`` prefixes. Its network, read from its model and config code:

* ``patch_embed.proj`` (conv) [+ ``patch_embed.norm`` when ``patch_embed_use_ln``];
* the core bank as ``M / chunk`` parameters ``query_token_chunks.i`` (1, chunk, D) and the core
  coordinates likewise, ``qcoord_chunks.i`` (1, chunk, 2), stored pre-tanh as **(x, y)**;
* per block ``norm_attn``, ``attn.{q,k,v}_proj`` (separate), ``attn.out_proj``, ``norm_ffn``, SwiGLU
  ``fc1`` (value-gate pair, ``silu(first half) * second half``) and ``fc2``; LayerNorm eps 1e-5;
  hidden ``int(D * mlp_ratio)``; no layer-scale, no drop-path;
* coordinate heads ``pos_linears.i`` (D -> 2, (x, y)) scaled by ``pos_alpha[i]``, applied before
  blocks 1..L-1 to the previous block's core outputs, as ours;
* 2D RoPE (base 100): per head, channel pairs ``(2j, 2j+1)`` for ``j < d/4`` rotate with the x
  coordinate, the next ``d/4`` pairs with y; ``rope_p_zero_freqs`` of the frequencies zeroed from
  the ``rope_zero_freqs_from`` end;
* ``final_norm``, then ``output_proj`` (a Linear to ``distill_output_dim`` in distilled models,
  else absent) applied to cores and patches alike.

Ours rotates pairs ``j < d/4`` with **y** and the rest with x (coordinates (y, x)). Swapping the
two halves of every head's query and key channels, and the two columns of every coordinate
(bank, head rows), maps one network exactly onto the other: a rotation pair meets the same
frequency and the same coordinate, and ``q·k`` is unchanged when q and k are permuted alike.

The reference's ``load_model`` builds its network from the ``model_family`` preset, which overrides
``hidden_dim``, ``num_heads``, ``num_layers``, ``num_query_tokens``, ``mlp_ratio`` and ``dropout``
whatever the config says (default family ``base``). Here the family gives the head count (the one
thing the weights do not hold) and is checked against the weights' width and SwiGLU width; the depth
and the bank size are read from the weights, so checkpoints cut to fewer blocks or cores load too
(a deliberate extension: the reference would refuse them; each such difference is reported).
Every other config field that shapes the network is honoured (patch size, input channels, patch
LayerNorm, RoPE zeroing, coordinate augmentation, chunk size, output projection) or refused with its
name; initialisation-only, training and data fields are listed in ``IGNORED_FIELDS``; unknown
fields are reported and skipped (the reference's loader skips them as well, so they cannot change
the network it builds).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

FORMAT = "veca-reference"

FAMILIES: dict[str, dict] = {
    "small": dict(num_query_tokens=64, hidden_dim=384, num_heads=6, num_layers=12, mlp_ratio=2.66667, dropout=0.0),
    "splus": dict(num_query_tokens=64, hidden_dim=384, num_heads=6, num_layers=12, mlp_ratio=4.0, dropout=0.0),
    "base": dict(num_query_tokens=64, hidden_dim=768, num_heads=12, num_layers=12, mlp_ratio=2.66667, dropout=0.0),
    "large": dict(num_query_tokens=64, hidden_dim=1024, num_heads=16, num_layers=24, mlp_ratio=2.66667,
                  dropout=0.0),
}
REFERENCE_BUDGET_WEIGHTS = (1, 1, 2, 2, 3, 3, 4, 4)
# the reference config's defaults for every field that shapes the network
NETWORK_DEFAULTS: dict = dict(
    model_family="base", patch_size=16, in_channels=3, patch_embed_use_ln=False, rope_shift_coords=0.08,
    rope_jitter_coords=None, rope_rescale_coords=2.0, rope_p_zero_freqs=0.125, rope_zero_freqs_from="low",
    nested_chunk_size=8, nested_budgets=(8, 16, 24, 32, 40, 48, 56, 64),
    nested_budget_weights=REFERENCE_BUDGET_WEIGHTS, distill_output_dim=None,
)
FAMILY_FIELDS = tuple(FAMILIES["base"])
# fields that do not change the network a checkpoint holds: initialisation (the weights replace it),
# teacher, loss, optimiser, schedule, data, logging and file names
IGNORED_FIELDS = frozenset("""
init_patch_from_dinov3 dinov3_timm_name fps_pool_size fps_coord_range
teacher_id teacher_num_register_tokens teacher_compile teacher_compile_mode teacher_dtype
weight_dense dense_norm_eps dense_mse_weight lr lr_min adamw_eps weight_decay mixed_precision
train_dir val_dir index_dir train_index val_index wandb_project wandb_entity wandb_run_name wandb_log_every
normuon_mu normuon_beta2 normuon_nesterov normuon_adjust_lr normuon_use_triton normuon_flatten
normuon_cautious_wd base_seed image_size resize_short val_active_k teacher_microbatch batch_size epochs
warmup_epochs steps_per_epoch num_workers save_every_epochs validate_every_epochs ckpt_name best_ckpt_name
resolutions resize_short_by_res batch_size_by_res teacher_microbatch_by_res phase_a_steps phase_a_probs
total_steps phase_b_probs freeze_pos_steps warmup_steps eval_every_steps save_every_steps milestone_steps
val_steps_by_res val_budgets save_best_by_avg_val always_save_latest train_num_workers val_num_workers
prefetch_factor init_ckpt ft_ckpt_name resume_if_exists resolution_seed
""".split())
_CHUNK_ALIAS = "matryoshka_chunk_size"  # older name of nested_chunk_size, read by the reference loader
_WRAPPERS = ("module.", "student.")
_BANK_KEY = "query_token_chunks.0"


@dataclass
class Conversion:
    """A reference checkpoint as our VECA: constructor ``config``, ``state`` in our names, the source
    of each of our tensors (``provenance``; keys in ``synthesized`` have none and hold a neutral
    value), and ``notes`` on what was read, ignored or differs from the reference's own loader."""

    config: dict
    state: dict[str, Tensor]
    provenance: dict[str, str]
    synthesized: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    reference_config: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ detection
def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPERS:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _unwrap(obj: object) -> tuple[Mapping | None, Mapping | None]:
    """(state, config) as the reference loader reads them, or (None, None) if not that shape."""
    if not isinstance(obj, Mapping):
        return None, None
    if isinstance(obj.get("student"), Mapping):
        config = obj.get("config")
        return obj["student"], config if isinstance(config, Mapping) else None
    return obj, None


def is_reference_checkpoint(obj: object) -> bool:
    """True for a reference VECA checkpoint or state dict (a ``query_token_chunks.0`` tensor)."""
    state, _ = _unwrap(obj)
    return state is not None and any(isinstance(k, str) and _strip(k) == _BANK_KEY for k in state)


# ------------------------------------------------------------------------------------------ reading
def _family_of(dim: int, hidden: int) -> str | None:
    for name, fam in FAMILIES.items():
        if fam["hidden_dim"] == dim and int(fam["hidden_dim"] * fam["mlp_ratio"]) == hidden:
            return name
    return None


def _indexed(state: Mapping[str, Tensor], stem: str, source: str) -> list[int]:
    """The indices ``i`` of keys ``<stem>.<i>…``, checked to be 0..n-1."""
    found = sorted({int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(stem)}\.(\d+)(\.|$)", k))})
    if found != list(range(len(found))):
        raise ValueError(f"{source}: {stem}.<i> indices {found} are not 0..{len(found) - 1}; incomplete state dict?")
    return found


def _tensor(state: Mapping[str, Tensor], key: str, source: str) -> Tensor:
    value = state.get(key)
    if not isinstance(value, Tensor):
        raise ValueError(f"{source}: missing tensor {key!r} of the reference VECA layout")
    return value


def resolve_reference_config(stored: Mapping | None, family_hint: str | None, source: str) -> tuple[dict, list[str]]:
    """The reference's network config: defaults <- stored values <- the family preset (as its loader)."""
    cfg = dict(NETWORK_DEFAULTS)
    notes: list[str] = []
    unknown = []
    for key, value in (stored or {}).items():
        if key == _CHUNK_ALIAS:
            cfg["nested_chunk_size"] = value
        elif key in NETWORK_DEFAULTS or key in FAMILY_FIELDS:
            cfg[key] = value
        elif key not in IGNORED_FIELDS:
            unknown.append(str(key))
    if unknown:
        notes.append(f"config fields unknown to this converter, skipped like the reference's loader does: "
                     f"{', '.join(sorted(unknown))}")
    if stored is None:
        if family_hint is None:
            raise ValueError(f"{source}: a bare reference state dict whose width matches no reference family "
                             f"({', '.join(FAMILIES)}); pass num_heads= to load it")
        cfg["model_family"] = family_hint
        notes.append(f"no config stored: model family {family_hint!r} inferred from the tensor shapes")
    family = str(cfg["model_family"]).lower()
    if family not in FAMILIES:
        raise ValueError(f"{source}: config model_family={cfg['model_family']!r} is not a reference family; "
                         f"valid: {', '.join(FAMILIES)}")
    cfg["model_family"] = family
    overridden = {k: cfg[k] for k in FAMILY_FIELDS if k in cfg and cfg[k] != FAMILIES[family][k]}
    if overridden and stored is not None and any(k in stored for k in overridden):
        notes.append(f"config values {overridden} are replaced by the {family!r} family preset, as the "
                     f"reference's loader does")
    cfg.update(FAMILIES[family])
    return cfg, notes


def convert_reference(obj: object, source: str = "<memory>", num_heads: int | None = None) -> Conversion:
    """Convert a reference checkpoint (or state dict) to our VECA's config and state (see module doc).

    ``num_heads`` overrides the family's head count (for bare state dicts of non-reference widths).
    Raises ``ValueError`` naming ``source`` and the config field or tensor that does not fit.
    """
    raw, stored = _unwrap(obj)
    if raw is None or not is_reference_checkpoint(obj):
        raise ValueError(f"{source}: not a reference VECA checkpoint (no {_BANK_KEY!r} tensor)")
    state: dict[str, Tensor] = {}
    dropped: list[str] = []
    for key, value in raw.items():
        key = _strip(str(key))
        if key.startswith("teacher."):  # the frozen teacher inside the reference's distillation wrapper
            dropped.append(key)
            continue
        if key in state:
            raise ValueError(f"{source}: key {key!r} appears twice after removing module./student. prefixes")
        state[key] = value

    patch_w = _tensor(state, "patch_embed.proj.weight", source)
    dim, in_chans, patch = int(patch_w.shape[0]), int(patch_w.shape[1]), int(patch_w.shape[2])
    chunks = _indexed(state, "query_token_chunks", source)
    blocks = _indexed(state, "blocks", source)
    if not blocks:
        raise ValueError(f"{source}: no transformer blocks (blocks.<i>.…) in the reference state dict")
    depth = len(blocks)
    hidden = int(_tensor(state, "blocks.0.fc2.weight", source).shape[1])
    chunk = int(_tensor(state, _BANK_KEY, source).shape[1])
    num_cores = chunk * len(chunks)

    hint = _family_of(dim, hidden) or ("base" if num_heads is not None else None)
    cfg, notes = resolve_reference_config(stored, hint, source)
    notes += [f"ignored keys of the distillation wrapper's teacher: {len(dropped)} tensors"] if dropped else []
    family, fam = cfg["model_family"], FAMILIES[cfg["model_family"]]
    if num_heads is None:
        if fam["hidden_dim"] != dim:
            raise ValueError(f"{source}: config model_family={family!r} means hidden_dim {fam['hidden_dim']}, but the "
                             f"weights are {dim}-wide (patch_embed.proj.weight {tuple(patch_w.shape)})")
        expected_hidden = int(fam["hidden_dim"] * fam["mlp_ratio"])
        if hidden != expected_hidden:
            raise ValueError(f"{source}: config model_family={family!r} means mlp_ratio {fam['mlp_ratio']} (SwiGLU "
                             f"hidden {expected_hidden}), but blocks.0.fc2.weight holds {hidden}")
        num_heads = fam["num_heads"]
        for key, ours in (("num_layers", depth), ("num_query_tokens", num_cores)):
            if ours != fam[key]:
                notes.append(f"{key}: the weights hold {ours}, the {family!r} preset says {fam[key]}; loaded with "
                             f"{ours} (the reference's own loader would refuse this file)")
    else:
        notes.append(f"num_heads={num_heads} given: the model family's head count and widths are not checked")
    if dim % num_heads or (dim // num_heads) % 4:
        raise ValueError(f"{source}: num_heads={num_heads} does not give a head width divisible by 4 at dim {dim}")

    def need(cond: bool, name: str, message: str) -> None:
        if not cond:
            raise ValueError(f"{source}: config {name}={cfg[name]!r} {message}")

    need(int(cfg["patch_size"]) == patch, "patch_size", f"but patch_embed.proj.weight is {patch}x{patch}")
    need(int(cfg["in_channels"]) == in_chans, "in_channels", f"but patch_embed.proj.weight takes {in_chans} channels")
    need(int(cfg["nested_chunk_size"]) == chunk, "nested_chunk_size", f"but each query_token_chunks.i holds {chunk} "
                                                                      f"cores")
    has_ln = "patch_embed.norm.weight" in state
    need(bool(cfg["patch_embed_use_ln"]) == has_ln, "patch_embed_use_ln",
         "but the weights " + ("hold" if has_ln else "lack") + " patch_embed.norm")
    need(cfg["rope_zero_freqs_from"] in ("low", "high"), "rope_zero_freqs_from", "is not 'low' or 'high'")
    need(0.0 <= float(cfg["rope_p_zero_freqs"]) <= 1.0, "rope_p_zero_freqs", "is not in [0, 1]")
    budgets = [int(b) for b in cfg["nested_budgets"]]
    need(bool(budgets) and all(b % chunk == 0 and 0 < b <= num_cores for b in budgets), "nested_budgets",
         f"must be multiples of the chunk size {chunk} up to the {num_cores} cores held")
    out_dim = cfg["distill_output_dim"]
    wants_proj = out_dim is not None and int(out_dim) != dim
    has_proj = "output_proj.weight" in state
    need(wants_proj == has_proj, "distill_output_dim",
         "but the weights " + ("hold" if has_proj else "lack") + " output_proj")
    if has_proj:
        need(int(state["output_proj.weight"].shape[0]) == int(out_dim), "distill_output_dim",
             f"but output_proj.weight is {tuple(state['output_proj.weight'].shape)}")
    for name in ("rope_shift_coords", "rope_rescale_coords", "rope_jitter_coords"):
        need(cfg[name] is None or float(cfg[name]) >= 0, name, "must be None or >= 0")
    need(cfg["rope_rescale_coords"] is None or float(cfg["rope_rescale_coords"]) > 0, "rope_rescale_coords",
         "must be None or > 0")
    need(cfg["rope_jitter_coords"] is None or float(cfg["rope_jitter_coords"]) > 0, "rope_jitter_coords",
         "must be None or > 0")

    rescale = cfg["rope_rescale_coords"]
    r = 1.0 if rescale is None else max(float(rescale), 1.0 / float(rescale))
    jitter = cfg["rope_jitter_coords"]
    config = dict(
        patch_size=patch, embed_dim=dim, depth=depth, num_heads=num_heads, num_cores=num_cores, core_chunk=chunk,
        ffn_layer="swiglu", ffn_hidden=hidden, ffn_align=1, qkv_bias=True, layerscale_init=None, norm_eps=1e-5,
        rope_base=100.0, rope_zero_fraction=float(cfg["rope_p_zero_freqs"]),
        rope_zero_from=cfg["rope_zero_freqs_from"], coord_shift=float(cfg["rope_shift_coords"] or 0.0),
        coord_rescale=(1.0 / r, r), coord_jitter=None if jitter is None else max(float(jitter), 1.0 / float(jitter)),
        in_chans=in_chans, output_dim=int(out_dim) if has_proj else None, patch_norm=has_ln,
    )
    if budgets != list(range(chunk, num_cores + 1, chunk)):
        notes.append(f"nested_budgets {budgets}: every multiple of {chunk} up to {num_cores} runs here; set "
                     f"widths.choices to train only these")
    mapped, provenance = _map_state(state, depth, num_heads, len(chunks), source)
    if "rope.periods" in state:  # persistent in no released version; checked when present
        _check_periods(state.pop("rope.periods"), config, source)
    return Conversion(config, mapped, provenance, ("mask_token",), notes, cfg)


def _swap_head_halves(w: Tensor, num_heads: int) -> Tensor:
    """Swap the two halves of each head's rows of a q/k projection (weight (D, in) or bias (D,))."""
    shape = w.shape
    hd = shape[0] // num_heads
    w = w.reshape(num_heads, 2, hd // 2, *shape[1:])
    return w.flip(1).reshape(shape)


def _map_state(state: dict[str, Tensor], depth: int, num_heads: int, n_chunks: int,
               source: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    remaining = dict(state)
    out: dict[str, Tensor] = {}
    prov: dict[str, str] = {}

    def take(key: str) -> Tensor:
        if key not in remaining:
            raise ValueError(f"{source}: missing tensor {key!r} of the reference VECA layout")
        return remaining.pop(key)

    def put(ours: str, value: Tensor, how: str) -> None:
        out[ours] = value
        prov[ours] = how

    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight",
                 "patch_embed.norm.bias", "output_proj.weight", "output_proj.bias"):
        if name in remaining:
            put(name, take(name), name)
    put("norm.weight", take("final_norm.weight"), "final_norm.weight")
    put("norm.bias", take("final_norm.bias"), "final_norm.bias")
    bank = [take(f"query_token_chunks.{i}") for i in range(n_chunks)]
    coords = [take(f"qcoord_chunks.{i}") for i in range(n_chunks)]
    span = f"0..{n_chunks - 1}"
    put("cores", torch.cat(bank, dim=1)[0], f"query_token_chunks.{span} (concatenated)")
    put("core_coords", torch.cat(coords, dim=1)[0].flip(-1), f"qcoord_chunks.{span} (concatenated, (x, y) -> (y, x))")
    alpha = take("pos_alpha")
    if alpha.numel() != depth - 1:
        raise ValueError(f"{source}: pos_alpha has {alpha.numel()} entries for {depth} blocks (expected {depth - 1})")
    if depth > 1:
        put("coord_alpha", alpha, "pos_alpha")
    for i in range(depth - 1):
        put(f"coord_heads.{i}.weight", take(f"pos_linears.{i}.weight").flip(0),
            f"pos_linears.{i}.weight (rows (x, y) -> (y, x))")
        put(f"coord_heads.{i}.bias", take(f"pos_linears.{i}.bias").flip(0), f"pos_linears.{i}.bias ((x, y) -> (y, x))")
    for i in range(depth):
        p = f"blocks.{i}."
        for ours, theirs in (("norm1", "norm_attn"), ("norm2", "norm_ffn"), ("attn.proj", "attn.out_proj"),
                             ("mlp.w12", "fc1"), ("mlp.w3", "fc2")):
            for s in ("weight", "bias"):
                put(f"{p}{ours}.{s}", take(f"{p}{theirs}.{s}"), f"{p}{theirs}.{s}")
        for s in ("weight", "bias"):
            q, k, v = (take(f"{p}attn.{n}_proj.{s}") for n in "qkv")
            put(f"{p}attn.qkv.{s}", torch.cat([_swap_head_halves(q, num_heads), _swap_head_halves(k, num_heads), v]),
                f"{p}attn.{{q,k,v}}_proj.{s} (fused; q/k head halves swapped for the (y, x) RoPE layout)")
    remaining.pop("rope.periods", None)
    if remaining:
        raise ValueError(f"{source}: unexpected keys for the reference VECA layout: {sorted(remaining)[:20]}")
    out["mask_token"] = torch.zeros(out["norm.weight"].shape[0], dtype=out["norm.weight"].dtype)
    return out, prov


def _check_periods(periods: Tensor, config: dict, source: str) -> None:
    from .rope import rope_inv_periods

    inv = rope_inv_periods(config["embed_dim"] // config["num_heads"], 100.0, config["rope_zero_fraction"],
                           config["rope_zero_from"]).double()
    theirs = (2 * math.pi / periods.double()).nan_to_num(0.0)  # inf periods are the zeroed frequencies
    if theirs.shape != inv.shape or not torch.allclose(theirs, inv, rtol=1e-5, atol=0):
        raise ValueError(f"{source}: rope.periods do not match base 100 with rope_p_zero_freqs="
                         f"{config['rope_zero_fraction']} ({config['rope_zero_from']})")


# ------------------------------------------------------------------------------------------ writing
def to_reference(model, strict: bool = True) -> tuple[dict, list[str]]:
    """Our VECA as a reference checkpoint ``{"student": state, "config": {...}}`` and notes.

    Exact for everything the reference network can hold: layer-scale is folded into ``out_proj``
    and ``fc2``, absent q/k/v biases become zeros. ``strict`` (default) also requires what the
    reference's ``load_model`` rebuilds from its family presets: the family's depth and 64 cores;
    ``strict=False`` writes other depths/bank sizes (our loader reads them; the reference's does not).
    Raises ``ValueError`` naming the option the reference cannot represent.
    """
    cfg = model.config
    if cfg.get("arch") != "veca":
        raise ValueError(f"the reference layout holds VECA backbones only, not arch={cfg.get('arch')!r}")

    def refuse(name: str, why: str) -> None:
        raise ValueError(f"cannot write the reference layout: {name}={cfg.get(name)!r} {why}")

    if cfg["ffn_layer"] != "swiglu":
        refuse("ffn_layer", "(the reference has SwiGLU feed-forward layers only)")
    if float(cfg["norm_eps"]) != 1e-5:
        refuse("norm_eps", "(the reference's LayerNorms use eps 1e-5)")
    if float(cfg["rope_base"]) != 100.0:
        refuse("rope_base", "(the reference's RoPE base is fixed at 100)")
    lo, hi = (float(v) for v in cfg["coord_rescale"])
    if not math.isclose(lo * hi, 1.0, rel_tol=1e-9) or lo > hi:
        refuse("coord_rescale", "(the reference rescales by a log-uniform factor in [1/r, r])")
    dim, heads, hidden = model.embed_dim, model.num_heads, model.ffn_hidden
    family = next((n for n, f in FAMILIES.items() if (f["hidden_dim"], f["num_heads"], int(f["hidden_dim"] * f[
        "mlp_ratio"])) == (dim, heads, hidden)), None)
    if family is None:
        known = ", ".join(f"{n} {f['hidden_dim']}-d/{f['num_heads']} heads" for n, f in FAMILIES.items())
        raise ValueError(f"cannot write the reference layout: embed_dim={dim}, num_heads={heads}, SwiGLU hidden "
                         f"{hidden} match no reference family ({known})")
    fam = FAMILIES[family]
    if strict:
        if model.depth != fam["num_layers"]:
            refuse("depth", f"(the reference's {family!r} family has {fam['num_layers']} blocks; strict=False "
                            f"writes it anyway, loadable here but not by the reference's load_model)")
        if model.num_cores != fam["num_query_tokens"]:
            refuse("num_cores", f"(the reference's {family!r} family has {fam['num_query_tokens']} cores; "
                                f"strict=False writes it anyway)")
    if model.output_proj is not None and model.output_proj.out_features == dim:
        refuse("output_dim", "(the reference has no projection to its own width: it would be an identity)")

    notes: list[str] = []
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if torch.count_nonzero(sd.pop("mask_token")):
        notes.append("mask_token (iBOT masking, training only) is not part of the reference layout: dropped")
    if float(cfg.get("drop_path_rate") or 0.0) > 0:
        notes.append("drop_path_rate: the reference has no stochastic depth (training only): dropped")
    chunk = int(cfg["core_chunk"])
    out: dict[str, Tensor] = {}
    for name in ("patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight",
                 "patch_embed.norm.bias", "output_proj.weight", "output_proj.bias"):
        if name in sd:
            out[name] = sd.pop(name)
    out["final_norm.weight"], out["final_norm.bias"] = sd.pop("norm.weight"), sd.pop("norm.bias")
    cores, coords = sd.pop("cores"), sd.pop("core_coords").flip(-1)
    for i in range(model.num_cores // chunk):
        out[f"query_token_chunks.{i}"] = cores[i * chunk:(i + 1) * chunk][None].clone()
        out[f"qcoord_chunks.{i}"] = coords[i * chunk:(i + 1) * chunk][None].clone()
    out["pos_alpha"] = sd.pop("coord_alpha") if model.depth > 1 else torch.zeros(0, dtype=cores.dtype)
    for i in range(model.depth - 1):
        out[f"pos_linears.{i}.weight"] = sd.pop(f"coord_heads.{i}.weight").flip(0)
        out[f"pos_linears.{i}.bias"] = sd.pop(f"coord_heads.{i}.bias").flip(0)
    for i in range(model.depth):
        p = f"blocks.{i}."
        for ours, theirs in (("norm1", "norm_attn"), ("norm2", "norm_ffn"), ("mlp.w12", "fc1")):
            for s in ("weight", "bias"):
                out[f"{p}{theirs}.{s}"] = sd.pop(f"{p}{ours}.{s}")
        g1, g2 = sd.pop(f"{p}ls1.gamma", None), sd.pop(f"{p}ls2.gamma", None)
        for ours, theirs, gamma in (("attn.proj", "attn.out_proj", g1), ("mlp.w3", "fc2", g2)):
            w, b = sd.pop(f"{p}{ours}.weight"), sd.pop(f"{p}{ours}.bias")
            out[f"{p}{theirs}.weight"] = w if gamma is None else gamma[:, None] * w  # layer-scale folded
            out[f"{p}{theirs}.bias"] = b if gamma is None else gamma * b
        w = sd.pop(f"{p}attn.qkv.weight")
        b = sd.pop(f"{p}attn.qkv.bias", None)
        b = torch.zeros(w.shape[0], dtype=w.dtype) if b is None else b
        for j, n in enumerate("qkv"):
            wj, bj = w[j * dim:(j + 1) * dim], b[j * dim:(j + 1) * dim]
            if n != "v":
                wj, bj = _swap_head_halves(wj, heads), _swap_head_halves(bj, heads)
            out[f"{p}attn.{n}_proj.weight"], out[f"{p}attn.{n}_proj.bias"] = wj.contiguous(), bj.contiguous()
    if sd:
        raise RuntimeError(f"internal error: tensors not written to the reference layout: {sorted(sd)}")
    if cfg["layerscale_init"] is not None:
        notes.append("layer-scale folded into attn.out_proj and fc2 (same function)")
    n_budgets = model.num_cores // chunk
    rescale = hi if hi != 1.0 else None
    config = dict(
        FAMILIES[family], model_family=family, patch_size=model.patch_size, in_channels=model.patch_embed.in_chans,
        patch_embed_use_ln=model.patch_embed.norm is not None, init_patch_from_dinov3=False,
        rope_shift_coords=float(cfg["coord_shift"]) or None, rope_jitter_coords=cfg.get("coord_jitter"),
        rope_rescale_coords=rescale, rope_p_zero_freqs=float(cfg["rope_zero_fraction"]),
        rope_zero_freqs_from=cfg.get("rope_zero_from", "low"), nested_chunk_size=chunk,
        nested_budgets=tuple(range(chunk, model.num_cores + 1, chunk)),
        nested_budget_weights=REFERENCE_BUDGET_WEIGHTS if n_budgets == 8 else (1,) * n_budgets,
        distill_output_dim=model.output_proj.out_features if model.output_proj is not None else None,
    )
    return {"student": out, "config": config, "format": FORMAT}, notes
