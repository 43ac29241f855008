"""Core widths: the number of cores a VECA forward pass uses (a prefix of the ordered core bank).

``Width`` is an int for an elastic backbone, or None for a dense ViT (one width, no cores).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Width = int | None  # a core budget; None = dense ViT (no elastic widths)


def width_label(width: Width) -> str:
    """Row label of a width in reports: ``"C=16"``, or ``"dense"`` for a dense ViT."""
    return "dense" if width is None else f"C={width}"


def parse_widths(text: str | Sequence[int] | None) -> list[int] | None:
    """``"8,16"`` / ``[8, 16]`` → ``[8, 16]``; ``None`` / ``"all"`` / ``""`` → ``None`` (all budgets)."""
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
    """Check ``widths`` against ``model.budgets``; ``None`` means every budget of the model.

    A dense ViT (``budgets == ()``) has exactly one width, ``None``.
    """
    budgets = tuple(getattr(model, "budgets", ()) or ())
    if not budgets:
        if widths and any(w is not None for w in widths):
            raise ValueError(
                f"widths {list(widths)} requested, but this backbone is a dense ViT without elastic core "
                "widths (budgets == ()); drop --widths"
            )
        return [None]
    if widths is None:
        return list(budgets)
    bad = [w for w in widths if w not in budgets]
    if bad:
        raise ValueError(
            f"width(s) {bad} not supported by this backbone; valid budgets: {list(budgets)}"
        )
    if not widths:
        raise ValueError(f"empty list of widths; valid budgets: {list(budgets)}")
    return list(dict.fromkeys(widths))  # de-duplicate, keep order
