"""Passport speed benchmark: a 117-label full-torso map at 3 mm and at original resolution.

The label maps are the analytic synthetic torso of :mod:`ctpassport.passport.synthetic` (all 117
TotalSegmentator classes laid out like a neck-to-pelvis CT, rasterised at the voxel centres of each grid):
``134 x 134 x 237`` voxels of about 3 mm (the model grid) and ``512 x 512 x 450`` voxels of 0.78 x 0.78 x
1.58 mm (the original CT grid). They are stored Fortran-ordered, as nibabel returns NIfTI data.

Reported (seconds; median of repeats after one warm-up; wall clock, and the CPU time of the calling thread,
which stays meaningful on a machine shared with other jobs, where the wall clock is inflated by waiting):
``build_passport`` on each map, ``scipy.ndimage.find_objects`` alone (the one pass over the volume every
method needs) and, on the 3 mm map, a naive implementation with one full-volume scan per label (mask,
``argwhere``, moments, full-volume erosion for the surface) as the reference the one-pass method is
compared with in the same run. Ratios: time / budget (50 ms at 3 mm, 1 s at original resolution; below 1
passes), and the original study's 2.1 s (17.6 s before its fix) / our time.

Run: ``python -m ctpassport.passport.bench -o passport_speed.json``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__

#: Budgets from the issue (seconds).
BUDGET_3MM_S = 0.050
BUDGET_FULL_S = 1.0
#: The original study's passport extraction times (seconds), after and before its fix.
STUDY_S = 2.1
STUDY_BEFORE_FIX_S = 17.6

SHAPE_3MM = (134, 134, 237)
SHAPE_FULL = (512, 512, 450)


def _times(fn: Callable[[], Any], repeats: int) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU (this thread) seconds of ``repeats`` calls after one warm-up call."""
    fn()  # warm-up (imports, caches)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - t0)
    return wall, cpu


def _summary(times: tuple[list[float], list[float]]) -> dict[str, Any]:
    wall, cpu = times
    return {"median_s": statistics.median(wall), "min_s": min(wall), "max_s": max(wall), "repeats": len(wall),
            "cpu_median_s": statistics.median(cpu), "all_s": [round(t, 6) for t in wall]}


def naive_passport_moments(labels: np.ndarray, affine: np.ndarray, points: int = 500, seed: int = 0) -> dict:
    """The per-label reference: one full-volume scan per label (what the one-pass build avoids).

    ``labels[i, j, k]`` with ``affine`` (voxel -> RAS+ mm). Per label: ``mask = labels == k`` over the
    whole volume, ``argwhere``, world coordinates (mm, RAS+), centroid, ``np.cov``, a full-volume 6-neighbour
    erosion for the surface and ``points`` random surface voxels. Returns ``{id: (centroid (mm, RAS+),
    covariance (mm^2), n_points)}``.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    out = {}
    for k in (int(v) for v in np.unique(labels) if v):
        mask = labels == k
        vox = np.argwhere(mask).astype(np.float64)
        world = vox @ affine[:3, :3].T + affine[:3, 3]
        cov = np.cov(world.T) if len(world) > 1 else np.zeros((3, 3))
        surf = np.argwhere(mask & ~ndimage.binary_erosion(mask))
        pick = surf[rng.choice(len(surf), min(points, len(surf)), replace=False)]
        out[k] = (world.mean(axis=0), cov, len(pick))
    return out


def _map_info(labels: np.ndarray, affine: np.ndarray) -> dict[str, Any]:
    from ..io.nifti import spacing_from_affine

    ids = np.unique(labels)
    return {"shape": list(labels.shape), "spacing_mm": [round(float(s), 4) for s in spacing_from_affine(affine)],
            "labels_present": int((ids > 0).sum()), "voxels": int(labels.size),
            "foreground_fraction": round(float(np.count_nonzero(labels)) / labels.size, 4),
            "memory_order": "F" if labels.flags.f_contiguous and not labels.flags.c_contiguous else "C"}


def _bench_map(shape: tuple[int, int, int], repeats: int, budget: float, points: int, naive: bool) -> dict[str, Any]:
    """Time one synthetic torso grid (see :func:`passport_speed`)."""
    from scipy import ndimage

    from .build import build_passport
    from .synthetic import torso_labels

    labels_c, aff = torso_labels(shape)
    labels = np.asfortranarray(labels_c)  # as nibabel returns NIfTI data
    del labels_c
    entry = _map_info(labels, aff)
    p = build_passport(labels, aff, points=points)
    entry["organs"] = len(p.organs)
    entry["boundary_points"] = sum(len(o.boundary_points_mm) for o in p.organs)
    build = _summary(_times(lambda: build_passport(labels, aff, points=points), repeats))
    entry["build_passport"] = build
    # opt-in boundary normals (``--normals``, for registration): what they add, in the same run
    entry["build_passport_with_normals"] = _summary(
        _times(lambda: build_passport(labels, aff, points=points, normals=True), repeats))
    entry["find_objects_only"] = _summary(_times(lambda: ndimage.find_objects(labels.T), repeats))
    med = build["median_s"]
    cpu = build["cpu_median_s"]
    entry["ratios"] = {"time_over_budget": med / budget, "within_budget": bool(med < budget),
                       "cpu_time_over_budget": cpu / budget,
                       "study_over_ours": STUDY_S / med, "study_before_fix_over_ours": STUDY_BEFORE_FIX_S / med,
                       "study_over_ours_cpu": STUDY_S / cpu,
                       "ours_over_find_objects": med / entry["find_objects_only"]["median_s"],
                       "with_normals_over_ours": entry["build_passport_with_normals"]["median_s"] / med}
    if naive:
        ts = _times(lambda: naive_passport_moments(labels, aff, points=points), 1)
        entry["naive_per_label_scan"] = _summary(ts)
        entry["ratios"]["naive_over_ours"] = statistics.median(ts[0]) / med
    return entry


def passport_speed(*, repeats_3mm: int = 21, repeats_full: int = 5, shape_3mm: tuple[int, int, int] = SHAPE_3MM,
                   shape_full: tuple[int, int, int] | None = SHAPE_FULL, points: int = 500, naive: bool = True,
                   out_path: str | Path | None = None) -> dict[str, Any]:
    """Time :func:`~ctpassport.passport.build.build_passport` on the synthetic torso (see the module
    docstring); returns a JSON-serialisable dict (seconds) and writes it to ``out_path`` when given.

    ``shape_full=None`` skips the original-resolution map; ``naive=False`` skips the per-label reference.
    """
    report: dict[str, Any] = {
        "benchmark": "passport_speed",
        "what": "build_passport (moments, eigen-decomposition, surface, boundary points, pydantic Passport) "
                "on a 117-label synthetic full-torso label map; median of repeats after a warm-up",
        "maps_from": "ctpassport.passport.synthetic.torso_labels: analytic neck-to-pelvis anatomy with all "
                     "117 TotalSegmentator classes, rasterised on each grid; Fortran order like nibabel",
        "points_per_organ": points,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                    "numpy": np.__version__, "ctpassport": __version__,
                    "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
        "budgets_s": {"3mm": BUDGET_3MM_S, "full": BUDGET_FULL_S},
        "study_s": {"after_fix": STUDY_S, "before_fix": STUDY_BEFORE_FIX_S},
        "maps": {},
    }
    grids = [("3mm", shape_3mm, repeats_3mm, BUDGET_3MM_S)]
    if shape_full is not None:
        grids.append(("full", shape_full, repeats_full, BUDGET_FULL_S))
    for name, shape, repeats, budget in grids:
        report["maps"][name] = _bench_map(shape, repeats, budget, points, naive and name == "3mm")
    if out_path is not None:
        from ..io.atomic import write_text_atomic

        write_text_atomic(out_path, json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m ctpassport.passport.bench [-o out.json] [--quick]``: print and optionally save the report."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ctpassport.passport.bench", description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--output", type=Path, default=None, help="JSON report to write")
    ap.add_argument("--quick", action="store_true", help="fewer repeats, no naive reference")
    args = ap.parse_args(argv)
    rep = passport_speed(repeats_3mm=5 if args.quick else 21, repeats_full=2 if args.quick else 5,
                         naive=not args.quick, out_path=args.output)
    for name, e in rep["maps"].items():
        r = e["ratios"]
        print(f"{name:>4}: {e['shape']} {e['labels_present']} labels: build_passport median "
              f"{1000 * e['build_passport']['median_s']:.1f} ms wall, {1000 * e['build_passport']['cpu_median_s']:.1f}"
              f" ms CPU (budget {1000 * rep['budgets_s'][name]:.0f} ms, ratio {r['time_over_budget']:.2f}); "
              f"find_objects {1000 * e['find_objects_only']['median_s']:.1f} ms; with --normals "
              f"{1000 * e['build_passport_with_normals']['median_s']:.1f} ms"
              + (f"; naive per-label scans {r['naive_over_ours']:.0f}x slower" if "naive_over_ours" in r else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
