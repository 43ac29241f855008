"""Behaviour shared by every backbone: the timm/DINOv2-style public API on top of ``_run``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

FEATURE_SPACES = ("native", "teacher")


class Backbone(nn.Module):
    """Uniform API, timm/DINOv2-compatible. Subclasses implement ``_run`` and ``flops``.

    ``_run(images, num_cores, masks, collect)`` returns the final (un-normalised) token sequence, the
    sequences after the blocks whose indices are in ``collect``, the prefix length (tokens before the
    patches), the number of "core" tokens within that prefix, and the patch grid.

    Feature spaces: every backbone produces **native** features (the final LayerNorm's output,
    ``embed_dim`` wide). A backbone with an ``output_proj`` (VECA models distilled by the reference
    code carry one to their teacher's width) also produces **teacher**-space features: the native
    ones through that linear projection, ``teacher_dim`` wide, comparable with the teacher's own.
    ``forward_features(..., space="teacher")`` picks them per call; ``set_feature_space("teacher")``
    makes them the default of every feature method (what ``--features teacher`` of the evaluation
    commands does), and ``num_features`` follows it.
    """

    arch: str = ""
    embed_dim: int
    patch_size: int
    depth: int
    num_heads: int
    norm: nn.Module
    output_proj: nn.Module | None  # set by subclasses that have one; None here (not a class attribute,
    # which would shadow the registered submodule)

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = {"arch": self.arch, **config}
        self.feature_space = "native"
        self.output_proj = None

    # -- subclass hooks ---------------------------------------------------------------------------
    @property
    def budgets(self) -> tuple[int, ...]:
        return ()

    def _run(self, images: Tensor, num_cores: int | None, masks: Tensor | None, collect: set[int]):
        raise NotImplementedError

    def flops(self, height: int, width: int, num_cores: int | None = None) -> float:
        raise NotImplementedError

    # -- feature spaces ---------------------------------------------------------------------------
    @property
    def is_elastic(self) -> bool:
        return bool(self.budgets)

    @property
    def teacher_dim(self) -> int | None:
        """Width of the teacher-space features, or None without an output projection."""
        return None if self.output_proj is None else int(self.output_proj.out_features)

    @property
    def num_features(self) -> int:
        """Width of the features the feature methods return by default (timm/DINOv2 convention)."""
        return self.teacher_dim if self.feature_space == "teacher" else self.embed_dim  # type: ignore[return-value]

    def set_feature_space(self, space: str) -> Backbone:
        """Default space of ``forward_features``/``forward``/intermediate layers: native | teacher."""
        self.feature_space = self._check_space(space)
        return self

    def _check_space(self, space: str | None) -> str:
        space = self.feature_space if space is None else space
        if space not in FEATURE_SPACES:
            raise ValueError(f"feature space {space!r}; valid: {', '.join(FEATURE_SPACES)}")
        if space == "teacher" and self.output_proj is None:
            raise ValueError("teacher-space features need an output projection (output_proj, as in the "
                             "reference's distilled models); this backbone has none: use the native features")
        return space

    # -- public API ---------------------------------------------------------------------------------
    def _split(self, x: Tensor, prefix: int, n_cores: int, grid, space: str = "native") -> dict:
        # index 0 is the image feature: core 0 for VECA, the class token for a dense ViT
        if space == "teacher":
            x = self.output_proj(x)  # type: ignore[misc]
        return {"cls": x[:, 0], "cores": x[:, prefix - n_cores : prefix], "patches": x[:, prefix:],
                "grid": grid}

    def forward_features(self, images: Tensor, num_cores: int | None = None,
                         masks: Tensor | None = None, space: str | None = None) -> dict:
        """Final-normed features: ``cls`` (B,D), ``patches`` (B,N,D), ``cores`` (B,C,D), ``grid`` (Hp,Wp).

        ``masks`` (B, N) bool replaces those patch embeddings with the learned mask token (iBOT).
        ``space``: ``"native"`` or ``"teacher"`` (through ``output_proj``); None = ``feature_space``.
        """
        space = self._check_space(space)
        x, _, prefix, n_cores, grid = self._run(images, num_cores, masks, set())
        return self._split(self.norm(x), prefix, n_cores, grid, space)

    def _block_indices(self, n: int | Sequence[int]) -> list[int]:
        if isinstance(n, int):
            if not 1 <= n <= self.depth:
                raise ValueError(f"intermediate layers n={n} out of range: take 1 to depth={self.depth} last blocks")
            return list(range(self.depth - n, self.depth))
        indices = [int(i) for i in n]
        if not indices or min(indices) < 0 or max(indices) >= self.depth or len(set(indices)) != len(indices):
            raise ValueError(f"intermediate layers {list(n)!r} invalid for depth {self.depth}: give distinct "
                             f"block indices in [0, {self.depth - 1}]")
        return sorted(indices)

    def get_intermediate_features(self, images: Tensor, n: int | Sequence[int] = 1, num_cores: int | None = None,
                                  norm: bool = True, space: str | None = None) -> list[dict]:
        """Our dict form: one ``forward_features``-style dict per block, for the last ``n`` blocks (an
        int) or the block indices in ``n`` (a sequence), in block order (DINOv2's selection rule).

        ``norm`` applies the final LayerNorm to each block's output; teacher-space features need it.
        """
        indices = self._block_indices(n)
        space = self._check_space(space)
        if space == "teacher" and not norm:
            raise ValueError("teacher-space intermediate features are projections of normed tokens; use norm=True")
        _, outs, prefix, n_cores, grid = self._run(images, num_cores, None, set(indices))
        return [self._split(self.norm(outs[i]) if norm else outs[i], prefix, n_cores, grid, space)
                for i in indices]

    def get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True,
                                num_cores: int | None = None) -> tuple:
        """DINOv2's signature and semantics, plus the core width ``num_cores``.

        Returns a tuple with one entry per selected block (the last ``n`` blocks, or the indices in
        ``n``, in block order): the patch tokens (B, N, D) — or (B, D, Hp, Wp) with ``reshape`` —
        or, with ``return_class_token``, ``(patch_tokens, class_token)`` pairs where the class token
        (B, D) is core 0 for VECA and the class token for a dense ViT. Register tokens and the other
        cores are left out, as DINOv2 leaves out its registers.
        """
        feats = self.get_intermediate_features(x, n, num_cores=num_cores, norm=norm)
        patches = [f["patches"] for f in feats]
        if reshape:
            hp, wp = feats[0]["grid"]
            patches = [p.reshape(p.shape[0], hp, wp, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, [f["cls"] for f in feats]))
        return tuple(patches)

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
