"""Phantoms: labels where the generator says, plausible HU, determinism, grids, the follow-up's known motion.

Tolerances (stated here, checked below):
* analytic organs (volumes from closed forms, centroids exact): rendered volume within 3 % and centroid within
  1.0 mm (world RAS+) on a 2.5 x 2.5 x 2 mm oblique LPS grid -- discretisation error only;
* follow-up: the true transform maps each baseline organ centroid to the follow-up organ centroid within
  1.0 mm (the deformation is smooth, so mapping a centroid and taking the centroid of the mapped organ agree
  to second order), while organs move by several mm.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctpassport.errors import InputError
from ctpassport.io.nifti import spacing_from_affine
from ctpassport.model.classes import NAME_TO_ID
from ctpassport.phantom import (
    ANALYTIC_ORGANS,
    Grid,
    build_phantom,
    default_grid,
    load_true_transform,
    make_scan,
    save_true_transform,
)
from ctpassport.phantom.anatomy import LUNG_LABELS
from ctpassport.phantom.geometry import CutEllipsoid, Ellipsoid, rotation_xyz

VOLUME_RTOL = 0.03
CENTROID_TOL_MM = 1.0
FOLLOW_UP_TOL_MM = 1.0


def _organ_stats(labels: np.ndarray, affine: np.ndarray, label: int) -> tuple[float, np.ndarray]:
    idx = np.argwhere(labels == label)
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    return len(idx) * voxel_mm3, affine[:3, :3] @ idx.mean(axis=0) + affine[:3, 3]


@pytest.fixture(scope="module")
def scan3():
    return make_scan(3)


@pytest.fixture(scope="module")
def follow3(scan3):
    return make_scan(3, grid=Grid(scan3.ct.shape, scan3.affine), follow_up=True, motion_seed=2)


def test_cut_ellipsoid_moments_match_monte_carlo() -> None:
    ell = Ellipsoid([3.0, -2.0, 5.0], [40.0, 25.0, 30.0], rotation_xyz(20, -10, 35))
    cut = CutEllipsoid(ell, [0.3, -0.5, 0.8], 4.0)
    rng = np.random.default_rng(0)
    lo, hi = ell.bbox()
    pts = rng.uniform(lo, hi, (400_000, 3))
    inside = cut.inside_points(pts)
    box = float(np.prod(hi - lo))
    assert inside.mean() * box == pytest.approx(cut.volume(), rel=0.01)
    assert np.allclose(pts[inside].mean(axis=0), cut.centroid(), atol=0.5)
    assert ell.inside_points(pts).mean() * box == pytest.approx(ell.volume(), rel=0.01)


def test_labels_match_analytic_organs_on_oblique_lps_grid() -> None:
    ph = build_phantom(5)
    grid = default_grid(ph, (2.5, 2.5, 2.0), "LPS", oblique_deg=(4.0, -3.0, 8.0))
    scan = make_scan(5, grid=grid)
    truth = ph.truth()
    assert {t.name for t in truth.values()} == set(ANALYTIC_ORGANS)
    for label, t in truth.items():
        vol, cen = _organ_stats(scan.labels, scan.affine, label)
        assert vol == pytest.approx(t.volume_mm3, rel=VOLUME_RTOL), t.name
        assert np.linalg.norm(cen - np.array(t.centroid_mm)) < CENTROID_TOL_MM, t.name


def test_at_least_20_classes_in_plausible_places(scan3) -> None:
    present = set(np.unique(scan3.labels)) - {0}
    assert len(present) >= 20
    need = ["liver", "spleen", "kidney_left", "kidney_right", "stomach", "aorta", "inferior_vena_cava", "heart",
            "vertebrae_L1", "vertebrae_T12", "vertebrae_T6", "sacrum", "hip_left", "hip_right", "rib_left_6",
            "rib_right_6", "trachea", "urinary_bladder"]
    assert {NAME_TO_ID[n] for n in need} <= present
    assert set(LUNG_LABELS) <= present

    def centroid(name: str) -> np.ndarray:
        return _organ_stats(scan3.labels, scan3.affine, NAME_TO_ID[name])[1]

    # world RAS+: +x right, +y anterior, +z superior (small pose rotations do not change these orders)
    assert centroid("liver")[0] > centroid("spleen")[0] + 60
    assert centroid("kidney_right")[0] > centroid("kidney_left")[0] + 80
    assert centroid("heart")[2] > centroid("liver")[2] > centroid("urinary_bladder")[2]
    zs = [centroid(f"vertebrae_{v}")[2] for v in ("L5", "L3", "L1", "T11", "T8", "T4", "T1")]
    assert all(a < b for a, b in itertools.pairwise(zs))
    assert centroid("vertebrae_L3")[1] < centroid("aorta")[1]  # the aorta lies in front of the spine
    assert centroid("hip_right")[0] > 40 + centroid("sacrum")[0] > centroid("hip_left")[0] + 80
    lung_r = np.isin(scan3.labels, [NAME_TO_ID[n] for n in ("lung_upper_lobe_right", "lung_middle_lobe_right",
                                                            "lung_lower_lobe_right")])
    lung_l = np.isin(scan3.labels, [NAME_TO_ID[n] for n in ("lung_upper_lobe_left", "lung_lower_lobe_left")])
    assert 1.5e6 < lung_r.sum() * 27 < 5e6 and 1.2e6 < lung_l.sum() * 27 < 5e6  # mm^3: 1.2 to 5 litres


def test_hu_ranges_per_tissue(scan3) -> None:
    from scipy import ndimage

    ct, lab = scan3.ct.astype(np.float64), scan3.labels

    def median_hu(ids: list[int]) -> float:
        m = ndimage.binary_erosion(np.isin(lab, ids), iterations=1)
        return float(np.median(ct[m]))

    assert -900 <= median_hu(list(LUNG_LABELS)) <= -780  # air -850 HU plus vessels
    for name in ("liver", "spleen", "kidney_left", "kidney_right", "heart", "aorta"):
        assert 0 <= median_hu([NAME_TO_ID[name]]) <= 90, name
    assert -30 <= median_hu([NAME_TO_ID["urinary_bladder"]]) <= 30
    for name in ("vertebrae_L2", "vertebrae_T8", "hip_left", "femur_right"):
        assert median_hu([NAME_TO_ID[name]]) > 150, name
    assert float(np.median(ct[:3, :3, :])) < -950  # air in the corner of the field of view
    # subcutaneous fat and body wall exist: many unlabelled voxels in the fat and muscle ranges
    body0 = (lab == 0) & (ct > -300)
    assert np.mean((ct[body0] > -150) & (ct[body0] < -50)) > 0.2
    assert 4.0 < float(np.std(ct[ndimage.binary_erosion(lab == NAME_TO_ID["liver"], iterations=2)])) < 40.0


def test_deterministic_per_seed_and_varies_between_seeds(scan3) -> None:
    again = make_scan(3)
    assert np.array_equal(again.ct, scan3.ct) and np.array_equal(again.labels, scan3.labels)
    other = build_phantom(4)
    t3, t4 = build_phantom(3).truth(), other.truth()
    vols3 = np.array([t3[k].volume_mm3 for k in sorted(t3)])
    vols4 = np.array([t4[k].volume_mm3 for k in sorted(t4)])
    assert np.max(np.abs(vols3 / vols4 - 1)) > 0.05
    assert np.max(np.abs(np.array(t3[NAME_TO_ID["liver"]].centroid_mm) - t4[NAME_TO_ID["liver"]].centroid_mm)) > 2


@pytest.mark.parametrize("seed", range(12))
def test_recipe_places_every_organ(seed: int) -> None:
    ph = build_phantom(seed)
    assert len(ph.truth()) == len(ANALYTIC_ORGANS)
    assert len(ph.labels_present()) >= 70


def test_orientation_only_permutes_voxels() -> None:
    ph = build_phantom(6)
    ras = default_grid(ph, 4.0, "RAS")
    lps = default_grid(ph, 4.0, "LPS")
    assert ras.shape == lps.shape
    a, b = make_scan(6, grid=ras), make_scan(6, grid=lps)
    assert np.array_equal(a.labels, b.labels[::-1, ::-1, :])
    assert nib.aff2axcodes(b.affine) == ("L", "P", "S")
    sp = spacing_from_affine(default_grid(ph, "1.5,2,3.5", "PIL").affine)
    assert np.allclose(sp, [1.5, 2.0, 3.5])


def test_follow_up_truth_maps_baseline_centroids(scan3, follow3) -> None:
    motion = follow3.motion
    assert motion is not None
    moved = []
    for label in scan3.phantom.truth():
        _, cb = _organ_stats(scan3.labels, scan3.affine, label)
        _, cf = _organ_stats(follow3.labels, follow3.affine, label)
        pred = motion.apply(cb[None])[0]
        assert np.linalg.norm(pred - cf) < FOLLOW_UP_TOL_MM
        moved.append(np.linalg.norm(cf - cb))
    assert max(moved) > 3.0  # the motion is not trivial
    # the follow-up is a different noise realisation of the moved anatomy
    assert not np.array_equal(follow3.ct, scan3.ct)


def test_true_transform_inverse_and_json_round_trip(follow3, tmp_path: Path) -> None:
    motion = follow3.motion
    pts = np.random.default_rng(1).uniform(-250, 250, (500, 3))
    assert np.abs(motion.inverse(motion.apply(pts)) - pts).max() < 1e-5
    path = save_true_transform(motion, tmp_path / "t.json")
    d = json.loads(path.read_text())
    assert d["direction"] == "fixed_to_moving" and d["fixed"] == "baseline"
    back = load_true_transform(path)
    assert np.allclose(back.apply(pts), motion.apply(pts), atol=1e-9)
    disp = np.linalg.norm(motion.apply(pts) - pts, axis=1)
    assert disp.max() < 60.0


def test_cli_phantom_writes_files_and_refuses_overwrite(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ctpassport.cli import app
    from ctpassport.io.labels import read_label_table

    ct, seg, fu = tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", tmp_path / "fu.nii.gz"
    args = ["phantom", "-o", str(ct), "--labels", str(seg), "--seed", "2", "--spacing", "4.5",
            "--orientation", "LPS", "--follow-up", str(fu), "--truth", str(tmp_path / "truth.json"), "-q"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    img, lab = nib.load(ct), nib.load(seg)
    assert img.get_data_dtype() == np.int16 and nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert np.allclose(img.header.get_zooms(), 4.5)
    table = read_label_table(lab)
    assert table[NAME_TO_ID["liver"]] == "liver" and len(table) >= 70
    assert (tmp_path / "fu_labels.nii.gz").is_file()
    tr = load_true_transform(tmp_path / "fu_true_transform.json")
    assert tr.max_displacement() > 0
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["seed"] == 2 and str(NAME_TO_ID["liver"]) in truth["analytic_organs"]
    res2 = CliRunner().invoke(app, args)
    assert res2.exit_code == 4 and "exists" in res2.output
    bad = CliRunner().invoke(app, ["phantom", "-o", str(tmp_path / "x.nii.gz"), "--orientation", "RAR"])
    assert bad.exit_code == 5 and "orientation" in bad.output  # a bad setting
    # every output name is checked before anything is written (a bad later name leaves no earlier file)
    bad = CliRunner().invoke(app, ["phantom", "-o", str(tmp_path / "y.nii.gz"), "--follow-up",
                                   str(tmp_path / "yf.nii.gz"), "--follow-up-labels", str(tmp_path / "yf.txt")])
    assert bad.exit_code == 2 and "must end with .nii" in bad.output
    assert not list(tmp_path.glob("y*"))


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["deformation"].update(diaphragm_center=[1.0, 2.0]), "3 numbers"),
    (lambda d: d.update(rotation=[[1.0, 0.0], [0.0, 1.0]]), "rotation must be 3x3"),
    (lambda d: d.update(translation=[1.0, 2.0]), "3 numbers"),
    (lambda d: d["translation"].__setitem__(0, float("nan")), "not a finite number"),
    (lambda d: d["deformation"].update(chest_length=0.0), "chest_length must be > 0"),
    (lambda d: d["deformation"].update(sigma_z=-5.0), "sigma_z must be > 0"),
    (lambda d: d.update(rotation=[[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0]]), "not a rotation matrix"),
    (lambda d: d.update(rotation=[[-1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), "not a rotation matrix"),
    (lambda d: d.update(direction="moving_to_fixed"), "direction is 'moving_to_fixed'"),
    (lambda d: d.update(frame="world mm LPS"), "frame is 'world mm LPS'"),
    (lambda d: d.update(version=99), "version 99 is newer"),
    (lambda d: d["deformation"].update(extra=1.0), "malformed"),
])
def test_a_malformed_true_transform_is_refused(follow3, tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    d = follow3.motion.to_dict()
    d["deformation"] = dict(d["deformation"])
    edit(d)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(d))
    with pytest.raises(InputError, match=message) as e:
        load_true_transform(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
