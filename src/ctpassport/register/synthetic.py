"""Known synthetic motion for validation: random rigid plus a smooth random cubic B-spline deformation.

The truth is built as a *pull-back* ``S`` from the moving space to the fixed space, so that the moving label
map is simply ``moving(y) = fixed(S(y))`` (nearest neighbour) with no inversion. ``S`` has the same form as
every ctpassport transform, ``S(y) = R (y + v(y)) + t`` with ``v`` a cubic B-spline displacement on the moving
grid. The registration estimates ``T`` (fixed -> moving) = ``S^-1``; for held-out points ``y`` of the moving
space with known fixed correspondents ``x = S(y)``, TRE = ``|T(x) - y|``. All RAS+ mm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .metrics import jacobian_determinant, jacobian_stats
from .transform import DisplacementField, GridSpec, RigidTransform, Transform


def random_rigid(
    rng: np.random.Generator,
    max_angle_deg: float = 10.0,
    max_translation_mm: float = 20.0,
    center_mm: Any = (0.0, 0.0, 0.0),
) -> RigidTransform:
    """Rotation angles about x, y, z uniform in ``+-max_angle_deg`` about ``center_mm`` and a translation
    uniform in ``+-max_translation_mm`` per axis (RAS+ mm)."""
    ang = rng.uniform(-max_angle_deg, max_angle_deg, 3)
    tr = rng.uniform(-max_translation_mm, max_translation_mm, 3)
    return RigidTransform.from_euler(ang, tr, center_mm)


def bspline_displacement(grid: GridSpec, coefficients: np.ndarray, control_spacing_mm: float) -> np.ndarray:
    """Evaluate a cubic B-spline displacement on ``grid``: float32 ``(*grid.shape, 3)``, array axes
    ``[i, j, k]`` then RAS+ x, y, z components (mm).

    ``coefficients``: ``(ci, cj, ck, 3)`` control values (RAS+ mm) on a lattice aligned with the grid's array
    axes, spacing ``control_spacing_mm``, control point ``(1, 1, 1)`` at voxel ``(0, 0, 0)`` (one control
    point of margin before the grid). Evaluated with
    ``scipy.ndimage.map_coordinates(order=3, prefilter=False)``, i.e. the coefficients are used as B-spline
    coefficients.
    """
    from scipy.ndimage import map_coordinates

    sp = grid.spacing
    axes = [np.arange(n) * s / control_spacing_mm + 1.0 for n, s in zip(grid.shape, sp)]
    ci = np.meshgrid(*axes, indexing="ij")
    coords = np.stack([c.ravel() for c in ci])
    out = np.empty((*grid.shape, 3), dtype=np.float32)
    for c in range(3):
        out[..., c] = map_coordinates(
            coefficients[..., c], coords, order=3, prefilter=False, mode="nearest"
        ).reshape(grid.shape)
    return out


def control_lattice_shape(grid: GridSpec, control_spacing_mm: float) -> tuple[int, int, int]:
    """Number of control points per array axis of ``grid`` at ``control_spacing_mm`` (plus a margin of 1
    before and 2 after)."""
    ext = (np.asarray(grid.shape) - 1) * grid.spacing
    return tuple(int(np.ceil(e / control_spacing_mm)) + 4 for e in ext)  # type: ignore[return-value]


@dataclass
class SyntheticMotion:
    """A known pull-back ``S`` (moving space -> fixed space) and facts about it."""

    pullback: Transform
    amplitude_mm: float
    control_spacing_mm: float
    mean_deformation_mm: float
    jacobian: dict[str, float]
    attempts: int


def random_motion(
    grid: GridSpec,
    rng: np.random.Generator,
    *,
    amplitude_mm: float = 10.0,
    control_spacing_mm: tuple[float, float] | float = (40.0, 60.0),
    max_angle_deg: float = 10.0,
    max_translation_mm: float = 20.0,
    mask: np.ndarray | None = None,
    min_jacobian: float = 0.2,
    max_attempts: int = 20,
) -> SyntheticMotion:
    """A random rigid + B-spline pull-back on ``grid`` with mean deformation ``amplitude_mm`` inside ``mask``.

    The B-spline part ``v`` has random normal coefficients on a lattice with spacing drawn from
    ``control_spacing_mm`` (a range or a value), scaled so that ``mean |v|`` over ``mask`` (default: the whole
    grid) equals ``amplitude_mm``. The truth must not fold: a draw whose Jacobian determinant of
    ``y -> y + v(y)`` falls below ``min_jacobian`` anywhere on the grid is redrawn. The rotation is about the
    grid centre. Raises ``RuntimeError`` if no fold-free draw is found.
    """
    centre = grid.index_to_world((np.asarray(grid.shape, dtype=np.float64) - 1) / 2.0)
    rigid = random_rigid(rng, max_angle_deg, max_translation_mm, centre)
    m = np.ones(grid.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    last = None
    for attempt in range(1, max_attempts + 1):
        h = (
            float(rng.uniform(*control_spacing_mm))
            if isinstance(control_spacing_mm, tuple)
            else float(control_spacing_mm)
        )
        if amplitude_mm <= 0:
            v = np.zeros((*grid.shape, 3), dtype=np.float32)
        else:
            coef = rng.normal(size=(*control_lattice_shape(grid, h), 3))
            v = bspline_displacement(grid, coef, h)
            mean = (
                float(np.linalg.norm(v[m], axis=1).mean())
                if m.any()
                else float(np.linalg.norm(v, axis=-1).mean())
            )
            v *= np.float32(amplitude_mm / max(mean, 1e-9))
        stats = jacobian_stats(jacobian_determinant(v, grid))
        last = stats
        if stats["jac_min"] >= min_jacobian:
            mean_def = float(np.linalg.norm(v[m], axis=1).mean()) if m.any() else 0.0
            return SyntheticMotion(
                Transform(rigid, DisplacementField(grid, v)), amplitude_mm, h, mean_def, stats, attempt
            )
    raise RuntimeError(
        f"no fold-free random deformation of amplitude {amplitude_mm} mm in {max_attempts} draws "
        f"(last minimum Jacobian {last})"
    )
