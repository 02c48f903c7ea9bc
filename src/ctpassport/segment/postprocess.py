"""From network labels back to the input's grid, exactly as nnU-Net + TotalSegmentator ``--fast`` do.

1. put the cropped labels back into the uncropped volume (background outside the nonzero box),
2. transpose from nnU-Net order back to nibabel order,
3. resample to the canonical input shape with nearest neighbour (``scipy.ndimage.zoom(order=0)``; done
   here per axis with identical indices, which is exact and much faster),
4. undo the canonical reorientation: the result is voxel for voxel on the input's grid.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from ..model.folder import ModelFolder
from .preprocess import NetworkInput, Resampled, memory_order_axes, zoom_output_shape


def uncrop(labels: np.ndarray, net_input: NetworkInput) -> np.ndarray:
    """Insert cropped ``labels`` (nnU-Net order) into a zero volume of the pre-crop shape."""
    full = np.zeros(net_input.shape_before_cropping, dtype=labels.dtype)
    full[tuple(slice(a, b) for a, b in net_input.bbox)] = labels
    return full


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output position for ``ndimage.zoom(order=0)`` along one axis."""
    idx = ndimage.zoom(np.arange(n_in, dtype=np.float64), n_out / n_in, order=0, mode="nearest")
    if idx.shape[0] != n_out:  # pragma: no cover - guarded by the caller's shape computation
        raise ValueError("zoom produced an unexpected length")
    return idx.astype(np.intp)


def zoom_labels(labels: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize of a label volume to ``target_shape`` with scipy's corner-aligned mapping.

    Identical to ``ndimage.zoom(labels, target/shape, order=0, mode="nearest")`` (TotalSegmentator's
    ``change_spacing(..., target_shape, order=0)``) but separable. The source indices of order 0 are
    non-decreasing, so each axis is a ``np.repeat`` (each source row repeated as often as it is used),
    done in the array's memory order: the result has the input's layout (C or Fortran), so a
    Fortran-ordered result is written to NIfTI without a transposing copy.
    """
    shape = labels.shape
    if tuple(shape) == tuple(target_shape):
        return labels
    zoom = np.asarray(target_shape, dtype=np.float64) / np.asarray(shape, dtype=np.float64)
    out_shape = zoom_output_shape(shape, zoom)
    idx = [nearest_indices(n, m) for n, m in zip(shape, out_shape)]
    if not all(np.all(np.diff(i) >= 0) for i in idx):  # pragma: no cover - order 0 indices are monotone
        return labels[np.ix_(*idx)]
    perm = memory_order_axes(labels)
    out = labels.transpose(perm)
    for ax_work, ax in enumerate(perm):
        counts = np.bincount(idx[ax], minlength=shape[ax])
        if np.all(counts == 1):
            continue
        out = np.repeat(out, counts, axis=ax_work)
    return out.transpose(np.argsort(perm))


def to_input_grid(labels_nn: np.ndarray, net_input: NetworkInput, resampled: Resampled,
                  model: ModelFolder, zoom: Callable[[np.ndarray, tuple[int, ...]], np.ndarray] | None = None,
                  ) -> np.ndarray:
    """Labels from the network grid (cropped, nnU-Net order) to the input's storage order and shape.

    ``zoom`` replaces :func:`zoom_labels` (same contract; e.g. the GPU backend's device-side gather).
    The result is C- or Fortran-contiguous (whichever the computation produced).
    """
    full = uncrop(labels_nn, net_input)
    inv = np.argsort(model.nnunet_axes)
    model_grid = np.transpose(full, inv)
    zoom_fn = zoom or zoom_labels
    canon = zoom_fn(model_grid, resampled.canonical_shape) if resampled.resampled else model_grid
    return contiguous(resampled.reorient.from_canonical(canon))


def contiguous(arr: np.ndarray) -> np.ndarray:
    """``arr`` if it is C- or Fortran-contiguous, else a copy in the layout closer to its memory order."""
    if arr.flags.c_contiguous or arr.flags.f_contiguous:
        return arr
    perm = memory_order_axes(arr)
    return np.ascontiguousarray(arr.transpose(perm)).transpose(np.argsort(perm))


def model_grid_labels(labels_nn: np.ndarray, net_input: NetworkInput, model: ModelFolder) -> np.ndarray:
    """Labels on the model's (3 mm, canonical) grid in nibabel order, uncropped."""
    return np.ascontiguousarray(np.transpose(uncrop(labels_nn, net_input), np.argsort(model.nnunet_axes)))
