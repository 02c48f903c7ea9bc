"""A synthetic, analytic full-torso label map with all 117 TotalSegmentator classes.

Used by the passport speed benchmark and by tests that need every class (the spine view, the pictures),
at any resolution: every structure is an analytic shape in world millimetres (RAS+: +x patient Right,
+y Anterior, +z Superior) rasterised at the voxel centres of the requested grid, so the 3 mm map and the
512 x 512 x 450 "original resolution" map show the same anatomy.

The anatomy is schematic but laid out like a real neck-to-pelvis CT (sizes in mm are typical adult
values): vertebrae C1..S1 stacked along a curved spine with discs between them, the spinal cord in the
canal, 24 ribs curving from the thoracic vertebrae to the costal cartilages and the sternum, lung lobes,
heart and great vessels, abdominal organs, pelvis, hips and femora, muscles, and the lower part of the
skull and brain at the top edge (truncated there, as in real scans).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..model.classes import NAME_TO_ID
from ..types import Affine

#: World extent (mm, RAS+) of the synthetic field of view: x, y, z ranges.
FOV_MM = ((-200.0, 200.0), (-200.0, 200.0), (-330.0, 380.0))

Inside = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class _Shape:
    label: int
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    inside: Inside


def _ellipsoid(label: int, c: tuple[float, float, float], r: tuple[float, float, float],
               cut: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None,
               rot_z_deg: float = 0.0) -> _Shape:
    cx, cy, cz = c
    a = np.deg2rad(rot_z_deg)
    ca, sa = np.cos(a), np.sin(a)
    ext = max(r[0], r[1])

    def inside(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        u = (x - cx) * ca + (y - cy) * sa
        v = -(x - cx) * sa + (y - cy) * ca
        m = (u / r[0]) ** 2 + (v / r[1]) ** 2 + ((z - cz) / r[2]) ** 2 <= 1.0
        return m & cut(x, y, z) if cut is not None else m

    if rot_z_deg:
        return _Shape(label, (cx - ext, cy - ext, cz - r[2]), (cx + ext, cy + ext, cz + r[2]), inside)
    return _Shape(label, (cx - r[0], cy - r[1], cz - r[2]), (cx + r[0], cy + r[1], cz + r[2]), inside)


def _shell(label: int, c: tuple[float, float, float], r: tuple[float, float, float], t: float) -> _Shape:
    cx, cy, cz = c

    def inside(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        outer = ((x - cx) / r[0]) ** 2 + ((y - cy) / r[1]) ** 2 + ((z - cz) / r[2]) ** 2 <= 1.0
        inner = ((x - cx) / (r[0] - t)) ** 2 + ((y - cy) / (r[1] - t)) ** 2 + ((z - cz) / (r[2] - t)) ** 2 <= 1.0
        return outer & ~inner

    return _Shape(label, (cx - r[0], cy - r[1], cz - r[2]), (cx + r[0], cy + r[1], cz + r[2]), inside)


def _box(label: int, lo: tuple[float, float, float], hi: tuple[float, float, float]) -> _Shape:
    def inside(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return ((x >= lo[0]) & (x <= hi[0])) & ((y >= lo[1]) & (y <= hi[1])) & ((z >= lo[2]) & (z <= hi[2]))

    return _Shape(label, lo, hi, inside)


def _cylinder_z(label: int, cx: float, cy: float, r: float, z0: float, z1: float) -> _Shape:
    def inside(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return ((x - cx) ** 2 + (y - cy) ** 2 <= r * r) & ((z >= z0) & (z <= z1))

    return _Shape(label, (cx - r, cy - r, z0), (cx + r, cy + r, z1), inside)


def _tube(label: int, pts: list[tuple[float, float, float]], r: float) -> list[_Shape]:
    """A tube of radius ``r`` along a polyline: one capsule per segment (their union is the tube)."""
    out = []
    for p, q in itertools.pairwise(pts):
        p_ = np.asarray(p, dtype=np.float64)
        d = np.asarray(q, dtype=np.float64) - p_
        dd = float(d @ d) or 1.0

        def inside(x: np.ndarray, y: np.ndarray, z: np.ndarray, p_: np.ndarray = p_, d: np.ndarray = d,
                   dd: float = dd) -> np.ndarray:
            t = np.clip(((x - p_[0]) * d[0] + (y - p_[1]) * d[1] + (z - p_[2]) * d[2]) / dd, 0.0, 1.0)
            return (x - p_[0] - t * d[0]) ** 2 + (y - p_[1] - t * d[1]) ** 2 + (z - p_[2] - t * d[2]) ** 2 <= r * r

        lo = tuple(float(v) for v in np.minimum(p, q) - r)
        hi = tuple(float(v) for v in np.maximum(p, q) + r)
        out.append(_Shape(label, lo, hi, inside))  # type: ignore[arg-type]
    return out


def _spine_y(z: float) -> float:
    """Anterior-posterior position (mm) of the vertebral body centres: lordosis / kyphosis."""
    return -45.0 - 12.0 * np.cos(np.pi * (z + 150.0) / 520.0)


def _vertebra_levels() -> list[tuple[str, float, float, float]]:
    """(name, z_bottom, z_top, body radius) from S1 upwards, in mm."""
    levels: list[tuple[str, float, float, float]] = []
    z = -165.0
    levels.append(("vertebrae_S1", z, z + 25.0, 24.0))
    z += 25.0 + 5.0
    for n in range(5, 0, -1):
        levels.append((f"vertebrae_L{n}", z, z + 24.0, 22.0))
        z += 24.0 + 5.0
    for n in range(12, 0, -1):
        levels.append((f"vertebrae_T{n}", z, z + 18.0, 16.0 - 0.4 * (12 - n)))
        z += 18.0 + 4.0
    for n in range(7, 0, -1):
        levels.append((f"vertebrae_C{n}", z, z + 12.0, 10.0))
        z += 12.0 + 3.0
    return levels


def _anatomy() -> list[_Shape]:
    ids = NAME_TO_ID
    s: list[_Shape] = []
    R, L = 1.0, -1.0  # +x is the patient's right in RAS+

    # Muscles first (bones and organs drawn later win where they overlap).
    for side, sx in (("left", L), ("right", R)):
        s.append(_ellipsoid(ids[f"gluteus_maximus_{side}"], (sx * 80, -95, -230), (55, 40, 70)))
        s.append(_ellipsoid(ids[f"gluteus_medius_{side}"], (sx * 115, -60, -175), (35, 40, 55)))
        s.append(_ellipsoid(ids[f"gluteus_minimus_{side}"], (sx * 120, -35, -200), (20, 25, 40)))
        s += _tube(ids[f"autochthon_{side}"], [(sx * 28, -95, -160), (sx * 30, -100, 0), (sx * 26, -95, 200),
                                               (sx * 20, -80, 330)], 16)
        s += _tube(ids[f"iliopsoas_{side}"], [(sx * 35, -35, -10), (sx * 55, -20, -130), (sx * 85, 10, -250),
                                              (sx * 85, 15, -300)], 17)

    # Head at the top edge (truncated by the field of view).
    s.append(_ellipsoid(ids["brain"], (0, -5, 450), (65, 80, 75)))
    s.append(_shell(ids["skull"], (0, -5, 450), (75, 90, 85), 8))

    # Lungs (split into lobes by oblique fissure planes), heart, airway.
    def lobe_cut(upper: bool, tilt: float, z0: float) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
        def cut(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
            plane = z - (z0 + tilt * y)
            return plane >= 0 if upper else plane < 0
        return cut

    for sx, upper_name, lower_name in ((L, "lung_upper_lobe_left", "lung_lower_lobe_left"),
                                       (R, "lung_upper_lobe_right", "lung_lower_lobe_right")):
        c, r = (sx * 75, 0.0, 135.0), (62.0, 85.0, 115.0)
        s.append(_ellipsoid(ids[upper_name], c, r, lobe_cut(True, -0.8, 140.0)))
        s.append(_ellipsoid(ids[lower_name], c, r, lobe_cut(False, -0.8, 140.0)))
    # The right middle lobe: the anterior-inferior part of the right upper lobe's region.
    s.append(_ellipsoid(ids["lung_middle_lobe_right"], (R * 75, 0.0, 135.0), (62.0, 85.0, 115.0),
                        lambda x, y, z: (z - (140.0 - 0.8 * y) >= 0) & (z < 125.0) & (y > 10.0)))
    s.append(_ellipsoid(ids["heart"], (L * 15, 30, 90), (55, 50, 60), rot_z_deg=25))
    s.append(_ellipsoid(ids["atrial_appendage_left"], (L * 55, 45, 115), (14, 10, 12)))
    s += _tube(ids["pulmonary_vein"], [(L * 45, 5, 110), (L * 15, 10, 105), (R * 40, 5, 110)], 7)
    s += _tube(ids["trachea"], [(0, 5, 330), (0, 0, 250), (0, -5, 175)], 10)
    s += _tube(ids["esophagus"], [(L * 3, -22, 330), (L * 5, -30, 200), (L * 12, -25, 60), (L * 25, 10, 0)], 8)
    s.append(_ellipsoid(ids["thyroid_gland"], (0, 15, 290), (25, 10, 20)))

    # Great vessels.
    s += _tube(ids["aorta"], [(R * 5, 40, 120), (R * 5, 35, 185), (L * 10, 0, 205), (L * 20, -25, 175),
                              (L * 20, -25, 60), (L * 15, -15, -40), (L * 5, -10, -120)], 13)
    s += _tube(ids["brachiocephalic_trunk"], [(R * 2, 25, 200), (R * 15, 20, 235)], 7)
    s += _tube(ids["subclavian_artery_right"], [(R * 15, 20, 235), (R * 40, 5, 250), (R * 75, -5, 245)], 5)
    s += _tube(ids["subclavian_artery_left"], [(L * 18, -10, 210), (L * 40, -5, 245), (L * 75, -5, 245)], 5)
    s += _tube(ids["common_carotid_artery_right"], [(R * 15, 20, 240), (R * 25, 15, 330)], 4)
    s += _tube(ids["common_carotid_artery_left"], [(L * 10, 10, 210), (L * 25, 15, 330)], 4)
    s += _tube(ids["brachiocephalic_vein_left"], [(L * 60, 15, 240), (L * 10, 30, 225), (R * 20, 30, 205)], 6)
    s += _tube(ids["brachiocephalic_vein_right"], [(R * 60, 15, 240), (R * 25, 25, 215), (R * 20, 30, 205)], 6)
    s += _tube(ids["superior_vena_cava"], [(R * 20, 30, 205), (R * 22, 30, 130)], 9)
    s += _tube(ids["inferior_vena_cava"], [(R * 20, 20, 60), (R * 22, -5, -20), (R * 15, -10, -130)], 11)
    s += _tube(ids["portal_vein_and_splenic_vein"], [(L * 90, -10, 10), (R * 10, 5, 5), (R * 45, 25, 30)], 7)
    for side, sx in (("left", L), ("right", R)):
        s += _tube(ids[f"iliac_artery_{side}"], [(0, -5, -125), (sx * 45, 5, -190), (sx * 70, 20, -260)], 6)
        s += _tube(ids[f"iliac_vena_{side}"], [(R * 12, -12, -135), (sx * 50, -5, -195), (sx * 75, 12, -265)], 7)

    # Abdomen and pelvis.
    s.append(_ellipsoid(ids["liver"], (R * 70, 25, 20), (95, 85, 70), rot_z_deg=-15))
    s.append(_ellipsoid(ids["gallbladder"], (R * 65, 65, -25), (16, 14, 30)))
    s.append(_ellipsoid(ids["stomach"], (L * 60, 45, 15), (45, 40, 55), rot_z_deg=20))
    s.append(_ellipsoid(ids["spleen"], (L * 105, -35, 20), (30, 45, 55), rot_z_deg=30))
    s.append(_ellipsoid(ids["pancreas"], (L * 15, 15, -15), (75, 15, 15), rot_z_deg=-10))
    for side, sx in (("left", L), ("right", R)):
        kz = -45 if side == "left" else -60
        s.append(_ellipsoid(ids[f"kidney_{side}"], (sx * 70, -45, kz), (30, 25, 55)))
        s.append(_ellipsoid(ids[f"adrenal_gland_{side}"], (sx * 55, -35, kz + 70), (12, 8, 18)))
        s.append(_ellipsoid(ids[f"kidney_cyst_{side}"], (sx * 82, -40, kz - 20), (9, 9, 9)))
    s.append(_ellipsoid(ids["small_bowel"], (L * 10, 40, -110), (80, 50, 55)))
    s += _tube(ids["duodenum"], [(R * 30, 30, 0), (R * 45, 10, -25), (R * 30, 0, -60), (L * 20, 5, -60),
                                 (L * 35, 10, -35)], 11)
    s += _tube(ids["colon"], [(R * 85, 20, -200), (R * 95, 20, -90), (R * 90, 30, -20), (0, 80, -10),
                              (L * 95, 20, -20), (L * 100, 10, -120), (L * 50, 0, -200), (0, -40, -230)], 18)
    s.append(_ellipsoid(ids["urinary_bladder"], (0, 50, -250), (45, 35, 35)))
    s.append(_ellipsoid(ids["prostate"], (0, 35, -300), (20, 15, 18)))

    # Skeleton (last: bones win over soft tissue).
    for side, sx in (("left", L), ("right", R)):
        s.append(_ellipsoid(ids[f"hip_{side}"], (sx * 95, -30, -205), (40, 70, 75), rot_z_deg=sx * 20))
        s += _tube(ids[f"femur_{side}"], [(sx * 100, 0, -255), (sx * 120, 5, -285), (sx * 115, 10, -340)], 15)
        s += _tube(ids[f"humerus_{side}"], [(sx * 175, -10, 260), (sx * 185, -5, 150), (sx * 190, 0, 40)], 14)
        s.append(_ellipsoid(ids[f"scapula_{side}"], (sx * 110, -115, 210), (50, 12, 70), rot_z_deg=-sx * 25))
        s += _tube(ids[f"clavicula_{side}"], [(sx * 20, 45, 265), (sx * 90, 30, 280), (sx * 155, -20, 275)], 8)
    s.append(_ellipsoid(ids["sacrum"], (0, -80, -200), (45, 20, 45)))
    levels = _vertebra_levels()
    for name, z0, z1, rad in levels:
        yb = _spine_y(0.5 * (z0 + z1))
        label = ids[name]
        s.append(_cylinder_z(label, 0.0, yb, rad, z0, z1))
        s.append(_box(label, (-12.0, yb - rad - 16, z0), (-7.0, yb - rad + 2, z1)))  # pedicles
        s.append(_box(label, (7.0, yb - rad - 16, z0), (12.0, yb - rad + 2, z1)))
        s.append(_box(label, (-rad * 0.9, yb - rad - 22, z0), (rad * 0.9, yb - rad - 16, z1)))  # lamina
        s.append(_box(label, (-3.0, yb - rad - 45, z0 - 4), (3.0, yb - rad - 22, z1 - 2)))  # spinous process
        s.append(_box(label, (-rad - 25, yb - rad - 14, z0 + 2), (rad + 25, yb - rad - 6, z1 - 2)))  # transverse
    cord = [(0.0, _spine_y(z) - 24.0, z) for z in np.linspace(-150.0, 370.0, 14)]
    s += _tube(ids["spinal_cord"], cord, 5.0)
    # Ribs: rib n leaves the thoracic vertebra T_n, curves around the chest and ends near the front.
    thoracic = {name: (z0, z1) for name, z0, z1, _ in levels if name.startswith("vertebrae_T")}
    s.append(_box(ids["sternum"], (-14.0, 95.0, 80.0), (14.0, 110.0, 245.0)))
    for n in range(1, 13):
        z0, z1 = thoracic[f"vertebrae_T{n}"]
        zc = 0.5 * (z0 + z1)
        a, b = 95.0 + 4.0 * min(n, 7), 100.0  # half widths of the rib ellipse (x, y)
        yb = _spine_y(zc) - 10.0
        ang = np.deg2rad(np.linspace(-100.0, 60.0 if n <= 10 else -10.0, 9))
        for side, sx in (("left", L), ("right", R)):
            pts = [(float(sx * a * np.cos(t)), float(yb + (b + 5) * (1 + np.sin(t)) * 0.5 * 1.9 - 5),
                    float(zc - 45.0 * (1 + np.sin(t)) * 0.5)) for t in ang]
            s += _tube(ids[f"rib_{side}_{n}"], pts, 5.0)
            if n <= 10:  # costal cartilage from the rib's anterior end to the sternum
                end = pts[-1]
                s += _tube(ids["costal_cartilages"], [end, (sx * 16.0, 100.0, min(max(end[2], 90.0), 240.0))], 4.0)
    return s


def torso_grid(shape: tuple[int, int, int]) -> Affine:
    """Voxel -> RAS+ mm affine of a ``shape`` grid (array axes along x, y, z; spacing = field-of-view extent /
    ``shape`` per axis) covering :data:`FOV_MM` (voxel centres inside the field of view)."""
    aff = np.eye(4)
    for ax, (lo, hi) in enumerate(FOV_MM):
        sp = (hi - lo) / shape[ax]
        aff[ax, ax] = sp
        aff[ax, 3] = lo + 0.5 * sp
    return aff


def torso_labels(shape: tuple[int, int, int] = (134, 134, 237)) -> tuple[np.ndarray, Affine]:
    """Rasterise the synthetic torso on a ``shape`` grid over :data:`FOV_MM`.

    Returns ``(labels, affine)``: uint8 labels in array order ``[i, j, k]`` = (x, y, z) RAS+, and the
    voxel -> RAS+ mm affine (axis-aligned). The default shape is a 3 mm grid (about 3 x 3 x 3 mm);
    ``(512, 512, 450)`` gives a 0.78 x 0.78 x 1.58 mm "original resolution" map. All 117 classes are
    present at either resolution.
    """
    aff = torso_grid(shape)
    labels = np.zeros(shape, dtype=np.uint8)
    sp = np.diag(aff)[:3]
    org = aff[:3, 3]
    for sh in _anatomy():
        lo = np.maximum(np.ceil((np.asarray(sh.lo) - org) / sp).astype(int), 0)
        hi = np.minimum(np.floor((np.asarray(sh.hi) - org) / sp).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        x = (org[0] + sp[0] * np.arange(lo[0], hi[0]))[:, None, None]
        y = (org[1] + sp[1] * np.arange(lo[1], hi[1]))[None, :, None]
        z = (org[2] + sp[2] * np.arange(lo[2], hi[2]))[None, None, :]
        m = np.broadcast_to(sh.inside(x, y, z), (hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]))
        labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]][m] = sh.label
    return labels, aff
