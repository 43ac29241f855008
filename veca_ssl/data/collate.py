"""Batching multi-crop samples the DINOv2 way (arXiv:2304.07193): crop-major stacks plus iBOT masks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .masking import BatchMasker


def _crop_major(samples: Sequence[dict[str, Any]], key: str) -> list[torch.Tensor]:
    """[s0.c0, s1.c0, …, s0.c1, s1.c1, …]: all samples' crop 0, then all samples' crop 1, …"""
    counts = {len(s[key]) for s in samples}
    if len(counts) != 1:
        raise ValueError(f"every sample needs the same number of {key!r} crops, got counts {sorted(counts)}")
    n = counts.pop()
    return [s[key][i] for i in range(n) for s in samples]


def collate_multicrop(samples: Sequence[dict[str, Any]], local_size: int | None = None,
                      masker: BatchMasker | None = None) -> dict[str, torch.Tensor]:
    """Collate :class:`~veca_ssl.data.ssl.SSLDataset` samples into one batch.

    iBOT masks: with ``masker`` they are drawn here for the whole batch (DINOv2's collate: see
    :class:`~veca_ssl.data.masking.BatchMasker`) from a generator seeded by the samples' ``mask_seed``
    values, so a batch's masks depend only on its samples (same in any worker, after a resume); without
    one, each sample brings its own ``masks`` (2, N).

    Returns:
        ``global_crops`` (2B,3,G,G) and ``local_crops`` (nB,3,L,L), crop-major (all samples' crop 0,
        then all samples' crop 1, … — so ``chunk(2)`` gives the two views); ``local_crops`` is an empty
        (0,3,L,L) tensor without local crops (L = ``local_size``, 0 if not given).
        ``masks`` (2B,N) bool, crop-major like ``global_crops``.
        ``mask_weights`` (2B,N) float: ``1 / (masked tokens of that image)`` at masked tokens, else 0,
        so summing a per-token loss times the weights averages within each image first (iBOT/DINOv2).
        ``mask_indices`` (M,) long: the positions of the M masked tokens in ``masks.flatten()``, in
        ``masks[masks]`` order; ``masked_patch_weights`` (M,) their weights; ``n_masked_patches`` (int) M.
        Computed here, on the CPU, as DINOv2's collate does (``mask_indices_list``, ``masks_weight``,
        ``n_masked_patches``): the training step gathers masked tokens with ``index_select`` instead of
        a boolean mask, whose output size the host would have to wait for on an accelerator.
        ``labels`` (B,) long.
        ``data_seen`` (int) and ``data_skips`` (list of skip records): what the batch cost — attempts
        and the unusable items replaced to make it — so the main process can count skips over all
        DataLoader workers (``veca_ssl.train.data`` removes them before the batch reaches the model).
    """
    if not samples:
        raise ValueError("collate_multicrop got an empty batch")
    global_crops = torch.stack(_crop_major(samples, "global"))
    local_list = _crop_major(samples, "local")
    if local_list:
        local_crops = torch.stack(local_list)
    else:
        size = int(local_size or 0)
        local_crops = global_crops.new_empty((0, global_crops.shape[1], size, size))
    if masker is not None:
        rng = np.random.default_rng([int(s["mask_seed"]) for s in samples])
        grid = (global_crops.shape[-2] // masker.patch_size, global_crops.shape[-1] // masker.patch_size)
        masks = torch.from_numpy(masker(global_crops.shape[0], grid, rng))
    else:
        mask_rows = [s["masks"][i] for i in range(samples[0]["masks"].shape[0]) for s in samples]
        masks = torch.stack(mask_rows).to(torch.bool)
    counts = masks.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)
    mask_weights = masks.to(torch.float32) / counts
    mask_indices = masks.flatten().nonzero().flatten()
    labels = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)
    skips = [rec for s in samples for rec in s.get("skips", ())]
    return {
        "global_crops": global_crops,
        "local_crops": local_crops,
        "masks": masks,
        "mask_weights": mask_weights,
        "mask_indices": mask_indices,
        "masked_patch_weights": mask_weights.flatten().index_select(0, mask_indices),
        "n_masked_patches": int(mask_indices.numel()),
        "labels": labels,
        "data_seen": len(samples) + len(skips),
        "data_skips": skips,
    }
