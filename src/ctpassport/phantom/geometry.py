"""Implicit solid primitives for the phantom: inside tests on point arrays, bounding boxes, exact moments.

Every shape lives in the phantom's **body frame** (millimetres, RAS+ axes: +x patient's right, +y anterior,
+z superior). ``inside(x, y, z)`` takes three broadcastable float arrays of body-frame coordinates (mm) and
returns a boolean array of their broadcast shape. ``bbox()`` returns ``(lo, hi)`` (mm) enclosing the shape.

Shapes whose volume and centroid have a closed form (:class:`Ellipsoid`, :class:`CutEllipsoid`) provide
``volume()`` (mm^3) and ``centroid()`` (mm, body frame); the generator keeps such organs intact so that their
rendered labels can be checked against these analytic values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Array = np.ndarray


def rotation_xyz(rx_deg: float = 0.0, ry_deg: float = 0.0, rz_deg: float = 0.0) -> Array:
    """Rotation matrix ``Rz @ Ry @ Rx`` for angles (degrees) about the x, y and z axes (right-handed; the body
    frame's for shapes, the world RAS+ axes for grid obliquity)."""
    ax, ay, az = (math.radians(a) for a in (rx_deg, ry_deg, rz_deg))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def fibonacci_sphere(n: int) -> Array:
    """``n`` nearly uniform unit vectors (n, 3) on the sphere (deterministic)."""
    i = np.arange(n, dtype=np.float64) + 0.5
    phi = np.arccos(1.0 - 2.0 * i / n)
    theta = math.pi * (1.0 + 5.0**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)


def _frame_coords(center: Array, rotation: Array, x: Array, y: Array, z: Array) -> list[Array]:
    """Coordinates of body-frame points along the columns of ``rotation`` about ``center``: ``R^T (p - c)`` (mm)."""
    dx, dy, dz = x - center[0], y - center[1], z - center[2]
    return [rotation[0, k] * dx + rotation[1, k] * dy + rotation[2, k] * dz for k in range(3)]


class Shape:
    """Base class: subclasses implement :meth:`inside` and :meth:`bbox` (body frame, mm)."""

    def inside(self, x: Array, y: Array, z: Array) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def bbox(self) -> tuple[Array, Array]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inside_points(self, pts: Array) -> Array:
        """:meth:`inside` for an (N, 3) array of body-frame points (mm)."""
        pts = np.asarray(pts, dtype=np.float64)
        return self.inside(pts[:, 0], pts[:, 1], pts[:, 2])


@dataclass
class Ellipsoid(Shape):
    """``{c + R diag(r) u : |u| <= 1}``: centre ``c`` (mm), semi-axes ``r`` (mm), rotation ``R`` (body frame)."""

    center: Any
    radii: Any
    rotation: Any = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        self.center = np.asarray(self.center, dtype=np.float64)
        self.radii = np.asarray(self.radii, dtype=np.float64)
        self.rotation = np.asarray(self.rotation, dtype=np.float64)

    @property
    def axes(self) -> Array:
        """``A = R diag(r)``: maps the unit ball onto the ellipsoid (around the centre)."""
        return self.rotation * self.radii[None, :]

    def inside(self, x: Array, y: Array, z: Array) -> Array:
        u0, u1, u2 = (u / r for u, r in zip(_frame_coords(self.center, self.rotation, x, y, z), self.radii))
        return u0 * u0 + u1 * u1 + u2 * u2 <= 1.0

    def bbox(self) -> tuple[Array, Array]:
        half = np.sqrt(((self.rotation * self.radii[None, :]) ** 2).sum(axis=1))
        return self.center - half, self.center + half

    def volume(self) -> float:
        """Exact volume (mm^3)."""
        return float(4.0 / 3.0 * math.pi * np.prod(self.radii))

    def centroid(self) -> Array:
        """Exact centroid (mm, body frame)."""
        return self.center.copy()

    def surface_points(self, n: int = 1500, inflate_mm: float = 0.0) -> Array:
        """(n, 3) points on the surface of the ellipsoid with semi-axes ``r + inflate_mm`` (mm, body frame)."""
        u = fibonacci_sphere(n)
        return self.center + (u * (self.radii + inflate_mm)) @ self.rotation.T

    def inflated(self, mm: float) -> Ellipsoid:
        """The same ellipsoid with every semi-axis grown by ``mm`` (mm)."""
        return Ellipsoid(self.center, self.radii + mm, self.rotation)


@dataclass
class CutEllipsoid(Shape):
    """An ellipsoid minus the half-space ``n . p > d`` (keeps ``n . p <= d``); ``n`` is a unit normal."""

    ellipsoid: Ellipsoid
    normal: Any
    offset: float

    def __post_init__(self) -> None:
        n = np.asarray(self.normal, dtype=np.float64)
        self.normal = n / np.linalg.norm(n)
        self.offset = float(self.offset)

    @property
    def center(self) -> Array:
        return self.ellipsoid.center

    def inside(self, x: Array, y: Array, z: Array) -> Array:
        n = self.normal
        return self.ellipsoid.inside(x, y, z) & (n[0] * x + n[1] * y + n[2] * z <= self.offset)

    def bbox(self) -> tuple[Array, Array]:
        return self.ellipsoid.bbox()

    def _unit_ball_cut(self) -> tuple[Array, float]:
        """The cut in unit-ball coordinates ``u`` (p = c + A u): keep ``m . u <= h`` with |m| = 1."""
        a = self.ellipsoid.axes
        w = a.T @ self.normal
        norm = float(np.linalg.norm(w))
        h = (self.offset - float(self.normal @ self.ellipsoid.center)) / norm
        return w / norm, h

    def volume(self) -> float:
        """Exact volume (mm^3): the ellipsoid's volume times the kept fraction of the unit ball."""
        _, h = self._unit_ball_cut()
        h = min(max(h, -1.0), 1.0)
        cap = math.pi * (1.0 + h) ** 2 * (2.0 - h) / 3.0  # unit-ball volume with m.u <= h
        return float(cap * abs(np.linalg.det(self.ellipsoid.axes)))

    def centroid(self) -> Array:
        """Exact centroid (mm, body frame) of the kept part (spherical cap mapped by the ellipsoid's axes)."""
        m, h = self._unit_ball_cut()
        h = min(max(h, -1.0), 1.0)
        big_h = 1.0 + h  # cap height measured from the pole at -m
        dist = 3.0 * (2.0 - big_h) ** 2 / (4.0 * (3.0 - big_h))
        return self.ellipsoid.center + self.ellipsoid.axes @ (-m * dist)

    def surface_points(self, n: int = 1500, inflate_mm: float = 0.0) -> Array:
        """Points (M, 3) on the boundary of the cut ellipsoid inflated by ``inflate_mm`` (mm, body frame):
        curved part plus the flat cut face."""
        ell = self.ellipsoid.inflated(inflate_mm)
        curved = ell.surface_points(n)
        keep = curved @ self.normal <= self.offset + inflate_mm
        # The flat face: a grid on the plane, kept where it lies inside the ellipsoid.
        lo, hi = ell.bbox()
        size = float(np.max(hi - lo))
        t1 = np.cross(self.normal, [1.0, 0.0, 0.0] if abs(self.normal[0]) < 0.9 else [0.0, 1.0, 0.0])
        t1 /= np.linalg.norm(t1)
        t2 = np.cross(self.normal, t1)
        foot = ell.center + (self.offset + inflate_mm - float(self.normal @ ell.center)) * self.normal
        g = np.linspace(-size, size, 41)
        gu, gv = np.meshgrid(g, g, indexing="ij")
        face = foot + gu.reshape(-1, 1) * t1 + gv.reshape(-1, 1) * t2
        face = face[ell.inside_points(face)]
        return np.concatenate([curved[keep], face], axis=0)


@dataclass
class Capsule(Shape):
    """Points within a distance varying linearly from ``r0`` (at ``a``) to ``r1`` (at ``b``) of segment ab (mm)."""

    a: Any
    b: Any
    r0: float
    r1: float

    def __post_init__(self) -> None:
        self.a = np.asarray(self.a, dtype=np.float64)
        self.b = np.asarray(self.b, dtype=np.float64)

    def inside(self, x: Array, y: Array, z: Array) -> Array:
        d = self.b - self.a
        dd = float(d @ d) or 1e-12
        px, py, pz = x - self.a[0], y - self.a[1], z - self.a[2]
        t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / dd, 0.0, 1.0)
        qx, qy, qz = px - t * d[0], py - t * d[1], pz - t * d[2]
        r = self.r0 + (self.r1 - self.r0) * t
        return qx * qx + qy * qy + qz * qz <= r * r

    def bbox(self) -> tuple[Array, Array]:
        r = max(self.r0, self.r1)
        return np.minimum(self.a, self.b) - r, np.maximum(self.a, self.b) + r


def tube(points: Sequence[Any], radii: Sequence[float] | float) -> Union:
    """A tube along a polyline (mm): the union of tapered capsules between consecutive points."""
    pts = np.asarray(points, dtype=np.float64)
    rr = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(pts),))
    return Union([Capsule(pts[i], pts[i + 1], float(rr[i]), float(rr[i + 1])) for i in range(len(pts) - 1)])


@dataclass
class Swept(Shape):
    """A z-swept super-ellipse: for ``z0 <= z <= z1``, ``|(x-xc)/a|^p + |(y-yc)/b|^p <= 1`` with ``xc, yc, a, b``
    interpolated linearly from key values at ``zs`` (mm). ``p = 2`` gives ellipses."""

    zs: Any
    xc: Any
    yc: Any
    a: Any
    b: Any
    p: float = 2.0

    def __post_init__(self) -> None:
        order = np.argsort(np.asarray(self.zs, dtype=np.float64))
        self.zs = np.asarray(self.zs, dtype=np.float64)[order]
        n = len(self.zs)
        self.xc, self.yc, self.a, self.b = (
            np.broadcast_to(np.asarray(v, dtype=np.float64), (n,))[order] for v in (self.xc, self.yc, self.a, self.b)
        )

    def params(self, z: Array) -> tuple[Array, Array, Array, Array]:
        """``(xc, yc, a, b)`` (mm) interpolated at heights ``z`` (mm, body frame)."""
        return tuple(np.interp(z, self.zs, v) for v in (self.xc, self.yc, self.a, self.b))

    def inside(self, x: Array, y: Array, z: Array) -> Array:
        zf = np.asarray(z)
        xc, yc, a, b = self.params(zf)
        u = np.abs((x - xc) / a)
        v = np.abs((y - yc) / b)
        if self.p == 2.0:
            s = u * u + v * v
        else:
            s = u**self.p + v**self.p
        return (s <= 1.0) & (zf >= self.zs[0]) & (zf <= self.zs[-1])

    def bbox(self) -> tuple[Array, Array]:
        lo = np.array([np.min(self.xc - self.a), np.min(self.yc - self.b), self.zs[0]])
        hi = np.array([np.max(self.xc + self.a), np.max(self.yc + self.b), self.zs[-1]])
        return lo, hi


@dataclass
class Box(Shape):
    """An oriented box: ``|R^T (p - c)| <= half`` per axis (mm)."""

    center: Any
    half: Any
    rotation: Any = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        self.center = np.asarray(self.center, dtype=np.float64)
        self.half = np.asarray(self.half, dtype=np.float64)
        self.rotation = np.asarray(self.rotation, dtype=np.float64)

    def inside(self, x: Array, y: Array, z: Array) -> Array:
        u0, u1, u2 = _frame_coords(self.center, self.rotation, x, y, z)
        return (np.abs(u0) <= self.half[0]) & (np.abs(u1) <= self.half[1]) & (np.abs(u2) <= self.half[2])

    def bbox(self) -> tuple[Array, Array]:
        half = np.abs(self.rotation) @ self.half
        return self.center - half, self.center + half


@dataclass
class HalfSpace(Shape):
    """``n . p <= d`` (unbounded; only meaningful inside an :class:`Intersection`)."""

    normal: Any
    offset: float

    def __post_init__(self) -> None:
        n = np.asarray(self.normal, dtype=np.float64)
        self.normal = n / np.linalg.norm(n)

    def inside(self, x: Array, y: Array, z: Array) -> Array:
        n = self.normal
        return n[0] * x + n[1] * y + n[2] * z <= self.offset

    def bbox(self) -> tuple[Array, Array]:
        return np.full(3, -np.inf), np.full(3, np.inf)


@dataclass
class Union(Shape):
    parts: list[Shape]

    def inside(self, x: Array, y: Array, z: Array) -> Array:
        out = None
        for s in self.parts:
            lo, hi = s.bbox()
            # Cheap rejection per part: only evaluate points within the part's box.
            sel = (x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1]) & (z >= lo[2]) & (z <= hi[2])
            if out is None:
                out = np.zeros(np.broadcast(x, y, z).shape, dtype=bool)
            if not sel.any():
                continue
            xs, ys, zs = (np.broadcast_to(v, out.shape)[sel] for v in (x, y, z))
            hit = s.inside(xs, ys, zs)
            cur = out[sel]
            out[sel] = cur | hit
        if out is None:
            return np.zeros(np.broadcast(x, y, z).shape, dtype=bool)
        return out

    def bbox(self) -> tuple[Array, Array]:
        boxes = [s.bbox() for s in self.parts]
        return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)


@dataclass
class Intersection(Shape):
    parts: list[Shape]

    def inside(self, x: Array, y: Array, z: Array) -> Array:
        out = self.parts[0].inside(x, y, z)
        for s in self.parts[1:]:
            out = out & s.inside(x, y, z)
        return out

    def bbox(self) -> tuple[Array, Array]:
        boxes = [s.bbox() for s in self.parts]
        return np.max([b[0] for b in boxes], axis=0), np.min([b[1] for b in boxes], axis=0)


@dataclass
class Difference(Shape):
    """``base`` minus every shape in ``minus``."""

    base: Shape
    minus: list[Shape]

    def inside(self, x: Array, y: Array, z: Array) -> Array:
        out = self.base.inside(x, y, z)
        for s in self.minus:
            out = out & ~s.inside(x, y, z)
        return out

    def bbox(self) -> tuple[Array, Array]:
        return self.base.bbox()
