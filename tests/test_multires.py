"""Multi-resolution training: the schedule, the batch sampler and a resumable tiny run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_train import TINY as TRAIN_TINY  # tests/ is on sys.path (no package, pytest prepend mode)

from veca_ssl.config import ConfigError, load_config
from veca_ssl.data.multires import MultiResBatchSampler
from veca_ssl.data.sampler import InfiniteSampler, sample_seed
from veca_ssl.train.checkpoint import CheckpointManager
from veca_ssl.train.multires import FixedSchedule, MultiResSchedule, Phase, parse_phases

REFERENCE = [Phase(2, (256, 384, 512), (0.2, 0.3, 0.5), (64, 32, 16)), Phase(1, (768,), (1.0,), (8,))]


def test_schedule_follows_probabilities_and_phase_boundaries():
    n, epochs = 1_000_000, 4
    sched = MultiResSchedule(REFERENCE, samples_per_epoch=n, world_size=1, total_epochs=epochs, seed=3)
    # expected batch of phase 0: 0.2 * 64 + 0.3 * 32 + 0.5 * 16 = 30.4; floor(1e6 / 30.4) = floor(32894.7)
    assert sched.steps_per_epoch == (32894, n // 8)
    end0 = sched.step_of_epoch(2)
    assert end0 == 2 * 32894 and sched.phase_at(end0 - 1) == 0 and sched.phase_at(end0) == 1
    # the last phase continues until optim.epochs: 2 more epochs at its own rate
    assert sched.total_steps == end0 + 2 * (n // 8)
    assert [sched.epoch_at(sched.step_of_epoch(e)) for e in range(6)] == list(range(6))
    assert [sched.epoch_at(sched.step_of_epoch(e) - 1) for e in range(1, 6)] == list(range(5))

    batches = sched.global_batches(0, sched.total_steps + 10)
    first, rest = batches[:end0], batches[end0:]
    assert set(rest.tolist()) == {8}  # phase 1 and beyond: 768 px only
    # Frequencies of the 65788 phase-0 draws: the binomial std is at most sqrt(0.25 / 65788) = 0.002, so
    # 0.01 is 5 standard deviations (and the draws are fixed by the seed: no flakiness).
    freqs = np.array([(first == b).mean() for b in (64, 32, 16)])
    assert np.abs(freqs - np.array([0.2, 0.3, 0.5])).max() < 0.01, freqs
    # the scalar and vectorised paths agree, and size goes with its batch size
    table = dict(zip(REFERENCE[0].batch_sizes, REFERENCE[0].sizes))
    for step in (0, 1, 17, end0 - 1, end0, end0 + 5):
        size, b = sched.resolution_at(step)
        assert b == batches[step] and size == (table.get(b) if step < end0 else 768)
    # consecutive steps are not correlated (a broken counter hash would repeat or alternate)
    a, b = first[:-1] == 16, first[1:] == 16
    assert abs(np.mean(a & b) - 0.25) < 0.01


def test_samples_before_is_the_exact_sum_and_zero_probability_is_never_drawn():
    phases = [Phase(1, (16, 32, 48), (0.5, 0.0, 0.5), (3, 5, 7))]
    sched = MultiResSchedule(phases, samples_per_epoch=70_000 * 10, world_size=2, total_epochs=1, seed=0)
    per_step = [sched.resolution_at(s) for s in range(70_000)]  # crosses a cached-block boundary (65536)
    assert {size for size, _ in per_step} == {16, 48}
    cumulative = np.concatenate([[0], np.cumsum([2 * b for _, b in per_step])])
    for step in (0, 1, 2, 1000, 65_535, 65_536, 65_537, 70_000):
        assert sched.samples_before(step) == cumulative[step], step


def test_schedule_is_a_pure_function_of_seed_and_step():
    a = MultiResSchedule(REFERENCE, 100_000, world_size=2, total_epochs=3, seed=7)
    b = MultiResSchedule(REFERENCE, 100_000, world_size=2, total_epochs=3, seed=7)  # "another rank"
    steps = list(range(0, 9000, 7))
    assert [a.resolution_at(s) for s in steps] == [b.resolution_at(s) for s in reversed(steps)][::-1]
    assert a.samples_before(5000) == b.samples_before(5000)
    other = MultiResSchedule(REFERENCE, 100_000, world_size=2, total_epochs=3, seed=8)
    assert [a.resolution_at(s) for s in steps] != [other.resolution_at(s) for s in steps]


def _positions(batches: list[list[tuple[int, int, int]]], seed: int, limit: int) -> list[int]:
    by_seed = {sample_seed(seed, p): p for p in range(limit)}
    return [by_seed[item[1]] for batch in batches for item in batch]


def test_batch_sampler_covers_global_positions_once_across_two_ranks():
    phases = [Phase(1, (16, 32), (0.5, 0.5), (4, 2))]
    sched = MultiResSchedule(phases, samples_per_epoch=30, world_size=2, total_epochs=1, seed=5)
    ranks = [iter(MultiResBatchSampler(30, sched, seed=5, rank=r, world_size=2)) for r in range(2)]
    steps = 40
    per_rank = [[next(it) for _ in range(steps)] for it in ranks]
    for t in range(steps):
        size, b = sched.resolution_at(t)
        for r in range(2):
            assert len(per_rank[r][t]) == b and {item[2] for item in per_rank[r][t]} == {size}
            start = sched.samples_before(t)
            assert _positions([per_rank[r][t]], 5, 1000) == [start + r + 2 * i for i in range(b)]
    total = sched.samples_before(steps)
    seen = sorted(_positions(per_rank[0], 5, 1000) + _positions(per_rank[1], 5, 1000))
    assert seen == list(range(total))  # every global position exactly once
    positions = InfiniteSampler(30, seed=5)
    assert all(item[0] == positions.at(p)[0] for batch in per_rank[0] for item, p in
               zip(batch, _positions([batch], 5, 1000)))
    # a sampler started at step 25 (resume) continues exactly
    resumed = iter(MultiResBatchSampler(30, sched, seed=5, rank=1, world_size=2, start_step=25))
    assert [next(resumed) for _ in range(15)] == per_rank[1][25:]


def test_one_size_reads_what_the_single_resolution_loader_reads():
    fixed = FixedSchedule(32, 4, samples_per_epoch=30, world_size=2, total_epochs=3)
    sched = MultiResSchedule([Phase(3, (32,), (1.0,), (4,))], 30, world_size=2, total_epochs=3, seed=0)
    assert (sched.total_steps, sched.step_of_epoch(1), sched.samples_before(9)) == (
        fixed.total_steps, fixed.step_of_epoch(1), fixed.samples_before(9))
    for rank in range(2):
        flat = iter(InfiniteSampler(30, seed=2, rank=rank, world_size=2, start=fixed.samples_before(3)))
        batches = iter(MultiResBatchSampler(30, sched, seed=2, rank=rank, world_size=2, start_step=3))
        for _ in range(10):
            assert next(batches) == [(*next(flat), 32) for _ in range(4)]


@pytest.mark.parametrize("phase,epochs,match", [
    ("{epochs: 1, sizes: [16, 20], probs: [0.5, 0.5], batch_sizes: [4, 4]}", 2,
     r"multires.phases\[0\].sizes: 20 is not a positive multiple of model.patch_size=8; use e.g. 16"),
    ("{epochs: 1, sizes: [16, 24], probs: [0.5, 0.6], batch_sizes: [4, 4]}", 2,
     r"multires.phases\[0\].probs must be non-negative and sum to 1"),
    ("{epochs: 1, sizes: [16, 24], probs: [1.0], batch_sizes: [4, 4]}", 2,
     r"multires.phases\[0\].probs has 1 entries but sizes \[16, 24\] has 2"),
    ("{epochs: 1, sizes: [16], probs: [1.0], batch_size: [4]}", 2,
     r"multires.phases\[0\]: unknown keys \['batch_size'\], missing keys \['batch_sizes'\]"),
    ("{epochs: 3, sizes: [16], probs: [1.0], batch_sizes: [4]}", 2,
     r"last 3 epochs in total but optim.epochs=2"),
    ("{epochs: 1, sizes: [16], probs: [1.0], batch_sizes: [0]}", 2,
     r"multires.phases\[0\].batch_sizes must be integers >= 1"),
])
def test_bad_phases_name_the_key(phase, epochs, match):
    cfg = OmegaConf.from_dotlist([f"multires.phases=[{phase}]"])
    with pytest.raises(ConfigError, match=match):
        parse_phases(cfg.multires, 8, epochs)
    with pytest.raises(ConfigError, match=match):  # load_config runs the same rules
        load_config(None, ["model.patch_size=8", f"multires.phases=[{phase}]", f"optim.epochs={epochs}"])
    assert parse_phases(load_config(None, []).multires, 8, 2) == []


# --- a tiny end-to-end run: tests/test_train.py's preset, 32 images, no mid-run checkpoints -------------
TINY = TRAIN_TINY + [
    "data.train=synthetic:n=32,size=32,classes=4,seed=0", "train.checkpoint_every=100",
    # phase 0: floor(32 / 6) = 5 steps at 16 px (batch 8) or 32 px (batch 4); phase 1: 8 steps at 32 px
    "multires.phases=[{epochs: 1, sizes: [16, 32], probs: [0.5, 0.5], batch_sizes: [8, 4]},"
    " {epochs: 1, sizes: [32], probs: [1.0], batch_sizes: [4]}]",
]


def _record_batches(monkeypatch, target) -> list[tuple]:
    seen: list[tuple] = []
    original = target.forward

    def recording(self, batch, budgets, teacher_temp=None):
        seen.append((tuple(batch["global_crops"].shape), tuple(batch["local_crops"].shape),
                     tuple(batch["masks"].shape)))
        return original(self, batch, budgets, teacher_temp)

    monkeypatch.setattr(target, "forward", recording)
    return seen


def test_tiny_run_sees_both_sizes_and_resumes_bit_exactly(tmp_path, monkeypatch):
    from veca_ssl.method.ssl import ElasticDINO
    from veca_ssl.train.loop import train

    seen = _record_batches(monkeypatch, ElasticDINO)
    straight = train(load_config(None, TINY + [f"output_dir={tmp_path / 'straight'}"]))
    assert straight["total_steps"] == 13 and len(seen) == 13
    sched = MultiResSchedule(parse_phases(load_config(None, TINY).multires, 8, 2), 32, 1, 2, seed=0)
    expected = []
    for step in range(13):
        size, b = sched.resolution_at(step)
        expected.append(((2 * b, 3, size, size), (2 * b, 3, 16, 16), (2 * b, (size // 8) ** 2)))
    assert seen == expected
    assert {shape[0][2] for shape in seen[:5]} == {16, 32}  # phase 0 mixes both sizes (seed 0)

    seen.clear()
    stopped = tmp_path / "stopped"
    train(load_config(None, TINY + [f"output_dir={stopped}", "train.max_steps=7"]))
    train(load_config(None, TINY + [f"output_dir={stopped}", "data.num_workers=1"]))  # resumes at step 7
    assert seen == expected  # steps 0-6, then 7-12 after the resume
    a = CheckpointManager.load(tmp_path / "straight" / "checkpoints" / "checkpoint-00000013.pt")
    b = CheckpointManager.load(stopped / "checkpoints" / "checkpoint-00000013.pt")
    for part in ("student", "teacher"):
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    assert torch.equal(a["loss_state"]["dino"]["center"], b["loss_state"]["dino"]["center"])


def test_distillation_trains_across_sizes(tmp_path: Path, monkeypatch):
    from veca_ssl.method.distill import ElasticDistillation
    from veca_ssl.models import build_backbone, save_backbone
    from veca_ssl.train.loop import train

    torch.manual_seed(0)
    teacher = build_backbone("vit_tiny", patch_size=8, embed_dim=32, depth=2, num_heads=2)
    path = save_backbone(teacher, tmp_path / "teacher" / "teacher.safetensors")
    seen = _record_batches(monkeypatch, ElasticDistillation)
    summary = train(load_config(None, TINY + ["mode=distill", f"distill.teacher={path}", "crops.num_local=0",
                                              "train.max_steps=5", f"output_dir={tmp_path / 'student'}"]))
    assert summary["steps"] == 5
    assert {shape[0][2] for shape in seen} == {16, 32}


def test_multires_config_error_before_any_work(tmp_path):
    from veca_ssl.train.loop import train

    with pytest.raises(ConfigError, match=r"multires.phases\[0\].sizes: 12 is not a positive multiple"):
        train(load_config(None, TINY + [f"output_dir={tmp_path / 'run'}",
                                        "multires.phases=[{epochs: 1, sizes: [12], probs: [1.0], batch_sizes: [4]}]"]))
    assert not (tmp_path / "run").exists()
