"""Logistic regression on frozen image features (scikit-learn, L-BFGS).

Features are standardised (statistics of the training set), the inverse regularisation strength C
is chosen from a grid by top-1 on a stratified split held out of train with a fixed seed, and the
chosen C is refit on the whole training set — the usual "logistic regression" frozen-feature
protocol (e.g. CLIP, arXiv:2103.00020, §3.2; DINOv2's logreg eval, arXiv:2304.07193).

``veca eval logreg --checkpoint CKPT --train SPEC --test SPEC`` (also ``python -m eval.logreg``).
"""

from __future__ import annotations

import logging
import sys

import torch

from eval.config import C_GRID, LogRegConfig
from eval.stats import mean_ci, with_ci
from veca_ssl.logreg import logistic_regression as _fit_and_score
from veca_ssl.widths import width_label

__all__ = ["C_GRID", "LogRegConfig", "logistic_regression", "run_logreg"]

log = logging.getLogger("eval")


def logistic_regression(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                        test_y: torch.Tensor, cfg: LogRegConfig | None = None, seed: int = 0, bootstrap: int = 0,
                        progress: bool = False, desc: str = "logreg") -> dict[str, float]:
    """``veca_ssl.logreg.logistic_regression``'s metrics, plus ``logreg_top1_ci_lo``/``_ci_hi`` with
    ``bootstrap > 0`` resamples of the test set."""
    scores: list = []
    out = _fit_and_score(train_x, train_y, test_x, test_y, cfg or LogRegConfig(), seed=seed, progress=progress,
                         desc=desc, scores_out=scores)
    yt = test_y.long().cpu()
    if bootstrap and yt.numel():
        with_ci(out, "logreg_top1", mean_ci((scores[0].argmax(1) == yt).float(), bootstrap, seed=seed, scale=100.0))
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
