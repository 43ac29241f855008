"""Turning a built method into its parallel form, from the config, in one place.

``parallelize_method(method, cfg, info)`` applies, in this order (the order of DINOv3's
``ac_compile_parallelize`` and torchtitan's ``parallelize``), to the student and to its EMA teacher:

1. activation checkpointing of the student's blocks (``model.grad_checkpointing``; never the teacher,
   which runs without gradients);
2. ``torch.compile`` of every transformer block (``train.compile``: ``none | default | max-autotune``),
   in place (``nn.Module.compile``) so parameter names, checkpoints and the EMA pairing are unchanged;
3. data parallelism (``train.parallel``): ``ddp`` wraps the student in DistributedDataParallel, kept
   outside the module tree; ``fsdp2`` shards student *and* teacher in place with FSDP2
   (``fully_shard``): every block, the backbone's own parameters (patch embedding, core bank, core
   coordinates, final norm), and each head, with the same mesh and grouping on both networks, so the
   EMA update pairs local shards and needs no communication.

Elastic core widths and DDP: a VECA backbone keeps its core bank as ONE parameter ``cores`` (M, D)
and a forward at width C uses the slice ``cores[:C]``. Autograd then gives the whole parameter a
gradient whose rows >= C are exactly zero, so every parameter takes part in every backward and DDP
needs neither ``find_unused_parameters=True`` (an extra graph traversal per step) nor
``static_graph``. The training loop must pick the same width on every rank (a shared seed),
otherwise ranks would average gradients of different sub-networks.

What works on sharded parameters: the EMA update (``torch._foreach_*`` on DTensors), gradient
clipping (``clip_grad_norm_`` on DTensor gradients returns a replicated DTensor norm), the centring
(``veca_ssl.distributed`` collectives on unsharded loss buffers), and everything that needs whole weights (k-NN monitor,
export, distillation report) through ``gather_full_module``: one collective, a plain copy on every rank.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from veca_ssl.config import COMPILE_MODES, PARALLEL_MODES
from veca_ssl.distributed import DistInfo

log = logging.getLogger(__name__)

# methods FSDP2 must treat like ``forward`` (unshard before, reshard after): training and evaluation
# call the backbone through these, never through ``forward`` alone
_BACKBONE_FORWARD_METHODS = ("forward_features", "get_intermediate_layers")


@dataclass(frozen=True)
class ParallelPlan:
    """What ``parallelize_method`` applied, resolved from the config and the world size."""

    mode: str  # none | ddp | fsdp2 (what runs, after the world size was taken into account)
    compile: str  # none | default | max-autotune
    grad_checkpointing: bool
    param_dtype: torch.dtype | None  # FSDP2 compute dtype of the gathered parameters; None = their own

    @property
    def sharded(self) -> bool:
        """True when student and teacher hold DTensor shards (checkpoints must be sharded too)."""
        return self.mode == "fsdp2"


def resolve_plan(cfg: Any, info: DistInfo) -> ParallelPlan:
    """The plan ``cfg`` asks for on this job. One process needs no data parallelism: ``ddp`` and
    ``fsdp2`` both run the plain modules (and checkpoints are single files) when the world size is 1.

    Raises:
        ValueError: ``train.parallel=none`` in a multi-process job (the ranks would train independent
            models and silently overwrite each other's checkpoints), or an unknown mode.
    """
    requested, compile_mode = str(cfg.train.parallel), str(cfg.train.compile)
    if requested not in PARALLEL_MODES:
        raise ValueError(f"train.parallel={requested!r}; valid: {', '.join(PARALLEL_MODES)}")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"train.compile={compile_mode!r}; valid: {', '.join(COMPILE_MODES)}")
    if info.is_distributed and requested == "none":
        raise ValueError(f"train.parallel=none in a {info.world_size}-process job would train "
                         f"{info.world_size} independent models; use train.parallel=ddp (replicated) or "
                         f"train.parallel=fsdp2 (sharded)")
    mode = requested if info.is_distributed else "none"
    from veca_ssl.method.base import bf16_autocast

    # bf16 compute (autocast) shards gather bf16 parameters and reduce fp32 gradients, on any device
    bf16 = bf16_autocast(str(cfg.train.amp), info.device)
    return ParallelPlan(mode=mode, compile=compile_mode, grad_checkpointing=bool(cfg.model.grad_checkpointing),
                        param_dtype=torch.bfloat16 if (bf16 and mode == "fsdp2") else None)


def parallelize_method(method: Any, cfg: Any, info: DistInfo) -> ParallelPlan:
    """Activation checkpointing, per-block compilation and DDP/FSDP2 for ``method`` (a
    ``veca_ssl.method.base.Method`` already on ``info.device``), as ``cfg`` says. Call it before
    building the optimiser: FSDP2 replaces every parameter by its DTensor shard (same name)."""
    plan = resolve_plan(cfg, info)
    method.student.backbone.set_grad_checkpointing(plan.grad_checkpointing)
    method.teacher.backbone.set_grad_checkpointing(False)  # no gradients, nothing to recompute
    if plan.compile != "none":
        for net in (method.student, method.teacher):
            compile_blocks(net.backbone, plan.compile)
    sync_bn = bool(cfg.dino.head_use_bn) and info.device.type == "cuda"  # BN statistics over the global batch

    def convert_bn(module: nn.Module) -> nn.Module:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module) if sync_bn else module

    if plan.mode == "ddp":
        method.parallelize(lambda student: wrap_ddp(convert_bn(student), info))
    elif plan.mode == "fsdp2":
        mesh = device_mesh(info)
        mp = mp_policy_for(plan.param_dtype)
        method.parallelize(
            lambda student: shard_network(convert_bn(student), mesh, mp, train=True),
            shard_teacher=lambda teacher: shard_network(teacher, mesh, mp, train=False),
        )
    if info.is_main:
        log.info("parallel: %s, compile: %s, activation checkpointing: %s%s", plan.mode, plan.compile,
                 plan.grad_checkpointing, f", FSDP2 params {plan.param_dtype}" if plan.param_dtype else "")
    return plan


# ------------------------------------------------------------------------------------------ compile
def compile_blocks(backbone: nn.Module, mode: str = "default") -> None:
    """``torch.compile`` every block of ``backbone.blocks`` in place (names unchanged).

    Per block rather than the whole network (DINOv3, torchtitan): the blocks are identical, so one
    compiled graph serves all of them; the elastic width and the crop size change only the sequence
    length, which dynamo turns into a dynamic dimension after the second size it sees; and code
    between blocks (core-coordinate updates, RoPE tables) stays eager.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}; valid: {', '.join(COMPILE_MODES)}")
    if mode == "none":
        return
    for block in _blocks(backbone):
        block.compile(mode=None if mode == "default" else mode)


# ---------------------------------------------------------------------------------------------- DDP
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


# -------------------------------------------------------------------------------------------- FSDP2
def device_mesh(info: DistInfo) -> Any:
    """A 1-D mesh over every process of the job (FSDP2 shards over all of them)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(info.device.type, (info.world_size,))


def mp_policy_for(param_dtype: torch.dtype | None) -> Any:
    """bf16 gathered parameters with fp32 gradient reduction (the sharded master weights, the optimiser
    and the EMA stay fp32), or plain fp32 when ``param_dtype`` is None (``train.amp`` resolves to fp32:
    ``off``, or ``auto`` on a CPU)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if param_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def _blocks(backbone: nn.Module) -> nn.ModuleList:
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{type(backbone).__name__} has no transformer blocks (needs .blocks as an "
                         f"nn.ModuleList, got {type(blocks).__name__})")
    return blocks


def shard_network(net: nn.Module, mesh: Any, mp_policy: Any, train: bool) -> nn.Module:
    """Shard ``net`` (a student or teacher network: ``net.backbone`` plus heads/projections) in place
    with FSDP2 and return it. Parameters keep their names and become ``DTensor`` shards (dim 0).

    Units: each block; the backbone's remaining parameters (its forward methods registered with FSDP,
    since the methods call ``backbone.forward_features``, not ``forward``); each other child that holds
    parameters (DINO/iBOT heads, distillation projections); ``net`` itself only when it holds
    parameters of its own.

    Reshard policy (``reshard_after_forward``), always explicit so that FSDP's "the root keeps its
    parameters after forward" heuristic never applies:
      - student (``train=True``): blocks and heads free their gathered parameters after forward and
        gather again in backward (ZeRO-3: the memory FSDP exists for), except the last block, whose
        parameters backward needs first (torchtitan). The backbone's own parameters stay gathered
        from forward to backward: they are small and ``forward_features`` runs several times per step
        (global and local crops, each width).
      - teacher (``train=False``): everything reshards after forward. It never runs backward, so
        nothing else would free the gathered copies, and the EMA update must see the shards.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # FSDP2 warns once per module class that the backbone's outputs (``cls`` = x[:, 0], ``patches``)
    # are views, because an in-place op on one would skip its pre-backward all-gather. Nothing in the
    # methods, losses or heads modifies backbone outputs in place (out-of-place ops only; keep it so).
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor",
                            category=UserWarning)
    kwargs = {"mesh": mesh, "mp_policy": mp_policy}
    backbone = net.backbone
    blocks = _blocks(backbone)
    for i, block in enumerate(blocks):
        fully_shard(block, reshard_after_forward=not train or i < len(blocks) - 1, **kwargs)
    fully_shard(backbone, reshard_after_forward=not train, **kwargs)
    for method_name in _BACKBONE_FORWARD_METHODS:
        register_fsdp_forward_method(backbone, method_name)
    for name, child in net.named_children():
        if name != "backbone" and any(True for _ in child.parameters()):
            fully_shard(child, reshard_after_forward=True, **kwargs)
    if any(True for _ in net.parameters(recurse=False)):
        fully_shard(net, reshard_after_forward=True, **kwargs)
    return net


def apply_fsdp2(
    model: nn.Module,
    info: DistInfo,
    mp_policy: Any = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard a bare module with FSDP2: each of ``model.blocks``, then the root. In place; returns
    ``model``. Training does not call this (``parallelize_method`` shards student and teacher, heads
    included); it is for a backbone used on its own.

    ``mp_policy=None`` means bf16 parameters/compute with fp32 gradient reduction on CUDA and full
    fp32 on CPU. Unchanged when single-process.
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
    from torch.distributed.fsdp import fully_shard

    if mp_policy is None:
        mp_policy = mp_policy_for(torch.bfloat16 if info.device.type == "cuda" else None)
    kwargs: dict[str, Any] = {"mesh": device_mesh(info), "reshard_after_forward": reshard_after_forward,
                              "mp_policy": mp_policy}
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


# ------------------------------------------------------------------------------ sharded parameters
def is_sharded(module: nn.Module) -> bool:
    """True when ``module`` holds DTensor (FSDP2) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def meta_skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters live on the meta device (no memory) and whose buffers are
    real copies (non-persistent buffers such as RoPE tables are in no state dict, so a copy rebuilt
    from one would lack them). ``gather_full_module`` fills it with whole weights."""
    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                            for p in module.parameters()}
    return copy.deepcopy(module, memo)  # a copy drops ``nn.Module.compile``'s state: it runs eagerly


def gather_full_module(module: nn.Module, skeleton: nn.Module) -> nn.Module:
    """Whole weights of a sharded ``module`` as a plain module (a copy of ``skeleton``) on this rank's CPU.

    A collective (every rank calls it, every rank gets the copy): evaluation code splits its data over
    the ranks (``veca_ssl.features``), so each rank needs the whole network. Tensors are gathered one
    at a time and moved to the CPU at once, so the accelerator never holds more than one whole tensor
    beyond the shards.
    """
    from torch.distributed.tensor import DTensor

    full = {}
    for name, tensor in module.state_dict().items():
        whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        full[name] = whole.detach().to("cpu", copy=True)
    plain = copy.deepcopy(skeleton)
    plain.load_state_dict(full, strict=True, assign=True)
    plain.train(module.training)
    return plain


def scalar(value: torch.Tensor | float) -> float:
    """A Python float from a plain tensor or a DTensor (e.g. the gradient norm of sharded gradients;
    its full value, identical on every rank)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.full_tensor()
    return float(value)


__all__ = ["PARALLEL_MODES", "COMPILE_MODES", "ParallelPlan", "resolve_plan", "parallelize_method",
           "compile_blocks", "wrap_ddp", "unwrap_model", "device_mesh", "mp_policy_for", "shard_network", "apply_fsdp2", "is_sharded",
           "meta_skeleton", "gather_full_module", "scalar"]
