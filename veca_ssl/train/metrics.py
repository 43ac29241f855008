"""Metrics to ``metrics.jsonl`` (one JSON object per logged step), TensorBoard and optionally
Weights & Biases, rank 0 only."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from veca_ssl.optional import available, missing_message

log = logging.getLogger(__name__)


class MetricLogger:
    """Writes each logged step to ``metrics.jsonl`` and, when available/enabled, to TensorBoard and W&B.

    TensorBoard is an optional extra: without it the run goes on with ``metrics.jsonl`` (the same
    scalars) and says so once. W&B (``wandb``) is used only when asked for; see ``wandb_log``.
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 wandb: Any = None, run_config: dict | None = None) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        self.sinks: list[Any] = []
        if enabled and tensorboard:
            if available("tensorboard"):
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            else:  # metrics.jsonl holds the same scalars: the run goes on
                log.warning("TensorBoard logging is off: %s (or set train.tensorboard=false); "
                            "metrics.jsonl has every scalar", missing_message("tensorboard"))
        if enabled and wandb is not None and wandb.get("enabled", False):
            from veca_ssl.train.wandb_log import WandbSink

            self.sinks.append(WandbSink(wandb, output_dir, run_config))

    @classmethod
    def from_config(cls, output_dir: str | Path, cfg: Any, enabled: bool = True) -> MetricLogger:
        """The logger a training run configures: ``train.tensorboard`` and ``train.wandb``."""
        from omegaconf import OmegaConf

        train = cfg.train
        wandb = OmegaConf.to_container(train.wandb, resolve=True) if "wandb" in train else None
        run_config = OmegaConf.to_container(cfg, resolve=True) if wandb and wandb.get("enabled") else None
        return cls(output_dir, enabled=enabled, tensorboard=bool(train.get("tensorboard", True)),
                   wandb=wandb, run_config=run_config)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step}
        for k, v in metrics.items():
            v = float(v) if hasattr(v, "__float__") and not isinstance(v, (str, bool)) else v
            record[k] = v
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
        for sink in self.sinks:
            sink.log(step, record)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for sink in self.sinks:
            sink.close()


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
