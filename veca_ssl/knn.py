"""Weighted k-NN classification of frozen features — the DINOv2 protocol (arXiv:2304.07193, §7).

Features are L2-normalised; the ``k`` nearest training features (cosine similarity) of a query vote
for their class with weight ``exp(sim / T)``, T = 0.07 (DINO, arXiv:2104.14294, §4.1); reported for
k ∈ {10, 20, 100, 200} as top-1 and top-5 accuracy (%). Neighbour search has two backends with the
same results on tie-free data: ``torch`` (exact, chunked over queries so the Q×N similarity matrix is
never held in memory at once) and ``faiss`` (``IndexFlatIP``, on GPU when faiss sees one).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

KNN_KS: tuple[int, ...] = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07
BACKENDS = ("torch", "faiss")


def knn_search_torch(bank: torch.Tensor, queries: torch.Tensor, k: int,
                     chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-``k``: ``(sims, idx)`` of shape (Q, k), sorted by decreasing similarity."""
    sims, idx = [], []
    for start in range(0, queries.shape[0], chunk_size):
        s = queries[start:start + chunk_size] @ bank.T  # (chunk, N): the only large temporary
        top_s, top_i = s.topk(k, dim=1, largest=True, sorted=True)
        sims.append(top_s)
        idx.append(top_i)
    if not sims:
        return bank.new_zeros((0, k)), torch.zeros((0, k), dtype=torch.long, device=bank.device)
    return torch.cat(sims), torch.cat(idx)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def knn_search_faiss(bank: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-``k`` with ``faiss.IndexFlatIP`` (GPU index when faiss has a GPU)."""
    import faiss

    xb = np.ascontiguousarray(bank.detach().float().cpu().numpy())
    xq = np.ascontiguousarray(queries.detach().float().cpu().numpy())
    index = faiss.IndexFlatIP(xb.shape[1])
    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(xb)
    sims, idx = index.search(xq, k)
    return torch.from_numpy(sims).to(bank.device), torch.from_numpy(idx).long().to(bank.device)


def knn_search(bank: torch.Tensor, queries: torch.Tensor, k: int, backend: str = "torch",
               chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` neighbours of ``queries`` in ``bank`` by inner product with the chosen backend."""
    if backend == "torch":
        return knn_search_torch(bank, queries, k, chunk_size)
    if backend == "faiss":
        if not faiss_available():
            from veca_ssl.optional import missing_message

            raise ValueError(f"{missing_message('faiss')}; or use --backend torch (the default)")
        return knn_search_faiss(bank, queries, k)
    raise ValueError(f"unknown k-NN backend {backend!r}; valid: {', '.join(BACKENDS)}")


def knn_vote(sims: torch.Tensor, neighbour_labels: torch.Tensor, ks: Sequence[int], temperature: float,
             num_classes: int) -> dict[int, torch.Tensor]:
    """Class scores ``sum_{j<k} exp(sim_j / T) * onehot(label_j)`` for each ``k`` (neighbours sorted).

    The per-query constant ``exp(-max_sim / T)`` is factored out for numerical range; it scales every
    class score of a query equally, so rankings (and accuracies) are exactly those of ``exp(sim / T)``.
    """
    weights = torch.exp((sims - sims[:, :1]) / temperature)  # (Q, K)
    # scatter_add per k instead of DINOv2's (Q, K, C) one-hot product: same sums, O(Q·K) memory.
    out = {}
    for k in ks:
        scores = weights.new_zeros((weights.shape[0], num_classes))
        out[k] = scores.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
    return out


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percentage of rows whose label is among the ``k`` highest scores (k clipped to #classes)."""
    if labels.numel() == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return float((top == labels[:, None]).any(dim=1).float().mean() * 100)


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    backend: str = "torch",
    num_classes: int | None = None,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
    hits_out: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """DINOv2 weighted k-NN: ``{"knn_k{k}_top1": %, "knn_k{k}_top5": %}`` for every ``k``.

    ``k`` larger than the bank is clipped to the bank size (the metric keeps the requested name).
    ``hits_out``, when given, receives the per-query boolean hits under the same names (for paired
    comparisons between widths, see :func:`paired_bootstrap`).
    """
    if train_features.shape[0] == 0:
        raise ValueError("k-NN needs a non-empty training bank")
    if any(k < 1 for k in ks):
        raise ValueError(f"k values must be >= 1, got {list(ks)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = torch.device(device) if device is not None else train_features.device
    bank = F.normalize(train_features.to(device).float(), dim=1)
    queries = F.normalize(test_features.to(device).float(), dim=1)
    train_labels = train_labels.to(device).long()
    test_labels = test_labels.to(device).long()
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max() if test_labels.numel() else 0)) + 1
    clipped = {k: min(k, bank.shape[0]) for k in ks}
    max_k = max(clipped.values())
    metrics: dict[str, float] = {}
    # One search for all queries (the torch backend chunks internally; faiss builds its index once),
    # then votes chunk by chunk so the (chunk, C) score tensors stay small.
    all_sims, all_idx = knn_search(bank, queries, max_k, backend, chunk_size)
    hits: dict[str, list[torch.Tensor]] = {}
    for start in range(0, queries.shape[0], chunk_size):
        sims, idx = all_sims[start:start + chunk_size], all_idx[start:start + chunk_size]
        scores = knn_vote(sims, train_labels[idx], sorted(set(clipped.values())), temperature, num_classes)
        y = test_labels[start:start + chunk_size]
        for k in ks:
            # One sorted top-5 per k: its first column is the top-1 prediction.
            match = scores[clipped[k]].topk(min(5, num_classes), dim=1).indices == y[:, None]
            hits.setdefault(f"knn_k{k}_top1", []).append(match[:, 0])
            hits.setdefault(f"knn_k{k}_top5", []).append(match.any(dim=1))
    for name, parts in hits.items():
        joined = torch.cat(parts)
        metrics[name] = float(joined.float().mean() * 100)
        if hits_out is not None:
            hits_out[name] = joined.cpu()
    return metrics


def paired_bootstrap(hits_a: torch.Tensor, hits_b: torch.Tensor, samples: int = 4000, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """Accuracy difference ``b − a`` (points) on the same queries, with a percentile bootstrap interval.

    Both classifiers are scored on one resampled query set per draw, so what the interval measures is
    the noise of *this* evaluation set in the difference — not the (larger) noise of each accuracy.
    """
    if hits_a.shape != hits_b.shape or hits_a.numel() == 0:
        raise ValueError(f"paired hits must be non-empty and the same shape, got {tuple(hits_a.shape)} "
                         f"and {tuple(hits_b.shape)}")
    diff = hits_b.float() - hits_a.float()
    gen = torch.Generator().manual_seed(seed)
    n, per_batch = diff.numel(), max(1, 2_000_000 // diff.numel())  # bounded memory for big query sets
    draws = torch.cat([diff[torch.randint(0, n, (min(per_batch, samples - i), n), generator=gen)].mean(dim=1)
                       for i in range(0, samples, per_batch)]) * 100
    lo, hi = torch.quantile(draws, torch.tensor([(1 - level) / 2, (1 + level) / 2])).tolist()
    return float(diff.mean() * 100), lo, hi
