"""Synthetic label maps with analytic answers, under RAS, LPS and oblique affines.

* a ball of radius r (mm): volume 4/3 pi r^3 (voxelisation error < 1.5 % at r = 12 voxels), centroid at
  its centre (< 0.01 mm: the voxelised ball is symmetric about its centre voxel);
* a solid ellipsoid with semi-axes a > b > c: covariance eigenvalues a^2/5, b^2/5, c^2/5 (ratios within
  3 %), eigenvectors along its axes (within 1 degree), whatever the grid's orientation.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ctpassport.passport.build import build_passport


def rigid(rx: float, ry: float, rz: float, t: tuple[float, float, float]) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = Rotation.from_euler("xyz", [rx, ry, rz], degrees=True).as_matrix()
    m[:3, 3] = t
    return m


def grid_affines(spacing: tuple[float, float, float]) -> dict[str, np.ndarray]:
    """Voxel -> RAS+ affines of one grid, in several orientations (origin somewhere in the world)."""
    ras = np.diag([*spacing, 1.0])
    ras[:3, 3] = (-40.0, 25.0, 110.0)
    lps = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS storage: +i goes Left, +j Posterior
    lps[:3, 3] = (40.0, -25.0, 110.0)
    oblique = rigid(17.0, -29.0, 41.0, (5.0, -7.0, 30.0)) @ ras
    return {"RAS": ras, "LPS": lps, "oblique": oblique}


def _ball(n: int, r_vox: float, centre: tuple[float, float, float]) -> np.ndarray:
    g = np.indices((n, n, n), dtype=np.float64)
    d2 = sum((g[a] - centre[a]) ** 2 for a in range(3))
    return (d2 <= r_vox**2).astype(np.uint8)


@pytest.mark.parametrize("orient", ["RAS", "LPS", "oblique"])
def test_ball_volume_and_centroid(orient: str) -> None:
    sp = 1.5
    labels = _ball(40, 12.0, (19.0, 20.0, 18.0)) * 7
    aff = grid_affines((sp, sp, sp))[orient]
    p = build_passport(labels, aff)
    (o,) = p.organs
    r_mm = 12.0 * sp
    assert o.id == 7 and o.name == "pancreas"
    assert o.volume_mm3 == pytest.approx(4.0 / 3.0 * np.pi * r_mm**3, rel=0.015)
    centre = aff[:3, :3] @ np.array([19.0, 20.0, 18.0]) + aff[:3, 3]
    np.testing.assert_allclose(o.centroid_mm, centre, atol=0.01)
    # A ball's covariance is isotropic: r^2 / 5 on every axis.
    assert np.asarray(o.eigenvalues_mm2) == pytest.approx([r_mm**2 / 5] * 3, rel=0.03)
    assert not o.truncated


def _ellipsoid_world(aff: np.ndarray, shape: tuple[int, int, int], centre: np.ndarray, axes: np.ndarray,
                     semi: np.ndarray) -> np.ndarray:
    """Rasterise a world-space ellipsoid (rows of ``axes`` = its unit axes) on the grid of ``aff``."""
    g = np.indices(shape, dtype=np.float64).reshape(3, -1).T
    w = g @ aff[:3, :3].T + aff[:3, 3] - centre
    u = w @ axes.T / semi
    return ((u**2).sum(axis=1) <= 1.0).reshape(shape).astype(np.uint8)


@pytest.mark.parametrize("orient", ["RAS", "LPS", "oblique"])
def test_ellipsoid_axes_and_eigenvalue_ratios(orient: str) -> None:
    aff = grid_affines((1.2, 1.0, 1.5))[orient]
    shape = (70, 80, 60)
    centre = aff[:3, :3] @ (np.array(shape) / 2.0) + aff[:3, 3]
    axes = Rotation.from_euler("zyx", [30.0, 20.0, -10.0], degrees=True).as_matrix().T  # rows: unit axes
    semi = np.array([30.0, 18.0, 10.0])
    labels = _ellipsoid_world(aff, shape, centre, axes, semi) * 5
    (o,) = build_passport(labels, aff).organs
    lam = np.asarray(o.eigenvalues_mm2)
    np.testing.assert_allclose(lam, semi**2 / 5.0, rtol=0.03)
    np.testing.assert_allclose(lam[0] / lam[1], (semi[0] / semi[1]) ** 2, rtol=0.03)
    np.testing.assert_allclose(lam[1] / lam[2], (semi[1] / semi[2]) ** 2, rtol=0.03)
    for v, a in zip(np.asarray(o.eigenvectors), axes):
        angle = np.degrees(np.arccos(min(1.0, abs(float(v @ a)))))
        assert angle < 1.0, f"axis off by {angle:.2f} degrees"
    np.testing.assert_allclose(o.centroid_mm, centre, atol=0.05)
    assert o.volume_mm3 == pytest.approx(4.0 / 3.0 * np.pi * semi.prod(), rel=0.02)


def test_orientations_give_the_same_passport() -> None:
    """The same anatomy stored RAS, flipped to LPS and transposed gives the same organs (world frame)."""
    from ctpassport.passport.synthetic import torso_labels

    labels, aff = torso_labels((67, 67, 118))
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [labels.shape[0] - 1, labels.shape[1] - 1]  # voxel (i', j') = (n-1-i, n-1-j)
    lps_labels = labels[::-1, ::-1, :]
    lps_aff = aff @ flip
    perm = np.eye(4)[[2, 0, 1, 3]].T  # stored axes (k, i, j)
    t_labels = np.ascontiguousarray(np.transpose(labels, (2, 0, 1)))
    t_aff = aff @ perm
    base = build_passport(labels, aff)
    for lab2, aff2 in ((lps_labels, lps_aff), (t_labels, t_aff)):
        other = build_passport(lab2, aff2)
        assert [o.id for o in other.organs] == [o.id for o in base.organs]
        for a, b in zip(base.organs, other.organs):
            assert a.voxel_count == b.voxel_count and a.truncated == b.truncated
            np.testing.assert_allclose(a.centroid_mm, b.centroid_mm, atol=1e-9)
            np.testing.assert_allclose(a.covariance_mm2, b.covariance_mm2, atol=1e-8)
            np.testing.assert_allclose(a.bbox_mm, b.bbox_mm, atol=1e-9)


def test_unknown_ids_keep_their_id_with_a_null_name() -> None:
    labels = np.zeros((20, 20, 20), dtype=np.uint16)
    labels[2:6, 2:6, 2:6] = 5
    labels[8:12, 8:12, 8:12] = 200
    labels[14:18, 14:18, 14:18] = 1000
    p = build_passport(labels, np.eye(4))
    assert [(o.id, o.name) for o in p.organs] == [(5, "liver"), (200, None), (1000, None)]


def test_huge_label_ids_are_supported() -> None:
    labels = np.zeros((10, 10, 10), dtype=np.int64)
    labels[1:3, 1:3, 1:3] = 70000
    labels[5:8, 5:8, 5:8] = 3
    labels[0, 0, 0] = 2**40
    p = build_passport(labels, np.eye(4))
    assert [(o.id, o.voxel_count) for o in p.organs] == [(3, 27), (70000, 8), (2**40, 1)]
    np.testing.assert_allclose(p.organ(70000).centroid_mm, (1.5, 1.5, 1.5))  # type: ignore[union-attr]
    one = p.organ(2**40)
    assert one is not None and one.truncated and np.allclose(one.covariance_mm2, 0)


def test_memory_layouts_give_identical_passports() -> None:
    from ctpassport.passport.synthetic import torso_labels

    labels, aff = torso_labels((67, 67, 118))
    c = build_passport(np.ascontiguousarray(labels), aff, seed=3)
    f = build_passport(np.asfortranarray(labels), aff, seed=3)
    big = np.zeros((labels.shape[0], 2 * labels.shape[1], labels.shape[2]), dtype=labels.dtype)
    big[:, ::2, :] = labels
    view = big[:, ::2, :]  # a strided, non-contiguous view of the same labels
    assert not (view.flags.c_contiguous or view.flags.f_contiguous)
    s = build_passport(view, aff, seed=3)
    for other in (f, s):
        for a, b in zip(c.organs, other.organs):
            assert a.boundary_points_mm == b.boundary_points_mm  # same points, same order
            np.testing.assert_allclose(a.centroid_mm, b.centroid_mm, atol=1e-9)


def test_bool_mask_and_big_endian_labels() -> None:
    m = _ball(20, 6.0, (10.0, 10.0, 10.0)).astype(bool)
    (o,) = build_passport(m, np.eye(4)).organs
    assert o.id == 1 and o.voxel_count == int(m.sum())
    be = (m.astype(">i2") * 3)
    (o3,) = build_passport(be, np.eye(4)).organs
    assert o3.id == 3 and o3.voxel_count == int(m.sum())


def test_empty_label_map_gives_an_empty_passport_and_a_warning() -> None:
    from ctpassport.passport.build import PassportWarning

    with pytest.warns(PassportWarning, match="empty"):
        p = build_passport(np.zeros((5, 6, 7), dtype=np.uint8), np.eye(4))
    assert p.organs == [] and p.warnings and "empty" in p.warnings[0]


@pytest.mark.parametrize("spacing", [(3.0, 3.0, 3.0), (1.5, 1.5, 2.0), (0.8, 0.8, 2.5)])
@pytest.mark.parametrize("orient", ["RAS", "LPS", "oblique"])
def test_boundary_normals_point_outward_on_a_ball(orient: str, spacing: tuple[float, float, float]) -> None:
    """A ball's outward normal at a surface point is the radial direction: the label-map estimate stays within
    13 degrees of it on average and 25 degrees at the 95th percentile (measured 6-12 and 13-21), in world
    coordinates whatever the grid's orientation, on isotropic, mildly and strongly anisotropic voxels."""
    aff = grid_affines(spacing)[orient]
    sp, r_mm = np.asarray(spacing), 30.0
    shape = tuple(int(2 * r_mm / v) + 6 for v in spacing)
    g = np.indices(shape, dtype=np.float64)
    d2 = sum(((g[a] - (shape[a] - 1) / 2) * sp[a]) ** 2 for a in range(3))
    p = build_passport((d2 <= r_mm**2).astype(np.uint8), aff, points=400, normals=True)
    o = p.organs[0]
    pts, nrm = np.asarray(o.boundary_points_mm), np.asarray(o.boundary_normals)
    assert pts.shape == nrm.shape == (400, 3)
    np.testing.assert_allclose(np.linalg.norm(nrm, axis=1), 1.0, atol=2e-3)
    radial = pts - np.asarray(o.centroid_mm)
    cos = np.einsum("ni,ni->n", radial / np.linalg.norm(radial, axis=1, keepdims=True), nrm)
    angle = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    assert angle.mean() < 13.0 and np.percentile(angle, 95) < 25.0


def test_boundary_normals_of_a_box_and_at_the_image_border() -> None:
    """On a box's flat faces (beyond the stencil's reach from its edges) the normal is exactly the face's outward axis, in world
    (RAS+) terms under an LPS affine; where the box touches the image border there are no points (the border
    is not a surface) and the normals next to it still point along the faces, not out of the image."""
    lab = np.zeros((20, 16, 12), dtype=np.uint8)
    lab[4:16, 3:13, 0:9] = 7  # touches the k = 0 border
    aff = np.diag([-2.0, -2.0, 3.0, 1.0])  # i -> Left, j -> Posterior, k -> Superior
    p = build_passport(lab, aff, points=10_000, normals=True)
    assert build_passport(lab, aff).organs[0].boundary_normals is None  # only when asked for
    o = p.organs[0]
    vox = np.rint(np.linalg.solve(aff[:3, :3], (np.asarray(o.boundary_points_mm) - aff[:3, 3]).T).T).astype(int)
    nrm = np.asarray(o.boundary_normals)
    expect = {(0, 4): (2.0, 0, 0), (0, 15): (-2.0, 0, 0), (1, 3): (0, 2.0, 0), (1, 12): (0, -2.0, 0),
              (2, 8): (0, 0, 3.0)}
    checked = 0
    for (ax, face), world in expect.items():
        others = [a for a in range(3) if a != ax]
        lo, hi = (4, 3, 0), (15, 12, 8)  # the box's first and last voxel per axis
        reach = (2, 2, 1)  # the stencil's reach on this grid (2 x 2 x 3 mm voxels: about 3 mm each way)
        on = (vox[:, ax] == face) & np.all([(vox[:, a] >= lo[a] + reach[a]) & (vox[:, a] <= hi[a] - reach[a])
                                            for a in others], axis=0)
        w = np.asarray(world, dtype=float)
        np.testing.assert_allclose(nrm[on], np.tile(w / np.linalg.norm(w), (int(on.sum()), 1)), atol=1e-3)
        checked += int(on.sum())
    assert checked > 100
    border = vox[:, 2] == 0  # side-face points on the image's first slice: no component out of the image
    assert border.sum() > 10 and np.all(np.abs(nrm[border][:, 2]) < 1e-3)
