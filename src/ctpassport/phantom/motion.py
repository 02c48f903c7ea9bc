"""The known motion between a phantom baseline and its follow-up: rigid motion plus a breathing-like deformation.

Direction (the registration convention of ctpassport): the transform maps **fixed-space points to
moving-space points** (pull-back), world millimetres, RAS+. Here fixed = the baseline scan and moving = the
follow-up scan, so ``T(x)`` is where the tissue at baseline position ``x`` lies in the follow-up, and the
follow-up warped onto the baseline is ``warped(x) = follow_up(T(x))``. The target registration error of an
estimated transform is therefore ``|T_est(x) - T(x)|`` at baseline (fixed) points ``x``.

``T(x) = R (x + d(x) - c) + c + t`` where ``d`` is a smooth displacement field (mm):

* diaphragm motion: ``d_z = A * exp(-(z - z_d)^2 / (2 s_z^2)) * exp(-((x - x_d)^2 + (y - y_d)^2) / (2 s_xy^2))``
* chest wall expansion: ``d_y = B * exp(-(z - z_c)^2 / (2 s_c^2)) * exp(-x^2 / (2 s_xy^2)) * (y - y_0) / L``

with small gradients (|grad d| < 0.25 by construction), so ``x -> x + d(x)`` is invertible and its inverse
is computed by fixed-point iteration to better than 1e-6 mm.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..errors import InputError
from ..io.atomic import write_text_atomic

TRANSFORM_KIND = "ctpassport.phantom.true_transform"
TRANSFORM_VERSION = 1

_Vec3 = tuple[float, float, float]
_Rotation3 = tuple[tuple[float, float, float], ...]


@dataclass(frozen=True)
class Deformation:
    """Parameters of the breathing-like displacement (mm, baseline world frame RAS+)."""

    diaphragm_shift: float  # A: superior (+) / inferior (-) shift at the diaphragm (mm)
    diaphragm_center: tuple[float, float, float]  # (x_d, y_d, z_d) mm
    sigma_z: float  # s_z mm
    sigma_xy: float  # s_xy mm
    chest_expansion: float  # B: anterior shift at (y - y_0) = L (mm)
    chest_z: float  # z_c mm
    chest_sigma_z: float  # s_c mm
    chest_y0: float  # y_0 mm
    chest_length: float  # L mm

    def displacement(self, p: np.ndarray) -> np.ndarray:
        """d(p) for (..., 3) points (mm, RAS+); returns (..., 3) displacements (mm)."""
        p = np.asarray(p, dtype=np.float64)
        x, y, z = p[..., 0], p[..., 1], p[..., 2]
        xd, yd, zd = self.diaphragm_center
        g1 = np.exp(-((z - zd) ** 2) / (2 * self.sigma_z**2)
                    - ((x - xd) ** 2 + (y - yd) ** 2) / (2 * self.sigma_xy**2))
        g2 = np.exp(-((z - self.chest_z) ** 2) / (2 * self.chest_sigma_z**2) - x**2 / (2 * self.sigma_xy**2))
        out = np.zeros_like(p)
        out[..., 2] = self.diaphragm_shift * g1
        out[..., 1] = self.chest_expansion * g2 * (y - self.chest_y0) / self.chest_length
        return out

    def max_displacement(self, extent_mm: float = 400.0) -> float:
        """An upper bound of |d| (mm) for points within ``extent_mm`` of the chest's y_0 plane."""
        return float(abs(self.diaphragm_shift) + abs(self.chest_expansion) * extent_mm / self.chest_length)


@dataclass(frozen=True)
class TrueTransform:
    """The exact baseline -> follow-up map ``T(x) = R (x + d(x) - c) + c + t`` (world mm, RAS+).

    See the module docstring: ``apply`` maps fixed (baseline) points to moving (follow-up) points.
    """

    rotation: tuple[tuple[float, float, float], ...]
    center: tuple[float, float, float]
    translation: tuple[float, float, float]
    deformation: Deformation

    @property
    def R(self) -> np.ndarray:
        """The 3x3 rotation (RAS+)."""
        return np.asarray(self.rotation, dtype=np.float64)

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Baseline (fixed) world points (..., 3) mm RAS+ -> follow-up (moving) world points (..., 3)."""
        p = np.asarray(points, dtype=np.float64)
        c, t = np.asarray(self.center), np.asarray(self.translation)
        q = p + self.deformation.displacement(p) - c
        return q @ self.R.T + c + t

    def inverse(self, points: np.ndarray, *, tol_mm: float = 1e-6, max_iter: int = 60) -> np.ndarray:
        """Follow-up (moving) world points (..., 3) mm RAS+ -> baseline (fixed) world points (fixed-point
        iteration until a step is below ``tol_mm``)."""
        q = np.asarray(points, dtype=np.float64)
        c, t = np.asarray(self.center), np.asarray(self.translation)
        zpt = (q - c - t) @ self.R + c  # = x + d(x)
        x = zpt.copy()
        for _ in range(max_iter):
            nxt = zpt - self.deformation.displacement(x)
            step = float(np.max(np.abs(nxt - x))) if nxt.size else 0.0
            x = nxt
            if step < tol_mm:
                break
        return x

    def max_displacement(self) -> float:
        """Upper bound (mm) of the deformation part's |d| (excludes the rigid part) for points within 400 mm
        of the chest's y_0 plane (:meth:`Deformation.max_displacement`)."""
        return self.deformation.max_displacement()

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": TRANSFORM_KIND,
            "version": TRANSFORM_VERSION,
            "direction": "fixed_to_moving",
            "fixed": "baseline",
            "moving": "follow-up",
            "frame": "world mm RAS+",
            "formula": "T(x) = R (x + d(x) - c) + c + t; d = breathing-like displacement (see ctpassport.phantom.motion)",
            "rotation": [list(r) for r in self.rotation],
            "center": list(self.center),
            "translation": list(self.translation),
            "rotation_deg": round(rotation_angle_deg(self.R), 6),
            "deformation": asdict(self.deformation),
        }

    @classmethod
    def from_dict(cls, d: dict[str, object], path: Path | None = None) -> TrueTransform:
        """Read :meth:`to_dict`'s form; :class:`InputError` for another kind, a newer version, another direction
        or frame, and values that are not a finite rotation, vectors of 3, or positive widths and lengths."""
        if d.get("kind") != TRANSFORM_KIND:
            raise InputError(f"not a phantom true transform (kind {d.get('kind')!r})", path)
        version = d.get("version", TRANSFORM_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version > TRANSFORM_VERSION:
            raise InputError(f"true-transform version {version!r} is newer than this ctpassport reads "
                             f"({TRANSFORM_VERSION})", path, "upgrade ctpassport")
        for key, want in (("direction", "fixed_to_moving"), ("frame", "world mm RAS+")):
            if key in d and d[key] != want:
                raise InputError(f"true-transform {key} is {d[key]!r}; ctpassport's is {want!r}", path,
                                 "write the transform baseline -> follow-up in world mm RAS+")
        out = cls._parse(d, path)
        out._check(path)
        return out

    def _check(self, path: Path | None) -> None:
        r = self.R
        vectors = np.asarray([*self.center, *self.translation, *self.deformation.diaphragm_center])
        scalars = np.asarray([float(v) for k, v in asdict(self.deformation).items() if k != "diaphragm_center"])
        if r.shape != (3, 3) or len(self.center) != 3 or len(self.translation) != 3 \
                or len(self.deformation.diaphragm_center) != 3:
            raise InputError("malformed phantom true transform (rotation must be 3x3; center, translation and "
                             "deformation.diaphragm_center 3 numbers)", path)
        if not (np.all(np.isfinite(r)) and np.all(np.isfinite(vectors)) and np.all(np.isfinite(scalars))):
            raise InputError("malformed phantom true transform (a value is not a finite number)", path)
        if not np.allclose(r @ r.T, np.eye(3), atol=1e-4) or np.linalg.det(r) <= 0:
            raise InputError("malformed phantom true transform (rotation is not a rotation matrix)", path)
        widths = {k: getattr(self.deformation, k) for k in ("sigma_z", "sigma_xy", "chest_sigma_z", "chest_length")}
        bad = [k for k, v in widths.items() if v <= 0]
        if bad:
            raise InputError(f"malformed phantom true transform (deformation.{bad[0]} must be > 0 mm)", path)

    @classmethod
    def _parse(cls, d: dict[str, object], path: Path | None) -> TrueTransform:
        try:
            deform = dict(cast("dict[str, Any]", d["deformation"]))
            deform["diaphragm_center"] = tuple(float(v) for v in deform["diaphragm_center"])
            return cls(
                rotation=cast(_Rotation3, tuple(tuple(float(v) for v in row)
                                                for row in cast("Iterable[Iterable[Any]]", d["rotation"]))),
                center=cast(_Vec3, tuple(float(v) for v in cast("Iterable[Any]", d["center"]))),
                translation=cast(_Vec3, tuple(float(v) for v in cast("Iterable[Any]", d["translation"]))),
                deformation=Deformation(**cast("dict[str, Any]", {k: (float(v) if not isinstance(v, tuple) else v)
                                                                  for k, v in deform.items()})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"malformed phantom true transform ({exc})", path) from None


def rotation_angle_deg(r: np.ndarray) -> float:
    """Rotation angle (degrees) of a rotation matrix."""
    return math.degrees(math.acos(max(-1.0, min(1.0, (float(np.trace(r)) - 1.0) / 2.0))))


def save_true_transform(transform: TrueTransform, path: str | Path) -> Path:
    """Write the transform as JSON (atomic). See the module docstring for the direction."""
    write_text_atomic(path, json.dumps(transform.to_dict(), indent=2))
    return Path(path)


def load_true_transform(path: str | Path) -> TrueTransform:
    """Read a transform written by :func:`save_true_transform`."""
    from ..io.jsonfile import read_json_object

    p = Path(path)
    return TrueTransform.from_dict(read_json_object(p, "phantom true-transform file"), p)


def sample_motion(rng: np.random.Generator, *, center: np.ndarray, diaphragm: np.ndarray, chest_z: float,
                  chest_y0: float, max_rotation_deg: float = 4.0, max_translation_mm: float = 12.0,
                  max_breath_mm: float = 12.0) -> TrueTransform:
    """Draw a rigid motion and a breathing deformation (magnitudes in degrees / mm, world RAS+).

    ``center``: rotation centre (mm); ``diaphragm``: (x, y, z) of the diaphragm dome (mm); ``chest_z`` /
    ``chest_y0``: height (mm) and posterior reference plane (mm) of the chest expansion.
    """
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(0.3, 1.0) * max_rotation_deg * (1 if rng.random() < 0.5 else -1))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    trans = direction * rng.uniform(0.3, 1.0) * max_translation_mm
    shift = rng.uniform(0.4, 1.0) * max_breath_mm * (-1 if rng.random() < 0.7 else 1)
    deform = Deformation(
        diaphragm_shift=float(shift),
        diaphragm_center=cast(_Vec3, tuple(float(v) for v in diaphragm)),
        sigma_z=float(rng.uniform(80.0, 110.0)),
        sigma_xy=float(rng.uniform(140.0, 180.0)),
        chest_expansion=float(rng.uniform(0.3, 1.0) * 0.5 * max_breath_mm),
        chest_z=float(chest_z),
        chest_sigma_z=float(rng.uniform(90.0, 130.0)),
        chest_y0=float(chest_y0),
        chest_length=200.0,
    )
    return TrueTransform(rotation=cast(_Rotation3, tuple(tuple(float(v) for v in row) for row in rot)),
                         center=cast(_Vec3, tuple(float(v) for v in center)),
                         translation=cast(_Vec3, tuple(float(v) for v in trans)),
                         deformation=deform)
