"""The training loop: ``train(cfg)`` = ``setup`` -> ``train_step`` for every step -> ``finish``.

One step, top to bottom (nanoGPT-style):
  schedules -> widths -> forward (the method returns a dict of losses) -> backward -> clip -> one
  read of everything the host needs (``veca_ssl.train.readout``) -> finite check -> optimiser step
  -> EMA teacher update -> log -> checkpoint.
Everything a bit-exact resume needs is in the checkpoint; the data position is derived from the step
because samples are addressed by their global position (``InfiniteSampler``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from veca_ssl import distributed as dist
from veca_ssl import fileio, signals
from veca_ssl.config import ConfigError, build_model
from veca_ssl.method.base import Method, bf16_autocast
from veca_ssl.method.distill import ElasticDistillation
from veca_ssl.method.ssl import ElasticDINO
from veca_ssl.method.widths import WidthPolicy, training_widths
from veca_ssl.models import save_backbone
from veca_ssl.models.base import Backbone
from veca_ssl.models.init import initial_backbone
from veca_ssl.models.kernels import print_attention_kernels
from veca_ssl.parallelize import parallelize_method
from veca_ssl.progress import LogLines, progress_enabled
from veca_ssl.train import sharded_checkpoint
from veca_ssl.train.checkpoint import CheckpointManager, rank_rng, rng_state, set_rng_state
from veca_ssl.train.data import TrainData, build_train_dataset
from veca_ssl.train.lock import RunLock
from veca_ssl.train.metrics import MetricLogger, MetricsWriteError
from veca_ssl.train.monitor import KnnMonitor
from veca_ssl.train.multires import FixedSchedule, MultiResSchedule, parse_phases
from veca_ssl.train.optim import ElasticAdamW, build_optimizer, clip_grad_norms_, set_schedules, total_norm
from veca_ssl.train.readout import StepReadout, read_step
from veca_ssl.train.rundir import on_main, open_run_dir, resume_point_after_divergence
from veca_ssl.train.schedules import cosine_schedule, scaled_lr, teacher_temperature

log = logging.getLogger("veca_ssl.train")

__all__ = ["NonFiniteLossError", "build_model", "build_method", "setup", "train_step", "finish", "train"]


class NonFiniteLossError(FloatingPointError):
    """A loss term was NaN/Inf; the message names the step, the terms and the checkpoint to resume from."""


def build_method(cfg: DictConfig, backbone: Backbone) -> Method:
    if cfg.mode == "distill":
        return ElasticDistillation(cfg, backbone)
    return ElasticDINO(cfg, backbone)


def check_finite(run: Run, readout: StepReadout, step: int) -> None:
    """Stop every rank at the same step when any rank's loss is NaN/Inf, before the optimiser step and
    the EMA update (weights and checkpoints stay the last finite ones), naming the checkpoint a rerun
    resumes from. Every rank knows every rank's terms from the step's one read: all raise together."""
    bad_ranks = readout.non_finite_ranks
    if not bad_ranks:
        return
    rank = run.info.rank if run.info.rank in bad_ranks else bad_ranks[0]
    values = readout.rank_losses[rank]
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    terms = ", ".join(f"{k}={v:.4g}" for k, v in values.items())

    def report() -> str:
        where = "" if rank == 0 else f"on rank {rank}: "
        what = f"{where}{', '.join(bad)} (all terms: {terms})"
        good, moved = resume_point_after_divergence(run.checkpoints, step, run.logger.path)
        lines = [f"non-finite loss at step {step + 1}: {what}."]
        lines += [f"Set aside {old.name} as {new.name} ({reason})." for old, new, reason in moved]
        if good is not None:
            lines.append(f"Resume point: {good} (step {sharded_checkpoint.step_of(good)}; weights and optimiser "
                         f"state finite). Lower optim.base_lr (or raise optim.warmup_epochs) and rerun with "
                         f"train.allow_config_change=true: the run resumes from there.")
        else:
            lines.append("No earlier checkpoint can be resumed from: a rerun starts from step 0. Lower "
                         "optim.base_lr (or raise optim.warmup_epochs) first; train.keep_every keeps milestones.")
        return " ".join(lines)

    raise NonFiniteLossError(on_main(run.info, report))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _autocast(cfg: DictConfig, device: torch.device):
    """bf16 autocast (CPU or CUDA, the run's device type) for the student and teacher forwards when
    ``train.amp`` asks for it; the weights, the optimiser and the EMA stay fp32."""
    if not bf16_autocast(cfg.train.amp, device):
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
    policy: WidthPolicy
    schedule: FixedSchedule | MultiResSchedule
    data: TrainData  # batches, plus the data position and skip counts (veca_ssl.train.data)
    checkpoints: CheckpointManager
    lock: RunLock | None
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
        # cuBLAS refuses deterministic mode unless its workspace is fixed before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    # the same seed on every rank while building: DDP syncs the student from rank 0, but the EMA
    # teacher and the loss modules are not wrapped, so they must start identical everywhere
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    backbone, report = initial_backbone(cfg)
    if report is not None and info.rank == 0:
        print(report.summary(), flush=True)
    widths = training_widths(backbone.budgets, cfg.widths.choices)
    policy = WidthPolicy(widths, cfg.widths.policy, cfg.widths.weights, seed=cfg.seed)
    phases = parse_phases(cfg.multires, cfg.model.patch_size, cfg.optim.epochs)  # [] = one size
    dataset = build_train_dataset(cfg)
    method = build_method(cfg, backbone).to(info.device)
    dist.seed_everything(cfg.seed, info.rank)  # per-rank randomness (drop-path, coordinate jitter) from here

    checkpoints = CheckpointManager(out / "checkpoints", cfg.train.keep_last, cfg.train.keep_every)
    # activation checkpointing, compile, DDP/FSDP2 (train.parallel) -- before the optimiser, because
    # FSDP2 replaces every parameter by its shard
    try:
        parallelize_method(method, cfg, info)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    optimizer = build_optimizer(method.student, backbone.depth, cfg.optim)
    print_attention_kernels(backbone, info.device, _autocast(cfg, info.device), cfg.crops.global_size, info.rank == 0)

    # rank 0 locks the directory, cleans it and picks a verified resume point (``train`` releases the
    # lock on any error); the other ranks load the checkpoint it picked
    lock = RunLock(out) if info.rank == 0 else None
    opened: dict = {}
    latest = on_main(info, lambda: _open(opened, cfg, out, lock, checkpoints, method, optimizer))
    start_step, data_state = _resume(latest, opened.get("state"), method, optimizer)
    if latest is not None and info.rank == 0:
        print(f"resumed from {latest} at step {start_step}", flush=True)

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

    data = TrainData(cfg, dataset, backbone.patch_size, info, schedule.samples_before(start_step),
                     multires=schedule if phases else None, start_step=start_step, state=data_state)
    monitor = None
    if cfg.train.knn_monitor.enabled and cfg.train.knn_monitor.dataset:
        monitor = KnnMonitor(cfg, info.device, out)
        if start_step == 0:  # every rank: feature extraction splits the data over the ranks
            monitor.record_before(method.full_teacher().backbone, write=info.rank == 0)
    return Run(cfg=cfg, info=info, output_dir=out, method=method, optimizer=optimizer, policy=policy,
               schedule=schedule, data=data, checkpoints=checkpoints, lock=lock,
               logger=MetricLogger.from_config(out, cfg, enabled=info.rank == 0, resume_step=start_step),
               monitor=monitor,
               start_step=start_step,
               stop_at=stop_at, peak_lr=peak_lr, warmup_steps=schedule.step_of_epoch(cfg.optim.warmup_epochs),
               last_checkpoint=latest)


def _open(opened: dict, cfg: DictConfig, out: Path, lock: RunLock, checkpoints: CheckpointManager, method: Method,
          optimizer: torch.optim.Optimizer) -> Path | None:
    """Rank 0: ``open_run_dir``; keeps the loaded state in ``opened`` (only the path is broadcast)."""
    path, opened["state"] = open_run_dir(cfg, out, lock, checkpoints, method, optimizer)
    return path


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

    # backward and clipping on every rank before anything is read: a non-finite loss only makes
    # non-finite gradients, and every rank reaches the gradient all-reduce, so none waits forever
    run.optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else float("inf")
    grad_norms = clip_grad_norms_(method.student, max_norm)  # each sub-module on its own (DINOv2)
    # the step's one host read (one collective when distributed): losses of every rank, gradient norms,
    # skip counts, the stop flag -- all ranks learn the same and decide the same
    readout = read_step(losses, grad_norms, signals.checkpoint_requested(sync=False), run.data.local_counts())
    check_finite(run, readout, step)
    run.optimizer.set_widths(widths)  # core chunks outside the width stay untouched
    run.optimizer.step()
    method.update_teacher(momentum)

    done, record = step + 1, None
    if done % cfg.train.log_every == 0 or done == run.stop_at:
        now = time.perf_counter()
        n_steps = done % cfg.train.log_every or cfg.train.log_every
        images = run.schedule.samples_before(done) - run.schedule.samples_before(done - n_steps)
        images_per_s, run.t_last = images / max(now - run.t_last, 1e-9), now
        record = dict(readout.losses)  # averaged over the ranks
        record.update(lr=lr, wd=wd, momentum=momentum, teacher_temp=teacher_temp, epoch=epoch,
                      width=float(widths[0]) if widths[0] is not None else 0.0,
                      grad_norm=total_norm(readout.grad_norms), images_per_s=images_per_s,
                      resolution=float(batch["global_crops"].shape[-1]))
        # global skip counts (all ranks); stops on too many skips
        record.update(run.data.log_record((readout.seen, readout.skipped)))
        record.update({f"grad_norm_{k}": v for k, v in readout.grad_norms.items()})
        run.logger.log(done, record)
    if run.monitor is not None and done % cfg.train.knn_monitor.every == 0 and done != run.stop_at:
        # every rank: feature extraction splits the data over the ranks (whole EMA weights on each)
        run.logger.log(done, run.monitor.evaluate(method.full_teacher().backbone))
    stop = readout.stop
    if stop:
        signals.request_checkpoint()  # ranks the signal did not reach know it too (e.g. for a requeue)
    if done % cfg.train.checkpoint_every == 0 or done == run.stop_at or stop:
        run.last_checkpoint = _save_checkpoint(run, done)
    return stop, record


# ------------------------------------------------------------------------------------- checkpoints
# Two formats in one directory, same names and keep-last rule: single files (``train.checkpoint``,
# whole tensors written by rank 0) for unsharded runs, DCP directories (``train.sharded_checkpoint``,
# every rank its shards) for FSDP2. A run resumes from the newest of either kind, on any world size.
def _resume(latest: Path | None, opened: dict | None, method: Method,
            optimizer: torch.optim.Optimizer) -> tuple[int, dict | None]:
    """Load the checkpoint rank 0 picked (``latest``, either format) into ``method`` and ``optimizer`` on
    every rank; ``(step, data state)``, ``(0, None)`` for a fresh run. ``opened`` is rank 0's already
    loaded single-file state (None elsewhere)."""
    if latest is None:
        return 0, None
    if sharded_checkpoint.is_sharded_checkpoint(latest):  # every rank reads the pieces its layout needs
        meta = sharded_checkpoint.load(latest, method, optimizer)
        return int(meta["step"]), meta.get("data")
    state = opened or CheckpointManager.load(latest, verify=False)
    if method.sharded:  # whole tensors from the file, each rank keeps its shards
        sharded_checkpoint.load_full_state(state, method, optimizer)
    else:
        method.load_state_dict(state)
        optimizer.load_state_dict(state["optimizer"])
        if (rng := rank_rng(state, dist.get_rank())) is not None:
            set_rng_state(rng)
    return int(state["step"]), state.get("data")  # stream layout and skip counts (veca_ssl.train.data)


def _save_checkpoint(run: Run, step: int) -> Path | None:
    """Write the checkpoint after ``step``; every rank calls it and learns the outcome (a failed save
    stops all of them, none hangs). Returns its path."""
    if run.method.sharded:
        meta = {"config": OmegaConf.to_yaml(run.cfg, resolve=True), "backbone_config": run.method.backbone.config,
                "data": run.data.state()}
        return sharded_checkpoint.save(run.checkpoints.directory, step, run.method, run.optimizer, meta,
                                       run.cfg.train.keep_last, run.cfg.train.keep_every)
    # every rank's own generator state: drop-path and VECA's coordinate augmentation draw from each
    # rank's stream (seeded per rank), so a resume that gave every rank rank 0's stream would not be exact
    rank_rngs = dist.all_gather_object(rng_state())
    return on_main(run.info, lambda: run.checkpoints.save(_state(run, step, rank_rngs), step))


def _state(run: Run, step: int, rank_rngs: list[dict]) -> dict:
    """The checkpoint: the method's state, optimiser, step, RNG (every rank's) and the config it was
    trained with."""
    return {
        "step": step,
        "world_size": run.info.world_size,  # with the config's per-process batch: the global batch
        "config": OmegaConf.to_yaml(run.cfg, resolve=True),
        "backbone_config": run.method.backbone.config,
        **run.method.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "rng": rank_rngs[0],  # rank 0's (what a one-process resume restores)
        "rng_ranks": rank_rngs,  # in rank order
        "data": run.data.state(),  # stream layout and skip counts
    }


def _final_resolution(run: Run) -> int:
    if isinstance(run.schedule, MultiResSchedule):
        return int(max(run.schedule.phases[-1].sizes))
    return int(run.cfg.crops.global_size)


def _rewrite(run: Run) -> str:
    """What to do when an output of a finished run cannot be written (``fileio.writing``)."""
    return (f"rerun the same command: it resumes from the last checkpoint {run.last_checkpoint}, which holds the "
            f"finished run, and writes it")


def finish(run: Run, steps_done: int) -> dict:
    """Export the EMA backbone, the final k-NN table (and distillation report) and ``summary.json``;
    release the output directory. The export records the step its weights come from."""
    summary = {"steps": steps_done, "total_steps": run.schedule.total_steps, "output_dir": str(run.output_dir)}
    summary["data"] = run.data.summary()  # unusable samples: counts and the first few items
    if steps_done >= run.stop_at:
        # every rank from here: gathering sharded weights and feature extraction are collectives
        teacher = run.method.full_teacher()
        ema = teacher.backbone
        if run.main:
            # the resolution it was trained at (the last multi-resolution phase's largest side) lets
            # evaluation default to it
            target = run.output_dir / "export" / "teacher.safetensors"
            with fileio.writing(target, "the exported teacher backbone", _rewrite(run)):
                export = save_backbone(ema, target, extra={"steps": steps_done, "mode": run.cfg.mode,
                                                           "resolution": _final_resolution(run)})
            summary["export"] = str(export)
        if run.monitor is not None:
            summary["knn"] = run.monitor.final(ema)
            flat = run.monitor.flat(summary["knn"])
            if steps_done > run.start_step or not set(flat) <= run.logger.logged(steps_done):  # not twice
                run.logger.log(steps_done, flat)
            if run.cfg.mode == "distill":
                from veca_ssl.train.distill_report import distillation_report

                summary["distill_report"] = distillation_report(run.method, run.cfg, run.info.device, teacher)
        if run.main:
            with fileio.writing(run.output_dir / "summary.json", "the run summary", _rewrite(run)):
                fileio.atomic_write_json(run.output_dir / "summary.json", summary, default=str)
    run.logger.close()
    if run.lock is not None:
        run.lock.release()
    return summary


def train(cfg: DictConfig) -> dict:
    """Train from ``cfg`` (validated by ``veca_ssl.config.load_config``); resume automatically from
    ``<output_dir>/checkpoints``. Returns a summary dict.

    However the run ends, its loader workers are shut down and its lock released before this returns
    or raises: an error (a failed write, too many unusable samples) ends the process at once instead of
    leaving it waiting for workers that ignore stop signals."""
    run = None
    try:
        run = setup(cfg)
        show = bool(run.main and cfg.train.progress)
        # a bar in a terminal; elsewhere (a batch job's log file) progress lines at a sane rate, not the
        # bar's carriage-return updates, which a file keeps every one of
        bar = tqdm(total=run.stop_at, initial=run.start_step, disable=not progress_enabled(show),
                   unit="step", dynamic_ncols=True, desc="train")
        lines = (LogLines("train", run.stop_at, "step", initial=run.start_step, emit=_print_stderr)
                 if show and bar.disable else None)
        steps_done = run.start_step
        for step in range(run.start_step, run.stop_at):
            try:
                stop, record = train_step(run, step)
            except MetricsWriteError as exc:
                raise MetricsWriteError(f"{exc}. The run stopped; its newest checkpoint is "
                                        f"{run.last_checkpoint or '(none yet)'}: {exc.remedy} and rerun the same "
                                        f"command to resume.") from exc
            steps_done = step + 1
            if record is not None:
                bar.set_postfix(loss=f"{record['loss']:.3f}", C=int(record["width"]) or None,
                                img_s=f"{record['images_per_s']:.0f}")
            bar.update(1)
            if lines is not None:
                lines.update(1, None if record is None else f"loss {record['loss']:.3f}, "
                                f"{record['images_per_s']:.0f} img/s")
            if stop:
                _report_stop(run, steps_done)
                break
        bar.close()
        if lines is not None:
            lines.close()
        run.data.close()  # the workers' memory is free for the export and the final evaluation
        return finish(run, steps_done)
    finally:
        if run is not None:
            _release(run)
        RunLock.release_held(cfg.output_dir)  # after an error: the next run must find the directory free


def _print_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _release(run: Run) -> None:
    """What a run holds besides its lock: the loader's worker processes and the metric writers."""
    try:
        run.data.close()
    finally:
        try:
            run.logger.close()
        except Exception as exc:  # e.g. TensorBoard on a full disk: the error that ended the run matters more
            log.warning("closing the metric writers failed: %s", exc)


def _report_stop(run: Run, steps_done: int) -> None:
    cause = signals.signal_name(signals.preemption_signal())
    if run.main:
        print(f"stop requested ({cause}): checkpoint at step {steps_done} written ({run.last_checkpoint}); "
              f"rerun the same command to resume", flush=True)
    else:
        print(f"rank {run.info.rank}: stop requested ({cause}): stopped after step {steps_done}", flush=True)
