"""``veca eval all --config FILE [key=value ...]``: every configured protocol, one report.

The YAML holds the fields of ``eval.config.EvalConfig`` — the same options as ``veca eval <protocol>``,
with the same defaults: the model (``checkpoint``, or a random-init ``model`` preset with
``model_args``), ``datasets``, ``protocols`` (knn, linear, logreg, dense), ``widths``, ``resolution``,
one section per protocol (``knn:``, ``linear:``, ``logreg:``, ``dense:``), ``speed:``, and an
optional dense-ViT ``reference`` evaluated the same way and drawn as a reference point. ``key=value``
overrides go on top; an unknown key is an error naming it. The report goes to
``<output_dir>/<name or "all">/``. Example: ``configs/eval/digits.yaml``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from eval.options import ArgumentParser, HelpFormatter, add_debug_option


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="veca eval all", formatter_class=HelpFormatter, allow_abbrev=False,
        description="Run every protocol of a YAML eval config at every core width; one report.",
        epilog="The YAML keys are the options of `veca eval <protocol> --help` with the same defaults, grouped "
               "as checkpoint/model/model_args, datasets (train, val, test, dense_train, dense_test), "
               "protocols, widths, resolution, batch_size, output_dir, name, one section per protocol (knn, "
               "linear, logreg, dense), speed, bootstrap, and an optional dense-ViT reference drawn as a "
               "reference point. A key not listed there is an error naming it. The report goes to "
               "<output_dir>/<name, default 'all'>/. Example: configs/eval/digits.yaml (`--config digits`).")
    p.add_argument("--config", required=True, metavar="FILE",
                   help="eval YAML file, or the name of a shipped one (digits = configs/eval/digits.yaml) (required)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides of config keys, e.g. checkpoint=runs/x linear.epochs=5 overwrite=true")
    add_debug_option(p)
    return p


def producer_of(path: str) -> str | None:
    """The shipped training config whose ``output_dir`` holds ``path`` (``quickstart`` for
    ``outputs/quickstart/export/teacher.safetensors``), or None."""
    import yaml

    from veca_ssl import CONFIG_DIR

    target = Path(path)
    for file in sorted(CONFIG_DIR.glob("*.yaml")):
        try:
            out = (yaml.safe_load(file.read_text()) or {}).get("output_dir")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if out and (target == Path(out) or Path(out) in target.parents):
            return file.stem
    return None


def check_config_checkpoint(cfg, config: str, overrides: list[str]) -> None:
    """A ``checkpoint`` the YAML names that does not exist here: one message naming the key and the file,
    and how to get it (the training command that writes it) or replace it (``checkpoint=PATH``)."""
    if cfg.checkpoint is None or Path(cfg.checkpoint).exists():
        return
    if any(o.split("=", 1)[0].strip() == "checkpoint" for o in overrides):
        return  # the user's own path: check_paths names it
    from eval.config import resolve_path

    producer = producer_of(cfg.checkpoint)
    run = (f"run `veca train --config {producer}` in this directory first (it writes {cfg.checkpoint}), or "
           if producer else "")
    raise FileNotFoundError(
        f"checkpoint={cfg.checkpoint} (set in {resolve_path(config)}) does not exist in {Path.cwd()}: {run}pass "
        f"checkpoint=PATH (a run directory, checkpoint or export), or checkpoint=null model=PRESET for a "
        f"random-init baseline")


def main(argv: list[str] | None = None) -> int:
    from eval.cli import run_user_command

    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        from eval.config import load_config

        args = build_parser().parse_args(argv)
        cfg = load_config(args.config, args.overrides)
        check_config_checkpoint(cfg, args.config, args.overrides)
        from eval.common import guard_output

        guard_output(cfg.run_dir, cfg.overwrite, "yaml")  # in the terms this command takes (key=value)
        from eval.run import evaluate  # torch: only after the config checked

        evaluate(cfg)
        return 0

    return run_user_command("veca eval all", body, argv)


if __name__ == "__main__":
    sys.exit(main())
