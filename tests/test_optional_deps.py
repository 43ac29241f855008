"""Optional dependencies (faiss, TensorBoard, Weights & Biases): the code runs without them and names
the extra to install when one is asked for; W&B, when enabled, receives the training scalars."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from test_train import TINY as _TRAIN_TINY  # tests/ is on sys.path (no package, pytest prepend mode)

from veca_ssl.config import ConfigError, load_config
from veca_ssl.train.loop import train
from veca_ssl.train.metrics import read_metrics

# test_train.py's model on 32 images
TINY = [*_TRAIN_TINY, "data.train=synthetic:n=32,size=32,classes=4,seed=0", "train.checkpoint_every=100"]


def test_faiss_backend_without_faiss_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from veca_ssl.knn import knn_search

    monkeypatch.setitem(sys.modules, "faiss", None)  # Python's marker for "not installed"
    bank, queries = torch.randn(20, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"pip install 'veca-ssl\[faiss\]'.*--backend torch"):
        knn_search(bank, queries, 5, backend="faiss")
    assert knn_search(bank, queries, 5, backend="torch")[1].shape == (4, 5)  # the default needs nothing


def test_training_without_tensorboard_logs_jsonl_and_says_so(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    cfg = load_config(None, TINY + ["train.max_steps=2", f"output_dir={tmp_path / 'run'}"])
    with caplog.at_level("WARNING"):
        train(cfg)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert sum("veca-ssl[tensorboard]" in r.getMessage() for r in caplog.records) == 1


def test_wandb_enabled_without_wandb_is_refused_before_any_work(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"train.wandb.enabled=true: .*pip install 'veca-ssl\[wandb\]'"):
        load_config(None, TINY + ["train.wandb.enabled=true", f"output_dir={tmp_path / 'run'}"])
    load_config(None, TINY + [f"output_dir={tmp_path / 'run'}"])  # off by default: never required
    # the real CLI: one message, exit 2, no traceback, nothing created
    code = ("import sys; sys.modules['wandb'] = None; from veca_ssl.cli import main; "
            f"sys.exit(main(['train', 'train.wandb.enabled=true', 'output_dir={tmp_path / 'cli'}']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "veca train: config error: train.wandb.enabled=true: Weights & Biases logging needs the wandb package, "
        "which is not installed: pip install 'veca-ssl[wandb]' (or pip install wandb); "
        "or set train.wandb.enabled=false"]
    assert not (tmp_path / "cli").exists()


class _FakeWandb(types.ModuleType):
    """Stands in for the wandb package: records init/log/finish calls."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.logged: list[tuple[int, dict]] = []
        self.finished = 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            id = kwargs.get("id") or "run-abc123"

            def log(self, data: dict, step: int) -> None:
                fake.logged.append((step, dict(data)))

            def finish(self) -> None:
                fake.finished += 1

        return Run()


def test_wandb_receives_the_scalars_of_every_logged_step(tmp_path: Path, monkeypatch) -> None:
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    overrides = TINY + ["train.wandb.enabled=true", "train.wandb.project=proj", "train.wandb.tags=[a,b]",
                        f"output_dir={out}"]
    train(load_config(None, overrides + ["train.max_steps=3"]))
    (init,) = fake.inits
    assert init["project"] == "proj" and init["tags"] == ["a", "b"] and init["name"] == "run"
    assert init["dir"] == str(out) and init["config"]["model"]["name"] == "veca_tiny" and init["id"] is None
    records = read_metrics(out / "metrics.jsonl")
    assert [s for s, _ in fake.logged] == [r["step"] for r in records] == [1, 2, 3]
    for (_, data), rec in zip(fake.logged, records):
        assert data["loss"] == rec["loss"] and data["lr"] == rec["lr"] and "step" not in data
    assert fake.finished == 1 and (out / "wandb_run_id").read_text() == "run-abc123"
    # a resumed run logs into the same W&B run
    train(load_config(None, overrides + ["train.max_steps=4"]))
    assert fake.inits[1]["id"] == "run-abc123" and fake.inits[1]["resume"] == "allow"
    assert fake.logged[-1][0] == 4 and fake.finished == 2
