"""``veca bench <what>``: benchmarks that print tables (ratios measured side by side in one run)."""

from __future__ import annotations

BENCHES: dict[str, tuple[str, str]] = {
    "backbone": ("veca_ssl.bench.backbone", "VECA vs dense ViT vs attention removed, across resolutions"),
    "data": ("veca_ssl.bench.data", "multi-crop samples/s per core from JPEG folders and shards"),
    "train": ("veca_ssl.bench.train", "training images/s, VECA vs dense"),
    "knn": ("veca_ssl.bench.knn", "k-NN seconds: torch and faiss vs a matrix-product floor"),
    "ddp": ("veca_ssl.bench.ddp", "gloo DDP step time, 2 processes vs 1"),
}


def main(argv: list[str] | None = None) -> int:
    from veca_ssl.cli import dispatch

    return dispatch(BENCHES, argv, "veca bench")
