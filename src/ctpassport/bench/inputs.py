"""Benchmark inputs: CT files and folders, plus resampled variants made from them (realistic sizes).

A variant ``0.8x0.8x1.5`` of ``example_ct`` (122 x 101 x 112 voxels of 3 mm) is the same anatomy resampled
to 0.8 x 0.8 x 1.5 mm: 458 x 379 x 224 voxels, the size of a typical thin-slice abdominal CT. Variants are
made with ``scipy.ndimage.zoom`` (order 1, ``mode="nearest"``, like TotalSegmentator's own resampling) in
float32 and rounded to int16 HU; the affine's columns are scaled to exactly the new voxel size, keeping the
first voxel's centre and the orientation, as TotalSegmentator's ``change_spacing`` does. They are cached
under ``<report>/inputs`` (made once, reused).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Case:
    """One benchmark input: a CT file on disk and what it is."""

    name: str
    path: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    orientation: str
    voxels: int
    derived_from: str | None = None
    variant: str | None = None
    sha256: str = ""  # of the file's bytes: which input a result belongs to
    bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_spacing(text: str) -> tuple[float, float, float]:
    """``"0.8x0.8x1.5"`` (or one number for isotropic) -> voxel size in mm along the array axes."""
    parts = [p for p in re.split(r"[x,\s]+", text.strip().lower().removesuffix("mm")) if p]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"cannot read the spacing {text!r}", hint="write it like 0.8x0.8x1.5 (mm)") from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3 or not all(0 < v <= 100 for v in vals):  # (NaN fails every comparison)
        raise ConfigError(f"spacing {text!r} needs three sizes in (0, 100] mm", hint="e.g. 0.8x0.8x1.5")
    return vals[0], vals[1], vals[2]


def spacing_tag(spacing: tuple[float, float, float]) -> str:
    return "x".join(f"{s:g}" for s in spacing)


def _stem(path: Path) -> str:
    name = path.name
    for suf in (".nii.gz", ".nii"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return path.stem


def describe(path: Path, name: str | None = None, *, derived_from: str | None = None,
             variant: str | None = None) -> Case:
    """A :class:`Case` for a NIfTI CT (reads the header only)."""
    from ..io.load import source_sha256
    from ..io.nifti import load_nifti, spacing_from_affine
    from ..io.orientation import axcodes

    img = load_nifti(path)
    shape = tuple(int(s) for s in img.shape[:3])
    return Case(name=name or _stem(path), path=str(path), shape=shape,  # type: ignore[arg-type]
                spacing_mm=tuple(round(float(s), 4) for s in spacing_from_affine(img.affine)),  # type: ignore[arg-type]
                orientation="".join(axcodes(img.affine)), voxels=int(np.prod(shape)), derived_from=derived_from,
                variant=variant, sha256=source_sha256(path), bytes=Path(path).stat().st_size)


def is_label_map(path: Path) -> bool:
    """True for uint8/bool NIfTI files (label maps such as ``example_seg.nii.gz``): not CTs, skipped in folders."""
    from ..io.nifti import load_nifti

    try:
        return load_nifti(path).get_data_dtype() in (np.uint8, np.bool_)
    except Exception:  # noqa: BLE001 - unreadable files are reported when they are used
        return False


def collect_inputs(items: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Expand ``-i`` arguments: files as given, folders to their NIfTI files (sorted) except label maps.

    Returns (CT paths, notes on what was skipped). Raises :class:`InputError` for a missing path or when
    nothing is left.
    """
    paths: list[Path] = []
    notes: list[str] = []
    for item in items:
        p = Path(item)
        if not p.exists():
            raise InputError("no such file or folder", p)
        if p.is_dir():
            for f in sorted(p.iterdir()):
                if f.is_file() and f.name.endswith(NIFTI_SUFFIXES):
                    if is_label_map(f):
                        notes.append(f"skipped {f.name}: uint8 label map, not a CT")
                    else:
                        paths.append(f)
        else:
            paths.append(p)
    seen: set[Path] = set()
    unique = [p for p in paths if not (p.resolve() in seen or seen.add(p.resolve()))]  # type: ignore[func-returns-value]
    if not unique:
        where = ", ".join(str(i) for i in items)
        raise InputError(f"{where}: no CT images found" + (f" ({'; '.join(notes)})" if notes else ""),
                         hint="pass NIfTI CT files or folders of them with -i")
    return unique, notes


def make_variant(src: Path, spacing: tuple[float, float, float], out_dir: Path) -> Path:
    """``src`` resampled to ``spacing`` (mm, array axes), int16 HU, same orientation and field of view
    (see the module docstring); cached: an existing file of the same name is reused. The name carries a key
    of the source's path, size and modification time, so two inputs named alike (``a/ct.nii.gz``,
    ``b/ct.nii.gz``) or a changed source never share a cached variant."""
    import hashlib

    from scipy import ndimage

    from ..io.nifti import make_nifti, read_image, save_nifti

    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:8]
    out = out_dir / f"{_stem(src)}_{spacing_tag(spacing)}mm_{key}.nii.gz"
    if out.is_file():
        return out
    img = read_image(src, kind="CT")
    old = np.asarray(img.spacing, dtype=np.float64)
    new = np.asarray(spacing, dtype=np.float64)
    zoom = old / new
    data = np.asarray(img.data, dtype=np.float32)
    fine = ndimage.zoom(data, zoom, output=np.float32, order=1, mode="nearest")
    np.rint(fine, out=fine)
    np.clip(fine, -32768, 32767, out=fine)
    affine = img.affine.copy()
    affine[:3, :3] = img.affine[:3, :3] / zoom[None, :]  # exactly the new spacing, as TotalSegmentator's change_spacing
    out_dir.mkdir(parents=True, exist_ok=True)
    save_nifti(make_nifti(fine.astype(np.int16), affine, img.header, dtype=np.int16), out)
    return out


def prepare_cases(items: Sequence[str | Path], variants: list[str], work_dir: Path,
                  log: Any = None) -> tuple[list[Case], list[str]]:
    """Collect the inputs and add one resampled variant per input and ``variants`` entry."""
    paths, notes = collect_inputs(items)
    cases: list[Case] = []
    names: set[str] = set()

    def unique(base: str) -> str:
        """``base``, or ``base_2``, ``base_3``...: every case (and its output file) has its own name, inputs and
        variants alike (``x_6x6x6mm.nii.gz`` and the 6 mm variant of ``x.nii.gz`` are two cases)."""
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.add(name)
        return name

    for p in paths:
        c = describe(p)
        c.name = unique(c.name)
        cases.append(c)
        for v in variants:
            sp = parse_spacing(v)
            if log is not None:
                log(f"making {c.name} at {spacing_tag(sp)} mm")
            vp = make_variant(p, sp, work_dir / "inputs")
            cases.append(describe(vp, unique(f"{c.name}_{spacing_tag(sp)}mm"), derived_from=c.name,
                                  variant=f"{spacing_tag(sp)} mm"))
    return cases, notes
