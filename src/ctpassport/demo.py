"""``ctpassport demo``: the whole job on a phantom (or the user's two scans), with a report.

Stages (each timed): choose the model (TotalSegmentator's real fast weights when installed, else the embedded
demo model) -> make a phantom baseline and follow-up with a known motion (or read the user's files) ->
segment both -> passports -> register the passports (rigid and deformable tiers) -> warp the follow-up onto
the baseline -> measure (registration error against the known truth, label overlap, segmentation Dice against
the phantom's labels) -> figures -> ``report.html`` (self-contained, pictures embedded) and ``report.json``.

Conventions: world coordinates are mm RAS+. Registration transforms map baseline (fixed) points to follow-up
(moving) points; the target registration error at a baseline point ``x`` is ``|T_est(x) - T_true(x)|`` with
``T_true`` the phantom's :class:`~ctpassport.phantom.motion.TrueTransform` (same direction).
"""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .bench.metrics import dice_per_class
from .errors import CTPassportError, InputError, ModelError, RegistrationError
from .io.atomic import atomic_path, check_writable

TIERS = ("rigid", "deformable")
#: Number of baseline points at which the registration error is measured (deterministic sample).
TRE_POINTS = 20000


@dataclass
class ModelChoice:
    """Which model the demo runs and why (``kind``: ``totalsegmentator``, ``demo`` or ``user``)."""

    path: Path
    kind: str
    message: str


@dataclass
class DemoResult:
    """What :func:`run_demo` produced: the output folder, the report paths and the numbers (``report``)."""

    out_dir: Path
    report_html: Path
    report_json: Path
    report: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------
# model choice
# ------------------------------------------------------------------------------------------------------
def _is_standin(trainer: Path) -> bool:
    from .model.checkpoint import read_checkpoint_structure

    try:
        return "ctpassport_standin" in read_checkpoint_structure(trainer / "fold_0" / "checkpoint_final.pth")
    except ModelError:
        return True


def choose_model(model: str | Path | None = None, environ: dict[str, str] | None = None) -> ModelChoice:
    """The model the demo uses: ``model`` when given; else TotalSegmentator's installed fast weights (found like
    TotalSegmentator does; ctpassport stand-in weights do not count); else the embedded demo model."""
    from .model.demo import demo_model_dir
    from .model.folder import locate_model

    if model is not None:
        path = locate_model(model)
        return ModelChoice(path, "user", f"Using the model at {path}")
    try:
        found = locate_model(None, environ)
    except ModelError:
        found = None
    if found is not None and not _is_standin(found):
        return ModelChoice(found, "totalsegmentator", f"Using TotalSegmentator's fast model at {found}")
    why = "only ctpassport stand-in weights are installed" if found is not None else \
        "no TotalSegmentator weights are installed"
    return ModelChoice(demo_model_dir(), "demo",
                       f"Using ctpassport's embedded demo model ({why}; trained on phantoms, a demo only)")


# ------------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------------
def _stats(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(v.mean()), 3), "median": round(float(np.median(v)), 3),
            "p95": round(float(np.percentile(v, 95)), 3), "max": round(float(v.max()), 3), "n": int(v.size)}


def sample_points(labels: np.ndarray, affine: np.ndarray, n: int = TRE_POINTS, seed: int = 0) -> np.ndarray:
    """Up to ``n`` world points (mm RAS+) of voxel centres with a label > 0 (deterministic sample)."""
    idx = np.argwhere(labels > 0)
    if len(idx) == 0:
        raise InputError("the baseline segmentation is empty: nothing to measure the registration on")
    if len(idx) > n:
        idx = idx[np.random.default_rng(seed).choice(len(idx), n, replace=False)]
    return idx @ affine[:3, :3].T + affine[:3, 3]


def _mean_dice(d: dict[int, float], common: set[int] | None = None) -> float | None:
    vals = [v for k, v in d.items() if common is None or k in common]
    return round(float(np.mean(vals)), 4) if vals else None


# ------------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------------
def _lut() -> np.ndarray:
    from .passport.show import organ_color

    lut = np.zeros((256, 4), dtype=np.float64)
    for k in range(1, 256):
        lut[k, :3] = organ_color(k)
        lut[k, 3] = 0.5
    return lut


def _canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from .io.nifti import spacing_from_affine
    from .io.orientation import reorientation

    ro = reorientation(affine, data.shape)
    return ro.to_canonical(data), spacing_from_affine(ro.canonical_affine)


def _views(vol: np.ndarray, k: tuple[int, int, int]) -> list[tuple[str, np.ndarray, int]]:
    """Axial, coronal, sagittal slices of a canonical (RAS) volume, oriented for display (radiological)."""
    i, j, kk = k
    ax = vol[::-1, :, kk].T  # rows: posterior->anterior; columns: patient right on the left
    co = vol[::-1, j, :].T
    sa = vol[i, :, :].T
    return [("axial", ax, 0), ("coronal", co, 1), ("sagittal", sa, 2)]


def _aspect(sp: np.ndarray, view: int) -> float:
    return float({0: sp[1] / sp[0], 1: sp[2] / sp[0], 2: sp[2] / sp[1]}[view])


def _centre_slices(labels_c: np.ndarray) -> tuple[int, int, int]:
    from .model.classes import NAME_TO_ID

    for name in ("liver", "kidney_right", "spleen"):
        idx = np.argwhere(labels_c == NAME_TO_ID[name])
        if len(idx):
            c = idx.mean(axis=0).round().astype(int)
            return int(labels_c.shape[0] // 2), int(c[1]), int(c[2])
    return tuple(int(s // 2) for s in labels_c.shape)  # type: ignore[return-value]


def fig_slices(ct: np.ndarray, labels: np.ndarray, affine: np.ndarray, title: str, path: Path) -> Path:
    """Axial/coronal/sagittal CT slices (window -400..600 HU) with the label overlay; PNG."""
    from matplotlib.figure import Figure

    ctc, sp = _canonical(ct, affine)
    labc, _ = _canonical(labels, affine)
    k = _centre_slices(labc)
    lut = _lut()
    fig = Figure(figsize=(15, 5.6), dpi=80)
    for n, ((name, img, view), (_, lab, _)) in enumerate(zip(_views(ctc, k), _views(labc, k))):
        ax = fig.add_subplot(1, 3, n + 1)
        ax.imshow(np.clip(img, -400, 600), cmap="gray", origin="lower", aspect=_aspect(sp, view),
                  interpolation="nearest")
        ax.imshow(lut[lab.astype(np.int64)], origin="lower", aspect=_aspect(sp, view), interpolation="nearest")
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def fig_overlays(fixed: np.ndarray, moved: dict[str, np.ndarray], affine: np.ndarray, path: Path) -> Path:
    """Fixed (magenta) over each resampled moving image (green): grey where they agree; PNG."""
    from matplotlib.figure import Figure

    fc, sp = _canonical(fixed, affine)
    k = (int(fc.shape[0] // 2), int(fc.shape[1] // 2), int(fc.shape[2] // 2))
    fig = Figure(figsize=(5 * len(moved), 9), dpi=80)

    def norm(v: np.ndarray) -> np.ndarray:
        return np.clip((v + 400.0) / 1000.0, 0, 1)

    for col, (name, mv) in enumerate(moved.items()):
        mc, _ = _canonical(mv, affine)
        for row, ((view_name, f_img, view), (_, m_img, _)) in enumerate(zip(_views(fc, k)[:2], _views(mc, k)[:2])):
            ax = fig.add_subplot(2, len(moved), row * len(moved) + col + 1)
            rgb = np.stack([norm(f_img), norm(m_img), norm(f_img)], axis=-1)
            ax.imshow(rgb, origin="lower", aspect=_aspect(sp, view), interpolation="nearest")
            ax.set_title(f"{name} ({view_name})")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("baseline (magenta) vs follow-up (green): grey = aligned")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def fig_bars(values: dict[str, float], title: str, xlabel: str, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 0.35 * len(values) + 1.5), dpi=80)
    ax = fig.add_subplot(1, 1, 1)
    names = list(values)
    ax.barh(range(len(names)), [values[n] for n in names], color="#4a7ab0")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    for i, n in enumerate(names):
        ax.text(values[n], i, f" {values[n]:.2f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def fig_tre(errors: dict[str, np.ndarray], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4), dpi=80)
    ax = fig.add_subplot(1, 1, 1)
    top = max(float(np.percentile(e, 99)) for e in errors.values())
    bins = [float(b) for b in np.linspace(0, max(top, 1.0), 60)]
    for name, e in errors.items():
        ax.hist(e, bins=bins, histtype="step", linewidth=2, label=f"{name}: median {np.median(e):.2f} mm")
    ax.set_xlabel("registration error |T_est(x) - T_true(x)| (mm) at baseline points")
    ax.set_ylabel("points")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


# ------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------
def run_demo(out_dir: str | Path, *, baseline: str | Path | None = None, follow_up: str | Path | None = None,
             true_transform: str | Path | None = None, model: str | Path | None = None, seed: int = 0,
             motion_seed: int = 1, spacing: str = "3", orientation: str = "RAS", backend: str | None = None,
             threads: int | None = None, force: bool = False, log: Callable[[str], None] = print,
             warn: Callable[[str], None] | None = None) -> DemoResult:
    """Run the demo into ``out_dir`` (written atomically as a whole; refused if it exists unless ``force``).

    Without ``baseline``/``follow_up``: phantom ``seed`` at ``spacing`` mm in ``orientation`` and its follow-up
    (``motion_seed``) with the known true transform. With them: the user's two CTs (NIfTI, or DICOM when the
    DICOM extra is installed); ``true_transform`` (a phantom true-transform JSON, baseline -> follow-up) adds
    the error against the truth. Returns the report paths and numbers. ``log`` gets progress lines, ``warn``
    (default ``log``) warnings about the inputs (e.g. a label map given as a CT).
    """
    from .config import Config
    from .segment.pipeline import Segmenter

    if (baseline is None) != (follow_up is None):
        raise InputError("pass both --baseline and --follow-up (or neither, for the phantom demo)")
    if true_transform is not None and baseline is None:
        raise InputError("--true-transform goes with --baseline and --follow-up (the phantom demo knows its own)",
                         true_transform)
    try:
        import matplotlib  # noqa: F401 - the report's pictures
    except ImportError:  # pragma: no cover - viz extra missing
        raise CTPassportError("ctpassport demo draws its report with matplotlib",
                              hint="pip install 'ctpassport[viz]'") from None
    out = check_writable(out_dir, force, folder=True)
    from .segment.pipeline import Timings

    clock = Timings()
    report: dict[str, Any] = {"kind": "ctpassport-demo", "ctpassport_version": __version__,
                              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "conventions": {"frame": "world mm RAS+",
                                              "transform": "T maps baseline (fixed) points to follow-up (moving) "
                                                           "points; TRE(x) = |T_est(x) - T_true(x)|"}}
    with atomic_path(out, is_dir=True) as tmp:
        figs = tmp / "figures"
        figs.mkdir()
        with clock.stage("choose_model"):
            choice = choose_model(model)
        log(choice.message)
        report["model"] = {"kind": choice.kind, "path": str(choice.path), "message": choice.message}
        with clock.stage("load_model"):
            cfg = Config.from_env()
            seg = Segmenter(choice.path, backend=backend, threads=threads, config=cfg)
        report["model"]["model_id"] = seg.model.model_id
        report["model"]["backend"] = seg.backend_name

        # -- inputs -----------------------------------------------------------------------------------
        truth_labels: dict[str, np.ndarray] = {}
        motion = None
        if baseline is None:
            log(f"Making phantom {seed} (baseline and follow-up, {spacing} mm, {orientation})")
            with clock.stage("phantom"):
                base_img, fu_img, truth_labels, motion = _phantom_inputs(tmp, seed, motion_seed, spacing, orientation)
            report["inputs"] = {"mode": "phantom", "seed": seed, "motion_seed": motion_seed, "spacing": spacing,
                                "orientation": orientation, "shape": list(base_img.shape),
                                "true_transform": "true_transform.json",
                                "true_motion": _motion_summary(motion)}
        else:
            from .io.load import load_ct

            with clock.stage("read_inputs"):
                base_img, fu_img = load_ct(Path(baseline)), load_ct(Path(follow_up))  # type: ignore[arg-type]
            from .io.load import label_map_suspicion

            for path, img in ((baseline, base_img), (follow_up, fu_img)):
                why = label_map_suspicion(img.data)
                if why:
                    (warn or log)(f"{path}: {why}")
            if true_transform is not None:
                from .phantom import load_true_transform

                motion = load_true_transform(true_transform)
            report["inputs"] = {"mode": "files", "baseline": str(baseline), "follow_up": str(follow_up),
                                "baseline_shape": list(base_img.shape), "follow_up_shape": list(fu_img.shape),
                                "true_transform": str(true_transform) if true_transform else None}

        # -- segmentation -----------------------------------------------------------------------------
        results = {}
        for role, img in (("baseline", base_img), ("follow_up", fu_img)):
            log(f"Segmenting the {role.replace('_', '-')}")
            with clock.stage(f"segment_{role}"):
                results[role] = seg.segment(img)
            from .segment.pipeline import write_segmentation

            with clock.stage("write"):
                present = sorted(int(k) for k in np.unique(results[role].labels) if k > 0)
                from .model.classes import TOTAL_CLASSES

                write_segmentation(results[role].labels, img.affine, img.header, tmp / f"{role}_seg.nii.gz",
                                   {k: TOTAL_CLASSES.get(k, f"label_{k}") for k in present}, ml=True)
        seg_report: dict[str, Any] = {}
        for role, r in results.items():
            entry: dict[str, Any] = {"labels": int(len(np.unique(r.labels)) - 1), "tiles": r.n_tiles,
                                     "seconds": round(clock.seconds[f"segment_{role}"], 3)}
            if role in truth_labels:
                d = dice_per_class(r.labels, truth_labels[role])
                present_truth = {int(k) for k in np.unique(truth_labels[role])} - {0}
                entry["dice_vs_phantom_truth_mean"] = _mean_dice(d, present_truth)
                entry["dice_vs_phantom_truth"] = {_name(k): round(v, 4) for k, v in d.items() if k in present_truth}
            seg_report[role] = entry
        report["segmentation"] = seg_report

        # -- passports --------------------------------------------------------------------------------
        from .passport.build import build_passport
        from .passport.schema import Source, save_passport

        passports = {}
        for role, img in (("baseline", base_img), ("follow_up", fu_img)):
            with clock.stage(f"passport_{role}"):
                r = results[role]
                passports[role] = build_passport(r.labels, img.affine, ct=img.data, model_id=seg.model.model_id,
                                                 source=Source(path=str(img.path) if img.path else f"{role}.nii.gz"),
                                                 timings=r.timings.seconds, normals=True,  # for registration
                                                 body=True)
                save_passport(passports[role], tmp / f"{role}_passport.json")
        report["passports"] = {role: {"organs": len(p.organs),
                                      "skin_points": len(p.body.boundary_points_mm) if p.body else 0,
                                      "seconds": round(clock.seconds[f"passport_{role}"], 3)}
                               for role, p in passports.items()}

        # -- registration -----------------------------------------------------------------------------
        from .register import register_passports

        regs = {}
        reg_report: dict[str, Any] = {}
        for tier in TIERS:
            log(f"Registering the passports ({tier})")
            with clock.stage(f"register_{tier}"):
                try:
                    regs[tier] = register_passports(passports["baseline"], passports["follow_up"], tier=tier)
                except CTPassportError as exc:
                    reg_report[tier] = {"error": str(exc)}
                    log(f"  {tier} registration failed: {exc}")
                    continue
            regs[tier].save(tmp / f"registration_{tier}")
            rs = regs[tier].summary.get("rigid", {})
            reg_report[tier] = {"rotation_deg": rs.get("rotation_deg"), "translation_mm": rs.get("translation_mm"),
                                "rms_residual_mm": rs.get("rms_residual_mm"), "organs_used": rs.get("organs_used"),
                                "seconds": round(clock.seconds[f"register_{tier}"], 3),
                                "timings_s": regs[tier].summary.get("timings_s")}
        if not regs:
            raise RegistrationError(f"{baseline or 'baseline'} -> {follow_up or 'follow-up'}: registration failed "
                                    "in both tiers: " + "; ".join(v["error"] for v in reg_report.values()))

        # -- warp -------------------------------------------------------------------------------------
        from .io.nifti import Image3D, make_nifti, save_nifti
        from .register.transform import GridSpec, RigidTransform, Transform
        from .register.warp import resample

        ref = GridSpec(base_img.shape, base_img.affine)
        moved_ct: dict[str, np.ndarray] = {}
        moved_lab: dict[str, np.ndarray] = {}
        with clock.stage("warp"):
            fu_ct = np.asarray(fu_img.data, dtype=np.float32)
            if ref.same_as(GridSpec(fu_img.shape, fu_img.affine)):
                moved_ct["no registration"] = fu_ct
                moved_lab["no registration"] = results["follow_up"].labels
            else:
                ident = Transform(RigidTransform.identity())
                moved_ct["no registration"] = resample(fu_ct, fu_img.affine, ident, ref, fill=-1024.0)
                moved_lab["no registration"] = resample(results["follow_up"].labels, fu_img.affine, ident, ref,
                                                        labels=True)
            for tier, reg in regs.items():
                w = reg.warp_image(Image3D(fu_ct, fu_img.affine, None), ref, fill=-1024.0)  # type: ignore[arg-type]
                wl = reg.warp_image(Image3D(results["follow_up"].labels, fu_img.affine, None), ref,  # type: ignore[arg-type]
                                    labels=True)
                moved_ct[tier], moved_lab[tier] = w.data, wl.data
                save_nifti(make_nifti(np.rint(w.data).astype(np.int16), base_img.affine, dtype=np.int16),
                           tmp / f"follow_up_warped_{tier}.nii.gz")
                save_nifti(make_nifti(wl.data.astype(np.uint8), base_img.affine, dtype=np.uint8),
                           tmp / f"follow_up_warped_{tier}_seg.nii.gz")

        # -- measurements -----------------------------------------------------------------------------
        with clock.stage("evaluate"):
            base_lab = results["baseline"].labels
            overlap = {}
            for name, warped_lab in moved_lab.items():
                d = dice_per_class(base_lab, warped_lab)
                common = (set(np.unique(base_lab)) & set(np.unique(results["follow_up"].labels))) - {0}
                overlap[name] = _mean_dice(d, {int(k) for k in common})
            for tier, entry in reg_report.items():
                if tier in regs:
                    entry["label_dice_after_warp"] = overlap[tier]
            reg_report["no registration"] = {"label_dice_after_warp": overlap["no registration"]}
            tre_err: dict[str, np.ndarray] = {}
            if motion is not None:
                pts = sample_points(base_lab, base_img.affine)
                truth_pts = motion.apply(pts)
                tre_err["no registration"] = np.linalg.norm(pts - truth_pts, axis=1)
                for tier, reg in regs.items():
                    tre_err[tier] = np.linalg.norm(reg.transform_points(pts) - truth_pts, axis=1)
                cents = np.array([o.centroid_mm for o in passports["baseline"].organs])
                report["registration_error"] = {
                    "points": "baseline voxels inside the baseline segmentation (deterministic sample)",
                    "tre_mm": {k: _stats(v) for k, v in tre_err.items()},
                    "tre_at_organ_centroids_mm": {
                        "no registration": _stats(np.linalg.norm(cents - motion.apply(cents), axis=1)),
                        **{t: _stats(np.linalg.norm(r.transform_points(cents) - motion.apply(cents), axis=1))
                           for t, r in regs.items()}},
                }
            else:
                report["registration_error"] = None
        report["registration"] = reg_report

        # -- figures and report -----------------------------------------------------------------------
        log("Drawing the report")
        with clock.stage("figures"):
            from .passport.show import render_png

            pics = {
                "slices_baseline": fig_slices(base_img.data, results["baseline"].labels, base_img.affine,
                                              "baseline: CT with ctpassport labels", figs / "slices_baseline.png"),
                "slices_follow_up": fig_slices(fu_img.data, results["follow_up"].labels, fu_img.affine,
                                               "follow-up: CT with ctpassport labels", figs / "slices_follow_up.png"),
                "passport_baseline": render_png(passports["baseline"], figs / "passport_baseline.png", dpi=60),
                "passport_follow_up": render_png(passports["follow_up"], figs / "passport_follow_up.png", dpi=60),
                "overlays": fig_overlays(np.asarray(base_img.data, dtype=np.float32), moved_ct, base_img.affine,
                                         figs / "overlays.png"),
            }
            if tre_err:
                pics["tre"] = fig_tre(tre_err, figs / "tre.png")
        report["timings_s"] = {k: round(v, 3) for k, v in clock.seconds.items()}
        report["timings_s"]["total"] = round(sum(clock.seconds.values()), 3)
        with clock.stage("report"):
            pics["timings"] = fig_bars({k: v for k, v in clock.seconds.items()}, "time per stage", "seconds",
                                       figs / "timings.png")
            (tmp / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
            (tmp / "report.html").write_text(_html(report, pics), encoding="utf-8")
    log(f"Wrote {out / 'report.html'} ({report['timings_s']['total']:.1f} s)")
    return DemoResult(out_dir=out, report_html=out / "report.html", report_json=out / "report.json", report=report)


def _name(k: int) -> str:
    from .model.classes import TOTAL_CLASSES

    return TOTAL_CLASSES.get(int(k), f"label_{k}")


def _motion_summary(motion: Any) -> dict[str, Any]:
    from .phantom.motion import rotation_angle_deg

    return {"rotation_deg": round(rotation_angle_deg(motion.R), 3),
            "translation_mm": [round(v, 3) for v in motion.translation],
            "diaphragm_shift_mm": round(motion.deformation.diaphragm_shift, 3),
            "chest_expansion_mm": round(motion.deformation.chest_expansion, 3)}


def _phantom_inputs(tmp: Path, seed: int, motion_seed: int, spacing: str, orientation: str) -> tuple[Any, Any, dict[str, np.ndarray], Any]:
    from .io.nifti import read_image
    from .phantom import write_phantom

    write_phantom(tmp / "baseline.nii.gz", tmp / "baseline_truth_labels.nii.gz", seed=seed, spacing=spacing,
                  orientation=orientation, follow_up=tmp / "follow_up.nii.gz",
                  follow_up_labels=tmp / "follow_up_truth_labels.nii.gz", transform=tmp / "true_transform.json",
                  truth=tmp / "phantom_truth.json", motion_seed=motion_seed, force=True)
    from .phantom import load_true_transform

    base, fu = read_image(tmp / "baseline.nii.gz", kind="CT"), read_image(tmp / "follow_up.nii.gz", kind="CT")
    truth = {"baseline": np.asarray(read_image(tmp / "baseline_truth_labels.nii.gz").data),
             "follow_up": np.asarray(read_image(tmp / "follow_up_truth_labels.nii.gz").data)}
    return base, fu, truth, load_true_transform(tmp / "true_transform.json")


def _img(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _table(rows: list[list[Any]], head: list[str]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _html(report: dict[str, Any], pics: dict[str, Path]) -> str:
    e = html.escape
    inp = report["inputs"]
    parts = [
        ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>ctpassport demo</title><style>"
         "body{font-family:sans-serif;max-width:1300px;margin:auto}table{border-collapse:collapse;margin:8px 0}"
         "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}img{max-width:100%}"
         "</style></head><body>"),
        (f"<h1>ctpassport demo</h1><p>ctpassport {e(report['ctpassport_version'])}, {e(report['created'])}. "
         f"World coordinates: {e(report['conventions']['frame'])}; {e(report['conventions']['transform'])}.</p>"),
        (f"<h2 id='model'>Model</h2><p>{e(report['model']['message'])}</p>"
         f"<p>model id <code>{e(report['model']['model_id'])}</code>, backend {e(report['model']['backend'])}</p>"),
        "<h2 id='inputs'>Inputs</h2>",
    ]
    if inp["mode"] == "phantom":
        tm = inp["true_motion"]
        parts.append(f"<p>Phantom seed {inp['seed']} ({inp['spacing']} mm, {e(inp['orientation'])}, shape "
                     f"{inp['shape']}) and its follow-up after a known motion: rotation {tm['rotation_deg']} deg, "
                     f"translation {tm['translation_mm']} mm, diaphragm shift {tm['diaphragm_shift_mm']} mm, chest "
                     f"expansion {tm['chest_expansion_mm']} mm (true transform: true_transform.json).</p>")
    else:
        parts.append(f"<p>Baseline {e(inp['baseline'])} {inp['baseline_shape']}, follow-up {e(inp['follow_up'])} "
                     f"{inp['follow_up_shape']}.</p>")
    seg = report["segmentation"]
    rows = []
    for role, s in seg.items():
        rows.append([role, s["labels"], s["tiles"], f"{s['seconds']:.2f}", s.get("dice_vs_phantom_truth_mean", "-")])
    parts += ["<h2 id='segmentation'>Segmentation</h2>",
              _table(rows, ["scan", "labels found", "tiles", "seconds", "mean Dice vs phantom truth"]),
              f"<img src='{_img(pics['slices_baseline'])}'><img src='{_img(pics['slices_follow_up'])}'>"]
    if "dice_vs_phantom_truth" in seg.get("baseline", {}):
        d = seg["baseline"]["dice_vs_phantom_truth"]
        parts.append("<details><summary>Dice per class (baseline vs phantom truth)</summary>"
                     + _table([[k, f"{v:.3f}"] for k, v in sorted(d.items(), key=lambda kv: -kv[1])], ["class", "Dice"])
                     + "</details>")
    pp = report["passports"]
    parts += ["<h2 id='passports'>Passports</h2>",
              _table([[r, p["organs"], p.get("skin_points", 0), f"{p['seconds']:.3f}"] for r, p in pp.items()],
                     ["scan", "organs", "body outline (skin points)", "seconds"]),
              f"<img src='{_img(pics['passport_baseline'])}'><img src='{_img(pics['passport_follow_up'])}'>"]
    reg = report["registration"]
    rows = []
    for tier, r in reg.items():
        if "error" in r:
            rows.append([tier, "failed: " + r["error"], "", "", "", ""])
        else:
            rows.append([tier, r.get("rotation_deg", "-"), r.get("translation_mm", "-"), r.get("rms_residual_mm", "-"),
                         r.get("label_dice_after_warp", "-"), r.get("seconds", "-")])
    parts += ["<h2 id='registration'>Registration</h2>",
              _table(rows, ["tier", "rotation (deg)", "translation (mm)", "rigid rms residual (mm)",
                            "mean label Dice after warp", "seconds"]),
              f"<img src='{_img(pics['overlays'])}'>"]
    parts.append("<h2 id='error'>Registration error against the known truth</h2>")
    err = report.get("registration_error")
    if err:
        rows = [[k, v["mean"], v["median"], v["p95"], v["max"], v["n"]] for k, v in err["tre_mm"].items()]
        parts += [f"<p>At {e(err['points'])}.</p>", _table(rows, ["", "mean (mm)", "median", "p95", "max", "points"]),
                  "<p>At the baseline organ centroids:</p>",
                  _table([[k, v["mean"], v["median"], v["p95"], v["max"], v["n"]]
                          for k, v in err["tre_at_organ_centroids_mm"].items()],
                         ["", "mean (mm)", "median", "p95", "max", "organs"]),
                  f"<img src='{_img(pics['tre'])}'>"]
    else:
        parts.append("<p>No true transform is known for these inputs (pass --true-transform to measure it); the "
                     "label overlap after warping above is the available check.</p>")
    tm = report["timings_s"]
    parts += ["<h2 id='timing'>Timing</h2>",
              _table([[k, f"{v:.3f}"] for k, v in tm.items()], ["stage", "seconds"]),
              f"<img src='{_img(pics['timings'])}'>", "</body></html>"]
    return "\n".join(parts)
