"""Resampling images and label maps through a transform (pull-back: ``out(x) = moving(T(x))``).

Frames: ``T`` maps fixed/reference-space RAS+ mm points to moving-space RAS+ mm points; voxel grids are in
array axis order with their affine (voxel -> RAS+ mm), any orientation or oblique (sheared) affine.
Sampling matches ITK's resampler: a point is inside the moving image when its continuous voxel index lies in
``[-0.5, n - 0.5)`` on every axis; linear interpolation clamps neighbours at the edge; nearest neighbour rounds
half up (``floor(i + 0.5)``); points outside get ``fill``. Label maps use nearest neighbour, so the output
holds only label values of the input (plus ``fill`` = 0 outside; another ``fill`` must be an integer that the
label map's dtype holds, never wrapped or rounded into a label value).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from ..io.nifti import Image3D
from .transform import GridSpec, Transform


def resample(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    transform: Transform,
    reference: GridSpec,
    *,
    labels: bool = False,
    fill: float | None = None,
    itk: bool = False,
) -> np.ndarray:
    """Warp a 3-D array onto ``reference`` through ``transform`` (see module doc).

    ``moving``: 3-D array in storage order ``[i, j, k]`` with ``moving_affine`` (voxel -> RAS+ mm).
    ``labels``: nearest neighbour and the input dtype (labels kept exactly); otherwise trilinear, float32.
    ``fill``: value outside the moving image, in the image's units (default 0 for labels, the image minimum
    otherwise). ``itk``: resample with SimpleITK's resampler where it can (about 10x faster on a clinical CT,
    multi-threaded; the same sampling rules, results equal to float32 rounding): not for sheared grids, which
    ITK images cannot hold, nor without SimpleITK, where this module's own resampler runs. Returns an array of
    ``reference.shape`` (the reference grid's array order).
    """
    from scipy.ndimage import map_coordinates

    data = np.asarray(moving)
    mgrid = GridSpec(data.shape[:3], moving_affine)
    if fill is None:
        fill = 0 if labels else float(data.min()) if data.size else 0.0
    out_dtype = data.dtype if labels else np.dtype(np.float32)
    check_fill(fill, out_dtype)
    src = data if labels else data.astype(np.float32, copy=False)
    if itk:
        done = _resample_itk(src, mgrid, transform, reference, labels, float(fill))
        if done is not None:
            return done
    out = np.empty(reference.shape, dtype=out_dtype)
    n = np.asarray(data.shape[:3], dtype=np.float64)
    step = reference.slab_size()
    for i0 in range(0, reference.shape[0], step):
        i1 = min(reference.shape[0], i0 + step)
        idx = mgrid.world_to_index(transform.map_grid(reference, i0, i1))
        inside = np.all((idx >= -0.5) & (idx < n - 0.5), axis=1)
        vals = np.full(idx.shape[0], fill, dtype=out_dtype)
        if inside.any():
            ii = idx[inside]
            if labels:
                k = np.clip(np.floor(ii + 0.5).astype(np.int64), 0, (n - 1).astype(np.int64))
                vals[inside] = src[k[:, 0], k[:, 1], k[:, 2]]
            else:
                c = np.clip(ii, 0.0, n - 1.0).T
                vals[inside] = map_coordinates(src, c, order=1, mode="nearest")
        out[i0:i1] = vals.reshape(i1 - i0, *reference.shape[1:])
    return out


def _resample_itk(src: np.ndarray, mgrid: GridSpec, transform: Transform, reference: GridSpec, labels: bool,
                  fill: float) -> np.ndarray | None:
    """:func:`resample` by SimpleITK (``src``: the moving array as it is sampled, labels or float32); None where
    it cannot be used (SimpleITK missing, a sheared grid, a 3-D array ITK does not resample)."""
    try:
        import SimpleITK as sitk
    except ImportError:
        return None
    from .itkio import array_to_sitk, grid_direction_lps, sitk_to_array, to_sitk

    if mgrid.sheared or reference.sheared or src.ndim != 3 or src.dtype.kind not in "iuf" or src.dtype.itemsize > 4:
        return None
    image = array_to_sitk(src, mgrid)
    origin, spacing, direction = grid_direction_lps(reference)
    out = sitk.Resample(image, [int(n) for n in reference.shape], to_sitk(transform),
                        sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
                        [float(v) for v in origin], [float(v) for v in spacing],
                        [float(v) for v in direction.ravel()], fill, image.GetPixelID())
    del image
    return np.asarray(sitk_to_array(out), dtype=src.dtype)


def check_fill(fill: float, dtype: Any) -> None:
    """Raise :class:`ConfigError` unless ``fill`` is stored exactly in an output of ``dtype``.

    ``fill`` must be finite; for an integer output (a label map) it must be a whole number within the dtype's
    range: a cast would wrap (-1 -> 255 in uint8) or truncate (0.5 -> 0) it into a label value that the input
    may not even hold.
    """
    dt = np.dtype(dtype)
    value = float(fill)
    if not np.isfinite(value):
        raise ConfigError(f"--fill must be a finite number, not {fill!r}")
    if dt.kind in "iu":
        info = np.iinfo(dt)
        if value != round(value) or not info.min <= value <= info.max:
            raise ConfigError(f"--fill {fill:g} is not a value of the {dt} label map: a label fill must be "
                              f"a whole number from {info.min} to {info.max}")


def grid_of(image: Any) -> GridSpec:
    """The :class:`GridSpec` (shape ``[i, j, k]``, affine voxel -> RAS+ mm) of an :class:`Image3D`, a nibabel
    image or a GridSpec."""
    if isinstance(image, GridSpec):
        return image
    return GridSpec(tuple(int(s) for s in image.shape[:3]), np.asarray(image.affine, dtype=np.float64))  # type: ignore[arg-type]


def warp_image(
    transform: Transform,
    moving: Image3D,
    reference: Image3D | GridSpec,
    *,
    labels: bool = False,
    fill: float | None = None,
) -> Image3D:
    """Warp ``moving`` onto ``reference``'s grid (pull-back through ``transform``), as an :class:`Image3D`.

    The result carries the reference's affine (and header when the reference is an Image3D).
    """
    import nibabel as nib

    ref = grid_of(reference)
    data = resample(moving.data, moving.affine, transform, ref, labels=labels, fill=fill, itk=True)
    header = reference.header.copy() if isinstance(reference, Image3D) else nib.Nifti1Header()
    return Image3D(data=data, affine=ref.affine.copy(), header=header, path=None)
