"""AdamW parameter groups: no weight decay on norms/biases/tokens/cores, layer-wise lr decay,
a patch-embedding lr multiplier, and a flag for the DINO head's last layer (frozen early on)."""

from __future__ import annotations

import torch
from torch import nn

_EMBEDDING_PARAMS = ("patch_embed", "cls_token", "pos_embed", "register_tokens", "mask_token", "cores",
                     "core_coords")


def layer_id(name: str, depth: int) -> int:
    """0 for embeddings and tokens, i + 1 for block i (and its core-coordinate head), depth + 1 after."""
    if not name.startswith("backbone."):
        return depth + 1
    sub = name[len("backbone."):]
    for prefix in ("blocks.", "coord_heads."):
        if sub.startswith(prefix):
            return int(sub.split(".")[1]) + 1
    if sub.split(".")[0] in _EMBEDDING_PARAMS:
        return 0
    return depth + 1


def param_groups(model: nn.Module, depth: int, layerwise_decay: float = 1.0, patch_embed_lr_mult: float = 1.0,
                 no_wd_keywords: tuple[str, ...] = ()) -> list[dict]:
    """Groups keyed by (lr multiplier, weight-decay multiplier, is last head layer) — DINOv2's fused
    groups. ``model`` holds ``backbone.*`` and head parameters."""
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.split(".")[-1]
        no_wd = p.ndim <= 1 or leaf == "bias" or any(k in name.split(".") for k in no_wd_keywords)
        lr_mult = layerwise_decay ** (depth + 1 - layer_id(name, depth))
        if ".patch_embed." in f".{name}":
            lr_mult *= patch_embed_lr_mult
        is_last = "last_layer" in name
        key = (round(lr_mult, 12), 0.0 if no_wd else 1.0, is_last)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr_mult": key[0], "wd_mult": key[1], "is_last_layer": is_last}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, depth: int, cfg_optim, no_wd_keywords: tuple[str, ...]) -> torch.optim.AdamW:
    groups = param_groups(model, depth, cfg_optim.layerwise_decay, cfg_optim.patch_embed_lr_mult, no_wd_keywords)
    for g in groups:
        g.pop("names")
    betas = tuple(cfg_optim.adamw_betas)
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, weight_decay=0.0)


def set_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float, freeze_last_layer: bool) -> None:
    for g in optimizer.param_groups:
        g["lr"] = 0.0 if (freeze_last_layer and g["is_last_layer"]) else lr * g["lr_mult"]
        g["weight_decay"] = wd * g["wd_mult"]
