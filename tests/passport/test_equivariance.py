"""Equivariance: the same label map placed in the world by ``T @ affine`` (T rigid) gives a passport moved by T.

Stated tolerances: centroids 1e-6 mm, covariances 1e-6 mm^2 (relative to their size), eigenvalues 1e-8
relative, principal axes within 1e-6 (as unit vectors, up to sign: an axis has no direction), boundary
points 0.002 mm (they are rounded to 0.001 mm), boundary normals rotated by R within 0.002 (also rounded). The point *selection* is the same voxels: sampling works in
the voxel frame, along the grid's nearest RAS+ axes, which rotations under 45 degrees keep (the random motions
here turn by at most 40 degrees). Storing the same grid another way (flipped, permuted axes) selects the same
world points.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ctpassport.passport.build import build_passport


def _rigid(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.eye(4)
    axis = rng.normal(size=3)
    t[:3, :3] = Rotation.from_rotvec(np.radians(rng.uniform(5, 40)) * axis / np.linalg.norm(axis)).as_matrix()
    t[:3, 3] = rng.uniform(-200, 200, 3)
    return t


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rigid_change_of_affine_moves_everything(ct_dir: Path, seed: int) -> None:
    img = nib.load(str(ct_dir / "example_seg_fast.nii.gz"))
    labels, aff = np.asanyarray(img.dataobj), img.affine
    t = _rigid(seed)
    rot = t[:3, :3]
    a = build_passport(labels, aff, points=200, normals=True)
    b = build_passport(labels, t @ aff, points=200, normals=True)
    assert [o.id for o in a.organs] == [o.id for o in b.organs]
    for oa, ob in zip(a.organs, b.organs):
        np.testing.assert_allclose(ob.centroid_mm, rot @ np.asarray(oa.centroid_mm) + t[:3, 3], atol=1e-6)
        ca = np.asarray(oa.covariance_mm2)
        np.testing.assert_allclose(ob.covariance_mm2, rot @ ca @ rot.T, atol=1e-6 * max(1.0, np.abs(ca).max()))
        np.testing.assert_allclose(ob.eigenvalues_mm2, oa.eigenvalues_mm2, rtol=1e-8, atol=1e-8)
        lam = np.asarray(oa.eigenvalues_mm2)
        for i, (va, vb) in enumerate(zip(np.asarray(oa.eigenvectors), np.asarray(ob.eigenvectors))):
            distinct = all(abs(lam[i] - lam[j]) > 1e-6 * max(lam[0], 1.0) for j in range(3) if j != i)
            if distinct:  # an eigenvector is defined (up to sign) only for a simple eigenvalue
                assert abs(abs(float((rot @ va) @ vb)) - 1.0) < 1e-6
        pa = np.asarray(oa.boundary_points_mm)
        pb = np.asarray(ob.boundary_points_mm)
        assert pa.shape == pb.shape
        np.testing.assert_allclose(pb, pa @ rot.T + t[:3, 3], atol=0.002)
        np.testing.assert_allclose(np.asarray(ob.boundary_normals), np.asarray(oa.boundary_normals) @ rot.T,
                                   atol=0.002)
        assert oa.truncated == ob.truncated and oa.voxel_count == ob.voxel_count


@pytest.mark.parametrize("flips,perm", [((0,), (0, 1, 2)), ((0, 1), (2, 1, 0)), ((1, 2), (1, 2, 0))])
def test_storage_of_the_grid_does_not_change_the_passport(ct_dir: Path, flips: tuple[int, ...],
                                                          perm: tuple[int, int, int]) -> None:
    """The same label map stored flipped and with permuted axes (affine changed to match: the same voxels in
    the world) gives the same passport: the same boundary points too, so self-registration is exact."""
    img = nib.load(str(ct_dir / "example_seg_fast.nii.gz"))
    labels, aff = np.asanyarray(img.dataobj), img.affine
    flip = np.eye(4)
    for a in flips:
        flip[a, a], flip[a, 3] = -1.0, labels.shape[a] - 1
    stored = np.flip(labels, flips).transpose(perm)
    aff2 = aff @ flip @ np.eye(4)[[*perm, 3]].T
    a = build_passport(labels, aff, points=200, normals=True)
    b = build_passport(np.ascontiguousarray(stored), aff2, points=200, normals=True)
    assert [o.id for o in a.organs] == [o.id for o in b.organs]
    for oa, ob in zip(a.organs, b.organs):
        np.testing.assert_allclose(ob.centroid_mm, oa.centroid_mm, atol=1e-6)
        assert oa.voxel_count == ob.voxel_count and oa.truncated == ob.truncated
        pa, pb = np.asarray(oa.boundary_points_mm), np.asarray(ob.boundary_points_mm)
        order_a, order_b = np.lexsort(pa.T), np.lexsort(pb.T)
        np.testing.assert_allclose(pb[order_b], pa[order_a], atol=0.002)
        np.testing.assert_allclose(np.asarray(ob.boundary_normals)[order_b], np.asarray(oa.boundary_normals)[order_a],
                                   atol=0.002)
