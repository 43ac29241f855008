"""The ``selection.json`` file ``veca select`` writes: the core width to deploy and the resolution and
batch size it was chosen for. ``veca extract --width-from`` and ``veca export --width-from`` read it;
the keys are described in ``eval.selection``.
"""

from __future__ import annotations

import json
from pathlib import Path

SELECTION_FORMAT = "veca-ssl-width-selection"
SELECTION_VERSION = 1


class SelectionError(ValueError):
    """No width satisfies the rule (e.g. an impossible latency budget), or a selection file cannot be used."""


def read_selection(path: str | Path) -> dict:
    """A ``selection.json`` written by ``veca select`` (format, version and width checked)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"selection file not found: {str(p)!r} (write one with `veca select`)")
    try:
        doc = json.loads(p.read_text())
    except ValueError as exc:
        raise SelectionError(f"{p} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != SELECTION_FORMAT:
        raise SelectionError(f"{p} is not a `veca select` file (format {SELECTION_FORMAT!r} expected)")
    if doc.get("version") != SELECTION_VERSION:
        raise SelectionError(f"{p} has version {doc.get('version')!r}; this veca reads version {SELECTION_VERSION}")
    width = doc.get("width")
    if width is not None and (not isinstance(width, int) or isinstance(width, bool) or width < 1):
        raise SelectionError(f"{p}: 'width' must be a positive integer or null, got {width!r}")
    return doc
