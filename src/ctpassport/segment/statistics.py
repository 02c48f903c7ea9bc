"""Per-class statistics like TotalSegmentator's ``--statistics`` in fast mode.

Computed on the model grid (3 mm), as TotalSegmentator does with ``--fast``: ``volume`` in mm^3 and
``intensity`` = mean HU of the resampled CT inside the mask. Masks within 3 voxels of the image border
are reported as volume 0 and intensity 0 (TotalSegmentator's ``exclude_masks_at_border``). One pass over
the volume with ``bincount`` instead of one full scan per class.
"""

from __future__ import annotations

import numpy as np

from ..types import Affine


def touches_border_ids(labels: np.ndarray, margin: int = 3) -> set[int]:
    """Label ids present within ``margin`` voxels of any face of the volume."""
    ids: set[int] = set()
    for ax in range(3):
        for sl in (slice(0, margin), slice(-margin, None)):
            idx = [slice(None)] * 3
            idx[ax] = sl
            ids.update(int(v) for v in np.unique(labels[tuple(idx)]))
    return ids


def basic_statistics(labels: np.ndarray, ct: np.ndarray, affine: Affine, classes: dict[int, str],
                     exclude_masks_at_border: bool = True) -> dict[str, dict[str, float]]:
    """``{class_name: {"volume": mm3, "intensity": mean HU}}`` for every class in ``classes``.

    ``labels`` and ``ct`` (HU, cast to int16 like TotalSegmentator) share one grid (any axis order);
    ``affine`` (voxel -> RAS+ mm) gives the voxel volume as the product of its float32 voxel sizes (as
    TotalSegmentator; not ``|det|``, so a sheared grid's volume is overstated).
    """
    vox = float(np.prod(np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)).astype(np.float32)))
    flat = labels.ravel().astype(np.intp)
    n = max(int(flat.max(initial=0)), max(classes, default=0)) + 1
    counts = np.bincount(flat, minlength=n)
    ct16 = ct.astype(np.int16).ravel().astype(np.float64)  # TotalSegmentator casts the CT to int16
    sums = np.bincount(flat, weights=ct16, minlength=n)
    border = touches_border_ids(labels) if exclude_masks_at_border else set()
    stats: dict[str, dict[str, float]] = {}
    for k, name in classes.items():
        if k in border:
            stats[name] = {"volume": 0.0, "intensity": 0.0}
        else:
            c = int(counts[k]) if k < n else 0
            stats[name] = {"volume": float(c * vox), "intensity": round(float(sums[k] / c), 5) if c else 0.0}
    return stats
