"""The body outline (``Passport.body``) on analytic CTs: an elliptic cylinder of soft tissue (40 HU) cut by the
field of view along z, with an air-filled "lung" inside (-850 HU: a hole the outline must fill) and a table
(0 HU) below it, separated by air but for a one-voxel strap (it must not join the body).

Analytic answers: the outline's volume is the cylinder's (pi a b h, within 3 % at 3 mm voxels), every skin
point lies within one voxel of the ellipse, none on the lung or the table, normals point outwards, the cut
faces carry no points (``truncated``), and the same CT stored LPS gives the same world points.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ctpassport.cli import app
from ctpassport.errors import InputError
from ctpassport.passport.build import body_grid, body_outline, build_passport
from ctpassport.passport.schema import BODY_ID, BODY_NAME, passport_json, validate_passport

A_MM, B_MM = 90.0, 60.0  # the body's semi-axes (x: left-right, y: anterior-posterior)


def body_ct(spacing: float = 3.0, lps: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A CT (HU) of the phantom on a grid of ``spacing`` mm and its voxel -> RAS+ affine."""
    n = (int(round(240 / spacing)), int(round(200 / spacing)), int(round(60 / spacing)))
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = (-120.0 + spacing / 2, -100.0 + spacing / 2, 0.0)
    idx = np.indices(n, dtype=np.float64)
    x, y = aff[0, 0] * idx[0] + aff[0, 3], aff[1, 1] * idx[1] + aff[1, 3]
    ct = np.full(n, -1000.0, dtype=np.float32)
    ct[(x / A_MM) ** 2 + (y / B_MM) ** 2 <= 1.0] = 40.0
    ct[((x - 30.0) / 25.0) ** 2 + (y / 20.0) ** 2 <= 1.0] = -850.0  # lung: air inside the body
    ct[(np.abs(x) < 100.0) & (y < -B_MM - 15.0) & (y > -B_MM - 27.0)] = 0.0  # the table, 15 mm below the body
    ct[(np.abs(x - 50.0) < spacing / 2) & (y < -30.0) & (y > -B_MM - 20.0)] = 20.0  # a one-voxel strap to it
    if lps:  # the same voxels stored with i -> Left, j -> Posterior: old index = (n - 1) - new index
        ct = ct[::-1, ::-1, :].copy()
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = (n[0] - 1, n[1] - 1)
        aff = aff @ flip
    return ct, aff


def ellipse_radius(p: np.ndarray) -> np.ndarray:
    return np.sqrt((p[:, 0] / A_MM) ** 2 + (p[:, 1] / B_MM) ** 2)


def test_body_outline_is_the_skin_of_the_filled_body_without_the_table() -> None:
    ct, aff = body_ct(3.0)
    body = body_outline(ct, aff, points=400, seed=0, normals=True)
    assert body is not None and (body.id, body.name) == (BODY_ID, BODY_NAME)
    height = 60.0
    assert body.volume_mm3 == pytest.approx(np.pi * A_MM * B_MM * height, rel=0.03)  # the lung is inside
    assert body.truncated  # cut by the field of view along z
    pts, nrm = body.points_array(), body.normals_array()
    assert 300 <= len(pts) <= 400
    r = ellipse_radius(pts)
    assert np.all(np.abs(r - 1.0) * B_MM < 3.0 + 1e-6)  # within one voxel of the skin: none on lung or table
    assert np.all(pts[:, 1] > -B_MM - 3.0)
    inner = ellipse_radius(pts) < 0.9  # a point inside the cross-section would lie on a cut face
    assert not inner.any()  # the cut faces (first and last slice) are the image border, not skin
    grad = np.stack([pts[:, 0] / A_MM**2, pts[:, 1] / B_MM**2, np.zeros(len(pts))], axis=1)
    grad /= np.linalg.norm(grad, axis=1, keepdims=True)
    assert nrm is not None and np.mean(np.sum(nrm * grad, axis=1) > 0.8) > 0.95  # outward


@pytest.mark.parametrize("spacing", [3.0, 1.5])
def test_body_outline_is_the_same_in_world_for_another_storage_order(spacing: float) -> None:
    """At 1.5 mm the outline is found on every second voxel (160 x 133 voxels in-plane): the kept voxels must be
    the same world voxels whichever end the axes start from."""
    ras_ct, ras_aff = body_ct(spacing)
    lps_ct, lps_aff = body_ct(spacing, lps=True)
    last = lps_aff[:3, :3] @ np.array([lps_ct.shape[0] - 1, lps_ct.shape[1] - 1, 0.0]) + lps_aff[:3, 3]
    assert np.allclose(last, ras_aff[:3, 3])  # the last LPS voxel is the first RAS one: one grid, stored two ways
    a = body_outline(ras_ct, ras_aff, points=300, seed=2)
    b = body_outline(lps_ct, lps_aff, points=300, seed=2)
    assert a is not None and b is not None
    assert a.volume_mm3 == pytest.approx(b.volume_mm3)
    assert np.allclose(a.centroid_mm, b.centroid_mm, atol=1e-6)
    pa = {tuple(np.round(p, 2)) for p in a.points_array()}
    pb = {tuple(np.round(p, 2)) for p in b.points_array()}
    assert pa == pb


def test_body_grid_takes_about_3mm() -> None:
    ct = np.zeros((300, 250, 40), dtype=np.int16)
    aff = np.diag([0.8, 0.8, 2.5, 1.0])
    sub, sub_aff = body_grid(ct, aff)
    assert sub.shape == (100, 84, 40)  # every 3rd voxel in-plane (2.4 mm), every slice (2.5 mm)
    assert np.allclose(np.diag(sub_aff)[:3], [2.4, 2.4, 2.5]) and np.allclose(sub_aff[:3, 3], aff[:3, 3])
    fine, fine_aff = body_ct(1.0)
    coarse = body_outline(fine, fine_aff, points=200)
    assert coarse is not None and coarse.volume_mm3 == pytest.approx(np.pi * A_MM * B_MM * 60.0, rel=0.03)


def test_passport_body_only_when_asked_and_with_a_ct() -> None:
    ct, aff = body_ct(3.0)
    labels = np.zeros(ct.shape, dtype=np.uint8)
    labels[20:30, 25:35, 5:15] = 5  # liver, a box
    plain = build_passport(labels, aff, ct=ct)
    assert plain.body is None
    with_body = build_passport(labels, aff, ct=ct, body=True, normals=True)
    assert with_body.body is not None and with_body.body.boundary_normals is not None
    assert [o.id for o in with_body.organs] == [5]  # the outline is not an organ
    assert "passport_body" in with_body.timings
    again = validate_passport(passport_json(with_body), "mem")
    assert again.body is not None and again.body.points_array().shape == with_body.body.points_array().shape
    no_ct = build_passport(labels, aff, body=True)
    assert no_ct.body is None and any("no CT" in w for w in no_ct.warnings)
    air = build_passport(labels, aff, ct=np.full(ct.shape, -1000.0), body=True)
    assert air.body is None and any("no body outline" in w for w in air.warnings)


def test_schema_checks_the_body_record() -> None:
    ct, aff = body_ct(3.0)
    labels = np.zeros(ct.shape, dtype=np.uint8)
    labels[20:30, 25:35, 5:15] = 5
    raw = json.loads(passport_json(build_passport(labels, aff, ct=ct, body=True)))
    raw["body"]["id"] = 5
    with pytest.raises(InputError, match="body must have id 1000"):
        validate_passport(raw, "p.json")
    older = json.loads(passport_json(build_passport(labels, aff, ct=ct)))
    older["schema_version"] = "1.2"
    del older["body"]
    assert validate_passport(older, "old.json").body is None  # passports written before 1.3 still load


def test_passport_command_body_option(tmp_path: Path) -> None:
    ct, aff = body_ct(3.0)
    labels = np.zeros(ct.shape, dtype=np.uint8)
    labels[20:30, 25:35, 5:15] = 5
    nib.save(nib.Nifti1Image(ct.astype(np.int16), aff), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(labels, aff), tmp_path / "seg.nii.gz")
    runner = CliRunner()
    r = runner.invoke(app, ["passport", "-i", str(tmp_path / "seg.nii.gz"), "-o", str(tmp_path / "p.json"),
                            "--body", "-q"])
    assert r.exit_code == 5 and "--body needs --ct" in r.stderr and not (tmp_path / "p.json").exists()
    r = runner.invoke(app, ["passport", "-i", str(tmp_path / "seg.nii.gz"), "-o", str(tmp_path / "p.json"),
                            "--ct", str(tmp_path / "ct.nii.gz"), "--body", "--normals", "-q"])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["schema_version"] == "1.3" and doc["body"]["name"] == "body" and doc["body"]["boundary_normals"]


def test_no_skin_points_next_to_the_scanners_padding() -> None:
    """Outside the reconstructed field of view scanners store padding (-2000 to -3024 HU), not air: where the
    body reaches it (a large patient in a small circular field of view) its edge is not skin, so no point."""
    ct, aff = body_ct(3.0)
    n = ct.shape
    idx = np.indices(n, dtype=np.float64)
    x, y = aff[0, 0] * idx[0] + aff[0, 3], aff[1, 1] * idx[1] + aff[1, 3]
    fov = x < 60.0  # the field of view ends inside the body on the right
    ct[~fov] = -3024.0
    body = body_outline(ct, aff, points=400, normals=True)
    assert body is not None
    pts = body.points_array()
    assert pts[:, 0].max() < 60.0 - 3.0  # none on the cut at x = 60 mm
    assert np.all(np.abs(ellipse_radius(pts) - 1.0) * B_MM < 3.0 + 1e-6)  # the rest is skin
    assert body.normals_array() is not None and len(body.normals_array()) == len(pts)


def test_the_air_inside_a_circular_field_of_view_is_not_body() -> None:
    """A reconstruction circle smaller than the image (padding outside it) encloses the air around the patient:
    that ring is bordered more by padding than by the body, so it stays outside (the volume is the body's)."""
    ct, aff = body_ct(3.0)
    idx = np.indices(ct.shape, dtype=np.float64)
    x, y = aff[0, 0] * idx[0] + aff[0, 3], aff[1, 1] * idx[1] + aff[1, 3]
    ct[x**2 + y**2 > 97.0**2] = -3024.0  # the circle cuts the body's sides (x = +-90 mm) only a little
    body = body_outline(ct, aff, points=300)
    assert body is not None
    inside_fov = np.pi * A_MM * B_MM * 60.0  # about: the ellipse barely leaves the circle
    assert body.volume_mm3 == pytest.approx(inside_fov, rel=0.04)
    assert np.all(np.abs(ellipse_radius(body.points_array()) - 1.0) * B_MM < 3.0 + 1e-6)


def test_body_mask_on_the_real_ct_is_scipys_binary_morphology(example_ct: Path) -> None:
    """The fast body mask (minimum/maximum filters, one labelling pass for the slice holes) is exactly the
    textbook one: scipy's binary opening, largest component, binary dilation and per-slice fill_holes."""
    from scipy import ndimage

    from ctpassport.passport.build import body_mask

    img = nib.load(example_ct)
    sub, aff = body_grid(np.asanyarray(img.dataobj), img.affine)
    tissue = sub > -300
    cube = np.ones((3, 3, 3), dtype=bool)
    lab, _ = ndimage.label(ndimage.binary_opening(tissue, structure=cube), structure=cube)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    kept = tissue & ndimage.binary_dilation(lab == np.argmax(sizes), structure=cube)
    axis = int(np.argmax(np.abs(aff[2, :3])))
    plane = np.zeros((3, 3, 3), dtype=bool)
    index: list = [slice(None)] * 3
    index[axis] = 1
    plane[tuple(index)] = ndimage.generate_binary_structure(2, 1)
    want = ndimage.binary_fill_holes(kept, structure=plane)
    got = body_mask(sub, aff)
    assert np.array_equal(got, want)
    assert (got & ~tissue).any() and (tissue & ~got).any()  # gas inside filled; the table's voxels left out


def test_show_draws_the_body_outline(tmp_path: Path) -> None:
    """`show` draws a passport's skin points (faint, behind the organs) in the PNG and names them in the page."""
    from ctpassport.passport.show import render_html, render_png

    ct, aff = body_ct(3.0)
    labels = np.zeros(ct.shape, dtype=np.uint8)
    labels[20:30, 25:35, 5:15] = 5
    p = build_passport(labels, aff, ct=ct, body=True)
    page = render_html(p, tmp_path / "p.html").read_text(encoding="utf-8")
    assert "body outline (skin)" in page
    plain = render_html(build_passport(labels, aff, ct=ct), tmp_path / "q.html").read_text(encoding="utf-8")
    assert "body outline (skin)" not in plain
    png = render_png(p, tmp_path / "p.png", dpi=20)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_body_outline_json_is_one_line_and_id_clashes_are_refused(tmp_path: Path) -> None:
    """Saved passports keep one line per organ and one for the body outline (not thousands of indented
    numbers); a label 1000 (the outline's id) gets no outline, and a file holding both is refused."""
    from ctpassport.passport.schema import load_passport, save_passport

    ct, aff = body_ct(3.0)
    labels = np.zeros(ct.shape, dtype=np.uint8)
    labels[20:30, 25:35, 5:15] = 5
    p = build_passport(labels, aff, ct=ct, body=True, normals=True)
    text = passport_json(p)
    body_lines = [line for line in text.splitlines() if line.lstrip().startswith('"body"')]
    without = passport_json(p.model_copy(update={"body": None}))
    assert len(body_lines) == 1 and len(text.splitlines()) == len(without.splitlines())  # the outline: one line
    path = save_passport(p, tmp_path / "p.json")
    assert load_passport(path).body == p.body
    clash = np.where(labels > 0, 1000, 0).astype(np.uint16)
    q = build_passport(clash, aff, ct=ct, body=True)
    assert q.body is None and any("1000 is the body outline's id" in w for w in q.warnings)
    raw = json.loads(passport_json(q))
    raw["body"] = json.loads(p.body.model_dump_json())
    with pytest.raises(InputError, match="organ id 1000 is the body outline's"):
        validate_passport(raw, "clash.json")
    thin = np.full(ct.shape, -1000.0, dtype=np.float32)
    thin[10:40, 10:40, 5:7] = 40.0  # two voxels thick: the opening removes it
    t = build_passport(labels, aff, ct=thin, body=True)
    assert t.body is None and any("thicker than two voxels" in w for w in t.warnings)
