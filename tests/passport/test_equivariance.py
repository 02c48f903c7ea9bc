"""Equivariance: the same label map placed in the world by ``T @ affine`` (T rigid) gives a passport moved by T.

Stated tolerances: centroids 1e-6 mm, covariances 1e-6 mm^2 (relative to their size), eigenvalues 1e-8
relative, principal axes within 1e-6 (as unit vectors, up to sign: an axis has no direction), boundary
points 0.002 mm (they are rounded to 0.001 mm), boundary normals rotated by R within 0.002 (also rounded). The point *selection* is the same voxels: sampling works in
the voxel frame and never looks at the affine.
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
    t[:3, :3] = Rotation.random(random_state=seed).as_matrix()
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
