"""A seeded, parametric torso: where every structure is, its tissue (HU) and its TotalSegmentator class id.

The anatomy is built in a **body frame** (mm; +x patient's right, +y anterior, +z superior; z = 0 at the
T12/L1 disc, x = 0 on the mid-sagittal plane) and placed in the world (RAS+ mm) by a seeded rigid *pose*.
A seed changes the patient's size (lateral, antero-posterior and cranio-caudal scale), the subcutaneous fat,
organ sizes, positions and orientations, tissue HU, the lung vessel trees and the pose.

Painting order matters: :attr:`Phantom.structures` is painted first to last, later structures overwrite
earlier ones. The solid organs with closed-form moments (liver, heart, stomach, spleen, kidneys, gallbladder,
urinary bladder) are painted last and are kept clear of each other, of the spine, the muscles next to it,
the pelvis and the chest wall by :func:`_fit` (a deterministic push-and-shrink loop), so their rendered label
regions are exactly their analytic shapes (:meth:`Phantom.truth`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..model.classes import NAME_TO_ID
from .geometry import (
    Box,
    CutEllipsoid,
    Difference,
    Ellipsoid,
    HalfSpace,
    Intersection,
    Shape,
    Swept,
    Union,
    rotation_xyz,
    tube,
)

#: Version of the anatomy recipe: bump when a change alters what a seed produces.
ANATOMY_VERSION = 1

AIR_HU = -1000.0
L = NAME_TO_ID  # TotalSegmentator class ids by name

#: The solid organs whose label regions equal their analytic shapes (see :meth:`Phantom.truth`).
ANALYTIC_ORGANS = ("liver", "heart", "stomach", "spleen", "kidney_right", "kidney_left", "gallbladder",
                   "urinary_bladder")
LUNG_LABELS = tuple(L[n] for n in ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
                                   "lung_middle_lobe_right", "lung_lower_lobe_right"))
VERTEBRA_NAMES = (["vertebrae_L5", "vertebrae_L4", "vertebrae_L3", "vertebrae_L2", "vertebrae_L1"]
                  + [f"vertebrae_T{k}" for k in range(12, 0, -1)] + ["vertebrae_C7", "vertebrae_C6"])


@dataclass
class Structure:
    """One painted solid. ``label`` 0 paints background tissue (clears labels) unless ``hu_only``.

    ``hu``: the tissue value (HU); ``shape``: body frame, mm. ``within``: paint only voxels whose current
    label is one of these ids. ``analytic``: the label region of ``label`` is exactly ``shape`` (nothing
    painted later overlaps it), so :meth:`Phantom.truth` holds.
    """

    name: str
    label: int
    hu: float
    shape: Shape
    hu_only: bool = False
    within: tuple[int, ...] | None = None
    analytic: bool = False


@dataclass
class Level:
    """One vertebra (body frame, mm)."""

    name: str
    zc: float
    height: float
    rx: float
    ry: float
    rc: float
    kind: str  # "L", "T" or "C"


@dataclass(frozen=True)
class OrganTruth:
    """Analytic facts of one intact organ: world mm, RAS+."""

    label: int
    name: str
    volume_mm3: float
    centroid_mm: tuple[float, float, float]


@dataclass
class Phantom:
    """A sampled anatomy: painted structures (body frame) and the rigid pose body -> world (RAS+ mm)."""

    seed: int
    structures: list[Structure]
    pose_rotation: np.ndarray
    pose_translation: np.ndarray
    fov_body: tuple[np.ndarray, np.ndarray]  # default field of view (body frame box, mm)
    landmarks: dict[str, np.ndarray]  # body frame, mm
    params: dict[str, float] = field(default_factory=dict)
    texture: list[tuple[np.ndarray, float, float]] = field(default_factory=list)  # (k rad/mm, phase, HU)

    def body_to_world(self, p: np.ndarray) -> np.ndarray:
        """(..., 3) body-frame points (mm) -> world RAS+ (mm)."""
        return np.asarray(p, dtype=np.float64) @ self.pose_rotation.T + self.pose_translation

    def world_to_body(self, p: np.ndarray) -> np.ndarray:
        """(..., 3) world RAS+ points (mm) -> body frame (mm)."""
        return (np.asarray(p, dtype=np.float64) - self.pose_translation) @ self.pose_rotation

    def landmark_world(self, name: str) -> np.ndarray:
        """A named landmark in world RAS+ mm (``diaphragm``, ``heart``, ``chest_back``, ``center``)."""
        return self.body_to_world(self.landmarks[name])

    def labels_present(self) -> list[int]:
        """Sorted class ids the phantom paints."""
        return sorted({s.label for s in self.structures if s.label > 0 and not s.hu_only})

    def truth(self) -> dict[int, OrganTruth]:
        """Exact volume (mm^3) and centroid (world RAS+ mm) of each analytic organ, by class id."""
        out = {}
        for s in self.structures:
            if s.analytic:
                c = self.body_to_world(s.shape.centroid())  # type: ignore[attr-defined]
                out[s.label] = OrganTruth(label=s.label, name=s.name, volume_mm3=float(s.shape.volume()),  # type: ignore[attr-defined]
                                          centroid_mm=tuple(float(v) for v in c))  # type: ignore[arg-type]
        return out

    def fov_world(self) -> np.ndarray:
        """The 8 corners (8, 3) of the default field of view in world RAS+ mm."""
        lo, hi = self.fov_body
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        return self.body_to_world(corners)


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------
def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _jit(rng: np.random.Generator, scale: float, n: int = 3) -> np.ndarray:
    return rng.uniform(-scale, scale, size=n)


def _superellipse_point(xc: float, yc: float, a: float, b: float, p: float, phi: float, side: float) -> tuple[float, float]:
    """Point of ``|x/a|^p + |y/b|^p = 1`` at angle ``phi`` from the posterior midline (0) to anterior (pi)."""
    s, c = math.sin(phi), math.cos(phi)
    x = side * a * abs(s) ** (2.0 / p)
    y = yc - b * math.copysign(abs(c) ** (2.0 / p), c)
    return xc + x, y


def _fit(shape: Ellipsoid | CutEllipsoid, *, region: Shape, obstacles: list[Shape],
         organs: list[Ellipsoid | CutEllipsoid], margin: float = 3.0, max_iter: int = 200) -> Ellipsoid | CutEllipsoid:
    """Push and shrink ``shape`` until it lies inside ``region`` and clear (by ``margin`` mm) of obstacles and organs.

    Deterministic: each round moves the centre 2 mm away from the mean offending surface point and shrinks
    the radii by 0.5 %. Raises ``RuntimeError`` if no placement is found (a recipe bug, caught by tests).
    """
    for _ in range(max_iter):
        pts = shape.surface_points(900, inflate_mm=margin)
        bad = ~region.inside_points(pts)
        for obs in obstacles:
            bad |= obs.inside_points(pts)
        offending = [pts[bad]]
        for org in organs:
            bad_o = org.inside_points(pts)
            offending.append(pts[bad_o])
            # the other organ inside this one (containment): its surface points inside us
            theirs = org.surface_points(600, inflate_mm=margin)
            offending.append(theirs[shape.inside_points(theirs)])
        off = np.concatenate(offending, axis=0)
        if len(off) == 0:
            return shape
        away = shape.center - off.mean(axis=0)
        norm = float(np.linalg.norm(away))
        step = away / norm * 2.0 if norm > 1e-6 else np.zeros(3)
        shape = _moved(shape, step, 0.995)
    raise RuntimeError("phantom recipe: could not place an organ without overlaps")


def _moved(shape: Ellipsoid | CutEllipsoid, delta: np.ndarray, scale: float) -> Ellipsoid | CutEllipsoid:
    if isinstance(shape, Ellipsoid):
        return Ellipsoid(shape.center + delta, shape.radii * scale, shape.rotation)
    ell = shape.ellipsoid
    c_new = ell.center + delta
    n = shape.normal
    off = float(n @ c_new) + (shape.offset - float(n @ ell.center)) * scale
    return CutEllipsoid(Ellipsoid(c_new, ell.radii * scale, ell.rotation), n, off)


def _vessel_tree(rng: np.random.Generator, root: np.ndarray, directions: list[np.ndarray], r0: float,
                 length: float, depth: int) -> list[Shape]:
    """Binary branching tubes (mm) from ``root`` along ``directions``; radius x0.72 and length x0.8 per level."""
    from .geometry import Capsule

    out: list[Shape] = []
    stack = [(root, d / np.linalg.norm(d), r0, length, 0) for d in directions]
    while stack:
        start, d, r, ln, lev = stack.pop()
        end = start + d * ln
        out.append(Capsule(start, end, r, r * 0.85))
        if lev + 1 < depth:
            for sgn in (-1.0, 1.0):
                perp = np.cross(d, rng.normal(size=3))
                perp /= np.linalg.norm(perp) + 1e-12
                ang = math.radians(rng.uniform(20, 40))
                nd = d * math.cos(ang) + sgn * perp * math.sin(ang)
                stack.append((end, nd / np.linalg.norm(nd), r * 0.72, ln * 0.8, lev + 1))
    return out


# ------------------------------------------------------------------------------------------------------
# the recipe
# ------------------------------------------------------------------------------------------------------
def build_phantom(seed: int = 0) -> Phantom:
    """Sample the anatomy of phantom ``seed`` (a non-negative integer; deterministic: same seed, same
    phantom)."""
    if int(seed) < 0:
        raise ConfigError(f"the phantom seed must be a non-negative integer, not {seed}")
    rng = np.random.default_rng([ANATOMY_VERSION, int(seed)])
    W, D, H = _u(rng, 0.9, 1.1), _u(rng, 0.88, 1.12), _u(rng, 0.92, 1.08)
    fat = _u(rng, 8.0, 28.0)
    muscle = _u(rng, 11.0, 16.0)
    p_body = 2.4

    # --- tissue HU (non-contrast CT), per seed --------------------------------------------------------
    hu = {
        "fat": _u(rng, -110, -90), "visceral": _u(rng, -95, -75), "muscle": _u(rng, 40, 55),
        "skin": _u(rng, 10, 40), "lung": _u(rng, -870, -830), "vessel_lung": _u(rng, 20, 45),
        "liver": _u(rng, 50, 66), "spleen": _u(rng, 40, 52), "kidney": _u(rng, 25, 38), "stomach": _u(rng, 20, 38),
        "heart": _u(rng, 35, 48), "blood": _u(rng, 32, 45), "bladder": _u(rng, 2, 14), "gallbladder": _u(rng, 0, 18),
        "cortical": _u(rng, 550, 800), "cancellous": _u(rng, 160, 280), "disc": _u(rng, 70, 100),
        "csf": _u(rng, 5, 18), "cord": _u(rng, 28, 40), "cartilage": _u(rng, 90, 160), "bowel": _u(rng, 15, 40),
        "table": _u(rng, 150, 400),
    }

    # --- spine --------------------------------------------------------------------------------------------
    def y_vb(z: float | np.ndarray) -> float | np.ndarray:
        """Centre of the vertebral bodies (y, mm) at height z: lumbar lordosis, thoracic kyphosis."""
        zz = np.asarray(z, dtype=np.float64) / H
        v = -45.0 + 12.0 * np.exp(-(((zz + 90.0) / 90.0) ** 2)) - 18.0 * np.exp(-(((zz - 170.0) / 110.0) ** 2))
        return v * D

    levels: list[Level] = []
    z = -179.0 * H + 10.0 * H  # top of the L5/S1 disc (S1 endplate at -179 H)
    z_s1 = -179.0 * H
    for i, name in enumerate(VERTEBRA_NAMES):
        kind = name.split("_")[1][0]
        if kind == "L":
            h, disc, rx, ry, rc = 26.0, 9.0, 26.0 - 0.5 * i, 19.0 - 0.25 * i, 9.5
        elif kind == "T":
            t = int(name[len("vertebrae_T"):])  # 12..1
            f = (12 - t) / 11.0
            h, disc = 23.0 - 6.0 * f, 6.0 - 1.5 * f
            rx, ry, rc = 22.0 - 7.0 * f, 17.0 - 5.0 * f, 7.5
        else:
            h, disc, rx, ry, rc = 14.0, 4.5, 12.0, 9.0, 8.0
        h *= H
        disc *= H
        levels.append(Level(name=name, zc=z + h / 2, height=h, rx=rx, ry=ry, rc=rc, kind=kind))
        z += h + disc
    lv = {lev.name: lev for lev in levels}
    z_t1_top = lv["vertebrae_T1"].zc + lv["vertebrae_T1"].height / 2

    def ry_at(zq: float) -> float:
        return float(np.interp(zq, [lev.zc for lev in levels], [lev.ry for lev in levels]))

    def rc_at(zq: float) -> float:
        return float(np.interp(zq, [lev.zc for lev in levels], [lev.rc for lev in levels]))

    def y_can(zq: float) -> float:
        return float(y_vb(zq)) - ry_at(zq) - rc_at(zq) - 1.0

    # --- body outline -----------------------------------------------------------------------------------------
    zk = np.array([-600, -420, -300, -200, -100, 0, 100, 200, 280, 330, 380, 450], dtype=np.float64) * H
    a_lean = np.array([140, 155, 155, 145, 136, 135, 138, 140, 145, 155, 70, 60], dtype=np.float64) * W
    a_lean *= 1.0 + _jit(rng, 0.03, len(zk))
    b_lean = np.array([95, 100, 102, 104, 106, 110, 116, 112, 104, 92, 70, 65], dtype=np.float64) * D
    y_back = np.asarray(y_vb(np.clip(zk, z_s1, z_t1_top + 40))) - 85.0 * D
    yc = y_back + b_lean
    skin = Swept(zk, 0.0, yc, a_lean + fat, b_lean + fat, p=p_body)
    lean = Swept(zk, 0.0, yc, a_lean, b_lean, p=p_body)
    z_fh = z_s1 - 95.0 * H  # femoral head centres
    cav_z = np.clip(zk, z_fh - 70.0 * H, z_t1_top + 30.0 * H)
    cavity = Swept(cav_z, 0.0, yc, a_lean - muscle, b_lean - muscle, p=p_body)
    organ_region = Swept(cav_z, 0.0, yc, a_lean - muscle - 8.0, b_lean - muscle - 8.0, p=p_body)
    lung_region = Swept(cav_z, 0.0, yc, a_lean - muscle - 2.0, b_lean - muscle - 2.0, p=p_body)

    def wall(zq: float) -> tuple[float, float, float]:
        """(yc, a, b) of the inner chest wall (cavity boundary) at height zq (mm)."""
        return (float(np.interp(zq, zk, yc)), float(np.interp(zq, zk, a_lean)) - muscle,
                float(np.interp(zq, zk, b_lean)) - muscle)

    S: list[Structure] = []
    S.append(Structure("skin", 0, hu["skin"], skin))
    S.append(Structure("subcutaneous_fat", 0, hu["fat"], Swept(zk, 0.0, yc, a_lean + fat - 2.0, b_lean + fat - 2.0,
                                                                 p=p_body)))
    S.append(Structure("body_wall_muscle", 0, hu["muscle"], lean))
    S.append(Structure("visceral_fat", 0, hu["visceral"], cavity))
    if rng.random() < 0.8:  # the scanner table under the patient's back
        y_tab = float(np.min(y_back)) - fat - _u(rng, 12, 25)
        S.append(Structure("table", 0, hu["table"], Box([0, y_tab, -100.0], [230.0, 4.0, 800.0])))

    # --- bowel clutter (no label) ---------------------------------------------------------------------------
    clutter = []
    for _ in range(int(rng.integers(18, 30))):
        zq = _u(rng, z_fh - 40 * H, -40 * H)
        ycq, aq, bq = wall(zq)
        c = np.array([_u(rng, -0.75, 0.75) * aq, ycq + _u(rng, -0.1, 0.8) * bq, zq])
        r = np.array([_u(rng, 10, 28), _u(rng, 10, 24), _u(rng, 12, 30)])
        e = Ellipsoid(c, r, rotation_xyz(*rng.uniform(-40, 40, 3)))
        clutter.append(Structure("bowel", 0, hu["bowel"], Intersection([e, organ_region])))
        if rng.random() < 0.4:
            clutter.append(Structure("bowel_gas", 0, -900.0, Intersection([Ellipsoid(c, r * 0.45, e.rotation),
                                                                            organ_region])))
    S.extend(clutter)

    # --- lungs and lobes --------------------------------------------------------------------------------------
    z_lung_c = 150.0 * H
    lung_rz = 155.0 * H
    ycl = wall(z_lung_c)[0]
    z_t3 = lv["vertebrae_T3"].zc
    # mediastinum: between the spine and the sternum, +-24 mm wide (narrower above T3)
    med_z = np.array([-20.0 * H, z_t3, z_t1_top + 40.0 * H])
    med_y_front = np.array([wall(zq)[0] + wall(zq)[2] for zq in med_z])
    med_y_back = np.array([float(y_vb(zq)) + ry_at(zq) for zq in med_z])
    mediastinum = Swept(med_z, 0.0, (med_y_front + med_y_back) / 2, np.array([24.0, 20.0, 16.0]) * W,
                        (med_y_front - med_y_back) / 2 + 5.0)
    lungs: dict[str, Shape] = {}
    for side, sname in ((1.0, "right"), (-1.0, "left")):
        c = np.array([side * 78.0 * W, ycl - 5.0 * D, z_lung_c]) + _jit(rng, 4.0)
        r = np.array([72.0 * W, 102.0 * D, lung_rz]) * (1.0 + _jit(rng, 0.04))
        base = Intersection([Ellipsoid(c, r), lung_region, HalfSpace([-side, 0, 0], -3.0)])
        lungs[sname] = Difference(base, [mediastinum])
    # oblique fissures: through (y=-40, z=230) and (y=+80, z=20) (nominal), normal anterior-superior
    tilt = _u(rng, -6, 6)
    n_obl = rotation_xyz(tilt, 0, 0) @ np.array([0.0, 0.868, 0.496])
    p_obl = np.array([0.0, ycl - 40.0 * D, 230.0 * H])
    obl_off = float(n_obl @ p_obl) + _u(rng, -8, 8)
    upper_side = HalfSpace(-n_obl, -obl_off)  # n.p >= off: anterior-superior of the oblique fissure
    z_horiz = _u(rng, 140, 165) * H
    S.append(Structure("lung_lower_lobe_right", L["lung_lower_lobe_right"], hu["lung"], lungs["right"]))
    S.append(Structure("lung_middle_lobe_right", L["lung_middle_lobe_right"], hu["lung"],
                       Intersection([lungs["right"], upper_side])))
    S.append(Structure("lung_upper_lobe_right", L["lung_upper_lobe_right"], hu["lung"],
                       Intersection([lungs["right"], upper_side, HalfSpace([0, 0, -1], -z_horiz)])))
    S.append(Structure("lung_lower_lobe_left", L["lung_lower_lobe_left"], hu["lung"], lungs["left"]))
    S.append(Structure("lung_upper_lobe_left", L["lung_upper_lobe_left"], hu["lung"],
                       Intersection([lungs["left"], upper_side])))
    # fissures: thin denser sheets inside the lungs (HU only)
    fis = Intersection([HalfSpace(n_obl, obl_off + 0.8), HalfSpace(-n_obl, -obl_off + 0.8)])
    S.append(Structure("fissure_oblique", 0, -600.0, fis, hu_only=True, within=LUNG_LABELS))
    S.append(Structure("fissure_horizontal", 0, -600.0,
                       Intersection([HalfSpace([0, 0, 1], z_horiz + 0.8), HalfSpace([0, 0, -1], -z_horiz + 0.8),
                                     upper_side, lungs["right"]]), hu_only=True, within=LUNG_LABELS))
    # vessel trees from the hila
    hila = {}
    for side, sname in ((1.0, "right"), (-1.0, "left")):
        hil = np.array([side * 42.0 * W, ycl - 5.0 * D, 160.0 * H]) + _jit(rng, 4.0)
        hila[sname] = hil
        dirs = [np.array([side * 0.5, 0.2, 1.0]), np.array([side * 1.0, 0.3, -0.1]),
                np.array([side * 0.5, -0.6, -1.0]), np.array([side * 0.6, 0.8, -0.5])]
        vessels = _vessel_tree(rng, hil, dirs, r0=5.5, length=34.0, depth=5)
        S.append(Structure(f"lung_vessels_{sname}", 0, hu["vessel_lung"], Union(vessels), hu_only=True,
                           within=LUNG_LABELS))

    # --- airway and oesophagus --------------------------------------------------------------------------
    z_carina = lv["vertebrae_T5"].zc
    z_top = z_t1_top + 120.0 * H
    tz = np.array([z_carina, (z_carina + z_top) / 2, z_top])
    ty = np.array([float(y_vb(zq)) + ry_at(zq) + 25.0 for zq in tz])
    trachea = Swept(tz, 0.0, ty, 9.5, 8.5)
    S.append(Structure("esophagus", L["esophagus"], hu["muscle"], Swept(
        np.array([0.0, 40.0 * H, 150.0 * H, z_top]),
        np.array([-40.0, -25.0, -8.0, -3.0]) * W,
        np.array([float(y_vb(0.0)) + ry_at(0.0) + 30.0, float(y_vb(40.0 * H)) + ry_at(40.0 * H) + 18.0,
                  float(y_vb(150.0 * H)) + ry_at(150.0 * H) + 8.0, float(y_vb(z_top)) + ry_at(z_top) + 7.0]),
        8.0, 7.0)))
    S.append(Structure("trachea", L["trachea"], hu["muscle"], trachea))
    S.append(Structure("trachea_lumen", 0, AIR_HU, Swept(tz, 0.0, ty, 7.5, 6.5), hu_only=True,
                       within=(L["trachea"],)))
    carina = np.array([0.0, ty[0], z_carina])
    for sname in ("right", "left"):
        S.append(Structure(f"bronchus_{sname}", 0, -950.0, tube([carina, hila[sname]], [6.5, 5.0]),
                           hu_only=True, within=(0, *LUNG_LABELS)))

    # --- muscles next to the spine ---------------------------------------------------------------------------
    z_l3, z_l5 = lv["vertebrae_L3"].zc, lv["vertebrae_L5"].zc
    y_fh = float(y_vb(z_s1)) + 55.0 * D
    x_fh = 88.0 * W
    for side, sname in ((-1.0, "left"), (1.0, "right")):
        pz = np.array([z_fh - 40.0 * H, z_fh + 20.0 * H, z_s1 - 30.0 * H, z_l5, z_l3, 0.0])
        px = side * np.array([92.0 * W, 80.0 * W, 68.0 * W, 26.0 + 26.0, 25.0 + 17.0, 22.0 + 12.0])
        py = np.array([y_fh + 40.0, y_fh + 36.0, float(y_vb(z_s1)) + 32.0, float(y_vb(z_l5)) + 10.0,
                       float(y_vb(z_l3)) + 5.0, float(y_vb(0.0)) + 2.0])
        pa = np.array([15.0, 20.0, 25.0, 22.0, 15.0, 8.0]) * (1.0 + _u(rng, -0.1, 0.1))
        pb = np.array([13.0, 16.0, 19.0, 20.0, 16.0, 8.0]) * (1.0 + _u(rng, -0.1, 0.1))
        S.append(Structure(f"iliopsoas_{sname}", L[f"iliopsoas_{sname}"], hu["muscle"], Swept(pz, px, py, pa, pb)))
    az = np.array([z_s1 - 40.0 * H, z_l3, 0.0, lv["vertebrae_T6"].zc, z_t1_top])
    for side, sname in ((-1.0, "left"), (1.0, "right")):
        ax_ = side * np.array([30.0, 34.0, 31.0, 28.0, 24.0])
        ay_ = np.array([y_can(float(zq)) - 21.0 for zq in az])
        aa = np.array([20.0, 23.0, 20.0, 17.0, 14.0]) * (1.0 + _u(rng, -0.08, 0.08))
        ab = np.array([20.0, 24.0, 22.0, 19.0, 15.0]) * (1.0 + _u(rng, -0.08, 0.08))
        S.append(Structure(f"autochthon_{sname}", L[f"autochthon_{sname}"], hu["muscle"], Swept(az, ax_, ay_, aa, ab)))

    # --- heart position (needed by the great vessels; the heart itself is painted with the organs) -------
    heart0 = Ellipsoid(np.array([-20.0 * W, wall(100.0 * H)[0] + 42.0 * D, 100.0 * H]) + _jit(rng, 5.0),
                       np.array([52.0, 40.0, 48.0]) * (1.0 + _jit(rng, 0.08)) * np.array([W, D, H]) ** 0.5,
                       rotation_xyz(_u(rng, 10, 25), _u(rng, -10, 10), _u(rng, -45, -25)))
    hc = heart0.center

    # --- great vessels ---------------------------------------------------------------------------------------
    def vb_front(zq: float) -> float:
        return float(y_vb(zq)) + ry_at(zq)

    z_l4 = lv["vertebrae_L4"].zc
    z_t4 = lv["vertebrae_T4"].zc
    ivc_pts = [hc + np.array([35.0, -15.0, -10.0]), [25.0, vb_front(0.0) + 14.0, 0.0],
               [22.0, vb_front(-60.0 * H) + 9.0, -60.0 * H], [18.0, vb_front(z_l5) + 8.0, z_l5]]
    S.append(Structure("inferior_vena_cava", L["inferior_vena_cava"], hu["blood"], tube(ivc_pts, [12.0, 12.0, 11.0, 11.0])))
    aorta_pts = [hc + np.array([10.0, 0.0, 20.0]),
                 [10.0 * W, hc[1] + 10.0, hc[2] + 90.0 * H],
                 [0.0, (hc[1] + float(y_vb(z_t4))) / 2, z_t4 + 12.0 * H],
                 [-20.0 * W, float(y_vb(z_t4)) + 12.0, z_t4 - 5.0 * H],
                 [-30.0, float(y_vb(120.0 * H)) + 12.0, 120.0 * H],
                 [-24.0, vb_front(20.0 * H) + 4.0, 20.0 * H],
                 [-14.0, vb_front(-60.0 * H) + 13.0, -60.0 * H],
                 [-8.0, vb_front(z_l4) + 13.0, z_l4]]
    aorta_r = [14.0, 15.0, 14.0, 13.0, 12.0, 12.0, 11.0, 10.0]
    aorta = tube(aorta_pts, aorta_r)
    descending_aorta = tube(aorta_pts[3:], aorta_r[3:])
    for side, sname in ((-1.0, "left"), (1.0, "right")):
        pts = [[18.0 if side > 0 else 10.0, vb_front(z_l5) + 8.0, z_l5],
               [side * 45.0 * W, vb_front(z_s1) + 8.0, z_s1 - 20.0 * H],
               [side * 78.0 * W, y_fh + 15.0, z_fh + 25.0 * H], [side * 80.0 * W, y_fh + 22.0, z_fh - 10.0 * H]]
        S.append(Structure(f"iliac_vena_{sname}", L[f"iliac_vena_{sname}"], hu["blood"], tube(pts, [9.0, 8.0, 8.0, 7.0])))
    S.append(Structure("superior_vena_cava", L["superior_vena_cava"], hu["blood"],
                       tube([hc + np.array([30.0, 0.0, 30.0]), [28.0 * W, hc[1] - 5.0, z_t4 + 25.0 * H]], [9.0, 9.0])))
    S.append(Structure("aorta", L["aorta"], hu["blood"], aorta))
    for side, sname in ((-1.0, "left"), (1.0, "right")):
        pts = [aorta_pts[-1], [side * 45.0 * W, vb_front(z_s1) + 18.0, z_s1 - 10.0 * H],
               [side * 75.0 * W, y_fh + 25.0, z_fh + 30.0 * H], [side * 85.0 * W, y_fh + 30.0, z_fh - 10.0 * H]]
        S.append(Structure(f"iliac_artery_{sname}", L[f"iliac_artery_{sname}"], hu["blood"],
                           tube(pts, [7.0, 6.5, 6.0, 5.5])))

    # --- spinal canal and cord ------------------------------------------------------------------------------
    cz = np.array([z_s1] + [lev.zc for lev in levels] + [z_top])
    cy = np.array([y_can(float(zq)) for zq in cz])
    crc = np.array([rc_at(float(zq)) for zq in cz])
    S.append(Structure("spinal_canal", 0, hu["csf"], Swept(cz, 0.0, cy, crc, crc * 0.85)))
    z_conus = lv["vertebrae_L2"].zc + lv["vertebrae_L2"].height / 2
    keep = cz >= z_conus
    S.append(Structure("spinal_cord", L["spinal_cord"], hu["cord"],
                       Swept(np.concatenate([[z_conus], cz[keep]]), 0.0,
                             np.concatenate([[y_can(z_conus)], cy[keep]]), 5.0, 4.0)))

    # --- vertebrae and discs ---------------------------------------------------------------------------------
    vertebra_shapes: list[Shape] = []
    for i, lev in enumerate(levels):
        yb = float(y_vb(lev.zc))
        ycn = yb - lev.ry - lev.rc - 1.0
        hz = lev.height / 2
        body = Swept([lev.zc - hz, lev.zc + hz], 0.0, yb, lev.rx, lev.ry)
        ring_o = Swept([lev.zc - 0.35 * lev.height, lev.zc + 0.35 * lev.height], 0.0, ycn, lev.rc + 6.0, lev.rc + 5.0)
        canal = Swept([lev.zc - lev.height, lev.zc + lev.height], 0.0, ycn, lev.rc, lev.rc * 0.85)
        sp_len = {"L": 30.0, "T": 32.0, "C": 20.0}[lev.kind]
        sp_ang = {"L": 5.0, "T": 40.0, "C": 20.0}[lev.kind]
        rot_sp = rotation_xyz(sp_ang, 0, 0)
        sp_c = np.array([0.0, ycn - lev.rc - 4.0, lev.zc]) + rot_sp @ np.array([0.0, -sp_len / 2, 0.0])
        spinous = Box(sp_c, [3.5, sp_len / 2, 0.28 * lev.height], rot_sp)
        tp_len = {"L": 28.0, "T": 22.0, "C": 12.0}[lev.kind]
        parts: list[Shape] = [body, Difference(ring_o, [canal]), spinous]
        for side in (-1.0, 1.0):
            rot_tp = rotation_xyz(0, 0, side * (20.0 if lev.kind == "T" else 5.0))
            tp_c = np.array([side * (lev.rc + 5.0 + tp_len / 2), ycn + 2.0, lev.zc + 0.05 * lev.height])
            parts.append(Box(tp_c, [tp_len / 2, 5.0, 0.25 * lev.height], rot_tp))
        vert = Union(parts)
        vertebra_shapes.append(vert)
        S.append(Structure(lev.name, L[lev.name], hu["cortical"], vert))
        S.append(Structure(f"{lev.name}_cancellous", L[lev.name], hu["cancellous"],
                           Swept([lev.zc - hz + 1.5, lev.zc + hz - 1.5], 0.0, yb, lev.rx - 2.0, lev.ry - 2.0)))
        if i + 1 < len(levels):
            nxt = levels[i + 1]
            z0, z1 = lev.zc + hz, nxt.zc - nxt.height / 2
            disc_shape = Swept([z0, z1], 0.0, [yb, float(y_vb(nxt.zc))], [lev.rx, nxt.rx], [lev.ry, nxt.ry])
            vertebra_shapes.append(disc_shape)
            S.append(Structure("intervertebral_disc", 0, hu["disc"], disc_shape))
    S.append(Structure("disc_L5_S1", 0, hu["disc"], Swept([z_s1, levels[0].zc - levels[0].height / 2], 0.0,
                                                           float(y_vb(z_s1)), 26.0, 19.0)))

    # --- sacrum, hips, femurs --------------------------------------------------------------------------------
    ys1 = float(y_vb(z_s1))
    sz = z_s1 - np.array([115.0, 80.0, 40.0, 25.0, 0.0]) * H
    sacrum = Swept(sz, 0.0, ys1 - np.array([45.0, 30.0, 12.0, 6.0, 0.0]) * D,
                   np.array([14.0, 28.0, 42.0, 50.0, 50.0]) * W ** 0.5, np.array([8.0, 12.0, 17.0, 19.0, 19.0]))
    S.append(Structure("sacrum", L["sacrum"], hu["cortical"] * 0.7, sacrum))
    s1_cut = z_s1 - 30.0 * H
    S.append(Structure("vertebrae_S1", L["vertebrae_S1"], hu["cortical"] * 0.7,
                       Intersection([sacrum, HalfSpace([0, 0, -1], -s1_cut)])))
    bones_pelvis: list[Shape] = [sacrum]
    for side, sname in ((-1.0, "left"), (1.0, "right")):
        wing_c = np.array([side * 40.0 * W, ys1 + 10.0, z_s1 - 40.0 * H])
        wing_r = np.array([95.0 * W, 80.0 * D, 85.0 * H])
        wing = Intersection([
            Difference(Ellipsoid(wing_c, wing_r), [Ellipsoid(wing_c, wing_r - 7.0)]),
            Box([side * 100.0 * W, ys1 + 10.0, z_s1], [55.0 * W, 80.0, 45.0 * H]),
            HalfSpace([0, 1, 0], y_fh + 45.0),
        ])
        si = Box([side * 52.0 * W ** 0.5, ys1 - 5.0, z_s1 - 30.0 * H], [10.0, 14.0, 25.0 * H])
        acet = Ellipsoid([side * (x_fh + 5.0), y_fh, z_fh + 5.0 * H], np.array([28.0, 33.0, 36.0]))
        pubis = tube([[side * 80.0 * W, y_fh + 15.0, z_fh - 5.0 * H], [side * 8.0, y_fh + 55.0 * D, z_fh - 20.0 * H]], 10.0)
        ischium = tube([[side * 85.0 * W, y_fh - 10.0, z_fh - 15.0 * H], [side * 55.0 * W, y_fh - 15.0, z_fh - 60.0 * H],
                        [side * 20.0 * W, y_fh + 35.0, z_fh - 45.0 * H]], [13.0, 12.0, 8.0])
        hip = Union([wing, si, acet, pubis, ischium])
        bones_pelvis.append(hip)
        S.append(Structure(f"hip_{sname}", L[f"hip_{sname}"], hu["cortical"] * 0.75, hip))
    for side, sname in ((-1.0, "left"), (1.0, "right")):
        head_c = np.array([side * x_fh, y_fh, z_fh])
        neck_end = np.array([side * 118.0 * W, y_fh - 8.0, z_fh - 28.0 * H])
        femur = Union([Ellipsoid(head_c, [23.0, 23.0, 23.0]), tube([head_c, neck_end], 14.0),
                       Ellipsoid([side * 125.0 * W, y_fh - 12.0, z_fh - 15.0 * H], [16.0, 16.0, 22.0]),
                       tube([neck_end, [side * 108.0 * W, y_fh + 5.0, z_fh - 420.0 * H]], 14.0)])
        bones_pelvis.append(femur)
        S.append(Structure(f"femur_{sname}", L[f"femur_{sname}"], hu["cortical"] * 0.8, femur))

    # --- sternum, ribs, costal cartilages ---------------------------------------------------------------
    z_st_bot = lv["vertebrae_T9"].zc - 10.0 * H
    z_st_top = lv["vertebrae_T2"].zc + 5.0 * H
    stz = np.array([z_st_bot, (z_st_bot + z_st_top) / 2, z_st_top - 40.0 * H, z_st_top])
    sty = np.array([wall(zq)[0] + wall(zq)[2] + 4.0 for zq in stz])
    sta = np.array([12.0, 14.0, 18.0, 24.0])
    S.append(Structure("sternum", L["sternum"], hu["cortical"] * 0.6, Swept(stz, 0.0, sty, sta, 6.0)))
    drops = {1: 30, 2: 55, 3: 75, 4: 85, 5: 92, 6: 95, 7: 95, 8: 95, 9: 92, 10: 85, 11: 60, 12: 40}
    ends = {1: 2.75, 2: 2.78, 3: 2.78, 4: 2.78, 5: 2.78, 6: 2.75, 7: 2.7, 8: 2.55, 9: 2.35, 10: 2.15, 11: 1.55, 12: 1.05}
    rib_r = _u(rng, 4.0, 5.0)
    for side, sname in ((-1.0, "left"), (1.0, "right")):
        cart7_end = None
        for k in range(1, 13):
            lev = lv[f"vertebrae_T{k}"]
            ycn = float(y_vb(lev.zc)) - lev.ry - lev.rc - 1.0
            start = [side * (lev.rc + 5.0 + 20.0), ycn + 2.0, lev.zc]
            phi0, phi1 = 0.45, ends[k] + _u(rng, -0.05, 0.05)
            drop = drops[k] * H * (1.0 + _u(rng, -0.1, 0.1))
            pts = [start]
            for t in np.linspace(0.0, 1.0, 14):
                phi = phi0 + (phi1 - phi0) * t
                zq = lev.zc + 3.0 - drop * t**1.3
                ycw, aw, bw = wall(zq)
                x, y = _superellipse_point(0.0, ycw, aw + 2.0, bw + 2.0, p_body, phi, side)
                pts.append([x, y, zq])
            S.append(Structure(f"rib_{sname}_{k}", L[f"rib_{sname}_{k}"], hu["cortical"] * 0.8, tube(pts, rib_r)))
            if k <= 10:  # costal cartilage: along the wall to the sternum (1-7) or to the 7th cartilage (8-10)
                end_rib = np.array(pts[-1])
                if k <= 7:
                    z_att = z_st_top - (z_st_top - z_st_bot) * (k - 1) / 6.0
                    phi_e = math.pi - 0.12
                else:
                    z_att = (cart7_end[2] if cart7_end is not None else end_rib[2]) - 6.0 * (k - 7)
                    phi_e = math.pi - 0.3 - 0.08 * (k - 7)
                cpts: list[Any] = [end_rib]
                for t in np.linspace(0.2, 1.0, 5):
                    phi = phi1 + (phi_e - phi1) * t
                    zq = end_rib[2] + (z_att - end_rib[2]) * t
                    ycw, aw, bw = wall(zq)
                    x, y = _superellipse_point(0.0, ycw, aw + 2.0, bw + 2.0, p_body, phi, side)
                    cpts.append([x, y, zq])
                if k == 7:
                    cart7_end = np.array(cpts[-2])
                S.append(Structure(f"costal_cartilage_{sname}_{k}", L["costal_cartilages"], hu["cartilage"],
                                   tube(cpts, rib_r + 0.5)))

    # --- solid organs (analytic; fitted clear of everything painted before them and of each other) -------
    spine_obstacles: list[Shape] = [Union(vertebra_shapes), *[s.shape for s in S if s.name.startswith(
        ("iliopsoas", "autochthon"))]]
    pelvis_obstacle = Union(bones_pelvis)
    sternum_obstacle = S[[s.name for s in S].index("sternum")].shape
    placed: list[Ellipsoid | CutEllipsoid] = []
    organs: dict[str, Ellipsoid | CutEllipsoid] = {}

    def place(name: str, shape: Ellipsoid | CutEllipsoid, extra: list[Shape] | None = None) -> None:
        fitted = _fit(shape, region=organ_region, obstacles=spine_obstacles + [pelvis_obstacle, sternum_obstacle]
                      + (extra or []), organs=placed)
        placed.append(fitted)
        organs[name] = fitted

    def reg(zq: float) -> tuple[float, float, float]:
        """(yc, a, b) of the organ region at height zq (mm): positions below are fractions of it."""
        ycw, aw, bw = wall(zq)
        return ycw, aw - 8.0, bw - 8.0

    def size(r: list[float]) -> np.ndarray:
        return np.asarray(r, dtype=np.float64) * (1.0 + _jit(rng, 0.08))

    yo, ao, bo = reg(0.0)
    liver_e = Ellipsoid(np.array([0.44 * ao, yo + 0.36 * bo, 5.0 * H]) + _jit(rng, 5.0),
                        size([0.5 * ao, 0.58 * bo, 72.0 * H]),
                        rotation_xyz(_u(rng, -5, 5), _u(rng, -8, 8), _u(rng, -35, -25)))
    n_cut = np.array([-0.75, 0.0, -0.65]) + _jit(rng, 0.08)
    n_cut /= np.linalg.norm(n_cut)
    p_cut = liver_e.center + np.array([-0.3 * ao, 0.0, -20.0 * H])
    place("liver", CutEllipsoid(liver_e, n_cut, float(n_cut @ p_cut)), [descending_aorta])
    place("heart", Ellipsoid(hc, heart0.radii, heart0.rotation), [descending_aorta, trachea])
    yo, ao, bo = reg(0.0)
    place("stomach", Ellipsoid(np.array([-0.57 * ao, yo + 0.39 * bo, 0.0]) + _jit(rng, 5.0),
                               size([0.3 * ao, 0.34 * bo, 56.0 * H]),
                               rotation_xyz(_u(rng, -10, 10), _u(rng, -35, -15), _u(rng, -15, 15))), [aorta])
    yo, ao, bo = reg(8.0 * H)
    place("spleen", Ellipsoid(np.array([-0.68 * ao, yo - 0.22 * bo, 8.0 * H]) + _jit(rng, 4.0),
                              size([0.14 * ao, 0.42 * bo, 48.0 * H]), rotation_xyz(0, _u(rng, -10, 10), _u(rng, 35, 55))),
          [aorta])
    for side, sname, z0 in ((1.0, "right", -85.0), (-1.0, "left", -75.0)):
        yo, ao, bo = reg(z0 * H)
        place(f"kidney_{sname}", Ellipsoid(
            np.array([side * 0.74 * ao, float(y_vb(z0 * H)) - 14.0 * D, z0 * H]) + _jit(rng, 4.0),
            size([0.22 * ao, 0.22 * bo, 50.0 * H]), rotation_xyz(0, side * _u(rng, 5, 15), side * _u(rng, 20, 35))),
            [aorta])
    sz_org = lambda r: np.asarray(r, dtype=np.float64) * (1.0 + _jit(rng, 0.1)) * np.array([W, D, H])
    ycz = lambda zq: wall(zq)[0]
    place("gallbladder", Ellipsoid(np.array([40.0 * W, ycz(-80.0 * H) + 50.0 * D, -85.0 * H]) + _jit(rng, 5.0),
                                   sz_org([14.0, 15.0, 28.0]), rotation_xyz(_u(rng, 20, 40), _u(rng, -10, 10), 0)))
    place("urinary_bladder", Ellipsoid(np.array([0.0, y_fh + 10.0 * D, z_fh + 32.0 * H]) + _jit(rng, 4.0),
                                       sz_org([40.0, 30.0, 30.0]), rotation_xyz(0, 0, 0)))

    liver = organs["liver"]
    # HU-only interiors of organs (textures) are painted right after each organ, within its label.
    S.append(Structure("pericardial_fat", 0, hu["visceral"], _inflate_ellipsoid(organs["heart"], 2.5)))
    organ_structs: list[Structure] = []
    for name in ("liver", "heart", "stomach", "spleen", "kidney_right", "kidney_left", "gallbladder",
                 "urinary_bladder"):
        key = name.split("_")[0] if name.startswith("kidney") else name
        hu_key = {"urinary_bladder": "bladder"}.get(key, key)
        organ_structs.append(Structure(name, L[name], hu[hu_key], organs[name], analytic=True))
    S.extend(organ_structs)
    hv_root = np.array(ivc_pts[0], dtype=np.float64) * 0.3 + liver.center * 0.7
    S.append(Structure("hepatic_vessels", 0, hu["blood"] - 8.0, Union(_vessel_tree(
        rng, hv_root, [np.array([1.0, 0.2, 0.3]), np.array([-1.0, 0.3, 0.2]), np.array([0.3, 0.5, -1.0])],
        r0=5.0, length=30.0, depth=4)), hu_only=True, within=(L["liver"],)))
    hrt = organs["heart"]
    assert isinstance(hrt, Ellipsoid)
    S.append(Structure("heart_chambers", 0, hu["blood"], Ellipsoid(hrt.center, hrt.radii * 0.62, hrt.rotation),
                       hu_only=True, within=(L["heart"],)))
    for sname in ("right", "left"):
        kid = organs[f"kidney_{sname}"]
        assert isinstance(kid, Ellipsoid)
        S.append(Structure(f"renal_sinus_{sname}", 0, hu["kidney"] - 15.0,
                           Ellipsoid(kid.center, kid.radii * np.array([0.45, 0.45, 0.6]), kid.rotation),
                           hu_only=True, within=(L[f"kidney_{sname}"],)))
    sto = organs["stomach"]
    assert isinstance(sto, Ellipsoid)
    y_gas = sto.center[1] + 0.45 * float(np.sqrt(((sto.rotation * sto.radii[None, :]) ** 2).sum(axis=1))[1])
    S.append(Structure("stomach_gas", 0, -950.0, Intersection([sto, HalfSpace([0, -1, 0], -y_gas)]),
                       hu_only=True, within=(L["stomach"],)))

    # --- texture, field of view, landmarks --------------------------------------------------------------
    texture = []
    for _ in range(4):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        wavelength = _u(rng, 30, 120)
        texture.append((direction * 2 * math.pi / wavelength, _u(rng, 0, 2 * math.pi), _u(rng, 2, 6)))
    skin_lo, skin_hi = skin.bbox()
    fov_lo = np.array([skin_lo[0] - 12.0, min(skin_lo[1], float(np.min(y_back)) - fat - 30.0) - 5.0,
                       z_fh - 50.0 * H])
    fov_hi = np.array([skin_hi[0] + 12.0, float(np.max((yc + b_lean + fat)[(zk >= fov_lo[2]) & (zk <= z_t1_top + 60)]))
                       + 12.0, z_t1_top + 25.0 * H])
    pose_r = rotation_xyz(_u(rng, -3, 3), _u(rng, -2, 2), _u(rng, -4, 4))
    pose_t = np.array([_u(rng, -15, 15), _u(rng, -15, 15), _u(rng, -20, 20)])
    liver_top = liver.center + np.array([0.0, 0.0, float(np.sqrt(((liver.ellipsoid.axes if isinstance(
        liver, CutEllipsoid) else liver.axes) ** 2).sum(axis=1))[2])])
    landmarks = {
        "diaphragm": liver_top,
        "heart": hrt.center.copy(),
        "chest_back": np.array([0.0, float(np.interp(hrt.center[2], zk, y_back)), hrt.center[2]]),
        "center": (fov_lo + fov_hi) / 2,
    }
    params = {"W": W, "D": D, "H": H, "fat_mm": fat, "muscle_mm": muscle, **{f"hu_{k}": v for k, v in hu.items()}}
    return Phantom(seed=int(seed), structures=S, pose_rotation=pose_r, pose_translation=pose_t,
                   fov_body=(fov_lo, fov_hi), landmarks=landmarks, params=params, texture=texture)


def _inflate_ellipsoid(shape: Ellipsoid | CutEllipsoid, mm: float) -> Ellipsoid:
    ell = shape if isinstance(shape, Ellipsoid) else shape.ellipsoid
    return ell.inflated(mm)
