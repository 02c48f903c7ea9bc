"""`ctpassport model info`: its MODEL argument, and an error telling how to name a model to *this* command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctpassport.cli import app

runner = CliRunner()


def test_model_info_without_weights_names_its_own_argument(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "no_home"))
    monkeypatch.setenv("HOME", str(tmp_path))
    res = runner.invoke(app, ["model", "info"])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 3 and len(lines) == 1, res.output
    # `model info` has no --model option: the hint must not send the user to one
    assert "--model" not in lines[0]
    assert "ctpassport model info PATH" in lines[0] and "model info demo" in lines[0]


def test_model_info_demo() -> None:
    res = runner.invoke(app, ["model", "info", "demo"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["classes"] == 117 and info["spacing_nnunet"] == [3.0, 3.0, 3.0]
