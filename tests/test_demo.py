"""``ctpassport demo`` end to end: phantom baseline + follow-up with a known motion, the user-files mode, and
the report's sections holding real numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ctpassport.cli import app

SECTIONS = ("model", "inputs", "segmentation", "passports", "registration", "error", "timing")


@pytest.fixture
def no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, onnx_cache: Path) -> None:
    """No TotalSegmentator weights installed: the demo must fall back to the embedded model."""
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "no_totalseg_home"))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv("CTPASSPORT_CACHE_DIR", str(onnx_cache))


def _check_html(path: Path) -> str:
    text = path.read_text()
    for sec in SECTIONS:
        assert f"id='{sec}'" in text, sec
    assert len(re.findall(r"src='data:image/png;base64,", text)) >= 7  # self-contained pictures
    return text


@pytest.mark.slow
def test_demo_phantom_end_to_end(tmp_path: Path, no_weights: None) -> None:
    out = tmp_path / "demo_out"
    res = CliRunner().invoke(app, ["demo", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "embedded demo model" in res.output  # says which model, in one line
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"]["kind"] == "demo"
    assert rep["inputs"]["mode"] == "phantom"
    from ctpassport.bench.metrics import dice_per_class

    for role in ("baseline", "follow_up"):
        s = rep["segmentation"][role]
        # the stated Dice against the phantom's truth is the one the written files give
        seg = np.asanyarray(nib.load(out / f"{role}_seg.nii.gz").dataobj)
        truth = np.asanyarray(nib.load(out / f"{role}_truth_labels.nii.gz").dataobj)
        d = dice_per_class(seg, truth)
        mean = float(np.mean([v for k, v in d.items() if k in set(np.unique(truth).tolist())]))
        assert s["dice_vs_phantom_truth_mean"] == pytest.approx(mean, abs=1e-3)
        assert s["labels"] >= 20 and mean > 0.1
        assert rep["passports"][role]["organs"] >= 20
        assert rep["passports"][role]["skin_points"] > 100  # the body outline, for the deformable tier
        assert (out / f"{role}_passport.json").is_file() and (out / f"{role}_seg.nii.gz").is_file()
    err = rep["registration_error"]["tre_mm"]
    none, rigid, deform = err["no registration"], err["rigid"], err["deformable"]
    print(json.dumps(err))
    assert none["mean"] > 3.0  # the follow-up really moved
    assert rigid["mean"] < 0.7 * none["mean"]  # registration recovers most of the known motion
    assert deform["median"] < none["median"]
    for tier in ("rigid", "deformable"):
        assert (out / f"registration_{tier}" / "transform.h5").is_file()
        assert (out / f"follow_up_warped_{tier}.nii.gz").is_file()
        assert rep["registration"][tier]["label_dice_after_warp"] > rep["registration"]["no registration"][
            "label_dice_after_warp"]
    tm = rep["timings_s"]
    for stage in ("load_model", "phantom", "segment_baseline", "segment_follow_up", "passport_baseline",
                  "register_rigid", "register_deformable", "warp", "figures"):
        assert tm[stage] > 0, stage
    # every figure is rounded to 1 ms on its own (the total before rounding is the exact sum of the stages),
    # so the rounded stages may sum to up to 0.5 ms per figure more than the rounded total
    assert tm["total"] >= sum(v for k, v in tm.items() if k != "total") - 0.5e-3 * len(tm) - 1e-9
    text = _check_html(out / "report.html")
    assert f"{rigid['median']}" in text and "Registration error against the known truth" in text


@pytest.mark.slow
def test_demo_on_user_files(tmp_path: Path, no_weights: None) -> None:
    from ctpassport.phantom import write_phantom

    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    outs = write_phantom(a, seed=4, spacing="3.5,3.5,4", orientation="LPS", follow_up=b, motion_seed=3)
    out = tmp_path / "user_out"
    res = CliRunner().invoke(app, ["demo", "--baseline", str(a), "--follow-up", str(b), "--true-transform",
                                   str(outs["transform"]), "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["inputs"]["mode"] == "files" and "dice_vs_phantom_truth" not in rep["segmentation"]["baseline"]
    err = rep["registration_error"]["tre_mm"]
    assert err["rigid"]["mean"] < err["no registration"]["mean"]
    _check_html(out / "report.html")
    # without the truth: the report says so, and keeps the overlap check
    out2 = tmp_path / "user_out2"
    res = CliRunner().invoke(app, ["demo", "--baseline", str(a), "--follow-up", str(b), "-o", str(out2), "-q"])
    assert res.exit_code == 0, res.output
    rep2 = json.loads((out2 / "report.json").read_text())
    assert rep2["registration_error"] is None
    assert "No true transform" in (out2 / "report.html").read_text()
    assert rep2["registration"]["rigid"]["label_dice_after_warp"] > 0


def test_demo_refuses_existing_output_and_half_inputs(tmp_path: Path, no_weights: None) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    res = CliRunner().invoke(app, ["demo", "-o", str(out), "-q"])
    assert res.exit_code == 4 and "exists" in res.output
    res = CliRunner().invoke(app, ["demo", "-o", str(tmp_path / "new"), "--baseline", str(out), "-q"])
    assert res.exit_code == 2 and "--follow-up" in res.output
    assert not (tmp_path / "new").exists()
    res = CliRunner().invoke(app, ["demo", "-o", str(tmp_path / "new"), "--true-transform", str(out / "t.json"), "-q"])
    assert res.exit_code == 2 and "--true-transform goes with --baseline" in res.output  # not silently ignored
    assert not (tmp_path / "new").exists()


def test_demo_registration_impossible_exits_6_and_leaves_no_output(tmp_path: Path, ct_dir: Path,
                                                                   no_weights: None) -> None:
    src = nib.load(ct_dir / "example_ct_sm.nii.gz")
    one = tmp_path / "one_slice.nii.gz"  # a follow-up of one slice: too few organs to register
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj)[:, :, 15:16], src.affine), one)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["demo", "--baseline", str(ct_dir / "example_ct_sm.nii.gz"), "--follow-up", str(one),
                                   "-o", str(out), "--backend", "onnxruntime", "-q"])
    assert res.exit_code == 6, res.output
    line = res.output.strip().splitlines()[-1]
    assert "registration failed in both tiers" in line and "one_slice.nii.gz" in line
    assert not out.exists()


def test_choose_model_skips_standins(standin_home: Path, tmp_path: Path) -> None:
    from ctpassport.demo import choose_model
    from ctpassport.model.demo import make_demo_home

    assert choose_model(environ={"TOTALSEG_HOME_DIR": str(standin_home)}).kind == "demo"
    assert choose_model(environ={"TOTALSEG_HOME_DIR": str(tmp_path / "none")}).kind == "demo"
    # an installed home with non-stand-in weights counts as TotalSegmentator's model
    make_demo_home(tmp_path / "home")
    assert choose_model(environ={"TOTALSEG_HOME_DIR": str(tmp_path / "home")}).kind == "totalsegmentator"
    assert choose_model(model=standin_home).kind == "user"


def test_tre_helpers() -> None:
    from ctpassport.bench.metrics import dice_per_class
    from ctpassport.demo import sample_points

    lab = np.zeros((5, 5, 5), dtype=np.uint8)
    lab[1:3, 1:3, 1:3] = 4
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    pts = sample_points(lab, aff, n=5)
    assert pts.shape == (5, 3) and np.all((pts >= 2) & (pts <= 4))
    assert dice_per_class(lab, lab) == {4: 1.0}


def test_phantom_options_do_not_apply_to_user_files(tmp_path: Path) -> None:
    a = tmp_path / "a.nii.gz"
    res = CliRunner().invoke(app, ["demo", "-o", str(tmp_path / "o"), "--baseline", str(a), "--follow-up", str(a),
                                   "--seed", "7", "--orientation", "LPS", "-q"])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 5 and len(lines) == 1 and "--seed, --orientation describe the phantom demo" in lines[0]
    assert not (tmp_path / "o").exists()
