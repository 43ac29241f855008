"""Weighted k-NN classification of frozen features — the DINOv2 protocol (arXiv:2304.07193, §7).

Features are L2-normalised; the ``k`` nearest training features (cosine similarity) of a query vote
for their class with weight ``exp(sim / T)``, T = 0.07 (DINO, arXiv:2104.14294, §4.1); reported for
k ∈ {10, 20, 100, 200} as top-1 and top-5 accuracy (%), each top-1 with a bootstrap interval over the
test images. The k-NN core (search backends, vote) is ``veca_ssl.knn``.

``veca eval knn --checkpoint CKPT --train SPEC --test SPEC`` (also ``python -m eval.knn``).
"""

from __future__ import annotations

import logging
import sys

import torch

from eval.config import KnnConfig
from eval.stats import mean_ci, with_ci
from veca_ssl.knn import knn_classify
from veca_ssl.progress import track
from veca_ssl.widths import width_label

log = logging.getLogger("eval")


def run_knn(train_sets: dict, test_sets: dict, cfg: KnnConfig | None = None, device: torch.device | str = "cpu",
            bootstrap: int = 0, seed: int = 0, progress: bool = False) -> dict:
    """k-NN at every width: ``{width: metrics}`` from ``{width: FeatureSet}`` of train and test.

    With ``bootstrap > 0`` each ``knn_k{k}_top1`` gets ``_ci_lo``/``_ci_hi`` (95% interval, in %).
    """
    cfg = cfg or KnnConfig()
    out = {}
    for w in track(list(train_sets), desc="k-NN", unit="width", bar=progress):
        train, test = train_sets[w], test_sets[w]
        hits: dict[str, torch.Tensor] = {}
        metrics = knn_classify(train.image, train.labels, test.image, test.labels, cfg.ks, cfg.temperature,
                               cfg.backend, chunk_size=cfg.chunk_size, device=device, hits_out=hits)
        if bootstrap:
            for k in cfg.ks:
                name = f"knn_k{k}_top1"
                with_ci(metrics, name, mean_ci(hits[name].float(), bootstrap, seed=seed, scale=100.0))
        out[w] = metrics
        best = max(v for n, v in metrics.items() if n.endswith("_top1") and "_ci_" not in n)
        log.info("k-NN %s: best top-1 %.2f%%", width_label(w), best)
    return out


def main(argv: list[str] | None = None) -> int:
    from eval.cli import protocol_main

    return protocol_main("knn", argv)


if __name__ == "__main__":
    sys.exit(main())
