"""`ctpassport phantom` settings and output names: one-line errors before anything is rendered or written."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctpassport.cli import app
from ctpassport.errors import ConfigError
from ctpassport.phantom import build_phantom, make_scan

runner = CliRunner()


@pytest.mark.parametrize("args, code, message", [
    (["--seed", "-1"], 5, "--seed must be a non-negative integer"),
    (["--follow-up", "{d}/fu.nii.gz", "--motion-seed", "-2"], 5,
     "--motion-seed must be a non-negative integer"),
    (["--oblique", "nan,0,0"], 5, "--oblique must be three finite angles"),
    (["--oblique", "0,inf,0"], 5, "--oblique must be three finite angles"),
    # two outputs on one name: the later file would silently replace the earlier one
    (["--labels", "{d}/ct.nii.gz"], 2, "named for both the CT and the labels"),
    (["--follow-up", "{d}/./ct.nii.gz"], 2, "named for both the CT and the follow-up CT"),
    (["--labels", "{d}/l.nii.gz", "--follow-up", "{d}/fu.nii.gz", "--follow-up-labels", "{d}/l.nii.gz"], 2,
     "named for both the labels and the follow-up labels"),
    # outputs of a follow-up that is not asked for
    (["--transform", "{d}/t.json"], 5, "give --follow-up too"),
])
def test_bad_settings_and_clashing_outputs(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    res = runner.invoke(app, ["phantom", "-o", str(tmp_path / "ct.nii.gz"), "--spacing", "8", "-q",
                              *[a.format(d=tmp_path) for a in args]])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == code and len(lines) == 1 and message in lines[0], res.output
    assert list(tmp_path.iterdir()) == []


def test_library_refuses_negative_seeds_and_non_finite_angles() -> None:
    with pytest.raises(ConfigError, match="phantom seed"):
        build_phantom(-3)
    with pytest.raises(ConfigError, match="motion seed"):
        make_scan(0, spacing=12, follow_up=True, motion_seed=-1)
    with pytest.raises(ConfigError, match="finite"):
        make_scan(0, spacing=12, oblique_deg=(0.0, float("nan"), 0.0))


def test_a_grid_too_large_for_the_memory_is_refused_before_rendering(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # instead of the process being killed half-way (e.g. --spacing 0.5: about 800 M voxels, 60 GB)
    import psutil

    class Tight:
        available = 1_000_000  # 1 MB: less than even a 12 mm phantom needs (about 5 MB)

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tight())
    res = runner.invoke(app, ["phantom", "-o", str(tmp_path / "ct.nii.gz"), "--spacing", "12", "-q"])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 5 and len(lines) == 1 and "coarser --spacing" in lines[0], res.output
    assert "GB of memory" in lines[0] and list(tmp_path.iterdir()) == []
