"""Synthetic torso CT phantoms with TotalSegmentator labels, and follow-up scans with a known motion.

* :func:`make_scan` renders phantom ``seed`` on any grid (spacing, orientation, obliquity) as CT (int16 HU)
  plus labels (uint8, TotalSegmentator class ids); with ``follow_up=True`` the same anatomy after a known
  rigid motion and breathing-like deformation (:class:`~ctpassport.phantom.motion.TrueTransform`, which maps
  baseline = fixed points to follow-up = moving points, world mm RAS+).
* :func:`write_phantom` writes the files (``ctpassport phantom``).

Everything is deterministic per seed (numpy ``default_rng`` streams keyed by the seed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, InputError
from ..io.atomic import check_writable, write_text_atomic
from ..types import Affine
from .anatomy import ANALYTIC_ORGANS, ANATOMY_VERSION, OrganTruth, Phantom, build_phantom
from .motion import TrueTransform, load_true_transform, sample_motion, save_true_transform
from .render import Grid, default_grid, make_grid, parse_spacing, render

__all__ = [
    "ANALYTIC_ORGANS", "ANATOMY_VERSION", "Grid", "OrganTruth", "Phantom", "PhantomScan", "TrueTransform",
    "build_phantom", "default_grid", "follow_up_motion", "load_true_transform", "make_grid", "make_scan",
    "parse_spacing", "render", "save_true_transform", "write_phantom",
]


@dataclass
class PhantomScan:
    """One rendered scan: ``ct`` int16 HU and ``labels`` uint8 in storage order, ``affine`` voxel -> RAS+ mm."""

    ct: np.ndarray
    labels: np.ndarray
    affine: Affine
    phantom: Phantom
    motion: TrueTransform | None = None  # set for a follow-up: maps baseline (fixed) -> this scan (moving)


def _check_motion_seed(motion_seed: int) -> None:
    if int(motion_seed) < 0:
        raise ConfigError(f"the follow-up's motion seed must be a non-negative integer, not {motion_seed}")


def follow_up_motion(phantom: Phantom, motion_seed: int = 1, *, max_rotation_deg: float = 4.0,
                     max_translation_mm: float = 12.0, max_breath_mm: float = 12.0) -> TrueTransform:
    """The known baseline -> follow-up transform of ``phantom`` (world mm RAS+, fixed = baseline).

    Rigid part: rotation up to ``max_rotation_deg`` about the field-of-view centre and translation up to
    ``max_translation_mm``; deformation: diaphragm shift up to ``max_breath_mm`` centred on the liver dome and
    a chest-wall expansion of up to half that. Deterministic per (phantom seed, ``motion_seed``), both
    non-negative integers.
    """
    _check_motion_seed(motion_seed)
    rng = np.random.default_rng([ANATOMY_VERSION, 31337, phantom.seed, int(motion_seed)])
    return sample_motion(rng, center=phantom.landmark_world("center"), diaphragm=phantom.landmark_world("diaphragm"),
                         chest_z=float(phantom.landmark_world("heart")[2]),
                         chest_y0=float(phantom.landmark_world("chest_back")[1]),
                         max_rotation_deg=max_rotation_deg, max_translation_mm=max_translation_mm,
                         max_breath_mm=max_breath_mm)


def make_scan(seed: int = 0, *, spacing: float | str | tuple[float, ...] = 3.0, orientation: str = "RAS",
              oblique_deg: tuple[float, float, float] = (0.0, 0.0, 0.0), grid: Grid | None = None,
              follow_up: bool = False, motion_seed: int = 1, motion: TrueTransform | None = None,
              noise_hu: float | None = None, psf_mm: float | None = None) -> PhantomScan:
    """Render phantom ``seed`` (baseline, or its follow-up) on ``grid`` or on the default field of view.

    ``spacing`` (mm, one or three values in array axis order), ``orientation`` (axis codes, e.g. ``LPS``) and
    ``oblique_deg`` (rotation about world x, y, z) define the default grid; the follow-up uses the same grid
    as its baseline. The follow-up's noise is drawn independently of the baseline's.
    """
    phantom = build_phantom(seed)
    if follow_up:
        _check_motion_seed(motion_seed)  # it also seeds the follow-up's noise
    if grid is None:
        grid = default_grid(phantom, spacing, orientation, oblique_deg)
    if follow_up and motion is None:
        motion = follow_up_motion(phantom, motion_seed)
    noise_seed = None if not follow_up else 1_000_003 * (int(motion_seed) + 1) + int(seed)
    ct, labels = render(phantom, grid, motion=motion if follow_up else None, noise_seed=noise_seed,
                        noise_hu=noise_hu, psf_mm=psf_mm)
    return PhantomScan(ct=ct, labels=labels, affine=grid.affine, phantom=phantom,
                       motion=motion if follow_up else None)


def truth_dict(phantom: Phantom) -> dict[str, object]:
    """JSON-ready facts of a phantom: analytic organ volumes (mm^3) and centroids (world mm, RAS+)."""
    return {
        "seed": phantom.seed,
        "anatomy_version": ANATOMY_VERSION,
        "frame": "world mm RAS+",
        "labels": phantom.labels_present(),
        "analytic_organs": {str(k): {"name": t.name, "volume_mm3": round(t.volume_mm3, 3),
                                     "centroid_mm": [round(v, 4) for v in t.centroid_mm]}
                            for k, t in sorted(phantom.truth().items())},
        "params": {k: round(float(v), 4) for k, v in phantom.params.items()},
    }


def _save_scan(scan: PhantomScan, ct_path: Path, labels_path: Path | None) -> None:
    from ..io.labels import add_label_table
    from ..io.nifti import make_nifti, save_nifti
    from ..model.classes import TOTAL_CLASSES

    img = make_nifti(scan.ct, scan.affine, dtype=np.int16)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = f"ctpassport phantom seed {scan.phantom.seed}".encode()[:79]
    save_nifti(img, ct_path)
    if labels_path is not None:
        lab = make_nifti(scan.labels, scan.affine, dtype=np.uint8)
        lab.header.set_xyzt_units("mm", "sec")
        add_label_table(lab, {k: TOTAL_CLASSES[k] for k in scan.phantom.labels_present()})
        save_nifti(lab, labels_path)


#: Peak memory of rendering one scan, bytes per voxel (measured: about 70 on the default field of view).
RENDER_BYTES_PER_VOXEL = 80


def check_memory_for(grid: Grid) -> None:
    """Raise :class:`ConfigError` when rendering on ``grid`` would need more memory than is available now
    (about :data:`RENDER_BYTES_PER_VOXEL` per voxel), instead of the process being killed half-way."""
    import psutil

    n = int(np.prod(np.asarray(grid.shape, dtype=np.float64)))
    need = n * RENDER_BYTES_PER_VOXEL
    have = int(psutil.virtual_memory().available)
    if need > have:
        sp = "x".join(f"{v:g}" for v in grid.spacing)
        shape = "x".join(map(str, grid.shape))
        raise ConfigError(f"a phantom at {sp} mm is a {shape} grid ({n / 1e6:.0f} M voxels) and needs about "
                          f"{need / 1e9:.1f} GB of memory; {have / 1e9:.1f} GB are available",
                          hint="use a coarser --spacing")


_ROLE_NAMES = {"ct": "CT", "labels": "labels", "follow_up": "follow-up CT",
               "follow_up_labels": "follow-up labels", "transform": "true transform", "truth": "truth JSON"}


def write_phantom(ct: str | Path, labels: str | Path | None = None, *, seed: int = 0,
                  spacing: float | str | tuple[float, ...] = 3.0, orientation: str = "RAS",
                  oblique_deg: tuple[float, float, float] = (0.0, 0.0, 0.0), follow_up: str | Path | None = None,
                  follow_up_labels: str | Path | None = None, transform: str | Path | None = None,
                  truth: str | Path | None = None, motion_seed: int = 1, force: bool = False) -> dict[str, Path]:
    """Write a phantom CT (and labels); with ``follow_up``, also the follow-up CT, its labels and the true
    transform JSON (baseline = fixed -> follow-up = moving, world mm RAS+). Refuses to overwrite unless
    ``force``; all outputs are checked before anything is written. Returns the written paths by role."""
    outs: dict[str, Path] = {"ct": Path(ct)}
    if labels is not None:
        outs["labels"] = Path(labels)
    if follow_up is not None:
        fu = Path(follow_up)
        stem = fu.name[: -len(".nii.gz")] if fu.name.endswith(".nii.gz") else fu.stem
        outs["follow_up"] = fu
        outs["follow_up_labels"] = Path(follow_up_labels) if follow_up_labels else fu.with_name(f"{stem}_labels.nii.gz")
        outs["transform"] = Path(transform) if transform else fu.with_name(f"{stem}_true_transform.json")
    if truth is not None:
        outs["truth"] = Path(truth)
    if follow_up is None and (follow_up_labels is not None or transform is not None):
        raise ConfigError("--follow-up-labels and --transform name outputs of the follow-up: "
                          "give --follow-up too")
    seen: dict[Path, str] = {}
    for role, p in outs.items():
        if role not in ("transform", "truth") and not p.name.endswith((".nii", ".nii.gz")):
            raise InputError("a phantom image's name must end with .nii or .nii.gz", p)
        key = p.resolve()
        if key in seen:  # one file would silently replace the other
            raise InputError(f"named for both the {_ROLE_NAMES[seen[key]]} and the {_ROLE_NAMES[role]}: "
                             "give each output its own name", p)
        seen[key] = role
        check_writable(p, force)
    grid = default_grid(build_phantom(seed), spacing, orientation, oblique_deg)
    check_memory_for(grid)
    base = make_scan(seed, grid=grid)
    fu_scan = None
    if follow_up is not None:
        fu_scan = make_scan(seed, grid=grid, follow_up=True, motion_seed=motion_seed)
    _save_scan(base, outs["ct"], outs.get("labels"))
    if fu_scan is not None:
        _save_scan(fu_scan, outs["follow_up"], outs["follow_up_labels"])
        assert fu_scan.motion is not None
        save_true_transform(fu_scan.motion, outs["transform"])
    if truth is not None:
        write_text_atomic(outs["truth"], json.dumps(truth_dict(base.phantom), indent=2))
    return outs
