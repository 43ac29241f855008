"""Smoke test of `veca bench data` at toy sizes (the real numbers come from running it by hand)."""

from __future__ import annotations

import json

from PIL import Image

from veca_ssl.bench.data import generate_jpeg_folder, main


def test_generated_folder_is_jpeg_in_two_classes(tmp_path):
    root = generate_jpeg_folder(tmp_path / "jpeg", 4, (40, 30))
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == 4 and {f.parent.name for f in files} == {"class_a", "class_b"}
    sizes = [Image.open(f).size for f in files]
    assert all(Image.open(f).format == "JPEG" for f in files)
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)  # both orientations


def test_bench_data_prints_table_and_writes_rows(tmp_path, capsys):
    args = ["--images", "4", "--size", "48x40", "--global-size", "32", "--local-size", "16", "--local-crops", "2",
            "--chunk", "1", "--out", str(tmp_path / "res.json"), "--workers", "1", "--batch-size", "2",
            "--loader-batches", "1", "--resume-at", "1000", "--resume-shards", "2", "--resume-shard-size", "30"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| pipeline | samples/s/core |" in out and "shards → SSL sample" in out and "resume cost" in out
    rows = json.loads((tmp_path / "res.json").read_text())
    assert len(rows) == 6 and all(r["samples/s/core"] > 0 and r["min"] <= r["samples/s/core"] <= r["max"] for r in rows)
    loaders = json.loads((tmp_path / "res_loaders.json").read_text())
    assert [(r["source"], r["workers"]) for r in loaders] == [("folder", 1), ("shards", 1)]
    assert all(r["samples/s"] > 0 and r["samples/s/core"] > 0 for r in loaders)
    resume = json.loads((tmp_path / "res_resume.json").read_text())
    assert [(r["start sample"], r["workers"]) for r in resume] == [(0, 0), (1000, 0), (0, 1), (1000, 1)]
    # resuming 1000 samples in decodes exactly what the first batch needs, like a fresh start
    assert all(r["images decoded"] == 2 for r in resume)
