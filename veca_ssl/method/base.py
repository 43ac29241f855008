"""The interface between a training method and the training loop.

A method owns three things and one forward:

- ``student``: an ``nn.Module`` holding *every* trainable parameter (backbone, heads, projections).
  It is what the optimiser sees and what data/model parallelism wraps (``parallelize``), so DDP
  averages every gradient and nothing is all-reduced by hand.
- ``teacher``: the exponential moving average of ``student`` (same architecture, no gradients), made
  by :func:`ema_copy` and kept in :func:`teacher_mode`: a deterministic function of its input (no
  drop-path, no coordinate augmentation). Its backbone is what training exports and evaluates
  (``ema_backbone``).
- loss modules with state (e.g. DINO centres), listed by ``loss_modules()`` so they are checkpointed.
- ``forward(batch, widths, teacher_temp) -> dict`` of losses, ``"loss"`` being the one to minimise.

The loop calls ``update_teacher(momentum)`` after each optimiser step and ``state_dict`` /
``load_state_dict`` to checkpoint and resume; it never reaches further into a method.

Parallel form (``veca_ssl.parallelize.parallelize_method`` calls ``parallelize``): DDP wraps the
student from outside; FSDP2 shards student and teacher in place (their parameters become DTensor
shards under the same names), so everything that needs whole weights asks ``full_teacher()``.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from veca_ssl.models.base import Backbone
from veca_ssl.train.ema import ema_update_


def bf16_autocast(amp: str, device: torch.device) -> bool:
    """Whether ``train.amp`` runs the forwards under bf16 autocast on ``device``: ``bf16`` on any device
    (CPU autocast too, so CPU runs exercise the GPU's precision path), ``auto`` on CUDA only, ``off``
    never. Weights, gradients, the optimiser and the EMA stay fp32 either way."""
    return str(amp) == "bf16" or (str(amp) == "auto" and torch.device(device).type == "cuda")


def teacher_mode(teacher: nn.Module) -> nn.Module:
    """Put an EMA teacher in its target-producing mode, in place; returns it.

    Everything is in eval mode — no drop-path, no dropout, no training-time coordinate augmentation —
    as DINOv2, DINOv3 and the VECA reference run their teachers, so the same batch always gives the
    same targets. The one exception is BatchNorm (the DINO head's optional ``use_bn``): it normalises
    with the statistics of the batch it is given and never updates its running buffers. That is what
    DINO's teacher does (its BN heads run in training mode, synchronised across GPUs), and the running
    buffers would be the wrong statistics here: they are copies of the *student's* (other width,
    local crops mixed in, updated with momentum 0.1) and start at mean 0 / variance 1, i.e. no
    normalisation at all in the first steps, which is exactly when the BN head is needed to keep the
    targets from being uniform. Batch statistics keep the output a deterministic function of the
    batch: two calls on one batch give identical targets.
    """
    teacher.eval()
    for module in teacher.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
            module.track_running_stats = False  # batch statistics, running buffers left untouched
    return teacher


def ema_copy(student: nn.Module) -> nn.Module:
    """A gradient-free copy of ``student`` in :func:`teacher_mode`: the EMA teacher at step 0."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher_mode(teacher)


class Method(ABC):
    """A student, its EMA teacher and the losses; see the module docstring for the contract."""

    student: nn.Module
    teacher: nn.Module

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self._engine: nn.Module | None = None
        self._teacher_skeleton: nn.Module | None = None  # set when the teacher is sharded

    # -- what the loop may use --------------------------------------------------------------------------
    @property
    def backbone(self) -> Backbone:
        """The student's backbone (trained by the optimiser)."""
        return self.student.backbone

    @property
    def ema_backbone(self) -> Backbone:
        """The teacher's backbone: the EMA weights that are exported, monitored and evaluated."""
        return self.teacher.backbone

    def loss_modules(self) -> dict[str, nn.Module]:
        """Loss modules whose state (buffers) a resume needs, by checkpoint name."""
        return {}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def to(self, device: torch.device | str) -> Method:
        for module in (self.student, self.teacher, *self.loss_modules().values()):
            module.to(device)
        return self

    def train(self, mode: bool = True) -> Method:
        """Student in training mode; the teacher stays as the subclass keeps it."""
        self.student.train(mode)
        return self

    def parallelize(self, wrap: Callable[[nn.Module], nn.Module],
                    shard_teacher: Callable[[nn.Module], nn.Module] | None = None) -> None:
        """Put the method in its parallel form (``veca_ssl.parallelize.parallelize_method`` decides how).

        ``wrap(student)`` returns what a student forward calls: a wrapper kept outside ``student``
        (DDP), so parameter names, checkpoints and the EMA never see it, or ``student`` itself after
        sharding it in place (FSDP2). ``shard_teacher(teacher)`` shards the EMA teacher in place the same
        way (same units, same mesh), so the EMA update pairs local shards. Call before building the
        optimiser: sharding replaces the parameters.
        """
        if shard_teacher is not None:
            from veca_ssl.parallelize import meta_skeleton

            # the architecture without the weights, to rebuild whole copies from gathered shards
            self._teacher_skeleton = meta_skeleton(self.teacher)
            shard_teacher(self.teacher)
        self._engine = wrap(self.student)

    @property
    def sharded(self) -> bool:
        """True when student and teacher hold DTensor shards (FSDP2)."""
        return self._teacher_skeleton is not None

    def full_teacher(self) -> nn.Module:
        """The EMA teacher with whole weights, for evaluation during and after training (k-NN monitor,
        export, reports). Unsharded: the teacher itself. Sharded: a collective (every rank must call it)
        that returns a plain copy on every rank's CPU (evaluation splits its data over the ranks)."""
        if self._teacher_skeleton is None:
            return self.teacher
        from veca_ssl.parallelize import gather_full_module

        return gather_full_module(self.teacher, self._teacher_skeleton)

    @property
    def engine(self) -> nn.Module:
        """What to call for a student forward: the parallel wrapper when there is one."""
        return self._engine if self._engine is not None else self.student

    @abstractmethod
    def forward(self, batch: dict, widths: Sequence[int | None], teacher_temp: float) -> dict[str, Tensor]:
        """The losses of one step (``"loss"`` is the total to minimise; the other entries are detached)."""

    def __call__(self, batch: dict, widths: Sequence[int | None], teacher_temp: float) -> dict[str, Tensor]:
        return self.forward(batch, widths, teacher_temp)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA step of the teacher towards the student, after the optimiser step."""
        ema_update_(self.teacher, self.student, momentum)

    def state_dict(self) -> dict:
        """Everything of the method a bit-exact resume needs."""
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "loss_state": {name: m.state_dict() for name, m in self.loss_modules().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        for name, module in self.loss_modules().items():
            module.load_state_dict(state.get("loss_state", {})[name])
