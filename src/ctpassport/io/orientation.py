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
        return bool(np.array_equal(self.ornt, axcodes2ornt("RAS")))

    @property
    def canonical_affine(self) -> Affine:
        """Affine of the reoriented array (voxel -> RAS+ mm)."""
        return self.affine @ inv_ornt_aff(self.ornt, self.shape)

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
    """Orientation codes of the array axes, e.g. ``('R', 'A', 'S')`` or ``('L', 'P', 'S')``."""
    return tuple(aff2axcodes(affine))
