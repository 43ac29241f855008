"""``veca select``: the width chosen from a report by tolerance, latency budget and GFLOP budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval.cli import main as eval_main
from eval.extract_cli import main as extract_main
from eval.report import write_report
from eval.selection import SELECTION_FORMAT, SelectionError, read_selection, select_width
from eval.selection import main as select_main
from veca_ssl.export import main as export_main
from veca_ssl.models import build_backbone, save_backbone

ROOT = Path(__file__).resolve().parent.parent

#: width → (top-1 %, GFLOPs, latency ms): quality saturates, compute grows.
WIDTHS = {8: (70.0, 1.00, 1.0), 16: (78.5, 1.30, 1.5), 24: (79.4, 1.60, 2.2), 32: (79.9, 1.90, 3.0),
          64: (80.0, 3.10, 6.0)}


def _report(tmp_path: Path, metric: str = "linear_top1", values: dict | None = None) -> Path:
    rows = []
    for w, (q, g, lat) in (values or WIDTHS).items():
        rows.append({"width": f"C{w}", "num_cores": w, "reference": False, metric: q, f"{metric}_ci_lo": q - 1.5,
                     f"{metric}_ci_hi": q + 1.5, "gflops": g, "latency_ms": lat, "latency_min_ms": lat * 0.9,
                     "latency_max_ms": lat * 1.1, "images_per_s": 1000 / lat})
    rows.append({"width": "dense", "num_cores": None, "reference": True, metric: 99.0, "gflops": 0.1,
                 "latency_ms": 0.1})  # a reference row is never a candidate, however good and cheap
    write_report(rows, tmp_path, "synthetic", {"resolution": 224, "device": "cpu", "config": {"checkpoint": None}})
    return tmp_path / "report.json"


def _select(report: Path, *args: str) -> dict:
    assert select_main(["--report", str(report), "--latency-from-report", *args]) == 0
    return json.loads((report.parent / "selection.json").read_text())


def test_tolerance_picks_the_smallest_width_close_to_the_widest(tmp_path, capsys) -> None:
    sel = _select(_report(tmp_path))  # default tolerance: 1 point of the widest (80.0)
    assert sel["width"] == 24 and sel["width_label"] == "C24" and sel["format"] == SELECTION_FORMAT
    assert sel["quality"] == 79.4 and sel["widest"] == {"width": 64, "quality": 80.0}
    assert sel["criterion"] == {"tolerance": 1.0, "max_latency_ms": None, "max_gflops": None}
    assert sel["latency_ms"] == 2.2 and sel["gflops"] == 1.6 and sel["latency_source"] == "report"
    assert [c["eligible"] for c in sel["candidates"]] == [False, False, True, True, True]
    out = capsys.readouterr().out
    assert "C24 ◀ selected" in out and "| vs widest |" in out and "79.4 [77.9, 80.9]" in out
    assert (tmp_path / "selection.png").stat().st_size > 0 and (tmp_path / "selection.md").is_file()
    # the file is refused a second time, replaced with --overwrite
    assert select_main(["--report", str(tmp_path), "--latency-from-report", "--tolerance", "2"]) == 2
    assert _select(tmp_path / "report.json", "--tolerance", "2", "--overwrite")["width"] == 16
    assert _select(tmp_path / "report.json", "--tolerance", "0", "--overwrite")["width"] == 64


def test_latency_budget_picks_the_best_width_that_fits(tmp_path) -> None:
    report = _report(tmp_path)
    assert _select(report, "--max-latency-ms", "2.5")["width"] == 24
    assert _select(report, "--max-latency-ms", "1.2", "--overwrite")["width"] == 8
    sel = _select(report, "--max-latency-ms", "100", "--overwrite")
    assert sel["width"] == 64 and sel["rule"] == "best linear_top1 with latency_ms <= 100 ms"


def test_gflop_budget_and_both_budgets(tmp_path) -> None:
    report = _report(tmp_path)
    assert _select(report, "--max-gflops", "1.35")["width"] == 16
    assert _select(report, "--max-gflops", "2", "--max-latency-ms", "2.5", "--overwrite")["width"] == 24


def test_lower_is_better_metric_uses_the_tolerance_upwards(tmp_path) -> None:
    report = _report(tmp_path, "depth_rmse", {8: (0.50, 1.0, 1.0), 16: (0.42, 1.3, 1.5), 64: (0.40, 3.1, 6.0)})
    assert _select(report, "--tolerance", "0.05")["width"] == 16
    assert _select(report, "--max-gflops", "5", "--overwrite")["width"] == 64  # the lowest error


def test_impossible_budget_is_one_clear_error(tmp_path) -> None:
    report = _report(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "veca_ssl.cli", "select", "--report", str(report),
                           "--latency-from-report", "--max-latency-ms", "0.5"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("veca select: error: no width meets the budget latency_ms <= 0.5 ms")
    assert "the lowest is 1 ms, at C8" in proc.stderr
    assert not (tmp_path / "selection.json").exists()
    with pytest.raises(SelectionError, match="either --tolerance or a budget"):
        select_width([{"width": "C8", "num_cores": 8, "quality": 1.0, "latency_ms": 1.0, "gflops": 1.0}],
                     "m", tolerance=1.0, max_gflops=2.0)
    with pytest.raises(SelectionError, match="metric 'knn_k20_top1' is missing.*available: linear_top1"):
        select_width_from(report, "knn_k20_top1")


def select_width_from(report: Path, metric: str) -> None:
    from eval.selection import candidates_from_report, read_report

    candidates_from_report(read_report(report)[0], metric)


def test_measured_selection_feeds_extract(tmp_path) -> None:
    """End to end: eval a checkpoint, select under a GFLOP budget measured here, extract at that width."""
    torch.manual_seed(0)
    model = build_backbone("veca_tiny", patch_size=8, num_cores=16, depth=2, embed_dim=32, num_heads=2)
    ckpt = save_backbone(model, tmp_path / "ckpt" / "teacher.safetensors")
    syn = "synthetic:n=24,val_n=12,size=32,classes=3"
    assert eval_main(["knn", "--checkpoint", str(ckpt), "--train", f"{syn}@train", "--test", f"{syn}@val",
                      "--resolution", "32", "--no-speed", "--output-dir", str(tmp_path / "ev")]) == 0
    budget = (model.flops(64, 64, 8) + model.flops(64, 64, 16)) / 2 / 1e9  # between the two widths at 64 px
    assert select_main(["--report", str(tmp_path / "ev" / "knn"), "--max-gflops", str(budget), "--resolution",
                        "64", "--batch-size", "2", "--speed-warmup", "0", "--speed-repeats", "2"]) == 0
    sel = read_selection(tmp_path / "ev" / "knn" / "selection.json")
    assert sel["width"] == 8 and sel["latency_source"] == "measured" and sel["resolution"] == 64
    assert sel["batch_size"] == 2 and sel["checkpoint"] == str(ckpt)
    assert sel["gflops"] == pytest.approx(model.flops(64, 64, 8) / 1e9)  # at the target resolution
    assert all(c["latency_ms"] > 0 for c in sel["candidates"])

    out = tmp_path / "feats"
    assert extract_main(["--checkpoint", str(ckpt), "--data", f"{syn}@val", "--width-from",
                         str(tmp_path / "ev" / "knn" / "selection.json"), "--output-dir", str(out),
                         "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["width"] == 8 and manifest["resolution"] == 64  # the width and resolution selected for

    # the same selection deploys: veca export takes its width, resolution and batch
    exported = tmp_path / "deploy" / "w.safetensors"
    assert export_main(["--checkpoint", str(ckpt), "--width-from", str(tmp_path / "ev" / "knn" / "selection.json"),
                        "--out", str(exported)]) == 0
    meta = json.loads(exported.with_suffix(".json").read_text())
    assert meta["width"] == 8 and meta["resolution"] == 64 and meta["config"]["num_cores"] == 8
    assert export_main(["--checkpoint", str(ckpt), "--width", "8", "--width-from",
                        str(tmp_path / "ev" / "knn" / "selection.json"), "--out", str(exported)]) == 2


def test_read_selection_checks_the_format(tmp_path) -> None:
    bad = tmp_path / "s.json"
    bad.write_text(json.dumps({"width": 8}))
    with pytest.raises(SelectionError, match="not a `veca select` file"):
        read_selection(bad)
    bad.write_text(json.dumps({"format": SELECTION_FORMAT, "version": 1, "width": 0}))
    with pytest.raises(SelectionError, match="'width' must be a positive integer or null"):
        read_selection(bad)
    with pytest.raises(FileNotFoundError, match="selection file not found"):
        read_selection(tmp_path / "missing.json")
