"""ruff is part of the test suite, so lint errors fail CI like any other regression."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: install the test extra, pip install -e '.[test]'")
    result = subprocess.run([ruff, "check", "veca_ssl", "eval", "launchers", "tests"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
