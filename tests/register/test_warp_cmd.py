"""`ctpassport warp` on odd settings: label fills that would invent labels, label maps warped as images,
output names and transform files checked before any work (one-line errors, nonzero exit, nothing written)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ctpassport.cli import app
from ctpassport.errors import ConfigError
from ctpassport.register.api import register_points
from ctpassport.register.transform import GridSpec, RigidTransform, Transform
from ctpassport.register.warp import resample

runner = CliRunner()


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small LPS-stored label map, a CT-like image on the same grid and a rigid registration folder
    (a 3 mm shift) whose fixed grid is that grid."""
    d = tmp_path_factory.mktemp("warp")
    aff = np.diag([-4.0, -4.0, 5.0, 1.0])
    aff[:3, 3] = [40.0, 30.0, -20.0]
    labels = np.zeros((16, 14, 12), dtype=np.uint8)
    labels[3:9, 4:10, 3:8] = 1
    labels[9:14, 3:8, 5:10] = 5
    nib.save(nib.Nifti1Image(labels, aff), d / "labels.nii.gz")
    ct = np.where(labels > 0, 40, -1000).astype(np.int16) + np.arange(labels.size, dtype=np.int16).reshape(
        labels.shape
    ) % 7
    nib.save(nib.Nifti1Image(ct, aff), d / "ct.nii.gz")
    grid = GridSpec(labels.shape, aff)
    fixed = grid.index_to_world(np.array([[2, 2, 2], [13, 3, 4], [4, 12, 3], [5, 6, 10], [12, 11, 9]], float))
    res = register_points(fixed, fixed + [3.0, 0.0, 0.0], "rigid", grid=grid)
    res.save(d / "reg")
    return d


def _one_line_error(args: list[str]) -> tuple[int, str]:
    r = runner.invoke(app, args)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("ctpassport: error:"), r.output
    return r.exit_code, lines[0]


@pytest.mark.parametrize("fill", ["-1", "300", "0.5", "nan"])
def test_label_fill_that_the_label_type_cannot_hold_is_refused(case: Path, fill: str) -> None:
    # uint8: -1 would wrap to 255 and 300 to 44 (a real class id), 0.5 would truncate to 0
    out = case / f"w_{fill}.nii.gz"
    code, line = _one_line_error(["warp", "-t", str(case / "reg"), "-i", str(case / "labels.nii.gz"),
                                  "--labels", "--fill", fill, "-o", str(out), "-q"])
    assert code == 5 and "--fill" in line
    assert not out.exists()


def test_label_fill_within_the_type_is_the_only_new_value(case: Path) -> None:
    out = case / "w_fill7.nii.gz"
    r = runner.invoke(app, ["warp", "-t", str(case / "reg"), "-i", str(case / "labels.nii.gz"), "--labels",
                            "--fill", "7", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    data = np.asanyarray(nib.load(out).dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data).tolist()) == {0, 1, 5, 7}


def test_resample_refuses_a_wrapping_label_fill() -> None:
    labels = np.ones((3, 3, 3), dtype=np.uint8)
    ident = Transform(RigidTransform.identity())
    grid = GridSpec((4, 4, 4), np.eye(4))
    with pytest.raises(ConfigError, match="whole number from 0 to 255"):
        resample(labels, np.eye(4), ident, grid, labels=True, fill=-1)
    out = resample(labels, np.eye(4), ident, grid, labels=True, fill=9)
    assert set(np.unique(out).tolist()) == {1, 9}


def test_label_map_warped_as_an_image_warns(case: Path) -> None:
    out = case / "w_linear.nii.gz"
    r = runner.invoke(app, ["warp", "-t", str(case / "reg"), "-i", str(case / "labels.nii.gz"),
                            "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("ctpassport: warning:")]
    assert len(warnings) == 1 and "labels.nii.gz" in warnings[0] and "--labels" in warnings[0]
    # a CT (air at -1000 HU) is not suspected
    r = runner.invoke(app, ["warp", "-t", str(case / "reg"), "-i", str(case / "ct.nii.gz"), "-o",
                            str(case / "w_ct.nii.gz"), "-q"])
    assert r.exit_code == 0 and r.stderr.strip() == "", r.output


def test_image_output_name_is_checked_before_warping(case: Path) -> None:
    out = case / "warped.png"
    for transform in (case / "reg", case / "no_such_registration"):  # checked before the transform is read
        code, line = _one_line_error(["warp", "-t", str(transform), "-i", str(case / "ct.nii.gz"),
                                      "-o", str(out)])
        assert code == 2 and "warped.png" in line and ".nii.gz" in line
    assert not out.exists()


def test_displacement_nifti_as_transform_is_named_clearly(case: Path) -> None:
    field = case / "field.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 1, 3), np.float32), np.eye(4)), field)
    out = case / "w_field.nii.gz"
    code, line = _one_line_error(["warp", "-t", str(field), "-i", str(case / "ct.nii.gz"), "-o", str(out)])
    assert code == 2 and "field.nii.gz" in line and "transform.h5" in line
    assert not out.exists()


def test_points_registered_without_a_reference_need_one_to_warp_an_image(case: Path, tmp_path: Path) -> None:
    """Without --reference, a points registration's field covers only the landmarks' box (+30 mm, 3 mm): that box
    is not the fixed image, so warping an image asks for --reference instead of writing a cropped 3 mm image;
    points still map, and with --reference the image lands on the fixed grid voxel for voxel."""
    from ctpassport.register.api import load_transform

    img = nib.load(case / "labels.nii.gz")
    grid = GridSpec(img.shape, img.affine)
    fixed = grid.index_to_world(np.array([[2, 2, 2], [13, 3, 4], [4, 12, 3], [5, 6, 10], [12, 11, 9]], float))
    res = register_points(fixed, fixed + [3.0, 0.0, 0.0], "rigid")
    assert res.fixed_grid is None and res.summary["fixed_grid"] is None and res.grid is not None
    with pytest.raises(Exception, match="no fixed image grid"):
        res.warp_image(nib.load(case / "ct.nii.gz"))  # type: ignore[arg-type]
    reg = res.save(tmp_path / "reg")
    back = load_transform(reg)
    assert back.fixed_grid is None and back.grid is not None and back.grid.same_as(res.grid)
    out = tmp_path / "w.nii.gz"
    code, line = _one_line_error(["warp", "-t", str(reg), "-i", str(case / "labels.nii.gz"), "--labels",
                                  "-o", str(out), "-q"])
    assert "--reference" in line and not out.exists()
    ok = runner.invoke(app, ["warp", "-t", str(reg), "-i", str(case / "labels.nii.gz"), "--labels",
                             "--reference", str(case / "labels.nii.gz"), "-o", str(out), "-q"])
    assert ok.exit_code == 0, ok.output
    warped = nib.load(out)
    assert warped.shape == img.shape and np.allclose(warped.affine, img.affine)


@pytest.mark.parametrize(("grid", "words"), [
    ({"shape": [-3, 14, 12]}, "not three positive sizes"),
    ({"shape": [16, 14]}, "not three positive sizes"),
    ({"affine_ras": [[0.0] * 4] * 4}, "singular"),
    ({"affine_ras": [[float("nan")] * 4] * 4}, "NaN or infinite"),
])
def test_damaged_registration_json_grid_is_named(case: Path, tmp_path: Path, grid: dict, words: str) -> None:
    """A hand-edited or damaged registration.json: one line naming the file and the grid, exit 2 (a negative
    size was an internal error, a singular affine named no file)."""
    import json
    import shutil

    reg = tmp_path / "reg"
    shutil.copytree(case / "reg", reg)
    summary = json.loads((reg / "registration.json").read_text())
    summary["fixed_grid"].update(grid)
    (reg / "registration.json").write_text(json.dumps(summary))
    out = tmp_path / "w.nii.gz"
    code, line = _one_line_error(["warp", "-t", str(reg), "-i", str(case / "ct.nii.gz"), "-o", str(out), "-q"])
    assert code == 2 and "registration.json has a malformed fixed_grid" in line and words in line, line
    assert not out.exists()


def test_warped_output_does_not_inherit_the_references_display_range(case: Path, tmp_path: Path) -> None:
    """The reference gives the output's grid and geometry codes; its display range (cal_min/cal_max, e.g. a
    CT's -1024..3071) and description are not about the warped voxels (labels 0..117 would show black)."""
    ref = nib.load(case / "ct.nii.gz")
    ref.header["cal_min"], ref.header["cal_max"] = -1024.0, 3071.0
    ref.header["descrip"] = b"CT abdomen"
    nib.save(ref, tmp_path / "ref.nii.gz")
    out = tmp_path / "w.nii.gz"
    r = runner.invoke(app, ["warp", "-t", str(case / "reg"), "-i", str(case / "labels.nii.gz"), "--labels",
                            "-r", str(tmp_path / "ref.nii.gz"), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    hdr = nib.load(out).header
    assert float(hdr["cal_min"]) == float(hdr["cal_max"]) == 0.0
    assert hdr["descrip"].tobytes().startswith(b"ctpassport warp of labels.nii.gz")
    assert int(hdr["sform_code"]) == int(ref.header["sform_code"])


def test_warp_says_when_the_default_grid_is_the_model_grid(case: Path, tmp_path: Path) -> None:
    """Passports of `segment --passport` (default --passport-grid model) are on the 3 mm model grid, not the
    fixed image's: warp without --reference writes onto that grid and says so in a warning line; with
    --reference (or passports on the label map's own grid) it does not warn."""
    from ctpassport.passport.build import build_passport
    from ctpassport.passport.schema import save_passport
    from ctpassport.register.api import register_passports

    img = nib.load(case / "labels.nii.gz")
    labels = np.asarray(img.dataobj).copy()
    labels[3:7, 10:13, 8:11] = 2  # a third organ, off the line of the other two
    for kind in ("model", "output"):
        fp = build_passport(labels, img.affine, grid_kind=kind)
        mp = build_passport(np.roll(labels, 1, axis=0), img.affine, grid_kind=kind)
        save_passport(fp, tmp_path / f"f_{kind}.json")
        save_passport(mp, tmp_path / f"m_{kind}.json")
        res = register_passports(tmp_path / f"f_{kind}.json", tmp_path / f"m_{kind}.json", "rigid")
        assert res.summary["fixed"]["grid_kind"] == kind
        reg = res.save(tmp_path / f"reg_{kind}")
        for extra in ([], ["-r", str(case / "ct.nii.gz")]):
            out = tmp_path / f"w_{kind}_{len(extra)}.nii.gz"
            r = runner.invoke(app, ["warp", "-t", str(reg), "-i", str(case / "labels.nii.gz"), "--labels",
                                    "-o", str(out), "-q", *extra])
            assert r.exit_code == 0, r.output
            warned = "3 mm model grid" in r.stderr
            assert warned == (kind == "model" and not extra), r.stderr


def test_itk_resampling_equals_the_reference_implementation(rng: np.random.Generator) -> None:
    """`warp` resamples with SimpleITK (about 10x faster): the same sampling rules as :func:`resample` (labels
    identical, images to float32 rounding; identical here) on oblique and flipped grids through a rigid motion and a field
    that ends inside the reference grid (zero beyond, as ITK's displacement field transform has it)."""
    from scipy.ndimage import gaussian_filter

    from ctpassport.register.transform import DisplacementField
    from ctpassport.register.warp import _resample_itk, resample

    def rot(ax: int, deg: float) -> np.ndarray:
        t = np.radians(deg)
        r = np.eye(3)
        i, j = [a for a in range(3) if a != ax]
        r[i, i], r[i, j], r[j, i], r[j, j] = np.cos(t), -np.sin(t), np.sin(t), np.cos(t)
        return r

    m_aff = np.eye(4)
    m_aff[:3, :3] = rot(2, 12) @ rot(0, -7) @ np.diag([1.5, -1.2, 2.5])
    m_aff[:3, 3] = [-40.0, 35.0, -30.0]
    labels = np.zeros((48, 56, 30), np.uint8)
    labels[10:30, 12:40, 5:22] = 3
    labels[25:40, 30:50, 10:28] = 7
    ct = gaussian_filter(rng.normal(0, 300, labels.shape), 2).astype(np.float32) + 40.0 * labels
    ref = GridSpec((40, 44, 26), np.diag([-1.7, -1.6, 2.2, 1.0]) @ np.array(
        [[1, 0, 0, 35], [0, 1, 0, -30], [0, 0, 1, -28], [0, 0, 0, 1]], dtype=np.float64))
    fgrid = GridSpec((12, 12, 9), np.diag([-6.0, -6.0, 6.0, 1.0]) @ np.array(
        [[1, 0, 0, 2], [0, 1, 0, -2], [0, 0, 1, -3], [0, 0, 0, 1]], dtype=np.float64))
    u = gaussian_filter(rng.normal(0, 8, (*fgrid.shape, 3)), (1.5, 1.5, 1.5, 0))
    tx = Transform(RigidTransform(rot(1, 5), np.array([3.0, -4.0, 2.0])), DisplacementField(fgrid, u))
    for data, is_labels in ((labels, True), (ct, False)):
        want = resample(data, m_aff, tx, ref, labels=is_labels)
        got = resample(data, m_aff, tx, ref, labels=is_labels, itk=True)
        src = data if is_labels else data.astype(np.float32)  # (what resample hands it)
        assert _resample_itk(src, GridSpec(data.shape, m_aff), tx, ref, is_labels, 0.0) is not None  # ITK ran
        assert got.dtype == want.dtype and got.shape == want.shape
        if is_labels:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, atol=1e-3)
    sheared = GridSpec(ref.shape, ref.affine @ np.array([[1, 0, 0.2, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    assert _resample_itk(labels, GridSpec(labels.shape, m_aff), tx, sheared, True, 0.0) is None  # ITK cannot
    np.testing.assert_array_equal(resample(labels, m_aff, tx, sheared, labels=True, itk=True),
                                  resample(labels, m_aff, tx, sheared, labels=True))  # (the module's own runs)
