"""Point lists as CSV: a header line naming ``x``, ``y``, ``z`` (any order, any extra columns, kept as they are).

Coordinates are world millimetres, RAS+ by default; ``lps=True`` reads/writes LPS+ (DICOM/ITK) by negating
x and y. Learn2Reg keypoint files (no header, voxel indices) are read by :func:`read_voxel_csv`.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.atomic import write_text_atomic
from ..passport.schema import MAX_COORDINATE_MM  # beyond the passports' bound: a unit or column mistake

_FLIP = np.array([-1.0, -1.0, 1.0])


@dataclass
class PointTable:
    """Points (``(N, 3)`` RAS+ mm) plus the CSV's columns, so that extra columns survive a round trip."""

    points: np.ndarray
    header: list[str] = field(default_factory=lambda: ["x", "y", "z"])
    rows: list[list[str]] = field(default_factory=list)
    xyz_columns: tuple[int, int, int] = (0, 1, 2)

    def with_points(self, points: np.ndarray) -> PointTable:
        """A copy with new coordinates (RAS+ mm) in the x, y, z columns and the other columns unchanged."""
        p = np.asarray(points, dtype=np.float64)
        if p.shape != self.points.shape:
            raise ValueError(f"expected {self.points.shape} points, got {p.shape}")
        return PointTable(p, list(self.header), [list(r) for r in self.rows], self.xyz_columns)


def _csv_rows(p: Path, what: str) -> list[list[str]]:
    """The non-blank rows of the CSV file ``p`` (UTF-8, a byte-order mark allowed); :class:`InputError` naming
    the file when it is missing or not UTF-8 text."""
    if not p.is_file():
        raise InputError(f"no such {what} file", p)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError("not a text (UTF-8) CSV file", p) from None
    return [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]


def read_points_csv(path: str | Path, *, lps: bool = False) -> PointTable:
    """Read a point CSV (header with ``x``, ``y``, ``z``; world mm; RAS+ unless ``lps``) as RAS+ mm."""
    p = Path(path)
    rows = _csv_rows(p, "point")
    if not rows:
        raise InputError("empty point file (expected a header line x,y,z and one row per point)", p)
    header = [c.strip() for c in rows[0]]
    lower = [c.lower() for c in header]
    try:
        cols = tuple(lower.index(k) for k in ("x", "y", "z"))
    except ValueError:
        raise InputError(
            f"the header line must name columns x, y and z (found {','.join(header)[:80]!r})",
            p,
            "first line like: x,y,z",
        ) from None
    twice = [k for k in ("x", "y", "z") if lower.count(k) > 1]
    if twice:
        raise InputError(f"the header line names column {twice[0]} {lower.count(twice[0])} times", p)
    body = rows[1:]
    if not body:
        raise InputError("no points after the header line", p)
    pts = np.empty((len(body), 3))
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise InputError(f"row {i + 2} has {len(r)} columns, the header {len(header)}", p)
        try:
            pts[i] = [float(r[c]) for c in cols]
        except ValueError:
            raise InputError(
                f"row {i + 2}: x, y, z must be numbers (found {[r[c] for c in cols]})", p
            ) from None
    if not np.all(np.isfinite(pts)):
        raise InputError("contains NaN or infinite coordinates", p)
    if np.abs(pts).max() > MAX_COORDINATE_MM:
        raise InputError(
            f"has coordinates beyond +-{MAX_COORDINATE_MM:g} mm (found {np.abs(pts).max():.3g}); "
            "point files hold world millimetres", p
        )
    if lps:
        pts = pts * _FLIP
    return PointTable(pts, header, [[c.strip() for c in r] for r in body], cols)  # type: ignore[arg-type]


def format_points_csv(table: PointTable, *, lps: bool = False, decimals: int = 4) -> str:
    """The CSV text of ``table`` (x, y, z replaced by its points, RAS+ or LPS; other columns kept)."""
    pts = table.points * _FLIP if lps else table.points
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(table.header)
    rows = table.rows or [["", "", ""] for _ in range(len(pts))]
    for i, r in enumerate(rows):
        r = list(r)
        for k, c in enumerate(table.xyz_columns):
            r[c] = f"{pts[i, k]:.{decimals}f}"
        w.writerow(r)
    return out.getvalue()


def write_points_csv(path: str | Path, table: PointTable, *, lps: bool = False) -> Path:
    """Write ``table`` atomically as CSV (see :func:`format_points_csv`)."""
    return write_text_atomic(path, format_points_csv(table, lps=lps))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_voxel_csv(path: str | Path) -> np.ndarray:
    """Learn2Reg keypoints/landmarks: comma-separated voxel indices ``i, j, k`` (nibabel array order), one
    point per line, no header (a first line without any number, e.g. ``x,y,z``, is skipped as a header; a
    first line with some numbers is a malformed point and an error). Returns float64 ``(N, 3)``."""
    p = Path(path)
    rows = _csv_rows(p, "keypoint")
    vals = []
    for i, r in enumerate(rows):
        try:
            vals.append([float(c) for c in r[:3]])
        except ValueError:
            if i == 0 and not any(_is_number(c) for c in r[:3]):
                continue  # a header line
            raise InputError(f"line {i + 1}: expected three numbers (voxel indices)", p) from None
        if len(r) < 3:
            raise InputError(f"line {i + 1}: expected three numbers (voxel indices)", p)
    if not vals:
        raise InputError("no keypoints in file", p)
    out = np.asarray(vals, dtype=np.float64)
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        raise InputError(f"line {int(np.argmax(bad)) + 1}: NaN or infinite voxel index", p)
    return out
