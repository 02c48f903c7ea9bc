"""Rasterise a :class:`~ctpassport.phantom.anatomy.Phantom` onto any voxel grid (spacing, orientation, obliquity).

Labels are point samples of the anatomy at voxel centres (so their centroids and volumes converge to the
analytic values); the CT is the painted HU volume plus a smooth anatomical texture, blurred by the scanner's
point-spread function and the voxel's partial-volume box (Gaussian), plus spatially correlated noise.

A follow-up scan is rendered through a :class:`~ctpassport.phantom.motion.TrueTransform`: the follow-up voxel
at world position ``y`` shows the baseline anatomy at ``T^-1(y)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..errors import ConfigError
from ..types import Affine
from .anatomy import Phantom, Structure
from .geometry import Shape, Union
from .motion import TrueTransform

_AXIS_VECTORS = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` (array order) and ``affine`` (voxel index -> world RAS+ mm)."""

    shape: tuple[int, int, int]
    affine: Affine

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) per array axis."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


def direction_matrix(orientation: str) -> np.ndarray:
    """Columns: the world (RAS+) unit vector of each array axis for axis codes such as ``"RAS"`` or ``"LPS"``."""
    codes = orientation.upper()
    if len(codes) != 3 or any(c not in _AXIS_VECTORS for c in codes):
        raise ConfigError(f"orientation {orientation!r} must be three axis codes from R/L, A/P, S/I (e.g. RAS, LPS)")
    cols = np.array([_AXIS_VECTORS[c] for c in codes], dtype=np.float64).T
    if abs(abs(np.linalg.det(cols)) - 1.0) > 1e-9:
        raise ConfigError(f"orientation {orientation!r} repeats an axis; use each of R/L, A/P, S/I once")
    return cols


def parse_spacing(spacing: float | str | tuple[float, ...] | list[float]) -> tuple[float, float, float]:
    """One value (isotropic) or three values (mm, per array axis); ``"1.5,1.5,3"`` strings are accepted."""
    if isinstance(spacing, str):
        parts = [p for p in spacing.replace("x", ",").split(",") if p.strip()]
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(f"spacing {spacing!r} is not one or three numbers (mm)") from None
    elif isinstance(spacing, (int, float)):
        vals = [float(spacing)]
    else:
        vals = [float(v) for v in spacing]
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or not all(0.2 <= v <= 20.0 and math.isfinite(v) for v in vals):
        raise ConfigError(f"spacing {spacing!r} must be one or three values between 0.2 and 20 mm")
    return tuple(vals)  # type: ignore[return-value]


def make_grid(corners_world: np.ndarray, spacing: float | tuple[float, ...] | str = 3.0, orientation: str = "RAS",
              oblique_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Grid:
    """A grid covering the world points ``corners_world`` (N, 3; RAS+ mm) with ``spacing`` (mm, per array axis),
    array axes along ``orientation`` (axis codes), optionally rotated by ``oblique_deg`` (about world x, y, z)."""
    from .geometry import rotation_xyz

    sp = np.asarray(parse_spacing(spacing))
    angles = tuple(float(a) for a in oblique_deg)
    if len(angles) != 3 or not all(math.isfinite(a) for a in angles):
        raise ConfigError(f"oblique angles {tuple(oblique_deg)} must be three finite numbers "
                          "(degrees about x, y, z)")
    dirs = rotation_xyz(*angles) @ direction_matrix(orientation)
    pts = np.asarray(corners_world, dtype=np.float64)
    proj = pts @ dirs  # coordinates along each array axis direction
    lo, hi = proj.min(axis=0), proj.max(axis=0)
    n = np.maximum(1, np.ceil((hi - lo) / sp).astype(int) + 1)
    centre = dirs @ ((lo + hi) / 2)
    m = dirs * sp[None, :]
    affine = np.eye(4)
    affine[:3, :3] = m
    affine[:3, 3] = centre - m @ ((n - 1) / 2.0)
    return Grid(shape=tuple(int(v) for v in n), affine=affine)  # type: ignore[arg-type]


def default_grid(phantom: Phantom, spacing: float | tuple[float, ...] | str = 3.0, orientation: str = "RAS",
                 oblique_deg: tuple[float, float, float] = (0.0, 0.0, 0.0), margin_mm: float = 0.0) -> Grid:
    """The phantom's default field of view (pelvis to above the lung apices, whole body width) on a new grid
    (see :func:`make_grid`; ``margin_mm`` widens the field of view's corners outward by that many mm)."""
    corners = phantom.fov_world()
    if margin_mm:
        c = corners.mean(axis=0)
        corners = c + (corners - c) * (1.0 + margin_mm / np.linalg.norm(corners - c, axis=1, keepdims=True))
    return make_grid(corners, spacing, orientation, oblique_deg)


def body_coordinates(phantom: Phantom, grid: Grid, motion: TrueTransform | None = None) -> np.ndarray:
    """(3, *shape) float32 body-frame coordinates (mm) of every voxel centre of ``grid``.

    Without ``motion`` the voxel's world point (RAS+ mm) is mapped by the inverse pose; with ``motion`` the
    world point is first pulled back to the baseline by ``motion.inverse``. Computed slab by slab.
    """
    out = np.empty((3, *grid.shape), dtype=np.float32)
    n0 = grid.shape[0]
    step = max(1, int(2_000_000 // max(1, grid.shape[1] * grid.shape[2])))
    jk = np.indices(grid.shape[1:], dtype=np.float64).reshape(2, -1)
    for start in range(0, n0, step):
        stop = min(n0, start + step)
        i = np.repeat(np.arange(start, stop, dtype=np.float64), jk.shape[1])
        idx = np.vstack([i, np.tile(jk, (1, stop - start))])
        world = (grid.affine[:3, :3] @ idx + grid.affine[:3, 3:4]).T
        if motion is not None:
            world = motion.inverse(world)
        body = phantom.world_to_body(world)
        out[:, start:stop] = body.T.reshape(3, stop - start, *grid.shape[1:])
    return out


def _index_box(grid: Grid, corners_world: np.ndarray) -> tuple[slice, ...] | None:
    inv = np.linalg.inv(grid.affine)
    ijk = corners_world @ inv[:3, :3].T + inv[:3, 3]
    lo = np.floor(ijk.min(axis=0)).astype(int) - 1
    hi = np.ceil(ijk.max(axis=0)).astype(int) + 2
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, np.asarray(grid.shape))
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _box_corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])


def render_labels_and_hu(phantom: Phantom, grid: Grid, motion: TrueTransform | None = None,
                         body_points: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paint the phantom: returns (labels uint8, noiseless unblurred HU float32, body-frame coordinates (mm)
    (3, *shape)), arrays in the grid's storage order.

    With ``motion``, voxel ``y`` shows the anatomy at ``motion.inverse(y)`` (a follow-up scan).
    """
    if body_points is None:
        body_points = body_coordinates(phantom, grid, motion)
    bx, by, bz = body_points
    labels = np.zeros(grid.shape, dtype=np.uint8)
    hu = np.full(grid.shape, -1000.0, dtype=np.float32)
    margin = motion.max_displacement() + 1.0 if motion is not None else 0.0
    for s, shape in _paint_list(phantom):
        lo, hi = shape.bbox()
        lo = np.maximum(lo, phantom.fov_body[0] - 500.0)
        hi = np.minimum(hi, phantom.fov_body[1] + 500.0)
        corners = phantom.body_to_world(_box_corners(lo - margin, hi + margin))
        if motion is not None:
            corners = _rigid_part(motion, corners)
        box = _index_box(grid, corners)
        if box is None:
            continue
        m = shape.inside(bx[box], by[box], bz[box])
        if s.within is not None:
            m &= np.isin(labels[box], s.within)
        if not m.any():
            continue
        hu[box][m] = s.hu
        if not s.hu_only:
            labels[box][m] = s.label
    return labels, hu, body_points


def _paint_list(phantom: Phantom) -> list[tuple[Structure, Shape]]:
    """(structure, shape) pairs to paint; unions are split into their parts, each with its own bounding box
    (painting the parts one after the other with the same label, HU and mask equals painting the union)."""
    out: list[tuple[Structure, Shape]] = []
    for s in phantom.structures:
        stack = [s.shape]
        while stack:
            shp = stack.pop(0)
            if isinstance(shp, Union):
                stack = list(shp.parts) + stack
            else:
                out.append((s, shp))
    return out


def _rigid_part(motion: TrueTransform, points: np.ndarray) -> np.ndarray:
    c, t = np.asarray(motion.center), np.asarray(motion.translation)
    return (points - c) @ motion.R.T + c + t


def render(phantom: Phantom, grid: Grid, *, motion: TrueTransform | None = None, noise_seed: int | None = None,
           noise_hu: float | None = None, psf_mm: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render CT (int16 HU) and labels (uint8, TotalSegmentator ids) of ``phantom`` on ``grid``.

    ``noise_seed`` (default: the phantom seed; follow-ups pass another) draws the noise; ``noise_hu`` is the
    noise standard deviation (HU, default per seed 6-16) and ``psf_mm`` the scanner blur sigma (mm, default per
    seed 0.5-1.0). Arrays are in the grid's storage order.
    """
    rng = np.random.default_rng([7919, phantom.seed])
    noise_default, psf_default = float(rng.uniform(6.0, 16.0)), float(rng.uniform(0.5, 1.0))
    noise_hu = noise_default if noise_hu is None else float(noise_hu)
    psf_mm = psf_default if psf_mm is None else float(psf_mm)
    labels, hu, body = render_labels_and_hu(phantom, grid, motion)
    # anatomical texture on soft tissue (follows the anatomy through the motion)
    soft = (hu > -200.0) & (hu < 200.0)
    if phantom.texture:
        tex = np.zeros(grid.shape, dtype=np.float32)
        for k, phase, amp in phantom.texture:
            tex += np.float32(amp) * np.sin(k[0] * body[0] + k[1] * body[1] + k[2] * body[2] + np.float32(phase))
        hu[soft] += tex[soft]
    del body
    # partial volume (voxel box) and scanner PSF as one Gaussian per array axis
    sp = np.asarray(grid.spacing)
    sigma_vox = np.sqrt((psf_mm / sp) ** 2 + 1.0 / 12.0)
    hu = ndimage.gaussian_filter(hu, sigma=sigma_vox, mode="nearest", truncate=3.0)
    if noise_hu > 0:
        nrng = np.random.default_rng([104729, phantom.seed if noise_seed is None else int(noise_seed)])
        white = nrng.standard_normal(grid.shape, dtype=np.float32)
        corr = ndimage.gaussian_filter(white, sigma=0.6, mode="wrap", truncate=3.0)
        corr *= np.float32(noise_hu / max(float(corr.std()), 1e-6))
        hu += corr
    ct = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return ct, labels
