"""Write a CT volume as a DICOM series (CT Image Storage, one file per slice).

Used to turn NIfTI CTs into the DICOM a hospital system would send (demo data, tests of the DICOM
input and DICOM SEG output). The volume's array axes map to DICOM as :mod:`ctpassport.io.dicom` reads
them back: ``data[i, j, k]`` = column ``i``, row ``j`` of slice ``k``; the affine (voxel -> RAS+ mm) is
converted to LPS+ ``ImageOrientationPatient`` / ``ImagePositionPatient`` / ``PixelSpacing``. Any
orientation works as long as the in-plane axes are orthogonal and the slice axis is along their normal
(no shear: DICOM cannot express it without gantry tilt).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..types import Affine
from .atomic import atomic_path
from .dicom import CT_IMAGE_STORAGE, LPS_TO_RAS


@dataclass
class SeriesTags:
    """Patient/study/series tags of a written series (``None`` UIDs are generated).

    ``study_date`` is ``YYYYMMDD``. ``uid_seed`` makes generated UIDs reproducible.
    """

    patient_id: str = "CTP0001"
    patient_name: str = "Anonymous^Patient"
    patient_birth_date: str = ""
    patient_sex: str = "O"
    study_uid: str | None = None
    study_date: str = "20240101"
    study_time: str = "120000"
    study_id: str = "1"
    study_description: str = "CT"
    accession_number: str = ""
    series_uid: str | None = None
    series_number: int = 1
    series_description: str = "CT"
    frame_of_reference_uid: str | None = None
    modality: str = "CT"
    manufacturer: str = "ctpassport"
    kvp: float = 120.0
    uid_seed: str | None = None


def _uid(seed: str | None, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(seed), *map(str, parts)]) if seed is not None else generate_uid())


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    for digits in range(10, 0, -1):
        s = f"{value:.{digits}g}"
        if len(s) <= 16:
            return s
    return f"{value:.1e}"


def dicom_geometry(affine: Affine) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ImageOrientationPatient (6,): row then column direction cosine, LPS+; PixelSpacing [row, column] mm;
    slice step vector (3,) LPS+ mm; origin LPS+ mm) for an affine voxel -> RAS+ mm whose ``i``/``j`` axes span
    the image plane (``i`` along a row, ``j`` down a column).

    Raises :class:`InputError` for sheared affines that a DICOM stack cannot represent.
    """
    a = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)  # RAS -> LPS (the same diagonal)
    ai, aj, ak = a[:3, 0], a[:3, 1], a[:3, 2]
    si, sj, sk = (float(np.linalg.norm(v)) for v in (ai, aj, ak))
    r, c = ai / si, aj / sj
    if abs(float(r @ c)) > 1e-6:
        raise InputError("the in-plane axes are not orthogonal; DICOM images need a rectangular pixel grid")
    normal = np.cross(r, c)
    if np.linalg.norm(np.cross(ak / sk, normal)) > 1e-6:
        raise InputError("the slice axis is not perpendicular to the image plane (sheared affine)")
    return np.concatenate([r, c]), np.array([sj, si]), ak, a[:3, 3]


def write_dicom_series(data: np.ndarray, affine: Affine, folder: str | Path, tags: SeriesTags | None = None,
                       *, file_prefix: str = "IM") -> list[Path]:
    """Write ``data`` (HU, ``[column, row, slice]``; see the module docstring) as a CT series in ``folder``.

    Integral values within int16 are stored as signed 16-bit with RescaleSlope 1 / Intercept 0; others
    as unsigned 16-bit with a rescale slope/intercept that covers their range. The folder is written
    atomically (it must not exist). Returns the files in slice order.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

    tags = tags or SeriesTags()
    vol = np.asarray(data)
    if vol.ndim != 3:
        raise InputError(f"expected a 3-D volume, got shape {vol.shape}")
    out = Path(folder)
    if out.exists():
        raise InputError("output folder exists", out)
    iop, pixel_spacing, step, origin = dicom_geometry(affine)
    n_cols, n_rows, n_slices = vol.shape
    finite = vol[np.isfinite(vol)] if vol.dtype.kind == "f" else vol
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    integral = vol.dtype.kind in "iu" or bool(np.all(vol == np.round(vol)))
    if integral and lo >= -32768 and hi <= 32767:
        signed, slope, intercept = True, 1.0, 0.0
    else:
        signed, intercept = False, lo
        slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    study_uid = tags.study_uid or _uid(tags.uid_seed, "study")
    series_uid = tags.series_uid or _uid(tags.uid_seed, "series", tags.series_number)
    for_uid = tags.frame_of_reference_uid or _uid(tags.uid_seed, "for", study_uid)
    now = datetime.now()
    normal = np.cross(iop[:3], iop[3:])
    files: list[Path] = []
    with atomic_path(out, is_dir=True, foreign_ok=True) as tmp:
        for k in range(n_slices):
            sop_uid = _uid(tags.uid_seed, "sop", series_uid, k) if tags.uid_seed is not None else _uid(None)
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
            meta.MediaStorageSOPInstanceUID = UID(sop_uid)
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds = Dataset()
            ds.file_meta = meta
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.SOPClassUID = CT_IMAGE_STORAGE
            ds.SOPInstanceUID = sop_uid
            ds.InstanceCreationDate = now.strftime("%Y%m%d")
            ds.InstanceCreationTime = now.strftime("%H%M%S")
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = tags.study_date
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = tags.study_time
            ds.AccessionNumber = tags.accession_number
            ds.Modality = tags.modality
            ds.Manufacturer = tags.manufacturer
            ds.ReferringPhysicianName = ""
            ds.StudyDescription = tags.study_description
            ds.SeriesDescription = tags.series_description
            ds.PatientName = tags.patient_name
            ds.PatientID = tags.patient_id
            ds.PatientBirthDate = tags.patient_birth_date
            ds.PatientSex = tags.patient_sex
            ds.BodyPartExamined = "CHEST"
            ds.SliceThickness = _ds(float(np.linalg.norm(step)))
            ds.SpacingBetweenSlices = _ds(float(np.linalg.norm(step)))
            ds.KVP = _ds(tags.kvp)
            ds.PatientPosition = "HFS"
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.StudyID = tags.study_id
            ds.SeriesNumber = tags.series_number
            ds.InstanceNumber = k + 1
            ipp = origin + k * step
            ds.ImagePositionPatient = [_ds(float(v)) for v in ipp]
            ds.ImageOrientationPatient = [_ds(float(v)) for v in iop]
            ds.FrameOfReferenceUID = for_uid
            ds.PositionReferenceIndicator = ""
            ds.SliceLocation = _ds(float(ipp @ normal))
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = n_rows
            ds.Columns = n_cols
            ds.PixelSpacing = [_ds(float(v)) for v in pixel_spacing]
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1 if signed else 0
            ds.RescaleIntercept = _ds(intercept)
            ds.RescaleSlope = _ds(slope)
            ds.RescaleType = "HU"
            ds.WindowCenter = "40"
            ds.WindowWidth = "400"
            plane = vol[:, :, k].T.astype(np.float64)  # [row, column]
            stored = plane if signed else np.round((plane - intercept) / slope)
            ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
            name = f"{file_prefix}{k + 1:05d}.dcm"
            pydicom.dataset.validate_file_meta(ds.file_meta, enforce_standard=True)
            ds.save_as(tmp / name, enforce_file_format=True)
            files.append(out / name)
    return files
