"""The layout's one rule: the pipeline runs one way, and a package imports only packages below it.

import-linter checks the `layers` contract in pyproject.toml over every import, function-level
ones included. The second test plants an upward import in a copy of the package and checks that
the contract breaks and the message names the import.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("importlinter")


def lint_imports(cwd: Path, package_parent: Path) -> subprocess.CompletedProcess:
    # grimp finds the package on sys.path: the copy's parent goes first
    env = {"PYTHONPATH": str(package_parent), "PATH": str(Path(sys.executable).parent)}
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()", "--no-cache"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_no_package_imports_upward():
    result = lint_imports(ROOT, ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_fails_and_is_named(tmp_path):
    shutil.copytree(ROOT / "sara_cli", tmp_path / "sara_cli", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    hub = tmp_path / "sara_cli" / "model" / "hub.py"
    hub.write_text(hub.read_text() + "\n\ndef _upward():\n    from sara_cli.training import rundir  # noqa\n")
    result = lint_imports(tmp_path, tmp_path)
    assert result.returncode != 0
    assert "sara_cli.model.hub -> sara_cli.training.rundir" in result.stdout
