"""Start a freshly built backbone from existing weights (``model.init_from=PATH``).

Any file ``read_backbone`` can load is a source: our exports and checkpoints, VECA reference
checkpoints, DINOv2/DINOv3/timm dense teachers. Tensors are matched by our names after conversion:

* **loaded** — same name and shape, taken unchanged from a file in our own format;
* **converted** — taken from a foreign layout (renamed, fused, permuted; see ``provenance``), or
  resized: a learned position table resampled to this model's grid (as the source model would at
  that grid), a core bank cut to a smaller bank or filling the first rows of a larger one;
* **new** — this model has it and the source does not (or the converter only filled a neutral
  value, e.g. the reference has no iBOT mask token): it keeps its fresh initialisation;
* **unused** — the source has it and this model does not (e.g. a distilled model's ``output_proj``
  loaded into a backbone built without ``output_dim``).

Only the optional extras (the mask token, an output projection) may be new or unused. Any other
tensor on one side only, and any other shape mismatch, is an error that lists the tensors and the
configuration differences that explain them, so a run never starts half-initialised by accident.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .base import Backbone
from .io import EXPORT_FORMAT_NAME, read_backbone

# config keys that describe training-time behaviour or runtime choices, not the function computed
_RUNTIME_KEYS = {"drop_path_rate", "attn_backend", "grad_checkpointing", "coord_alpha_init", "coord_shift",
                 "coord_rescale", "coord_jitter", "layerscale_init", "num_cores"}
_BANK_KEYS = ("cores", "core_coords")
# tensors that may exist on one side only: the iBOT mask token (training only; zero-initialised) and
# a distilled model's projection to its teacher's width (not part of the native features)
_OPTIONAL = ("mask_token", "output_proj.")


@dataclass
class InitReport:
    """What ``init_from`` did to each tensor of the target backbone (see module doc)."""

    source: str
    fmt: str
    loaded: list[str] = field(default_factory=list)
    converted: dict[str, str] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    config_differences: dict[str, tuple] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self, limit: int = 8) -> str:
        def names(items) -> str:
            items = list(items)
            more = f" … (+{len(items) - limit})" if len(items) > limit else ""
            return ", ".join(items[:limit]) + more

        lines = [f"init_from {self.source} ({self.fmt}): {len(self.loaded)} loaded, {len(self.converted)} "
                 f"converted, {len(self.new)} newly initialised, {len(self.unused)} unused"]
        if self.converted:
            lines.append("  converted: " + names(f"{k} <- {v}" for k, v in self.converted.items()))
        if self.new:
            lines.append("  newly initialised: " + names(self.new))
        if self.unused:
            lines.append("  unused (not in this model): " + names(self.unused))
        if self.config_differences:
            diffs = ", ".join(f"{k}: source {a!r} vs this model {b!r}" for k, (a, b) in self.config_differences.items())
            lines.append(f"  config differences (the function changes): {diffs}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _config_differences(source: Backbone, target: Backbone) -> dict[str, tuple]:
    a, b = source.config, target.config
    keys = sorted((set(a) | set(b)) - _RUNTIME_KEYS)
    out = {}
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if k in ("ffn_align", "ffn_hidden", "ffn_ratio"):  # compared through the width they produce
            continue
        if va != vb:
            out[k] = (va, vb)
    ha, hb = getattr(source, "ffn_hidden", None), getattr(target, "ffn_hidden", None)
    if ha != hb:
        out["ffn_hidden"] = (ha, hb)
    return out


@torch.no_grad()
def init_from(backbone: Backbone, path: str | Path, **load_kwargs) -> InitReport:
    """Copy the weights of ``path`` into ``backbone`` in place and return what happened to each tensor.

    ``load_kwargs`` go to ``read_backbone`` (e.g. ``arch=`` for an external teacher, ``which="student"``
    for our training checkpoints). Raises ``ValueError`` listing the tensors whose shapes cannot be
    reconciled, with the configuration differences that explain them.
    """
    loaded = read_backbone(path, **load_kwargs)
    src_model = loaded.model
    report = InitReport(str(path), loaded.fmt, notes=list(loaded.notes))
    report.config_differences = _config_differences(src_model, backbone)
    src = src_model.state_dict()
    dst = backbone.state_dict()
    updates: dict[str, Tensor] = {}
    mismatched: list[str] = []
    foreign = loaded.fmt != EXPORT_FORMAT_NAME
    for name, target in dst.items():
        if name not in src or name in loaded.synthesized:
            report.new.append(name)
            continue
        value = src[name]
        how = loaded.provenance.get(name, name) if foreign else None
        if value.shape != target.shape:
            resized = _resize(name, value, target, src_model, backbone)
            if resized is None:
                mismatched.append(f"{name}: source {tuple(value.shape)} vs this model {tuple(target.shape)}")
                continue
            value, what = resized
            how = f"{how or name} ({what})"
        updates[name] = value.to(target.dtype)
        if how is None:
            report.loaded.append(name)
        else:
            report.converted[name] = how
    report.unused = sorted(k for k in src if k not in dst)
    # tensors without a counterpart mean another layout (e.g. GELU MLP vs SwiGLU, layer-scale or not);
    # only the optional extras may be missing on either side
    mismatched += [f"{k}: only in this model" for k in report.new if not k.startswith(_OPTIONAL)]
    mismatched += [f"{k}: only in the source" for k in report.unused if not k.startswith(_OPTIONAL)]
    if mismatched:
        diffs = ", ".join(f"{k}={a!r} (this model {b!r})" for k, (a, b) in report.config_differences.items())
        raise ValueError(f"init_from {path}: {len(mismatched)} tensor(s) do not fit this model: "
                         f"{'; '.join(mismatched[:10])}{' …' if len(mismatched) > 10 else ''}. The source differs "
                         f"in: {diffs or 'nothing in its config'}; set the model options to match (e.g. "
                         f"model.overrides)")
    for name, value in updates.items():
        dst[name].copy_(value)
    if report.config_differences:
        report.notes.append("the source's config differs from this model's: training starts from its weights in "
                            "a different network, not from the same function")
    return report


def _resize(name: str, value: Tensor, target: Tensor, source: Backbone, model: Backbone) -> tuple[Tensor, str] | None:
    """A source tensor of another shape adapted to ``target``'s, or None when that has no meaning."""
    if name in _BANK_KEYS and value.shape[1:] == target.shape[1:]:
        m_src, m_dst = value.shape[0], target.shape[0]
        if m_src >= m_dst:
            return value[:m_dst], f"first {m_dst} of {m_src} cores"
        out = target.clone()  # a larger bank: the source's cores first, the rest keep their init
        out[:m_src] = value
        return out, f"{m_src} cores into the first rows of {m_dst}; the rest newly initialised"
    if name == "pos_embed" and getattr(source, "pos_embed", None) is not None and value.shape[-1] == target.shape[-1]:
        grid = getattr(model, "config", {}).get("pos_embed_grid")
        if grid and target.shape[1] == 1 + grid * grid:
            table = source.interpolate_pos_embed((grid, grid)).detach()
            m = source.config["pos_embed_grid"]
            return table, f"resampled from a {m}x{m} to a {grid}x{grid} grid"
    return None


def initial_backbone(cfg) -> tuple[Backbone, InitReport | None]:
    """The training backbone at step 0: built from the global RNG (seed it first), then
    ``model.init_from``'s weights copied in when set. Returns it with the init report (None without
    ``init_from``); a bad ``init_from`` raises ``ConfigError`` naming the option."""
    from veca_ssl.config import ConfigError, build_model

    backbone = build_model(cfg)
    if not cfg.model.init_from:
        return backbone, None
    try:
        return backbone, init_from(backbone, cfg.model.init_from)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"model.init_from: {exc}") from None
