"""``veca eval <protocol>``: dispatch to ``eval.knn | eval.linear | eval.logreg | eval.dense | eval.all``."""

from __future__ import annotations

import importlib
import sys

PROTOCOLS: dict[str, tuple[str, str]] = {
    "knn": ("eval.knn", "weighted k-NN (DINOv2 protocol) at every core width"),
    "linear": ("eval.linear", "linear probe, many heads over an lr grid × feature sets (DINOv2)"),
    "logreg": ("eval.logreg", "scikit-learn logistic regression with a C grid"),
    "dense": ("eval.dense", "linear segmentation (mIoU) and depth (RMSE) probes on patch tokens"),
    "all": ("eval.all", "every protocol of a YAML config, one report"),
}


def _usage() -> str:
    lines = ["usage: veca eval <protocol> [options]", "", "protocols:"]
    lines += [f"  {name:<7} {text}" for name, (_, text) in PROTOCOLS.items()]
    lines += ["", "Run `veca eval <protocol> --help` for its options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] not in PROTOCOLS:
        print(f"veca eval: unknown protocol {argv[0]!r}; valid: {', '.join(PROTOCOLS)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(PROTOCOLS[argv[0]][0]).main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
