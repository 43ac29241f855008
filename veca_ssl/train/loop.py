"""The training loop: ``train(cfg)`` = ``setup`` -> ``train_step`` for every step -> ``finish``.

One step, top to bottom (nanoGPT-style):
  schedules -> widths -> forward (the method returns a dict of losses) -> finite check -> backward
  -> clip -> optimiser step -> EMA teacher update -> log -> checkpoint.
Everything a bit-exact resume needs is in the checkpoint; the data position is derived from the step
because samples are addressed by their global position (``InfiniteSampler``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from veca_ssl import distributed as dist
from veca_ssl import signals
from veca_ssl.config import build_model, save_config
from veca_ssl.data import build_dataset
from veca_ssl.method.base import Method
from veca_ssl.method.budgets import BudgetPolicy, resolve_budgets
from veca_ssl.method.distill import ElasticDistillation
from veca_ssl.method.ssl import ElasticDINO
from veca_ssl.models import save_backbone
from veca_ssl.models.base import Backbone
from veca_ssl.parallelize import wrap_ddp
from veca_ssl.train.checkpoint import CheckpointManager, rng_state, set_rng_state
from veca_ssl.train.data import build_train_loader
from veca_ssl.train.metrics import MetricLogger
from veca_ssl.train.monitor import KnnMonitor
from veca_ssl.train.multires import FixedSchedule, MultiResSchedule, parse_phases
from veca_ssl.train.optim import ElasticAdamW, build_optimizer, clip_grad_norms, set_schedules
from veca_ssl.train.schedules import cosine_schedule, scaled_lr, teacher_temperature

log = logging.getLogger("veca_ssl.train")

__all__ = ["NonFiniteLossError", "build_model", "build_method", "setup", "train_step", "finish", "train"]


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss term is NaN/Inf; the last checkpoint on disk is the last good state."""


def build_method(cfg: DictConfig, backbone: Backbone) -> Method:
    if cfg.mode == "distill":
        return ElasticDistillation(cfg, backbone)
    return ElasticDINO(cfg, backbone)


def check_finite(losses: dict, step: int, last_checkpoint: Path | None) -> None:
    bad = [k for k, v in losses.items() if not math.isfinite(float(v.detach()))]
    if bad:
        terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
        raise NonFiniteLossError(
            f"non-finite loss at step {step}: {', '.join(bad)} (all terms: {terms}). The last good checkpoint "
            f"is {last_checkpoint or '(none yet)'}; lower optim.base_lr or raise optim.warmup_epochs, then "
            f"rerun to resume from it.")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _autocast(cfg: DictConfig, device: torch.device):
    use_bf16 = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@dataclass
class Run:
    """Everything the steps of one run share: built once by ``setup``."""

    cfg: DictConfig
    info: dist.DistInfo
    output_dir: Path
    method: Method
    optimizer: ElasticAdamW
    policy: BudgetPolicy
    schedule: FixedSchedule | MultiResSchedule
    data: Iterator[dict]
    checkpoints: CheckpointManager
    logger: MetricLogger
    monitor: KnnMonitor | None
    start_step: int
    stop_at: int
    peak_lr: float
    warmup_steps: int
    last_checkpoint: Path | None
    t_last: float = field(default_factory=time.perf_counter)

    @property
    def main(self) -> bool:
        return self.info.rank == 0


def setup(cfg: DictConfig) -> Run:
    """Build the model, method, optimiser, schedules and data; resume from the newest checkpoint.

    ``cfg`` was validated by ``veca_ssl.config.check`` (``load_config`` runs it), so what can still fail
    here is what only the files can tell (a dataset path, a teacher checkpoint).
    """
    info = dist.init_distributed(cfg.device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    # the same seed on every rank while building: DDP syncs the student from rank 0, but the EMA
    # teacher and the loss modules are not wrapped, so they must start identical everywhere
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    backbone = build_model(cfg)
    widths = resolve_budgets(backbone.budgets, cfg.budgets.choices)
    policy = BudgetPolicy(widths, cfg.budgets.policy, cfg.budgets.weights, seed=cfg.seed)
    phases = parse_phases(cfg.multires, cfg.model.patch_size, cfg.optim.epochs)  # [] = one size
    dataset = build_dataset(cfg.data.train, split=cfg.data.split, max_skip_fraction=cfg.data.max_skip_fraction)
    method = build_method(cfg, backbone).to(info.device)
    dist.seed_everything(cfg.seed, info.rank)  # per-rank randomness (drop-path, coordinate jitter) from here

    if info.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    checkpoints = CheckpointManager(out / "checkpoints", cfg.train.keep_last)
    optimizer = build_optimizer(method.student, backbone.depth, cfg.optim)

    start_step, latest = 0, checkpoints.latest()
    if latest is not None:
        state = CheckpointManager.load(latest)
        method.load_state_dict(state)
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        set_rng_state(state["rng"])
        if info.rank == 0:
            print(f"resumed from {latest} at step {start_step}", flush=True)

    if info.world_size > 1:
        def wrap(student: torch.nn.Module) -> torch.nn.Module:
            if cfg.dino.head_use_bn and info.device.type == "cuda":  # BN statistics over the global batch
                student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
            return wrap_ddp(student, info)

        method.parallelize(wrap)

    # schedule lengths: epochs of data.samples_per_epoch (or the dataset length) samples
    samples_per_epoch = cfg.data.samples_per_epoch or len(dataset)
    if phases:  # per-step size and batch; epochs are counted at each phase's rate
        schedule = MultiResSchedule(phases, samples_per_epoch, info.world_size, cfg.optim.epochs, cfg.seed)
        if info.rank == 0:
            print(schedule.describe(), flush=True)
    else:
        schedule = FixedSchedule(cfg.crops.global_size, cfg.optim.batch_size_per_gpu, samples_per_epoch,
                                 info.world_size, cfg.optim.epochs)
    stop_at = min(schedule.total_steps, cfg.train.max_steps or schedule.total_steps)
    # multires too: the lr is scaled by the reference batch optim.batch_size_per_gpu x world size
    peak_lr = scaled_lr(cfg.optim.base_lr, cfg.optim.batch_size_per_gpu * info.world_size, rule=cfg.optim.lr_scaling)

    loader = build_train_loader(cfg, dataset, backbone.patch_size, info, schedule.samples_before(start_step),
                                multires=schedule if phases else None, start_step=start_step)
    monitor = None
    if cfg.train.knn_monitor.enabled and cfg.train.knn_monitor.dataset:
        monitor = KnnMonitor(cfg, info.device, out)
        if info.rank == 0 and start_step == 0:
            monitor.record_before(method.ema_backbone)
    return Run(cfg=cfg, info=info, output_dir=out, method=method, optimizer=optimizer, policy=policy,
               schedule=schedule, data=iter(loader), checkpoints=checkpoints,
               logger=MetricLogger(out, enabled=info.rank == 0), monitor=monitor, start_step=start_step,
               stop_at=stop_at, peak_lr=peak_lr, warmup_steps=schedule.step_of_epoch(cfg.optim.warmup_epochs),
               last_checkpoint=latest)


def train_step(run: Run, step: int) -> tuple[bool, dict | None]:
    """One optimisation step (index ``step``, 0-based). Returns ``(stop, record)``: ``stop`` is True when
    the run must end now (a stop signal arrived; the checkpoint after this step is written), ``record``
    the logged metrics when this step logged, else None."""
    cfg, method, total_steps = run.cfg, run.method, run.schedule.total_steps
    epoch = run.schedule.epoch_at(step)
    batch = _to_device(next(run.data), run.info.device)

    # pure-function schedules of the step
    lr = cosine_schedule(step, total_steps, run.peak_lr, cfg.optim.min_lr, warmup_steps=run.warmup_steps)
    wd = cosine_schedule(step, total_steps, cfg.optim.weight_decay, cfg.optim.weight_decay_end)
    momentum = cosine_schedule(step, total_steps, cfg.optim.momentum_teacher, cfg.optim.final_momentum_teacher)
    teacher_temp = teacher_temperature(step, run.schedule.step_of_epoch(cfg.dino.warmup_teacher_temp_epochs),
                                       cfg.dino.warmup_teacher_temp, cfg.dino.teacher_temp)
    set_schedules(run.optimizer, lr, wd, freeze_last_layer=epoch < cfg.optim.freeze_last_layer_epochs)
    widths = run.policy(step)  # same on every rank: a function of (seed, step)

    with _autocast(cfg, run.info.device):
        losses = method(batch, widths, teacher_temp)
    check_finite(losses, step, run.last_checkpoint)

    run.optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else float("inf")
    grad_norms = clip_grad_norms(method.student, max_norm)  # each sub-module on its own (DINOv2)
    run.optimizer.set_widths(widths)  # core chunks outside the width stay untouched
    run.optimizer.step()
    method.update_teacher(momentum)

    done, record = step + 1, None
    if done % cfg.train.log_every == 0 or done == run.stop_at:
        now = time.perf_counter()
        n_steps = done % cfg.train.log_every or cfg.train.log_every
        images = run.schedule.samples_before(done) - run.schedule.samples_before(done - n_steps)
        images_per_s, run.t_last = images / max(now - run.t_last, 1e-9), now
        record = {k: float(v.detach()) for k, v in losses.items()}
        record.update(lr=lr, wd=wd, momentum=momentum, teacher_temp=teacher_temp, epoch=epoch,
                      budget=float(widths[0]) if widths[0] is not None else 0.0,
                      grad_norm=grad_norms.pop("total"), images_per_s=images_per_s,
                      resolution=float(batch["global_crops"].shape[-1]))
        record.update({f"grad_norm_{k}": v for k, v in grad_norms.items()})
        run.logger.log(done, record)
    if run.monitor is not None and run.main and done % cfg.train.knn_monitor.every == 0 and done != run.stop_at:
        run.logger.log(done, run.monitor.evaluate(method.ema_backbone))
    stop = signals.checkpoint_requested()
    if done % cfg.train.checkpoint_every == 0 or done == run.stop_at or stop:
        if run.main:
            run.last_checkpoint = run.checkpoints.save(_state(run, done), done)
        dist.barrier()
    return stop, record


def _state(run: Run, step: int) -> dict:
    """The checkpoint: the method's state, optimiser, step, RNG and the config it was trained with."""
    return {
        "step": step,
        "config": OmegaConf.to_yaml(run.cfg, resolve=True),
        "backbone_config": run.method.backbone.config,
        **run.method.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "rng": rng_state(),
    }


def finish(run: Run, steps_done: int) -> dict:
    """Export the EMA backbone, the final k-NN table (and distillation report) and ``summary.json``."""
    summary = {"steps": steps_done, "total_steps": run.schedule.total_steps, "output_dir": str(run.output_dir)}
    if run.main and steps_done >= run.stop_at:
        ema = run.method.ema_backbone
        export = save_backbone(ema, run.output_dir / "export" / "teacher.safetensors",
                               extra={"steps": run.stop_at, "mode": run.cfg.mode})
        summary["export"] = str(export)
        if run.monitor is not None:
            summary["knn"] = run.monitor.final(ema)
            run.logger.log(run.stop_at, run.monitor.flat(summary["knn"]))
            if run.cfg.mode == "distill":
                from veca_ssl.train.distill_report import distillation_report

                summary["distill_report"] = distillation_report(run.method, run.cfg, run.info.device)
        (run.output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    run.logger.close()
    return summary


def train(cfg: DictConfig) -> dict:
    """Train from ``cfg`` (validated by ``veca_ssl.config.load_config``); resume automatically from
    ``<output_dir>/checkpoints``. Returns a summary dict."""
    run = setup(cfg)
    bar = tqdm(total=run.stop_at, initial=run.start_step, disable=not (run.main and cfg.train.progress),
               unit="step", dynamic_ncols=True, desc="train")
    steps_done = run.start_step
    for step in range(run.start_step, run.stop_at):
        stop, record = train_step(run, step)
        steps_done = step + 1
        if record is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}", C=int(record["budget"]) or None,
                            img_s=f"{record['images_per_s']:.0f}")
        bar.update(1)
        if stop:
            if run.main:
                print(f"stop requested: checkpoint at step {steps_done} written, exiting", flush=True)
            break
    bar.close()
    return finish(run, steps_done)
