"""Evaluation of frozen backbones at every elastic core width.

Protocols: ``eval.knn`` (weighted k-NN), ``eval.linear`` (DINOv2 linear probe), ``eval.logreg``
(logistic regression), ``eval.dense`` (segmentation / depth probes). ``eval.config`` holds every
option (one set of dataclasses for the CLI, the YAML of ``veca eval all`` and Python),
``eval.run.evaluate`` runs a config and ``eval.report`` writes the quality-vs-compute report;
``eval.selection`` picks a width from a report (``veca select``); ``eval.extract`` writes feature
shards. All share one feature engine, ``veca_ssl.features.extract_features``.

Python API (imports torch on first use of ``evaluate``)::

    from eval import DataOptions, EvalConfig, evaluate
    evaluate(EvalConfig(model="veca_tiny", protocols=("knn",),
                        datasets=DataOptions(train="digits@train", test="digits@val")))
"""

from __future__ import annotations

from typing import Any

from eval.config import (
    DataOptions,
    DenseProbeConfig,
    EvalConfig,
    EvalConfigError,
    KnnConfig,
    LinearProbeConfig,
    LogRegConfig,
    ModelSource,
    SpeedOptions,
    load_config,
)

__all__ = ["DataOptions", "DenseProbeConfig", "EvalConfig", "EvalConfigError", "KnnConfig", "LinearProbeConfig",
           "LogRegConfig", "ModelSource", "SpeedOptions", "load_config", "evaluate", "EvalResult"]


def __getattr__(name: str) -> Any:
    # evaluate/EvalResult need torch; importing them lazily keeps `import eval.config` (and --help) fast.
    if name in ("evaluate", "EvalResult"):
        from eval import run

        return getattr(run, name)
    raise AttributeError(f"module 'eval' has no attribute {name!r}")
