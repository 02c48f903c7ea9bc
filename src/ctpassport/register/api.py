"""Public registration API: register passports or paired points, save/load results, map points, warp images.

Convention (also written into every ``registration.json``): the transform ``T`` maps a point of the
**fixed** space to the corresponding point of the **moving** space (pull-back: the warped moving image is
``moving(T(x))`` on the fixed grid), in world mm RAS+; ``T(x) = R (x + u(x)) + t`` (rigid tier: ``u = 0``).
Applied to fixed landmarks, :meth:`RegistrationResult.transform_points` predicts their moving positions and
TRE = ``|T(x_fixed) - x_moving|``. Files (folder ``out_dir``):

* ``transform.h5`` -- ITK composite transform ``[rigid, displacement field]`` in LPS (SimpleITK, ANTs);
* ``displacement.nii.gz`` -- the whole ``T(x) - x`` on the fixed grid, 5-D NIfTI, **LPS** components
  (ITK/ANTs convention, intent "vector");
* ``registration.json`` -- summary: convention, organs used and left out, residuals, timings.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import ConfigError, InputError, RegistrationError
from ..io.atomic import atomic_path, check_writable
from ..io.nifti import Image3D
from ..passport.schema import BODY_NAME, Passport, load_passport
from .deformable import (
    CoarseGrid,
    DeformableFit,
    fit_deformable_points,
    fit_deformable_sets,
    organ_point_sets,
    passport_grid,
    refine_rigid,
    sets_have_normals,
    thin_point_sets,
)
from .itkio import FLIP, read_itk_transform, write_displacement_nifti, write_itk_transform
from .rigid import RigidFit, fit_rigid_passports, fit_rigid_points
from .transform import GridSpec, RigidTransform, Transform, as_points, bounding_grid
from .warp import warp_image as _warp_image

TIERS = ("rigid", "deformable")
TRANSFORM_FILE = "transform.h5"
FIELD_FILE = "displacement.nii.gz"
SUMMARY_FILE = "registration.json"

CONVENTION: dict[str, str] = {
    "direction": "fixed_to_moving (pull-back): T maps a fixed-space point to the corresponding moving-space "
    "point; warped_moving(x) = moving(T(x)) on the fixed grid; TRE = |T(x_fixed) - x_moving|",
    "frame": "world mm, RAS+ (x Right, y Anterior, z Superior) in this JSON and the Python API",
    "formula": "T(x) = R @ (x + u(x)) + t; u = residual displacement field on the fixed grid (zero outside it, "
    "rigid tier: u = 0)",
    TRANSFORM_FILE: "ITK composite transform [AffineTransform (rigid), DisplacementFieldTransform (u)] in ITK's "
    "LPS frame (x_lps = diag(-1,-1,1) x_ras); ITK applies the stack last-first, i.e. u then the "
    "rigid; read with SimpleITK.ReadTransform or antsApplyTransforms -t transform.h5",
    FIELD_FILE: "the whole transform as one displacement field D = T(x) - x on the fixed grid (coarsened to "
    "about 3 mm where finer; the nearest orthogonal grid covering it where the fixed grid is sheared): 5-D NIfTI "
    "(nx, ny, nz, 1, 3), float32, intent 1007 (vector), components in LPS mm (ITK/ANTs convention; "
    "negate the first two for RAS)",
    "points_csv": "header line x,y,z (extra columns kept), world mm, RAS+ unless --lps",
}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _r(x: Any, nd: int = 6) -> Any:
    """Round floats (and nested lists/arrays of floats) for JSON."""
    if isinstance(x, np.ndarray):
        x = x.tolist()
    if isinstance(x, float):
        return round(x, nd)
    if isinstance(x, (list, tuple)):
        return [_r(v, nd) for v in x]
    if isinstance(x, dict):
        return {k: _r(v, nd) for k, v in x.items()}
    return x


@dataclass
class RegistrationResult:
    """A fitted registration: :attr:`transform` (fixed -> moving, RAS+ mm) and its summary.

    ``grid``: the fixed-space grid (voxel -> RAS+ mm) the displacement field is written on (the fixed grid
    through :func:`field_grid_for`; for points registered without a fixed grid, the points' bounding box).
    ``fixed_grid``: the fixed passport's grid, which images are warped onto by default: the fixed label map's
    own grid, or for a passport taken on the model grid (``segment --passport``'s default) the 3 mm RAS+ grid
    the network ran on (``summary["fixed"]["grid_kind"] == "model"``); None for points registered without the
    fixed image's grid: then images need a reference grid. ``summary``: the
    JSON-ready report (``registration.json``).
    """

    transform: Transform
    tier: str
    grid: GridSpec | None
    summary: dict[str, Any] = field(default_factory=dict)
    rigid_fit: RigidFit | None = None
    deformable_fit: DeformableFit | None = None
    fixed_grid: GridSpec | None = None

    @property
    def rotation(self) -> np.ndarray:
        """3x3 rotation of the rigid part (RAS+)."""
        return self.transform.rigid.rotation

    @property
    def translation(self) -> np.ndarray:
        """Translation (mm, RAS+) of the rigid part."""
        return self.transform.rigid.translation

    def transform_points(self, points_ras_mm: Any) -> np.ndarray:
        """Map ``(N, 3)`` fixed-space points (world mm, RAS+) to their moving-space positions (RAS+ mm)."""
        return self.transform.apply(points_ras_mm)

    def warp_image(
        self,
        moving_img: Image3D,
        reference_img: Image3D | GridSpec | None = None,
        labels: bool = False,
        fill: float | None = None,
    ) -> Image3D:
        """Resample ``moving_img`` into the fixed space on ``reference_img``'s grid (default: the fixed image's).

        Linear interpolation for images (float32 out), nearest neighbour for ``labels`` (input dtype, no new
        label values). ``fill``: value outside the moving image (default 0 for labels, the image minimum
        otherwise). See :mod:`ctpassport.register.warp`.
        """
        ref = reference_img if reference_img is not None else self.fixed_grid
        if ref is None:
            raise InputError("no fixed image grid (e.g. fitted to points without one): pass reference_img, "
                             "the fixed image")
        return _warp_image(self.transform, moving_img, ref, labels=labels, fill=fill)

    def displacement(self, grid: GridSpec | None = None) -> np.ndarray:
        """Total displacement ``T(x) - x`` on ``grid`` (default: :attr:`grid`, the field grid): float32
        ``(*grid.shape, 3)``, array axes ``[i, j, k]`` then RAS+ x, y, z components (mm)."""
        g = grid if grid is not None else self.grid
        if g is None:
            raise InputError("no grid to evaluate the displacement on")
        return self.transform.displacement_on(g)

    def to_sitk(self) -> Any:
        """The SimpleITK composite transform (LPS) equal to :attr:`transform`."""
        from .itkio import to_sitk

        return to_sitk(self.transform)

    def save(self, out_dir: str | Path, *, force: bool = False) -> Path:
        """Write ``transform.h5``, ``displacement.nii.gz`` (when a grid is known) and ``registration.json``
        into ``out_dir`` atomically (the whole folder appears at once; refused if it exists, unless ``force``)."""
        out = check_writable(out_dir, force, folder=True)
        summary = dict(self.summary)
        files = {TRANSFORM_FILE: CONVENTION[TRANSFORM_FILE]}
        with atomic_path(out, is_dir=True) as tmp:
            write_itk_transform(self.transform, tmp / TRANSFORM_FILE)
            if self.grid is not None:
                write_displacement_nifti(self.transform, self.grid, tmp / FIELD_FILE)
                files[FIELD_FILE] = CONVENTION[FIELD_FILE]
            summary["files"] = files
            (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=1), encoding="utf-8")
        return out


def _check_exclude(exclude: list[int | str], fixed: Passport, moving: Passport) -> None:
    """:class:`ConfigError` for an ``exclude`` entry that names nothing: a name that is neither an organ of either
    passport (nor ``body``) nor a TotalSegmentator class (a typo such as ``livr`` would exclude nothing)."""
    from ..model.classes import NAME_TO_ID

    names = {o.name for p in (fixed, moving) for o in p.organs if o.name} | {BODY_NAME}
    unknown = [e for e in exclude if isinstance(e, str) and e not in names and e not in NAME_TO_ID]
    if unknown:
        raise ConfigError(f"--exclude {unknown[0]!r} names no organ of either passport and no TotalSegmentator "
                          "class", hint="see `ctpassport classes` for the names")


def _summary_base(tier: str, method: str | None, grid: GridSpec | None,
                  fixed_grid: GridSpec | None) -> dict[str, Any]:
    return {
        "kind": "ctpassport-registration",
        "ctpassport_version": __version__,
        "created": _now(),
        "tier": tier,
        "method": method,
        "convention": CONVENTION,
        # the fixed image's grid (warps land on it) and the displacement field's (the former, coarsened to ~3 mm)
        "fixed_grid": fixed_grid.to_dict() if fixed_grid is not None else None,
        "field_grid": grid.to_dict() if grid is not None else None,
    }


def _rigid_summary(fit: RigidFit) -> dict[str, Any]:
    r = fit.transform
    lps = np.eye(4)
    lps[:3, :3] = FLIP @ r.rotation @ FLIP
    lps[:3, 3] = FLIP @ r.translation
    return {
        "rotation": _r(r.rotation, 9),
        "translation_mm": _r(r.translation, 6),
        "matrix_ras": _r(r.matrix, 9),
        "matrix_lps": _r(lps, 9),
        "rotation_deg": round(r.angle_deg, 6),
        "rms_residual_mm": round(fit.rms_mm, 6),
        "iterations": fit.iterations,
        "organs_used": len(fit.used),
        "organs_dropped": [o.name or o.id for o in fit.dropped],
        "organs": [o.to_dict() for o in fit.organs],
    }


def _as_passport(p: Passport | str | Path) -> Passport:
    return p if isinstance(p, Passport) else load_passport(p)


def field_grid_for(fixed_grid: GridSpec, max_spacing_mm: float = 3.0) -> GridSpec:
    """The grid (voxel -> RAS+ mm) the displacement field is stored on: the fixed grid, unchanged when its
    finest voxel size is at least 0.75 x ``max_spacing_mm``, else downsampled by an integer stride per axis
    (``round(max_spacing_mm / spacing)``, at least 1) so that a 0.8 mm CT does not need a field of several GB.
    A sheared fixed grid (gantry tilt), which ITK images cannot hold, is first replaced by the nearest
    orthogonal grid covering it at the same spacing (:meth:`GridSpec.orthogonal_cover`), which then follows
    the same rule."""
    if fixed_grid.sheared:
        fixed_grid = fixed_grid.orthogonal_cover()
    if float(np.min(fixed_grid.spacing)) >= max_spacing_mm * 0.75:
        return fixed_grid
    return CoarseGrid.of(fixed_grid, max_spacing_mm).grid


def register_passports(
    fixed: Passport | str | Path,
    moving: Passport | str | Path,
    tier: str = "rigid",
    *,
    method: str = "demons",
    weights: Mapping[str, float] | None = None,
    exclude: Iterable[int | str] = (),
    field_spacing_mm: float = 3.0,
    max_points: int = 60_000,
    rigid_options: Mapping[str, Any] | None = None,
    deformable_options: Mapping[str, Any] | None = None,
) -> RegistrationResult:
    """Register two passports (files or :class:`Passport` objects): ``T`` maps fixed to moving (RAS+ mm).

    ``tier``: ``rigid`` (organ centroids and principal axes, see :mod:`.rigid`) or ``deformable`` (rigid, then
    boundary-point non-rigid ICP, see :mod:`.deformable`; ``method`` picks the smooth fit). ``weights``: stability
    weight overrides ``{fnmatch pattern: weight}``; ``exclude``: organ ids/names left out of both tiers;
    ``max_points``: at most this many boundary points per passport enter the deformable fit (thinned evenly
    above it; every point helps accuracy, the cost grows about linearly; 117 organs at the passport default of
    500 points each are 58 500);
    ``field_spacing_mm``: the displacement field is stored on the fixed grid, downsampled to about this
    spacing when the fixed grid is finer.
    Raises :class:`RegistrationError` (fewer than 3 usable organs, collinear organs, no boundary points ...).
    """
    if tier not in TIERS:
        raise RegistrationError(f"unknown tier {tier!r} (choose rigid or deformable)")
    fp, mp = _as_passport(fixed), _as_passport(moving)
    exclude = list(exclude)
    _check_exclude(exclude, fp, mp)
    t0 = time.perf_counter()
    notes: list[str] = []
    try:
        rfit = fit_rigid_passports(fp, mp, weights=weights, exclude=exclude, **dict(rigid_options or {}))
    except RegistrationError as exc:
        if tier != "deformable" or not str(exc).startswith("only "):
            raise
        # The deformable tier only needs a starting point: organs cut by a field of view may serve.
        rfit = fit_rigid_passports(
            fp, mp, weights=weights, exclude=exclude, allow_truncated=True, **dict(rigid_options or {})
        )
        notes.append(f"rigid step: {exc}; initialised with truncated organs too (down-weighted)")
    t_rigid = time.perf_counter() - t0
    fgrid = passport_grid(fp)
    grid = field_grid_for(fgrid, field_spacing_mm)
    summary = _summary_base(tier, "centroids+axes" if tier == "rigid" else method, grid, fgrid)
    summary["fixed"] = {
        "path": fp.source.path,
        "sha256": fp.source.sha256,
        "organs": len(fp.organs),
        "grid_shape": list(fp.grid.shape),
        # "model": the segmentation's 3 mm RAS+ grid (segment --passport's default), not the fixed image's own
        "grid_kind": fp.grid.kind,
    }
    summary["moving"] = {
        "path": mp.source.path,
        "sha256": mp.source.sha256,
        "organs": len(mp.organs),
        "grid_shape": list(mp.grid.shape),
    }
    summary["rigid"] = _rigid_summary(rfit)
    summary["notes"] = notes
    timings = {"rigid": t_rigid}
    transform = Transform(rfit.transform)
    dfit = None
    if tier == "deformable":
        t1 = time.perf_counter()
        mgrid = passport_grid(mp)
        sets = organ_point_sets(fp, mp, rfit.transform, exclude=exclude)
        if not sets:
            raise RegistrationError("no organ has boundary points in both passports for the deformable tier")
        sets = thin_point_sets(sets, max_points)
        rigid2, refine = rfit.transform, None
        if notes:  # the centroids of cut organs are biased: refine the starting point on the surfaces
            rigid2, sets, refine = refine_rigid(sets, grid, mgrid, rfit.transform)
        t2 = time.perf_counter()
        dfit = fit_deformable_sets(sets, grid, mgrid, rigid2, method=method, **dict(deformable_options or {}))
        timings["deformable"] = time.perf_counter() - t1
        timings["deformable_points"] = t2 - t1  # point sets (and, in the fallback, rigid ICP)
        timings.update({f"deformable_{k}": v for k, v in dfit.seconds.items()})
        transform = Transform(rigid2, dfit.field)
        with_normals = sets_have_normals(sets)
        if not with_normals:
            notes.append("the passports have no boundary normals: estimated from the points (passports built "
                         "with --normals register more accurately)")
        summary["deformable"] = {
            "method": dfit.method,
            "pairs": dfit.n_pairs,
            # surface normals: the passports' own (built with normals) or estimated from the points
            "normals": "passport" if with_normals else "estimated",
            "organs": dfit.organs,
            "rigid_refinement": _r(refine, 6),
            "rigid_matrix_ras": _r(rigid2.matrix, 9),
            "iterations": _r(dfit.iterations, 4),
            "notes": dfit.notes,
            "field_grid": grid.to_dict(),
        }
    timings["total"] = time.perf_counter() - t0
    summary["timings_s"] = _r(timings, 6)
    return RegistrationResult(transform, tier, grid, summary, rfit, dfit, fgrid)


def register_points(
    fixed_points: Any,
    moving_points: Any,
    tier: str = "rigid",
    *,
    method: str = "tps",
    grid: GridSpec | None = None,
    control_spacing_mm: float = 40.0,
    alpha: float = 0.01,
    names: list[str] | None = None,
) -> RegistrationResult:
    """Register paired landmarks (row ``i`` of both ``(N, 3)`` RAS+ mm arrays correspond).

    ``rigid``: robust weighted Kabsch; ``deformable``: rigid, then a smooth field through the residuals
    (``method``: ``tps`` smoothing thin plate spline (default), ``bspline`` or ``sitk-bspline``) on ``grid``
    (the fixed image's grid, downsampled to about 3 mm if finer; default: the points' bounding box plus 30 mm
    at 3 mm spacing; the field is zero outside it).
    """
    if tier not in TIERS:
        raise RegistrationError(f"unknown tier {tier!r} (choose rigid or deformable)")
    f = as_points(fixed_points, "fixed points")
    m = as_points(moving_points, "moving points")
    t0 = time.perf_counter()
    rfit = fit_rigid_points(f, m, names=names)
    t_rigid = time.perf_counter() - t0
    g = field_grid_for(grid) if grid is not None else bounding_grid(f)
    # without ``grid`` the field's box around the landmarks is not the fixed image: images need a reference
    summary = _summary_base(tier, "kabsch" if tier == "rigid" else method, g, grid)
    summary["points"] = len(f)
    summary["rigid"] = _rigid_summary(rfit)
    timings = {"rigid": t_rigid}
    transform = Transform(rfit.transform)
    dfit = None
    if tier == "deformable":
        if len(f) < 5:
            raise RegistrationError(f"the deformable tier needs at least 5 point pairs, got {len(f)}")
        t1 = time.perf_counter()
        dfit = fit_deformable_points(
            f, m, rfit.transform, g, method=method, control_spacing_mm=control_spacing_mm, alpha=alpha
        )
        timings["deformable"] = time.perf_counter() - t1
        transform = Transform(rfit.transform, dfit.field)
        res = np.linalg.norm(transform.apply(f) - m, axis=1)
        summary["deformable"] = {
            "method": dfit.method,
            "pairs": dfit.n_pairs,
            "field_grid": g.to_dict(),
            "residual_mm": {"mean": round(float(res.mean()), 6), "max": round(float(res.max()), 6)},
        }
    timings["total"] = time.perf_counter() - t0
    summary["timings_s"] = _r(timings, 6)
    return RegistrationResult(transform, tier, g, summary, rfit, dfit, grid)


def load_transform(path: str | Path) -> RegistrationResult:
    """Load a registration folder written by :meth:`RegistrationResult.save` (or an ITK transform file).

    The transform comes from ``transform.h5`` (read with SimpleITK, converted LPS -> RAS); the summary and
    fixed grid from ``registration.json`` when present.
    """
    p = Path(path)
    if p.is_dir():
        h5 = p / TRANSFORM_FILE
        if not h5.is_file():
            raise InputError(f"no {TRANSFORM_FILE} in the folder (not a ctpassport registration output)", p)
        summary: dict[str, Any] = {}
        js = p / SUMMARY_FILE
        if js.is_file():
            try:
                summary = json.loads(js.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise InputError("not valid JSON", js) from None
            if not isinstance(summary, dict):
                raise InputError(f"holds a JSON {type(summary).__name__}, not a registration summary object", js)
        transform = read_itk_transform(h5)
    elif p.is_file():
        summary = {}
        transform = read_itk_transform(p)
    else:
        raise InputError("no such transform folder or file", p)
    grids: dict[str, GridSpec] = {}
    for key in ("fixed_grid", "field_grid"):  # summaries before field_grid: fixed_grid was the field's grid
        if summary.get(key):
            try:
                grids[key] = GridSpec.from_dict(summary[key])
            except (KeyError, TypeError, ValueError, AttributeError):
                raise InputError(f"registration.json has a malformed {key}", p) from None
            except InputError as exc:
                raise InputError(f"registration.json has a malformed {key} ({exc.problem})", p) from None
    grid = grids.get("field_grid") or grids.get("fixed_grid")
    if grid is None and transform.field is not None:
        grid = transform.field.grid
    tier = summary.get("tier") or ("deformable" if transform.field is not None else "rigid")
    # fixed_grid null beside a field_grid: fitted to points without the fixed image (no default warp grid);
    # summaries from before field_grid, and bare ITK files, have only the field's grid
    fixed = grids.get("fixed_grid") if summary.get("field_grid") else grids.get("fixed_grid", grid)
    return RegistrationResult(transform, tier, grid, summary, fixed_grid=fixed)


def rigid_from_matrix(matrix: Any) -> RigidTransform:
    """A :class:`RigidTransform` from a 4x4 RAS+ matrix (e.g. ``registration.json``'s ``matrix_ras``)."""
    return RigidTransform.from_matrix(np.asarray(matrix, dtype=np.float64))
