"""Registration quality measures: TRE, Dice, HD95, Jacobian folding and SDlogJ.

Units: mm for distances, voxel grids in array axis order with their affine (voxel -> RAS+ mm).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .transform import GridSpec


def tre_stats(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Target registration error ``|predicted - truth|`` (``(N, 3)`` world mm each, one frame for both): mean,
    median, p95, max (mm), n."""
    d = np.linalg.norm(np.asarray(predicted, dtype=np.float64) - np.asarray(truth, dtype=np.float64), axis=1)
    if d.size == 0:
        return {"n": 0}
    return {
        "n": int(d.size),
        "mean": float(d.mean()),
        "median": float(np.median(d)),
        "p95": float(np.percentile(d, 95)),
        "max": float(d.max()),
    }


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks on one grid (1.0 when both are empty)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.count_nonzero(a & b)) / s


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    return mask & ~binary_erosion(mask, border_value=0)


def hd95(a: np.ndarray, b: np.ndarray, spacing: Any) -> float:
    """95 % Hausdorff distance (mm) between masks ``a`` and ``b`` on one grid: the larger of the two directed
    95th percentiles of surface-to-surface distances (as MONAI, MedPy and the surface-distance package used by
    Learn2Reg compute it; symmetric).

    ``spacing``: voxel size in mm per array axis. ``inf`` when exactly one mask is empty, 0 when both are.
    """
    from scipy.ndimage import distance_transform_edt

    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float("inf")
    # Crop to the joint bounding box (plus a margin) to keep the distance transforms small.
    idx = np.argwhere(a | b)
    lo = np.maximum(idx.min(0) - 2, 0)
    hi = np.minimum(idx.max(0) + 3, a.shape)
    sl = tuple(slice(int(l), int(h)) for l, h in zip(lo, hi))
    a, b = a[sl], b[sl]
    sa, sb = _surface(a), _surface(b)
    sp = [float(s) for s in spacing]
    da = distance_transform_edt(~sb, sampling=sp)[sa]
    db = distance_transform_edt(~sa, sampling=sp)[sb]
    return float(max(np.percentile(da, 95), np.percentile(db, 95)))


def jacobian_determinant(displacement: np.ndarray, grid: GridSpec) -> np.ndarray:
    """Determinant of the Jacobian of ``x -> x + d(x)`` at every voxel of ``grid`` (float64 ``grid.shape``).

    ``displacement``: ``(*grid.shape, 3)`` RAS+ mm vectors (array axes ``[i, j, k]`` first) on ``grid`` (an
    orthogonal grid: any rotation or flip of the RAS axes). Derivatives are central differences (one-sided at
    the edges) along the array axes; vectors are first expressed along the grid's unit axes so that domain and
    range share one frame.
    A rigid rotation applied after the field leaves the determinant unchanged.
    """
    d = np.asarray(displacement, dtype=np.float64)
    axes = grid.affine[:3, :3] / grid.spacing
    d = d @ axes  # components along the unit array axes
    sp = [float(s) for s in grid.spacing]
    j = [[np.zeros(d.shape[:3]) for _ in range(3)] for _ in range(3)]  # j[c][a] = d u_c / d x_a + delta_ca
    for c in range(3):
        for a in range(3):
            if d.shape[a] > 1:
                j[c][a] = np.gradient(d[..., c], sp[a], axis=a)
        j[c][c] = j[c][c] + 1.0
    # explicit 3x3 determinant (much faster than numpy.linalg.det on millions of tiny matrices)
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )


def jacobian_stats(det: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Folding and smoothness of a Jacobian determinant map: % voxels with ``det <= 0``, SDlogJ, min, max.

    SDlogJ is the standard deviation of ``log(det)`` over voxels with ``det > 0`` (inside ``mask`` if given).
    """
    j = np.asarray(det, dtype=np.float64)
    if mask is not None:
        j = j[np.asarray(mask, dtype=bool)]
    j = j.ravel()
    pos = j[j > 0]
    return {
        "folding_percent": float(100.0 * np.count_nonzero(j <= 0) / max(1, j.size)),
        "sdlogj": float(np.std(np.log(pos))) if pos.size else float("nan"),
        "jac_min": float(j.min()) if j.size else float("nan"),
        "jac_max": float(j.max()) if j.size else float("nan"),
    }
