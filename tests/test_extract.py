"""``veca extract``: shards + manifest, byte-identical resume after an interruption, the reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eval.extract import extract_to_shards, read_features
from veca_ssl.models import build_backbone


def _model():
    torch.manual_seed(0)
    return build_backbone("veca_tiny", patch_size=8, num_cores=16, depth=2, embed_dim=64, num_heads=2).eval()


def _data(n: int = 22):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(3, 32, 32, generator=g), i % 3) for i in range(n)]


INFO = {"model": "veca_tiny-test", "checkpoint": None, "dataset": "in-test tensors"}


def _run(out, **kw):
    args = dict(width=8, resolution=32, batch_size=4, shard_size=8, with_patches=True, info=INFO, progress=False)
    args.update(kw)
    return extract_to_shards(_model(), _data(), out, **args)


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name.startswith("shard-")}


@pytest.mark.parametrize("fmt", ["safetensors", "npy"])
def test_interrupted_extraction_resumes_to_identical_shards(tmp_path, fmt) -> None:
    full = _run(tmp_path / "full", fmt=fmt)
    assert full["complete"] and [s["count"] for s in full["shards"]] == [8, 8, 6]

    part = tmp_path / "part"
    first = _run(part, fmt=fmt, max_shards=1)
    assert not first["complete"] and len(first["shards"]) == 1

    class Crash(RuntimeError):
        pass

    def crash_after_second(index: int) -> None:
        if index == 1:
            raise Crash

    with pytest.raises(Crash):
        _run(part, fmt=fmt, on_shard=crash_after_second)
    manifest = json.loads((part / "manifest.json").read_text())
    assert [s["index"] for s in manifest["shards"]] == [0, 1] and not manifest["complete"]
    # A torn write of the next shard (no manifest entry) must be redone, not trusted.
    torn = "shard-00002.safetensors" if fmt == "safetensors" else "shard-00002.image.npy"
    (part / torn).write_bytes(b"garbage")

    resumed = _run(part, fmt=fmt, on_shard=lambda i: None if i == 2 else pytest.fail(f"redid shard {i}"))
    assert resumed["complete"]
    assert _files(part) == _files(tmp_path / "full")
    assert resumed["shards"] == full["shards"]


def test_reader_returns_arrays_in_dataset_order_equal_to_direct_features(tmp_path) -> None:
    _run(tmp_path, fmt="safetensors")
    arrays = read_features(tmp_path)
    assert set(arrays) == {"image", "patch_mean", "patches", "labels", "indices"}
    assert arrays["image"].shape == (22, 64) and arrays["patches"].shape == (22, 16, 64)
    np.testing.assert_array_equal(arrays["indices"], np.arange(22))
    np.testing.assert_array_equal(arrays["labels"], np.arange(22) % 3)
    model, data = _model(), _data()
    with torch.no_grad():
        out = model.forward_features(torch.stack([x for x, _ in data[8:12]]), num_cores=8)
    np.testing.assert_allclose(arrays["image"][8:12], out["cls"].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(arrays["patch_mean"][8:12], out["patches"].mean(1).numpy(), rtol=1e-5, atol=1e-5)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["width"] == 8 and manifest["resolution"] == 32 and manifest["count"] == 22
    assert manifest["dtype"] == "float32" and manifest["dataset"] == "in-test tensors"


def test_default_width_is_the_full_bank_and_float16(tmp_path) -> None:
    m = _run(tmp_path, width=None, dtype="float16", with_patches=False)
    assert m["width"] == 16
    arrays = read_features(tmp_path)
    assert arrays["image"].dtype == np.float16 and "patches" not in arrays


def test_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"width\(s\) \[12\] not supported.*\[8, 16\]"):
        _run(tmp_path / "a", width=12)
    _run(tmp_path / "b", max_shards=1)
    with pytest.raises(ValueError, match="differs in resolution"):
        _run(tmp_path / "b", resolution=16)
    with pytest.raises(ValueError, match="incomplete"):
        read_features(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_features(tmp_path / "nothing")
