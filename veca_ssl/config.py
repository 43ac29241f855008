"""Layered OmegaConf configs, validated before any work starts.

defaults (configs/default.yaml) -> model preset (configs/models/<model.name>.yaml, optional)
-> experiment file -> command-line ``key=value`` overrides. Every problem raises one ``ConfigError``
naming the key and the fix: unknown keys, wrong types, nulls, out-of-range values, inconsistent
keys, paths that do not exist, an output directory that cannot be created. ``check`` is the one home
of these rules; ``veca train``, ``veca submit`` and ``--dry-run`` all run it through ``load_config``
before anything is created on disk.

It also decides which config changes a resume may make (``resume_changes``): changing what a run
computes (model, data, schedule, seed, ...) under an existing checkpoint is refused unless asked for.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from veca_ssl import CONFIG_DIR, fileio
from veca_ssl.optional import available, missing_message


class ConfigError(ValueError):
    """A configuration problem found before training starts."""


def packaged_config_candidates(name: str | Path, subdir: str = "") -> list[Path]:
    """Where a config named ``name`` may be: the path as given, then inside the shipped configs
    (``CONFIG_DIR/<subdir>``) as a name (``quickstart``, ``experiments/x``, with or without ``.yaml``) or
    as the path the README writes, ``configs/<subdir>/…``, which means the shipped copy wherever the
    command runs (a checkout's ``configs/`` when run there, the installed package's elsewhere)."""
    path = Path(name)
    base = CONFIG_DIR / subdir if subdir else CONFIG_DIR
    out = [path, base / path, base / f"{path}.yaml"]
    parts = path.parts
    if not path.is_absolute() and len(parts) > 1 and parts[0] == "configs":
        out.append(CONFIG_DIR / Path(*parts[1:]))  # configs/experiments/x.yaml -> CONFIG_DIR/experiments/x.yaml
    return out


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, or a name under the shipped ``configs/`` (``quickstart`` works), or the path the
    README writes (``configs/experiments/….yaml``) from any directory."""
    for cand in packaged_config_candidates(name):
        if cand.is_file():
            return cand
    raise ConfigError(f"config file not found: {name} (looked in the current directory and {CONFIG_DIR})")


def _load_yaml(path: Path) -> DictConfig:
    """One YAML layer; syntax errors and non-mapping files become a ConfigError with the position."""
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}. Fix the syntax there "
                          f"(e.g. unclosed brackets or quotes, tabs used for indentation)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path} must hold a mapping of config keys (e.g. 'optim: {{epochs: 10}}'), but its top "
                          f"level is a {'list' if isinstance(loaded, ListConfig) else type(loaded).__name__}")
    if not loaded and empty_yaml(path):
        raise ConfigError(f"{path} is empty (nothing but comments or blank lines): it would silently run with every "
                          f"default. Write the keys it should set (e.g. 'optim: {{epochs: 10}}'), or give another "
                          f"file")
    return loaded


def empty_yaml(path: Path) -> bool:
    """Whether a YAML file holds no document at all (empty, or only comments): OmegaConf reads it as
    ``{}``, which would pass for "every default" although the file was surely meant to say something.
    An explicit ``{}`` is a document and is not empty."""
    try:
        return yaml.safe_load(Path(path).read_text()) is None
    except (OSError, yaml.YAMLError):
        return False


#: Keys whose default is a value but which also accept null (the comment in default.yaml says what null means).
_NULLABLE = {"data.split", "train.knn_monitor.train_split", "train.knn_monitor.val_split"}


def _check_keys_and_types(default, given, prefix: str = "") -> None:
    """Every key of ``given`` must exist in ``default`` with a compatible type; null only where the
    default is null or the key is listed in ``_NULLABLE``."""
    if not isinstance(given, DictConfig):
        return
    for key in given.keys():
        path = f"{prefix}{key}"
        if key not in default:
            valid = ", ".join(str(k) for k in default.keys())
            raise ConfigError(f"unknown config key '{path}'; valid keys here: {valid}")
        ref, val = default[key], given[key]
        if isinstance(ref, DictConfig) and len(ref) == 0:  # free-form dict (e.g. model.overrides)
            continue
        if isinstance(ref, DictConfig):
            if val is None or not isinstance(val, DictConfig):
                raise ConfigError(f"config key '{path}' must be a mapping, got {val!r}")
            _check_keys_and_types(ref, val, path + ".")
            continue
        ref_v, new_v = ref, val
        if new_v is None:
            if ref_v is not None and path not in _NULLABLE:
                raise ConfigError(f"config key '{path}' must not be null; give a value like the default "
                                  f"{path}={_show(ref_v)}")
            continue
        if ref_v is None:
            continue  # typed by the value rules in check()
        if isinstance(ref_v, ListConfig):
            if not isinstance(new_v, ListConfig):
                raise ConfigError(f"config key '{path}' must be a list like {list(ref_v)}, got {new_v!r}")
            continue
        ok = (isinstance(new_v, type(ref_v))
              or (isinstance(ref_v, float) and isinstance(new_v, int) and not isinstance(new_v, bool)))
        if isinstance(ref_v, int) and isinstance(new_v, bool) and not isinstance(ref_v, bool):
            ok = False
        if not ok:
            raise ConfigError(f"config key '{path}' must be of type {type(ref_v).__name__} "
                              f"(default {ref_v!r}), got {new_v!r} ({type(new_v).__name__})")


def load_config(config: str | Path | None = None, overrides: list[str] | None = None,
                local: bool = True) -> DictConfig:
    """Build the resolved config and ``check`` it. Raises ``ConfigError`` naming any bad key or value.

    ``local=False`` for a config that will run on another machine (``veca submit``): the checks that
    depend on this machine's hardware (CUDA present) are skipped.
    """
    default = _load_yaml(CONFIG_DIR / "default.yaml")
    layers = []
    if config is not None:
        path = resolve_config_path(config)
        layers.append(("experiment " + str(config), _load_yaml(path)))
    try:
        cli = OmegaConf.from_dotlist(list(overrides or []))
    except Exception as exc:  # malformed "key=value"
        raise ConfigError(f"cannot parse command-line overrides {overrides}: {exc}") from None
    layers.append(("command line", cli))
    # the model preset layer sits between the defaults and the experiment
    model_name = default.model.name
    for _, layer in layers:
        model_name = OmegaConf.select(layer, "model.name", default=model_name)
    preset_file = CONFIG_DIR / "models" / f"{model_name}.yaml"
    if preset_file.is_file():
        layers.insert(0, ("model preset " + preset_file.name, _load_yaml(preset_file)))
    cfg = default
    for origin, layer in layers:
        if OmegaConf.select(layer, "train.amp", default=None) is False:  # YAML reads a bare ``off`` as false
            OmegaConf.update(layer, "train.amp", "off")
        try:
            _check_keys_and_types(default, layer)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {origin})") from None
        cfg = OmegaConf.merge(cfg, layer)
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:  # e.g. a ${...} interpolation that points nowhere
        raise ConfigError(f"config cannot be resolved: {str(exc).splitlines()[0]}") from None
    OmegaConf.set_struct(cfg, True)
    check(cfg, local=local)
    return cfg


# ---------------------------------------------------------------------------------------- value rules
def _show(value: Any) -> str:
    if isinstance(value, (ListConfig, DictConfig)):
        value = OmegaConf.to_container(value)
    if value is None:
        return "null"
    return str(value).replace("'", "") if isinstance(value, (list, dict)) else repr(value).strip("'")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_Rule = tuple[Callable[[Any], bool], str]


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _number(lo: float | None = None, hi: float | None = None, *, integer: bool = False, lo_open: bool = False,
            hi_open: bool = False, null: bool = False) -> _Rule:
    def ok(v: Any) -> bool:
        if v is None:
            return null
        if not (_is_int(v) if integer else _is_real(v)):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return not (hi is not None and (v >= hi if hi_open else v > hi))

    kind = "an integer" if integer else "a number"
    if lo is not None and hi is not None:
        text = f"{kind} in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        text = f"{kind} {'>' if lo_open else '>='} {_fmt(lo)}"
    else:
        text = kind
    return ok, text + (" or null" if null else "")


def _pair(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> _Rule:
    """``[a, b]`` with lo <= a <= b <= hi (open ends as given)."""
    inner, _ = _number(lo, hi, lo_open=lo_open, hi_open=hi_open)

    def ok(v: Any) -> bool:
        v = list(v) if isinstance(v, (ListConfig, list, tuple)) else None
        return v is not None and len(v) == 2 and all(inner(x) for x in v) and v[0] <= v[1]

    lo_b, hi_b = "<" if lo_open else "<=", "<" if hi_open else "<="
    return ok, f"a pair [min, max] with {_fmt(lo)} {lo_b} min <= max {hi_b} {_fmt(hi)}"


def _each(n: int, rule: _Rule) -> _Rule:
    inner, text = rule

    def ok(v: Any) -> bool:
        v = list(v) if isinstance(v, (ListConfig, list, tuple)) else None
        return v is not None and len(v) == n and all(inner(x) for x in v)

    return ok, f"a list of {n} values, each {text}"


_POSITIVE_INT, _COUNT = _number(1, integer=True), _number(0, integer=True)
_PROBABILITY, _WEIGHT = _number(0, 1), _number(0)

#: (key, rule) for every value with a range; the message quotes the default as the fix.
RULES: list[tuple[str, _Rule]] = [
    ("seed", _number(0, 2**31 - 1, integer=True)),
    ("model.patch_size", _POSITIVE_INT),
    ("model.num_cores", _POSITIVE_INT),
    ("model.drop_path_rate", _number(0, 1, hi_open=True)),
    ("model.layerscale_init", _number(0, lo_open=True, null=True)),
    ("data.num_workers", _COUNT),
    ("data.max_skip_fraction", _PROBABILITY),
    ("data.max_pixels", _COUNT),
    ("data.shuffle_buffer", _COUNT),
    ("data.samples_per_epoch", _number(1, integer=True, null=True)),
    ("crops.global_size", _POSITIVE_INT),
    ("crops.local_size", _POSITIVE_INT),
    ("crops.num_local", _COUNT),
    ("crops.global_scale", _pair(0, 1, lo_open=True)),
    ("crops.local_scale", _pair(0, 1, lo_open=True)),
    ("augment.color_jitter", _each(4, _number(0))),
    ("augment.jitter_p", _PROBABILITY),
    ("augment.grayscale_p", _PROBABILITY),
    ("augment.flip_p", _PROBABILITY),
    ("augment.global_blur_p", _each(2, _PROBABILITY)),
    ("augment.local_blur_p", _PROBABILITY),
    ("augment.solarize_p", _PROBABILITY),
    ("dino.loss_weight", _WEIGHT),
    ("dino.head_out_dim", _POSITIVE_INT),
    ("dino.head_hidden_dim", _POSITIVE_INT),
    ("dino.head_bottleneck_dim", _POSITIVE_INT),
    ("dino.head_nlayers", _POSITIVE_INT),
    ("dino.center_momentum", _PROBABILITY),
    ("dino.student_temp", _number(0, lo_open=True)),
    ("dino.teacher_temp", _number(0, lo_open=True)),
    ("dino.warmup_teacher_temp", _number(0, lo_open=True)),
    ("dino.warmup_teacher_temp_epochs", _COUNT),
    ("dino.koleo_weight", _WEIGHT),
    ("ibot.loss_weight", _WEIGHT),
    ("ibot.mask_probability", _PROBABILITY),
    ("ibot.mask_ratio", _pair(0, 1)),
    ("ibot.head_out_dim", _POSITIVE_INT),
    ("ibot.head_hidden_dim", _POSITIVE_INT),
    ("ibot.head_bottleneck_dim", _POSITIVE_INT),
    ("ibot.head_nlayers", _POSITIVE_INT),
    ("optim.epochs", _POSITIVE_INT),
    ("optim.batch_size_per_gpu", _POSITIVE_INT),
    ("optim.base_lr", _number(0, lo_open=True)),
    ("optim.min_lr", _number(0)),
    ("optim.warmup_epochs", _COUNT),
    ("optim.weight_decay", _number(0)),
    ("optim.weight_decay_end", _number(0)),
    ("optim.momentum_teacher", _PROBABILITY),
    ("optim.final_momentum_teacher", _PROBABILITY),
    ("optim.clip_grad", _number(0)),
    ("optim.freeze_last_layer_epochs", _COUNT),
    ("optim.layerwise_decay", _number(0, 1, lo_open=True)),
    ("optim.patch_embed_lr_mult", _number(0)),
    ("optim.adamw_betas", _each(2, _number(0, 1, hi_open=True))),
    ("distill.teacher_resolution", _number(1, integer=True, null=True)),
    ("distill.cls_weight", _WEIGHT),
    ("distill.patch_cos_weight", _WEIGHT),
    ("distill.patch_mse_weight", _WEIGHT),
    ("distill.teacher_batch_size", _COUNT),
    ("train.log_every", _POSITIVE_INT),
    ("train.checkpoint_every", _POSITIVE_INT),
    ("train.keep_last", _POSITIVE_INT),
    ("train.keep_every", _COUNT),
    ("train.max_steps", _number(1, integer=True, null=True)),
    ("train.num_threads", _COUNT),
    ("train.knn_monitor.every", _POSITIVE_INT),
    ("train.knn_monitor.k", _POSITIVE_INT),
    ("train.knn_monitor.resolution", _POSITIVE_INT),
    ("train.knn_monitor.max_train", _number(0, integer=True, null=True)),
]

#: data parallelism and per-block compilation of the training networks (``veca_ssl.parallelize``)
PARALLEL_MODES = ("none", "ddp", "fsdp2")
COMPILE_MODES = ("none", "default", "max-autotune")

#: (key, allowed values)
CHOICES: list[tuple[str, tuple]] = [
    ("mode", ("ssl", "distill")),
    ("widths.policy", ("sample", "sandwich", "full")),
    ("dino.centering", ("centering", "sinkhorn_knopp")),
    ("dino.head_last_layer", ("weight_norm", "normalized", "linear")),
    ("optim.lr_scaling", ("sqrt", "linear", "none")),
    ("train.amp", ("auto", "bf16", "off")),
    ("train.parallel", PARALLEL_MODES),
    ("train.compile", COMPILE_MODES),
    ("augment.jitter_mode", ("exact", "fused")),
    ("distill.teacher_arch", (None, "dinov2", "dinov3", "timm")),
]


def _default_of(key: str) -> Any:
    default = OmegaConf.load(CONFIG_DIR / "default.yaml")
    return OmegaConf.select(default, key, default=None)


def check(cfg: DictConfig, local: bool = True) -> None:
    """Every rule a config must satisfy before any work starts: values and ranges, choices,
    cross-key consistency, the model and its widths, crops, multi-resolution phases, dataset and
    teacher paths, the output directory, and (``local``) the device. Raises ``ConfigError``.

    The one home of config validation: ``veca train``, ``veca submit`` and ``--dry-run`` all call it
    (through ``load_config``), so a job is never queued with a config its run would refuse.
    """
    for key, valid in CHOICES:
        value = OmegaConf.select(cfg, key)
        if value not in valid:
            shown = ", ".join(_show(v) for v in valid)
            raise ConfigError(f"{key}={_show(value)} is not valid; choose one of: {shown}")
    for key, (ok, requirement) in RULES:
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}={_show(value)} is out of range: it must be {requirement} "
                              f"(the default is {key}={_show(_default_of(key))})")
    _check_device(str(cfg.device), local)
    if cfg.train.wandb.enabled and not available("wandb"):  # checked here so submit refuses it too
        raise ConfigError(f"train.wandb.enabled=true: {missing_message('wandb')}; "
                          "or set train.wandb.enabled=false")
    if cfg.mode == "distill" and not cfg.distill.teacher:
        raise ConfigError("mode=distill needs distill.teacher=/path/to/teacher (a local checkpoint)")
    _check_data(cfg)
    _check_model_and_crops(cfg)
    if cfg.optim.warmup_epochs > cfg.optim.epochs:
        raise ConfigError(f"optim.warmup_epochs={cfg.optim.warmup_epochs} is longer than the whole training "
                          f"(optim.epochs={cfg.optim.epochs}): lower optim.warmup_epochs or raise optim.epochs")
    _check_paths(cfg)


def _check_device(device: str, local: bool) -> None:
    if device in ("auto", "cpu"):
        return
    if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"device={device!r} is not valid; choose auto, cpu, cuda or cuda:N")
    if not local:
        return  # the job runs elsewhere; its GPUs are not visible from here
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"device={device} but CUDA is not available here (no GPU visible, or a CPU-only torch "
                          f"build): use device=cpu, or device=auto to take a GPU when there is one")
    if ":" in device and int(device[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"device={device} but only {torch.cuda.device_count()} GPU(s) are visible")


def build_model(cfg: DictConfig, device: str | None = None):
    """The backbone ``cfg.model`` describes (``device="meta"``: shapes only, no memory, no init cost).
    Raises ``ConfigError`` naming the problem."""
    import torch

    from veca_ssl.models import build_backbone

    kwargs = dict(OmegaConf.to_container(cfg.model.overrides, resolve=True))
    kwargs.setdefault("drop_path_rate", cfg.model.drop_path_rate)
    kwargs.setdefault("drop_path_uniform", cfg.model.drop_path_uniform)
    if cfg.model.layerscale_init is not None:
        kwargs.setdefault("layerscale_init", cfg.model.layerscale_init)
    num_cores = cfg.model.num_cores if cfg.model.name.startswith("veca") else None
    try:
        with torch.device(device) if device else contextlib.nullcontext():
            model = build_backbone(cfg.model.name, patch_size=cfg.model.patch_size, num_cores=num_cores, **kwargs)
    except (ValueError, TypeError, KeyError, ZeroDivisionError) as exc:
        raise ConfigError(f"model: {exc}") from None
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return model


def _check_model_and_crops(cfg: DictConfig) -> None:
    """The rules that need the model: it builds, the widths are reachable, crops fit the patch grid,
    the multi-resolution phases are valid, streaming data has an epoch length."""
    from veca_ssl.method.widths import WidthPolicy, training_widths
    from veca_ssl.train.multires import parse_phases

    backbone = build_model(cfg, device="meta")
    try:
        budgets = training_widths(backbone.budgets, cfg.widths.choices)
        WidthPolicy(budgets, cfg.widths.policy, cfg.widths.weights, seed=cfg.seed)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None
    patch = cfg.model.patch_size
    if cfg.crops.global_size % patch or cfg.crops.local_size % patch:
        raise ConfigError(f"crops.global_size={cfg.crops.global_size} and crops.local_size={cfg.crops.local_size} "
                          f"must be multiples of model.patch_size={patch}")
    monitor = cfg.train.knn_monitor
    if monitor.enabled and monitor.dataset and monitor.resolution % patch:
        raise ConfigError(f"train.knn_monitor.resolution={monitor.resolution} must be a multiple of "
                          f"model.patch_size={patch}")
    phases = parse_phases(cfg.multires, patch, cfg.optim.epochs)  # raises ConfigError naming the key
    streaming = str(cfg.data.train).startswith("wds:")
    if streaming and cfg.data.samples_per_epoch is None:
        length, why = _stream_length(cfg)
        if length is None:
            raise ConfigError(f"data.samples_per_epoch is required for streaming data ({cfg.data.train}) whose "
                              f"shards are not all counted ({why}): set it to the number of samples in the "
                              f"shards (make-shards prints it and writes the manifest)")
    if streaming and phases:
        raise ConfigError(f"multires.phases needs map-style data (samples addressed by position); "
                          f"{cfg.data.train} streams")


# ---------------------------------------------------------------------------------------------- paths
def _check_dataset(key: str, spec: Any, split: str | None) -> None:
    """The spec parses and, for path-based kinds, what it points to exists (without reading it)."""
    from veca_ssl.data import check_spec

    try:
        check_spec(str(spec), split)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{key}={spec}: {exc}") from None


def _refuses_new_entries(directory: Path) -> str | None:
    """Why ``directory`` takes no new directory, or None. Permission bits are not the whole story: root
    passes ``os.access``, and /proc, /sys and read-only mounts refuse anyway, so create one and remove it."""
    probe = directory / f".veca-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError as exc:
        return exc.strerror or str(exc)
    probe.rmdir()
    return None


def _check_output_dir(value: Any) -> None:
    """``output_dir`` exists as a writable directory, or can be created (checked, not created)."""
    if not value or not str(value).strip():
        raise ConfigError("output_dir is empty; give a directory, e.g. output_dir=outputs/run")
    path = Path(str(value)).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"output_dir={value} exists and is not a directory; choose another output_dir")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"output_dir={value} is not writable by this user; choose another output_dir")
        if (why := _refuses_new_entries(path)) is not None:
            raise ConfigError(f"output_dir={value} takes no new files ({why}); choose another output_dir")
        return
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"output_dir={value} cannot be created: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={value} cannot be created: {ancestor} is not writable by this user")
    if (why := _refuses_new_entries(ancestor)) is not None:
        raise ConfigError(f"output_dir={value} cannot be created: {ancestor} refuses new directories ({why}); "
                          f"choose another output_dir")


def _check_paths(cfg: DictConfig) -> None:
    monitor = cfg.train.knn_monitor
    if monitor.enabled and monitor.dataset:
        _check_dataset("train.knn_monitor.dataset", monitor.dataset, monitor.train_split)
        _check_dataset("train.knn_monitor.dataset", monitor.dataset, monitor.val_split)
    init_from = cfg.model.init_from
    if init_from is not None and not Path(str(init_from)).expanduser().exists():
        raise ConfigError(f"model.init_from={init_from!r} does not exist; give a checkpoint, export or run "
                          f"directory (or null for a random init)")
    if cfg.mode == "distill" and not Path(str(cfg.distill.teacher)).expanduser().exists():
        raise ConfigError(f"distill.teacher={cfg.distill.teacher} does not exist; give a local checkpoint, "
                          f"export or run directory")
    _check_output_dir(cfg.output_dir)


# --------------------------------------------------------------------------------------------- resume
#: Sections whose keys define what a run computes; a resume that changes one of them is refused
#: unless train.allow_config_change=true. Everything else (train.*, device, output_dir, ...) only
#: says how the run is carried out and may change between restarts.
MEANING_SECTIONS = ("mode", "seed", "model", "widths", "data", "crops", "multires", "augment", "dino", "ibot",
                    "optim", "distill")
#: Keys inside those sections that do not change the result (speed, memory, logging; model.init_from
#: only matters at step 0: a resumed run continues from its own checkpoint).
RESUME_FREE_KEYS = ("model.grad_checkpointing", "model.init_from", "data.num_workers", "data.max_skip_fraction",
                    "data.allow_empty_classes", "distill.teacher_batch_size")


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_changes(old: DictConfig | str, new: DictConfig) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for every leaf that differs. Keys present on one side only are
    not reported: they come from a newer or older version of the defaults, not from the user."""
    if isinstance(old, str):
        old = OmegaConf.create(old)
    a = _leaves(OmegaConf.to_container(old, resolve=True))
    b = _leaves(OmegaConf.to_container(new, resolve=True))
    return [(k, a[k], b[k]) for k in b if k in a and a[k] != b[k]]


def resume_changes(old: DictConfig | str, new: DictConfig) -> list[tuple[str, Any, Any]]:
    """The changes in ``config_changes`` that alter what the run computes (see ``MEANING_SECTIONS``)."""
    return [(k, a, b) for k, a, b in config_changes(old, new)
            if k.split(".")[0] in MEANING_SECTIONS and k not in RESUME_FREE_KEYS]


def format_changes(changes: list[tuple[str, Any, Any]]) -> str:
    return "\n".join(f"  {key}: {_show(a)} -> {_show(b)}" for key, a, b in changes)


def _stream_length(cfg: DictConfig) -> tuple[int | None, str | None]:
    """Samples in the ``wds:`` shards of ``data.train`` from their manifest, or ``(None, why not)``."""
    from veca_ssl.data.specs import stream_count

    return stream_count(str(cfg.data.train), cfg.data.split, split_if_present=True)


def _check_data(cfg: DictConfig) -> None:
    """The training data: spec kind, options, paths and split resolve (no image is read)."""
    from veca_ssl.data import check_spec

    d = cfg.data
    try:
        check_spec(str(d.train), d.split, split_if_present=True)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"data.train={d.train}: {exc}") from None


def save_config(cfg: DictConfig, path: str | Path) -> None:
    fileio.atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
