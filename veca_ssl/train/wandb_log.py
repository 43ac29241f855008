"""Optional Weights & Biases logging of the training scalars (``train.wandb``; off by default).

``wandb`` is never required: it is imported only when ``train.wandb.enabled=true``, and a missing
package is reported before any work starts (``veca_ssl.config.check``). The run id is kept in
``<output_dir>/wandb_run_id``, so a resumed or requeued run keeps logging into the same W&B run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from veca_ssl.optional import available, missing_message

RUN_ID_FILE = "wandb_run_id"


class WandbSink:
    """Sends the scalars of each logged step to one W&B run (rank 0 only, like the other sinks)."""

    def __init__(self, settings: Any, output_dir: str | Path, run_config: dict | None = None) -> None:
        if not available("wandb"):  # config.check refuses this before a run; direct callers get it here
            raise RuntimeError(f"train.wandb.enabled=true: {missing_message('wandb')}")
        import wandb

        out = Path(output_dir)
        id_file = out / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        self.run = wandb.init(
            project=settings.get("project") or "veca-ssl", entity=settings.get("entity") or None,
            name=settings.get("name") or out.name, group=settings.get("group") or None,
            tags=list(settings.get("tags") or []), mode=settings.get("mode") or None, dir=str(out),
            config=run_config, id=run_id, resume="allow")
        new_id = getattr(self.run, "id", None)
        if new_id and new_id != run_id:
            id_file.write_text(str(new_id))

    def log(self, step: int, record: dict) -> None:
        scalars = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, float) and math.isfinite(v)}
        if scalars:
            self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


__all__ = ["WandbSink", "RUN_ID_FILE"]
