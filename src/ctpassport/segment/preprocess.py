"""Preprocessing exactly as TotalSegmentator 2.18 ``--fast`` followed by nnU-Net v2's DefaultPreprocessor.

1. closest-canonical RAS+ reorientation (``nib.as_closest_canonical``),
2. resampling to the model spacing with ``scipy.ndimage.zoom(order=1, mode="nearest")`` and truncation to
   int32 (TotalSegmentator's ``change_spacing``; skipped when the spacing already matches exactly),
3. transposition into nnU-Net's axis order, cropping to the bounding box of nonzero voxels,
4. CT normalisation: clip to [p0.5, p99.5] of the training foreground, subtract the mean, divide by the std.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..io.nifti import Image3D, spacing_from_affine
from ..io.orientation import Reorientation, reorientation
from ..model.folder import ModelFolder
from ..types import Affine


@dataclass
class Resampled:
    """The canonical image on the model's grid (nibabel axis order, RAS+ affine)."""

    data: np.ndarray  # int32 HU when resampled, the canonical data (float32/int) when not
    affine: Affine  # voxel -> RAS+ mm of the resampled grid
    canonical_shape: tuple[int, int, int]  # shape before resampling (canonical orientation)
    canonical_affine: Affine
    zoom: np.ndarray  # per-axis zoom factor (new/old voxel count ratio); ones when not resampled
    resampled: bool
    reorient: Reorientation


@dataclass
class NetworkInput:
    """What the network sees: normalised float32 ``(1, d0, d1, d2)`` in nnU-Net axis order, plus the crop."""

    data: np.ndarray
    bbox: tuple[tuple[int, int], ...]  # crop to nonzero, nnU-Net order, [start, stop)
    shape_before_cropping: tuple[int, int, int]


def header_zooms(affine: Affine) -> np.ndarray:
    """Voxel sizes (mm per array axis) as a freshly made NIfTI header stores them (float32 column norms of the
    affine)."""
    return spacing_from_affine(affine).astype(np.float32)


def zoom_output_shape(shape: tuple[int, ...], zoom: np.ndarray) -> tuple[int, ...]:
    """The output shape ``scipy.ndimage.zoom`` produces for ``zoom``."""
    return tuple(int(round(s * z)) for s, z in zip(shape, zoom))


def memory_order_axes(arr: np.ndarray) -> tuple[int, ...]:
    """The axis permutation that lists ``arr``'s axes from the largest to the smallest stride.

    ``arr.transpose(perm)`` walks memory (nearly) sequentially: for a Fortran-ordered NIfTI array
    ``[i, j, k]`` it is ``(2, 1, 0)``. Processing in that order is cache-friendly; the result is
    transposed back, so it is the same array up to its memory layout.
    """
    return tuple(int(a) for a in np.argsort([-abs(s) for s in arr.strides], kind="stable"))


def zoom_linear_fast(data: np.ndarray, zoom: np.ndarray) -> np.ndarray:
    """Order-1 ``scipy.ndimage.zoom`` (``mode="nearest"``, corner-aligned grid as TotalSegmentator) with
    float32 output, run in memory order, truncated to int32 like ``change_spacing(..., dtype=np.int32)``.

    Same interpolation as :func:`to_model_grid`'s exact path; the float32 output can move a value that lies
    within float32 rounding of an integer across it (1 HU differences: 0.06-0.6 % of the voxels of the shared
    CT at zooms 0.5-1.07, 2-3 % on random integer noise), and the axes are traversed in memory order (another
    summation order of the same 8 terms). No float64 volume is allocated.
    """
    perm = memory_order_axes(data)
    inv = np.argsort(perm)
    work = data.transpose(perm)
    out = ndimage.zoom(work, np.asarray(zoom, dtype=np.float64)[list(perm)], output=np.float32, order=1,
                       mode="nearest")
    return out.astype(np.int32).transpose(inv)


def to_model_grid(image: Image3D, target_spacing: tuple[float, float, float], *, fast: bool = False,
                  resample: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> Resampled:
    """Canonicalise and resample ``image`` to ``target_spacing`` (mm, nibabel axis order) like TotalSegmentator.

    The zoom factors are ``header_zooms / target`` and the new affine's columns are the old ones divided by
    them, exactly as ``totalsegmentator.resampling.change_spacing``; resampled values are truncated to int32.
    ``fast``: :func:`zoom_linear_fast` (float32, memory order, no copies) instead of the bit-exact float64
    ``ndimage.zoom``; the returned ``data`` may then be a non-contiguous view. ``resample(data, zoom)``
    replaces the fast interpolation (e.g. the GPU backend's, on the device).
    """
    ro = reorientation(image.affine, image.shape)
    data_c = ro.to_canonical(image.data)
    aff_c = ro.canonical_affine
    img_spacing = header_zooms(aff_c)
    new_spacing = np.asarray(target_spacing, dtype=np.float64)
    if np.array_equal(img_spacing, new_spacing):
        return Resampled(data=data_c if fast else np.ascontiguousarray(data_c), affine=aff_c,
                         canonical_shape=data_c.shape, canonical_affine=aff_c, zoom=np.ones(3), resampled=False,
                         reorient=ro)
    zoom = img_spacing / new_spacing
    out_shape = zoom_output_shape(data_c.shape, zoom)
    if min(out_shape) < 1:
        ax = int(np.argmin(out_shape))
        extent = data_c.shape[ax] * img_spacing[ax]
        raise InputError(f"too thin to segment: {data_c.shape[ax]} voxel(s) x {img_spacing[ax]:.3g} mm = "
                         f"{extent:.3g} mm along canonical axis {'RAS'[ax]}; the model's "
                         f"{new_spacing[ax]:.3g} mm grid needs at least {new_spacing[ax] / 2:.3g} mm",
                         image.path)
    new_affine = aff_c.copy()
    new_affine[:3, :3] = aff_c[:3, :3] / zoom[None, :]
    if resample is not None:
        out = resample(data_c, zoom)
    elif fast:
        out = zoom_linear_fast(data_c, zoom)
    else:
        out = ndimage.zoom(np.ascontiguousarray(data_c), zoom, output=np.float64, order=1,
                           mode="nearest").astype(np.int32)
    return Resampled(data=out, affine=new_affine, canonical_shape=data_c.shape,
                     canonical_affine=aff_c, zoom=zoom, resampled=True, reorient=ro)


def nonzero_bbox(data: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Bounding box ``[start, stop)`` per axis of ``data != 0`` (nnU-Net's crop_to_nonzero; the hole filling
    it applies cannot change a bounding box). An all-zero volume keeps its full extent."""
    mask = data != 0
    box = []
    for ax in range(data.ndim):
        any_ax = np.any(mask, axis=tuple(a for a in range(data.ndim) if a != ax))
        idx = np.flatnonzero(any_ax)
        box.append((int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, data.shape[ax]))
    return tuple(box)


def normalize(data: np.ndarray, model: ModelFolder) -> np.ndarray:
    """nnU-Net's normalisation of a float32 array (CT in HU for ``CTNormalization``; any axis order), in place
    where possible (float32 arithmetic)."""
    img = data.astype(np.float32, copy=False)
    props = model.intensity_properties
    if model.normalization == "CTNormalization":
        np.clip(img, props["percentile_00_5"], props["percentile_99_5"], out=img)
        img -= props["mean"]
        img /= max(props["std"], 1e-8)
    elif model.normalization == "ZScoreNormalization":
        mean, std = float(img.mean()), float(img.std())
        img -= mean
        img /= max(std, 1e-8)
    return img


def network_input(resampled: Resampled, model: ModelFolder) -> NetworkInput:
    """Transpose to nnU-Net order, crop to nonzero, normalise. Returns ``(1, d0, d1, d2)`` float32."""
    arr = np.transpose(resampled.data, model.nnunet_axes)
    shape = tuple(int(s) for s in arr.shape)
    bbox = nonzero_bbox(arr)
    cropped = arr[tuple(slice(a, b) for a, b in bbox)]
    data = normalize(np.array(cropped, dtype=np.float32, order="C"), model)
    return NetworkInput(data=data[None], bbox=bbox, shape_before_cropping=shape)  # type: ignore[arg-type]
