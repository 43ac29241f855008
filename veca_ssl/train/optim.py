"""The optimiser of every training method: DINOv2's AdamW parameter groups, an AdamW whose core bank
behaves like the VECA reference's chunks of separate parameters, and per-sub-module gradient clipping.

Parameter groups — the rule, parameter by parameter (``model`` holds ``backbone.*`` and the heads):

* learning rate: DINOv2's layer-wise decay, ``layerwise_decay ** (depth + 1 - layer_id)`` with layer
  id 0 for ``patch_embed``, ``cls_token``, ``pos_embed`` and ``mask_token``, ``i + 1`` for block
  ``i`` and ``depth + 1`` for everything else of the backbone (final norm, register tokens); heads
  and projections at multiplier 1; ``patch_embed`` additionally times ``patch_embed_lr_mult``.
* weight decay: DINOv2's rule — none on biases, on normalisation parameters (``norm`` in the name) and
  on LayerScale gains (``gamma``); decayed: every other weight, ``cls_token``, ``pos_embed``,
  ``mask_token``, ``register_tokens`` and the prototype layer (DINOv2 decays its weight-norm gain too).
  BatchNorm affine parameters (the optional BN head, which DINOv2 does not have) follow DINO's rule for
  its BN heads: no decay.
* VECA's own parameters follow the reference's optimiser groups: the reference trains the core bank
  chunks, the core-coordinate chunks, the coordinate heads and their gains (``pos_alpha``) in its
  AdamW group, at the base learning rate (it has no layer-wise decay) and with that group's weight
  decay. Here: ``cores``, ``core_coords``, ``coord_heads.*.weight`` and ``coord_alpha`` at lr
  multiplier 1 and decayed like any weight; coordinate-head biases not decayed (the bias rule).
  ``cores`` and ``core_coords`` are in groups of their own, updated chunk by chunk (below).
* the DINO/iBOT head's prototype layer (``last_layer``) is flagged: its lr is 0 during
  ``optim.freeze_last_layer_epochs``.

Chunked core bank (the reference's semantics): the reference stores the bank and its coordinates as
chunks of ``core_chunk`` rows, each a separate parameter, so a chunk outside the step's width gets no
gradient and AdamW skips it — its weights, both moments and its step count stay as they were, and
no weight decay touches it. Here the bank is one (M, D) parameter sliced by the forward (so DDP
needs no ``find_unused_parameters``: rows outside the width get exact-zero gradients), and
:class:`ElasticAdamW` reproduces the reference instead of AdamW's default, which would keep moving
those rows by their stale first moment (with β1 = 0.9, about ten ordinary steps' worth after each use)
and decay them: it updates only the chunks inside the step's width, each with its own step count,
with exactly the arithmetic of ``torch.optim.AdamW`` on a separate parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

#: Backbone parameters at layer id 0 (DINOv2).
_EMBEDDING_PARAMS = ("patch_embed", "cls_token", "pos_embed", "mask_token")
#: VECA's own parameters: the reference's AdamW group (lr multiplier 1, decayed).
_VECA_PARAMS = ("cores", "core_coords", "coord_heads", "coord_alpha")
#: Parameters stored as chunks of ``core_chunk`` rows in the reference (updated chunk by chunk).
CHUNKED_PARAMS = ("backbone.cores", "backbone.core_coords")


def layer_id(name: str, depth: int) -> int:
    """0 for embeddings and tokens, i + 1 for block i, depth + 1 for the rest (DINOv2)."""
    if not name.startswith("backbone."):
        return depth + 1
    sub = name[len("backbone."):]
    if sub.startswith("blocks."):
        return int(sub.split(".")[1]) + 1
    if sub.split(".")[0] in _EMBEDDING_PARAMS:
        return 0
    return depth + 1


def _no_weight_decay(name: str, module: nn.Module | None) -> bool:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    return name.endswith(".bias") or "norm" in name or "gamma" in name


def param_groups(model: nn.Module, depth: int, layerwise_decay: float = 1.0, patch_embed_lr_mult: float = 1.0,
                 core_chunk: int | None = None) -> list[dict]:
    """AdamW groups keyed by (lr multiplier, weight-decay multiplier, last head layer, chunk rows):
    DINOv2's fused groups plus VECA's chunked core bank; see the module docstring for the rule."""
    owners = {f"{mod_name}.{p_name}" if mod_name else p_name: mod
              for mod_name, mod in model.named_modules() for p_name, _ in mod.named_parameters(recurse=False)}
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        veca_own = name.startswith("backbone.") and name.split(".")[1] in _VECA_PARAMS
        lr_mult = 1.0 if veca_own else layerwise_decay ** (depth + 1 - layer_id(name, depth))
        if ".patch_embed." in f".{name}":
            lr_mult *= patch_embed_lr_mult
        wd_mult = 0.0 if _no_weight_decay(name, owners.get(name)) else 1.0
        is_last = "last_layer" in name
        chunk = int(core_chunk) if core_chunk and name in CHUNKED_PARAMS else 0
        key = (round(lr_mult, 12), wd_mult, is_last, chunk)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr_mult": key[0], "wd_mult": wd_mult, "is_last_layer": is_last,
                           "chunk_rows": chunk}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


class ElasticAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` in which groups with ``chunk_rows = k > 0`` hold parameters made of
    chunks of ``k`` rows that behave like separate parameters (see the module docstring).

    Before each ``step`` call :meth:`set_widths` with the step's widths: the chunks of rows
    ``< max(widths)`` are updated, each with its own step count (``state["step"]``); the other
    rows, their moments and step counts stay bit-identical. Widths of ``None`` (a dense model, or the
    whole bank) update every chunk. Other groups are plain AdamW. No closure, AMSGrad, ``maximize``
    or complex parameters in chunked groups (none of them is used in training).
    """

    def __init__(self, params: Iterable, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.active_rows: int | None = None

    def set_widths(self, widths: Sequence[int | None]) -> None:
        self.active_rows = None if any(w is None for w in widths) else max(int(w) for w in widths)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        chunked = [(g, p) for g in self.param_groups if g.get("chunk_rows") for p in g["params"]
                   if p.grad is not None]
        if chunked and (closure is not None or any(g["amsgrad"] or g["maximize"] for g, _ in chunked)):
            raise ValueError("ElasticAdamW: chunked groups support no closure, amsgrad or maximize")
        grads = [p.grad for _, p in chunked]
        for _, p in chunked:  # plain AdamW skips parameters without a gradient
            p.grad = None
        try:
            loss = super().step(closure)
        finally:
            for (_, p), grad in zip(chunked, grads):
                p.grad = grad
        for group, p in chunked:
            self._chunked_step(group, p)
        return loss

    def _chunked_step(self, group: dict, p: torch.Tensor) -> None:
        k = int(group["chunk_rows"])
        if p.shape[0] % k:
            raise ValueError(f"a chunked parameter of {p.shape[0]} rows is not made of chunks of {k}")
        rows = p.shape[0] if self.active_rows is None else min(self.active_rows, p.shape[0])
        if rows % k:
            raise ValueError(f"width {rows} is not a multiple of the core chunk {k}")
        state = self.state[p]
        if not state:
            # one step count per chunk, the same on every rank (a plain tensor, also under FSDP2), on the
            # CPU as torch.optim.AdamW keeps its step counts: reading one never waits for the GPU
            state["step"] = torch.zeros(p.shape[0] // k, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        # FSDP2 shards dim 0: this rank holds global rows [lo, hi); a chunk may straddle two ranks
        param, grad, exp_avg, exp_avg_sq = (_local(t) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"]))
        lo, hi = _local_rows(p)
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        counts = state["step"]
        if counts.device.type != "cpu":  # written by an older version on the parameter's device
            counts = state["step"] = counts.cpu()
        counts[: rows // k] += 1
        steps = counts.tolist()  # a CPU tensor: no device sync
        for c in range(rows // k):
            a, b = max(c * k, lo), min((c + 1) * k, hi)
            if a >= b:
                continue
            sl = slice(a - lo, b - lo)
            step = steps[c]
            # the operations of torch.optim.AdamW's single-tensor path, in its order
            param[sl].mul_(1 - lr * wd)
            exp_avg[sl].lerp_(grad[sl], 1 - beta1)
            exp_avg_sq[sl].mul_(beta2).addcmul_(grad[sl], grad[sl], value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            denom = (exp_avg_sq[sl].sqrt() / (bias_correction2**0.5)).add_(eps)
            param[sl].addcdiv_(exp_avg[sl], denom, value=-(lr / bias_correction1))


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: the local shard of a DTensor, else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _local_rows(p: torch.Tensor) -> tuple[int, int]:
    """Global rows ``[lo, hi)`` of ``p`` held here: all of them, or this rank's dim-0 shard (FSDP2's
    ``Shard(0)``: ``ceil(rows / world)`` rows per rank, the last ranks possibly fewer or none)."""
    if not hasattr(p, "to_local"):
        return 0, p.shape[0]
    from torch.distributed.tensor import Shard

    placements, mesh = p.placements, p.device_mesh
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"chunked parameter with placements {placements}: only a dim-0 shard is supported")
    per_rank = -(-p.shape[0] // mesh.size())
    lo = min(mesh.get_local_rank() * per_rank, p.shape[0])
    return lo, lo + p.to_local().shape[0]


def build_optimizer(model: nn.Module, depth: int, cfg_optim) -> ElasticAdamW:
    """:class:`ElasticAdamW` over ``model``'s trainable parameters in the groups of :func:`param_groups`
    (the chunk size is the backbone's ``core_chunk``; dense backbones have no chunked groups)."""
    backbone = getattr(model, "backbone", None)
    core_chunk = getattr(backbone, "config", {}).get("core_chunk") if backbone is not None else None
    groups = param_groups(model, depth, cfg_optim.layerwise_decay, cfg_optim.patch_embed_lr_mult, core_chunk)
    for g in groups:
        g.pop("names")
    betas = tuple(cfg_optim.adamw_betas)
    # foreach=False: the single-tensor path, whose arithmetic the chunked update reproduces exactly
    return ElasticAdamW(groups, lr=0.0, betas=betas, weight_decay=0.0, foreach=False)


def set_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float, freeze_last_layer: bool) -> None:
    for g in optimizer.param_groups:
        g["lr"] = 0.0 if (freeze_last_layer and g["is_last_layer"]) else lr * g["lr_mult"]
        g["weight_decay"] = wd * g["wd_mult"]


def clip_grad_norms_(student: nn.Module, max_norm: float) -> dict[str, torch.Tensor]:
    """Clip the gradient of each sub-module of ``student`` (backbone, DINO head, iBOT head,
    projections) to ``max_norm`` on its own, as DINOv2 and DINOv3 do; returns each one's norm before
    clipping as a 0-dim tensor on the gradients' device (the training step reads them together with
    its losses; nothing here waits for the device).

    One global norm would let the heads' gradients (several times the backbone's at the start of
    training) set the backbone's clip factor. ``max_norm=inf`` only measures (grads are multiplied
    by exactly 1).
    """
    norms: dict[str, torch.Tensor] = {}
    for name, child in student.named_children():
        params = [p for p in child.parameters() if p.grad is not None]
        if params:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            # FSDP2: a replicated DTensor (its full value on every rank); the plain tensor holding it
            norms[name] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return norms


def total_norm(norms: dict[str, float]) -> float:
    """The root-sum-square of the sub-modules' gradient norms (the norm of the whole gradient)."""
    return sum(v * v for v in norms.values()) ** 0.5


def clip_grad_norms(student: nn.Module, max_norm: float) -> dict[str, float]:
    """:func:`clip_grad_norms_` read on the host as floats, plus their root-sum-square under ``"total"``."""
    norms = {name: float(v) for name, v in clip_grad_norms_(student, max_norm).items()}
    norms["total"] = total_norm(norms)
    return norms
