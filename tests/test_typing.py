"""The package ships ``py.typed``: its code must type-check as users' type checkers see it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    pytest.importorskip(module)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=900)


def test_mypy_reports_no_errors() -> None:
    r = _run("mypy")  # files and options: [tool.mypy] in pyproject.toml
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]

