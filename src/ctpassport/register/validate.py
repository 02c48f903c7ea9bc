"""The registration validation suite (``ctpassport validate-registration``).

Everything is world mm, RAS+; ``T`` maps fixed to moving (pull-back). What it measures:

* **Self-registration**: a passport against itself (both tiers): ``|T(x) - x|`` on body points, ~0 mm.
* **Synthetic recovery** on a real label map (optionally its CT): a random rigid motion (+-10 deg about the
  grid centre, +-20 mm) plus a smooth random cubic B-spline deformation (40-60 mm control spacing, mean
  deformation = the case's amplitude, no folding in the truth) gives the moving labels; the moving passport
  is extracted from them with :func:`ctpassport.passport.build.build_passport`; the registration must recover
  the motion. TRE is measured on **held-out points with known correspondence** (random body voxels of the
  moving image and their exact fixed-space origins; that correspondence is never given to the fit), Dice and
  HD95 on **organs left out of the fit** (an organ the warp loses has Dice 0 and no HD95: counted as lost), folding (% voxels with Jacobian <= 0) and SDlogJ of the estimated transform, time per
  tier. Sweeps: amplitude, missing organs (a fraction dropped from the moving passport), a cropped moving
  field of view. A method comparison runs the same cases through every smooth fit (``demons``, ``bspline``,
  ``tps``, ``sitk-bspline``).
* **Noise floor**: two segmentations of the same scan (e.g. the fast and the full model) registered to each
  other; the true transform is the identity.
* **Full field of view** (optional): the same synthetic recovery on the analytic full-torso label map of
  :mod:`ctpassport.passport.synthetic`, which no real organ is cut from.
* **Learn2Reg** layout (:func:`validate_learn2reg`): segment -> passport -> register per listed pair, TRE on
  the keypoints/landmarks (voxel CSVs) and runtime per pair.

Writes ``report.md``, ``results.json`` and overlay pictures (fixed label contours over the warped moving
labels, three planes) into the report folder, atomically.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, CTPassportError, InputError, RegistrationError
from ..io.atomic import atomic_path, check_writable
from ..io.nifti import Image3D, read_image
from ..io.orientation import onto_grid
from ..passport.build import BODY_HU, PADDING_HU
from ..passport.schema import Passport
from .api import register_passports
from .metrics import dice, hd95, jacobian_determinant, jacobian_stats, tre_stats
from .synthetic import random_motion
from .transform import GridSpec, RigidTransform, Transform
from .warp import resample

#: Targets stated by issue 4 (validation figures on the shared CT).
TARGETS = {"rigid_ms": 5.0, "deformable_s": 0.5, "tre_mm_at_10mm": 1.5, "folding_percent": 0.0}
DEFAULT_AMPLITUDES = (0.0, 2.5, 5.0, 10.0, 15.0)
COMPARE_METHODS = ("demons", "bspline", "tps", "sitk-bspline")
IDENTITY = Transform(RigidTransform.identity())


def _passport(
    labels: np.ndarray, affine: np.ndarray, *, seed: int, points: int, ct: np.ndarray | None = None
) -> Passport:
    from ..passport.build import build_passport

    return build_passport(labels, affine, ct=ct, points=points, seed=seed, grid_kind="output", normals=True,
                          body=ct is not None)


def _round(x: Any, nd: int = 4) -> Any:
    if isinstance(x, (float, np.floating)):
        return None if not np.isfinite(x) else round(float(x), nd)
    if isinstance(x, dict):
        return {k: _round(v, nd) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, nd) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    return x


def _mean(vals: Sequence[float | None]) -> float | None:
    v = [float(x) for x in vals if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else None


def body_mask(labels: np.ndarray, ct: np.ndarray | None = None, hu: float = BODY_HU) -> np.ndarray:
    """Voxels inside the body: CT above ``hu`` HU when a CT is given (also unlabelled tissue), else labelled."""
    return (np.asarray(ct) > hu) if ct is not None else (np.asarray(labels) > 0)


def heldout_points(
    mask_moving: np.ndarray,
    grid_moving: GridSpec,
    pullback: Transform,
    grid_fixed: GridSpec,
    rng: np.random.Generator,
    n: int = 2000,
) -> tuple[np.ndarray, np.ndarray]:
    """Random voxel centres ``y`` of the moving body and their exact fixed-space origins ``x = S(y)``.

    Only points whose origin lies inside the fixed image are kept. Returns ``(x_fixed, y_moving)`` in mm.
    """
    idx = np.argwhere(mask_moving)
    if len(idx) == 0:
        return np.zeros((0, 3)), np.zeros((0, 3))
    if len(idx) > n:
        idx = idx[rng.choice(len(idx), n, replace=False)]
    y = grid_moving.index_to_world(idx.astype(np.float64))
    x = pullback.apply(y)
    ok = grid_fixed.contains(x)
    return x[ok], y[ok]


def _organ_overlap(
    fixed_labels: np.ndarray, warped: np.ndarray, ids: Sequence[int], spacing: Any
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i in ids:
        a, b = fixed_labels == i, warped == i
        out[str(int(i))] = {"dice": dice(a, b), "hd95_mm": hd95(a, b, spacing)}
    return out


def _overlap_means(per: dict[str, Any]) -> dict[str, Any]:
    """Mean Dice and HD95 of the organs; HD95 over the organs present on both sides, ``hd95_lost`` counting
    the others (lost by the warp or made where there is none: HD95 is infinite there, Dice 0)."""
    return {
        "dice": _mean([v["dice"] for v in per.values()]),
        "hd95_mm": _mean([v["hd95_mm"] for v in per.values()]),
        "hd95_lost": sum(1 for v in per.values() if not np.isfinite(v["hd95_mm"])),
    }


def _choose_heldout(
    fp: Passport, mp: Passport, rng: np.random.Generator, fraction: float, min_voxels: int = 30
) -> list[int]:
    """Organs to leave out of the fit: a random ``fraction`` of those in both passports (large enough).

    Organs complete in both images are the rigid tier's landmarks; they are only held out when at least 4 of
    them remain, so that a small field of view does not starve the rigid fit.
    """
    mo = {o.id: o for o in mp.organs}
    shared = [o for o in fp.organs if o.id in mo and o.voxel_count >= min_voxels]
    k = int(round(fraction * len(shared)))
    if k == 0 or len(shared) - k < 4:
        return []
    complete = [o.id for o in shared if not o.truncated and not mo[o.id].truncated]
    cut = [o.id for o in shared if o.truncated or mo[o.id].truncated]
    spare = max(0, len(complete) - 4)
    n_complete = min(spare, int(round(fraction * len(complete))))
    chosen = list(rng.choice(complete, n_complete, replace=False)) if n_complete else []
    rest = k - len(chosen)
    if rest > 0 and cut:
        chosen += list(rng.choice(cut, min(rest, len(cut)), replace=False))
    return sorted(int(v) for v in chosen)


@dataclass
class Scene:
    """A fixed label map (and optional CT) with its grid and passport."""

    name: str
    labels: np.ndarray
    affine: np.ndarray
    ct: np.ndarray | None
    passport: Passport
    points: int
    #: ``fit_demons`` options of every deformable registration of this scene (e.g. ``refine_passes``)
    deformable: dict[str, Any] = field(default_factory=dict)

    @property
    def grid(self) -> GridSpec:
        return GridSpec(self.labels.shape, self.affine)


@dataclass
class CaseSpec:
    group: str
    amplitude_mm: float
    seed: int
    missing_fraction: float = 0.0
    crop: float = 0.0
    methods: tuple[str, ...] = ("demons",)
    heldout_fraction: float = 0.2
    name: str = ""


@dataclass
class CaseOutput:
    record: dict[str, Any]
    fixed_labels: np.ndarray | None = None
    moving_on_fixed: np.ndarray | None = None
    warped: np.ndarray | None = None
    affine: np.ndarray | None = None


def _crop_grid(
    labels: np.ndarray, affine: np.ndarray, fraction: float, rng: np.random.Generator,
    ct: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any], np.ndarray | None]:
    """Crop ``fraction`` of the slices of array axes 2 and 0 from one random end each (a smaller moving field
    of view); returns the cropped labels, their affine (voxel -> RAS+ mm), what was removed and the CT (same
    grid as the labels) cropped alike."""
    out, out_ct = labels, ct
    aff = affine.copy()
    info: dict[str, Any] = {}
    for ax in (2, 0):
        n = out.shape[ax]
        k = int(round(fraction * n))
        if k < 1 or n - k < 4:
            continue
        start = bool(rng.integers(0, 2))
        sl = [slice(None)] * 3
        sl[ax] = slice(k, n) if start else slice(0, n - k)
        out = out[tuple(sl)]
        out_ct = None if out_ct is None else out_ct[tuple(sl)]
        if start:
            aff[:3, 3] = aff[:3, 3] + aff[:3, ax] * k
        info[f"axis{ax}"] = {"removed_slices": k, "end": "first" if start else "last"}
    return np.ascontiguousarray(out), aff, info, None if out_ct is None else np.ascontiguousarray(out_ct)


def run_case(scene: Scene, spec: CaseSpec, *, n_points: int = 2000, keep_arrays: bool = False) -> CaseOutput:
    """One synthetic-recovery case (see the module doc); returns a JSON-ready record (and arrays for pictures)."""
    rng = np.random.default_rng(
        [spec.seed, int(spec.amplitude_mm * 1000), int(spec.missing_fraction * 1000), int(spec.crop * 1000)]
    )
    grid = scene.grid
    body_f = body_mask(scene.labels, scene.ct)
    t0 = time.perf_counter()
    motion = random_motion(grid, rng, amplitude_mm=spec.amplitude_mm, mask=body_f)
    mlabels = resample(scene.labels, scene.affine, motion.pullback, grid, labels=True)
    mct = (
        resample(scene.ct, scene.affine, motion.pullback, grid, fill=PADDING_HU - 1000.0)
        if scene.ct is not None
        else None
    )
    maff = scene.affine
    crop_info: dict[str, Any] = {}
    if spec.crop > 0:
        mlabels, maff, crop_info, mct = _crop_grid(mlabels, scene.affine, spec.crop, rng, mct)
    mgrid = GridSpec(mlabels.shape, maff)
    mp = _passport(mlabels, maff, seed=spec.seed + 1, points=scene.points, ct=mct)
    fp = scene.passport
    removed: list[int] = []
    if spec.missing_fraction > 0:
        ids = [o.id for o in mp.organs]
        k = int(round(spec.missing_fraction * len(ids)))
        removed = sorted(int(v) for v in rng.choice(ids, k, replace=False)) if k else []
        mp = mp.model_copy(update={"organs": [o for o in mp.organs if o.id not in set(removed)]})
    heldout = _choose_heldout(fp, mp, rng, spec.heldout_fraction)
    t_setup = time.perf_counter() - t0
    body_m = body_mask(mlabels, mct)
    x, y = heldout_points(body_m, mgrid, motion.pullback, grid, rng, n_points)
    lab_at_y = mlabels[tuple(np.round(mgrid.world_to_index(y)).astype(int).T)] if len(y) else np.zeros(0, int)
    in_heldout = np.isin(lab_at_y, heldout)
    rec: dict[str, Any] = {
        "name": spec.name,
        "group": spec.group,
        "seed": spec.seed,
        "amplitude_mm": spec.amplitude_mm,
        "truth": {
            "mean_deformation_mm": motion.mean_deformation_mm,
            "control_spacing_mm": motion.control_spacing_mm,
            "rotation_deg": motion.pullback.rigid.angle_deg,
            "translation_mm": float(np.linalg.norm(motion.pullback.rigid.translation)),
            "jacobian": motion.jacobian,
            "mean_total_displacement_mm": float(np.linalg.norm(x - y, axis=1).mean()) if len(x) else None,
        },
        "missing_organs": removed,
        "crop": crop_info,
        "heldout_organs": heldout,
        "n_heldout_points": len(x),
        "n_points_in_heldout_organs": int(in_heldout.sum()),
        "setup_s": t_setup,
        "tre_identity": tre_stats(x, y),
        "tiers": {},
    }
    ids_eval = [i for i in heldout if (scene.labels == i).any()]
    warped_keep = None
    for tier, method in [("rigid", None)] + [("deformable", m) for m in spec.methods]:
        key = tier if method is None else f"deformable:{method}"
        try:
            res = register_passports(fp, mp, tier, method=method or "demons", exclude=heldout,
                                     deformable_options=scene.deformable if method in (None, "demons") else None)
        except RegistrationError as exc:
            rec["tiers"][key] = {"error": str(exc)}
            continue
        pred = res.transform_points(x) if len(x) else x
        entry: dict[str, Any] = {
            "tre": tre_stats(pred, y),
            "timings_s": res.summary["timings_s"],
            "tre_heldout_organs": tre_stats(pred[in_heldout], y[in_heldout]),
        }
        if res.rigid_fit is not None:
            entry["rigid_dropped"] = [o.name or o.id for o in res.rigid_fit.dropped]
            entry["rigid_organs_used"] = len(res.rigid_fit.used)
        warped = resample(mlabels, maff, res.transform, grid, labels=True)
        if ids_eval:
            per = _organ_overlap(scene.labels, warped, ids_eval, grid.spacing)
            entry["heldout_overlap"] = _overlap_means(per)
            entry["heldout_overlap_per_organ"] = per
        if tier == "deformable":
            disp = res.transform.displacement_on(grid)
            entry["jacobian"] = jacobian_stats(jacobian_determinant(disp, grid), body_f)
            if res.deformable_fit is not None and res.deformable_fit.notes:
                entry["notes"] = res.deformable_fit.notes
            if method == spec.methods[0]:
                warped_keep = warped
        rec["tiers"][key] = entry
    if ids_eval:
        ident = resample(mlabels, maff, IDENTITY, grid, labels=True)
        rec["heldout_overlap_identity"] = _overlap_means(
            _organ_overlap(scene.labels, ident, ids_eval, grid.spacing)
        )
    out = CaseOutput(_round(rec))
    if keep_arrays:
        out.fixed_labels = scene.labels
        out.moving_on_fixed = resample(mlabels, maff, IDENTITY, grid, labels=True)
        out.warped = warped_keep
        out.affine = scene.affine
    return out


def self_registration(scene: Scene, n_points: int = 2000, seed: int = 0) -> dict[str, Any]:
    """A passport registered to itself: ``|T(x) - x|`` on body points for both tiers (should be ~0)."""
    rng = np.random.default_rng(seed)
    idx = np.argwhere(body_mask(scene.labels, scene.ct))
    idx = idx[rng.choice(len(idx), min(n_points, len(idx)), replace=False)]
    x = scene.grid.index_to_world(idx.astype(np.float64))
    out: dict[str, Any] = {}
    for tier in ("rigid", "deformable"):
        res = register_passports(scene.passport, scene.passport, tier, deformable_options=scene.deformable)
        out[tier] = {
            "tre": tre_stats(res.transform_points(x), x),
            "timings_s": res.summary["timings_s"],
            "rotation_deg": res.transform.rigid.angle_deg,
            "translation_mm": float(np.linalg.norm(res.transform.rigid.translation)),
        }
    return _round(out)


def noise_floor(
    scene: Scene, other_labels: np.ndarray, other_affine: np.ndarray, n_points: int = 2000, seed: int = 0
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Two segmentations of one scan registered to each other; the truth is the identity."""
    rng = np.random.default_rng(seed)
    other_grid = GridSpec(other_labels.shape, other_affine)
    other_ct = None if scene.ct is None else onto_grid(scene.ct, scene.affine, other_labels.shape, other_affine)
    mp = _passport(other_labels, other_affine, seed=seed + 1, points=scene.points,
                   ct=other_ct)  # one scan: its CT (and body outline) on both sides
    idx = np.argwhere(body_mask(scene.labels, scene.ct))
    idx = idx[rng.choice(len(idx), min(n_points, len(idx)), replace=False)]
    x = scene.grid.index_to_world(idx.astype(np.float64))
    x = x[other_grid.contains(x)]
    common = sorted({o.id for o in scene.passport.organs} & {o.id for o in mp.organs})
    ident = resample(other_labels, other_affine, IDENTITY, scene.grid, labels=True)
    out: dict[str, Any] = {
        "organs_common": len(common),
        "overlap_identity": _overlap_means(_organ_overlap(scene.labels, ident, common, scene.grid.spacing)),
    }
    shift = [
        float(np.linalg.norm(np.subtract(scene.passport.organ(i).centroid_mm, mp.organ(i).centroid_mm)))  # type: ignore[union-attr]
        for i in common
    ]
    out["centroid_shift_mm"] = (
        {"median": float(np.median(shift)), "max": float(np.max(shift))} if shift else {}
    )
    warped_keep = None
    for tier in ("rigid", "deformable"):
        try:
            res = register_passports(scene.passport, mp, tier, deformable_options=scene.deformable)
        except RegistrationError as exc:
            out[tier] = {"error": str(exc)}
            continue
        warped = resample(other_labels, other_affine, res.transform, scene.grid, labels=True)
        entry: dict[str, Any] = {
            "tre": tre_stats(res.transform_points(x), x),
            "timings_s": res.summary["timings_s"],
            "overlap": _overlap_means(_organ_overlap(scene.labels, warped, common, scene.grid.spacing)),
            "rotation_deg": res.transform.rigid.angle_deg,
            "translation_mm": float(np.linalg.norm(res.transform.rigid.translation)),
        }
        if tier == "deformable":
            entry["jacobian"] = jacobian_stats(
                jacobian_determinant(res.transform.displacement_on(scene.grid), scene.grid),
                body_mask(scene.labels, scene.ct),
            )
            warped_keep = warped
        out[tier] = entry
    return _round(out), warped_keep


# ------------------------------------------------------------------------------------------------
# pictures
# ------------------------------------------------------------------------------------------------
def overlay_picture(
    path: Path, fixed_labels: np.ndarray, panels: list[tuple[str, np.ndarray]], affine: np.ndarray, title: str
) -> Path:
    """PNG: rows = ``panels`` (moving labels on the fixed grid), columns = axial/coronal/sagittal planes through
    the centre; fixed labels drawn as contours (black) over the moving labels (colours). Arrays are brought to
    RAS+ canonical order first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.orientation import reorientation

    ro = reorientation(affine, fixed_labels.shape)
    fx = ro.to_canonical(fixed_labels)
    sp = np.sqrt((ro.canonical_affine[:3, :3] ** 2).sum(0))
    c = [s // 2 for s in fx.shape]
    rng = np.random.default_rng(7)
    lut = rng.uniform(0.15, 1.0, (256, 3))
    lut[0] = 1.0

    def planes(v: np.ndarray) -> list[tuple[str, np.ndarray, float]]:
        return [
            ("axial (R right, A up)", v[:, :, c[2]].T, sp[1] / sp[0]),
            ("coronal (R right, S up)", v[:, c[1], :].T, sp[2] / sp[0]),
            ("sagittal (A right, S up)", v[c[0], :, :].T, sp[2] / sp[1]),
        ]

    fig, axes = plt.subplots(len(panels), 3, figsize=(12, 3.6 * len(panels)), squeeze=False)
    for r, (name, mov) in enumerate(panels):
        mv = ro.to_canonical(mov)
        for col, ((plane, img, aspect), (_, fimg, _)) in enumerate(zip(planes(mv), planes(fx))):
            ax = axes[r][col]
            ax.imshow(lut[np.clip(img, 0, 255)], origin="lower", aspect=aspect, interpolation="nearest")
            edges = np.zeros(fimg.shape, dtype=bool)
            edges[:-1, :] |= fimg[:-1, :] != fimg[1:, :]
            edges[:, :-1] |= fimg[:, :-1] != fimg[:, 1:]
            ov = np.zeros((*fimg.shape, 4))
            ov[edges] = (0.0, 0.0, 0.0, 0.9)
            ax.imshow(ov, origin="lower", aspect=aspect, interpolation="nearest")
            ax.set_title(f"{name}: {plane}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        title + "\n(colours: moving labels on the fixed grid; black lines: fixed label borders)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# the suite
# ------------------------------------------------------------------------------------------------
@dataclass
class SuiteOptions:
    cases: int = 3
    seed: int = 0
    amplitudes: tuple[float, ...] = DEFAULT_AMPLITUDES
    missing_fractions: tuple[float, ...] = (0.25, 0.5)
    crop_fraction: float = 0.2
    compare_methods: tuple[str, ...] = COMPARE_METHODS
    compare_cases: int = 2
    points: int = 500
    refine_passes: int = 0
    n_points: int = 2000
    full_fov: bool = True
    full_fov_shape: tuple[int, int, int] = (134, 134, 237)
    timing_repeats: int = 5
    extra: dict[str, Any] = field(default_factory=dict)


def _summarise(records: list[dict[str, Any]], key: str) -> dict[str, Any]:
    vals = [r["tiers"].get(key, {}) for r in records]
    ok = [v for v in vals if "tre" in v]
    out: dict[str, Any] = {"cases": len(records), "failed": len(vals) - len(ok)}
    if not ok:
        return out
    out["tre_mean_mm"] = _mean([v["tre"].get("mean") for v in ok])
    out["tre_p95_mm"] = _mean([v["tre"].get("p95") for v in ok])
    out["tre_heldout_organs_mm"] = _mean([v["tre_heldout_organs"].get("mean") for v in ok])
    out["dice_heldout"] = _mean([v.get("heldout_overlap", {}).get("dice") for v in ok])
    out["hd95_heldout_mm"] = _mean([v.get("heldout_overlap", {}).get("hd95_mm") for v in ok])
    out["hd95_lost_organs"] = sum(v.get("heldout_overlap", {}).get("hd95_lost") or 0 for v in ok)
    out["time_s"] = _mean([v["timings_s"].get("total") for v in ok])
    if any("jacobian" in v for v in ok):
        out["folding_percent"] = _mean([v["jacobian"]["folding_percent"] for v in ok if "jacobian" in v])
        out["sdlogj"] = _mean([v["jacobian"]["sdlogj"] for v in ok if "jacobian" in v])
    out["tre_identity_mm"] = _mean([r["tre_identity"].get("mean") for r in records])
    return out


def _timing_benchmark(scene: Scene, opts: SuiteOptions) -> dict[str, Any]:
    """Median wall time of each tier on one synthetic amplitude-10 case (warm, repeated)."""
    rng = np.random.default_rng(opts.seed + 999)
    motion = random_motion(scene.grid, rng, amplitude_mm=10.0, mask=body_mask(scene.labels, scene.ct))
    ml = resample(scene.labels, scene.affine, motion.pullback, scene.grid, labels=True)
    mct = (None if scene.ct is None
           else resample(scene.ct, scene.affine, motion.pullback, scene.grid, fill=PADDING_HU - 1000.0))
    mp = _passport(ml, scene.affine, seed=1, points=scene.points, ct=mct)
    out: dict[str, Any] = {
        "grid_shape": list(scene.grid.shape),
        "grid_spacing_mm": scene.grid.spacing.tolist(),
        "repeats": opts.timing_repeats,
    }
    for tier in ("rigid", "deformable"):
        register_passports(scene.passport, mp, tier, deformable_options=scene.deformable)  # warm-up (imports, caches)
        times, cpu = [], []
        parts: dict[str, list[float]] = {}
        for _ in range(opts.timing_repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            res = register_passports(scene.passport, mp, tier, deformable_options=scene.deformable)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            for k, v in res.summary["timings_s"].items():
                parts.setdefault(k, []).append(v)
        out[tier] = {
            "median_s": float(np.median(times)),
            "min_s": float(np.min(times)),
            "cpu_median_s": float(np.median(cpu)),
            "parts_median_s": {k: float(np.median(v)) for k, v in parts.items()},
        }
    return _round(out, 6)


def load_scene(
    seg: str | Path, ct: str | Path | None = None, *, points: int = 500, name: str | None = None
) -> Scene:
    """Read a label map (and its CT, same grid) and build the fixed passport (grid kind ``output``)."""
    img = read_image(seg, kind="label map")
    if not np.issubdtype(img.data.dtype, np.integer):
        raise InputError("is not an integer label map", seg)
    ct_arr = None
    if ct is not None:
        ci = read_image(ct, kind="CT")
        on_grid = onto_grid(ci.data, ci.affine, img.shape, img.affine)  # the same voxels stored in another order
        if on_grid is None:
            raise InputError("is not on the label map's grid", ct, "pass the CT the label map was made from")
        ct_arr = np.asarray(on_grid, dtype=np.float32)
    labels = np.ascontiguousarray(img.data)
    fp = _passport(labels, img.affine, seed=0, points=points, ct=ct_arr)
    if len(fp.organs) < 3:
        raise InputError(f"has only {len(fp.organs)} labels; registration needs at least 3 organs", seg)
    return Scene(name or Path(seg).name, labels, img.affine, ct_arr, fp, points)


def synthetic_torso_scene(shape: tuple[int, int, int], points: int = 500) -> Scene:
    """The analytic full-torso label map of :mod:`ctpassport.passport.synthetic` as a scene (no CT)."""
    from ..passport.synthetic import torso_labels

    labels, aff = torso_labels(shape)
    return Scene(
        f"synthetic torso {shape[0]}x{shape[1]}x{shape[2]}",
        labels,
        aff,
        None,
        _passport(labels, aff, seed=0, points=points),
        points,
    )


def run_suite(
    seg: str | Path,
    out_dir: str | Path,
    *,
    ct: str | Path | None = None,
    noise_floor_seg: str | Path | None = None,
    options: SuiteOptions | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the whole validation suite and write ``report.md``, ``results.json`` and pictures to ``out_dir``."""
    opts = options or SuiteOptions()
    out = check_writable(out_dir, force, folder=True)
    say = progress or (lambda msg: None)
    t_start = time.perf_counter()
    scene = load_scene(seg, ct, points=opts.points)
    scene.deformable = {"refine_passes": opts.refine_passes}
    results: dict[str, Any] = {
        "kind": "ctpassport-registration-validation",
        "input": str(seg),
        "ct": str(ct) if ct else None,
        "grid_shape": list(scene.grid.shape),
        "grid_spacing_mm": _round(scene.grid.spacing.tolist()),
        "organs": len(scene.passport.organs),
        "organs_truncated": sum(o.truncated for o in scene.passport.organs),
        "options": {k: v for k, v in opts.__dict__.items() if k != "extra"},
        "targets": TARGETS,
    }
    pictures: list[tuple[str, np.ndarray, list[tuple[str, np.ndarray]], np.ndarray, str]] = []
    say("self-registration")
    results["self_registration"] = self_registration(scene, opts.n_points, opts.seed)
    say("timing")
    results["timing"] = _timing_benchmark(scene, opts)
    records: list[dict[str, Any]] = []
    pic_amp = min(opts.amplitudes, key=lambda a: abs(a - 10.0)) if opts.amplitudes else None
    for amp in opts.amplitudes:
        for c in range(opts.cases):
            say(f"amplitude {amp} mm, case {c + 1}/{opts.cases}")
            keep = amp == pic_amp and c == 0
            co = run_case(
                scene,
                CaseSpec(f"amplitude_{amp:g}", amp, opts.seed + c, name=f"amp{amp:g}_case{c}"),
                n_points=opts.n_points,
                keep_arrays=keep,
            )
            records.append(co.record)
            if keep and co.warped is not None:
                # run_case(keep_arrays=True) fills all the arrays together
                assert co.fixed_labels is not None and co.moving_on_fixed is not None and co.affine is not None
                pictures.append(
                    (
                        f"overlay_amplitude{amp:g}.png",
                        co.fixed_labels,
                        [
                            ("before registration", co.moving_on_fixed),
                            ("after deformable registration", co.warped),
                        ],
                        co.affine,
                        f"{scene.name}: synthetic motion, {amp:g} mm mean deformation, case 0",
                    )
                )
    for frac in opts.missing_fractions:
        for c in range(opts.cases):
            say(f"missing organs {frac:.0%}, case {c + 1}/{opts.cases}")
            records.append(
                run_case(
                    scene,
                    CaseSpec(
                        f"missing_{frac:g}",
                        10.0,
                        opts.seed + c,
                        missing_fraction=frac,
                        name=f"missing{frac:g}_case{c}",
                    ),
                    n_points=opts.n_points,
                ).record
            )
    if opts.crop_fraction > 0:
        for c in range(opts.cases):
            say(f"cropped field of view, case {c + 1}/{opts.cases}")
            records.append(
                run_case(
                    scene,
                    CaseSpec(
                        f"crop_{opts.crop_fraction:g}",
                        10.0,
                        opts.seed + c,
                        crop=opts.crop_fraction,
                        name=f"crop_case{c}",
                    ),
                    n_points=opts.n_points,
                ).record
            )
    if opts.compare_methods:
        for c in range(min(opts.compare_cases, opts.cases)):
            say(f"method comparison, case {c + 1}")
            records.append(
                run_case(
                    scene,
                    CaseSpec(
                        "compare", 10.0, opts.seed + c, methods=opts.compare_methods, name=f"compare_case{c}"
                    ),
                    n_points=opts.n_points,
                ).record
            )
    results["cases"] = records
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["group"], []).append(r)
    summary: dict[str, Any] = {}
    for g, recs in groups.items():
        keys = sorted({k for r in recs for k in r["tiers"]})
        summary[g] = {k: _summarise(recs, k) for k in keys}
    results["summary"] = summary
    if noise_floor_seg is not None:
        say("noise floor")
        other = read_image(noise_floor_seg, kind="label map")
        nf, warped = noise_floor(
            scene, np.ascontiguousarray(other.data), other.affine, opts.n_points, opts.seed
        )
        nf["other"] = str(noise_floor_seg)
        results["noise_floor"] = nf
        if warped is not None:
            ident = resample(
                np.ascontiguousarray(other.data), other.affine, IDENTITY, scene.grid, labels=True
            )
            pictures.append(
                (
                    "overlay_noise_floor.png",
                    scene.labels,
                    [
                        ("second segmentation (no registration)", ident),
                        ("after deformable registration", warped),
                    ],
                    scene.affine,
                    f"noise floor: {Path(noise_floor_seg).name} registered to {scene.name}",
                )
            )
    if opts.full_fov:
        say("full field of view (synthetic torso)")
        torso = synthetic_torso_scene(opts.full_fov_shape, opts.points)
        torso.deformable = dict(scene.deformable)
        trecs = []
        for c in range(opts.cases):
            say(f"full field of view, case {c + 1}/{opts.cases}")
            co = run_case(
                torso,
                CaseSpec("full_fov_10", 10.0, opts.seed + c, name=f"torso_case{c}"),
                n_points=opts.n_points,
                keep_arrays=c == 0,
            )
            trecs.append(co.record)
            if c == 0 and co.warped is not None:
                # run_case(keep_arrays=True) fills all the arrays together
                assert co.fixed_labels is not None and co.moving_on_fixed is not None and co.affine is not None
                pictures.append(
                    (
                        "overlay_full_fov.png",
                        co.fixed_labels,
                        [
                            ("before registration", co.moving_on_fixed),
                            ("after deformable registration", co.warped),
                        ],
                        co.affine,
                        f"{torso.name}: 10 mm mean deformation, case 0",
                    )
                )
        results["full_fov"] = {
            "scene": torso.name,
            "grid_shape": list(torso.grid.shape),
            "cases": trecs,
            "summary": {k: _summarise(trecs, k) for k in ("rigid", "deformable:demons")},
            "timing": _timing_benchmark(torso, SuiteOptions(timing_repeats=3, seed=opts.seed)),
        }
    results["wall_s"] = time.perf_counter() - t_start
    results = _round(results)
    with atomic_path(out, is_dir=True) as tmp:
        names = []
        try:
            for fname, fixed_lab, panels, aff, title in pictures:
                overlay_picture(tmp / fname, fixed_lab, panels, aff, title)
                names.append(fname)
        except ImportError:
            results["pictures_skipped"] = "matplotlib is not installed (pip install 'ctpassport[viz]')"
        results["pictures"] = names
        (tmp / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
        (tmp / "report.md").write_text(render_report(results), encoding="utf-8")
    return results


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, (int, np.integer)):
        return str(v)
    return f"{v:.{nd}f}"


def _failed(s: dict[str, Any]) -> str:
    """`` (2 of 3 failed)`` for a summary row whose means leave failed cases out (inside the tier's cell)."""
    return f" ({s['failed']} of {s['cases']} failed)" if s.get("failed") else ""


def _hd95(s: dict[str, Any]) -> str:
    lost = s.get("hd95_lost_organs") or 0
    return _f(s.get("hd95_heldout_mm")) + (f" ({lost} lost)" if lost else "")


def render_report(r: dict[str, Any]) -> str:
    """Markdown report of :func:`run_suite` results."""
    L: list[str] = []
    L.append("# Registration validation\n")
    L.append(
        f"Input `{r['input']}`"
        + (f" with CT `{r['ct']}`" if r.get("ct") else "")
        + f": grid {r['grid_shape']} at {r['grid_spacing_mm']} mm, {r['organs']} organs "
        f"({r['organs_truncated']} touch the image border); passports of up to "
        f"{r.get('options', {}).get('points', 500)} boundary points per organ"
        + (", with the body outline (skin) found in the CT" if r.get("ct") else "")
        + (f"; deformable tier with {n_ref} lattice refinement passes" if (n_ref := r.get("options", {}).get(
            "refine_passes", 0)) else "")
        + f". Wall time {_f(r.get('wall_s'), 1)} s.\n"
    )
    L.append(
        "Convention: `T` maps fixed to moving (pull-back), world mm RAS+; TRE = |T(x_fixed) - x_moving| on "
        "held-out points with known correspondence (random body voxels of the moving image and their exact "
        "fixed-space origins; that correspondence is never given to the fit).\n"
    )
    tm = r.get("timing", {})
    amp10 = r.get("summary", {}).get("amplitude_10", {}).get("deformable:demons", {})
    L.append("## Targets\n")
    L.append("| figure | target | measured |")
    L.append("|---|---|---|")
    L.append(
        f"| rigid time (median, warm) | < {TARGETS['rigid_ms']:g} ms | {_f(1e3 * tm.get('rigid', {}).get('median_s', float('nan')), 2)} ms |"
    )
    L.append(
        f"| deformable incl. dense field (median, warm) | < {TARGETS['deformable_s']:g} s | "
        f"{_f(tm.get('deformable', {}).get('median_s'), 3)} s on {tm.get('grid_shape')} |"
    )
    ff = r.get("full_fov", {})
    if ff:
        L.append(
            f"| deformable on the 3 mm full-torso grid | < {TARGETS['deformable_s']:g} s | "
            f"{_f(ff.get('timing', {}).get('deformable', {}).get('median_s'), 3)} s on {ff.get('grid_shape')} |"
        )
    L.append(
        f"| mean TRE at 10 mm mean deformation | < {TARGETS['tre_mm_at_10mm']:g} mm | "
        f"{_f(amp10.get('tre_mean_mm'))} mm (this input)"
        + (
            f"; {_f(ff.get('summary', {}).get('deformable:demons', {}).get('tre_mean_mm'))} mm (full-FOV torso)"
            if ff
            else ""
        )
        + " |"
    )
    L.append(
        f"| folding (% voxels with Jacobian <= 0) | {TARGETS['folding_percent']:g} % | "
        f"{_f(amp10.get('folding_percent'), 3)} % |\n"
    )
    sr = r.get("self_registration", {})
    L.append("## Self-registration\n")
    L.append("| tier | mean TRE mm | max TRE mm | rotation deg | translation mm |")
    L.append("|---|---|---|---|---|")
    for t in ("rigid", "deformable"):
        e = sr.get(t, {})
        L.append(
            f"| {t} | {_f(e.get('tre', {}).get('mean'), 4)} | {_f(e.get('tre', {}).get('max'), 4)} | "
            f"{_f(e.get('rotation_deg'), 5)} | {_f(e.get('translation_mm'), 5)} |"
        )
    L.append("")
    L.append("## Synthetic recovery\n")
    L.append(
        "Random rigid (+-10 deg, +-20 mm) + random cubic B-spline (40-60 mm control spacing), moving passport "
        "re-extracted from the warped labels; about 20 % of the organs are left out of the fit for Dice/HD95. "
        "Means over the cases where the tier ran (a tier that failed on some cases says so beside its name). "
        "HD95: the larger directed 95th percentile of surface distances, over the held-out organs present after "
        "the warp; organs the warp lost are counted beside it (their Dice is 0).\n"
    )
    L.append(
        "| scenario | tier | identity TRE | TRE mean | TRE p95 | TRE in held-out organs | Dice held-out | "
        "HD95 held-out mm | folding % | SDlogJ | time s |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for g, tiers in r.get("summary", {}).items():
        for k, s in tiers.items():
            L.append(
                f"| {g} | {k}{_failed(s)} | {_f(s.get('tre_identity_mm'))} | {_f(s.get('tre_mean_mm'))} | "
                f"{_f(s.get('tre_p95_mm'))} | {_f(s.get('tre_heldout_organs_mm'))} | {_f(s.get('dice_heldout'), 3)} | "
                f"{_hd95(s)} | {_f(s.get('folding_percent'), 3)} | {_f(s.get('sdlogj'), 3)} | "
                f"{_f(s.get('time_s'), 3)} |"
            )
    L.append("")
    if ff:
        L.append("## Full field of view (analytic synthetic torso)\n")
        L.append(
            f"{ff['scene']}: no organ is cut by the field of view, so the same motion model shows what the "
            "method recovers when the anatomy is complete.\n"
        )
        L.append(
            "| tier | identity TRE | TRE mean | TRE p95 | Dice held-out | HD95 held-out mm | folding % | time s |"
        )
        L.append("|---|---|---|---|---|---|---|---|")
        for k, s in ff.get("summary", {}).items():
            L.append(
                f"| {k}{_failed(s)} | {_f(s.get('tre_identity_mm'))} | {_f(s.get('tre_mean_mm'))} | "
                f"{_f(s.get('tre_p95_mm'))} | {_f(s.get('dice_heldout'), 3)} | {_hd95(s)} | {_f(s.get('folding_percent'), 3)} | "
                f"{_f(s.get('time_s'), 3)} |"
            )
        L.append("")
    nf = r.get("noise_floor")
    if nf:
        L.append("## Noise floor (two segmentations of the same scan; truth = identity)\n")
        L.append(
            f"`{nf.get('other')}` against the input: {nf.get('organs_common')} common organs, centroid shift "
            f"median {_f(nf.get('centroid_shift_mm', {}).get('median'))} mm, max "
            f"{_f(nf.get('centroid_shift_mm', {}).get('max'))} mm; Dice without registration "
            f"{_f(nf.get('overlap_identity', {}).get('dice'), 3)}.\n"
        )
        L.append(
            "| tier | TRE mean (= spurious motion) | TRE p95 | Dice | HD95 mm | rotation deg | translation mm |"
        )
        L.append("|---|---|---|---|---|---|---|")
        for t in ("rigid", "deformable"):
            e = nf.get(t, {})
            if "error" in e:
                L.append(f"| {t} | error: {e['error']} | | | | | |")
                continue
            L.append(
                f"| {t} | {_f(e.get('tre', {}).get('mean'))} | {_f(e.get('tre', {}).get('p95'))} | "
                f"{_f(e.get('overlap', {}).get('dice'), 3)} | {_f(e.get('overlap', {}).get('hd95_mm'))} | "
                f"{_f(e.get('rotation_deg'), 3)} | {_f(e.get('translation_mm'), 3)} |"
            )
        L.append("")
    if tm:
        L.append("## Timing (warm, median of repeats)\n")
        for t in ("rigid", "deformable"):
            e = tm.get(t, {})
            parts = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in e.get("parts_median_s", {}).items())
            L.append(
                f"- {t}: {_f(e.get('median_s', 0) * 1e3, 2)} ms wall, {_f(e.get('cpu_median_s', 0) * 1e3, 2)} ms "
                f"CPU, best {_f(e.get('min_s', 0) * 1e3, 2)} ms ({parts})"
            )
        L.append(
            "\nWall times depend on what else runs on the machine; CPU time is the process's own work "
            "(all threads).\n"
        )
        L.append("")
    if r.get("pictures"):
        L.append("## Pictures\n")
        for p in r["pictures"]:
            L.append(f"![{p}]({p})")
        L.append("")
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------------------------
# Learn2Reg layout
# ------------------------------------------------------------------------------------------------
def find_dataset_json(folder: Path) -> Path:
    """The task's ``*_dataset.json`` (or ``dataset.json``); an error when there is none or several."""
    cands = sorted(folder.glob("*_dataset.json")) + sorted(folder.glob("dataset.json"))
    if not cands:
        raise InputError("no *_dataset.json (Learn2Reg task description) in the folder", folder)
    if len(cands) > 1:
        raise InputError(f"holds {len(cands)} task descriptions ({', '.join(c.name for c in cands)}); "
                         "which pairs to use is ambiguous", folder, "keep one task's dataset JSON per folder")
    return cands[0]


def learn2reg_listed_pairs(folder: Path) -> list[tuple[Path, Path, bool]]:
    """The (fixed, moving, is_test) image pairs listed in the task's dataset JSON: training and validation
    pairs, then test pairs (``registration_test``, whose keypoints Learn2Reg usually does not publish), each
    once. :class:`InputError` for a missing or malformed JSON or one that lists no pair."""
    js = find_dataset_json(folder)
    try:
        d = json.loads(js.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError("not valid JSON", js) from None
    if not isinstance(d, dict):
        raise InputError(f"is a JSON {type(d).__name__}, not the Learn2Reg task object", js)
    pairs: list[tuple[Path, Path, bool]] = []
    seen: set[tuple[Path, Path]] = set()
    for key in ("training_paired_images", "registration_val", "registration_test"):
        items = d.get(key) or []
        if not isinstance(items, list):
            raise InputError(f"{key} must be a list of pairs", js)
        for item in items:
            try:
                f = (folder / item["fixed"]).resolve()
                m = (folder / item["moving"]).resolve()
            except (KeyError, TypeError):
                raise InputError(f"{key}: every pair needs 'fixed' and 'moving'", js) from None
            if (f, m) not in seen:
                seen.add((f, m))
                pairs.append((f, m, key == "registration_test"))
    if not pairs:
        raise InputError("lists no image pairs (training_paired_images / registration_val / registration_test)", js)
    return pairs


def _stem(p: Path) -> str:
    n = p.name
    return n[:-7] if n.endswith(".nii.gz") else p.stem


def _modality(image: Path) -> str | None:
    """Learn2Reg's modality/time point suffix: ``0001`` of ``ThoraxCBCT_0003_0001.nii.gz``."""
    tail = _stem(image).rsplit("_", 1)
    return tail[1] if len(tail) == 2 and tail[1].isdigit() else None


def find_keypoints(folder: Path, fixed: Path, moving: Path) -> tuple[Path, Path] | None:
    """The fixed and moving keypoint/landmark CSVs of a pair, from the same sub-folder.

    Tasks whose keypoints depend on the pair (ThoraxCBCT/OncoReg: ``keypoints01Tr`` for the scans ``_0000``
    and ``_0001``, ``keypoints02Tr`` for ``_0000`` and ``_0002``; ``landmarks01Tr``...) are looked up by the
    two images' suffixes first (as Learn2Reg's evaluation does), then the shared ``keypointsTr``,
    ``landmarksTr`` (and ``Ts``/``Val``) folders.
    """
    subs = []
    mf, mm = _modality(fixed), _modality(moving)
    if mf is not None and mm is not None and mf != mm:
        pair = "".join(str(v) for v in sorted((int(mf), int(mm))))
        subs += [f"{kind}{pair}{split}" for split in ("Tr", "Ts", "Val") for kind in ("keypoints", "landmarks")]
    subs += [f"{kind}{split}" for split in ("Tr", "Ts", "Val") for kind in ("keypoints", "landmarks")]
    for sub in subs:
        cf, cm = folder / sub / f"{_stem(fixed)}.csv", folder / sub / f"{_stem(moving)}.csv"
        if cf.is_file() and cm.is_file():
            return cf, cm
    return None


def learn2reg_tier_errors(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The registrations that failed in :func:`validate_learn2reg`'s evaluated pairs: fixed, moving, tier, error."""
    return [{"fixed": r["fixed"], "moving": r["moving"], "tier": t, "error": r[t]["error"]}
            for r in rows if "error" not in r for t in ("rigid", "deformable") if "error" in r.get(t, {})]


def validate_learn2reg(
    folder: str | Path,
    out_dir: str | Path,
    *,
    segment: Callable[[Image3D], np.ndarray] | None = None,
    labels_dir: str | Path | None = None,
    method: str = "demons",
    points: int = 500,
    refine_passes: int = 0,
    max_pairs: int | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Segment -> passport -> register every listed pair of a Learn2Reg task folder; TRE on its keypoints.

    Labels come from ``labels_dir`` (files named like the images, e.g. the task's ``labelsTr``) when given,
    else from ``segment(image) -> labels`` (the label map on the image's grid). Keypoint CSVs hold voxel indices
    (i, j, k) of each image; fixed and moving keypoints correspond row by row. TRE is in world mm:
    ``|T(A_f k_f) - A_m k_m|`` (``A``: the image affines).
    """
    from ..passport.build import build_passport, check_label_array
    from .points import read_voxel_csv

    root = Path(folder)
    if not root.is_dir():
        raise InputError("no such Learn2Reg folder", root)
    out = check_writable(out_dir, force, folder=True)
    say = progress or (lambda msg: None)
    if segment is None and labels_dir is None:
        raise InputError("need a segmenter or a labels folder for the Learn2Reg validation")
    if max_pairs is not None and max_pairs < 1:
        raise ConfigError(f"--max-pairs must be >= 1, not {max_pairs}")
    listed = learn2reg_listed_pairs(root)
    # test pairs take part where the folder has their keypoints (a user's own landmarks); without, they are not
    # evaluable by design (Learn2Reg does not publish them) and are counted, not reported as errors
    pairs = [(f, m) for f, m, test in listed if not test or find_keypoints(root, f, m) is not None]
    skipped_test = len(listed) - len(pairs)
    if not pairs:
        raise InputError(f"lists only registration_test pairs ({skipped_test}), and the folder has keypoints for "
                         "none of them", find_dataset_json(root))
    refine = refine_passes if method == "demons" else 0  # (the point-to-point fits have no refinement)
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
    cache: dict[Path, tuple[Image3D, Passport, float, float]] = {}

    def prepare(img_path: Path) -> tuple[Image3D, Passport, float, float]:
        if img_path in cache:
            return cache[img_path]
        img = read_image(img_path, kind="image")
        t0 = time.perf_counter()
        if labels_dir is not None:
            lp = Path(labels_dir) / img_path.name
            lab_img = read_image(lp, kind="label map")
            if lab_img.shape != img.shape:
                raise InputError(f"label map shape {lab_img.shape} differs from the image's {img.shape}", lp)
            labels = check_label_array(lab_img.data, lp)  # (a float or negative map: named here)
        else:
            labels = np.asarray(segment(img))  # type: ignore[misc]
        t_seg = time.perf_counter() - t0
        t1 = time.perf_counter()
        hu = np.asarray(img.data)
        ct_like = hu.size > 0 and float(hu.min()) < BODY_HU - 200  # air in HU: a CT, so a body outline
        pp = build_passport(labels, img.affine, ct=hu if ct_like else None, points=points, seed=0,
                            grid_kind="output", normals=True, body=ct_like)
        t_pp = time.perf_counter() - t1
        cache[img_path] = (img, pp, t_seg, t_pp)
        return cache[img_path]

    rows = []
    for n, (fpath, mpath) in enumerate(pairs):
        say(f"pair {n + 1}/{len(pairs)}: {fpath.name} <- {mpath.name}")
        found = find_keypoints(root, fpath, mpath)
        row: dict[str, Any] = {"fixed": fpath.name, "moving": mpath.name}
        missing = [p for p in (fpath, mpath) if not p.is_file()]
        if missing:
            row["error"] = f"{missing[0]}: no such image"
            rows.append(row)
            continue
        if found is None:
            row["error"] = f"no keypoints/landmarks CSVs for both {fpath.name} and {mpath.name} in one folder"
            rows.append(row)
            continue
        try:  # one unreadable image, label map or keypoint file fails its pair, not the whole run
            fimg, fpp, fseg, fpp_t = prepare(fpath)
            mimg, mpp, mseg, mpp_t = prepare(mpath)
            vf, vm = read_voxel_csv(found[0]), read_voxel_csv(found[1])
        except CTPassportError as exc:
            row["error"] = str(exc)
            rows.append(row)
            continue
        row["keypoints_folder"] = found[0].parent.name
        if len(vf) != len(vm):
            row["error"] = f"{len(vf)} fixed but {len(vm)} moving keypoints"
            rows.append(row)
            continue
        xf = GridSpec(fimg.shape, fimg.affine).index_to_world(vf)
        xm = GridSpec(mimg.shape, mimg.affine).index_to_world(vm)
        row.update(
            {
                "keypoints": len(vf),
                "segment_s": fseg + mseg,
                "passport_s": fpp_t + mpp_t,
                "tre_identity": tre_stats(xf, xm),
            }
        )
        for tier in ("rigid", "deformable"):
            try:
                t0 = time.perf_counter()
                res = register_passports(fpp, mpp, tier, method=method, deformable_options=(
                    {"refine_passes": refine} if refine else None))
                dt = time.perf_counter() - t0
                row[tier] = {"tre": tre_stats(res.transform_points(xf), xm), "register_s": dt}
            except RegistrationError as exc:
                row[tier] = {"error": str(exc)}
        row["total_s"] = (
            row["segment_s"]
            + row["passport_s"]
            + sum(row[t].get("register_s", 0.0) for t in ("rigid", "deformable"))
        )
        rows.append(row)
    ok = [r for r in rows if "error" not in r]
    summary: dict[str, Any] = {
        "pairs": len(rows),
        "test_pairs_without_keypoints": skipped_test,
        "evaluated": len(ok),
        "tre_identity_mm": _mean([r["tre_identity"]["mean"] for r in ok]),
    }
    summary["registered"] = sum(any("tre" in r.get(t, {}) for t in ("rigid", "deformable")) for r in ok)
    for tier in ("rigid", "deformable"):
        good = [r for r in ok if "tre" in r.get(tier, {})]
        summary[tier] = {
            "tre_mean_mm": _mean([r[tier]["tre"]["mean"] for r in good]),
            "register_s": _mean([r[tier]["register_s"] for r in good]),
            "failed": len(ok) - len(good),
        }
    summary["runtime_per_pair_s"] = _mean([r["total_s"] for r in ok])
    results = _round(
        {
            "kind": "ctpassport-learn2reg-validation",
            "folder": str(root),
            "labels": str(labels_dir) if labels_dir else "segmented",
            "method": method,
            "points_per_organ": points,
            "refine_passes": refine,
            "pairs": rows,
            "summary": summary,
        }
    )
    lines = [
        "# Learn2Reg validation\n",
        f"Folder `{root}`, labels: {results['labels']}, passports of up to {points} boundary points per organ, "
        f"deformable method {method}" + (f" with {refine} lattice refinement passes" if refine else "") + ". "
        "TRE in world mm on the keypoints (fixed keypoints mapped by T vs moving keypoints).\n",
        "| fixed | moving | keypoints | identity TRE | rigid TRE | deformable TRE | segment s | passport s | "
        "rigid s | deformable s | total s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["pairs"]:
        if "error" in r:
            lines.append(f"| {r['fixed']} | {r['moving']} | error: {r['error']} | | | | | | | | |")
            continue
        lines.append(
            f"| {r['fixed']} | {r['moving']} | {r['keypoints']} | {_f(r['tre_identity']['mean'])} | "
            f"{_f(r['rigid'].get('tre', {}).get('mean'))} | {_f(r['deformable'].get('tre', {}).get('mean'))} | "
            f"{_f(r['segment_s'], 3)} | {_f(r['passport_s'], 3)} | {_f(r['rigid'].get('register_s'), 4)} | "
            f"{_f(r['deformable'].get('register_s'), 3)} | {_f(r['total_s'], 3)} |"
        )
    s = results["summary"]
    lines.append(
        f"\nMean TRE: identity {_f(s['tre_identity_mm'])} mm, rigid {_f(s['rigid']['tre_mean_mm'])} mm, "
        f"deformable {_f(s['deformable']['tre_mean_mm'])} mm; runtime per pair {_f(s['runtime_per_pair_s'], 3)} s "
        f"({s['evaluated']} of {s['pairs']} pairs evaluated, {s['registered']} registered"
        + (f"; {skipped_test} test pairs without keypoints left out" if skipped_test else "") + ").\n"
    )
    failures = learn2reg_tier_errors(results["pairs"])
    if failures:
        lines.append("Registrations that failed (a '-' in the table):\n")
        lines += [f"- {f['fixed']} <- {f['moving']}, {f['tier']} tier: {f['error']}" for f in failures]
        lines.append("")
    with atomic_path(out, is_dir=True) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
        (tmp / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return results
