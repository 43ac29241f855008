"""Training on real data paths: WebDataset shards for several passes with workers and an exact resume
after SIGKILL, global skip accounting (workers and ranks), layout changes on resume, disjoint ranks,
and every shipped experiment config on an image folder and on the shards make-shards prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from test_train import TINY, sigkill_when_written  # tests/ is on sys.path (no package, pytest prepend mode)

from veca_ssl.config import load_config
from veca_ssl.data import make_shards
from veca_ssl.train.loop import train
from veca_ssl.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
# every shipped config: experiments, the quickstart and the distillation configs (given a stand-in teacher)
CONFIGS = sorted((ROOT / "configs" / "experiments").glob("*.yaml")) + sorted(
    p for p in (ROOT / "configs").glob("*.yaml") if p.name != "default.yaml")


def _folder(root: Path, n: int, bad: int = 0, classes: int = 2) -> Path:
    """``n`` small JPEGs in ``classes`` class folders; the last ``bad`` of them are unreadable."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        if i >= n - bad:
            (d / f"{i:03d}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        else:
            Image.fromarray(rng.integers(0, 256, (24, 28, 3), dtype=np.uint8)).save(d / f"{i:03d}.jpg", quality=90)
    return root


def _shards(tmp_path: Path, n: int, shard_size: int, classes: int = 2) -> str:
    return make_shards(str(_folder(tmp_path / "src", n, classes=classes)), tmp_path / "shards",
                       shard_size=shard_size, progress=False)["spec"]


def test_wds_training_runs_several_passes_and_resumes_bit_identically_after_sigkill(tmp_path):
    spec = _shards(tmp_path, 24, shard_size=4)  # 6 shards; 12 steps of 8 = 4 passes
    common = TINY + [f"data.train={spec}", "data.samples_per_epoch=24", "optim.epochs=4", "data.num_workers=2",
                     "data.shuffle_buffer=4", "train.keep_last=20"]
    straight = tmp_path / "straight"
    summary = train(load_config(None, common + [f"output_dir={straight}", "train.checkpoint_every=12"]))
    assert summary["steps"] == 12 and summary["data"]["seen"] == 96 and summary["data"]["skipped"] == 0

    killed = tmp_path / "killed"
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text(OmegaConf.to_yaml(OmegaConf.from_dotlist(common + [f"output_dir={killed}"])))
    # mid-run, mid-pass (pass 2 of 4)
    sigkill_when_written(cfg_file, killed / "checkpoints" / "checkpoint-00000006.pt", "train.checkpoint_every=2")
    assert not (killed / "export").exists()
    train(load_config(cfg_file, ["train.checkpoint_every=2"]))  # resumes from the latest checkpoint
    a = (straight / "export" / "teacher.safetensors").read_bytes()
    b = (killed / "export" / "teacher.safetensors").read_bytes()
    assert a == b
    losses = {r["step"]: r["loss"] for r in read_metrics(straight / "metrics.jsonl")}
    resumed = {r["step"]: r["loss"] for r in read_metrics(killed / "metrics.jsonl")}
    assert all(resumed[s] == losses[s] for s in range(7, 13))


def test_unreadable_images_over_the_threshold_stop_the_run_counted_over_workers(tmp_path):
    root = _folder(tmp_path / "f", 40, bad=8)  # 20% unreadable
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "veca_ssl.train.main", "--config", "none", *TINY, f"data.train=imagefolder:{root}",
           "data.num_workers=2", "data.max_skip_fraction=0.1", "optim.epochs=3", f"output_dir={out}"]
    cmd[cmd.index("--config") + 1] = str(_empty_config(tmp_path))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    # 15 steps of 8 would finish with each worker below 100 attempts: only the summed count can stop it
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    message = next(line for line in err if line.startswith("veca train: data error:"))
    skipped, seen = (int(v) for v in message.split("error: ")[1].split(" samples")[0].split(" of "))
    assert seen >= 100 and 0.1 < skipped / seen < 0.35 and "data.max_skip_fraction=0.1" in message
    assert "(unreadable)" in message and not (out / "export").exists()
    logged = [r for r in read_metrics(out / "metrics.jsonl") if "data_skipped" in r]
    assert logged and logged[-1]["data_skipped"] > 0 and any("data_bad" in r for r in logged)


def _empty_config(tmp_path: Path) -> Path:
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return path


def test_skip_counts_and_first_bad_paths_reach_metrics_and_summary(tmp_path):
    root = _folder(tmp_path / "f", 24, bad=1)
    out = tmp_path / "run"
    summary = train(load_config(None, TINY + [f"data.train=imagefolder:{root}", "data.max_skip_fraction=0.5",
                                              "optim.epochs=1", "data.num_workers=2", f"output_dir={out}"]))
    data = json.loads((out / "summary.json").read_text())["data"]
    assert data == summary["data"] and data["skipped"] >= 1 and data["seen"] == 24 + data["skipped"]
    assert data["first"][0]["item"].endswith("023.jpg") and data["by_kind"] == {"unreadable": data["skipped"]}
    records = read_metrics(out / "metrics.jsonl")
    assert records[-1]["data_skipped"] == data["skipped"] and records[-1]["data_seen"] == data["seen"]
    assert sum(len(r.get("data_bad", [])) for r in records) == 1  # each bad path reported once


def test_resume_with_other_worker_count_continues_without_repeats_and_says_so(tmp_path):
    spec = _shards(tmp_path, 16, shard_size=2)
    out = tmp_path / "run"
    common = TINY + [f"data.train={spec}", "data.samples_per_epoch=16", "optim.epochs=2", f"output_dir={out}",
                     "data.shuffle_buffer=2", "train.checkpoint_every=1"]
    train(load_config(None, common + ["data.num_workers=2", "train.max_steps=1"]))
    summary = train(load_config(None, common + ["data.num_workers=1"]))
    note = summary["data"]["resume_note"]
    assert "1 rank(s) x 1 worker(s)" in note and "1 rank(s) x 2 worker(s)" in note and summary["steps"] == 4


def _rank_labels(spec: str, batches: int) -> tuple[int, list[int], dict]:
    import multiprocessing

    import torch

    from veca_ssl import distributed as dist
    from veca_ssl.train.data import TrainData, build_train_dataset

    multiprocessing.current_process().daemon = False  # this rank's DataLoader starts worker processes
    cfg = load_config(None, TINY + [f"data.train={spec}", "data.num_workers=2", "optim.batch_size_per_gpu=2",
                                    "data.shuffle_buffer=2"])
    info = dist.DistInfo(dist.get_rank(), dist.get_world_size(), dist.get_rank(), torch.device("cpu"), "gloo")
    data = TrainData(cfg, build_train_dataset(cfg), 8, info, start_sample=0)
    it = iter(data)
    labels = [int(v) for _ in range(batches) for v in next(it)["labels"]]
    return dist.get_rank(), labels, data.log_record()


def test_two_gloo_ranks_with_two_workers_see_disjoint_samples(tmp_path):
    from veca_ssl.spawn import run_two_process

    spec = _shards(tmp_path, 16, shard_size=2, classes=16)  # one image per class: the label names the sample
    (r0, a, log0), (r1, b, log1) = run_two_process(_rank_labels, spec, 4, timeout_s=240)
    assert (r0, r1) == (0, 1) and len(a) == len(b) == 8
    assert set(a).isdisjoint(b) and sorted(a + b) == list(range(16))  # one epoch, shared without overlap
    assert log0 == log1 and log0["data_seen"] == 16 and log0["data_skipped"] == 0  # summed over ranks


def _tiny_overrides(config: Path) -> list[str]:
    family = "veca" if OmegaConf.load(config).model.name.startswith("veca") else "vit"
    model = [f"model.name={family}_tiny", "model.patch_size=8", "model.overrides={embed_dim: 32, depth: 2, num_heads: 2}"]
    if family == "veca":
        model.append("model.num_cores=16")
    return model + [
        "crops.global_size=32", "crops.local_size=16", "crops.num_local=2", "dino.head_out_dim=64",
        "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32", "ibot.head_out_dim=64", "ibot.head_hidden_dim=64",
        "ibot.head_bottleneck_dim=32", "optim.batch_size_per_gpu=4", "data.num_workers=0", "train.max_steps=2",
        "train.progress=false", "train.knn_monitor.enabled=false", "train.checkpoint_every=1000", "deterministic=true",
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_experiment_config_trains_on_a_folder_and_on_the_printed_shard_spec(config, tmp_path, capsys):
    from veca_ssl.data.cli import main as data_main

    folder = _folder(tmp_path / "train", 16)  # /…/train with class sub-folders, like the issue's /d/train
    assert data_main(["make-shards", str(folder), str(tmp_path / "shards"), "--shard-size", "4"]) == 0
    spec = capsys.readouterr().out.split("use: ")[1].strip()  # exactly what make-shards printed
    extra = []
    if OmegaConf.load(config).get("mode") == "distill":  # the config's teacher is the user's: a tiny stand-in
        from veca_ssl.models import build_backbone, save_backbone

        teacher = build_backbone("vit_tiny", patch_size=8, depth=1, embed_dim=48, num_heads=2)
        extra = [f"distill.teacher={save_backbone(teacher, tmp_path / 'teacher.safetensors')}"]
    for name, data in (("folder", f"imagefolder:{folder}"), ("shards", spec)):
        # nothing else changes: the wds configs keep their data.samples_per_epoch, the others count the
        # folder or read the count from the manifest make-shards wrote
        cfg = load_config(config, _tiny_overrides(config) + extra + [f"data.train={data}",
                                                                     f"output_dir={tmp_path / name}"])
        summary = train(cfg)
        assert summary["steps"] == 2 and summary["data"]["seen"] == 8, (name, summary)
