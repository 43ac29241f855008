"""veca-ssl: self-supervised pretraining and evaluation of VECA vision backbones.

VECA (Visual Elastic Core Attention) is a Vision Transformer in which patches never attend to each
other: they exchange information only through a small, ordered bank of learned core tokens, so the
attention cost is linear in the number of patches, and nested core budgets let one model run at any
width without retraining.
"""

from pathlib import Path

__version__ = "0.1.0"

#: Repository root of a checkout (holds ``configs/``); used to resolve config names.
REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
