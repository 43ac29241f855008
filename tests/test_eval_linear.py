"""Linear probe (DINOv2 protocol) and logistic regression on synthetic cached features."""

from __future__ import annotations

import math

import pytest
import torch

from eval.linear import (
    LinearHeads,
    LinearProbeConfig,
    linear_inputs,
    linear_probe,
    split_holdout,
    train_heads,
)
from eval.logreg import LogRegConfig, logistic_regression
from veca_ssl.features import FeatureSet

CLASSES, DIM = 10, 16


def _features(n: int, seed: int, shuffle_labels: bool = False, blocks: int = 4) -> FeatureSet:
    """Class-centred Gaussian clusters (linearly separable with margin) in every block feature."""
    g = torch.Generator().manual_seed(100)  # same class centres for every split
    centres = torch.randn(CLASSES, DIM, generator=g) * 4
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    cls = centres[labels][:, None, :] + 0.3 * torch.randn(n, blocks, DIM, generator=g)
    patch_mean = torch.randn(n, DIM, generator=g)  # uninformative
    if shuffle_labels:
        labels = torch.randint(0, CLASSES, (n,), generator=g)  # independent of the features
    return FeatureSet(width=8, cls=cls, labels=labels, indices=torch.arange(n), patch_mean=patch_mean)


FAST = LinearProbeConfig(epochs=6, epoch_length=8, batch_size=64, lrs=(1e-3, 1e-2, 1e-1, 1.0))


def test_linear_inputs_follow_dinov2_create_linear_input() -> None:
    fs = _features(5, seed=0)
    x = linear_inputs(fs)
    assert list(x) == ["blocks1", "blocks1+avgpool", "blocks4", "blocks4+avgpool"]
    torch.testing.assert_close(x["blocks1"], fs.cls[:, -1])
    torch.testing.assert_close(x["blocks4"], torch.cat([fs.cls[:, i] for i in range(4)], dim=1))
    torch.testing.assert_close(x["blocks4+avgpool"], torch.cat([x["blocks4"], fs.patch_mean], dim=1))
    shallow = _features(5, seed=0, blocks=2)
    assert list(linear_inputs(shallow)) == ["blocks1", "blocks1+avgpool", "blocks2", "blocks2+avgpool"]


def test_heads_cover_the_grid_of_feature_sets_and_learning_rates() -> None:
    heads = LinearHeads({"blocks1": 4, "blocks4+avgpool": 20}, lrs=(1e-3, 0.05), num_classes=3)
    assert heads.head_names == ["blocks1_lr0.001", "blocks1_lr0.05", "blocks4+avgpool_lr0.001",
                                "blocks4+avgpool_lr0.05"]
    x = {"blocks1": torch.randn(2, 4), "blocks4+avgpool": torch.randn(2, 20)}
    out = heads.logits_by_head(x)
    assert list(out) == heads.head_names and all(v.shape == (2, 3) for v in out.values())
    # Head (feature set, lr index 1) is an ordinary linear layer with its slice of the fused weight.
    torch.testing.assert_close(out["blocks4+avgpool_lr0.05"], x["blocks4+avgpool"] @ heads.weight[1][1] + heads.bias[1][1])


def test_fused_training_equals_torch_sgd_per_head() -> None:
    """Each fused head follows exactly torch.optim.SGD(momentum=0.9) + cosine on its own lr."""
    fs = _features(40, seed=12)
    x = {"blocks1": fs.cls[:, -1]}
    cfg, seed = LinearProbeConfig(epochs=3, epoch_length=3, batch_size=16, lrs=(0.01, 0.5)), 4
    trained = train_heads(x, fs.labels, CLASSES, cfg, seed=seed)
    torch.manual_seed(seed)
    init = LinearHeads({"blocks1": DIM}, cfg.lrs, CLASSES)  # same seed → same initial weights
    total = cfg.epochs * 3  # epoch_length: one pass, ceil(40 / 16) steps
    for h, lr in enumerate(cfg.lrs):
        head = torch.nn.Linear(DIM, CLASSES)
        with torch.no_grad():
            head.weight.copy_(init.weight[0][h].T)
            head.bias.copy_(init.bias[0][h])
        opt = torch.optim.SGD(head.parameters(), lr=lr * cfg.batch_size / 256, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
        gen = torch.Generator().manual_seed(seed)
        order, cursor = torch.randperm(40, generator=gen), 0
        for _ in range(total):
            if cursor + cfg.batch_size > 40 and cursor > 0:
                order, cursor = torch.randperm(40, generator=gen), 0
            b = order[cursor:cursor + cfg.batch_size]
            cursor += cfg.batch_size
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(x["blocks1"][b]), fs.labels[b]).backward()
            opt.step()
            sched.step()
        torch.testing.assert_close(trained.weight[0][h], head.weight.detach().T, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(trained.bias[0][h], head.bias.detach(), rtol=1e-4, atol=1e-6)


def test_holdout_split_is_seeded_and_disjoint() -> None:
    a_tr, a_va = split_holdout(100, 0.1, seed=3)
    b_tr, b_va = split_holdout(100, 0.1, seed=3)
    assert torch.equal(a_va, b_va) and len(a_va) == 10
    assert set(a_tr.tolist()).isdisjoint(a_va.tolist()) and len(a_tr) + len(a_va) == 100


def test_linearly_separable_features_reach_100_percent() -> None:
    res = linear_probe(_features(400, seed=1), _features(200, seed=2), cfg=FAST)
    assert res["linear_top1"] == 100.0
    assert res["linear_top5"] == 100.0
    assert res["linear_val_top1"] == 100.0


def test_shuffled_labels_give_chance_accuracy() -> None:
    # Test labels are uniform and independent of the features, so whatever the chosen head predicts,
    # each test item is right with probability exactly 1/10: accuracy ~ Binomial(1000, 0.1) / 1000,
    # std 0.95 points. A 5-point window around 10 % is > 5 standard deviations wide.
    train = _features(600, seed=3, shuffle_labels=True)
    test = _features(1000, seed=4, shuffle_labels=True)
    res = linear_probe(train, test, cfg=FAST)
    assert abs(res["linear_top1"] - 10.0) < 5.0
    assert abs(res["linear_top5"] - 50.0) < 8.0  # Binomial(1000, 0.5): std 1.6 points


def test_given_validation_set_is_used_for_head_selection() -> None:
    val = _features(50, seed=7)
    res = linear_probe(_features(300, seed=5), _features(100, seed=6), val=val, cfg=FAST)
    assert res["linear_val_top1"] == 100.0
    assert res["linear_head"].startswith("blocks")


def test_logistic_regression_separable_and_chance() -> None:
    cfg = LogRegConfig(cs=(0.1, 1.0), max_iter=200)
    tr, te = _features(300, seed=8), _features(200, seed=9)
    res = logistic_regression(tr.image, tr.labels, te.image, te.labels, cfg)
    assert res["logreg_top1"] == 100.0 and res["logreg_C"] in (0.1, 1.0)
    tr, te = _features(300, seed=10, shuffle_labels=True), _features(1000, seed=11, shuffle_labels=True)
    res = logistic_regression(tr.image, tr.labels, te.image, te.labels, cfg)
    assert abs(res["logreg_top1"] - 10.0) < 5.0  # same binomial argument as the linear probe


def test_logistic_regression_needs_two_classes() -> None:
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="at least 2 classes"):
        logistic_regression(x, torch.zeros(10, dtype=torch.long), x, torch.zeros(10, dtype=torch.long))


def test_default_epoch_length_is_one_pass_with_a_floor() -> None:
    from eval.config import MIN_EPOCH_LENGTH
    from eval.linear import iterations_per_epoch

    cfg = LinearProbeConfig(batch_size=128)
    assert iterations_per_epoch(1_281_167, cfg) == 10_010  # ImageNet-1k: one pass at batch 128
    assert iterations_per_epoch(1_293, cfg) == MIN_EPOCH_LENGTH == 125  # digits: 11 steps, raised to the floor
    assert iterations_per_epoch(1_293, LinearProbeConfig(epoch_length=1250)) == 1250  # DINOv2's, when asked
