"""Turning a built model into its parallel form: DDP or FSDP2, applied outside the model code.

Elastic core budgets and DDP: a VECA backbone keeps its core bank as ONE parameter ``cores`` (M, D)
and a forward at budget C uses the slice ``cores[:C]``. Autograd then gives the whole parameter a
gradient whose rows >= C are exactly zero, so every parameter takes part in every backward and DDP
needs neither ``find_unused_parameters=True`` (an extra graph traversal per step) nor
``static_graph``. The training loop must pick the same budget on every rank (a shared seed),
otherwise ranks would average gradients of different sub-networks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from veca_ssl.distributed import DistInfo


def wrap_ddp(
    model: nn.Module,
    info: DistInfo,
    static_graph: bool = False,
    find_unused_parameters: bool = False,
    **ddp_kwargs: Any,
) -> nn.Module:
    """Move ``model`` to ``info.device`` and wrap it in DistributedDataParallel (unchanged when single).

    ``find_unused_parameters`` stays False for VECA: sliced core banks get zero gradient rows, not
    missing gradients (module docstring). Call backward once per step (sum the losses of several
    budgets first, or use ``model.no_sync()`` for all but the last backward).
    """
    model = model.to(info.device)
    if not info.is_distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(
        model,
        device_ids=device_ids,
        static_graph=static_graph,
        find_unused_parameters=find_unused_parameters,
        **ddp_kwargs,
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside a DDP wrapper (what to checkpoint, EMA from or export)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def apply_fsdp2(
    model: nn.Module,
    info: DistInfo,
    mp_policy: Any = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard ``model`` with FSDP2 (``torch.distributed.fsdp.fully_shard``): each of ``model.blocks``,
    then the root (patch embedding, core bank, norms). In place; returns ``model``.

    ``mp_policy=None`` means bf16 parameters/compute with fp32 gradient reduction on CUDA and full
    fp32 on CPU. Apply it alike to the EMA teacher so the EMA update runs shard-by-shard on local
    DTensor shards. Works on CPU with gloo (used by the tests). Unchanged when single-process.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(
            f"apply_fsdp2 needs model.blocks as an nn.ModuleList, got {type(blocks).__name__} "
            f"on {type(model).__name__}"
        )
    model = model.to(info.device)
    if not info.is_distributed:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mp_policy is None and info.device.type == "cuda":
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model
