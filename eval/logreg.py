"""Logistic regression on frozen image features (scikit-learn, L-BFGS).

Features are standardised (statistics of the training set), the inverse regularisation strength C
is chosen from a grid by top-1 on a stratified split held out of train with a fixed seed, and the
chosen C is refit on the whole training set — the usual "logistic regression" frozen-feature
protocol (e.g. CLIP, arXiv:2103.00020, §3.2; DINOv2's logreg eval, arXiv:2304.07193).

``python -m eval.logreg --checkpoint CKPT --train SPEC --test SPEC`` / ``veca eval logreg``.
"""

from __future__ import annotations

import argparse
import sys

from veca_ssl.logreg import C_GRID, SINGLE_THREAD_BELOW, LogRegConfig, logistic_regression

__all__ = ["C_GRID", "SINGLE_THREAD_BELOW", "LogRegConfig", "build_parser", "logistic_regression", "main",
           "run_logreg"]


def run_logreg(train_sets: dict, test_sets: dict, cfg: LogRegConfig | None = None) -> dict:
    """Logistic regression at every width: ``{width: metrics}``."""
    return {w: logistic_regression(train_sets[w].image, train_sets[w].labels, test_sets[w].image,
                                   test_sets[w].labels, cfg) for w in train_sets}


def build_parser() -> argparse.ArgumentParser:
    from eval.common import add_data_args, add_model_args, add_run_args

    p = argparse.ArgumentParser(prog="veca eval logreg", description=__doc__.split("\n")[0])
    add_model_args(p)
    add_data_args(p, names=("train", "test"))
    add_run_args(p)
    g = p.add_argument_group("logistic regression")
    g.add_argument("--cs", default=",".join(f"{c:g}" for c in C_GRID), help="grid of C values")
    g.add_argument("--val-fraction", type=float, default=0.2, help="held out of train to choose C")
    g.add_argument("--max-iter", type=int, default=1000)
    return p


def main(argv: list[str] | None = None) -> int:
    from eval.common import classification_features, setup
    from eval.report import finish_report

    args = build_parser().parse_args(argv)
    cfg = LogRegConfig(cs=tuple(float(c) for c in args.cs.split(",") if c.strip()),
                       val_fraction=args.val_fraction, max_iter=args.max_iter, seed=args.seed)
    ctx = setup(args)
    train_sets, test_sets, _ = classification_features(ctx, args)
    finish_report(ctx, args, run_logreg(train_sets, test_sets, cfg), title="Logistic regression",
                  protocol="logreg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
