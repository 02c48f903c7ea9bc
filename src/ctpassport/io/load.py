"""One entry point for CT input: a NIfTI file, a DICOM folder, or a zip of a DICOM folder.

:func:`load_ct` returns an :class:`~ctpassport.io.nifti.Image3D` (``data[i, j, k]`` in the source's
storage order, ``affine`` voxel -> RAS+ mm); for DICOM it is a :class:`~ctpassport.io.dicom.DicomImage3D`
carrying the series' tags and headers (see :mod:`ctpassport.io.dicom` for its axis order).
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import InputError
from .nifti import Image3D, read_image

InputKind = Literal["nifti", "dicom-folder", "dicom-zip"]


def is_nifti_name(path: str | Path) -> bool:
    """True for ``*.nii`` / ``*.nii.gz`` names (case-insensitive)."""
    name = Path(path).name.lower()
    return name.endswith((".nii", ".nii.gz"))


def input_kind(path: str | Path) -> InputKind:
    """Classify a CT input path; :class:`InputError` for anything that is none of the three kinds."""
    from .dicom import is_dicom_file

    p = Path(path)
    if not p.exists():
        raise InputError("no such file or folder", p)
    if p.is_dir():
        return "dicom-folder"
    if is_nifti_name(p):
        return "nifti"
    if zipfile.is_zipfile(p):
        return "dicom-zip"
    if is_dicom_file(p):
        raise InputError("is a single DICOM file", p, "pass the folder that holds the series (or a zip of it)")
    raise InputError("is not a NIfTI file (.nii/.nii.gz), a DICOM folder or a zip of one", p)


def load_ct(path: str | Path, series_uid: str | None = None) -> Image3D:
    """Load a CT from a NIfTI file, a DICOM folder or a zip of one, validated.

    DICOM: the CT series with the most images, or the one whose ``SeriesInstanceUID`` is ``series_uid``.
    ``data`` is in HU, ``affine`` maps voxel indices to RAS+ mm. Raises :class:`InputError` (one line
    naming the path) for anything unusable, including ``series_uid`` given for a NIfTI file.
    """
    kind = input_kind(path)
    if kind == "nifti":
        if series_uid is not None:
            raise InputError("--series-uid applies to DICOM input, not to a NIfTI file", path)
        return read_image(path, kind="CT")
    from .dicom import read_dicom_ct

    return read_dicom_ct(path, series_uid=series_uid)


def label_map_suspicion(data: np.ndarray) -> str | None:
    """Why ``data`` (an image meant as a CT in HU, ``[i, j, k]`` with ``k`` the slice axis) looks like a label
    map or mask instead, or None.

    A CT in HU has air near -1000 and thousands of distinct values; a label map holds a few small
    non-negative integers. Checked on every 4th voxel in-plane and every 2nd slice (cheap); a warning sign for
    the user (who may have swapped the CT and its segmentation), not a refusal."""
    sub = np.asarray(data[::4, ::4, ::2])
    if sub.size == 0:
        return None
    lo, hi = float(sub.min()), float(sub.max())
    if lo < 0 or hi > 1000 or (sub.dtype.kind == "f" and not np.array_equal(sub, np.round(sub))):
        return None
    n = len(np.unique(sub))
    if n > 256:
        return None
    return (f"holds only {n} distinct values, all integers in {lo:g}..{hi:g}, and no air (-1000 HU): "
            "is it a label map or mask rather than a CT in HU?")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_sha256(path: str | Path, series_uid: str | None = None) -> str:
    """A hash identifying the CT at ``path`` (hex SHA-256).

    NIfTI: the file's bytes. DICOM folder or zip: the chosen series' identity
    (:func:`ctpassport.io.dicom.series_sha256` of its SeriesInstanceUID and SOP instance UIDs), so the
    same series gives the same hash whether it comes as a folder, a zip, or in another file order.
    """
    kind = input_kind(path)
    if kind == "nifti":
        return _file_sha256(Path(path))
    from .dicom import dicom_metadata

    return dicom_metadata(path, series_uid).source_sha256
