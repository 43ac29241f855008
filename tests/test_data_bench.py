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
            "--chunk", "1", "--output-dir", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| pipeline | samples/s/core |" in out and "shards → SSL sample" in out
    rows = json.loads((tmp_path / "data.json").read_text())
    assert len(rows) == 6 and all(r["samples/s/core"] > 0 and r["min"] <= r["samples/s/core"] <= r["max"] for r in rows)
