"""The import graph runs one way: the library (``veca_ssl``) never imports the applications built on it.

Layers, bottom to top: the library ``veca_ssl`` → its benchmarks ``veca_ssl.bench`` → the evaluation
protocols ``eval`` and the cluster launchers ``launchers``; ``veca_ssl.cli`` only dispatches by module
name (``importlib``), so it is not an import edge. Read from the source with ``ast`` (every import,
also the lazy ones inside functions), so a violation cannot hide behind a late import.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APPLICATIONS = ("eval", "launchers", "veca_ssl.bench")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return found


def _is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _library_files() -> list[Path]:
    files = sorted((ROOT / "veca_ssl").rglob("*.py"))
    return [f for f in files if not _is_under(_module_name(f), "veca_ssl.bench") and f.name != "cli.py"
            or _module_name(f) == "veca_ssl.data.cli"]


def test_library_never_imports_applications():
    violations = []
    for path in _library_files():
        for line, name in _imports(path):
            if any(_is_under(name, app) for app in APPLICATIONS):
                violations.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not violations, "the library must not import eval, launchers or veca_ssl.bench:\n" + "\n".join(violations)


def test_evaluation_does_not_import_benchmarks_or_launchers():
    violations = [f"{p.relative_to(ROOT)}:{line} imports {name}"
                  for p in sorted((ROOT / "eval").rglob("*.py")) for line, name in _imports(p)
                  if _is_under(name, "veca_ssl.bench") or _is_under(name, "launchers")]
    assert not violations, "\n".join(violations)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The test above would pass vacuously if the parser missed imports inside functions."""
    files = {_module_name(p): p for p in _library_files()}
    names = {name for _, name in _imports(files["veca_ssl.train.loop"])}
    assert "veca_ssl.train.distill_report.distillation_report" in names  # a lazy import inside finish()
    assert "veca_ssl.models.base.Backbone" in {name for _, name in _imports(files["veca_ssl.models.veca"])}
