"""Metrics to ``metrics.jsonl`` (one JSON object per logged step), TensorBoard and, when asked for,
Weights & Biases (``veca_ssl.train.wandb_log``), rank 0 only. TensorBoard is an optional extra:
without it the run goes on with ``metrics.jsonl`` (the same scalars) and says so once.

The file is append-only while a run is alive. Two things can leave it inconsistent, and both are
repaired when a run starts (``MetricLogger(..., resume_step=N)``):

- a resume from the checkpoint of step N after the run had logged past N (it was killed, or stopped
  between checkpoints): records after step N are dropped, so the resumed run does not log those
  steps twice;
- a torn last line: a kill or a full disk in the middle of an append leaves a line without its
  newline or its closing brace. ``read_metrics`` drops it too (with a warning), so a crashed run's
  metrics stay readable.

A failed append (disk full, quota, read-only, permissions) raises ``MetricsWriteError`` naming the
file and the cause; the TensorBoard events get the same treatment through ``purge_step``.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

from veca_ssl import fileio
from veca_ssl.optional import available, missing_message

log = logging.getLogger(__name__)


class MetricsWriteError(OSError):
    """``metrics.jsonl`` could not be appended to (disk full, quota, permissions); ``remedy`` says what
    to do (``fileio.write_failure``)."""

    remedy = "fix that"


def _parse_lines(path: Path) -> tuple[list[dict], bool]:
    """The records of ``path`` and whether a torn last line was dropped. A damaged line anywhere
    else is real corruption: ``ValueError`` naming the line."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    complete = raw.endswith(b"\n")
    # the piece after the last newline: empty for a complete file, else an unterminated (torn) line
    tail = lines.pop() if lines else b""
    records: list[dict] = []
    torn = bool(tail.strip()) and not complete
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if number == len(lines) and not torn:  # the last complete line, torn before its end
                torn = True
                continue
            raise ValueError(f"{path}:{number} is not a JSON record ({exc}); the file was edited or damaged") from None
        records.append(record)
    return records, torn


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; a torn last line (a run killed mid-write or a full disk)
    is dropped with a warning."""
    records, torn = _parse_lines(Path(path))
    if torn:
        warnings.warn(f"{path}: dropped a torn last line (the run was interrupted while writing it)", stacklevel=2)
    return records


class MetricLogger:
    """Appends one JSON record per logged step to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    ``resume_step``: the step the run continues from (0 for a fresh run); records after it and a torn
    last line are removed first (see the module docstring). ``wandb``: the ``train.wandb`` settings
    (a dict; used when ``enabled``), ``run_config``: the resolved config W&B records with the run.
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None, wandb: dict | None = None,
                 run_config: dict | None = None) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.writer = None
        self.sinks: list[Any] = []
        self._keys_at: dict[int, set[str]] = {}
        if not enabled:
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        if tensorboard and available("tensorboard"):
            from torch.utils.tensorboard import SummaryWriter

            # events at steps > resume_step belong to the abandoned timeline: hide them
            purge = resume_step + 1 if resume_step is not None else None
            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=purge)
        elif tensorboard:  # an optional extra; metrics.jsonl holds the same scalars, so the run goes on
            log.warning("TensorBoard logging is off: %s (or set train.tensorboard=false); metrics.jsonl has "
                        "every scalar", missing_message("tensorboard"))
        if wandb and wandb.get("enabled", False):
            from veca_ssl.train.wandb_log import WandbSink

            self.sinks.append(WandbSink(wandb, output_dir, run_config))

    @classmethod
    def from_config(cls, output_dir: str | Path, cfg: Any, enabled: bool = True,
                    resume_step: int | None = None) -> MetricLogger:
        """The logger a training run configures: ``train.tensorboard`` and ``train.wandb``."""
        from omegaconf import OmegaConf

        train = cfg.train
        wandb = OmegaConf.to_container(train.wandb, resolve=True) if "wandb" in train else None
        run_config = OmegaConf.to_container(cfg, resolve=True) if wandb and wandb.get("enabled") else None
        return cls(output_dir, enabled=enabled, tensorboard=bool(train.get("tensorboard", True)),
                   resume_step=resume_step, wandb=wandb, run_config=run_config)

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():  # absent, or something special (e.g. a device): leave it alone
            return
        records, torn = _parse_lines(self.path)
        kept = [r for r in records if int(r.get("step", 0)) <= step]
        for r in kept:
            self._keys_at.setdefault(int(r.get("step", 0)), set()).update(r)
        if torn or len(kept) != len(records):
            dropped = len(records) - len(kept)
            log.info("metrics.jsonl: kept %d records up to step %d, dropped %d later ones%s", len(kept), step,
                     dropped, " and a torn last line" if torn else "")
            fileio.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def logged(self, step: int) -> set[str]:
        """Keys already on file for ``step`` from before this run started (after the repair)."""
        return self._keys_at.get(step, set())

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step}
        for k, v in metrics.items():
            v = float(v) if hasattr(v, "__float__") and not isinstance(v, (str, bool)) else v
            record[k] = v
        line = json.dumps(record) + "\n"
        try:
            with open(self.path, "a") as f:  # one write per record: a kill tears at most the last line
                f.write(line)
        except OSError as exc:
            cause, remedy = fileio.write_failure(exc, self.path)
            reason = f"the disk is full ({cause})" if fileio.is_disk_full(exc) else cause
            error = MetricsWriteError(f"cannot append step {step} to {self.path}: {reason}")
            error.errno, error.remedy = exc.errno, remedy
            raise error from exc
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
        for sink in self.sinks:
            sink.log(step, record)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as exc:  # e.g. a full disk: the metrics file is what matters
                log.warning("closing TensorBoard events failed: %s", exc)
            self.writer = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []
