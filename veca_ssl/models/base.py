"""Behaviour shared by every backbone: the timm/DINOv2-style public API on top of ``_run``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Backbone(nn.Module):
    """Uniform API (SPEC §6). Subclasses implement ``_run`` and ``flops``.

    ``_run(images, num_cores, masks, collect)`` returns the final (un-normalised) token sequence, the
    sequences after the blocks whose indices are in ``collect``, the prefix length (tokens before the
    patches), the number of "core" tokens within that prefix, and the patch grid.
    """

    arch: str = ""
    embed_dim: int
    patch_size: int
    depth: int
    num_heads: int
    norm: nn.Module

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = {"arch": self.arch, **config}

    # -- subclass hooks ---------------------------------------------------------------------------
    @property
    def budgets(self) -> tuple[int, ...]:
        return ()

    def _run(self, images: Tensor, num_cores: int | None, masks: Tensor | None, collect: set[int]):
        raise NotImplementedError

    def flops(self, height: int, width: int, num_cores: int | None = None) -> float:
        raise NotImplementedError

    # -- public API ---------------------------------------------------------------------------------
    @property
    def is_elastic(self) -> bool:
        return bool(self.budgets)

    def _split(self, x: Tensor, prefix: int, n_cores: int, grid) -> dict:
        # index 0 is the image feature: core 0 for VECA, the class token for a dense ViT
        return {"cls": x[:, 0], "cores": x[:, prefix - n_cores : prefix], "patches": x[:, prefix:],
                "grid": grid}

    def forward_features(self, images: Tensor, num_cores: int | None = None,
                         masks: Tensor | None = None) -> dict:
        """Final-normed features: ``cls`` (B,D), ``patches`` (B,N,D), ``cores`` (B,C,D), ``grid`` (Hp,Wp).

        ``masks`` (B, N) bool replaces those patch embeddings with the learned mask token (iBOT).
        """
        x, _, prefix, n_cores, grid = self._run(images, num_cores, masks, set())
        return self._split(self.norm(x), prefix, n_cores, grid)

    def get_intermediate_layers(self, images: Tensor, n: int | Sequence[int] = 1, num_cores: int | None = None,
                                norm: bool = True) -> list[dict]:
        """Outputs of the last ``n`` blocks (or of the block indices in ``n``), oldest first (DINOv2)."""
        indices = list(range(self.depth - n, self.depth)) if isinstance(n, int) else list(n)
        if not indices or min(indices) < 0 or max(indices) >= self.depth:
            raise ValueError(f"intermediate layers {n!r} out of range for depth {self.depth}")
        _, outs, prefix, n_cores, grid = self._run(images, num_cores, None, set(indices))
        return [self._split(self.norm(o) if norm else o, prefix, n_cores, grid)
                for i, o in sorted(outs.items()) if i in indices]

    def forward(self, images: Tensor, num_cores: int | None = None) -> Tensor:
        """The image-level feature (B, D)."""
        return self.forward_features(images, num_cores)["cls"]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing activations (training memory ↓)."""
        self.grad_checkpointing = enable

    def _block(self, blk: nn.Module, x: Tensor, *args) -> Tensor:
        if getattr(self, "grad_checkpointing", False) and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, *args, use_reentrant=False)
        return blk(x, *args)


def init_weights(module: nn.Module) -> None:
    """timm/DINOv2 init: truncated normal (std 0.02) linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
