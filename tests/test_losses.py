"""DINO head, centring, Sinkhorn-Knopp, DINO / iBOT / KoLeo losses against hand-computed references."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from veca_ssl.loss import (
    DINOHead,
    DINOLoss,
    KoLeoLoss,
    iBOTPatchLoss,
    masked_token_weights,
    sinkhorn_knopp,
    teacher_softmax_centered,
    update_center,
)

# ----------------------------------------------------------------------------------------------- head


def test_head_shapes_weightnorm_and_reference_forward() -> None:
    torch.manual_seed(0)
    # DINO's norm_last_layer=True: the gain is fixed at 1 (the DINOv2 default, a learnable gain, is
    # checked against torch's weight_norm in test_recipe.py)
    head = DINOHead(in_dim=12, out_dim=40, hidden_dim=24, bottleneck_dim=8, nlayers=3, last_layer="normalized")
    names = {name for name, _ in head.named_parameters()}
    assert "last_layer.weight_v" in names and not any("weight_g" in n for n in names)
    assert head.last_layer.weight_v.shape == (40, 8)
    assert [p is head.last_layer.weight_v for p in head.last_layer_parameters()] == [True]
    # Effective weight rows have unit norm whatever the raw scale of weight_v (g fixed at 1).
    with torch.no_grad():
        head.last_layer.weight_v.mul_(torch.linspace(0.1, 7.0, 40).unsqueeze(1))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(40))

    x = torch.randn(5, 12)
    lin = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert len(lin) == 3
    h = F.gelu(lin[0](x))
    h = F.gelu(lin[1](h))
    h = lin[2](h)
    h = h / h.norm(dim=-1, keepdim=True)
    v = head.last_layer.weight_v
    expected = h @ (v / v.norm(dim=1, keepdim=True)).t()
    out = head(x)
    torch.testing.assert_close(out, expected)
    assert out.abs().max() <= 1.0 + 1e-6  # cosine similarities
    # Patch-token input (B, N, D) folds to rows and back.
    torch.testing.assert_close(head(x.reshape(5, 1, 12)).reshape(5, 40), out)


def test_head_init_and_state_dict_roundtrip() -> None:
    torch.manual_seed(0)
    head = DINOHead(in_dim=64, out_dim=300, hidden_dim=256, bottleneck_dim=32)
    first = head.mlp[0]
    assert abs(first.weight.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(first.bias) == 0
    other = DINOHead(in_dim=64, out_dim=300, hidden_dim=256, bottleneck_dim=32)
    other.load_state_dict(head.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(other(x), head(x))
    one_layer = DINOHead(in_dim=64, out_dim=10, nlayers=1, bottleneck_dim=16)
    assert isinstance(one_layer.mlp, torch.nn.Linear) and one_layer(x).shape == (3, 10)
    with pytest.raises(ValueError, match="out_dim"):
        DINOHead(in_dim=64, out_dim=0)
    with pytest.raises(ValueError, match="width 64"):
        head(torch.randn(2, 63))


# ------------------------------------------------------------------------------------------ centring


def test_centering_softmax_and_ema_update() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
    center = torch.tensor([[0.5, 0.0, 1.0]])
    probs = teacher_softmax_centered(logits, center, temp=0.5)
    z = np.array([[1.0, 4.0, 4.0], [-1.0, 0.0, 4.0]])  # (logits - center) / 0.5
    expected = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-6)
    new = update_center(center, logits, momentum=0.9)
    # batch mean (0.5, 1.0, 3.0): 0.9 * c + 0.1 * mean
    np.testing.assert_allclose(new.numpy(), [[0.5, 0.1, 1.2]], rtol=1e-6)
    assert torch.equal(center, torch.tensor([[0.5, 0.0, 1.0]]))  # functional: input untouched
    with pytest.raises(ValueError, match="temperature"):
        teacher_softmax_centered(logits, center, temp=0.0)
    with pytest.raises(ValueError, match="momentum"):
        update_center(center, logits, momentum=1.5)


def test_sinkhorn_one_iteration_hand_computed_2x2() -> None:
    # exp(logits / T) = [[1, 2], [3, 4]]. By hand: total 10 -> prototype sums (0.4, 0.6) -> divide and
    # /K: [[1/8, 1/6], [3/8, 1/3]] -> sample sums 7/24, 17/24 -> rows [[3/7, 4/7], [9/17, 8/17]].
    temp = 0.1
    logits = temp * torch.log(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    q = sinkhorn_knopp(logits, temp, n_iterations=1)
    expected = torch.tensor([[3 / 7, 4 / 7], [9 / 17, 8 / 17]])
    torch.testing.assert_close(q, expected, rtol=1e-6, atol=1e-7)


def test_sinkhorn_converges_to_hand_computed_doubly_stochastic_2x2() -> None:
    # Sinkhorn scaling preserves the cross ratio a11*a22/(a12*a21) = 4/6; the 2x2 matrix with unit row
    # and column sums (B/K = 1) is [[a, 1-a], [1-a, a]] with (a/(1-a))^2 = 2/3.
    temp = 0.05
    logits = temp * torch.log(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))
    q = sinkhorn_knopp(logits, temp, n_iterations=200)
    r = math.sqrt(2.0 / 3.0)
    a = r / (1.0 + r)
    torch.testing.assert_close(q, torch.tensor([[a, 1 - a], [1 - a, a]]), rtol=1e-6, atol=1e-6)


def _sinkhorn_numpy(logits: np.ndarray, temp: float, iters: int) -> np.ndarray:
    """Direct (B, K) transcription of SwAV Alg. 1 in float64."""
    p = np.exp(logits / temp)
    b, k = p.shape
    p = p / p.sum()
    for _ in range(iters):
        p = p / p.sum(0, keepdims=True) / k
        p = p / p.sum(1, keepdims=True) / b
    return p * b


def test_sinkhorn_matches_numpy_and_row_column_sums() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)).astype(np.float32)
    for iters in (1, 3):
        q = sinkhorn_knopp(torch.from_numpy(logits), 0.5, n_iterations=iters)
        np.testing.assert_allclose(
            q.numpy(), _sinkhorn_numpy(logits.astype(np.float64), 0.5, iters), rtol=1e-5
        )
        np.testing.assert_allclose(q.sum(1).numpy(), np.ones(6), rtol=1e-6)
    q = sinkhorn_knopp(torch.from_numpy(logits), 0.5, n_iterations=300)
    np.testing.assert_allclose(q.sum(1).numpy(), np.ones(6), rtol=1e-5)
    np.testing.assert_allclose(q.sum(0).numpy(), np.full(4, 6 / 4), rtol=1e-4)  # equipartition B/K
    # Large logits / low temperature must not overflow (global shift inside).
    q = sinkhorn_knopp(torch.from_numpy(logits) * 100, 0.04, n_iterations=3)
    assert torch.isfinite(q).all()


# ------------------------------------------------------------------------------------------ DINO loss


def _dino_reference(students: list[torch.Tensor], teachers: list[torch.Tensor], temp: float) -> torch.Tensor:
    """Direct double loop over (teacher view i, student view v != i) and over samples."""
    total, pairs = 0.0, 0
    for i, t in enumerate(teachers):
        for v, s in enumerate(students):
            if v == i:
                continue
            per_sample = []
            for b in range(s.shape[0]):
                logp = s[b] / temp - torch.logsumexp(s[b] / temp, dim=0)
                per_sample.append(-(t[b] * logp).sum())
            total = total + torch.stack(per_sample).mean()
            pairs += 1
    return total / pairs


def test_dino_loss_matches_double_loop_and_skips_same_view() -> None:
    torch.manual_seed(0)
    k, b = 7, 3
    loss_fn = DINOLoss(k, student_temp=0.1)
    students = [torch.randn(b, k) for _ in range(5)]  # 2 globals + 3 locals
    teachers = [loss_fn.softmax_center_teacher(torch.randn(b, k), 0.04) for _ in range(2)]
    expected = _dino_reference(students, teachers, 0.1)
    torch.testing.assert_close(loss_fn(students, teachers), expected)
    # Same-view pairs are skipped: with one teacher view, student view 0 (its own copy) gets no gradient.
    students_grad = [s.clone().requires_grad_(True) for s in students[:3]]
    loss = loss_fn(students_grad, teachers[:1])
    loss.backward()
    grad0 = students_grad[0].grad
    assert grad0 is None or torch.count_nonzero(grad0) == 0
    assert all(s.grad.abs().sum() > 0 for s in students_grad[1:])

    def ce(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return -(t * F.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()

    # Two globals only: exactly the swapped pair average, not the 4-pair average.
    swapped = 0.5 * (ce(teachers[1], students[0]) + ce(teachers[0], students[1]))
    torch.testing.assert_close(loss_fn(students[:2], teachers), swapped)
    with pytest.raises(ValueError, match="no \\(teacher, other view\\) pair"):
        loss_fn(students[:1], teachers[:1])
    with pytest.raises(ValueError, match="student view 1"):
        loss_fn([students[0], torch.randn(b, k + 1)], teachers)


def test_dino_center_buffer_update_and_checkpoint() -> None:
    torch.manual_seed(0)
    loss_fn = DINOLoss(5, center_momentum=0.8)
    assert "center" in loss_fn.state_dict()
    logits = torch.randn(4, 5)
    loss_fn.update_center(logits)
    torch.testing.assert_close(loss_fn.center, 0.2 * logits.mean(0, keepdim=True))
    loss_fn.update_center(logits)
    torch.testing.assert_close(loss_fn.center, (0.8 * 0.2 + 0.2) * logits.mean(0, keepdim=True))
    restored = DINOLoss(5)
    restored.load_state_dict(loss_fn.state_dict())
    assert torch.equal(restored.center, loss_fn.center)
    probs = loss_fn.softmax_center_teacher(logits, 0.07)
    torch.testing.assert_close(probs, F.softmax((logits - loss_fn.center) / 0.07, dim=-1))
    sk = loss_fn.sinkhorn_knopp_teacher(logits, 0.07)
    torch.testing.assert_close(sk.sum(1), torch.ones(4))


# ------------------------------------------------------------------------------------------ iBOT loss


def test_ibot_forward_masked_matches_direct_per_image_average() -> None:
    torch.manual_seed(0)
    k, temp = 6, 0.1
    masks = torch.tensor(
        [[True, False, True, True], [False, False, False, False], [False, True, False, False]]
    )
    m = int(masks.sum())
    student = torch.randn(m, k)
    teacher = F.softmax(torch.randn(m, k) / 0.05, dim=-1)
    loss_fn = iBOTPatchLoss(k, student_temp=temp)
    # Direct: per image, mean CE over its masked tokens; images with none contribute 0; / all images.
    per_image, row = [], 0
    for image_mask in masks:
        n = int(image_mask.sum())
        ce = [-(teacher[row + j] * F.log_softmax(student[row + j] / temp, dim=0)).sum() for j in range(n)]
        per_image.append(torch.stack(ce).mean() if n else torch.tensor(0.0))
        row += n
    expected = torch.stack(per_image).sum() / masks.shape[0]
    torch.testing.assert_close(loss_fn.forward_masked(student, teacher, masks), expected)
    weights = masked_token_weights(masks)
    torch.testing.assert_close(weights, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))
    torch.testing.assert_close(loss_fn(student, teacher, masks, weights), expected)
    with pytest.raises(ValueError, match="masked tokens"):
        loss_fn(student[:-1], teacher[:-1], masks)
    # Centre: mean over masked tokens; persistent buffer; SK rows sum to 1.
    loss_fn.update_center(student)
    torch.testing.assert_close(loss_fn.center, 0.1 * student.mean(0, keepdim=True))
    assert "center" in loss_fn.state_dict()
    torch.testing.assert_close(loss_fn.sinkhorn_knopp_teacher(student, 0.07).sum(1), torch.ones(m))


# ------------------------------------------------------------------------------------------- KoLeo


def test_koleo_matches_numpy_double_loop() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 5))
    loss = KoLeoLoss()(torch.tensor(x, dtype=torch.float32))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    nearest = []
    for i in range(len(unit)):
        d = [np.linalg.norm(unit[i] - unit[j]) for j in range(len(unit)) if j != i]
        nearest.append(min(d))
    expected = -np.mean(np.log(np.array(nearest) + 1e-8))
    assert abs(loss.item() - expected) < 1e-5


def test_koleo_duplicates_give_large_loss_and_finite_gradient() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 8)
    spread = KoLeoLoss()(x).item()
    dup = torch.cat([x[:3], x[:3]]).requires_grad_(True)
    loss = KoLeoLoss()(dup)
    assert loss.item() > 10.0 > spread  # -log(~1e-8) ≈ 17 vs O(0) for spread points
    loss.backward()
    assert torch.isfinite(dup.grad).all()
    with pytest.raises(ValueError, match="at least 2"):
        KoLeoLoss()(x[:1])


# ------------------------------------------------------------------------------------ distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        full = torch.randn(10, 5)
        # Uneven split (ranks hold 6 and 4 rows) exercises the all-reduced row counts.
        local = full[:6] if rank == 0 else full[6:]
        center = update_center(torch.zeros(1, 5), local, momentum=0.5)
        q = sinkhorn_knopp(local, 0.3, n_iterations=3)
        torch.save({"center": center, "q": q}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_center_and_sinkhorn_equal_global_batch(tmp_path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    full = torch.randn(10, 5)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    expected_center = update_center(torch.zeros(1, 5), full, momentum=0.5)
    expected_q = sinkhorn_knopp(full, 0.3, n_iterations=3)
    for r in results:
        torch.testing.assert_close(r["center"], expected_center)
    torch.testing.assert_close(torch.cat([results[0]["q"], results[1]["q"]]), expected_q)
