"""Public API: results saved and loaded, read back by SimpleITK and applied identically, warps and points."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctpassport.errors import InputError, OutputExistsError
from ctpassport.io.atomic import OUTPUT_MARKER
from ctpassport.io.nifti import Image3D
from ctpassport.passport.build import build_passport
from ctpassport.register import load_transform, register_passports, register_points
from ctpassport.register.itkio import array_to_sitk, sitk_to_array
from ctpassport.register.synthetic import random_motion
from ctpassport.register.transform import GridSpec, RigidTransform
from ctpassport.register.warp import resample

sitk = pytest.importorskip("SimpleITK")


@pytest.fixture(scope="module")
def pair(scene):
    labels, aff = scene
    g = GridSpec(labels.shape, aff)
    motion = random_motion(
        g,
        np.random.default_rng(11),
        amplitude_mm=4.0,
        mask=labels > 0,
        max_angle_deg=4.0,
        max_translation_mm=6.0,
    )
    moving = resample(labels, aff, motion.pullback, g, labels=True)
    fp = build_passport(labels, aff)
    mp = build_passport(moving, aff, seed=1)
    return labels, moving, aff, fp, mp, register_passports(fp, mp, "deformable")


def _image(data: np.ndarray, aff: np.ndarray) -> Image3D:
    import nibabel as nib

    return Image3D(data=data, affine=aff, header=nib.Nifti1Header())


def test_save_and_load_round_trip(pair, tmp_path) -> None:
    labels, moving, aff, fp, mp, res = pair
    out = res.save(tmp_path / "reg")
    assert sorted(p.name for p in out.iterdir()) == [
        OUTPUT_MARKER,
        "displacement.nii.gz",
        "registration.json",
        "transform.h5",
    ]
    summary = json.loads((out / "registration.json").read_text())
    assert summary["convention"]["direction"].startswith("fixed_to_moving")
    assert summary["tier"] == "deformable" and summary["rigid"]["organs"]
    assert "timings_s" in summary and summary["deformable"]["pairs"] > 0
    back = load_transform(out)
    pts = GridSpec(labels.shape, aff).index_to_world(np.argwhere(labels > 0)[::7].astype(float))
    np.testing.assert_allclose(back.transform_points(pts), res.transform_points(pts), atol=1e-9)
    assert back.grid is not None and back.grid.same_as(res.grid)
    with pytest.raises(OutputExistsError):
        res.save(out)
    res.save(out, force=True)


def test_transform_read_by_simpleitk_resamples_identically(pair, tmp_path) -> None:
    """sitk.ReadTransform(transform.h5) + sitk.Resample gives our warp (linear image and nearest labels)."""
    labels, moving, aff, fp, mp, res = pair
    out = res.save(tmp_path / "reg")
    tx = sitk.ReadTransform(str(out / "transform.h5"))
    g = GridSpec(labels.shape, aff)
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter

    img = gaussian_filter(rng.normal(size=labels.shape), 2).astype(np.float32) * 100
    ours = res.warp_image(_image(img, aff), g).data
    ref = array_to_sitk(np.zeros(labels.shape, np.float32), g)
    theirs = sitk_to_array(sitk.Resample(array_to_sitk(img, g), ref, tx, sitk.sitkLinear, float(img.min())))
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    ours_l = res.warp_image(_image(moving, aff), g, labels=True).data
    theirs_l = sitk_to_array(sitk.Resample(array_to_sitk(moving, g), ref, tx, sitk.sitkNearestNeighbor, 0))
    assert np.mean(ours_l != theirs_l) < 1e-3  # ties at exactly half a voxel may round differently


def test_points_and_images_agree(pair) -> None:
    """Warping a 'coordinate image' (value = moving-space x, y, z) gives, at each fixed voxel, T(x) itself."""
    labels, moving, aff, fp, mp, res = pair
    g = GridSpec(labels.shape, aff)
    # a larger moving grid so that T(x) stays inside it
    big = np.eye(4)
    big[:3, :3] = np.diag([4.0, 4.0, 4.0])
    big[:3, 3] = g.index_to_world(np.zeros(3)) - 40.0
    shape = tuple(int(s) + 20 for s in labels.shape)
    mg = GridSpec(shape, big)
    coords = mg.slab_world(0, shape[0]).reshape(*shape, 3)
    inner = g.index_to_world(np.argwhere(np.ones(labels.shape, bool)).astype(float))
    mapped = res.transform_points(inner).reshape(*labels.shape, 3)
    for c in range(3):
        warped = res.warp_image(_image(coords[..., c].astype(np.float64), big), g).data
        np.testing.assert_allclose(warped, mapped[..., c], atol=2e-3)


def test_label_warp_keeps_the_label_set(pair) -> None:
    labels, moving, aff, fp, mp, res = pair
    out = res.warp_image(_image(moving, aff), None, labels=True)
    assert out.data.dtype == moving.dtype
    assert set(np.unique(out.data)) <= set(np.unique(moving)) | {0}
    lin = res.warp_image(_image(moving.astype(np.float32), aff))
    assert len(np.unique(lin.data)) > len(np.unique(moving))  # linear would invent values


def test_register_points_rigid_exact_and_deformable() -> None:
    rng = np.random.default_rng(3)
    f = rng.uniform(-80, 80, size=(60, 3))
    truth = RigidTransform.from_euler((8, -5, 12), (10, -4, 6))
    res = register_points(f, truth.apply(f), "rigid")
    np.testing.assert_allclose(res.rotation, truth.rotation, atol=1e-9)
    np.testing.assert_allclose(res.translation, truth.translation, atol=1e-9)
    m = truth.apply(f + 3.0 * np.sin(f[:, [2, 0, 1]] / 35.0))
    d = register_points(f, m, "deformable")
    assert np.linalg.norm(d.transform_points(f) - m, axis=1).mean() < 0.5
    assert np.linalg.norm(res.transform_points(f) - m, axis=1).mean() > 1.0


def test_load_errors(tmp_path) -> None:
    with pytest.raises(InputError, match="no such"):
        load_transform(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="transform.h5"):
        load_transform(tmp_path / "empty")
    f = np.random.default_rng(0).uniform(-50, 50, size=(10, 3))
    out = register_points(f, f + 1.0, "rigid").save(tmp_path / "reg")
    (out / "registration.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="registration.json: holds a JSON list, not a registration summary"):
        load_transform(out)


def test_warp_is_independent_of_the_moving_image_orientation(pair) -> None:
    """The same moving labels stored LPS-flipped and axis-permuted (another affine) warp to the same result."""
    labels, moving, aff, fp, mp, res = pair
    a = res.warp_image(_image(moving, aff), None, labels=True).data
    # flip i and j, then swap the first two axes
    flipped = moving[::-1, ::-1, :]
    faff = aff.copy()
    faff[:3, 0] = -aff[:3, 0]
    faff[:3, 1] = -aff[:3, 1]
    faff[:3, 3] = aff[:3, 3] + aff[:3, 0] * (moving.shape[0] - 1) + aff[:3, 1] * (moving.shape[1] - 1)
    perm = np.ascontiguousarray(flipped.transpose(1, 0, 2))
    paff = faff.copy()
    paff[:3, 0], paff[:3, 1] = faff[:3, 1], faff[:3, 0].copy()
    b = res.warp_image(_image(perm, paff), None, labels=True).data
    assert np.mean(a != b) < 1e-3


def test_sheared_fixed_grid_gets_an_orthogonal_field_that_itk_reads(pair, tmp_path) -> None:
    """A gantry-tilted fixed scan (sheared affine): the field goes on an orthogonal grid covering it, which
    SimpleITK reads to the same transform; warps land on the fixed scan's own (sheared) grid."""
    labels, moving, aff, fp, mp, _ = pair
    shear = np.eye(4)
    shear[2, 1] = np.tan(np.radians(15.0))  # z moves with y, as with a tilted gantry
    saff = shear @ aff
    fixed_grid = GridSpec(labels.shape, saff)
    assert fixed_grid.sheared and not GridSpec(labels.shape, aff).sheared
    res = register_passports(build_passport(labels, saff), mp, "deformable")
    assert not res.grid.sheared and res.fixed_grid.same_as(fixed_grid)
    # the field grid covers every fixed voxel
    corners = fixed_grid.index_to_world(np.array([[i, j, k] for i in (0, labels.shape[0] - 1)
                                                  for j in (0, labels.shape[1] - 1)
                                                  for k in (0, labels.shape[2] - 1)], dtype=float))
    assert res.grid.contains(corners).all()
    out = res.save(tmp_path / "reg")
    back = load_transform(out)
    assert back.fixed_grid.same_as(fixed_grid) and back.grid.same_as(res.grid)
    pts = fixed_grid.index_to_world(np.argwhere(labels > 0)[::11].astype(float))
    want = res.transform_points(pts)
    field = sitk.DisplacementFieldTransform(sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64))
    h5 = sitk.ReadTransform(str(out / "transform.h5"))
    flip = np.array([-1.0, -1.0, 1.0])
    for tx in (field, h5):
        got = np.array([tx.TransformPoint((p * flip).tolist()) for p in pts]) * flip
        np.testing.assert_allclose(got, want, atol=1e-3)
    warped = back.warp_image(_image(moving, aff), labels=True)
    assert warped.data.shape == labels.shape and np.allclose(warped.affine, saff)


def test_warp_defaults_to_the_fixed_images_grid_not_the_coarser_field_grid(tmp_path) -> None:
    fine = GridSpec((90, 80, 70), np.diag([-1.0, -1.0, 1.5, 1.0]) + np.array([[0, 0, 0, 40], [0, 0, 0, 30],
                                                                              [0, 0, 0, -50], [0, 0, 0, 0]]))
    f = np.random.default_rng(2).uniform(-30, 30, size=(40, 3)) + fine.index_to_world(np.array([[45, 40, 35]]))
    res = register_points(f, f + [2.0, -1.0, 0.5], "deformable", grid=fine)
    assert res.grid.spacing.min() > 2.5  # the field is stored at about 3 mm
    back = load_transform(res.save(tmp_path / "reg"))
    assert back.fixed_grid.same_as(fine) and back.grid.same_as(res.grid)
    img = Image3D(data=np.zeros(fine.shape, np.int16), affine=fine.affine, header=None)  # type: ignore[arg-type]
    warped = back.warp_image(img, labels=True)
    assert warped.data.shape == fine.shape and np.allclose(warped.affine, fine.affine)


def test_a_fine_sheared_grid_gets_a_coarse_field_grid() -> None:
    """A gantry-tilted 0.8 mm CT: the field goes on an orthogonal grid covering it, coarsened to about 3 mm like
    any fine grid (not a full-resolution field of several GB); 5 mm slices keep their spacing."""
    from ctpassport.register.api import field_grid_for

    aff = np.diag([-0.8, -0.8, 5.0, 1.0])
    aff[2, 1] = 5.0 * np.tan(np.radians(20.0)) / 6.25  # z moves with j: a 20-degree-ish tilt
    fine = GridSpec((512, 512, 60), aff)
    assert fine.sheared
    g = field_grid_for(fine)
    assert not g.sheared
    assert np.all(g.spacing[:2] > 2.25) and g.spacing[2] == pytest.approx(5.0, abs=0.3)
    assert np.prod(g.shape) < np.prod(fine.shape) / 10
    n = np.array(fine.shape) - 1
    corners = fine.index_to_world(np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])],
                                           dtype=float))
    assert g.contains(corners).all()
