"""Rows of dicts as a Markdown table, CSV and JSON (benchmarks, evaluation reports, training summaries)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """Render dict rows as a GitHub Markdown table (floats with 4 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(v: object) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def write_rows(rows: Sequence[dict], path: str | Path) -> list[Path]:
    """Write rows as ``<path>.csv`` and ``<path>.json`` (suffix of ``path`` ignored)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.with_suffix("")
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    csv_path, json_path = stem.with_suffix(".csv"), stem.with_suffix(".json")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps([dict(r) for r in rows], indent=2))
    return [csv_path, json_path]
