"""Helpers of the registration tests: small synthetic scenes (analytic shapes) and hand-made passports."""

from __future__ import annotations

import numpy as np

from ctpassport.model.classes import NAME_TO_ID
from ctpassport.passport.schema import Grid, Organ, Passport

#: Organ names used by the synthetic scenes (their stability weights differ on purpose).
SCENE_NAMES = [
    "vertebrae_L1",
    "vertebrae_L2",
    "liver",
    "spleen",
    "kidney_left",
    "kidney_right",
    "rib_left_8",
    "rib_right_8",
    "pancreas",
    "stomach",
    "aorta",
    "lung_lower_lobe_left",
    "gallbladder",
    "sacrum",
]


def ellipsoid_scene(
    shape: tuple[int, int, int] = (44, 40, 36),
    spacing: float = 4.0,
    n: int = 12,
    seed: int = 0,
    affine: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping random ellipsoids (TotalSegmentator ids of :data:`SCENE_NAMES`) inside the field of view.

    Returns ``(labels uint8 [i, j, k], affine voxel -> RAS+ mm)``; the default grid is axis-aligned RAS.
    """
    rng = np.random.default_rng(seed)
    aff = (
        np.diag([spacing, spacing, spacing, 1.0]) if affine is None else np.asarray(affine, dtype=np.float64)
    )
    if affine is None:
        aff[:3, 3] = [-80.0, -60.0, 30.0]
    idx = (
        np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3).astype(float)
    )
    world = idx @ aff[:3, :3].T + aff[:3, 3]
    lab = np.zeros(int(np.prod(shape)), dtype=np.uint8)
    lo = world.min(0) + 14.0
    hi = world.max(0) - 14.0
    placed = 0
    for _ in range(400):
        if placed >= n:
            break
        c = rng.uniform(lo, hi)
        r = rng.uniform([10, 8, 6], [22, 16, 12])
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        d = ((((world - c) @ q) / r) ** 2).sum(1) <= 1.0
        if d.sum() < 40 or (lab[d] > 0).any():
            continue
        lab[d] = NAME_TO_ID[SCENE_NAMES[placed]]
        placed += 1
    return lab.reshape(shape), aff


def make_organ(
    oid: int, centroid: np.ndarray, cov: np.ndarray, points: np.ndarray | None = None, truncated: bool = False
) -> Organ:
    """An :class:`Organ` from a centroid and covariance (eigen-decomposition in the schema's convention)."""
    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1]
    w, v = w[order], v[:, order].T
    for i in range(3):
        if v[i][np.argmax(np.abs(v[i]))] < 0:
            v[i] = -v[i]
    pts = np.zeros((0, 3)) if points is None else points
    lo = (centroid - 10).tolist()
    hi = (centroid + 10).tolist()
    from ctpassport.model.classes import TOTAL_CLASSES

    return Organ(
        id=oid,
        name=TOTAL_CLASSES.get(oid),
        voxel_count=100,
        volume_mm3=100.0,
        centroid_mm=tuple(centroid.tolist()),
        covariance_mm2=tuple(map(tuple, cov.tolist())),
        eigenvalues_mm2=tuple(w.tolist()),
        eigenvectors=tuple(map(tuple, v.tolist())),
        bbox_mm=(tuple(lo), tuple(hi)),
        boundary_points_mm=[tuple(p) for p in pts.tolist()],
        truncated=truncated,
    )


def make_passport(
    organs: list[Organ], shape: tuple[int, int, int] = (100, 100, 100), affine: np.ndarray | None = None
) -> Passport:
    aff = np.diag([3.0, 3.0, 3.0, 1.0]) if affine is None else affine
    if affine is None:
        aff[:3, 3] = -150.0
    return Passport(
        grid=Grid(
            kind="output",
            shape=shape,
            spacing_mm=(3.0, 3.0, 3.0),
            affine=tuple(map(tuple, aff.tolist())),
            orientation=("R", "A", "S"),
        ),
        organs=organs,
    )
