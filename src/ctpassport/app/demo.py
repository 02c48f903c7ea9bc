"""Demo studies for the app: synthetic torso phantoms (:mod:`ctpassport.phantom`) with known labels and, for
registration, a follow-up scan after a known motion.

Frames: phantom CTs are int16 HU in storage order with their affine (voxel -> RAS+ mm); the follow-up's true
transform maps baseline (fixed) world points to follow-up (moving) world points, mm RAS+.
"""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np

from ..io.nifti import Image3D, make_nifti
from .core import Study

#: Voxel sizes offered (mm, isotropic).
SPACINGS = (1.5, 2.0, 3.0, 4.0, 6.0)
DEFAULT_SPACING = 3.0
#: Fields of view: the phantom's whole default one, or an upper-abdomen slab that fits one network patch
#: (384 x 336 x 336 mm at 3 mm), so it segments in one pass.
FIELDS = ("Upper abdomen (quick)", "Chest to pelvis")
#: Half extents (mm) of the quick field of view along x, y, and its z range about the diaphragm dome (mm).
QUICK_HALF_XY = (183.0, 159.0)
QUICK_Z = (-140.0, 60.0)


def phantom_grid(seed: int, spacing: float, field: str = FIELDS[0]) -> Any:
    """The :class:`ctpassport.phantom.Grid` of phantom ``seed`` for a field of view of :data:`FIELDS`."""
    from ..phantom import build_phantom, default_grid, make_grid

    phantom = build_phantom(seed)
    if field != FIELDS[0]:
        return default_grid(phantom, spacing)
    corners = phantom.fov_world()
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    centre = (lo + hi) / 2.0
    half = np.minimum((hi - lo) / 2.0, np.array(QUICK_HALF_XY + (1e9,)))
    dz = float(phantom.landmark_world("diaphragm")[2])
    z0, z1 = max(lo[2], dz + QUICK_Z[0]), min(hi[2], dz + QUICK_Z[1])
    box_lo = np.array([centre[0] - half[0], centre[1] - half[1], z0])
    box_hi = np.array([centre[0] + half[0], centre[1] + half[1], z1])
    box = np.array(
        [
            [x, y, z]
            for x in (box_lo[0], box_hi[0])
            for y in (box_lo[1], box_hi[1])
            for z in (box_lo[2], box_hi[2])
        ]
    )
    return make_grid(box, spacing)


def _image(ct: np.ndarray, affine: np.ndarray, description: str) -> Image3D:
    img = make_nifti(ct, affine, dtype=np.int16)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = description.encode()[:79]
    return Image3D(data=ct, affine=np.asarray(affine, dtype=np.float64), header=img.header.copy(), path=None)


def phantom_study(
    seed: int,
    spacing: float,
    *,
    field: str = FIELDS[0],
    follow_up: bool = False,
    motion_seed: int = 1,
    grid: Any = None,
) -> Study:
    """Phantom ``seed`` at ``spacing`` mm as a study (``source="demo"``), with its reference labels in
    ``truth_labels``; ``follow_up=True`` renders the scan after the known motion (``truth["transform"]``, a
    :class:`ctpassport.phantom.TrueTransform`) on the baseline's grid (or ``grid``)."""
    from ..phantom import make_scan

    g = grid if grid is not None else phantom_grid(seed, spacing, field)
    scan = make_scan(int(seed), grid=g, follow_up=follow_up, motion_seed=motion_seed)
    which = "follow-up" if follow_up else "baseline"
    name = f"Phantom {seed} {which} ({spacing:g} mm)"
    study = Study(
        name=name,
        source="demo",
        image=_image(scan.ct, scan.affine, f"ctpassport phantom {seed} {which}"),
        truth_labels=scan.labels,
        truth={"seed": int(seed), "spacing": float(spacing), "field": field, "grid": g, "kind": which},
    )
    if follow_up:
        study.truth["transform"] = scan.motion
        study.truth["motion_seed"] = int(motion_seed)
    return study


def follow_up_of(baseline: Study, motion_seed: int = 1) -> Study:
    """The follow-up scan of a phantom baseline study (same phantom, same grid, known motion)."""
    t = baseline.truth
    if baseline.source != "demo" or "seed" not in t:
        raise ValueError("only a demo phantom has a known follow-up")
    return phantom_study(
        t["seed"], t["spacing"], field=t["field"], follow_up=True, motion_seed=motion_seed, grid=t["grid"]
    )


def nifti_bytes_of(study: Study) -> bytes:
    """The study's CT as gzip-compressed NIfTI bytes (for uploading a phantom in tests or saving it)."""
    from ..io.nifti import nifti_bytes

    img = nib.Nifti1Image(study.image.data, study.image.affine, study.image.header)
    return nifti_bytes(img, compress=True)
