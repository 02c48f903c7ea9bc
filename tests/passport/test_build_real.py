"""Passports of the real shared segmentations equal a direct numpy computation.

Tolerances: centroids 1e-9 mm, covariances 1e-7 mm^2 relative (exact integer sums in both); boundary points
are voxel centres rounded to 0.001 mm, so they are matched to voxels within 0.002 mm.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctpassport.model.classes import TOTAL_CLASSES
from ctpassport.passport.build import passport_from_file
from ctpassport.passport.schema import Passport


@pytest.fixture(scope="module")
def seg(ct_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(ct_dir / "example_seg_fast.nii.gz"))
    return np.asanyarray(img.dataobj), img.affine


@pytest.fixture(scope="module")
def passport(ct_dir: Path) -> Passport:
    return passport_from_file(ct_dir / "example_seg_fast.nii.gz", ct_path=ct_dir / "example_ct_sm.nii.gz")


def _world(affine: np.ndarray, vox: np.ndarray) -> np.ndarray:
    return vox @ affine[:3, :3].T + affine[:3, 3]


def test_every_label_present_once(passport: Passport, seg: tuple[np.ndarray, np.ndarray]) -> None:
    labels, _ = seg
    present = sorted(int(v) for v in np.unique(labels) if v)
    assert [o.id for o in passport.organs] == present
    assert len(present) == 40
    for o in passport.organs:
        assert o.name == TOTAL_CLASSES[o.id]


def test_moments_equal_direct_numpy(passport: Passport, seg: tuple[np.ndarray, np.ndarray]) -> None:
    labels, affine = seg
    vox_vol = abs(np.linalg.det(affine[:3, :3]))
    for o in passport.organs:
        pts = _world(affine, np.argwhere(labels == o.id).astype(np.float64))
        assert o.voxel_count == len(pts)
        assert o.volume_mm3 == pytest.approx(len(pts) * vox_vol, rel=1e-12)
        np.testing.assert_allclose(o.centroid_mm, pts.mean(axis=0), rtol=0, atol=1e-9)
        if len(pts) > 1:
            cov = np.cov(pts.T)
            np.testing.assert_allclose(o.covariance_mm2, cov, rtol=1e-7, atol=1e-7 * np.abs(cov).max())
        np.testing.assert_allclose(o.bbox_mm[0], pts.min(axis=0), atol=1e-9)
        np.testing.assert_allclose(o.bbox_mm[1], pts.max(axis=0), atol=1e-9)


def test_eigen_decomposition(passport: Passport) -> None:
    for o in passport.organs:
        cov = np.asarray(o.covariance_mm2)
        lam = np.asarray(o.eigenvalues_mm2)
        vec = np.asarray(o.eigenvectors)
        assert lam[0] >= lam[1] >= lam[2] >= 0
        np.testing.assert_allclose(vec @ vec.T, np.eye(3), atol=1e-9)
        for value, v in zip(lam, vec):
            np.testing.assert_allclose(cov @ v, value * v, atol=1e-6 * max(lam[0], 1.0))
            assert v[np.argmax(np.abs(v))] > 0  # the documented sign convention


def test_boundary_points_lie_on_the_surface(passport: Passport, seg: tuple[np.ndarray, np.ndarray]) -> None:
    labels, affine = seg
    inv = np.linalg.inv(affine)
    shape = np.array(labels.shape)
    for o in passport.organs:
        pts = np.asarray(o.boundary_points_mm)
        assert 0 < len(pts) <= passport.points_per_organ
        vox = pts @ inv[:3, :3].T + inv[:3, 3]
        idx = np.rint(vox).astype(int)
        assert np.abs(vox - idx).max() < 0.002 / 3.0 + 1e-9  # voxel centres (rounded to 0.001 mm)
        assert len({tuple(v) for v in idx}) == len(idx)  # no duplicates
        assert np.all(labels[tuple(idx.T)] == o.id)  # inside the organ
        has_other = np.zeros(len(idx), dtype=bool)
        for ax in range(3):
            for step in (-1, 1):
                nb = idx.copy()
                nb[:, ax] += step
                ok = (nb[:, ax] >= 0) & (nb[:, ax] < shape[ax])  # the image border is not a surface
                has_other[ok] |= labels[tuple(nb[ok].T)] != o.id
        assert has_other.all(), f"{o.name}: points without a neighbour outside the organ"


def test_points_cover_small_organs_completely(passport: Passport, seg: tuple[np.ndarray, np.ndarray]) -> None:
    """An organ with fewer surface voxels than requested points gets all of them."""
    from scipy import ndimage

    labels, _ = seg
    for o in passport.organs:
        m = labels == o.id
        inner = ndimage.binary_erosion(m, border_value=1)  # border_value=1: the image border is no surface
        n_surface = int((m & ~inner).sum())
        assert len(o.boundary_points_mm) == min(n_surface, passport.points_per_organ)


def test_truncated_means_touching_the_outer_layer(passport: Passport, seg: tuple[np.ndarray, np.ndarray]) -> None:
    labels, _ = seg
    border = np.ones(labels.shape, dtype=bool)
    border[1:-1, 1:-1, 1:-1] = False
    on_border = {int(v) for v in np.unique(labels[border])}
    for o in passport.organs:
        assert o.truncated == (o.id in on_border)
    assert any(o.truncated for o in passport.organs) and not all(o.truncated for o in passport.organs)


def test_hu_statistics(passport: Passport, seg: tuple[np.ndarray, np.ndarray], ct_dir: Path) -> None:
    labels, _ = seg
    ct = np.asanyarray(nib.load(str(ct_dir / "example_ct_sm.nii.gz")).dataobj).astype(np.float64)
    for o in passport.organs:
        vals = ct[labels == o.id]
        assert o.hu_mean == pytest.approx(vals.mean(), abs=1e-6)
        assert o.hu_std == pytest.approx(vals.std(), abs=1e-6)
    liver = passport.organ("liver")
    assert liver is not None and 20 < liver.hu_mean < 200  # soft tissue, a sanity check on the units


def test_header(passport: Passport, ct_dir: Path) -> None:
    import hashlib

    seg_path = ct_dir / "example_seg_fast.nii.gz"
    assert passport.source.sha256 == hashlib.sha256(seg_path.read_bytes()).hexdigest()
    assert passport.source.ct_sha256 == hashlib.sha256((ct_dir / "example_ct_sm.nii.gz").read_bytes()).hexdigest()
    assert passport.grid.kind == "output"
    assert passport.grid.shape == (122, 101, 30)
    assert passport.grid.spacing_mm == pytest.approx((3.0, 3.0, 3.0))
    assert passport.grid.orientation == ("R", "A", "S")
    assert passport.coordinate_frame == "RAS+ world mm"
    assert {"read", "hash", "passport_build"} <= set(passport.timings)
    assert passport.schema_version and passport.ctpassport_version and passport.created
