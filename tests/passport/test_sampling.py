"""Boundary point sampling: deterministic per seed, spread over the surface (not clustered)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import cKDTree

from ctpassport.passport.build import build_passport, sample_surface


def _ellipsoid(shape: tuple[int, int, int], semi: tuple[float, float, float]) -> np.ndarray:
    g = np.indices(shape, dtype=np.float64)
    c = [(n - 1) / 2.0 for n in shape]
    return (sum(((g[a] - c[a]) / semi[a]) ** 2 for a in range(3)) <= 1.0).astype(np.uint8)


def test_same_seed_same_points_other_seed_other_points() -> None:
    labels = _ellipsoid((60, 50, 40), (27, 20, 15)) * 2
    a = build_passport(labels, np.eye(4), seed=0, points=300).organs[0].boundary_points_mm
    b = build_passport(labels, np.eye(4), seed=0, points=300).organs[0].boundary_points_mm
    c = build_passport(labels, np.eye(4), seed=1, points=300).organs[0].boundary_points_mm
    assert a == b
    assert len(a) == len(c) == 300
    assert a != c


def test_points_requested_and_zero() -> None:
    labels = _ellipsoid((40, 40, 40), (15, 15, 15))
    p = build_passport(labels, np.eye(4), points=0)
    assert p.organs[0].boundary_points_mm == [] and p.points_per_organ == 0
    p = build_passport(labels, np.eye(4), points=123)
    assert len(p.organs[0].boundary_points_mm) == 123


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 2.5)])
def test_points_are_spread_not_clustered(spacing: tuple[float, float, float]) -> None:
    """Against n independent random surface voxels (the clustered baseline), the stratified sample covers
    the surface better (smaller worst and 95th-percentile distance from a surface voxel to its nearest
    point) and has fewer near-duplicates (nearest-neighbour distances)."""
    semi_mm = np.array([40.0, 30.0, 22.0])
    shape = tuple(int(2 * s / sp) + 5 for s, sp in zip(semi_mm, spacing))
    g = np.indices(shape, dtype=np.float64)
    c = [(n - 1) / 2.0 for n in shape]
    labels = (sum(((g[a] - c[a]) * spacing[a] / semi_mm[a]) ** 2 for a in range(3)) <= 1.0).astype(np.uint8)
    aff = np.diag([*spacing, 1.0])
    n = 400
    pts = np.asarray(build_passport(labels, aff, points=n).organs[0].boundary_points_mm)
    m = labels.astype(bool)
    surf = np.argwhere(m & ~ndimage.binary_erosion(m)) * np.asarray(spacing)
    rng = np.random.default_rng(0)
    cover_s = cKDTree(pts).query(surf)[0]
    nn_s = cKDTree(pts).query(pts, k=2)[0][:, 1]
    worst_r, p95_r, nn5_r = [], [], []
    for _ in range(5):
        rnd = surf[rng.choice(len(surf), n, replace=False)]
        d = cKDTree(rnd).query(surf)[0]
        worst_r.append(d.max())
        p95_r.append(np.percentile(d, 95))
        nn5_r.append(np.percentile(cKDTree(rnd).query(rnd, k=2)[0][:, 1], 5))
    assert cover_s.max() < 0.85 * np.mean(worst_r)
    assert np.percentile(cover_s, 95) < 0.85 * np.mean(p95_r)
    assert np.percentile(nn_s, 5) > 1.2 * np.mean(nn5_r)
    # Every octant of the ellipsoid gets its share of the points (area-proportional, so about n/8).
    octant = ((pts - pts.mean(axis=0)) > 0) @ np.array([1, 2, 4])
    counts = np.bincount(octant, minlength=8)
    assert counts.min() > 0.6 * n / 8 and counts.max() < 1.4 * n / 8


def test_sample_surface_depends_only_on_the_voxel_set() -> None:
    rng = np.random.default_rng(1)
    pts = np.unique(rng.integers(0, 60, size=(3000, 3)), axis=0)
    perm = rng.permutation(len(pts))
    a = pts[sample_surface([pts[:, 0], pts[:, 1], pts[:, 2]], np.ones(3), 200, 7)]
    q = pts[perm]
    b = q[sample_surface([q[:, 0], q[:, 1], q[:, 2]], np.ones(3), 200, 7)]
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a, axis=0)) == 200
