"""Registration in the app: run :func:`ctpassport.register.register_passports` on a baseline and a follow-up,
measure per-organ residuals and (for phantoms) the true registration error, warp the follow-up for the viewer,
and save the transform files in the session workspace.

Convention (as in :mod:`ctpassport.register`): the transform ``T`` maps a **baseline (fixed)** world point to
the **follow-up (moving)** world point, mm RAS+; the warped follow-up is ``moving(T(x))`` on the baseline's grid.
"""

from __future__ import annotations

import html
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RegistrationError
from ..io.nifti import Image3D
from .core import Study

#: Points used for the true registration error of phantoms: voxel centres inside organs, at most this many.
TRE_POINTS = 20000


@dataclass
class Side:
    """One side of a registration: a passport and, when there is one, the study (image) it came from."""

    name: str
    passport: Any
    study: Study | None = None
    labels: np.ndarray | None = None  # on the study's grid
    kind: str = "study"  # study | store


@dataclass
class RegistrationRun:
    """A finished registration, its measurements and files (``folder``: transform.h5, displacement.nii.gz,
    registration.json, residuals.csv)."""

    fixed: Side
    moving: Side
    tier: str
    result: Any
    folder: Path
    residuals: list[dict[str, Any]]
    tre: dict[str, dict[str, float]] | None = None
    warped: Image3D | None = None
    warped_labels: np.ndarray | None = None
    before: Image3D | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def has_images(self) -> bool:
        return self.warped is not None

    def shift_at_organs_mm(self) -> float:
        """How far the rigid part moves the baseline's anatomy: ``|R c + t - c|`` (mm) at ``c``, the mean of the
        baseline passport's organ centroids (world mm, RAS+). The transform's own translation is measured about
        the world origin, which scanners put anywhere (often a metre away at the table), so its length says
        little about the patient's motion; this does not depend on where the origin is."""
        organs = self.fixed.passport.organs
        if not organs:
            return float(np.linalg.norm(self.result.translation))
        c = np.mean([o.centroid_mm for o in organs], axis=0)
        rigid = self.result.transform.rigid
        return float(np.linalg.norm(rigid.rotation @ c + rigid.translation - c))

    def metrics(self) -> dict[str, Any]:
        """Headline numbers: organs used, RMS centroid residual (mm), rotation (deg), translation (mm: the shift
        of the baseline's organ centre, :meth:`shift_at_organs_mm`), TRE."""
        rigid = self.result.summary.get("rigid", {})
        out = {
            "organs used": rigid.get("organs_used"),
            "rigid RMS residual (mm)": rigid.get("rms_residual_mm"),
            "rotation (deg)": rigid.get("rotation_deg"),
            "translation (mm)": self.shift_at_organs_mm(),
        }
        if self.tre is not None:
            out["TRE mean (mm)"] = self.tre["registered"]["mean"]
            out["TRE max (mm)"] = self.tre["registered"]["max"]
        return out

    def report_html(self) -> str:
        """The registration section of the HTML report."""
        from .downloads import _table

        m = self.metrics()
        parts = [
            (
                f"<p>Baseline (fixed) <b>{html.escape(self.fixed.name)}</b>, follow-up (moving) "
                f"<b>{html.escape(self.moving.name)}</b>, tier <b>{html.escape(self.tier)}</b>: "
                f"{m['organs used']} organs used, rigid RMS residual {m['rigid RMS residual (mm)']:.2f} mm, "
                f"rotation {m['rotation (deg)']:.2f} deg, translation {m['translation (mm)']:.1f} mm (at the organs' centre), "
                f"{self.seconds.get('register', 0.0):.2f} s.</p>"
            )
        ]
        if self.tre is not None:
            rows = [
                {"stage": k, **{q: round(v, 2) for q, v in s.items() if q != "n"}, "n": s.get("n")}
                for k, s in self.tre.items()
            ]
            parts.append(
                "<p>True registration error (known phantom motion), mm, at voxel centres inside organs:</p>"
            )
            parts.append(
                _table(
                    rows,
                    [
                        ("stage", "stage"),
                        ("mean", "mean"),
                        ("median", "median"),
                        ("p95", "p95"),
                        ("max", "max"),
                        ("n", "points"),
                    ],
                )
            )
        parts.append(
            "<p class='note'>Residuals per organ after registration: centroid distance |T(c_fixed) - "
            "c_moving| and mean surface distance from the mapped baseline boundary points to the follow-up's "
            "(mm).</p>"
        )
        parts.append(
            _table(
                self.residuals,
                [
                    ("id", "id"),
                    ("organ", "organ"),
                    ("status", "status"),
                    ("weight", "weight"),
                    ("centroid_mm", "centroid (mm)"),
                    ("surface_mm", "surface (mm)"),
                ],
            )
        )
        if self.has_images and self.fixed.study is not None:
            from . import viewer
            from .downloads import square_pixels

            assert self.warped is not None  # has_images
            view = viewer.canonical_view(self.fixed.study.image.data, self.fixed.study.image.affine)
            warped = viewer.canonical_view(self.warped.data, self.warped.affine)
            cur = viewer.best_slices(
                view.with_labels(viewer.canonical_labels(self.fixed.labels, self.fixed.study.image.affine))
                if self.fixed.labels is not None
                else view
            )
            figs = []
            for plane in viewer.PLANES:
                idx = cur[{"sagittal": 0, "coronal": 1, "axial": 2}[plane]]
                w = viewer.WINDOWS["Soft tissue"]
                rgb = viewer.fusion_rgb(
                    viewer.window_gray(viewer.display_slice(view.ct, plane, idx), *w),
                    viewer.window_gray(viewer.display_slice(warped.ct, plane, idx), *w),
                )
                uri = viewer.png_data_uri(square_pixels(rgb, viewer.pixel_mm(view, plane)))
                figs.append(
                    f"<figure><img src='{uri}' alt='{plane}'><figcaption>{plane}: baseline magenta, "
                    f"warped follow-up green</figcaption></figure>"
                )
            parts.append("<div class='imgs'>" + "".join(figs) + "</div>")
        return "\n".join(parts)


def residual_rows(result: Any, fixed: Any, moving: Any) -> list[dict[str, Any]]:
    """Per organ of the rigid fit's report: status, anatomical weight, the centroid residual after the final
    transform ``|T(c_fixed) - c_moving|`` (mm) and the mean distance (mm) from ``T`` of the fixed boundary points
    to the nearest moving boundary points of the same organ (None where an organ is missing on one side)."""
    from scipy.spatial import cKDTree

    fo, mo = fixed.by_id(), moving.by_id()
    rows = []
    for o in result.rigid_fit.organs:
        row: dict[str, Any] = {
            "id": o.id,
            "organ": o.name or f"label {o.id}",
            "status": o.status,
            "weight": round(float(o.weight * o.robust_weight), 3),
            "centroid_mm": None,
            "surface_mm": None,
        }
        f, m = fo.get(o.id), mo.get(o.id)
        if f is not None and m is not None:
            c = result.transform.apply(np.asarray([f.centroid_mm]))[0]
            row["centroid_mm"] = round(float(np.linalg.norm(c - np.asarray(m.centroid_mm))), 2)
            pf, pm = f.points_array(), m.points_array()
            if len(pf) and len(pm):
                d, _ = cKDTree(pm).query(result.transform.apply(pf))
                row["surface_mm"] = round(float(np.mean(d)), 2)
        rows.append(row)
    order = {"used": 0, "downweighted": 1, "dropped": 2}
    return sorted(
        rows,
        key=lambda r: (order.get(r["status"], 3), -(r["centroid_mm"] is not None), r["centroid_mm"] or 0.0),
    )


def tre_points(labels: np.ndarray, affine: np.ndarray, n: int = TRE_POINTS, seed: int = 0) -> np.ndarray:
    """Up to ``n`` voxel centres (world mm, RAS+) inside labelled voxels, a deterministic random subset."""
    idx = np.flatnonzero(np.asarray(labels).ravel(order="C") > 0)
    if idx.size > n:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=n, replace=False))
    vox = np.stack(np.unravel_index(idx, labels.shape), axis=1).astype(np.float64)
    return vox @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def true_error(result: Any, truth: Any, points: np.ndarray) -> dict[str, dict[str, float]]:
    """TRE (mm) against the known transform ``truth`` (``apply``: fixed -> moving world points) at ``points``:
    without registration (identity), after the rigid part, and after the full transform."""
    from ..register.metrics import tre_stats

    target = truth.apply(points)
    out = {
        "before": tre_stats(points, target),
        "rigid": tre_stats(result.transform.rigid.apply(points), target),
    }
    if result.tier != "rigid":
        out["registered"] = tre_stats(result.transform.apply(points), target)
    else:
        out["registered"] = out["rigid"]
    return out


def run_registration(
    fixed: Side, moving: Side, tier: str, folder: Path, *, method: str = "demons"
) -> RegistrationRun:
    """Register ``moving`` to ``fixed`` (``tier``: rigid | deformable), measure residuals and TRE (when the
    follow-up carries its true transform), warp the follow-up image and labels onto the baseline's grid when
    both images are there, and write the transform files, ``residuals.csv`` and ``tre.json`` into ``folder``
    (which must not exist yet; nothing is left there when anything fails)."""
    import json

    from ..register import register_passports
    from ..register.transform import RigidTransform, Transform
    from ..register.warp import warp_image

    secs: dict[str, float] = {}
    t0 = time.perf_counter()
    result = register_passports(fixed.passport, moving.passport, tier=tier, method=method)
    secs["register"] = time.perf_counter() - t0
    residuals = residual_rows(result, fixed.passport, moving.passport)
    tre = None
    truth = moving.study.truth.get("transform") if moving.study is not None else None
    if truth is not None and fixed.study is not None:
        base_labels = fixed.study.truth_labels if fixed.study.truth_labels is not None else fixed.labels
        if base_labels is not None:
            tre = true_error(result, truth, tre_points(base_labels, fixed.study.image.affine))
    warped = warped_labels = before = None
    if fixed.study is not None and moving.study is not None:
        t1 = time.perf_counter()
        warped = result.warp_image(moving.study.image, fixed.study.image)
        before = warp_image(Transform(RigidTransform.identity()), moving.study.image, fixed.study.image)
        if moving.labels is not None:
            lab = Image3D(
                data=moving.labels, affine=moving.study.image.affine, header=moving.study.image.header
            )
            warped_labels = result.warp_image(lab, fixed.study.image, labels=True).data
        secs["warp"] = time.perf_counter() - t1
    try:
        result.save(folder)
        (folder / "residuals.csv").write_text(_csv(residuals), encoding="utf-8")
        if tre is not None:
            (folder / "tre.json").write_text(json.dumps(tre, indent=1), encoding="utf-8")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return RegistrationRun(
        fixed=fixed,
        moving=moving,
        tier=tier,
        result=result,
        folder=folder,
        residuals=residuals,
        tre=tre,
        warped=warped,
        warped_labels=warped_labels,
        before=before,
        seconds=secs,
    )


def _csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = [",".join(keys)]
    for r in rows:
        lines.append(",".join("" if r[k] is None else str(r[k]) for k in keys))
    return "\n".join(lines) + "\n"


def check_pair(fixed: Side, moving: Side) -> None:
    """Refuse to register a passport with itself: the same object, or two passports of one CT (the same
    ``source.sha256``, e.g. one store record picked for both sides, or the current study and its stored copy)."""
    a, b = fixed.passport.source.sha256, moving.passport.source.sha256
    if fixed.passport is moving.passport or (a is not None and a == b):
        raise RegistrationError(
            "the baseline and the follow-up are the same study: choose two different ones"
        )
