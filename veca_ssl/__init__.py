"""veca-ssl: self-supervised pretraining and evaluation of VECA vision backbones.

VECA (Visual Elastic Core Attention) is a Vision Transformer in which patches never attend to each
other: they exchange information only through a small, ordered bank of learned core tokens, so the
attention cost is linear in the number of patches, and nested core widths let one model run at any
width without retraining.
"""

from pathlib import Path

__version__ = "0.1.0"

#: Repository root of a checkout (the directory above this package).
REPO_ROOT = Path(__file__).resolve().parent.parent


def _config_dir() -> Path:
    """Where ``default.yaml`` and the named configs live.

    An installed wheel carries them inside the package (``veca_ssl/configs/``, see setup.py); a
    checkout or an editable install keeps them at the repository root (``configs/``). The packaged
    copy is tried first, so an installed wheel never picks up an unrelated ``configs/`` directory that
    happens to sit next to ``site-packages/veca_ssl``.
    """
    packaged = Path(__file__).resolve().parent / "configs"
    return packaged if (packaged / "default.yaml").is_file() else REPO_ROOT / "configs"


#: Directory of the YAML configs: ``--config quickstart`` means ``CONFIG_DIR/quickstart.yaml``.
CONFIG_DIR = _config_dir()
