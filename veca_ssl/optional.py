"""Optional dependencies: is one installed, and the one message that says how to get it.

faiss, TensorBoard and Weights & Biases are extras of the package (``pip install 'veca-ssl[faiss]'``
…): the code imports them only where they are used, and a missing one is named together with the
extra that installs it, never as a bare ImportError.
"""

from __future__ import annotations

import importlib.util
import sys

#: import name -> (extra that installs it, what it is used for)
EXTRAS: dict[str, tuple[str, str]] = {
    "faiss": ("faiss", "the faiss k-NN backend"),
    "tensorboard": ("tensorboard", "TensorBoard logging"),
    "wandb": ("wandb", "Weights & Biases logging"),
    "xformers": ("gpu", "the xformers attention backend"),
}


def available(module: str) -> bool:
    """Whether ``import module`` would find it, without importing it (``sys.modules`` entries count,
    a ``None`` entry — Python's "known to be absent" marker — means missing)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_message(module: str) -> str:
    """``"<use> needs the <module> package: pip install 'veca-ssl[<extra>]'"``."""
    extra, use = EXTRAS.get(module, (None, module))
    how = f"pip install 'veca-ssl[{extra}]' (or pip install {module})" if extra else f"pip install {module}"
    return f"{use} needs the {module} package, which is not installed: {how}"


__all__ = ["EXTRAS", "available", "missing_message"]
