"""The training loop: one readable ``train(cfg)`` from config to exported teacher (SPEC §3).

Order of one step (nanoGPT-style, top to bottom):
  schedules -> budgets -> forward (method returns a dict of losses) -> finite check -> backward
  -> clip -> optimiser step -> EMA teacher update -> centre update -> log -> checkpoint.
Everything a bit-exact resume needs is in the checkpoint; the data position is ``step x global
batch`` because samples are addressed by their global position (``InfiniteSampler``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from veca_ssl import distributed as dist
from veca_ssl import signals
from veca_ssl.config import ConfigError, save_config
from veca_ssl.models import build_backbone, save_backbone
from veca_ssl.models.base import Backbone
from veca_ssl.parallelize import wrap_ddp
from veca_ssl.train.checkpoint import CheckpointManager, rng_state, set_rng_state
from veca_ssl.train.data import TrainData, build_train_dataset
from veca_ssl.train.ema import ema_update_
from veca_ssl.train.metrics import MetricLogger
from veca_ssl.train.multires import FixedSchedule, MultiResSchedule, parse_phases
from veca_ssl.train.optim import build_optimizer, set_schedules
from veca_ssl.train.schedules import cosine_schedule, scaled_lr, teacher_temperature

log = logging.getLogger("veca_ssl.train")


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss term is NaN/Inf; the last checkpoint on disk is the last good state."""


def build_model(cfg: DictConfig) -> Backbone:
    kwargs = dict(OmegaConf.to_container(cfg.model.overrides, resolve=True))
    kwargs.setdefault("drop_path_rate", cfg.model.drop_path_rate)
    if cfg.model.layerscale_init is not None:
        kwargs.setdefault("layerscale_init", cfg.model.layerscale_init)
    num_cores = cfg.model.num_cores if cfg.model.name.startswith("veca") else None
    try:
        model = build_backbone(cfg.model.name, patch_size=cfg.model.patch_size, num_cores=num_cores, **kwargs)
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return model


def build_method(cfg: DictConfig, backbone: Backbone) -> torch.nn.Module:
    if cfg.mode == "distill":
        from veca_ssl.method.distill import ElasticDistillation

        return ElasticDistillation(cfg, backbone)
    from veca_ssl.method.ssl import ElasticDINO

    return ElasticDINO(cfg, backbone)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _autocast(cfg: DictConfig, device: torch.device):
    use_bf16 = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def check_finite(losses: dict, step: int, last_checkpoint: Path | None) -> None:
    bad = [k for k, v in losses.items() if not math.isfinite(float(v.detach()))]
    if bad:
        terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
        raise NonFiniteLossError(
            f"non-finite loss at step {step}: {', '.join(bad)} (all terms: {terms}). The last good checkpoint "
            f"is {last_checkpoint or '(none yet)'}; lower optim.base_lr or raise optim.warmup_epochs, then "
            f"rerun to resume from it.")


def train(cfg: DictConfig) -> dict:
    """Train from ``cfg`` (already validated by ``veca_ssl.config.load_config``); resume automatically
    from ``<output_dir>/checkpoints``. Returns a summary dict."""
    info = dist.init_distributed(cfg.device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    # the same seed on every rank while building: DDP syncs the student from rank 0, but the EMA
    # teacher and the loss modules are not wrapped, so they must start identical everywhere
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)

    # --- everything that can fail on bad input, before any work -----------------------------------
    backbone = build_model(cfg)
    from veca_ssl.method.budgets import BudgetPolicy, resolve_budgets

    try:
        budgets = resolve_budgets(backbone.budgets, cfg.budgets.choices)
        policy = BudgetPolicy(budgets, cfg.budgets.policy, cfg.budgets.weights, seed=cfg.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.crops.global_size % cfg.model.patch_size or cfg.crops.local_size % cfg.model.patch_size:
        raise ConfigError(f"crops.global_size={cfg.crops.global_size} and crops.local_size={cfg.crops.local_size} "
                          f"must be multiples of model.patch_size={cfg.model.patch_size}")
    multires_phases = parse_phases(cfg.multires, cfg.model.patch_size, cfg.optim.epochs)  # [] = one size
    dataset = build_train_dataset(cfg)
    method = build_method(cfg, backbone).to(info.device)
    dist.seed_everything(cfg.seed, info.rank)  # per-rank randomness (drop-path, coordinate jitter) from here

    main = info.rank == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    ckpts = CheckpointManager(out / "checkpoints", cfg.train.keep_last)
    optimizer = build_optimizer(method.student_module, backbone.depth, cfg.optim,
                                backbone.no_weight_decay_keywords())
    extra_params = list(getattr(method, "extra_parameters", lambda: [])())
    if extra_params:  # e.g. distillation projections
        optimizer.add_param_group({"params": extra_params, "lr_mult": 1.0, "wd_mult": 1.0, "is_last_layer": False})

    # --- resume --------------------------------------------------------------------------------------
    start_step, latest, data_state = 0, ckpts.latest(), None
    if latest is not None:
        state = CheckpointManager.load(latest)
        method.student_module.load_state_dict(state["student"])
        method.teacher.load_state_dict(state["teacher"])
        if "loss_state" in state:
            method.load_loss_state(state["loss_state"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        data_state = state.get("data")  # stream layout and skip counts (veca_ssl.train.data)
        set_rng_state(state["rng"])
        if main:
            print(f"resumed from {latest} at step {start_step}", flush=True)

    if info.world_size > 1:
        if cfg.dino.head_use_bn and info.device.type == "cuda":  # BN statistics over the global batch
            method.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method.student)
        method.student = wrap_ddp(method.student, info)

    # --- schedule lengths ------------------------------------------------------------------------------
    global_batch = cfg.optim.batch_size_per_gpu * info.world_size
    if cfg.data.samples_per_epoch is None and isinstance(dataset, torch.utils.data.IterableDataset):
        raise ConfigError(f"data.samples_per_epoch is required for streaming data ({cfg.data.train})")
    samples_per_epoch = cfg.data.samples_per_epoch or len(dataset)
    if multires_phases:  # per-step size and batch; epochs are counted at each phase's rate
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise ConfigError(f"multires.phases needs map-style data (samples addressed by position); "
                              f"{cfg.data.train} streams")
        schedule = MultiResSchedule(multires_phases, samples_per_epoch, info.world_size, cfg.optim.epochs, cfg.seed)
        if main:
            print(schedule.describe(), flush=True)
    else:
        schedule = FixedSchedule(cfg.crops.global_size, cfg.optim.batch_size_per_gpu, samples_per_epoch,
                                 info.world_size, cfg.optim.epochs)
    total_steps = schedule.total_steps
    stop_at = min(total_steps, cfg.train.max_steps or total_steps)
    # multires too: the lr is scaled by the reference batch optim.batch_size_per_gpu x world size
    peak_lr = scaled_lr(cfg.optim.base_lr, global_batch, rule=cfg.optim.lr_scaling)
    warmup_steps = schedule.step_of_epoch(cfg.optim.warmup_epochs)

    data = TrainData(cfg, dataset, backbone.patch_size, info, schedule.samples_before(start_step),
                     multires=schedule if multires_phases else None, start_step=start_step, state=data_state)
    logger = MetricLogger(out, enabled=main)
    monitor = None
    if cfg.train.knn_monitor.enabled and cfg.train.knn_monitor.dataset:
        from veca_ssl.train.monitor import KnnMonitor

        monitor = KnnMonitor(cfg, info.device, out)
        if main and start_step == 0:
            monitor.record_before(method.teacher.backbone)

    params = [p for p in method.student_module.parameters() if p.requires_grad] + extra_params
    bar = tqdm(total=stop_at, initial=start_step, disable=not (main and cfg.train.progress), unit="step",
               dynamic_ncols=True, desc="train")
    data_iter = iter(data)
    step, t_last, last_ckpt = start_step, time.perf_counter(), latest
    for step in range(start_step, stop_at):
        epoch = schedule.epoch_at(step)
        batch = _to_device(next(data_iter), info.device)

        # pure-function schedules of the step
        lr = cosine_schedule(step, total_steps, peak_lr, cfg.optim.min_lr, warmup_steps=warmup_steps)
        wd = cosine_schedule(step, total_steps, cfg.optim.weight_decay, cfg.optim.weight_decay_end)
        momentum = cosine_schedule(step, total_steps, cfg.optim.momentum_teacher, cfg.optim.final_momentum_teacher)
        teacher_temp = teacher_temperature(step, schedule.step_of_epoch(cfg.dino.warmup_teacher_temp_epochs),
                                           cfg.dino.warmup_teacher_temp, cfg.dino.teacher_temp)
        set_schedules(optimizer, lr, wd, freeze_last_layer=epoch < cfg.optim.freeze_last_layer_epochs)
        step_budgets = policy(step)  # same on every rank: a function of (seed, step)

        with _autocast(cfg, info.device):
            losses = method(batch, step_budgets, teacher_temp)
        check_finite(losses, step, last_ckpt)

        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if info.world_size > 1:  # parameters outside the DDP module (distillation projections)
            for p in extra_params:
                if p.grad is not None:
                    p.grad = dist.all_reduce_mean(p.grad)
        max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        ema_update_(method.teacher, method.student_module, momentum)
        method.update_centers()

        done = step + 1
        if done % cfg.train.log_every == 0 or done == stop_at:
            now = time.perf_counter()
            n_steps = done % cfg.train.log_every or cfg.train.log_every
            images_per_s = (schedule.samples_before(done) - schedule.samples_before(done - n_steps)) / max(
                now - t_last, 1e-9)
            t_last = now
            record = {k: float(v.detach()) for k, v in losses.items()}
            record.update(lr=lr, wd=wd, momentum=momentum, teacher_temp=teacher_temp, epoch=epoch,
                          budget=float(step_budgets[0]) if step_budgets[0] is not None else 0.0,
                          grad_norm=float(grad_norm), images_per_s=images_per_s,
                          resolution=float(batch["global_crops"].shape[-1]))
            record.update(data.log_record())  # global skip counts (all ranks); stops on too many skips
            logger.log(done, record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", C=step_budgets[0], img_s=f"{images_per_s:.0f}")
        if monitor is not None and main and done % cfg.train.knn_monitor.every == 0 and done != stop_at:
            logger.log(done, monitor.evaluate(method.teacher.backbone))
        preempted = signals.checkpoint_requested()
        if done % cfg.train.checkpoint_every == 0 or done == stop_at or preempted:
            if main:
                last_ckpt = ckpts.save({**_state(cfg, method, optimizer, backbone, done), "data": data.state()}, done)
            dist.barrier()
        bar.update(1)
        if preempted:
            if main:
                print(f"preemption requested: checkpoint at step {done} written, exiting", flush=True)
            break
    bar.close()

    summary = {"steps": step + 1 if stop_at > start_step else start_step, "total_steps": total_steps,
               "output_dir": str(out)}
    summary["data"] = data.summary()  # unusable samples: counts and the first few items
    if main and summary["steps"] >= stop_at:
        export = save_backbone(method.teacher.backbone, out / "export" / "teacher.safetensors",
                               extra={"steps": stop_at, "mode": cfg.mode})
        summary["export"] = str(export)
        if monitor is not None:
            summary["knn"] = monitor.final(method.teacher.backbone)
            logger.log(stop_at, {k: v for k, v in monitor.flat(summary["knn"]).items()})
            if cfg.mode == "distill":
                from veca_ssl.train.distill_report import distillation_report

                summary["distill_report"] = distillation_report(method, cfg, info.device)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    logger.close()
    return summary


def _state(cfg, method, optimizer, backbone: Backbone, step: int) -> dict:
    state = {
        "step": step,
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "backbone_config": backbone.config,
        "student": method.student_module.state_dict(),
        "teacher": method.teacher.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
    }
    if hasattr(method, "loss_state"):
        state["loss_state"] = method.loss_state()
    return state
