"""k-NN protocol: hand-computed weighted votes, backend parity, chunking, clipping, label checks."""

from __future__ import annotations

import math

import pytest
import torch

from eval.common import check_first_label, require_labels
from veca_ssl.knn import knn_classify, knn_search, knn_vote, paired_bootstrap

S = math.sqrt(1 - 0.9**2)
# Query (1, 0): one label-0 neighbour at cosine 1.0, two label-1 neighbours at cosine 0.9, one far.
BANK = torch.tensor([[1.0, 0.0], [0.9, S], [0.9, -S], [-1.0, 0.0]])
BANK_LABELS = torch.tensor([0, 1, 1, 2])
QUERY = torch.tensor([[1.0, 0.0]])


def test_vote_matches_hand_computed_weights() -> None:
    sims, idx = knn_search(BANK, QUERY, k=4)
    assert idx[0].tolist()[:1] == [0] and sorted(idx[0].tolist()[1:3]) == [1, 2] and idx[0, 3] == 3
    scores = knn_vote(sims, BANK_LABELS[idx], ks=[1, 3, 4], temperature=0.07, num_classes=3)
    # Scores are exp(sim / T) up to the per-query factor exp(-max_sim / T) = exp(-1 / 0.07).
    t = 0.07
    expected_k3 = torch.tensor([math.exp(0.0), 2 * math.exp((0.9 - 1) / t), 0.0])
    torch.testing.assert_close(scores[3][0], expected_k3, rtol=1e-5, atol=1e-7)
    expected_k4 = expected_k3 + torch.tensor([0.0, 0.0, math.exp((-1 - 1) / t)])
    torch.testing.assert_close(scores[4][0], expected_k4, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(scores[1][0], torch.tensor([1.0, 0.0, 0.0]))


def test_temperature_decides_between_one_close_and_two_farther_neighbours() -> None:
    # T = 0.07: exp(1/T) = 4.17 · exp(0.9/T) > 2 · exp(0.9/T) → class 0 wins (weighted vote).
    # T = 1:    exp(1) = 2.72 < 2 · exp(0.9) = 4.92 → class 1 wins (almost a majority vote).
    sharp = knn_classify(BANK, BANK_LABELS, QUERY, torch.tensor([0]), ks=[3], temperature=0.07)
    flat = knn_classify(BANK, BANK_LABELS, QUERY, torch.tensor([0]), ks=[3], temperature=1.0)
    assert sharp["knn_k3_top1"] == 100.0
    assert flat["knn_k3_top1"] == 0.0
    assert flat["knn_k3_top5"] == 100.0  # 3 classes: top-5 covers every class


def test_features_are_l2_normalised() -> None:
    scaled = BANK * torch.tensor([[3.0], [0.5], [0.5], [7.0]])  # lengths must not matter
    a = knn_classify(BANK, BANK_LABELS, QUERY, torch.tensor([0]), ks=[3])
    b = knn_classify(scaled, BANK_LABELS, 5 * QUERY, torch.tensor([0]), ks=[3])
    assert a == b == {"knn_k3_top1": 100.0, "knn_k3_top5": 100.0}


def _random_problem(n: int = 600, q: int = 150, d: int = 24, classes: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * 2
    yb = torch.randint(0, classes, (n,), generator=g)
    yq = torch.randint(0, classes, (q,), generator=g)
    xb = centres[yb] + torch.randn(n, d, generator=g)
    xq = centres[yq] + torch.randn(q, d, generator=g)
    return xb, yb, xq, yq


def test_torch_and_faiss_give_identical_neighbours_and_metrics() -> None:
    pytest.importorskip("faiss")
    xb, yb, xq, yq = _random_problem(n=200, q=16, d=32, seed=5)
    bank, queries = torch.nn.functional.normalize(xb, dim=1), torch.nn.functional.normalize(xq, dim=1)
    # Precondition "tie-free": consecutive top-20 similarities (float64) differ by far more than the
    # float32 rounding of a 32-d dot product (~1e-7), so no backend may legitimately swap two.
    exact = (queries.double() @ bank.double().T).topk(21, dim=1).values
    assert (exact[:, :-1] - exact[:, 1:]).min() > 4e-5
    s_t, i_t = knn_search(bank, queries, 20, backend="torch", chunk_size=5)
    s_f, i_f = knn_search(bank, queries, 20, backend="faiss")
    assert torch.equal(i_t, i_f)
    torch.testing.assert_close(s_t, s_f, rtol=0, atol=1e-5)
    xb, yb, xq, yq = _random_problem()
    m_t = knn_classify(xb, yb, xq, yq, ks=(10, 20, 100, 200), backend="torch", chunk_size=40)
    m_f = knn_classify(xb, yb, xq, yq, ks=(10, 20, 100, 200), backend="faiss", chunk_size=40)
    assert m_t == m_f
    assert set(m_t) == {f"knn_k{k}_top{t}" for k in (10, 20, 100, 200) for t in (1, 5)}
    assert m_t["knn_k20_top1"] > 80  # well-separated clusters


def test_chunking_does_not_change_results() -> None:
    xb, yb, xq, yq = _random_problem(seed=1)
    whole = knn_classify(xb, yb, xq, yq, chunk_size=10_000)
    tiny = knn_classify(xb, yb, xq, yq, chunk_size=7)
    assert whole == tiny


def test_k_is_clipped_to_the_bank_size() -> None:
    xb, yb, xq, yq = _random_problem(n=30, q=20, seed=2)
    big = knn_classify(xb, yb, xq, yq, ks=[200])
    exact = knn_classify(xb, yb, xq, yq, ks=[30])
    assert big["knn_k200_top1"] == exact["knn_k30_top1"]
    assert big["knn_k200_top5"] == exact["knn_k30_top5"]


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="backend 'annoy'"):
        knn_search(BANK, QUERY, 2, backend="annoy")
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(BANK, BANK_LABELS, QUERY, torch.tensor([0]), temperature=0)


def test_unlabelled_dataset_is_rejected_with_its_spec() -> None:
    with pytest.raises(ValueError, match=r"'npz:/data/x.npz' has no labels"):
        require_labels(torch.tensor([0, -1, 2]), "npz:/data/x.npz")
    items = [(torch.zeros(3, 8, 8), -1)] * 3
    with pytest.raises(ValueError, match="'folder-of-stuff' has no labels"):
        check_first_label(items, "folder-of-stuff")


def test_paired_bootstrap_difference_and_interval() -> None:
    a = torch.tensor([True] * 60 + [False] * 40)
    assert paired_bootstrap(a, a) == (0.0, 0.0, 0.0)  # identical predictions: no difference, no spread
    b = a.clone()
    b[60:70] = True  # b fixes 10 of a's misses and breaks nothing: +10 points
    diff, lo, hi = paired_bootstrap(a, b, samples=2000)
    assert diff == pytest.approx(10.0)
    # the paired difference is a mean of 100 draws of {0, 1} with p = 0.1: sd = 3 points
    assert 3.0 < lo < 10.0 < hi < 17.0 and hi - lo == pytest.approx(2 * 1.96 * 3.0, rel=0.15)
    assert paired_bootstrap(a, b, samples=500, seed=1) == paired_bootstrap(a, b, samples=500, seed=1)
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap(a, b[:10])


def test_knn_classify_reports_per_query_hits() -> None:
    gen = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(50, 8, generator=gen), torch.randint(0, 3, (50,), generator=gen)
    queries, qlabels = torch.randn(20, 8, generator=gen), torch.randint(0, 3, (20,), generator=gen)
    hits: dict = {}
    res = knn_classify(bank, labels, queries, qlabels, ks=[5], hits_out=hits)
    assert hits["knn_k5_top1"].shape == (20,) and hits["knn_k5_top1"].dtype == torch.bool
    assert hits["knn_k5_top1"].float().mean() * 100 == pytest.approx(res["knn_k5_top1"])
