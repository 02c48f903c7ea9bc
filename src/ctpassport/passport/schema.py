"""The passport schema (pydantic, versioned, validated on load).

Frames and units, stated once for every field below:

* all coordinates are **world millimetres in RAS+** (+x Right, +y Anterior, +z Superior), computed from
  voxel centres with the label map's affine;
* ``covariance_mm2`` is ``np.cov`` of the organ's voxel-centre coordinates (mm^2, unbiased, ``ddof=1``),
  not an inertia tensor;
* ``eigenvalues_mm2`` are the covariance eigenvalues in **descending** order; ``eigenvectors[i]`` is the
  unit eigenvector of ``eigenvalues_mm2[i]`` (rows), its sign chosen so that its largest-magnitude
  component is positive (deterministic);
* ``bbox_mm`` is ``[[xmin, ymin, zmin], [xmax, ymax, zmax]]`` over voxel centres (world axes; exact for
  oblique grids too);
* ``volume_mm3`` is ``voxel_count * |det(affine[:3, :3])|``;
* ``boundary_points_mm`` are centres of *surface voxels*: voxels of the organ with at least one of their
  6 face neighbours inside the image not in the organ (another label or background). The image border is
  **not** a surface (an organ cut by the field of view has no points on the cut). Up to
  ``points_per_organ`` of them, stratified over the surface (well spread, not clustered), a deterministic
  function of the label map, the label id and ``seed``; rounded to 0.001 mm;
* ``boundary_normals`` are the **outward** unit surface normals at those points (same order, RAS+,
  rounded to 0.001): at each point, minus the Gaussian-weighted sum (width: the largest voxel size) of the
  world offsets to those of its neighbouring voxels that belong to the organ, over a stencil reaching about
  one largest voxel size along every axis (the 26 neighbours on isotropic grids; the image border replicates
  the edge voxels, like the surface test); where that sum vanishes (one-voxel-thin parts), the direction
  from the organ's centroid. Only when asked for (``--normals``: they make registration more accurate and the
  JSON about half as large again); null otherwise and in passports written before schema 1.2;
* ``truncated``: the organ has a voxel on the outermost voxel layer of the image (it may continue outside
  the field of view; registration can leave such organs out);
* ``hu_mean`` / ``hu_std``: mean and population standard deviation (ddof=0) of the CT (HU) inside the
  organ, on the passport's grid; null when no CT was given.
* ``body`` (schema 1.3; only when asked for, ``--body``, and a CT is given): the **body outline** as one more
  organ record (id :data:`BODY_ID`, name ``body``): the patient's body where the CT exceeds -300 HU, its
  largest connected part after a 3x3x3 opening (which cuts thin contacts such as the table's rim), with the holes of every axial slice filled (lungs, bowel gas), computed on the CT's
  grid taken every ``s``-th voxel along each axis (``s`` = the largest integer with ``s x spacing <= 3 mm``,
  at least 1), so its boundary points (up to twice ``points_per_organ``: the largest surface) are
  skin-surface voxel centres of that grid (world mm, RAS+; none next to the scanner's padding outside the
  reconstructed field of view, CT below -1500 HU, where the body's edge is not skin) and its
  volume, centroid and covariance those of the body inside the field of view. It is nearly always
  ``truncated`` (cut by the field of view). The deformable registration tier matches it like an organ; the
  rigid tier never uses it. Null otherwise and in passports written before schema 1.3.

Validation on load: unknown fields, NaN/infinity, world coordinates beyond +-:data:`MAX_COORDINATE_MM`,
negative or ascending eigenvalues, an improper grid (a size below 1 voxel, a singular affine, a last row
other than ``[0, 0, 0, 1]``) are errors. Schema versions ``1.x`` are read; a newer minor version loads when it
holds nothing this version does not know, and is otherwise refused as newer (:func:`validate_passport`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .. import __version__
from ..errors import InputError
from ..io.atomic import write_text_atomic

SCHEMA_VERSION = "1.3"  # 1.1: + Passport.warnings, consistency checks on load; 1.2: + Organ.boundary_normals;
# 1.3: + Passport.body (the body outline)
#: ``Passport.body``'s id and name: the body outline is not a TotalSegmentator class (ids 1-117).
BODY_ID = 1000
BODY_NAME = "body"

Vec3 = tuple[float, float, float]
Mat3 = tuple[Vec3, Vec3, Vec3]

#: Every model: unknown fields and NaN/inf numbers are validation errors.
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
#: Largest world coordinate (mm) a passport or point file may hold: 100 m, far beyond any scanner's field of
#: view; larger values are a broken file (and would overflow grid sizes and linear algebra downstream).
MAX_COORDINATE_MM = 1.0e5
#: Most voxels a passport's grid may have (8.6e9: four times a 1024 x 1024 x 2048 scan).
MAX_GRID_VOXELS = 2.0**33


def _check_coordinates(values: np.ndarray, what: str) -> None:
    """``ValueError`` when a world coordinate (mm) of ``values`` is beyond :data:`MAX_COORDINATE_MM`."""
    if values.size and float(np.abs(values).max()) > MAX_COORDINATE_MM:
        raise ValueError(f"{what} has coordinates beyond +-{MAX_COORDINATE_MM:g} mm "
                         f"(found {float(np.abs(values).max()):.3g})")


class Source(BaseModel):
    """The image (label map or CT) the passport was made from."""

    model_config = _STRICT

    path: str | None = None
    sha256: str | None = None
    ct_path: str | None = None
    ct_sha256: str | None = None


#: A passport grid's ``kind`` (see :class:`Grid`); also the CLI's ``--passport-grid`` choices.
GridKind = Literal["output", "model"]
GRID_KINDS: tuple[str, ...] = get_args(GridKind)


class Grid(BaseModel):
    """The voxel grid the passport was computed on.

    ``kind``: ``output`` = the label map's own grid (the input's, voxel for voxel); ``model`` = the
    segmentation model's canonical 3 mm grid inside the pipeline (as the original study did). ``shape``:
    voxels in array axis order ``[i, j, k]``; ``spacing_mm``: voxel size (mm) per array axis; ``affine``: 4x4
    voxel -> RAS+ world mm (rows); ``orientation``: axis codes of the array axes (e.g. ``R, A, S``).
    """

    model_config = _STRICT

    kind: GridKind
    shape: tuple[int, int, int]
    spacing_mm: Vec3
    affine: tuple[tuple[float, float, float, float], ...] = Field(min_length=4, max_length=4)
    orientation: tuple[str, str, str]

    @model_validator(mode="after")
    def _proper(self) -> Grid:
        if min(self.shape) < 1:
            raise ValueError(f"shape {list(self.shape)} must be at least 1 voxel along every axis")
        a = np.asarray(self.affine, dtype=np.float64)
        if a.shape != (4, 4):
            raise ValueError("affine must be 4 rows of 4 numbers")
        if not np.allclose(a[3], (0.0, 0.0, 0.0, 1.0), atol=1e-6):
            raise ValueError(f"affine's last row must be [0, 0, 0, 1] (found {a[3].tolist()})")
        if abs(float(np.linalg.det(a[:3, :3]))) < 1e-9:
            raise ValueError("affine is singular (a zero voxel size or two parallel axes)")
        corners = np.stack(np.meshgrid(*[(0, n - 1) for n in self.shape], indexing="ij"), -1).reshape(-1, 3)
        _check_coordinates(corners @ a[:3, :3].T + a[:3, 3], "the grid (affine and shape)")
        if float(np.prod(np.asarray(self.shape, dtype=np.float64))) > MAX_GRID_VOXELS:
            raise ValueError(f"shape {list(self.shape)} has more than {MAX_GRID_VOXELS:.3g} voxels")
        if min(self.spacing_mm) <= 0:
            raise ValueError(f"spacing_mm {list(self.spacing_mm)} must be positive")
        return self


class Organ(BaseModel):
    """One label present in the label map. All coordinates world mm, RAS+."""

    model_config = _STRICT

    id: int = Field(ge=1)
    name: str | None = Field(description="TotalSegmentator class name; null for ids it does not know")
    voxel_count: int = Field(ge=1)
    volume_mm3: float = Field(ge=0)
    centroid_mm: Vec3 = Field(description="mean voxel-centre position, world mm, RAS+")
    covariance_mm2: Mat3 = Field(description="np.cov of voxel-centre world coordinates (mm^2, RAS+)")
    eigenvalues_mm2: Vec3 = Field(description="descending")
    eigenvectors: Mat3 = Field(description="rows: unit eigenvectors of eigenvalues_mm2, RAS+")
    bbox_mm: tuple[Vec3, Vec3] = Field(description="[min, max] voxel-centre corner, world mm, RAS+")
    boundary_points_mm: list[Vec3] = Field(description="surface voxel centres, world mm, RAS+")
    boundary_normals: list[Vec3] | None = Field(
        default=None, description="outward unit normals at boundary_points_mm (same order), RAS+; null unless asked for")
    truncated: bool = Field(description="the organ touches the image border (may be incomplete)")
    hu_mean: float | None = None
    hu_std: float | None = None

    def points_array(self) -> np.ndarray:
        """``boundary_points_mm`` as an ``(N, 3)`` float64 array (world mm, RAS+)."""
        return vec3_array(self.boundary_points_mm)

    def normals_array(self) -> np.ndarray | None:
        """``boundary_normals`` as an ``(N, 3)`` float64 array (unit, RAS+), or None without normals."""
        return None if self.boundary_normals is None else vec3_array(self.boundary_normals)

    @field_validator("eigenvalues_mm2")
    @classmethod
    def _descending(cls, v: Vec3) -> Vec3:
        if not (v[0] >= v[1] >= v[2]):
            raise ValueError("eigenvalues_mm2 must be in descending order")
        if v[2] < -1e-6:  # a covariance's eigenvalues are >= 0 (ctpassport clips rounding below 0)
            raise ValueError(f"eigenvalues_mm2 must not be negative (found {v[2]:g})")
        if v[0] > MAX_COORDINATE_MM**2:
            raise ValueError(f"eigenvalues_mm2 beyond {MAX_COORDINATE_MM**2:g} mm^2 (found {v[0]:.3g})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Organ:
        _check_coordinates(np.asarray([self.centroid_mm, *self.bbox_mm]), "centroid_mm or bbox_mm")
        _check_coordinates(self.points_array(), "boundary_points_mm")
        c = self.covariance_mm2
        if max(abs(x) for row in c for x in row) > MAX_COORDINATE_MM**2:
            raise ValueError(f"covariance_mm2 has entries beyond {MAX_COORDINATE_MM**2:g} mm^2")
        if any(abs(c[a][b] - c[b][a]) > 1e-6 * (1.0 + abs(c[a][b])) for a in range(3) for b in range(a)):
            raise ValueError("covariance_mm2 must be symmetric")
        for row in self.eigenvectors:
            norm = sum(x * x for x in row) ** 0.5
            if abs(norm - 1.0) > 1e-3:
                raise ValueError(f"eigenvectors must be unit vectors (found norm {norm:.4g})")
        lo, hi = self.bbox_mm
        if any(lo[a] > hi[a] for a in range(3)):
            raise ValueError("bbox_mm must be [min, max]")
        if self.boundary_normals is not None:
            if len(self.boundary_normals) != len(self.boundary_points_mm):
                raise ValueError(f"boundary_normals has {len(self.boundary_normals)} rows but boundary_points_mm "
                                 f"{len(self.boundary_points_mm)}: one normal per point")
            for row in self.boundary_normals:
                norm = sum(x * x for x in row) ** 0.5
                if abs(norm - 1.0) > 2e-3:
                    raise ValueError(f"boundary_normals must be unit vectors (found norm {norm:.4g})")
        return self


def vec3_array(rows: list[Vec3]) -> np.ndarray:
    """``(N, 3)`` float64 array of a list of 3-vectors (twice as fast as ``np.asarray`` on nested lists)."""
    return np.fromiter(chain.from_iterable(rows), dtype=np.float64, count=3 * len(rows)).reshape(-1, 3)


class Passport(BaseModel):
    """The passport of one scan. See the module docstring for frames and units."""

    model_config = _STRICT

    schema_version: str = SCHEMA_VERSION
    ctpassport_version: str = __version__
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    source: Source = Field(default_factory=Source)
    grid: Grid
    model_id: str | None = None
    coordinate_frame: Literal["RAS+ world mm"] = "RAS+ world mm"
    seed: int = 0
    points_per_organ: int = 500
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per stage")
    organs: list[Organ] = Field(default_factory=list)
    body: Organ | None = Field(default=None, description="the body outline (id BODY_ID, name 'body'); null unless asked for")
    warnings: list[str] = Field(default_factory=list, description="e.g. an empty label map")

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: str) -> str:
        parts = v.split(".")
        if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
            raise ValueError(f"malformed passport schema version {v!r} (MAJOR.MINOR, e.g. {SCHEMA_VERSION})")
        if parts[0] != SCHEMA_VERSION.split(".")[0]:
            raise ValueError(f"unsupported passport schema version {v} (this ctpassport reads {SCHEMA_VERSION})")
        return v

    @model_validator(mode="after")
    def _unique_ids(self) -> Passport:
        ids = [o.id for o in self.organs]
        if len(ids) != len(set(ids)):
            twice = ", ".join(str(i) for i in sorted({i for i in ids if ids.count(i) > 1}))
            raise ValueError(f"organ ids must be unique (found id {twice} more than once)")
        if self.body is not None and (self.body.id, self.body.name) != (BODY_ID, BODY_NAME):
            raise ValueError(f"body must have id {BODY_ID} and name {BODY_NAME!r} "
                             f"(found {self.body.id}, {self.body.name!r})")
        if self.body is not None and BODY_ID in ids:
            raise ValueError(f"organ id {BODY_ID} is the body outline's: a passport with a body has no organ {BODY_ID}")
        return self

    def organ(self, key: int | str) -> Organ | None:
        """The organ with label id ``key`` (int) or class name ``key`` (str), or None."""
        for o in self.organs:
            if (isinstance(key, int) and o.id == key) or (isinstance(key, str) and o.name == key):
                return o
        return None

    def by_id(self) -> dict[int, Organ]:
        return {o.id: o for o in self.organs}


def passport_json(passport: Passport) -> str:
    """The passport as JSON text: the header indented, then one organ per line and the body outline on one
    line (compact numbers)."""
    head = passport.model_dump_json(indent=1, exclude={"organs", "body"}).rstrip()
    organs = ",\n  ".join(o.model_dump_json() for o in passport.organs)
    tail = f' "organs": [\n  {organs}\n ]' if passport.organs else ' "organs": []'
    outline = passport.body.model_dump_json() if passport.body is not None else "null"
    return f"{head[:-1].rstrip()},\n{tail},\n \"body\": {outline}\n}}\n"


def save_passport(passport: Passport, path: str | Path) -> Path:
    """Write ``passport`` as JSON atomically (:func:`passport_json`: the header, then one organ per line)."""
    write_text_atomic(path, passport_json(passport))
    return Path(path)


def load_passport(path: str | Path) -> Passport:
    """Read and validate a passport JSON; :class:`InputError` with one line for anything wrong."""
    from ..io.jsonfile import read_json_object

    p = Path(path)
    if p.is_dir():
        raise InputError("is a folder, not a passport JSON file", p)
    if not p.is_file():
        raise InputError("no such passport file", p)
    return validate_passport(read_json_object(p, "passport"), p)


def validate_passport(raw: dict[str, object] | str, source: str | Path) -> Passport:
    """A :class:`Passport` from a parsed JSON object or JSON text; :class:`InputError` naming ``source``
    (a file or a store entry) with the first problem, and saying so when the passport was written by a newer
    schema than this version reads (an unknown field is then most likely that version's addition)."""
    import json

    try:
        return Passport.model_validate(raw) if isinstance(raw, dict) else Passport.model_validate_json(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        problem = f"not a valid passport: {loc + ': ' if loc else ''}{err['msg']}"
    try:
        version = (raw if isinstance(raw, dict) else json.loads(raw)).get("schema_version")
    except (ValueError, AttributeError, RecursionError):
        version = None
    if isinstance(version, str) and _newer(version):
        problem = (f"written with passport schema {version}, newer than this ctpassport reads "
                   f"({SCHEMA_VERSION}): {problem}")
        raise InputError(problem, source, "upgrade ctpassport to read it") from None
    raise InputError(problem, source) from None


def _newer(version: str) -> bool:
    """Whether ``version`` (``major.minor``) is newer than :data:`SCHEMA_VERSION`."""
    def key(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split("."))

    try:
        return key(version) > key(SCHEMA_VERSION)
    except ValueError:
        return False
