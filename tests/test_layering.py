"""The import graph runs one way: the library (``veca_ssl``) never imports the applications built on it.

Layers, bottom to top: the library ``veca_ssl`` → its benchmarks ``veca_ssl.bench`` → the evaluation
protocols ``eval`` and the cluster launchers ``launchers``; ``veca_ssl.cli`` only dispatches by module
name (``importlib``), so it is not an import edge. Read from the source with ``ast`` (every import,
also the lazy ones inside functions), so a violation cannot hide behind a late import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

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


# ---------------------------------------------------------------------------------------- collectives
# Only ``veca_ssl/distributed.py`` calls torch.distributed collectives: its helpers put every tensor on
# the device the group's backend serves and hand results back on the caller's device, so a CPU tensor
# can never reach NCCL. Read from the source with ``ast``, through every way of naming the module.
COLLECTIVES = frozenset({
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_coalesced",
    "all_gather_object", "broadcast", "broadcast_object_list", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "barrier", "monitored_barrier", "gather", "gather_object", "scatter",
    "scatter_object_list", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
    "batch_isend_irecv", "_all_gather_base", "_reduce_scatter_base", "_broadcast_coalesced",
})
#: Modules whose attributes of those names are collectives.
COLLECTIVE_MODULES = frozenset({"torch.distributed", "torch.distributed.distributed_c10d",
                                "torch.distributed.nn.functional", "torch.distributed._functional_collectives"})
HOME = "veca_ssl/distributed.py"


def collective_uses(source: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every reference to a torch.distributed collective in ``source``: through
    ``torch.distributed.x``, ``import torch.distributed as d`` / ``from torch import distributed as d``
    (``d.x``), ``from torch.distributed import x [as y]`` (``y``), ``distributed_c10d`` and the
    functional forms; imports inside functions count the same as top-level ones."""
    tree = ast.parse(source)
    modules: dict[str, str] = {}  # local name -> module it stands for
    functions: dict[str, str] = {}  # local name -> collective it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    modules[alias.asname] = alias.name
                else:  # ``import torch.distributed`` binds ``torch``
                    modules.setdefault(alias.name.split(".")[0], alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                local = alias.asname or alias.name
                if node.module in COLLECTIVE_MODULES and alias.name in COLLECTIVES:
                    functions[local] = full
                else:
                    modules[local] = full

    def dotted(node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return modules.get(node.id)
        if isinstance(node, ast.Attribute):
            base = dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
            owner = dotted(node.value)
            if owner in COLLECTIVE_MODULES:
                found.append((node.lineno, f"{owner}.{node.attr}"))
        elif isinstance(node, ast.Name) and node.id in functions and isinstance(node.ctx, ast.Load):
            found.append((node.lineno, functions[node.id]))
    return sorted(set(found))


def _checked_files() -> list[Path]:
    files = [*(ROOT / "veca_ssl").rglob("*.py"), *(ROOT / "eval").rglob("*.py"), *(ROOT / "launchers").rglob("*.py")]
    return sorted(f for f in files if f.relative_to(ROOT).as_posix() != HOME)


def test_only_distributed_py_calls_collectives():
    violations = [f"{path.relative_to(ROOT)}:{line} uses {name}"
                  for path in _checked_files() for line, name in collective_uses(path.read_text())]
    assert not violations, (f"call the helpers of {HOME} instead (they move tensors to the device the "
                            f"backend serves):\n" + "\n".join(violations))


ALIAS_FORMS = {
    "module path": "import torch\ndef f(t):\n    torch.distributed.all_reduce(t)\n",
    "import as": "import torch.distributed as tdist\ndef f(t):\n    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)\n",
    "from torch import distributed": "from torch import distributed as torch_dist\ntorch_dist.barrier()\n",
    "from torch import distributed (no alias)": "from torch import distributed\ndistributed.broadcast_object_list([1])\n",
    "from torch.distributed import name": "from torch.distributed import all_gather_object\nall_gather_object([], 1)\n",
    "from torch.distributed import name as": "from torch.distributed import all_gather as ag\nag([], t)\n",
    "lazy import in a function": "def f(t):\n    import torch.distributed as dist\n    dist.reduce_scatter_tensor(t, t)\n",
    "lazy from-import in a method": ("class A:\n    def f(self, t):\n        from torch.distributed import "
                                    "broadcast\n        broadcast(t, src=0)\n"),
    "distributed_c10d": "import torch.distributed.distributed_c10d as c10d\nc10d.all_reduce(t)\n",
    "functional collectives": "import torch.distributed._functional_collectives as funcol\nfuncol.all_reduce(t, 'sum', g)\n",
    "passed as a callable": "import torch.distributed as dist\nhooks = [dist.all_reduce]\n",
}


@pytest.mark.parametrize("form", list(ALIAS_FORMS))
def test_the_collective_checker_sees_every_alias_form(form):
    """The test above would pass vacuously if the checker missed a way of reaching a collective."""
    assert collective_uses(ALIAS_FORMS[form]), form


def test_the_collective_checker_leaves_other_torch_distributed_uses_alone():
    allowed = ("import torch.distributed as dist\nfrom torch.distributed.checkpoint import FileSystemReader\n"
               "from torch.distributed.tensor import DTensor\nimport torch.distributed.checkpoint as dcp\n"
               "r, w = dist.get_rank(), dist.get_world_size()\nok = dist.is_available() and dist.is_initialized()\n"
               "dcp.save(state)\nall_reduce = helpers.all_reduce\nall_reduce(x)\nvd.barrier()\n")
    assert collective_uses(allowed) == []
    # and on the real home of the collectives it finds them (the checker reads real code)
    names = {name for _, name in collective_uses((ROOT / HOME).read_text())}
    assert {"torch.distributed.all_reduce", "torch.distributed.all_gather", "torch.distributed.barrier",
            "torch.distributed.broadcast_object_list", "torch.distributed.all_gather_object"} <= names
