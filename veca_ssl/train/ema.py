"""Exponential-moving-average teacher update (mean teacher; DINO arXiv:2104.14294 §3.1, BYOL
arXiv:2006.07733): ``teacher = m * teacher + (1 - m) * student``, parameter by parameter."""

from __future__ import annotations

import torch
from torch import nn


def _match(kind: str, teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor]) -> list[str]:
    """Names common to both, in teacher order; a clear error when the sets differ or shapes mismatch."""
    missing_in_student = [name for name in teacher if name not in student]
    missing_in_teacher = [name for name in student if name not in teacher]
    if missing_in_student or missing_in_teacher:
        raise ValueError(
            f"EMA {kind} mismatch between teacher and student: only in teacher {missing_in_student[:5]}"
            f"{' …' if len(missing_in_student) > 5 else ''}, only in student {missing_in_teacher[:5]}"
            f"{' …' if len(missing_in_teacher) > 5 else ''}; the teacher must be a copy of the student"
        )
    for name, tensor in teacher.items():
        other = student[name]
        if tensor.shape != other.shape or tensor.dtype != other.dtype or tensor.device != other.device:
            raise ValueError(
                f"EMA {kind} {name!r}: teacher {tuple(tensor.shape)} {tensor.dtype} {tensor.device} vs "
                f"student {tuple(other.shape)} {other.dtype} {other.device}"
            )
    return list(teacher)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: ``t = m * t + (1 - m) * s`` for every parameter, matched by name; buffers copied.

    Uses ``torch._foreach_mul_`` / ``torch._foreach_add_`` (one fused kernel launch per group instead of
    one per tensor). Parameters that are frozen in the student (e.g. the head's last layer during the
    first epoch) are averaged like the others: the teacher follows the student's weights, not its
    gradients. Buffers (e.g. BatchNorm statistics) are copied from the student.

    Args:
        teacher: the EMA network (same architecture and parameter names as ``student``).
        student: the trained network.
        momentum: ``m`` in [0, 1]; 1 leaves the teacher unchanged, 0 copies the student.

    Raises:
        ValueError: momentum out of range, or parameter/buffer names, shapes, dtypes or devices differ.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    names = _match("parameter", teacher_params, student_params)
    if names:
        teacher_list = [teacher_params[name] for name in names]
        student_list = [student_params[name].detach() for name in names]
        torch._foreach_mul_(teacher_list, momentum)
        torch._foreach_add_(teacher_list, student_list, alpha=1.0 - momentum)
    teacher_buffers = dict(teacher.named_buffers())
    student_buffers = dict(student.named_buffers())
    for name in _match("buffer", teacher_buffers, student_buffers):
        teacher_buffers[name].copy_(student_buffers[name])
