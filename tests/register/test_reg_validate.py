"""The validation suite, the Learn2Reg layout and figures on the real shared CT labels."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ctpassport.cli import app
from ctpassport.errors import ConfigError, InputError
from ctpassport.io.atomic import OUTPUT_MARKER
from ctpassport.register.points import read_voxel_csv
from ctpassport.register.synthetic import random_motion
from ctpassport.register.transform import GridSpec
from ctpassport.register.validate import (
    SuiteOptions,
    load_scene,
    noise_floor,
    run_suite,
    self_registration,
    validate_learn2reg,
)
from ctpassport.register.warp import resample


def _intensity(labels: np.ndarray) -> np.ndarray:
    """A CT-like image whose labels can be read back exactly (the test's 'segmenter')."""
    return np.where(labels > 0, 100 + 10 * labels.astype(np.int16), -1000).astype(np.int16)


def _segment(img) -> np.ndarray:
    d = np.asarray(img.data)
    return np.where(d >= 100, (d - 100) // 10, 0).astype(np.uint8)


def make_learn2reg(folder: Path, labels: np.ndarray, aff: np.ndarray, pairs: int = 2) -> dict[str, float]:
    """A Learn2Reg-layout folder: imagesTr, labelsTr, keypointsTr (voxel CSVs), TASK_dataset.json.

    Each moving scan is the fixed scene under a known random motion; its keypoints are moving body voxels and
    the fixed keypoints their exact (continuous) voxel positions in the fixed image."""
    for sub in ("imagesTr", "labelsTr", "keypointsTr"):
        (folder / sub).mkdir(parents=True)
    g = GridSpec(labels.shape, aff)
    items, moved = [], []
    for k in range(1, pairs + 1):
        motion = random_motion(
            g,
            np.random.default_rng(k),
            amplitude_mm=4.0,
            mask=labels > 0,
            max_angle_deg=4.0,
            max_translation_mm=6.0,
        )
        ml = resample(labels, aff, motion.pullback, g, labels=True)
        fname, mname = f"TEST_{k:04d}_0000.nii.gz", f"TEST_{k:04d}_0001.nii.gz"
        for name, lab in ((fname, labels), (mname, ml)):
            nib.save(nib.Nifti1Image(_intensity(lab), aff), folder / "imagesTr" / name)
            nib.save(nib.Nifti1Image(lab, aff), folder / "labelsTr" / name)
        vy = np.argwhere(ml > 0)[::9].astype(float)
        vx = g.world_to_index(motion.pullback.apply(g.index_to_world(vy)))
        ok = np.all((vx >= 0) & (vx <= np.asarray(labels.shape) - 1), axis=1)
        np.savetxt(folder / "keypointsTr" / f"TEST_{k:04d}_0000.csv", vx[ok], delimiter=",", fmt="%.4f")
        np.savetxt(folder / "keypointsTr" / f"TEST_{k:04d}_0001.csv", vy[ok], delimiter=",", fmt="%.1f")
        items.append({"fixed": f"./imagesTr/{fname}", "moving": f"./imagesTr/{mname}"})
        moved.append(
            float(np.linalg.norm(g.index_to_world(vx[ok]) - g.index_to_world(vy[ok]), axis=1).mean())
        )
    (folder / "TEST_dataset.json").write_text(
        json.dumps({"name": "TEST", "training_paired_images": items, "registration_val": items[:1]})
    )
    return {"mean_motion_mm": float(np.mean(moved))}


def test_learn2reg_with_label_folder(scene, tmp_path) -> None:
    labels, aff = scene
    info = make_learn2reg(tmp_path / "task", labels, aff)
    res = validate_learn2reg(tmp_path / "task", tmp_path / "out", labels_dir=tmp_path / "task" / "labelsTr")
    s = res["summary"]
    assert s["pairs"] == 2 and s["evaluated"] == 2
    assert s["tre_identity_mm"] == pytest.approx(info["mean_motion_mm"], rel=1e-3)
    assert s["rigid"]["tre_mean_mm"] < 0.6 * s["tre_identity_mm"]
    assert s["deformable"]["tre_mean_mm"] < s["rigid"]["tre_mean_mm"]
    assert s["deformable"]["tre_mean_mm"] < 2.5
    assert all(r["total_s"] > 0 for r in res["pairs"])
    assert (tmp_path / "out" / "report.md").read_text().startswith("# Learn2Reg validation")


def test_learn2reg_with_a_segmenter_and_via_the_cli(scene, tmp_path) -> None:
    labels, aff = scene
    make_learn2reg(tmp_path / "task", labels, aff, pairs=1)
    res = validate_learn2reg(tmp_path / "task", tmp_path / "out", segment=_segment)
    assert res["summary"]["evaluated"] == 1 and res["labels"] == "segmented"
    r = CliRunner().invoke(
        app,
        [
            "validate-registration",
            "--learn2reg",
            str(tmp_path / "task"),
            "--labels-dir",
            str(tmp_path / "task" / "labelsTr"),
            "-o",
            str(tmp_path / "cli_out"),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "cli_out" / "results.json").read_text())["summary"]["evaluated"] == 1


def test_validate_points_option_sets_the_passport_density(scene, tmp_path, monkeypatch) -> None:
    """`--points N` builds the registered passports with at most N boundary points per organ (Learn2Reg and the
    suite), `--refine-passes N` reaches both too, and the results say so."""
    import ctpassport.passport.build as build
    import ctpassport.register.validate as validate

    labels, aff = scene
    make_learn2reg(tmp_path / "task", labels, aff, pairs=1)
    seen: list[int] = []
    real_build = build.build_passport

    def recording_build(*args, **kwargs):
        seen.append(kwargs["points"])
        return real_build(*args, **kwargs)

    monkeypatch.setattr(build, "build_passport", recording_build)
    args = ["validate-registration", "--learn2reg", str(tmp_path / "task"), "--labels-dir",
            str(tmp_path / "task" / "labelsTr"), "-o", str(tmp_path / "l2r"), "-q", "--points", "120",
            "--refine-passes", "2"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert seen.count(120) == 2 and set(seen) <= {120, 2 * 120}  # (a CT-like image: also its body outline)
    l2r = json.loads((tmp_path / "l2r" / "results.json").read_text())
    assert l2r["points_per_organ"] == 120 and l2r["refine_passes"] == 2
    l2r_report = (tmp_path / "l2r" / "report.md").read_text()
    assert "up to 120 boundary points per organ" in l2r_report and "with 2 lattice refinement passes" in l2r_report
    options = []
    monkeypatch.setattr(validate, "run_suite",
                        lambda *a, **k: options.append(k["options"]) or {"summary": {}, "wall_s": 0.0})
    nib.save(nib.Nifti1Image(labels, aff), tmp_path / "seg.nii.gz")
    r = CliRunner().invoke(app, ["validate-registration", "-i", str(tmp_path / "seg.nii.gz"), "-o",
                                 str(tmp_path / "suite"), "-q", "--points", "250", "--refine-passes", "3"])
    assert r.exit_code == 0 and options and options[0].points == 250, r.output
    assert options[0].refine_passes == 3


def test_learn2reg_pair_specific_keypoint_folders(scene, tmp_path) -> None:
    """ThoraxCBCT/OncoReg layout: keypoints01Tr holds the keypoints of the _0000/_0001 pair; keypoints02Tr
    other ones for _0000 (a decoy here): the pair's own folder is used."""
    labels, aff = scene
    task = tmp_path / "task"
    make_learn2reg(task, labels, aff, pairs=1)
    want = validate_learn2reg(task, tmp_path / "a", labels_dir=task / "labelsTr")["summary"]
    (task / "keypointsTr").rename(task / "keypoints01Tr")
    (task / "keypoints02Tr").mkdir()
    decoy = np.loadtxt(task / "keypoints01Tr" / "TEST_0001_0000.csv", delimiter=",")[::-1] + 7.0
    np.savetxt(task / "keypoints02Tr" / "TEST_0001_0000.csv", decoy, delimiter=",")
    res = validate_learn2reg(task, tmp_path / "b", labels_dir=task / "labelsTr")
    assert res["pairs"][0]["keypoints_folder"] == "keypoints01Tr"
    assert res["summary"]["tre_identity_mm"] == pytest.approx(want["tre_identity_mm"])
    assert res["summary"]["deformable"]["tre_mean_mm"] == pytest.approx(want["deformable"]["tre_mean_mm"])


def test_learn2reg_one_bad_pair_does_not_stop_the_others(scene, tmp_path) -> None:
    labels, aff = scene
    task = tmp_path / "task"
    make_learn2reg(task, labels, aff, pairs=2)
    (task / "imagesTr" / "TEST_0002_0001.nii.gz").unlink()
    res = validate_learn2reg(task, tmp_path / "out", labels_dir=task / "labelsTr")
    assert res["summary"]["evaluated"] == 1 and "TEST_0002_0001.nii.gz" in res["pairs"][1]["error"]
    assert "no such image" in res["pairs"][1]["error"]  # (not "no keypoints": those are there)
    r = CliRunner().invoke(app, ["validate-registration", "--learn2reg", str(task), "--labels-dir",
                                 str(task / "labelsTr"), "-o", str(tmp_path / "cli"), "-q"])
    assert r.exit_code == 0 and "warning: TEST_0002_0000.nii.gz <- TEST_0002_0001.nii.gz" in r.stderr
    # no pair evaluable: a one-line error and a nonzero exit (the report still says why, pair by pair)
    (task / "imagesTr" / "TEST_0001_0001.nii.gz").unlink()
    r = CliRunner().invoke(app, ["validate-registration", "--learn2reg", str(task), "--labels-dir",
                                 str(task / "labelsTr"), "-o", str(tmp_path / "cli2"), "-q"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "no pair could be evaluated" in r.stderr and (tmp_path / "cli2" / "report.md").is_file()


def test_voxel_csv_header_and_malformed_first_line(tmp_path) -> None:
    (tmp_path / "h.csv").write_text("x,y,z\n1,2,3\n4,5,6\n")
    np.testing.assert_array_equal(read_voxel_csv(tmp_path / "h.csv"), [[1, 2, 3], [4, 5, 6]])
    (tmp_path / "bad.csv").write_text("1,2,oops\n4,5,6\n")
    with pytest.raises(InputError, match="line 1: expected three numbers"):
        read_voxel_csv(tmp_path / "bad.csv")
    (tmp_path / "nan.csv").write_text("1,2,3\nnan,5,6\n")  # float() reads it: it must not reach the TRE
    with pytest.raises(InputError, match="line 2: NaN or infinite"):
        read_voxel_csv(tmp_path / "nan.csv")
    (tmp_path / "u16.csv").write_text("1,2,3\n", encoding="utf-16")  # Windows' "Unicode text"
    with pytest.raises(InputError, match="not a text"):
        read_voxel_csv(tmp_path / "u16.csv")


def test_learn2reg_bad_folders(tmp_path) -> None:
    with pytest.raises(InputError, match="no such Learn2Reg folder"):
        validate_learn2reg(tmp_path / "none", tmp_path / "o", labels_dir=tmp_path)
    (tmp_path / "task").mkdir()
    with pytest.raises(InputError, match="dataset.json"):
        validate_learn2reg(tmp_path / "task", tmp_path / "o", labels_dir=tmp_path)
    (tmp_path / "task" / "X_dataset.json").write_text("{}")
    with pytest.raises(InputError, match="lists no image pairs"):
        validate_learn2reg(tmp_path / "task", tmp_path / "o", labels_dir=tmp_path)
    for text, message in (("[1, 2]", "JSON list, not the Learn2Reg task object"),
                          ('{"registration_val": 3}', "registration_val must be a list")):
        (tmp_path / "task" / "X_dataset.json").write_text(text)
        with pytest.raises(InputError, match=message):
            validate_learn2reg(tmp_path / "task", tmp_path / "o", labels_dir=tmp_path)
    for bad in (0, -1):  # -1 would otherwise slice the last pair away
        with pytest.raises(ConfigError, match=f"--max-pairs must be >= 1, not {bad}"):
            validate_learn2reg(tmp_path / "task", tmp_path / "o", labels_dir=tmp_path, max_pairs=bad)
        r = CliRunner().invoke(app, ["validate-registration", "--learn2reg", str(tmp_path / "task"), "--labels-dir",
                                     str(tmp_path), "-o", str(tmp_path / "o"), "--max-pairs", str(bad), "-q"])
        assert r.exit_code == 5 and "--max-pairs must be >= 1" in r.stderr and "Traceback" not in r.output
    (tmp_path / "task" / "Y_dataset.json").write_text("{}")
    with pytest.raises(InputError, match="2 task descriptions.*ambiguous"):
        validate_learn2reg(tmp_path / "task", tmp_path / "o", labels_dir=tmp_path)
    assert not (tmp_path / "o").exists()


def test_suite_writes_report_results_and_pictures(scene, tmp_path) -> None:
    labels, aff = scene
    nib.save(nib.Nifti1Image(labels, aff), tmp_path / "seg.nii.gz")
    opts = SuiteOptions(
        cases=1,
        amplitudes=(4.0,),
        missing_fractions=(0.25,),
        crop_fraction=0.2,
        compare_methods=("demons", "bspline"),
        compare_cases=1,
        full_fov=False,
        timing_repeats=1,
        n_points=500,
        points=300,
        refine_passes=2,
    )
    res = run_suite(tmp_path / "seg.nii.gz", tmp_path / "report", options=opts)
    names = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert names == [OUTPUT_MARKER, "overlay_amplitude4.png", "report.md", "results.json"]
    assert res["self_registration"]["deformable"]["tre"]["max"] < 1e-3
    s = res["summary"]["amplitude_4"]
    assert s["deformable:demons"]["tre_mean_mm"] < s["rigid"]["tre_mean_mm"] < s["rigid"]["tre_identity_mm"]
    assert s["deformable:demons"]["folding_percent"] == 0.0
    assert {"missing_0.25", "crop_0.2", "compare"} <= set(res["summary"])
    assert "deformable:bspline" in res["summary"]["compare"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Targets" in report and "## Synthetic recovery" in report
    assert "passports of up to 300 boundary points per organ" in report
    assert "deformable tier with 2 lattice refinement passes" in report and res["options"]["refine_passes"] == 2


def test_real_ct_self_registration_and_noise_floor(ct_dir) -> None:
    """On the shared real labels: self-registration is exact; the fast vs full segmentations of the same
    scan (truth: identity) give a small spurious motion (measured ~1 mm mean; bound 2.5 mm)."""
    scene = load_scene(ct_dir / "example_seg_fast.nii.gz", ct_dir / "example_ct_sm.nii.gz")
    sr = self_registration(scene, n_points=1000)
    assert sr["rigid"]["tre"]["max"] < 1e-4 and sr["deformable"]["tre"]["max"] < 1e-3
    other = nib.load(ct_dir / "example_seg.nii.gz")
    nf, _ = noise_floor(scene, np.asarray(other.dataobj), other.affine, n_points=1000)
    assert nf["rigid"]["tre"]["mean"] < 2.5
    assert nf["deformable"]["tre"]["mean"] < 2.5
    assert nf["deformable"]["overlap"]["dice"] >= nf["overlap_identity"]["dice"] - 0.02


@pytest.mark.torch
@pytest.mark.slow
def test_learn2reg_segments_with_the_model(scene, tmp_path, standin_home) -> None:
    """The full segment -> passport -> register path with the (stand-in) model via the CLI: stand-in weights give
    random labels, so only the plumbing is checked (every pair reported, with figures or a clear error)."""
    labels, aff = scene
    make_learn2reg(tmp_path / "task", labels, aff, pairs=1)
    r = CliRunner().invoke(
        app,
        [
            "validate-registration",
            "--learn2reg",
            str(tmp_path / "task"),
            "--model",
            str(standin_home),
            "-o",
            str(tmp_path / "out"),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["labels"] == "segmented" and len(res["pairs"]) == 1
    row = res["pairs"][0]
    assert row["segment_s"] > 0
    assert all(("tre" in row[t]) or ("error" in row[t]) for t in ("rigid", "deformable"))


def test_validate_bad_option_values_exit_as_bad_settings(tmp_path: Path) -> None:
    """--cases / --amplitudes values are bad settings (exit 5, as the README lists), refused before any work."""
    for args, message in ((["--cases", "0"], "--cases must be >= 1, not 0"),
                          (["--amplitudes", "abc"], "--amplitudes must be numbers"),
                          (["--amplitudes", "-5"], "non-negative"),
                          (["--refine-passes", "-1"], "--refine-passes must be >= 0, not -1")):
        r = CliRunner().invoke(app, ["validate-registration", "-i", str(tmp_path / "seg.nii.gz"),
                                     "-o", str(tmp_path / "o"), "-q", *args])
        assert r.exit_code == 5, (args, r.output)
        assert message in r.stderr and "Traceback" not in r.output
        assert not (tmp_path / "o").exists()


def test_learn2reg_pairs_that_cannot_be_registered_are_reported(scene, tmp_path) -> None:
    """Binary masks as the labels (one organ, e.g. NLST's masksTr): the pairs are read (identity TRE) but
    neither tier can register them. The report says why, each failure is a warning line, and the command
    fails (exit 6) instead of reporting a run with no TRE as a success."""
    labels, aff = scene
    task = tmp_path / "task"
    make_learn2reg(task, labels, aff, pairs=1)
    for p in (task / "labelsTr").glob("*.nii.gz"):
        img = nib.load(p)
        nib.save(nib.Nifti1Image((np.asarray(img.dataobj) > 0).astype(np.uint8), img.affine), p)
    res = validate_learn2reg(task, tmp_path / "out", labels_dir=task / "labelsTr")
    assert res["summary"]["evaluated"] == 1 and res["summary"]["registered"] == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Registrations that failed" in report and "rigid tier: only 0 usable organ" in report
    r = CliRunner().invoke(app, ["validate-registration", "--learn2reg", str(task), "--labels-dir",
                                 str(task / "labelsTr"), "-o", str(tmp_path / "cli"), "-q"])
    err = r.stderr.strip().splitlines()
    assert r.exit_code == 6, r.output
    assert "warning: TEST_0001_0000.nii.gz <- TEST_0001_0001.nii.gz: rigid tier:" in r.stderr
    assert err[-1].startswith("ctpassport: error:") and "no pair could be registered" in err[-1]
    assert (tmp_path / "cli" / "report.md").is_file()


def test_learn2reg_test_pairs_take_part_only_with_keypoints(scene, tmp_path) -> None:
    """``registration_test`` pairs: evaluated where the folder has their keypoints (a user's own landmarks);
    without (Learn2Reg does not publish them) they are counted and left out, not error rows. A JSON that lists
    only test pairs works too."""
    labels, aff = scene
    task = tmp_path / "task"
    make_learn2reg(task, labels, aff, pairs=2)
    js = task / "TEST_dataset.json"
    d = json.loads(js.read_text())
    hidden = {"fixed": "./imagesTs/TEST_0003_0000.nii.gz", "moving": "./imagesTs/TEST_0003_0001.nii.gz"}
    js.write_text(json.dumps({"name": "TEST", "registration_test": [d["training_paired_images"][1], hidden]}))
    res = validate_learn2reg(task, tmp_path / "out", labels_dir=task / "labelsTr")
    s = res["summary"]
    assert (s["pairs"], s["evaluated"], s["test_pairs_without_keypoints"]) == (1, 1, 0 + 1)
    assert res["pairs"][0]["fixed"] == "TEST_0002_0000.nii.gz" and "error" not in res["pairs"][0]
    assert "1 test pairs without keypoints left out" in (tmp_path / "out" / "report.md").read_text()
    js.write_text(json.dumps({"name": "TEST", "registration_test": [hidden]}))
    with pytest.raises(InputError, match="lists only registration_test pairs"):
        validate_learn2reg(task, tmp_path / "out2", labels_dir=task / "labelsTr")


def test_learn2reg_float_label_map_is_named(scene, tmp_path) -> None:
    labels, aff = scene
    task = tmp_path / "task"
    make_learn2reg(task, labels, aff, pairs=1)
    bad = task / "labelsTr" / "TEST_0001_0001.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(nib.load(bad).dataobj).astype(np.float32), aff), bad)
    res = validate_learn2reg(task, tmp_path / "out", labels_dir=task / "labelsTr")
    err = res["pairs"][0]["error"]
    assert str(bad) in err and "float32" in err, err


def test_hd95_is_the_larger_directed_percentile_in_mm() -> None:
    """HD95 as MONAI/MedPy/surface-distance compute it: max of the two directed 95th percentiles (pooling the two
    directions read lower), in mm on an anisotropic grid; inf when one mask is empty, 0 when both are."""
    from ctpassport.register.metrics import hd95

    a = np.zeros((40, 40, 20), bool)
    b = np.zeros_like(a)
    a[5:35, 10:20, 5:15] = True  # a 30x10x10 voxel box
    b[5:25, 10:20, 5:15] = True  # its first two thirds: a's far end lies up to 10 voxels (20 mm) from b
    spacing = (2.0, 1.0, 3.0)
    from scipy.ndimage import binary_erosion, distance_transform_edt

    def directed(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        sx, sy = x & ~binary_erosion(x, border_value=0), y & ~binary_erosion(y, border_value=0)
        return distance_transform_edt(~sy, sampling=spacing)[sx]

    want = max(np.percentile(directed(a, b), 95), np.percentile(directed(b, a), 95))
    assert hd95(a, b, spacing) == pytest.approx(want) and want > np.percentile(
        np.concatenate([directed(a, b), directed(b, a)]), 95)
    assert hd95(a, b, spacing) == hd95(b, a, spacing) == 20.0  # (pooled: 18 mm)
    assert hd95(a, np.zeros_like(a), spacing) == float("inf") and hd95(~a & a, ~a & a, spacing) == 0.0


def test_report_rows_say_which_tiers_failed_and_which_organs_were_lost() -> None:
    from ctpassport.register.validate import _overlap_means, _summarise, render_report

    per = {"2": {"dice": 0.0, "hd95_mm": float("inf")}, "3": {"dice": 0.9, "hd95_mm": 3.0}}
    means = _overlap_means(per)
    assert means["dice"] == pytest.approx(0.45) and means["hd95_mm"] == 3.0 and means["hd95_lost"] == 1
    ok = {"tre": {"mean": 2.0, "p95": 4.0}, "tre_heldout_organs": {"mean": 2.0}, "timings_s": {"total": 0.1},
          "heldout_overlap": means}
    records = [{"tiers": {"rigid": ok}, "tre_identity": {"mean": 9.0}},
               {"tiers": {"rigid": {"error": "only 2 usable organs"}}, "tre_identity": {"mean": 9.0}}]
    s = _summarise(records, "rigid")
    assert s["failed"] == 1 and s["cases"] == 2 and s["hd95_lost_organs"] == 1
    report = render_report({"input": "seg.nii.gz", "ct": None, "grid_shape": [8, 8, 8], "grid_spacing_mm": [3, 3, 3],
                            "organs": 5, "organs_truncated": 0, "summary": {"amplitude_10": {"rigid": s}}})
    row = next(line for line in report.splitlines() if line.startswith("| amplitude_10 |"))
    cells = row.strip("|").split("|")
    assert len(cells) == 11 and cells[1].strip() == "rigid (1 of 2 failed)" and "3.00 (1 lost)" in row
