"""Tier 1: rigid registration from organ centroids and principal axes (weighted, robust Kabsch).

Frames: every point is RAS+ world mm. The fitted :class:`~ctpassport.register.transform.RigidTransform` maps a
fixed-space point to the moving space: ``y = R @ x + t`` with ``R @ c_fixed + t ~= c_moving`` per organ.

Method, per pair of passports:

1. Organs present in both passports, not marked ``truncated`` in either and not excluded, are usable;
   fewer than 3 is a :class:`~ctpassport.errors.RegistrationError`.
2. Features: each organ's centroid (weight = its anatomical stability weight, :data:`STABILITY_WEIGHTS`) and,
   where an organ is elongated or flat, two pseudo-points ``c +- L e`` along its major (and minor) principal
   axis (``L`` = the standard deviation along the axis). An axis is only trusted as far as its eigenvalue is
   separated from the others: its weight ramps from 0 (near-spherical, axis ambiguous) to full at a relative
   eigenvalue gap of 0.5. Eigenvector signs are arbitrary, so the moving sign is chosen to agree with the
   current rotation estimate.
3. Weighted Kabsch (SVD, reflection-safe). A feature set whose points lie on a line (RMS distance from the
   best-fitting line below ``min_spread_mm``) cannot fix the rotation: RegistrationError.
4. Robustness (iterated to convergence): with ``s`` = max(median centroid residual of the organs in use,
   ``floor_mm``), an organ with residual ``r <= 1.5 s`` keeps full weight, ``1.5 s < r <= 3 s`` is
   down-weighted by ``(1.5 s / r)^2`` and ``r > 3 s`` ("3x median") is dropped; all are reported.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, RegistrationError
from ..passport.schema import Organ, Passport
from .transform import RigidTransform, as_points

#: Anatomical stability weights: the one table to edit (first matching pattern wins; fnmatch patterns on
#: TotalSegmentator class names). Bones of the axial skeleton move least relative to each other.
STABILITY_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("vertebrae_*", 1.0),
    ("sacrum", 1.0),
    ("hip_*", 1.0),
    ("skull", 1.0),
    ("rib_*", 0.9),
    ("sternum", 0.9),
    ("costal_cartilages", 0.8),
    ("spinal_cord", 0.8),
    ("clavicula_*", 0.7),
    ("femur_*", 0.7),
    ("scapula_*", 0.6),
    ("humerus_*", 0.5),
    ("liver", 0.6),
    ("spleen", 0.6),
    ("kidney_*", 0.6),
    ("pancreas", 0.6),
    ("adrenal_gland_*", 0.6),
    ("gallbladder", 0.6),
    ("heart", 0.6),
    ("thyroid_gland", 0.6),
    ("prostate", 0.6),
    ("brain", 0.6),
    ("autochthon_*", 0.6),
    ("iliopsoas_*", 0.6),
    ("gluteus_*", 0.6),
    ("aorta", 0.6),
    ("inferior_vena_cava", 0.5),
    ("portal_vein_and_splenic_vein", 0.5),
    ("trachea", 0.5),
    ("*_artery*", 0.5),
    ("*_vein*", 0.5),
    ("*_vena*", 0.5),
    ("brachiocephalic_trunk", 0.5),
    ("atrial_appendage_left", 0.5),
    ("lung_*", 0.4),
    ("esophagus", 0.3),
    ("stomach", 0.3),
    ("small_bowel", 0.3),
    ("duodenum", 0.3),
    ("colon", 0.3),
    ("urinary_bladder", 0.3),
)
#: Weight of a class not matched by :data:`STABILITY_WEIGHTS` (or an unnamed label).
DEFAULT_WEIGHT = 0.5


def stability_weight(
    name: str | None, table: Iterable[tuple[str, float]] | Mapping[str, float] | None = None
) -> float:
    """Anatomical stability weight of class ``name`` (first matching fnmatch pattern of ``table``)."""
    items = STABILITY_WEIGHTS if table is None else (table.items() if isinstance(table, Mapping) else table)
    if name is None:
        return DEFAULT_WEIGHT
    for pattern, w in items:
        if fnmatch.fnmatchcase(name, pattern):
            return float(w)
    return DEFAULT_WEIGHT


#: The largest stability weight accepted (weights are relative; the table's run 0.3-1.0).
MAX_WEIGHT = 1e6


def check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """``weights`` (``{fnmatch pattern or class name: weight}``) as a dict, or :class:`ConfigError` unless every
    weight is a finite number in ``[0, MAX_WEIGHT]``."""
    bad = {k: v for k, v in weights.items() if not (isinstance(v, (int, float)) and 0 <= v <= MAX_WEIGHT)}
    if bad:
        k, v = next(iter(bad.items()))
        raise ConfigError(f"stability weight {k!r}: {v!r} is not a number from 0 to {MAX_WEIGHT:g} "
                          "(weights are relative; the built-in table runs 0.3-1.0)")
    return dict(weights)


def weighted_kabsch(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> RigidTransform:
    """The rigid ``y = R x + t`` minimising ``sum_i w_i |R src_i + t - dst_i|^2`` (proper rotation, det +1).

    ``src``/``dst``: ``(N, 3)`` mm in one frame (RAS+ here); ``weights``: ``(N,)`` >= 0, not all zero.
    """
    a = np.asarray(src, dtype=np.float64)
    b = np.asarray(dst, dtype=np.float64)
    w = np.ones(len(a)) if weights is None else np.asarray(weights, dtype=np.float64)
    sw = w.sum()
    if sw <= 0:
        raise RegistrationError("all registration weights are zero")
    ca = (w[:, None] * a).sum(0) / sw
    cb = (w[:, None] * b).sum(0) / sw
    h = (w[:, None] * (a - ca)).T @ (b - cb)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return RigidTransform(r, cb - r @ ca)


def line_spread_mm(points: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Weighted RMS distance (mm) of ``points`` from their best-fitting line (0 for collinear points)."""
    p = np.asarray(points, dtype=np.float64)
    w = np.ones(len(p)) if weights is None else np.asarray(weights, dtype=np.float64)
    sw = w.sum()
    if len(p) < 3 or sw <= 0:
        return 0.0
    c = (w[:, None] * p).sum(0) / sw
    cov = (w[:, None] * (p - c)).T @ (p - c) / sw
    ev = np.linalg.eigvalsh(cov)
    return float(np.sqrt(max(ev[0] + ev[1], 0.0)))


@dataclass
class OrganFit:
    """How one organ (or one landmark) took part in the rigid fit.

    ``status``: ``used`` | ``downweighted`` | ``dropped`` (outlier) | ``truncated`` | ``missing_fixed`` |
    ``missing_moving`` | ``excluded``. ``residual_mm``: ``|T(c_fixed) - c_moving|`` after the final fit (None
    when the organ is absent from one passport). ``weight``: anatomical weight; ``robust_weight``: the factor
    the outlier handling applied (1 = full, 0 = dropped).
    """

    id: int | None
    name: str | None
    status: str
    weight: float = 0.0
    robust_weight: float = 0.0
    residual_mm: float | None = None
    axis_weights: tuple[float, float] = (0.0, 0.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["residual_mm"] = None if self.residual_mm is None else round(self.residual_mm, 4)
        d["robust_weight"] = round(self.robust_weight, 4)
        d["axis_weights"] = [round(a, 4) for a in self.axis_weights]
        return d


@dataclass
class RigidFit:
    """Result of a rigid fit: the transform (fixed -> moving, RAS+ mm) and per-organ reports."""

    transform: RigidTransform
    organs: list[OrganFit]
    rms_mm: float
    iterations: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def used(self) -> list[OrganFit]:
        return [o for o in self.organs if o.status in ("used", "downweighted")]

    @property
    def dropped(self) -> list[OrganFit]:
        return [o for o in self.organs if o.status == "dropped"]


def _robust_factors(
    res: np.ndarray,
    eligible: np.ndarray,
    active: np.ndarray,
    floor_mm: float,
    outlier_factor: float,
    soft_factor: float,
) -> np.ndarray:
    """Per-group robust weights from residuals (see module doc); at least 3 groups stay in."""
    med = (
        float(np.median(res[active & eligible]))
        if np.any(active & eligible)
        else float(np.median(res[eligible]))
    )
    s = max(med, floor_mm)
    rho = np.ones_like(res)
    soft = res > soft_factor * s
    rho[soft] = (soft_factor * s / res[soft]) ** 2
    rho[res > outlier_factor * s] = 0.0
    rho[~eligible] = 0.0
    if np.count_nonzero(rho > 0) < 3:
        order = np.argsort(np.where(eligible, res, np.inf))[:3]
        rho[order] = np.maximum(rho[order], (soft_factor * s / np.maximum(res[order], 1e-12)) ** 2).clip(0, 1)
    return rho


def _axis_gaps(ev: np.ndarray) -> tuple[float, float]:
    """Relative eigenvalue gaps of the major (0) and minor (2) axis: how well defined each axis is."""
    l0, l1, l2 = (max(float(v), 0.0) for v in ev)
    g0 = (l0 - l1) / l0 if l0 > 0 else 0.0
    g2 = (l1 - l2) / l1 if l1 > 0 else 0.0
    return g0, g2


def axis_trust(gap: float, lo: float = 0.15, hi: float = 0.5) -> float:
    """Weight factor of a principal axis from its relative eigenvalue gap: 0 below ``lo``, 1 above ``hi``."""
    return float(np.clip((gap - lo) / (hi - lo), 0.0, 1.0))


def _status(rho: float) -> str:
    return "used" if rho >= 1.0 - 1e-9 else ("dropped" if rho <= 0 else "downweighted")


def _robust_loop(
    rigid: RigidTransform,
    src: np.ndarray,
    dst: np.ndarray,
    eligible: np.ndarray,
    features: Any,
    *,
    floor_mm: float,
    outlier_factor: float,
    soft_factor: float,
    min_spread_mm: float,
    max_iter: int,
    what: str,
) -> tuple[RigidTransform, np.ndarray, int]:
    """Iterate robust weights and weighted Kabsch to convergence (see the module doc).

    ``src``/``dst``: one representative point per group (organ centroid or landmark), whose residual drives
    the group's robust weight; ``features(rotation, rho) -> (src, dst, weights)`` builds the fit's points.
    Returns the rigid transform, the robust weights and the number of iterations.
    """
    rho = np.ones(len(src))
    it = 0
    for it in range(1, max_iter + 1):
        res = np.linalg.norm(rigid.apply(src) - dst, axis=1)
        new_rho = _robust_factors(res, eligible, rho > 0, floor_mm, outlier_factor, soft_factor)
        fs, fd, fw = features(rigid.rotation, new_rho)
        if line_spread_mm(fs[fw > 0], fw[fw > 0]) < min_spread_mm:
            raise RegistrationError(
                f"after dropping outliers the remaining {what} are collinear; cannot fix the rotation"
            )
        new_rigid = weighted_kabsch(fs, fd, fw)
        converged = np.allclose(new_rho, rho, atol=1e-6) and np.allclose(
            new_rigid.matrix, rigid.matrix, atol=1e-10
        )
        rho, rigid = new_rho, new_rigid
        if converged:
            break
    return rigid, rho, it


def usable_organ_pairs(
    fixed: Passport, moving: Passport, exclude: Iterable[int | str] = (), allow_truncated: bool = False
) -> tuple[list[tuple[Organ, Organ]], list[OrganFit]]:
    """Organs present in both passports (matched by label id), and reports for the ones left out."""
    excl = set(exclude)
    fm = fixed.by_id()
    mm = moving.by_id()
    pairs: list[tuple[Organ, Organ]] = []
    reports: list[OrganFit] = []
    for oid in sorted(set(fm) | set(mm)):
        f, m = fm.get(oid), mm.get(oid)
        name = (f or m).name  # type: ignore[union-attr]
        if oid in excl or (name is not None and name in excl):
            reports.append(OrganFit(oid, name, "excluded"))
        elif f is None:
            reports.append(OrganFit(oid, name, "missing_fixed"))
        elif m is None:
            reports.append(OrganFit(oid, name, "missing_moving"))
        elif (f.truncated or m.truncated) and not allow_truncated:
            reports.append(OrganFit(oid, name, "truncated"))
        else:
            pairs.append((f, m))
    return pairs, reports


def fit_rigid_passports(
    fixed: Passport,
    moving: Passport,
    *,
    weights: Mapping[str, float] | None = None,
    exclude: Iterable[int | str] = (),
    use_axes: bool = True,
    axis_weight: float = 0.5,
    outlier_factor: float = 3.0,
    soft_factor: float = 1.5,
    floor_mm: float = 1.0,
    min_spread_mm: float = 1.0,
    max_iter: int = 30,
    allow_truncated: bool = False,
    truncated_weight: float = 0.3,
) -> RigidFit:
    """Rigid fixed -> moving transform (RAS+ mm) from two passports; see the module docstring.

    ``weights``: optional ``{fnmatch pattern or class name: weight}`` overriding :data:`STABILITY_WEIGHTS`
    (checked first). ``exclude``: label ids or names to leave out (e.g. held-out organs of a validation).
    ``allow_truncated``: also use organs cut by either field of view, their weight multiplied by
    ``truncated_weight`` and without their (biased) axes -- the deformable tier's fallback initialisation
    when fewer than 3 complete organs are shared; the rigid tier itself never does this.
    Raises :class:`RegistrationError` for fewer than 3 usable organs or a collinear (degenerate) set.
    """
    import time

    t0 = time.perf_counter()
    pairs, left_out = usable_organ_pairs(fixed, moving, exclude, allow_truncated=allow_truncated)
    if len(pairs) < 3:
        raise RegistrationError(
            f"only {len(pairs)} usable organ(s) common to both passports (need >= 3 present in both and not "
            f"truncated; {len(left_out)} left out)"
        )
    table: list[tuple[str, float]] = list(check_weights(weights).items()) if weights else []
    table += list(STABILITY_WEIGHTS)
    n = len(pairs)
    cf = np.array([f.centroid_mm for f, _ in pairs])
    cm = np.array([m.centroid_mm for _, m in pairs])
    cut = np.array([f.truncated or m.truncated for f, m in pairs])
    w_anat = np.array([stability_weight(f.name, table) for f, _ in pairs]) * np.where(
        cut, truncated_weight, 1.0
    )
    if np.all(w_anat <= 0):
        raise RegistrationError("all usable organs have zero weight")
    ef = np.array([f.eigenvectors for f, _ in pairs])  # (n, 3 axes, 3)
    em = np.array([m.eigenvectors for _, m in pairs])
    lf = np.array([f.eigenvalues_mm2 for f, _ in pairs])
    lm = np.array([m.eigenvalues_mm2 for _, m in pairs])
    axw = np.zeros((n, 2))
    if use_axes and axis_weight > 0:
        for ic in np.flatnonzero(~cut):
            gf, gm = _axis_gaps(lf[ic]), _axis_gaps(lm[ic])
            axw[ic] = [axis_trust(min(gf[0], gm[0])), axis_trust(min(gf[1], gm[1]))]
    length = np.sqrt(np.maximum(0.5 * (lf + lm), 0.0))  # (n, 3) SD along each axis, mm
    axes_idx = (0, 2)

    def features(rot: np.ndarray, rho: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src, dst, wt = [cf], [cm], [w_anat * rho]
        for col, k in enumerate(axes_idx):
            use = axw[:, col] > 0
            if not use.any():
                continue
            e_f = ef[use, k]
            e_m = em[use, k]
            sign = np.sign(np.einsum("ij,ij->i", e_f @ rot.T, e_m))
            sign[sign == 0] = 1.0
            e_m = e_m * sign[:, None]
            L = length[use, k][:, None]
            ww = w_anat[use] * rho[use] * axis_weight * axw[use, col]
            src += [cf[use] + L * e_f, cf[use] - L * e_f]
            dst += [cm[use] + L * e_m, cm[use] - L * e_m]
            wt += [ww, ww]
        return np.concatenate(src), np.concatenate(dst), np.concatenate(wt)

    eligible = w_anat > 0
    src, dst, wt = features(np.eye(3), np.ones(n))
    spread = line_spread_mm(src, wt)
    if spread < min_spread_mm:
        raise RegistrationError(
            f"the {n} usable organs are (nearly) collinear: RMS distance from a line {spread:.2f} mm < "
            f"{min_spread_mm} mm, so the rotation is undetermined"
        )
    rigid, rho, it = _robust_loop(
        weighted_kabsch(src, dst, wt),
        cf,
        cm,
        eligible,
        features,
        floor_mm=floor_mm,
        outlier_factor=outlier_factor,
        soft_factor=soft_factor,
        min_spread_mm=min_spread_mm,
        max_iter=max_iter,
        what="organs",
    )
    res = np.linalg.norm(rigid.apply(cf) - cm, axis=1)
    reports: list[OrganFit] = []
    for i, (f, _) in enumerate(pairs):
        reports.append(
            OrganFit(
                f.id,
                f.name,
                _status(rho[i]),
                float(w_anat[i]),
                float(rho[i]),
                float(res[i]),
                (float(axw[i, 0]), float(axw[i, 1])),
            )
        )
    for r in left_out:
        if r.status != "missing_fixed" and r.status != "missing_moving":
            fo = fixed.organ(r.id) if r.id is not None else None
            mo = moving.organ(r.id) if r.id is not None else None
            if fo is not None and mo is not None:
                r.residual_mm = float(
                    np.linalg.norm(rigid.apply(fo.centroid_mm)[0] - np.asarray(mo.centroid_mm))
                )
        r.weight = stability_weight(r.name, table)
    reports.extend(left_out)
    reports.sort(key=lambda o: (o.id is None, o.id))
    used = rho > 0
    rms = float(np.sqrt(np.average(res[used] ** 2, weights=(w_anat * rho)[used])))
    return RigidFit(rigid, reports, rms, it, time.perf_counter() - t0)


def fit_rigid_points(
    fixed_points: Any,
    moving_points: Any,
    *,
    weights: Any = None,
    outlier_factor: float = 3.0,
    soft_factor: float = 1.5,
    floor_mm: float = 1.0,
    min_spread_mm: float = 1.0,
    max_iter: int = 30,
    names: list[str] | None = None,
) -> RigidFit:
    """Rigid fixed -> moving transform from paired landmarks (row i of each array corresponds; RAS+ mm).

    Same robust scheme as :func:`fit_rigid_passports` with each landmark its own group.
    """
    import time

    t0 = time.perf_counter()
    f = as_points(fixed_points, "fixed points")
    m = as_points(moving_points, "moving points")
    if f.shape != m.shape:
        raise RegistrationError(f"fixed and moving point lists differ in length ({len(f)} vs {len(m)} rows)")
    if len(f) < 3:
        raise RegistrationError(f"need at least 3 point pairs, got {len(f)}")
    w = np.ones(len(f)) if weights is None else np.asarray(weights, dtype=np.float64)
    spread = line_spread_mm(f, w)
    if spread < min_spread_mm:
        raise RegistrationError(
            f"the {len(f)} fixed points are (nearly) collinear: RMS distance from a line "
            f"{spread:.2f} mm < {min_spread_mm} mm, so the rotation is undetermined"
        )
    rigid, rho, it = _robust_loop(
        weighted_kabsch(f, m, w),
        f,
        m,
        w > 0,
        lambda rot, r: (f, m, w * r),
        floor_mm=floor_mm,
        outlier_factor=outlier_factor,
        soft_factor=soft_factor,
        min_spread_mm=min_spread_mm,
        max_iter=max_iter,
        what="points",
    )
    res = np.linalg.norm(rigid.apply(f) - m, axis=1)
    reports = []
    for i in range(len(f)):
        reports.append(
            OrganFit(
                None,
                names[i] if names else f"point_{i}",
                _status(rho[i]),
                float(w[i]),
                float(rho[i]),
                float(res[i]),
            )
        )
    used = rho > 0
    rms = float(np.sqrt(np.average(res[used] ** 2, weights=(w * rho)[used])))
    return RigidFit(rigid, reports, rms, it, time.perf_counter() - t0)
