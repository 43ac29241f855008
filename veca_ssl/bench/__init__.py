"""``veca bench <what>``: benchmarks that print tables (ratios measured side by side in one run)."""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "backbone": "veca_ssl.bench.backbone",
    "data": "veca_ssl.bench.data",
    "train": "veca_ssl.bench.train",
    "knn": "veca_ssl.bench.knn",
    "ddp": "veca_ssl.bench.ddp",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: veca bench {" + ",".join(BENCHES) + "} [options]")
        return 0
    if argv[0] not in BENCHES:
        print(f"veca bench: unknown benchmark {argv[0]!r}; valid: {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(BENCHES[argv[0]]).main(argv[1:]) or 0)
