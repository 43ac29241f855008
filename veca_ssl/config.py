"""Layered OmegaConf configs, validated before any work starts (SPEC §3.3, §8).

defaults (configs/default.yaml) -> model preset (configs/models/<model.name>.yaml, optional)
-> experiment file -> command-line ``key=value`` overrides. Unknown keys and values of the wrong
type raise one ``ConfigError`` naming the key and the fix.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from veca_ssl import CONFIG_DIR


class ConfigError(ValueError):
    """A configuration problem found before training starts."""


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, or a name under the repository's ``configs/`` (``quickstart`` works)."""
    path = Path(name)
    candidates = [path, CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"]
    for cand in candidates:
        if cand.is_file():
            return cand
    raise ConfigError(f"config file not found: {name} (looked in the current directory and {CONFIG_DIR})")


def _check_keys_and_types(default, given, prefix: str = "") -> None:
    """Every key of ``given`` must exist in ``default`` with a compatible type (null defaults: any)."""
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
            if val is not None and not isinstance(val, DictConfig):
                raise ConfigError(f"config key '{path}' must be a mapping, got {val!r}")
            _check_keys_and_types(ref, val, path + ".")
            continue
        ref_v, new_v = ref, val
        if ref_v is None or new_v is None:
            continue
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


def load_config(config: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Build the resolved config. Raises ``ConfigError`` naming any bad key or value."""
    default = OmegaConf.load(CONFIG_DIR / "default.yaml")
    layers = []
    if config is not None:
        layers.append(("experiment " + str(config), OmegaConf.load(resolve_config_path(config))))
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
        layers.insert(0, ("model preset " + preset_file.name, OmegaConf.load(preset_file)))
    cfg = default
    for origin, layer in layers:
        try:
            _check_keys_and_types(default, layer)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {origin})") from None
        cfg = OmegaConf.merge(cfg, layer)
    OmegaConf.set_struct(cfg, True)
    check(cfg)
    return cfg


def check(cfg: DictConfig) -> None:
    """Every rule a config must satisfy before any work starts (values, ranges, cross-key consistency).

    The one home of config validation: `veca train`, `veca submit` and `--dry-run` all call it.
    """
    if cfg.mode not in ("ssl", "distill"):
        raise ConfigError(f"mode={cfg.mode!r}; valid: 'ssl', 'distill'")
    if cfg.budgets.policy not in ("sample", "sandwich", "full"):
        raise ConfigError(f"budgets.policy={cfg.budgets.policy!r}; valid: 'sample', 'sandwich', 'full'")
    if cfg.dino.centering not in ("centering", "sinkhorn_knopp"):
        raise ConfigError(f"dino.centering={cfg.dino.centering!r}; valid: 'centering', 'sinkhorn_knopp'")
    if cfg.dino.head_last_layer not in ("weight_norm", "normalized", "linear"):
        raise ConfigError(f"dino.head_last_layer={cfg.dino.head_last_layer!r}; valid: 'weight_norm', "
                          f"'normalized', 'linear'")
    if cfg.optim.lr_scaling not in ("sqrt", "linear", "none"):
        raise ConfigError(f"optim.lr_scaling={cfg.optim.lr_scaling!r}; valid: 'sqrt', 'linear', 'none'")
    if cfg.train.amp not in ("auto", "bf16", "off"):
        raise ConfigError(f"train.amp={cfg.train.amp!r}; valid: 'auto', 'bf16', 'off'")
    for key in ("optim.epochs", "optim.batch_size_per_gpu", "train.checkpoint_every", "train.keep_last",
                "train.log_every"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {OmegaConf.select(cfg, key)}")
    if cfg.crops.num_local < 0:
        raise ConfigError(f"crops.num_local must be >= 0, got {cfg.crops.num_local}")
    if cfg.mode == "distill" and not cfg.distill.teacher:
        raise ConfigError("mode=distill needs distill.teacher=/path/to/teacher (a local checkpoint)")
    _check_model_and_crops(cfg)


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
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"model: {exc}") from None
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return model


def _check_model_and_crops(cfg: DictConfig) -> None:
    """The rules that need the model: it builds, the widths are reachable, crops fit the patch grid,
    the multi-resolution phases are valid, streaming data has an epoch length."""
    from veca_ssl.method.budgets import BudgetPolicy, resolve_budgets
    from veca_ssl.train.multires import parse_phases

    backbone = build_model(cfg, device="meta")
    try:
        budgets = resolve_budgets(backbone.budgets, cfg.budgets.choices)
        BudgetPolicy(budgets, cfg.budgets.policy, cfg.budgets.weights, seed=cfg.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    patch = cfg.model.patch_size
    if cfg.crops.global_size % patch or cfg.crops.local_size % patch:
        raise ConfigError(f"crops.global_size={cfg.crops.global_size} and crops.local_size={cfg.crops.local_size} "
                          f"must be multiples of model.patch_size={patch}")
    phases = parse_phases(cfg.multires, patch, cfg.optim.epochs)  # raises ConfigError naming the key
    streaming = str(cfg.data.train).startswith("wds:")
    if streaming and cfg.data.samples_per_epoch is None:
        raise ConfigError(f"data.samples_per_epoch is required for streaming data ({cfg.data.train}): set it to "
                          f"the number of samples in the shards (make-shards prints it)")
    if streaming and phases:
        raise ConfigError(f"multires.phases needs map-style data (samples addressed by position); "
                          f"{cfg.data.train} streams")


def save_config(cfg: DictConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(OmegaConf.to_yaml(cfg, resolve=True))
