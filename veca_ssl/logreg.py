"""Logistic regression on frozen image features (scikit-learn, L-BFGS) — the core that ``eval.logreg``
(``veca eval logreg``) and the training monitor's final table share.

Features are standardised (statistics of the training set), the inverse regularisation strength C
is chosen from a grid by top-1 on a stratified split held out of train with a fixed seed, and the
chosen C is refit on the whole training set — the usual "logistic regression" frozen-feature
protocol (e.g. CLIP, arXiv:2103.00020, §3.2; DINOv2's logreg eval, arXiv:2304.07193).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from veca_ssl.knn import topk_accuracy
from veca_ssl.progress import track

C_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


@dataclass
class LogRegConfig:
    """The C grid, the held-out fraction that chooses C, and L-BFGS iterations per fit (``eval.config``
    has the command-line form of the same three fields)."""

    cs: Sequence[float] = C_GRID
    val_fraction: float = 0.2
    max_iter: int = 1000


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
                        test_y: torch.Tensor, cfg: LogRegConfig | None = None, seed: int = 0,
                        progress: bool = False, desc: str = "logreg",
                        scores_out: list | None = None) -> dict[str, float]:
    """Returns ``{"logreg_top1", "logreg_top5", "logreg_C", "logreg_val_top1"}`` (accuracies in %).

    ``cfg`` is any object with ``cs``, ``val_fraction`` and ``max_iter``; ``scores_out``, when given,
    receives the (N_test, classes) probabilities (for a bootstrap interval, say).
    """
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
    if scores_out is not None:
        scores_out.append(scores)
    return {"logreg_top1": topk_accuracy(scores, yt, 1), "logreg_top5": topk_accuracy(scores, yt, 5),
            "logreg_C": float(best_c), "logreg_val_top1": val_top1[best_c]}
