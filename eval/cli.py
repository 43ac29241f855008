"""``veca eval <protocol>``: dispatch to ``eval.knn | eval.linear | eval.logreg | eval.dense | eval.all``."""

from __future__ import annotations

import sys

PROTOCOLS: dict[str, tuple[str, str]] = {
    "knn": ("eval.knn", "weighted k-NN (DINOv2 protocol) at every core width"),
    "linear": ("eval.linear", "linear probe, many heads over an lr grid × feature sets (DINOv2)"),
    "logreg": ("eval.logreg", "scikit-learn logistic regression with a C grid"),
    "dense": ("eval.dense", "linear segmentation (mIoU) and depth (RMSE) probes on patch tokens"),
    "all": ("eval.all", "every protocol of a YAML config, one report"),
}


def main(argv: list[str] | None = None) -> int:
    from veca_ssl.cli import dispatch

    return dispatch(PROTOCOLS, argv, "veca eval")


if __name__ == "__main__":
    sys.exit(main())
