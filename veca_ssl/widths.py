"""Core widths: the number of cores a VECA forward pass uses (a prefix of the ordered core bank).

``Width`` is an int for an elastic backbone, or None for a dense ViT (one width, no cores).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no torch import at run time: command lines label widths before parsing their options
    import torch

Width = int | None  # a core width; None = dense ViT (no elastic widths)


def width_label(width: Width) -> str:
    """The one label of a width — in metric keys (``knn_C16_top1``, ``dino_C16``), report rows, plots,
    logs and directory names: ``"C16"``, or ``"dense"`` for a dense ViT."""
    return "dense" if width is None else f"C{width}"


def parse_widths(text: str | Sequence[int] | None) -> list[int] | None:
    """``"8,16"`` / ``[8, 16]`` → ``[8, 16]``; ``None`` / ``"all"`` / ``""`` → ``None`` (all widths)."""
    if text is None:
        return None
    if isinstance(text, str):
        text = text.strip()
        if text.lower() in ("", "all"):
            return None
        try:
            return [int(t) for t in text.split(",") if t.strip()]
        except ValueError as exc:
            raise ValueError(f"--widths must be 'all' or comma-separated integers, got {text!r}") from exc
    return [int(t) for t in text]


def resolve_widths(model: torch.nn.Module, widths: Sequence[int | None] | None) -> list[Width]:
    """Check ``widths`` against ``model.budgets``; ``None`` means every width of the model.

    A dense ViT (``budgets == ()``) has exactly one width, ``None``.
    """
    valid = tuple(getattr(model, "budgets", ()) or ())
    if not valid:
        if widths and any(w is not None for w in widths):
            raise ValueError(
                f"widths {list(widths)} requested, but this backbone is a dense ViT without elastic core "
                "widths (budgets == ()); drop --widths"
            )
        return [None]
    if widths is None:
        return list(valid)
    bad = [w for w in widths if w not in valid]
    if bad:
        raise ValueError(
            f"width(s) {bad} not supported by this backbone; valid widths: {list(valid)}"
        )
    if not widths:
        raise ValueError(f"empty list of widths; valid widths: {list(valid)}")
    return list(dict.fromkeys(widths))  # de-duplicate, keep order
