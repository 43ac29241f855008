"""Weighted k-NN classification of frozen features — the DINOv2 protocol (arXiv:2304.07193, §7).

Features are L2-normalised; the ``k`` nearest training features (cosine similarity) of a query vote
for their class with weight ``exp(sim / T)``, T = 0.07 (DINO, arXiv:2104.14294, §4.1); reported for
k ∈ {10, 20, 100, 200} as top-1 and top-5 accuracy (%). Neighbour search has two backends with the
same results on tie-free data: ``torch`` (exact, chunked over queries so the Q×N similarity matrix is
never held in memory at once) and ``faiss`` (``IndexFlatIP``, on GPU when faiss sees one).

``python -m eval.knn --checkpoint CKPT --train SPEC --test SPEC`` / ``veca eval knn``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from veca_ssl.knn import BACKENDS, KNN_KS, KNN_TEMPERATURE, knn_classify


def run_knn(train_sets: dict, test_sets: dict, ks: Sequence[int] = KNN_KS,
            temperature: float = KNN_TEMPERATURE, backend: str = "torch",
            device: torch.device | str = "cpu", chunk_size: int = 1024) -> dict:
    """k-NN at every width: ``{width: metrics}`` from ``{width: FeatureSet}`` of train and test."""
    out = {}
    for w, train in train_sets.items():
        test = test_sets[w]
        out[w] = knn_classify(train.image, train.labels, test.image, test.labels, ks, temperature,
                              backend, chunk_size=chunk_size, device=device)
    return out


def build_parser() -> argparse.ArgumentParser:
    from eval.common import add_data_args, add_model_args, add_run_args

    p = argparse.ArgumentParser(prog="veca eval knn", description=__doc__.split("\n")[0])
    add_model_args(p)
    add_data_args(p, names=("train", "test"))
    add_run_args(p)
    g = p.add_argument_group("k-NN")
    g.add_argument("--ks", default=",".join(map(str, KNN_KS)), help="neighbour counts")
    g.add_argument("--temperature", type=float, default=KNN_TEMPERATURE)
    g.add_argument("--backend", choices=BACKENDS, default="torch")
    g.add_argument("--chunk-size", type=int, default=1024, help="queries per similarity chunk")
    return p


def main(argv: list[str] | None = None) -> int:
    from eval.common import classification_features, setup
    from eval.report import finish_report

    args = build_parser().parse_args(argv)
    ctx = setup(args)
    train_sets, test_sets, _ = classification_features(ctx, args, n_last_blocks=1, patch_mean=False)
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    metrics = run_knn(train_sets, test_sets, ks, args.temperature, args.backend, ctx.device, args.chunk_size)
    finish_report(ctx, args, metrics, title="k-NN", protocol="knn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
