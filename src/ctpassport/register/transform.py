"""The transform model: a rigid motion composed with an optional dense displacement field.

Direction and frames (the convention of every transform ctpassport writes):

* A transform ``T`` maps a point ``x`` of the **fixed** space to the corresponding point ``T(x)`` of the
  **moving** space (the "pull-back" direction: the warped moving image is ``moving(T(x))`` sampled on the
  fixed grid). Applied to fixed landmarks it predicts their moving positions; TRE = ``|T(x_fixed) - x_moving|``.
* All coordinates are world millimetres in **RAS+** (x Right, y Anterior, z Superior). ITK/SimpleITK files are
  LPS+; :mod:`ctpassport.register.itkio` converts explicitly (``x_lps = diag(-1, -1, 1) @ x_ras``).
* ``T(x) = R @ (x + u(x)) + t``: first the residual displacement ``u`` (RAS mm, sampled on the field grid
  of the fixed space), then the rigid motion ``y = R @ x + t``. This is exactly an ITK composite transform
  ``[rigid, displacement field]`` (ITK applies the last transform of the stack first), as ANTs writes them.
* Outside the field grid ``u`` is zero (ITK's ``DisplacementFieldTransform`` semantics): inside the box of
  voxel centres extended by half a voxel the field is trilinearly interpolated with edge clamping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError
from ..types import Affine, Points


def as_points(points: Any, name: str = "points") -> Points:
    """Return ``points`` as a float64 ``(N, 3)`` array (world mm); a ``(3,)`` vector becomes ``(1, 3)``."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim == 1 and p.shape[0] == 3:
        p = p[None, :]
    if p.ndim != 2 or p.shape[1] != 3:
        raise InputError(f"{name} must be an (N, 3) array of x, y, z in mm, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise InputError(f"{name} contain NaN or infinite coordinates")
    return p


@dataclass(frozen=True)
class RigidTransform:
    """``y = rotation @ x + translation`` (RAS+ mm), mapping fixed-space points to moving-space points."""

    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def __post_init__(self) -> None:
        r = np.asarray(self.rotation, dtype=np.float64).reshape(3, 3)
        t = np.asarray(self.translation, dtype=np.float64).reshape(3)
        object.__setattr__(self, "rotation", r)
        object.__setattr__(self, "translation", t)

    @classmethod
    def identity(cls) -> RigidTransform:
        return cls(np.eye(3), np.zeros(3))

    @classmethod
    def from_matrix(cls, matrix: np.ndarray) -> RigidTransform:
        """From a 4x4 homogeneous matrix (RAS+ mm)."""
        m = np.asarray(matrix, dtype=np.float64)
        return cls(m[:3, :3], m[:3, 3])

    @classmethod
    def from_euler(
        cls, angles_deg: Any, translation_mm: Any, center_mm: Any = (0.0, 0.0, 0.0)
    ) -> RigidTransform:
        """Rotation by ``angles_deg`` about x, then y, then z (RAS axes, right-handed) around ``center_mm``,
        followed by ``translation_mm``: ``y = R @ (x - c) + c + t``."""
        ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
        r = rz @ ry @ rx
        c = np.asarray(center_mm, dtype=np.float64)
        return cls(r, c - r @ c + np.asarray(translation_mm, dtype=np.float64))

    @property
    def matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix, RAS+ mm."""
        m = np.eye(4)
        m[:3, :3] = self.rotation
        m[:3, 3] = self.translation
        return m

    @property
    def angle_deg(self) -> float:
        """Rotation angle (degrees) of the rotation part."""
        c = (np.trace(self.rotation) - 1.0) / 2.0
        return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))

    def apply(self, points: Any) -> Points:
        """Map ``(N, 3)`` RAS+ mm points: ``R @ x + t``."""
        p = as_points(points)
        return p @ self.rotation.T + self.translation

    def apply_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """Rotate ``(..., 3)`` RAS+ vectors (no translation)."""
        return np.asarray(vectors) @ self.rotation.T

    def inverse(self) -> RigidTransform:
        """The inverse motion (moving-space -> fixed-space RAS+ mm points)."""
        rt = self.rotation.T
        return RigidTransform(rt, -rt @ self.translation)

    def compose(self, first: RigidTransform) -> RigidTransform:
        """``self ∘ first``: apply ``first`` then ``self``."""
        return RigidTransform(
            self.rotation @ first.rotation, self.rotation @ first.translation + self.translation
        )


@dataclass(frozen=True)
class GridSpec:
    """A voxel grid: ``shape`` (array axis order) and ``affine`` (voxel index -> RAS+ world mm)."""

    shape: tuple[int, int, int]
    affine: Affine

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise InputError(f"grid shape {shape} is not three positive sizes")
        object.__setattr__(self, "shape", shape)
        a = np.asarray(self.affine, dtype=np.float64).reshape(4, 4)
        if not np.isfinite(a).all():
            raise InputError("grid affine has NaN or infinite values")
        if abs(np.linalg.det(a[:3, :3])) < 1e-12:
            raise InputError("grid affine is singular")
        object.__setattr__(self, "affine", a)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along the array axes."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))

    @property
    def sheared(self) -> bool:
        """True when the voxel axes are not orthogonal (e.g. a gantry-tilted CT): ITK images cannot hold it."""
        axes = self.affine[:3, :3] / self.spacing
        return not bool(np.allclose(axes.T @ axes, np.eye(3), atol=1e-4))

    def orthogonal_cover(self, max_spacing_mm: float | None = None) -> GridSpec:
        """An orthogonal grid covering this one: the voxel axes turned to the nearest orthonormal frame
        (polar decomposition; a left-handed grid stays left-handed), spacing per axis this grid's capped at
        ``max_spacing_mm`` (a finer axis keeps its spacing; a coarser one is refined to ``max_spacing_mm``),
        extent covering every voxel of this grid. This grid itself when not sheared and ``max_spacing_mm`` is
        None."""
        if not self.sheared and max_spacing_mm is None:
            return self
        u, _, vt = np.linalg.svd(self.affine[:3, :3] / self.spacing)
        rot = u @ vt
        sp = self.spacing if max_spacing_mm is None else np.minimum(self.spacing, max_spacing_mm)
        n = np.asarray(self.shape, dtype=np.float64)
        corners = np.array([[a, b, c] for a in (-0.5, n[0] - 0.5) for b in (-0.5, n[1] - 0.5)
                            for c in (-0.5, n[2] - 0.5)])
        local = (self.index_to_world(corners) - self.affine[:3, 3]) @ rot  # coordinates along the new axes
        lo, hi = local.min(axis=0) + sp / 2, local.max(axis=0) - sp / 2
        shape = tuple(int(v) for v in np.maximum(np.ceil((hi - lo) / sp - 1e-9), 0) + 1)
        aff = np.eye(4)
        aff[:3, :3] = rot * sp
        aff[:3, 3] = self.affine[:3, 3] + rot @ lo
        return GridSpec(shape, aff)  # type: ignore[arg-type]

    def same_as(self, other: GridSpec, tol: float = 1e-6) -> bool:
        """Same shape and affine entries equal within ``tol`` (mm for the origin)."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=tol))

    def world_to_index(self, points: Points) -> np.ndarray:
        """Continuous voxel indices ``[i, j, k]`` of ``(N, 3)`` RAS+ mm points."""
        inv = np.linalg.inv(self.affine)
        return np.asarray(points) @ inv[:3, :3].T + inv[:3, 3]

    def index_to_world(self, index: np.ndarray) -> Points:
        """RAS+ mm of ``(N, 3)`` continuous voxel indices ``[i, j, k]``."""
        return np.asarray(index, dtype=np.float64) @ self.affine[:3, :3].T + self.affine[:3, 3]

    def slab_world(self, i0: int, i1: int) -> Points:
        """RAS+ mm of the voxel centres of slabs ``i0 <= i < i1`` along axis 0, C order, shape ``(M, 3)``."""
        ii, jj, kk = np.meshgrid(
            np.arange(i0, i1, dtype=np.float64),
            np.arange(self.shape[1], dtype=np.float64),
            np.arange(self.shape[2], dtype=np.float64),
            indexing="ij",
        )
        a = self.affine
        out = np.empty((ii.size, 3))
        for r in range(3):
            out[:, r] = (a[r, 0] * ii + a[r, 1] * jj + a[r, 2] * kk + a[r, 3]).ravel()
        return out

    def slab_size(self, max_points: int = 2_000_000) -> int:
        """How many axis-0 slabs fit in about ``max_points`` voxels (at least one)."""
        return max(1, max_points // max(1, self.shape[1] * self.shape[2]))

    def contains(self, points: Points, margin_vox: float = 0.0) -> np.ndarray:
        """Boolean mask of ``(N, 3)`` RAS+ mm points whose continuous index lies within
        ``[-0.5 + m, n - 0.5 - m]`` on every axis (``m`` = ``margin_vox``, in voxels)."""
        idx = self.world_to_index(points)
        n = np.asarray(self.shape, dtype=np.float64)
        return np.all((idx >= -0.5 + margin_vox) & (idx <= n - 0.5 - margin_vox), axis=1)

    def to_dict(self) -> dict[str, Any]:
        """``{"shape": [i, j, k sizes], "affine_ras": 4x4 voxel -> RAS+ mm}`` (JSON-ready)."""
        return {"shape": list(self.shape), "affine_ras": np.round(self.affine, 9).tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GridSpec:
        return cls(tuple(d["shape"]), np.asarray(d["affine_ras"], dtype=np.float64))


def bounding_grid(
    points: Points, spacing_mm: float = 3.0, margin_mm: float = 30.0, max_voxels: int = 4_000_000
) -> GridSpec:
    """An axis-aligned RAS+ grid (array axes along +x, +y, +z; isotropic ``spacing_mm``) covering ``points``
    (RAS+ mm) plus ``margin_mm``; the spacing grows by 1.25x until the grid has at most ``max_voxels``."""
    p = as_points(points)
    lo = p.min(axis=0) - margin_mm
    hi = p.max(axis=0) + margin_mm
    sp = float(spacing_mm)
    while True:
        shape = np.maximum(2, np.ceil((hi - lo) / sp).astype(int) + 1)
        if float(np.prod(shape.astype(np.float64))) <= max_voxels:  # float: no int64 overflow on huge spans
            break
        sp *= 1.25
    aff = np.diag([sp, sp, sp, 1.0])
    aff[:3, 3] = lo
    return GridSpec(tuple(int(s) for s in shape), aff)  # type: ignore[arg-type]


@dataclass
class DisplacementField:
    """Residual displacement ``u`` on ``grid`` (fixed space): float32 ``(*grid.shape, 3)``, the grid's array
    axes ``[i, j, k]`` then the RAS+ x, y, z components (mm).

    Interpolation follows ITK's ``DisplacementFieldTransform`` with a linear interpolator: zero outside the
    grid's half-voxel-extended box, trilinear with edge clamping inside.
    """

    grid: GridSpec
    data: np.ndarray

    def __post_init__(self) -> None:
        d = np.asarray(self.data, dtype=np.float32)
        if d.shape != (*self.grid.shape, 3):
            raise InputError(f"displacement field shape {d.shape} does not match grid {self.grid.shape} x 3")
        self.data = d

    def sample(self, points: Points) -> np.ndarray:
        """``u`` at ``(N, 3)`` RAS+ mm points (float64 ``(N, 3)``)."""
        from scipy.ndimage import map_coordinates

        p = as_points(points)
        idx = self.grid.world_to_index(p)
        n = np.asarray(self.grid.shape, dtype=np.float64)
        inside = np.all((idx >= -0.5) & (idx < n - 0.5), axis=1)
        out = np.zeros((p.shape[0], 3))
        if inside.any():
            coords = np.clip(idx[inside], 0.0, n - 1.0).T
            for c in range(3):
                out[inside, c] = map_coordinates(self.data[..., c], coords, order=1, mode="nearest")
        return out


@dataclass
class Transform:
    """``T(x) = rigid(x + u(x))`` mapping fixed-space RAS+ mm points to moving space (see module doc)."""

    rigid: RigidTransform
    field: DisplacementField | None = None

    def apply(self, points: Any) -> Points:
        """Map ``(N, 3)`` fixed-space RAS+ mm points to the moving space."""
        p = as_points(points)
        if self.field is not None:
            p = p + self.field.sample(p)
        return self.rigid.apply(p)

    def map_grid(self, grid: GridSpec, i0: int = 0, i1: int | None = None) -> Points:
        """``T`` at the voxel centres of slabs ``[i0, i1)`` of ``grid`` (``(M, 3)``, C order, RAS+ mm)."""
        i1 = grid.shape[0] if i1 is None else i1
        x = grid.slab_world(i0, i1)
        if self.field is not None:
            if grid.same_as(self.field.grid):
                x = x + self.field.data[i0:i1].reshape(-1, 3)
            else:
                x = x + self.field.sample(x)
        return self.rigid.apply(x)

    def displacement_on(self, grid: GridSpec) -> np.ndarray:
        """Total displacement ``T(x) - x`` at every voxel of ``grid``: float32 ``(*grid.shape, 3)`` (array
        axes ``[i, j, k]``, then RAS+ x, y, z components in mm)."""
        out = np.empty((*grid.shape, 3), dtype=np.float32)
        step = grid.slab_size()
        for i0 in range(0, grid.shape[0], step):
            i1 = min(grid.shape[0], i0 + step)
            out[i0:i1] = (self.map_grid(grid, i0, i1) - grid.slab_world(i0, i1)).reshape(
                i1 - i0, *grid.shape[1:], 3
            )
        return out
