"""Closest-canonical reorientation matches nibabel and round-trips exactly."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from ctpassport.io.orientation import axcodes, onto_grid, reorientation


def _affine(codes: str) -> np.ndarray:
    perm = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    a = np.zeros((4, 4))
    for col, c in enumerate(codes):
        row, sign = perm[c]
        a[row, col] = sign * (1.0 + 0.5 * col)
    a[:3, 3] = [12.5, -40.0, 7.25]
    a[3, 3] = 1
    return a


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "PIR", "SLP", "ASL"])
def test_matches_nibabel_and_round_trips(codes: str) -> None:
    data = np.random.default_rng(0).integers(0, 100, (5, 6, 7)).astype(np.int16)
    aff = _affine(codes)
    assert "".join(axcodes(aff)) == codes
    ro = reorientation(aff, data.shape)
    can = ro.to_canonical(data)
    ref = nib.as_closest_canonical(nib.Nifti1Image(data, aff))
    np.testing.assert_array_equal(can, np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(ro.canonical_affine, ref.affine)
    assert "".join(axcodes(ro.canonical_affine)) == "RAS"
    np.testing.assert_array_equal(ro.from_canonical(can), data)


def test_oblique_affine_keeps_world_positions() -> None:
    rot = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])  # 90 degrees about z
    tilt = np.array([[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]])
    aff = np.eye(4)
    aff[:3, :3] = tilt @ rot @ np.diag([0.8, 0.9, 2.0])
    aff[:3, 3] = [1, 2, 3]
    shape = (4, 5, 6)
    ro = reorientation(aff, shape)
    data = np.arange(np.prod(shape)).reshape(shape)
    can = ro.to_canonical(data)
    # the voxel holding value v must sit at the same world position in both grids
    for v in (0, 17, 119):
        i = np.argwhere(data == v)[0]
        j = np.argwhere(can == v)[0]
        np.testing.assert_allclose(aff @ [*i, 1], ro.canonical_affine @ [*j, 1], atol=1e-9)


@pytest.mark.parametrize("codes", ["LPS", "PIR", "SLP", "RAS"])
def test_onto_grid_reorders_the_same_voxels_and_refuses_other_grids(codes: str) -> None:
    """A CT stored in another axis order than its label map (same world voxels) is reordered exactly."""
    data = np.random.default_rng(1).integers(-1000, 1000, (5, 6, 7)).astype(np.int16)
    ras = _affine("RAS")
    img = nib.Nifti1Image(data, ras)
    other = img.as_reoriented(nib.orientations.axcodes2ornt(codes))  # the same voxels, stored as `codes`
    stored = np.asanyarray(other.dataobj)
    back = onto_grid(stored, other.affine, data.shape, ras)
    assert back is not None and back.flags.c_contiguous
    np.testing.assert_array_equal(back, data)
    shifted = other.affine.copy()
    shifted[:3, 3] += [0.0, 0.0, 1.0]  # one voxel off along z: another grid
    assert onto_grid(stored, shifted, data.shape, ras) is None
    assert onto_grid(stored[:-1], other.affine, data.shape, ras) is None  # fewer voxels


def test_onto_grid_copies_only_when_the_storage_differs(rng: np.random.Generator) -> None:
    data = np.asfortranarray(rng.integers(-1000, 1000, (6, 7, 5)).astype(np.int16))
    aff = np.diag([-2.0, -2.0, 3.0, 1.0])
    assert onto_grid(data, aff, data.shape, aff) is data  # the same grid: the array itself, no copy
    flipped_aff = aff @ np.array([[-1, 0, 0, 5], [0, -1, 0, 6], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)
    out = onto_grid(data, aff, data.shape, flipped_aff)  # the same voxels stored RAS instead of LPS
    assert out is not None and (out.flags.f_contiguous or out.flags.c_contiguous)
    np.testing.assert_array_equal(out, data[::-1, ::-1, :])
