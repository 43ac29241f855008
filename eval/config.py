"""The one evaluation configuration: dataclasses read by the CLI, the YAML of ``veca eval all`` and Python.

Every option of every protocol is a field of a dataclass below, with its default, its help text and
the rule its value must satisfy, written once:

- ``veca eval <protocol>`` builds its argparse options from the fields (:func:`build_parser`), so
  ``--help`` shows each default and rule, and parses them back into an :class:`EvalConfig`;
- ``veca eval all --config FILE [key=value ...]`` reads the same fields from YAML
  (:func:`load_config`; an unknown key is an error naming it and the valid keys);
- Python builds the dataclasses directly and calls ``eval.evaluate(config)``.

:func:`check` enforces the rules in all three paths before any work starts. The field machinery
(``opt``, rules, argparse generation, YAML/mapping conversion) is ``eval.options``. Neither module
imports torch or numpy, so ``--help`` and argument errors are instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eval.options import (
    ArgumentParser,
    EvalConfigError,
    HelpFormatter,
    Rule,
    add_debug_option,
    add_fields,
    at_least,
    check_fields,
    deep_merge,
    field_help,
    flag_names,
    fraction,
    from_mapping,
    in_cli_terms,
    momentum,
    namespace_to_mapping,
    opt,
    positive,
    to_mapping,
)

__all__ = ["PROTOCOLS", "EvalConfig", "EvalConfigError", "ModelSource", "DataOptions", "SpeedOptions", "KnnConfig",
           "LinearProbeConfig", "LogRegConfig", "DenseProbeConfig", "Rule", "check", "check_source", "load_config",
           "build_parser", "parse_protocol_args", "to_mapping", "from_mapping", "check_fields"]

#: Protocols of ``veca eval``, in report-column order.
PROTOCOLS: tuple[str, ...] = ("knn", "linear", "logreg", "dense")

#: DINOv2's linear-probe learning-rate grid (``dinov2/eval/linear.py``), scaled by batch size / 256.
DINOV2_LRS: tuple[float, ...] = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2,
                                 5e-2, 1e-1)
#: Fewest linear-probe iterations per epoch by default (a tenth of DINOv2's 1250): one pass over a small
#: training set is too few SGD steps (digits, 1,293 images at batch 128: 10 epochs of one pass = 110
#: steps reach 46% top-1 where 1,100 steps reach 71%, on the same random-init VECA-tiny features).
MIN_EPOCH_LENGTH = 125
#: Inverse regularisation strengths tried by the logistic regression.
C_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
#: k-NN protocol of DINOv2 (arXiv:2304.07193) with DINO's temperature (arXiv:2104.14294, §4.1). The
#: library's k-NN core, ``veca_ssl.knn``, has the same values as its defaults; they are restated here
#: because importing it loads torch and ``--help`` must not (tests/test_eval_config.py pins them equal).
KNN_KS: tuple[int, ...] = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07
KNN_BACKENDS: tuple[str, ...] = ("torch", "faiss")
DENSE_TASKS: tuple[str, ...] = ("seg", "depth")
#: Feature spaces of ``Backbone.set_feature_space``.
FEATURE_SPACES: tuple[str, ...] = ("native", "teacher")


# --------------------------------------------------------------------------------------------- protocols
@dataclass
class KnnConfig:
    """Weighted k-NN on L2-normalised image features (DINOv2 protocol)."""

    ks: tuple[int, ...] = opt(KNN_KS, "neighbour counts k; each gives a top-1 and a top-5 column",
                              rule=at_least(1))
    temperature: float = opt(KNN_TEMPERATURE, "temperature T of the vote weights exp(similarity / T)",
                             rule=positive())
    backend: str = opt("torch", "neighbour search: exact chunked matmul (torch) or IndexFlatIP (faiss, needs "
                       "the faiss package)", choices=KNN_BACKENDS)
    chunk_size: int = opt(1024, "queries per similarity chunk; memory is chunk x bank size floats",
                          rule=at_least(1))


@dataclass
class LinearProbeConfig:
    """Many linear heads trained at once over a learning-rate grid x feature sets (DINOv2 protocol)."""

    epochs: int = opt(10, "training epochs of the heads (DINOv2: 10)", rule=at_least(1))
    epoch_length: int | None = opt(
        None, "iterations per epoch. Default rule: one pass over the training split, ceil(N / batch), but at "
              f"least {MIN_EPOCH_LENGTH}. DINOv2's fixed 1250 is one pass over ImageNet-1k (1250 x 128 images "
              "x 8 GPUs = 1.28M, its 1,281,167 images); on a small set the same 1250 would be 100+ passes, "
              f"and one pass too few SGD steps, hence the floor of a tenth of DINOv2's epoch",
        default_text=f"max(ceil(N_train / probe batch size), {MIN_EPOCH_LENGTH})", rule=at_least(1))
    batch_size: int = opt(128, "images per head-training step (DINOv2: 128 per GPU)", flag="--probe-batch-size",
                          rule=at_least(1))
    lrs: tuple[float, ...] = opt(DINOV2_LRS, "base learning-rate grid (DINOv2's), each scaled by batch / 256",
                                 rule=positive())
    momentum: float = opt(0.9, "SGD momentum", rule=momentum())
    weight_decay: float = opt(0.0, "SGD weight decay", rule=at_least(0))
    val_fraction: float = opt(0.1, "fraction of --train held out (fixed seed) to pick the best head when no "
                                   "--val is given", rule=fraction())
    n_last_blocks: tuple[int, ...] = opt((1, 4), "feature sets: image features of the last n blocks, "
                                                 "concatenated (clipped to the depth)", rule=at_least(1))
    avgpool: tuple[bool, ...] = opt((False, True), "feature sets without / with the mean patch token appended",
                                    cli=False)


@dataclass
class LogRegConfig:
    """scikit-learn logistic regression (L-BFGS) with C chosen on data held out of train."""

    cs: tuple[float, ...] = opt(C_GRID, "grid of inverse regularisation strengths C", rule=positive())
    val_fraction: float = opt(0.2, "fraction of --train held out (stratified, fixed seed) to choose C",
                              rule=fraction())
    max_iter: int = opt(1000, "L-BFGS iterations per fit", rule=at_least(1))


@dataclass
class DenseProbeConfig:
    """Linear segmentation (mIoU) and depth (RMSE) heads on frozen patch tokens."""

    tasks: tuple[str, ...] | None = opt(None, "dense tasks to run: seg, depth",
                                        default_text="auto: every task whose targets the data has", choices=DENSE_TASKS,
                                        none_words=("auto",))
    num_classes: int | None = opt(None, "segmentation classes", default_text="max mask label + 1",
                                  rule=at_least(1))
    reduce_zero_label: bool = opt(False, "map mask label 0 to ignore (255) and shift the others down (ADE20K)")
    epochs: int = opt(20, "training epochs of the heads", rule=at_least(1))
    batch_size: int = opt(16, "images per head-training step", flag="--probe-batch-size", rule=at_least(1))
    lr: float = opt(1e-3, "AdamW learning rate (cosine decay)", rule=positive())
    weight_decay: float = opt(1e-4, "AdamW weight decay", rule=at_least(0))


# --------------------------------------------------------------------------------------------- run
@dataclass
class ModelSource:
    """Which backbone to evaluate: a checkpoint/export, or a randomly initialised preset."""

    checkpoint: str | None = opt(None, "training run dir, checkpoint file, exported .safetensors, or a "
                                       "DINOv2/DINOv3/timm .pth", metavar="PATH", default_text="none")
    model: str | None = opt(None, "preset of a randomly initialised backbone, e.g. veca_tiny, vit_small",
                            metavar="PRESET", default_text="none")
    patch_size: int | None = opt(None, "patch size of --model", default_text="the preset's", rule=at_least(1))
    num_cores: int | None = opt(None, "core bank size M of --model", default_text="the preset's",
                                rule=at_least(1))
    model_args: dict = opt(dict, "extra constructor argument of --model (repeatable), e.g. depth=2",
                           flag="--model-arg", metavar="KEY=VALUE", default_text="none")
    features: str = opt("native", "native: the backbone's own features; teacher: through its output projection "
                                  "to the teacher's width (distilled VECA reference models)",
                        choices=FEATURE_SPACES)


@dataclass
class DataOptions:
    """Dataset specs ``SPEC[@SPLIT]`` (e.g. ``digits@train``, ``imagefolder:/data/in1k@val``)."""

    train: str | None = opt(None, "training set: the k-NN bank / the probes' training data")
    val: str | None = opt(None, "validation set to choose probe hyper-parameters",
                          default_text="held out of --train")
    test: str | None = opt(None, "test set the metrics are reported on")
    dense_train: str | None = opt(None, "training set of the dense probes (masks and/or depth)")
    dense_test: str | None = opt(None, "test set of the dense probes")


@dataclass
class SpeedOptions:
    """Latency/throughput measurement beside the metrics (median and min-max over repeats)."""

    enabled: bool = opt(True, "measure latency (1 image) and throughput (--batch-size) per width",
                        flag="--speed")
    warmup: int = opt(3, "untimed warm-up calls per width", flag="--speed-warmup", rule=at_least(0))
    repeats: int = opt(5, "timed calls per width", flag="--speed-repeats", rule=at_least(1))


@dataclass
class EvalConfig(ModelSource):
    """Everything one evaluation run needs; the model fields (:class:`ModelSource`) sit at the top level.

    ``protocols`` selects what runs; each protocol reads only its own section.
    """

    seed: int = opt(0, "seed of --model's random init, the held-out splits and the probes", rule=at_least(0))
    protocols: tuple[str, ...] = opt(("knn", "linear", "logreg"), "protocols to run", cli=False,
                                     choices=PROTOCOLS)
    datasets: DataOptions = opt(DataOptions, "datasets", cli=False)
    widths: tuple[int, ...] | None = opt(None, "core widths, e.g. 8,16,64; each must be a width of the backbone",
                                         default_text="all: every width of the backbone",
                                         metavar="all|A,B,...", none_words=("all",))
    resolution: int | None = opt(None, "eval image side in pixels; a multiple of the patch size",
                                 default_text="the checkpoint's training resolution, else 224",
                                 rule=at_least(1))
    batch_size: int = opt(64, "images per forward pass (extraction and throughput)", rule=at_least(1))
    num_workers: int = opt(0, "DataLoader worker processes", rule=at_least(0))
    num_threads: int = opt(0, "intra-op CPU threads of extraction, probes and timing; 0 = veca train's policy: the "
                              "cores this process may use minus its loader workers, at least 1 (OMP_NUM_THREADS, when "
                              "set, wins)", default_text="0 (auto)", rule=at_least(0))
    max_skip_fraction: float = opt(0.01, "stop when more than this fraction of a dataset's images is unusable "
                                         "(corrupt, too large); below it they are left out of the features and "
                                         "listed in the report, never replaced",
                                   rule=Rule("in [0, 1]", lambda v: 0 <= v <= 1))
    # = veca_ssl.data.decode.DEFAULT_MAX_PIXELS (PIL's own limit; spelled out so --help imports no PIL/torch;
    # a test keeps them equal)
    max_pixels: int = opt(89_478_485, "images whose header declares more pixels are unusable, refused before "
                                      "decoding (0 = no limit beyond PIL's)", rule=at_least(0))
    allow_empty_classes: bool = opt(False, "imagefolder: keep a class folder without images as a class with zero "
                                           "images (without it, such a folder is an error naming it: leaving it out "
                                           "would shift every later label)")
    device: str = opt("auto", "auto (CUDA when available) | cpu | cuda | cuda:N", metavar="DEVICE")
    output_dir: str = opt("eval_output", "results go to <output-dir>/<run name>/", metavar="DIR")
    name: str | None = opt(None, "run name, the sub-directory of --output-dir", metavar="NAME",
                           default_text="the protocol, or 'all' for several")
    overwrite: bool = opt(False, "replace the report of an earlier run in the same directory")
    progress: bool = opt(True, "progress bars in a terminal (progress lines always go to eval.log)")
    bootstrap: int = opt(1000, "bootstrap resamples of the test set for the 95% confidence intervals "
                               "(0 = none)", rule=at_least(0))
    title: str | None = opt(None, "report title", default_text="the protocols and the model")
    speed: SpeedOptions = opt(SpeedOptions, "speed", cli=False)
    knn: KnnConfig = opt(KnnConfig, "k-NN", cli=False)
    linear: LinearProbeConfig = opt(LinearProbeConfig, "linear probe", cli=False)
    logreg: LogRegConfig = opt(LogRegConfig, "logistic regression", cli=False)
    dense: DenseProbeConfig = opt(DenseProbeConfig, "dense probes", cli=False)
    reference: ModelSource | None = opt(None, "a dense ViT evaluated the same way, drawn as a reference point",
                                        cli=False)

    @property
    def run_name(self) -> str:
        """Sub-directory of ``output_dir`` holding this run's report."""
        if self.name:
            return self.name
        return self.protocols[0] if len(self.protocols) == 1 else "all"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name


SECTIONS: dict[str, type] = {"knn": KnnConfig, "linear": LinearProbeConfig, "logreg": LogRegConfig,
                             "dense": DenseProbeConfig}


_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")

#: Datasets each protocol needs.
REQUIRED_DATA: dict[str, tuple[str, ...]] = {"knn": ("train", "test"), "linear": ("train", "test"),
                                            "logreg": ("train", "test"), "dense": ("dense_train", "dense_test")}


def check_source(src: ModelSource, where: str = "") -> None:
    pre = f"{where}." if where else ""
    if (src.checkpoint is None) == (src.model is None):
        raise EvalConfigError(f"give exactly one of {pre}checkpoint (trained weights) or {pre}model (a preset, "
                              f"randomly initialised)" if where else
                              "give exactly one of --checkpoint PATH (trained weights) or --model PRESET "
                              "(randomly initialised)")
    if src.checkpoint is not None and (src.patch_size is not None or src.num_cores is not None or src.model_args):
        raise EvalConfigError(f"{pre}patch_size/num_cores/model_args only apply to a --model preset; a checkpoint "
                              "carries its own architecture")


def check(cfg: EvalConfig) -> EvalConfig:
    """Enforce every rule of the config (types, ranges, choices, required datasets) before any work.

    Normalises values in place (lists → tuples) and returns ``cfg``. Raises :class:`EvalConfigError`.
    """
    if not isinstance(cfg, EvalConfig):
        raise EvalConfigError(f"expected an EvalConfig, got {type(cfg).__name__}")
    check_fields(cfg)
    check_source(cfg)
    if cfg.reference is not None:
        check_source(cfg.reference, "reference")
    if len(set(cfg.protocols)) != len(cfg.protocols):
        raise EvalConfigError(f"protocols lists a protocol twice: {list(cfg.protocols)}")
    if not _DEVICE_RE.match(cfg.device):
        raise EvalConfigError(f"device {cfg.device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    for protocol in cfg.protocols:
        for name in REQUIRED_DATA[protocol]:
            if not getattr(cfg.datasets, name):
                flag = "--" + name.removeprefix("dense_")
                raise EvalConfigError(f"protocol {protocol!r} needs datasets.{name} ({flag} SPEC on the command line)")
    if not re.fullmatch(r"[A-Za-z0-9_.+\-=]+", cfg.run_name):
        raise EvalConfigError(f"run name {cfg.run_name!r} must be a plain directory name (letters, digits, _.+-=)")
    return cfg


# --------------------------------------------------------------------------------------------- YAML
def resolve_path(name: str | Path) -> Path:
    """A file as given, or a named eval config shipped with the package (``digits`` is
    ``configs/eval/digits.yaml``, in a checkout and in an installed wheel alike; the path
    ``configs/eval/digits.yaml`` itself means that file from any directory)."""
    from veca_ssl import CONFIG_DIR
    from veca_ssl.config import packaged_config_candidates

    for cand in packaged_config_candidates(name, "eval"):  # configs/eval/digits.yaml works from anywhere too
        if cand.is_file():
            return cand
    named = sorted(p.stem for p in (CONFIG_DIR / "eval").glob("*.yaml"))
    raise EvalConfigError(f"eval config not found: {str(name)!r} (not a file; named eval configs: "
                          f"{', '.join(named) or 'none'})")


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> EvalConfig:
    """Defaults ← YAML file ← ``key=value`` overrides, as a checked :class:`EvalConfig`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    data: dict = {}
    if path is not None:
        path = resolve_path(path)
        try:
            loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except Exception as exc:  # YAML syntax errors (yaml.YAMLError), OmegaConf errors
            raise EvalConfigError(f"cannot read eval config {path}: {str(exc).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise EvalConfigError(f"eval config {path} must be a mapping of keys, got a {type(loaded).__name__}")
        from veca_ssl.config import empty_yaml

        if not loaded and empty_yaml(path):
            raise EvalConfigError(f"eval config {path} is empty (nothing but comments or blank lines); write the "
                                  f"keys it should set (configs/eval/digits.yaml is an example)")
        data = loaded or {}
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise EvalConfigError(f"override {bad[0]!r} is not key=value (e.g. linear.epochs=5)")
    try:
        extra = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=True)
    except OmegaConfBaseException as exc:
        raise EvalConfigError(f"bad override: {str(exc).splitlines()[0]}") from None
    cfg = from_mapping(EvalConfig, deep_merge(data, extra))
    return check(cfg)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint | --model`` (+ the preset's options) and ``--seed``."""
    g = parser.add_argument_group("model (give --checkpoint or --model)")
    add_fields(g, ModelSource)
    add_fields(g, EvalConfig, only=("seed",))


def add_run_options(parser: argparse.ArgumentParser, resolution: bool = True, widths: bool = True) -> None:
    """The run options every eval command shares: widths, resolution, batch, device, output, progress."""
    g = parser.add_argument_group("run")
    names = ["batch_size", "num_workers", "num_threads", "max_skip_fraction", "max_pixels", "allow_empty_classes",
             "device", "output_dir", "name", "overwrite", "progress"]
    names = (["widths"] if widths else []) + (["resolution"] if resolution else []) + names
    add_fields(g, EvalConfig, only=names)
    add_debug_option(parser)


#: Protocol → (one-line description, datasets it reads as (CLI name, config key, required)).
PROTOCOL_INFO: dict[str, tuple[str, tuple[tuple[str, str, bool], ...]]] = {
    "knn": ("weighted k-NN (DINOv2 protocol) at every core width",
            (("train", "train", True), ("test", "test", True))),
    "linear": ("linear probe: many heads over an lr grid x feature sets, best on a validation split (DINOv2)",
               (("train", "train", True), ("val", "val", False), ("test", "test", True))),
    "logreg": ("scikit-learn logistic regression with a C grid chosen on held-out train data",
               (("train", "train", True), ("test", "test", True))),
    "dense": ("linear segmentation (mIoU) and depth (RMSE) probes on patch tokens",
              (("train", "dense_train", True), ("test", "dense_test", True))),
}

_EPILOG = """\
Results: <output-dir>/<run name>/report.{md,csv,json,png} (+ config.yaml, eval.log). A directory that
already holds a report is never overwritten silently: pass --overwrite or another --output-dir/--name.
Datasets are SPEC[@SPLIT]: imagefolder:/path, filelist:/list.txt, wds:/shard-{0..9}.tar, npz:/file.npz,
digits, synthetic:n=512,size=64, textures:n=2048,size=32 — e.g. digits@train, imagefolder:/data/in1k@val."""


def build_parser(protocol: str, prog: str | None = None) -> ArgumentParser:
    """The argparse parser of ``veca eval <protocol>``, generated from the dataclasses."""
    if protocol not in PROTOCOL_INFO:
        raise EvalConfigError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOL_INFO)}")
    description, data = PROTOCOL_INFO[protocol]
    p = ArgumentParser(prog=prog or f"veca eval {protocol}", description=description[0].upper() + description[1:]
                       + ".", epilog=_EPILOG, formatter_class=HelpFormatter, allow_abbrev=False)
    add_model_options(p)
    g = p.add_argument_group("data (SPEC[@SPLIT])")
    fields_by_name = {f.name: f for f in dataclasses.fields(DataOptions)}
    for cli_name, key, required in data:
        f = fields_by_name[key]
        help_text = field_help(f, str | None)
        if required:
            help_text = help_text.rsplit(" (default:", 1)[0] + " (required)"
        g.add_argument(f"--{cli_name}", dest=f"datasets.{key}", required=required, default=argparse.SUPPRESS,
                       metavar="SPEC", help=help_text)
    add_run_options(p)
    s = p.add_argument_group("speed")
    add_fields(s, SpeedOptions, prefix="speed.")
    add_fields(s, EvalConfig, only=("bootstrap",))
    section = p.add_argument_group(SECTIONS[protocol].__doc__.split("\n")[0].rstrip("."))
    add_fields(section, SECTIONS[protocol], prefix=f"{protocol}.")
    return p


def parse_protocol_args(protocol: str, argv: Sequence[str], prog: str | None = None) -> tuple[EvalConfig, bool]:
    """``veca eval <protocol> ARGS`` → ``(checked EvalConfig, debug flag)``; argparse exits on bad syntax."""
    parser = build_parser(protocol, prog)
    ns = parser.parse_args(list(argv))
    data = namespace_to_mapping(ns)
    data["protocols"] = (protocol,)
    try:
        return check(from_mapping(EvalConfig, data)), bool(getattr(ns, "debug", False))
    except EvalConfigError as exc:
        raise in_cli_terms(exc, flag_names(parser)) from None


