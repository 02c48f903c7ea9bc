"""Reorientation to the closest canonical RAS+ grid and back, exactly like ``nib.as_closest_canonical``.

Only axis permutations and flips are applied (no interpolation), so the round trip is lossless.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.orientations import (
    aff2axcodes,
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from ..types import Affine


@dataclass(frozen=True)
class Reorientation:
    """How an image was brought to closest-canonical RAS+ and how to undo it.

    ``ornt`` is nibabel's orientation array (input axes -> RAS), ``shape`` the input array shape.
    """

    ornt: np.ndarray
    shape: tuple[int, int, int]
    affine: Affine  # the input affine (voxel -> RAS+ mm)

    @property
    def is_identity(self) -> bool:
        """True when the input is already closest-canonical RAS+ (no axis permutation or flip)."""
        return bool(np.array_equal(self.ornt, axcodes2ornt("RAS")))

    @property
    def canonical_affine(self) -> Affine:
        """Affine of the reoriented array (voxel -> RAS+ mm)."""
        return self.affine @ inv_ornt_aff(self.ornt, self.shape)

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        """Shape of the reoriented array (canonical axis order: along R, A, S)."""
        out = [0, 0, 0]
        for axis, (target, _flip) in enumerate(self.ornt):
            out[int(target)] = self.shape[axis]
        return (out[0], out[1], out[2])

    def to_canonical(self, data: np.ndarray) -> np.ndarray:
        """Reorder a 3-D array of the input's shape to the canonical (RAS+) axis order."""
        if self.is_identity:
            return data
        return apply_orientation(data, self.ornt)

    def from_canonical(self, data: np.ndarray) -> np.ndarray:
        """Reorder a canonical array back to the input's storage order and shape."""
        if self.is_identity:
            return data
        return apply_orientation(data, ornt_transform(axcodes2ornt("RAS"), self.ornt))


def reorientation(affine: Affine, shape: tuple[int, ...]) -> Reorientation:
    """Describe the closest-canonical reorientation of an image with ``affine`` (voxel -> RAS+ mm)."""
    return Reorientation(ornt=io_orientation(affine), shape=tuple(int(s) for s in shape[:3]),  # type: ignore[arg-type]
                         affine=np.asarray(affine, dtype=np.float64))


def axcodes(affine: Affine) -> tuple[str, str, str]:
    """Orientation codes of the array axes of ``affine`` (voxel -> RAS+ mm): the world direction in which each
    index ``i, j, k`` increases, e.g. ``('R', 'A', 'S')`` or ``('L', 'P', 'S')``."""
    return tuple(aff2axcodes(affine))


def onto_grid(data: np.ndarray, affine: Affine, shape: tuple[int, ...], target_affine: Affine,
              atol_mm: float = 1e-3) -> np.ndarray | None:
    """``data`` (on ``affine``, voxel -> RAS+ mm) stored in the voxel order of the grid (``shape``,
    ``target_affine``), when both grids hold the same voxels and differ only in how they are stored (axis
    flips and permutations, e.g. the same CT saved LPS and RAS); None when the grids differ in the world.

    Lossless (no interpolation). Used where an image must lie on another image's grid (a CT beside its label map).
    """
    a = reorientation(affine, data.shape)
    b = reorientation(target_affine, shape)
    if a.canonical_shape != b.canonical_shape:
        return None
    if not np.allclose(a.canonical_affine, b.canonical_affine, rtol=0, atol=atol_mm):
        return None
    if tuple(data.shape) == tuple(shape) and np.allclose(affine, target_affine, rtol=0, atol=atol_mm):
        return data  # already on that grid: no copy (a clinical CT is hundreds of MB)
    out = b.from_canonical(a.to_canonical(data))
    # NIfTI arrays are Fortran-ordered: keep that layout (a CT and label map in mixed layouts slow every pass)
    return np.asfortranarray(out) if not out.flags.c_contiguous else out
