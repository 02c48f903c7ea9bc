"""The register / warp commands and their bad inputs (one-line errors, nonzero exit, no partial output)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ctpassport.cli import app
from ctpassport.passport.build import build_passport
from ctpassport.passport.schema import save_passport
from ctpassport.register.synthetic import random_motion
from ctpassport.register.transform import GridSpec
from ctpassport.register.warp import resample

runner = CliRunner()


@pytest.fixture(scope="module")
def files(scene, tmp_path_factory):
    labels, aff = scene
    d = tmp_path_factory.mktemp("cli")
    g = GridSpec(labels.shape, aff)
    motion = random_motion(
        g,
        np.random.default_rng(2),
        amplitude_mm=3.0,
        mask=labels > 0,
        max_angle_deg=3.0,
        max_translation_mm=5.0,
    )
    moving = resample(labels, aff, motion.pullback, g, labels=True)
    nib.save(nib.Nifti1Image(labels, aff), d / "fixed.nii.gz")
    nib.save(nib.Nifti1Image(moving, aff), d / "moving.nii.gz")
    save_passport(build_passport(labels, aff), d / "fixed.passport.json")
    save_passport(build_passport(moving, aff, seed=1), d / "moving.passport.json")
    y = g.index_to_world(np.argwhere(moving > 0)[::25].astype(float))
    x = motion.pullback.apply(y)
    with open(d / "f.csv", "w") as fh:
        fh.write("id,x,y,z,note\n")
        fh.writelines(f"{i},{p[0]:.4f},{p[1]:.4f},{p[2]:.4f},pt{i}\n" for i, p in enumerate(x))
    with open(d / "m.csv", "w") as fh:
        fh.write("x,y,z\n")
        fh.writelines(f"{p[0]:.4f},{p[1]:.4f},{p[2]:.4f}\n" for p in y)
    return d, x, y


def _ok(args):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return r


def test_register_warp_points_end_to_end(files) -> None:
    d, x, y = files
    _ok(
        [
            "register",
            "--fixed",
            str(d / "fixed.passport.json"),
            "--moving",
            str(d / "moving.passport.json"),
            "-o",
            str(d / "reg"),
            "--tier",
            "deformable",
            "-q",
        ]
    )
    assert json.loads((d / "reg" / "registration.json").read_text())["tier"] == "deformable"
    _ok(
        [
            "warp",
            "--transform",
            str(d / "reg"),
            "--points",
            str(d / "f.csv"),
            "-o",
            str(d / "mapped.csv"),
            "-q",
        ]
    )
    lines = (d / "mapped.csv").read_text().splitlines()
    assert lines[0] == "id,x,y,z,note" and lines[1].endswith(",pt0") and lines[1].startswith("0,")
    mapped = np.array([[float(v) for v in ln.split(",")[1:4]] for ln in lines[1:]])
    assert np.linalg.norm(mapped - y, axis=1).mean() < 0.5 * np.linalg.norm(x - y, axis=1).mean()
    _ok(
        [
            "warp",
            "--transform",
            str(d / "reg"),
            "-i",
            str(d / "moving.nii.gz"),
            "--reference",
            str(d / "fixed.nii.gz"),
            "-o",
            str(d / "warped.nii.gz"),
            "--labels",
            "-q",
        ]
    )
    w = nib.load(d / "warped.nii.gz")
    assert w.shape == nib.load(d / "fixed.nii.gz").shape
    assert set(np.unique(np.asanyarray(w.dataobj))) <= set(
        np.unique(np.asanyarray(nib.load(d / "moving.nii.gz").dataobj))
    )


def test_register_points_form_lps_round_trip(files) -> None:
    d, x, y = files
    flip = np.array([-1.0, -1.0, 1.0])
    for name, pts in (("f_lps.csv", x), ("m_lps.csv", y)):
        (d / name).write_text("x,y,z\n" + "".join(f"{p[0]},{p[1]},{p[2]}\n" for p in pts * flip))
    _ok(
        [
            "register",
            "--fixed-points",
            str(d / "f_lps.csv"),
            "--moving-points",
            str(d / "m_lps.csv"),
            "--lps",
            "-o",
            str(d / "reg_lps"),
            "-q",
        ]
    )
    _ok(
        [
            "register",
            "--fixed-points",
            str(d / "f.csv"),
            "--moving-points",
            str(d / "m.csv"),
            "-o",
            str(d / "reg_ras"),
            "-q",
        ]
    )
    a = json.loads((d / "reg_lps" / "registration.json").read_text())["rigid"]["matrix_ras"]
    b = json.loads((d / "reg_ras" / "registration.json").read_text())["rigid"]["matrix_ras"]
    np.testing.assert_allclose(a, b, atol=1e-3)  # the RAS files hold 4 decimals


@pytest.mark.parametrize(
    "args, message",
    [
        (["register", "--fixed", "nope.json", "--moving", "nope.json"], "no such passport file"),
        (["register", "--fixed", "{d}", "--moving", "{d}/moving.passport.json"], "is a folder, not a passport JSON"),
        (  # a typo would exclude nothing, silently
            ["register", "--fixed", "{d}/fixed.passport.json", "--moving", "{d}/moving.passport.json",
             "--exclude", "livr"],
            "--exclude 'livr' names no organ of either passport and no TotalSegmentator class",
        ),
        (["register", "--fixed-points", "{d}/f.csv"], "both needed"),
        (["register"], "give either"),
        (
            [
                "register",
                "--fixed",
                "{d}/fixed.passport.json",
                "--moving",
                "{d}/moving.passport.json",
                "--tier",
                "affine",
            ],
            "--tier",
        ),
        (
            ["register", "--fixed-points", "{d}/f.csv", "--moving-points", "{d}/fixed.passport.json"],
            "x, y and z",
        ),
        (
            ["register", "--fixed-points", "{d}/f.csv", "--moving-points", "{d}/short.csv"],
            "rows must correspond",
        ),
        (["register", "--fixed-points", "{d}/f.csv", "--moving-points", "{d}/text.csv"], "must be numbers"),
        (["register", "--fixed-points", "{d}/f.csv", "--moving-points", "{d}/far.csv"], "beyond +-100000 mm"),
        (["register", "--fixed-points", "{d}/f.csv", "--moving-points", "{d}/twice.csv"], "names column x 2 times"),
        (  # the error names both inputs
            ["register", "--fixed", "{d}/fixed.passport.json", "--moving", "{d}/two.passport.json"],
            "fixed.passport.json -> {d}/two.passport.json: only",
        ),
        (
            ["register", "--fixed-points", "{d}/f.csv", "--moving-points", "{d}/f.csv", "--tier", "deformable",
             "--method", "demons"],
            "--method must be one of tps, bspline, sitk-bspline for point lists",
        ),
        (["warp", "--transform", "{d}/missing"], "give either"),
        (["warp", "--transform", "{d}/missing", "--points", "{d}/f.csv"], "no such transform"),
        (
            ["register", "--fixed", "{d}/fixed.passport.json", "--moving", "{d}/moving.passport.json", "--tier",
             "deformable", "--refine-passes", "-1"],
            "--refine-passes must be >= 0",
        ),
        (
            ["register", "--fixed-points", "{d}/f.csv", "--moving-points", "{d}/m.csv", "--tier", "deformable",
             "--refine-passes", "2"],
            "--refine-passes refines the deformable demons fit of passports",
        ),
        (
            ["register", "--fixed", "{d}/fixed.passport.json", "--moving", "{d}/moving.passport.json", "--tier",
             "deformable", "--method", "tps", "--refine-passes", "2"],
            "--refine-passes refines the deformable demons fit of passports",
        ),
        (
            ["register", "--fixed", "{d}/fixed.passport.json", "--moving", "{d}/moving.passport.json",
             "--refine-passes", "2"],
            "drop it for the rigid tier",
        ),
        (  # json reads Infinity; it (or 1e308) overflowed inside the fit, an internal error
            ["register", "--fixed", "{d}/fixed.passport.json", "--moving", "{d}/moving.passport.json",
             "--weights", "{d}/inf.json"],
            "inf.json: stability weight 'liver': inf is not a number from 0 to 1e+06",
        ),
        (
            ["register", "--fixed", "{d}/fixed.passport.json", "--moving", "{d}/moving.passport.json",
             "--weights", "{d}/negative.json"],
            "negative.json: stability weight 'lung_*': -0.5 is not a number",
        ),
    ],
)
def test_bad_inputs_give_one_line_errors_and_no_output(files, args, message) -> None:
    d, x, y = files
    (d / "short.csv").write_text("x,y,z\n1,2,3\n4,5,6\n7,8,9\n")
    (d / "text.csv").write_text("x,y,z\n" + "a,b,c\n" * len(x))
    (d / "far.csv").write_text("x,y,z\n" + "1e9,0,0\n" * len(x))  # metres or a wrong column, not mm
    (d / "twice.csv").write_text("x,y,z,x\n" + "1,2,3,4\n" * len(x))  # which x is meant?
    (d / "inf.json").write_text('{"liver": Infinity}')
    (d / "negative.json").write_text('{"vertebrae_*": 1.0, "lung_*": -0.5}')
    two = build_passport(np.pad(np.ones((3, 3, 3), np.uint8), 2) * 5, np.eye(4))
    save_passport(two, d / "two.passport.json")
    out = d / "bad_out"
    r = runner.invoke(app, [a.format(d=d) for a in args] + ["-o", str(out)])
    assert r.exit_code != 0
    text = r.output.strip().splitlines()
    assert len(text) == 1 and text[0].startswith("ctpassport: error:") and message.format(d=d) in text[0], r.output
    assert not out.exists()
    if message.startswith(("--tier", "--method", "--refine-passes", "--exclude")):
        assert r.exit_code == 5  # a bad setting


def test_register_with_lattice_refinement(files, tmp_path) -> None:
    """``--refine-passes N`` adds N lattice refinement passes to the deformable tier (recorded in the summary's
    iterations): the mapped points move, and stay as close to the truth as without them on this small case."""
    d, x, y = files
    errs, maps = {}, {}
    for n in (0, 3):
        out = tmp_path / f"reg{n}"
        _ok(["register", "--fixed", str(d / "fixed.passport.json"), "--moving", str(d / "moving.passport.json"),
             "--tier", "deformable", "--refine-passes", str(n), "-o", str(out), "-q"])
        summary = json.loads((out / "registration.json").read_text())
        its = summary["deformable"]["iterations"]
        assert sum("control_spacing_mm" in it for it in its) == n
        _ok(["warp", "--transform", str(out), "--points", str(d / "f.csv"), "-o", str(out / "mapped.csv"), "-q"])
        mapped = np.loadtxt(out / "mapped.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3))
        errs[n] = float(np.linalg.norm(mapped - y, axis=1).mean())
        maps[n] = mapped
    assert float(np.linalg.norm(maps[3] - maps[0], axis=1).mean()) > 0.01  # the refinement did something
    assert errs[3] < errs[0] + 0.2, errs
