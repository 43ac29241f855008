"""Packaging: the wheel carries every module and every YAML config, and an installed (non-editable)
copy finds its configs from any working directory; a plain checkout finds the repository's."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("veca_ssl", "eval", "launchers")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources (so no build/ or egg-info lands in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in (*PACKAGES, "configs"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = dist.glob("veca_ssl-*.whl")
    return whl


def test_wheel_contains_every_module_and_config(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    assert modules - names == set(), "modules missing from the wheel (a package without __init__.py?)"
    configs = {"veca_ssl/configs/" + p.relative_to(REPO / "configs").as_posix()
               for p in (REPO / "configs").rglob("*.yaml")}
    assert len(configs) > 10 and configs - names == set()
    assert not any(n.startswith(("tests/", "configs/")) for n in names)  # no stray top-level dirs
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
    assert "veca = veca_ssl.cli:main" in meta.decode()


def _run_python(code: str, pythonpath: Path, cwd: Path) -> str:
    env = {"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


_PROBE = """
import veca_ssl
from veca_ssl.config import load_config
cfg = load_config("quickstart")
exp = load_config("experiments/veca_s16_imagenet", ["data.train=digits"])  # its dataset is not here
print(veca_ssl.__file__)
print(veca_ssl.CONFIG_DIR)
print(cfg.model.name, cfg.output_dir, exp.model.name, exp.model.num_cores)
"""


def test_installed_wheel_finds_its_packaged_configs_from_any_directory(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site-packages"  # a non-editable install is the wheel unpacked into site-packages
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    (tmp_path / "site-packages" / "configs").mkdir()  # an unrelated configs/ next to the package is ignored
    module, config_dir, summary = _run_python(_PROBE, site, elsewhere).splitlines()
    assert Path(module).parent == site / "veca_ssl" and Path(config_dir) == site / "veca_ssl" / "configs"
    # quickstart itself, and an experiment in a sub-directory layered on its model preset (models/)
    assert summary.split() == ["veca_tiny", "outputs/quickstart", "veca_small", "64"]


def test_plain_checkout_uses_the_repository_configs(tmp_path: Path) -> None:
    module, config_dir, summary = _run_python(_PROBE, REPO, tmp_path).splitlines()
    assert Path(module).parent == REPO / "veca_ssl" and Path(config_dir) == REPO / "configs"
    assert summary.split()[0] == "veca_tiny"


def test_optional_dependencies_are_extras_and_gpu_has_one_faiss() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    required = cfg["options"]["install_requires"]
    extras = {k: v.split() for k, v in cfg["options.extras_require"].items()}
    for optional in ("faiss", "tensorboard", "wandb", "xformers"):
        assert optional not in required, f"{optional} must be an extra, not a hard requirement"
    assert any(r.startswith("faiss-cpu") for r in extras["faiss"])
    assert any(r.startswith("tensorboard") for r in extras["tensorboard"])
    faiss_builds = [r for r in extras["gpu"] if r.startswith("faiss")]
    assert len(faiss_builds) == 1 and faiss_builds[0].startswith("faiss-gpu")
    assert "eval_output/" in (REPO / ".gitignore").read_text().split()


_README_PATHS = """
from eval.config import load_config as load_eval_config
from veca_ssl.config import load_config
exp = load_config("configs/experiments/veca_s16_imagenet.yaml", ["data.train=digits"])  # as the README writes it
ev = load_eval_config("configs/eval/digits.yaml")
print(exp.model.name, exp.model.num_cores, ev.datasets.test)
"""


def test_readme_config_paths_work_from_any_directory(wheel: Path, tmp_path: Path) -> None:
    """`--config configs/experiments/….yaml` (every README example) outside a checkout: the path resolves
    inside the installed package, as the bare names do (a checkout's own configs: test_config_paths)."""
    site = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert _run_python(_README_PATHS, site, elsewhere).split() == ["veca_small", "64", "digits@val"]
