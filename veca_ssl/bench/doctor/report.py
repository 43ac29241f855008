"""A check's result, and the doctor's table as text, Markdown and JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from veca_ssl.bench.doctor.rules import FAIL, PASS, SKIP

FORMAT = "veca-doctor"
VERSION = 1


@dataclass
class Result:
    """One check: ``status`` pass | fail | skip, a one-line ``summary`` (the numbers in words),
    ``reason`` (why it failed or was skipped), ``numbers`` (name -> value, for machines), ``rows`` (a
    detail table), ``goals`` (pass/fail records of targets), ``seconds`` it took and, after an
    unexpected error, its ``traceback``."""

    name: str
    status: str
    summary: str = ""
    reason: str = ""
    numbers: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    goals: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    traceback: str | None = None

    def __post_init__(self) -> None:
        if self.status not in (PASS, FAIL, SKIP):
            raise ValueError(f"status {self.status!r}; valid: {PASS}, {FAIL}, {SKIP}")


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(results: list[Result]) -> str:
    """The summary: one Markdown row per check."""
    lines = ["| check | status | result | reason | s |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.status.upper() if r.status == FAIL else r.status} | {_cell(r.summary)} | "
                     f"{_cell(r.reason) if r.reason else ''} | {r.seconds:.1f} |")
    return "\n".join(lines)


def _rows_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))]
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def markdown(results: list[Result], header: dict) -> str:
    """The whole report: where and when, the summary table, then each check's numbers, goals and rows."""
    lines = ["# veca doctor", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()]
    lines += ["", table(results), ""]
    for r in results:
        if not (r.numbers or r.rows or r.goals):
            continue
        lines += [f"## {r.name}: {r.status}", ""]
        if r.numbers:
            lines += [f"- {k}: {_cell(v)}" for k, v in r.numbers.items()] + [""]
        if r.goals:
            lines += [_rows_table(r.goals, ["goal", "measured", "status", "reason"]), ""]
        if r.rows:
            lines += [_rows_table(r.rows), ""]
    return "\n".join(lines)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep the fact readable
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def document(results: list[Result], header: dict) -> dict:
    return _jsonable({"format": FORMAT, "version": VERSION, **header,
                      "status": FAIL if any(r.status == FAIL for r in results) else PASS,
                      "checks": [asdict(r) for r in results]})


def write(results: list[Result], header: dict, output_dir: Path) -> list[Path]:
    """``doctor.json`` and ``doctor.md`` in ``output_dir``, each written atomically."""
    from veca_ssl.fileio import atomic_write_json, atomic_write_text

    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [atomic_write_json(output_dir / "doctor.json", document(results, header)),
             atomic_write_text(output_dir / "doctor.md", markdown(results, header))]
    json.loads(paths[0].read_text())  # what was written parses
    return paths
