"""The passport schema (pydantic, versioned, validated on load).

Frames and units, stated once for every field below:

* all coordinates are **world millimetres in RAS+** (+x Right, +y Anterior, +z Superior), computed from
  voxel centres with the label map's affine;
* ``covariance_mm2`` is ``np.cov`` of the organ's voxel-centre coordinates (mm^2, unbiased, ``ddof=1``),
  not an inertia tensor;
* ``eigenvalues_mm2`` are the covariance eigenvalues in **descending** order; ``eigenvectors[i]`` is the
  unit eigenvector of ``eigenvalues_mm2[i]`` (rows), its sign chosen so that its largest-magnitude
  component is positive (deterministic);
* ``bbox_mm`` is ``[[xmin, ymin, zmin], [xmax, ymax, zmax]]`` over voxel centres.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .. import __version__
from ..errors import InputError
from ..io.atomic import write_text_atomic

SCHEMA_VERSION = "1.0"

Vec3 = tuple[float, float, float]
Mat3 = tuple[Vec3, Vec3, Vec3]


class Source(BaseModel):
    """The image (label map or CT) the passport was made from."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = None
    sha256: str | None = None
    ct_path: str | None = None
    ct_sha256: str | None = None


class Grid(BaseModel):
    """The voxel grid the passport was computed on.

    ``kind``: ``output`` = the label map's own grid (the input's, voxel for voxel); ``model`` = the
    segmentation model's canonical 3 mm grid inside the pipeline (as the original study did).
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["output", "model"]
    shape: tuple[int, int, int]
    spacing_mm: Vec3
    affine: tuple[tuple[float, float, float, float], ...] = Field(min_length=4, max_length=4)
    orientation: tuple[str, str, str]


class Organ(BaseModel):
    """One label present in the label map. All coordinates world mm, RAS+."""

    model_config = ConfigDict(extra="forbid")

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
    truncated: bool = Field(description="the organ touches the image border (may be incomplete)")
    hu_mean: float | None = None
    hu_std: float | None = None

    @field_validator("eigenvalues_mm2")
    @classmethod
    def _descending(cls, v: Vec3) -> Vec3:
        if not (v[0] >= v[1] >= v[2]):
            raise ValueError("eigenvalues_mm2 must be in descending order")
        return v


class Passport(BaseModel):
    """The passport of one scan. See the module docstring for frames and units."""

    model_config = ConfigDict(extra="forbid")

    schema_version: str = SCHEMA_VERSION
    ctpassport_version: str = __version__
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    source: Source = Field(default_factory=Source)
    grid: Grid
    model_id: str | None = None
    coordinate_frame: Literal["RAS+ world mm"] = "RAS+ world mm"
    seed: int = 0
    points_per_organ: int = 500
    timings: dict[str, float] = Field(default_factory=dict)
    organs: list[Organ] = Field(default_factory=list)

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: str) -> str:
        if v.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
            raise ValueError(f"unsupported passport schema version {v} (this ctpassport reads {SCHEMA_VERSION})")
        return v

    def organ(self, key: int | str) -> Organ | None:
        """The organ with label id ``key`` (int) or class name ``key`` (str), or None."""
        for o in self.organs:
            if (isinstance(key, int) and o.id == key) or (isinstance(key, str) and o.name == key):
                return o
        return None

    def by_id(self) -> dict[int, Organ]:
        return {o.id: o for o in self.organs}


def save_passport(passport: Passport, path: str | Path) -> Path:
    """Write ``passport`` as JSON atomically (compact numbers, one organ per block)."""
    write_text_atomic(path, passport.model_dump_json(indent=1))
    return Path(path)


def load_passport(path: str | Path) -> Passport:
    """Read and validate a passport JSON; :class:`InputError` with one line for anything wrong."""
    p = Path(path)
    if not p.is_file():
        raise InputError("no such passport file", p)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not valid JSON ({type(exc).__name__} at {getattr(exc, 'pos', '?')})", p) from None
    try:
        return Passport.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise InputError(f"not a valid passport: {loc}: {err['msg']}", p) from None
