"""Logistic regression on frozen image features (scikit-learn, L-BFGS).

Features are standardised (statistics of the training set), the inverse regularisation strength C
is chosen from a grid by top-1 on a stratified split held out of train with a fixed seed, and the
chosen C is refit on the whole training set — the usual "logistic regression" frozen-feature
protocol (e.g. CLIP, arXiv:2103.00020, §3.2; DINOv2's logreg eval, arXiv:2304.07193).

``veca eval logreg --checkpoint CKPT --train SPEC --test SPEC`` (also ``python -m eval.logreg``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from eval.config import C_GRID, LogRegConfig
from eval.stats import mean_ci, with_ci
from veca_ssl.knn import topk_accuracy
from veca_ssl.progress import track
from veca_ssl.widths import width_label

__all__ = ["C_GRID", "LogRegConfig", "logistic_regression", "run_logreg"]

log = logging.getLogger("eval")

#: Below this many feature values, BLAS/OpenMP run single-threaded: each L-BFGS step is then a few
#: small matrix products, and thread barriers cost more than they save (100x on a busy 2-core host).
SINGLE_THREAD_BELOW = 4_000_000


def _fit(x: np.ndarray, y: np.ndarray, c: float, cfg: LogRegConfig, seed: int) -> LogisticRegression:
    clf = LogisticRegression(C=c, solver="lbfgs", max_iter=cfg.max_iter, random_state=seed)
    limits = threadpool_limits(limits=1) if x.size < SINGLE_THREAD_BELOW else contextlib.nullcontext()
    with warnings.catch_warnings(), limits:
        # Some C values may stop at max_iter; the selection on held-out data judges them anyway.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return clf


def _scores(clf: LogisticRegression, x: np.ndarray, num_classes: int) -> torch.Tensor:
    """(N, num_classes) probabilities, columns aligned to class ids (absent classes score -inf)."""
    proba = clf.predict_proba(x)
    full = torch.full((x.shape[0], num_classes), float("-inf"), dtype=torch.float64)
    full[:, torch.as_tensor(clf.classes_, dtype=torch.long)] = torch.from_numpy(proba).double()
    return full


def logistic_regression(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                        test_y: torch.Tensor, cfg: LogRegConfig | None = None, seed: int = 0, bootstrap: int = 0,
                        progress: bool = False, desc: str = "logreg") -> dict[str, float]:
    """Returns ``{"logreg_top1", "logreg_top5", "logreg_C", "logreg_val_top1"}`` (accuracies in %), and
    ``logreg_top1_ci_lo``/``_ci_hi`` with ``bootstrap > 0`` resamples of the test set."""
    cfg = cfg or LogRegConfig()
    x = train_x.float().cpu().numpy()
    y = train_y.long().cpu().numpy()
    xt = test_x.float().cpu().numpy()
    yt = test_y.long().cpu()
    num_classes = int(max(y.max(), int(yt.max()) if yt.numel() else 0)) + 1
    if len(np.unique(y)) < 2:
        raise ValueError("logistic regression needs at least 2 classes in the training set")
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None  # stratify only when every class can split
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=cfg.val_fraction, random_state=seed,
                                              stratify=stratify)
    scaler = StandardScaler().fit(x_tr)
    val_top1 = {}
    for c in track(cfg.cs, desc=desc, unit="C", bar=progress):
        clf = _fit(scaler.transform(x_tr), y_tr, c, cfg, seed)
        val_top1[c] = topk_accuracy(_scores(clf, scaler.transform(x_va), num_classes),
                                    torch.from_numpy(y_va), 1)
    best_c = max(cfg.cs, key=lambda c: val_top1[c])  # ties → the smallest C (strongest regularisation)
    scaler = StandardScaler().fit(x)
    clf = _fit(scaler.transform(x), y, best_c, cfg, seed)
    scores = _scores(clf, scaler.transform(xt), num_classes)
    out = {"logreg_top1": topk_accuracy(scores, yt, 1), "logreg_top5": topk_accuracy(scores, yt, 5),
           "logreg_C": float(best_c), "logreg_val_top1": val_top1[best_c]}
    if bootstrap and yt.numel():
        with_ci(out, "logreg_top1", mean_ci((scores.argmax(1) == yt).float(), bootstrap, seed=seed, scale=100.0))
    return out


def run_logreg(train_sets: dict, test_sets: dict, cfg: LogRegConfig | None = None, seed: int = 0,
               bootstrap: int = 0, progress: bool = False) -> dict:
    """Logistic regression at every width: ``{width: metrics}``."""
    out = {}
    for w in train_sets:
        out[w] = logistic_regression(train_sets[w].image, train_sets[w].labels, test_sets[w].image,
                                     test_sets[w].labels, cfg, seed, bootstrap, progress, f"logreg {width_label(w)}")
        log.info("logreg %s: top-1 %.2f%% (C=%g)", width_label(w), out[w]["logreg_top1"], out[w]["logreg_C"])
    return out


def main(argv: list[str] | None = None) -> int:
    from eval.cli import protocol_main

    return protocol_main("logreg", argv)


if __name__ == "__main__":
    sys.exit(main())
