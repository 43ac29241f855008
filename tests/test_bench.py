"""Benchmark tooling: peak memory is measured, timings are warmed up and repeated, benches run."""

from __future__ import annotations

import json

import pytest
import torch

from veca_ssl.tables import markdown_table
from veca_ssl.timing import peak_memory_bytes, time_round_robin


def test_peak_memory_sees_a_transient_allocation():
    def spike():
        x = torch.ones(48 * 2**20 // 4)  # 48 MiB, freed before returning
        return float(x.sum())

    peak = peak_memory_bytes(spike)
    if peak is None:
        pytest.skip("no /proc/self/clear_refs on this platform")
    assert 44 * 2**20 < peak < 96 * 2**20


def test_round_robin_warms_up_and_repeats_each_call():
    counts = [0, 0]

    def call(i):
        counts[i] += 1

    times = time_round_robin([lambda: call(0), lambda: call(1)], warmup=3, repeats=5)
    assert counts == [8, 8] and [len(t) for t in times] == [5, 5]
    assert markdown_table([{"a": 1.23456, "b": None}]).splitlines()[2] == "| 1.235 | – |"


def test_bench_backbone_and_train_run_end_to_end(tmp_path, capsys):
    from veca_ssl.bench import backbone, train

    assert backbone.main(["--family", "tiny", "--resolutions", "32", "--widths", "8", "64",
                          "--output-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "backbone.json").read_text())
    assert [r["model"] for r in rows] == ["vit_tiny (dense)", "veca_tiny C8", "veca_tiny C64",
                                         "veca_tiny C64 no-attention (limit)"]
    assert rows[2]["qk_pairs_per_layer"] == 2 * 4 * 64 + 64 * 64
    assert rows[3]["gflops"] < rows[2]["gflops"]  # the limit has no attention term
    assert train.main(["--family", "tiny", "--resolutions", "32", "--batch-size", "2",
                       "--output-dir", str(tmp_path)]) == 0
    assert len(json.loads((tmp_path / "train.json").read_text())) == 4
    assert "speedup_vs_dense" in capsys.readouterr().out


def test_bench_train_times_chosen_widths_with_memory_and_names_the_kernels(tmp_path, capsys):
    from veca_ssl.bench import train

    assert train.main(["--family", "tiny", "--resolutions", "32", "--batch-size", "2", "--widths", "16",
                       "--no-nested", "--memory", "--bf16", "--output-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "train.json").read_text())
    assert [(r["model"], r["cores"]) for r in rows] == [("vit_tiny (dense)", None), ("veca_tiny C64", 64),
                                                        ("veca_tiny C16", 16)]
    assert all(r["peak_mem_mb"] > 0 and len(r["times_ms"]) == 5 for r in rows)
    out = capsys.readouterr().out
    assert "vit_tiny: attention: attn_backend=auto -> sdpa, ran flash" in out and "bfloat16 autocast" in out
    with pytest.raises(SystemExit) as exc:
        train.main(["--widths", "12", "--output-dir", str(tmp_path)])
    assert exc.value.code == 2 and "--widths [12]" in capsys.readouterr().err
