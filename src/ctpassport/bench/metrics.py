"""Agreement of a label map with the reference (TotalSegmentator's own output) and timing statistics.

Per organ: Dice ``2|A and B| / (|A| + |B|)`` for every class present in either map. ``mean_dice`` is the
mean over the classes present in **either** map (an organ one of them misses counts as 0), so missing and
extra organs lower it. ``voxel_agreement`` is the fraction of all voxels with the same label.
``agreement_margin_{t}``: the same fraction restricted to voxels whose top-2 logit margin (of the exact
fp32 path's aggregated logits) exceeds ``t``: with random stand-in weights most voxels are near-ties that
any float rounding flips, so this separates pipeline errors from rounding.
"""

from __future__ import annotations

import statistics
from typing import Any, Literal

import numpy as np

MARGINS = (0.1, 0.5)


def dice_per_class(pred: np.ndarray, ref: np.ndarray) -> dict[int, float]:
    """Dice per class id present in ``pred`` or ``ref`` (background 0 excluded); one pass with bincount."""
    if pred.shape != ref.shape:
        raise ValueError(f"label maps differ in shape: {pred.shape} vs {ref.shape}")
    # one common order, no copy
    order: Literal["F", "C"] = "F" if pred.flags.f_contiguous and ref.flags.f_contiguous else "C"
    p = np.asarray(pred).ravel(order=order).astype(np.intp)
    r = np.asarray(ref).ravel(order=order).astype(np.intp)
    n = int(max(p.max(initial=0), r.max(initial=0))) + 1
    cp = np.bincount(p, minlength=n)
    cr = np.bincount(r, minlength=n)
    both = np.bincount(p[p == r], minlength=n)
    out: dict[int, float] = {}
    for k in range(1, n):
        denom = cp[k] + cr[k]
        if denom:
            out[k] = float(2.0 * both[k] / denom)
    return out


#: Organs smaller than this in both label maps (ml) are left out of ``mean_dice_1ml``: a few-voxel fragment's
#: Dice is 0, 0.5 or 1 on a single near-tie voxel, which says nothing about a pipeline's parity.
MIN_ORGAN_ML = 1.0


def agreement(pred: np.ndarray, ref: np.ndarray, names: dict[int, str],
              margin: np.ndarray | None = None, voxel_ml: float | None = None) -> dict[str, Any]:
    """Dice per organ (by name), mean Dice, voxel agreement, margin-restricted agreement, missing/extra.

    With ``voxel_ml`` (the volume of one voxel in ml) also ``mean_dice_1ml``: the mean over the organs of at
    least :data:`MIN_ORGAN_ML` in ``ref`` or in ``pred`` (None when no organ is that large), and
    ``organs_below_1ml`` (the others' names).
    """
    d = dice_per_class(pred, ref)
    present_ref = {int(k) for k in np.unique(ref) if k}
    present_pred = {int(k) for k in np.unique(pred) if k}
    same = pred == ref
    out: dict[str, Any] = {
        "mean_dice": float(np.mean(list(d.values()))) if d else 1.0,
        "voxel_agreement": float(same.mean()),
        "organs_reference": len(present_ref),
        "organs_missing": sorted(names.get(k, str(k)) for k in present_ref - present_pred),
        "organs_extra": sorted(names.get(k, str(k)) for k in present_pred - present_ref),
        "dice": {names.get(k, str(k)): round(v, 6) for k, v in sorted(d.items())},
    }
    if voxel_ml is not None:
        counts = np.maximum(np.bincount(np.asarray(ref, dtype=np.int64).ravel(), minlength=256),
                            np.bincount(np.asarray(pred, dtype=np.int64).ravel(), minlength=256))
        big = [k for k in d if counts[k] * voxel_ml >= MIN_ORGAN_ML]
        out["mean_dice_1ml"] = float(np.mean([d[k] for k in big])) if big else None  # nothing to judge
        out["organs_below_1ml"] = sorted(names.get(k, str(k)) for k in d if k not in big)
    if margin is not None:
        if margin.shape != pred.shape:
            raise ValueError(f"margin map {margin.shape} is not on the label grid {pred.shape}")
        for t in MARGINS:
            conf = margin > t
            n = int(conf.sum())
            out[f"confident_fraction_{t}"] = float(n / conf.size)
            out[f"agreement_margin_{t}"] = float(same[conf].mean()) if n else None
    return out


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0-100) of ``values``."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summarize(values: list[float]) -> dict[str, float]:
    """min / median / p95 / mean / max / n of a list of seconds (or MB)."""
    if not values:
        return {"n": 0}
    return {"min": float(min(values)), "median": float(statistics.median(values)), "p95": percentile(values, 95),
            "mean": float(statistics.fmean(values)), "max": float(max(values)), "n": len(values)}
