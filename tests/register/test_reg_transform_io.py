"""Transform model, RAS <-> LPS conversion, ITK (.h5) and NIfTI field files read back by SimpleITK."""

from __future__ import annotations

import numpy as np
import pytest

from ctpassport.errors import InputError
from ctpassport.register.itkio import (
    FLIP,
    field_to_sitk,
    read_displacement_nifti,
    read_itk_transform,
    to_sitk,
    write_displacement_nifti,
    write_itk_transform,
)
from ctpassport.register.transform import (
    DisplacementField,
    GridSpec,
    RigidTransform,
    Transform,
    bounding_grid,
)

sitk = pytest.importorskip("SimpleITK")


def _oblique_grid() -> GridSpec:
    # permuted, flipped and rotated axes with anisotropic voxels: nothing axis-aligned about it
    r = RigidTransform.from_euler((12.0, -7.0, 25.0), (0, 0, 0)).rotation
    axes = r @ np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = axes @ np.diag([2.0, 2.5, 3.0])
    aff[:3, 3] = [30.0, -10.0, 5.0]
    return GridSpec((11, 13, 9), aff)


def _smooth_field(grid: GridSpec, seed: int = 0, scale: float = 6.0) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    d = gaussian_filter(rng.normal(size=(*grid.shape, 3)), (2, 2, 2, 0))
    return (d / np.abs(d).max() * scale).astype(np.float32)


def _sitk_points(tx, points_ras: np.ndarray) -> np.ndarray:
    return np.array(
        [FLIP @ np.asarray(tx.TransformPoint(tuple(float(v) for v in FLIP @ p))) for p in points_ras]
    )


def test_rigid_algebra() -> None:
    a = RigidTransform.from_euler((5, -8, 3), (1, 2, 3), center_mm=(10, 20, 30))
    b = RigidTransform.from_euler((-2, 4, 9), (-5, 0, 7))
    p = np.random.default_rng(0).normal(size=(20, 3)) * 50
    np.testing.assert_allclose(a.inverse().apply(a.apply(p)), p, atol=1e-10)
    np.testing.assert_allclose(a.compose(b).apply(p), a.apply(b.apply(p)), atol=1e-10)
    np.testing.assert_allclose(
        a.apply(np.asarray(a.translation * 0 + [10, 20, 30]))[0], [11, 22, 33], atol=1e-10
    )
    assert abs(np.linalg.det(a.rotation) - 1) < 1e-12


def test_composite_matches_simpleitk_on_an_oblique_grid() -> None:
    """Our T(x) = R(x + u(x)) + t equals SimpleITK's composite [rigid, field] after RAS<->LPS conversion,
    inside the field (trilinear), in its half-voxel border (edge clamp) and outside it (u = 0)."""
    g = _oblique_grid()
    t = Transform(RigidTransform.from_euler((6, -4, 9), (5, -3, 8)), DisplacementField(g, _smooth_field(g)))
    rng = np.random.default_rng(1)
    idx = rng.uniform(-2.0, np.asarray(g.shape) + 1.0, size=(400, 3))
    pts = g.index_to_world(idx)
    ours = t.apply(pts)
    theirs = _sitk_points(to_sitk(t), pts)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    outside = ~g.contains(pts)
    assert outside.sum() > 20  # the test covers points where u = 0
    np.testing.assert_allclose(ours[outside], t.rigid.apply(pts[outside]), atol=1e-9)


def test_lps_conversion_is_explicit() -> None:
    """A pure RAS translation of +10 mm along x (to the patient's right) is -10 mm along ITK's x (left)."""
    t = Transform(RigidTransform(np.eye(3), [10.0, 20.0, 30.0]))
    tx = to_sitk(t)
    assert np.allclose(tx.TransformPoint((0.0, 0.0, 0.0)), (-10.0, -20.0, 30.0))


def test_h5_round_trip_and_read_by_simpleitk(tmp_path) -> None:
    g = _oblique_grid()
    t = Transform(
        RigidTransform.from_euler((3, 2, -5), (4, 5, -6)), DisplacementField(g, _smooth_field(g, 2))
    )
    path = write_itk_transform(t, tmp_path / "t.h5")
    pts = g.index_to_world(np.random.default_rng(3).uniform(-1, np.asarray(g.shape), size=(200, 3)))
    back = read_itk_transform(path)
    np.testing.assert_allclose(back.apply(pts), t.apply(pts), atol=1e-9)
    assert back.field is not None and back.field.grid.same_as(g, tol=1e-9)
    raw = sitk.ReadTransform(str(path))  # what any ITK program sees
    np.testing.assert_allclose(_sitk_points(raw, pts), t.apply(pts), atol=1e-4)


def test_rigid_only_h5(tmp_path) -> None:
    t = Transform(RigidTransform.from_euler((30, 0, -10), (1, 2, 3)))
    back = read_itk_transform(write_itk_transform(t, tmp_path / "r.h5"))
    assert back.field is None
    np.testing.assert_allclose(back.rigid.matrix, t.rigid.matrix, atol=1e-12)


def test_composite_of_several_rigid_transforms_then_a_field(tmp_path) -> None:
    """An ITK composite of several linear transforms (e.g. an initial alignment and an optimised rigid), then a
    displacement field: read as SimpleITK applies it (last first), not only its last rigid part."""
    g = _oblique_grid()
    field = field_to_sitk(DisplacementField(g, _smooth_field(g, 6)))
    parts = [sitk.TranslationTransform(3, (10.0, 0.0, 0.0)),
             sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.05, 0.2, (0.0, 5.0, -2.0))]
    pts = g.index_to_world(np.random.default_rng(7).uniform(-1, np.asarray(g.shape), size=(100, 3)))
    for with_field in (False, True):
        path = tmp_path / f"two_rigid_{with_field}.h5"
        sitk.WriteTransform(sitk.CompositeTransform(parts + ([field] if with_field else [])), str(path))
        back = read_itk_transform(path)
        assert (back.field is not None) == with_field
        np.testing.assert_allclose(back.apply(pts), _sitk_points(sitk.ReadTransform(str(path)), pts), atol=1e-4)
    misplaced = tmp_path / "field_first.h5"
    sitk.WriteTransform(sitk.CompositeTransform([field, *parts]), str(misplaced))
    with pytest.raises(InputError, match="must come after the rigid transforms"):
        read_itk_transform(misplaced)
    two_fields = tmp_path / "two_fields.h5"
    sitk.WriteTransform(sitk.CompositeTransform([parts[0], field, field]), str(two_fields))
    with pytest.raises(InputError, match="2 displacement fields"):
        read_itk_transform(two_fields)


def test_nifti_field_is_the_whole_transform_in_itk_convention(tmp_path) -> None:
    g = _oblique_grid()
    t = Transform(
        RigidTransform.from_euler((4, 1, -2), (3, -2, 1)), DisplacementField(g, _smooth_field(g, 4))
    )
    path = write_displacement_nifti(t, g, tmp_path / "d.nii.gz")
    d, g2 = read_displacement_nifti(path)
    assert g2.same_as(g, tol=1e-4)
    np.testing.assert_allclose(d, t.displacement_on(g), atol=1e-4)
    # SimpleITK reads it as an LPS displacement field transform equal to T at the voxel centres
    img = sitk.ReadImage(str(path))
    assert img.GetNumberOfComponentsPerPixel() == 3
    dft = sitk.DisplacementFieldTransform(sitk.Cast(img, sitk.sitkVectorFloat64))
    vox = g.index_to_world(np.random.default_rng(5).integers(0, g.shape, size=(60, 3)).astype(float))
    np.testing.assert_allclose(_sitk_points(dft, vox), t.apply(vox), atol=1e-3)


def test_bad_transform_files(tmp_path) -> None:
    with pytest.raises(InputError, match="no such"):
        read_itk_transform(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(InputError, match="not a readable ITK transform"):
        read_itk_transform(junk)
    scaled = tmp_path / "scaled.tfm"
    sitk.WriteTransform(sitk.ScaleTransform(3, (2.0, 2.0, 2.0)), str(scaled))
    with pytest.raises(InputError):
        read_itk_transform(scaled)


def test_bounding_grid_covers_points() -> None:
    p = np.random.default_rng(0).uniform(-100, 100, size=(50, 3))
    g = bounding_grid(p, spacing_mm=3.0, margin_mm=10.0)
    assert g.contains(p).all()
    assert np.allclose(g.spacing, 3.0)
