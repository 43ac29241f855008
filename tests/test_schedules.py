"""Pure-function schedules and the EMA teacher update."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from veca_ssl.train.ema import ema_update_
from veca_ssl.train.schedules import (
    cosine_schedule,
    lr_schedule,
    momentum_schedule,
    scaled_lr,
    teacher_temperature,
    weight_decay_schedule,
)


def test_cosine_schedule_phases_exact_values() -> None:
    kw = {
        "total_steps": 110,
        "base": 1.0,
        "final": 0.1,
        "warmup_steps": 10,
        "warmup_start": 0.2,
        "freeze_steps": 0,
    }
    assert cosine_schedule(0, **kw) == 0.2
    assert cosine_schedule(5, **kw) == pytest.approx(0.2 + 0.8 * 5 / 10, abs=1e-15)
    assert cosine_schedule(10, **kw) == 1.0  # first cosine step = base
    # 100 cosine steps: middle (k = 50) is the mean of base and final, quarter follows the cosine.
    assert cosine_schedule(60, **kw) == pytest.approx(0.55, abs=1e-15)
    assert cosine_schedule(35, **kw) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 25 / 100)), abs=1e-15
    )
    assert cosine_schedule(109, **kw) == pytest.approx(
        0.1 + 0.45 * (1 + math.cos(math.pi * 99 / 100)), abs=1e-15
    )
    assert cosine_schedule(110, **kw) == 0.1 and cosine_schedule(10_000, **kw) == 0.1
    frozen = dict(kw, freeze_steps=4)
    assert [cosine_schedule(s, **frozen) for s in range(4)] == [0.0] * 4
    assert cosine_schedule(4, **frozen) == 0.2 and cosine_schedule(14, **frozen) == 1.0
    # 96 cosine steps after freeze + warm-up; k = 48 is the middle.
    assert cosine_schedule(62, **frozen) == pytest.approx(0.55, abs=1e-15)
    # No warm-up: starts at base.
    assert cosine_schedule(0, 10, 3.0, 1.0) == 3.0 and cosine_schedule(5, 10, 3.0, 1.0) == pytest.approx(2.0)


def test_cosine_schedule_errors() -> None:
    with pytest.raises(ValueError, match="exceed total_steps"):
        cosine_schedule(0, 10, 1.0, 0.0, warmup_steps=8, freeze_steps=3)
    with pytest.raises(ValueError, match="step must be >= 0"):
        cosine_schedule(-1, 10, 1.0, 0.0)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_schedule(0, 0, 1.0, 0.0)


def test_scaled_lr_rules() -> None:
    assert scaled_lr(0.004, 256, rule="sqrt") == pytest.approx(0.004 * 0.5)
    assert scaled_lr(0.004, 4096, rule="sqrt") == pytest.approx(0.008)
    assert scaled_lr(0.0005, 256, rule="linear") == pytest.approx(0.000125)
    assert scaled_lr(0.1, 64, reference=256, rule="linear") == pytest.approx(0.025)
    assert scaled_lr(0.3, 7, rule="none") == 0.3
    with pytest.raises(ValueError, match="'sqrt', 'linear' or 'none'"):
        scaled_lr(0.1, 64, rule="quadratic")


def test_teacher_temperature_momentum_weight_decay_lr() -> None:
    assert teacher_temperature(0, 30) == 0.04
    assert teacher_temperature(15, 30) == pytest.approx(0.055, abs=1e-15)
    assert teacher_temperature(30, 30) == 0.07 and teacher_temperature(500, 30) == 0.07
    assert teacher_temperature(0, 0) == 0.07  # no warm-up
    assert momentum_schedule(0, 100) == 0.992
    assert momentum_schedule(50, 100) == pytest.approx(0.996, abs=1e-15)
    assert momentum_schedule(100, 100) == 1.0
    assert weight_decay_schedule(0, 100) == 0.04
    assert weight_decay_schedule(50, 100) == pytest.approx(0.22, abs=1e-15)
    assert weight_decay_schedule(100, 100) == 0.4
    assert lr_schedule(0, 100, 1e-3, 1e-6, warmup_steps=10) == 0.0
    assert lr_schedule(5, 100, 1e-3, 1e-6, warmup_steps=10) == pytest.approx(5e-4)
    assert lr_schedule(10, 100, 1e-3, 1e-6, warmup_steps=10) == 1e-3
    assert lr_schedule(3, 100, 1e-3, 1e-6, warmup_steps=10, freeze_steps=5) == 0.0


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
        self.token = nn.Parameter(torch.randn(2, 4))


def test_ema_update_matches_direct_loop_bit_exactly_and_copies_buffers() -> None:
    torch.manual_seed(0)
    student = _Net()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student.body[1].running_mean.add_(1.5)
        student.body[1].num_batches_tracked += 7
    student.token.requires_grad_(False)  # frozen student parameters are still averaged
    reference = copy.deepcopy(teacher)
    m = 0.9
    with torch.no_grad():
        for t, s in zip(reference.parameters(), student.parameters()):
            expected = m * t + (1 - m) * s
            t.mul_(m).add_(s, alpha=1 - m)
            torch.testing.assert_close(t, expected)
    ema_update_(teacher, student, m)
    for (name, t), (_, r) in zip(teacher.named_parameters(), reference.named_parameters()):
        assert torch.equal(t, r), name
    for (name, t), (_, s) in zip(teacher.named_buffers(), student.named_buffers()):
        assert torch.equal(t, s), name
    # m = 1 keeps the teacher, m = 0 copies the student.
    before = [p.clone() for p in teacher.parameters()]
    ema_update_(teacher, student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    ema_update_(teacher, student, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))


def test_ema_update_mismatch_errors() -> None:
    student = _Net()
    other = nn.Sequential(nn.Linear(4, 6))
    with pytest.raises(ValueError, match="only in teacher"):
        ema_update_(other, student, 0.9)
    wrong_shape = _Net()
    wrong_shape.token = nn.Parameter(torch.randn(3, 4))
    with pytest.raises(ValueError, match="'token'"):
        ema_update_(wrong_shape, student, 0.9)
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(copy.deepcopy(student), student, 1.1)
