"""DICOM CT input: a folder of DICOM files (searched recursively) or a zip of one -> a validated 3-D CT.

Like TotalSegmentator (which converts with dicom2nifti), the instances are split into series by
``SeriesInstanceUID`` and the CT series with the most images is used, unless ``series_uid`` names one.
The chosen series is validated with dicom2nifti's tolerances and a one-line :class:`InputError` for
anything that is not a regular volume: mixed image sizes or pixel spacings, slices with different
orientations (``ImageOrientationPatient`` beyond 1e-3), several images at one position (phases, echoes),
uneven slice spacing (a missing slice: increments must agree within 5 % + 0.1 mm) and gantry tilt
(slices stacked more than ~3 degrees off their normal).

Frames and axis order of the returned :class:`DicomImage3D` (an :class:`~ctpassport.io.nifti.Image3D`):

* ``data[i, j, k]`` is ``[column, row, slice]`` of the DICOM images: ``i`` runs along the row direction
  cosine (``ImageOrientationPatient[0:3]``), ``j`` along the column direction cosine
  (``ImageOrientationPatient[3:6]``), ``k`` over the slices sorted by position along their normal
  (an enhanced multi-frame image: ``k`` in the frame order of highdicom's volume, which can be the reverse
  of the single-frame sort of the same slices; the affine says so, so world positions agree either way);
  values are Hounsfield units (``RescaleSlope``/``RescaleIntercept`` applied);
* ``affine`` maps those voxel indices to **RAS+** world mm (DICOM's LPS+ patient coordinates with x and y
  negated). Spacing comes from ``PixelSpacing`` and the slice positions (``ImagePositionPatient``), never
  from ``SliceThickness``.

pydicom and highdicom are imported inside the functions (``import ctpassport`` stays cheap).
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import IO, Any

import nibabel as nib
import numpy as np

from ..errors import InputError
from ..types import Affine
from .nifti import Image3D, validate_affine

#: SOP classes of CT images (single-frame, enhanced multi-frame, legacy-converted enhanced).
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"

#: LPS+ (DICOM patient) <-> RAS+ (NIfTI world): negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# dicom2nifti's tolerances (common.validate_orientation / validate_slice_increment / orthogonality).
ORIENTATION_ATOL = 1e-3
INCREMENT_RTOL = 0.05
INCREMENT_ATOL_MM = 0.1
TILT_TOL = 0.05  # |unit slice direction - unit normal|, about 2.9 degrees
DUPLICATE_TOL_MM = 1e-3


@dataclass(frozen=True)
class DicomSource:
    """Where one DICOM instance lives: a file, or ``member`` of the zip archive ``path``."""

    path: Path
    member: str | None = None

    def __str__(self) -> str:
        return f"{self.path}:{self.member}" if self.member is not None else str(self.path)


@dataclass
class SeriesInfo:
    """The instances of one series (header-only datasets, unsorted) and its identifying tags."""

    series_uid: str
    modality: str | None
    description: str
    series_number: int | None
    instances: list[tuple[DicomSource, Any]] = field(default_factory=list)
    sop_uids: set[str] = field(default_factory=set, repr=False)

    @property
    def n_images(self) -> int:
        """Images (frames) in the series, localizers excluded."""
        return sum(_n_frames(ds) for _, ds in self.instances if not _is_localizer(ds))

    @property
    def is_ct(self) -> bool:
        return (self.modality or "").upper() == "CT"

    def summary(self) -> str:
        desc = f", {self.description!r}" if self.description else ""
        return f"{self.series_uid} ({self.modality or '?'}, {self.n_images} images{desc})"


@dataclass
class DicomMeta:
    """Study and series tags of a DICOM CT (no names or birth dates: identifiers only).

    ``study_date`` is ISO ``YYYY-MM-DD`` (``None`` when absent or malformed). ``source_sha256`` identifies
    the series: SHA-256 of its ``SeriesInstanceUID`` and sorted ``SOPInstanceUID`` s (globally unique UIDs,
    so it does not depend on file names, order, compression or the zip it came in).
    """

    patient_id: str | None
    study_uid: str | None
    study_date: str | None
    study_description: str | None
    accession_number: str | None
    modality: str | None
    series_uid: str
    series_number: int | None
    series_description: str | None
    frame_of_reference_uid: str | None
    manufacturer: str | None
    slice_thickness_mm: float | None
    n_slices: int
    source_sha256: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DicomImage3D(Image3D):
    """A CT read from DICOM: an :class:`Image3D` (see the module docstring for axes and frames) plus
    the series' tags and the header-only datasets of its images in ``data``'s slice order (``k``) -- or
    the one multi-frame dataset -- which DICOM SEG export references."""

    meta: DicomMeta | None = None
    datasets: list[Any] = field(default_factory=list)
    multiframe: bool = False


# ------------------------------------------------------------------------------------------------
# finding instances
# ------------------------------------------------------------------------------------------------
def is_dicom_file(path: str | Path) -> bool:
    """True when ``path`` is a file with the DICOM preamble (``DICM`` at byte 128)."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _is_hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in Path(name).parts)


def _read_header(fp: str | Path | IO[bytes], name: str | Path) -> Any | None:
    """The dataset without pixel data, or None when ``fp`` is not a DICOM instance we can use.

    Files without the 128-byte preamble and ``DICM`` marker (raw data sets, as some older archives store them;
    GDCM reads them too) are read when they parse as an image instance. A file with the marker whose header
    cannot be parsed, or any of whose values cannot be decoded, is an :class:`InputError` naming ``name``:
    skipping it would leave a gap (or a shorter volume) in its series."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
    except InvalidDicomError:  # no preamble: a raw data set, or not DICOM at all
        return _read_raw_header(fp)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a damaged header
        raise InputError(f"damaged DICOM header ({_short(exc)})", name) from None
    if "SOPInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
        return None  # DICOMDIR and other non-instance files
    try:
        _decode_values(ds)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"damaged DICOM header ({_short(exc)})", name) from None
    return ds


def _decode_values(ds: Any) -> None:
    """Decode every value of ``ds`` now (pydicom decodes them when first used, where a damaged one would raise
    anything, anywhere): what cannot be decoded raises here."""
    for elem in ds.iterall():
        _ = elem.value


def _read_raw_header(fp: str | Path | IO[bytes]) -> Any | None:
    import pydicom

    if not isinstance(fp, (str, Path)):
        fp.seek(0)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
        if not all(k in ds for k in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Rows")):
            return None
        _decode_values(ds)
    except Exception:  # noqa: BLE001 - not a data set: some other file
        return None
    return ds


def _short(exc: BaseException) -> str:
    text = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:120]}"


def iter_instances(path: str | Path) -> Iterator[tuple[DicomSource, Any]]:
    """Yield ``(source, header dataset)`` for every DICOM instance in a folder (recursively) or a zip.

    Hidden files and folders (``.*``, ``__MACOSX``) and files that are not DICOM are skipped.
    """
    p = Path(path)
    if p.is_dir():
        seen: set[Path] = set()
        for root, dirs, files in os.walk(p, followlinks=True):  # (linked folders too, once each: no loops)
            here = Path(root).resolve()
            if here in seen:
                dirs[:] = []
                continue
            seen.add(here)
            dirs[:] = sorted(d for d in dirs if not _is_hidden(d))
            for name in sorted(files):
                if _is_hidden(name) or name.upper() == "DICOMDIR":
                    continue
                f = Path(root) / name
                ds = _read_header(f, f)
                if ds is not None:
                    yield DicomSource(f), ds
        return
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"not a readable zip archive ({exc})", p) from None
    with zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            if info.is_dir() or _is_hidden(info.filename) or Path(info.filename).name.upper() == "DICOMDIR":
                continue
            try:
                with zf.open(info) as member:  # seekable stream: the pixel data is not decompressed
                    ds = _read_header(member, f"{p}:{info.filename}")
            except (zipfile.BadZipFile, EOFError) as exc:
                raise InputError(f"corrupt member {info.filename!r} in the zip archive ({exc})", p) from None
            if ds is not None:
                yield DicomSource(p, info.filename), ds


def _n_frames(ds: Any) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _is_localizer(ds: Any) -> bool:
    image_type = ds.get("ImageType", None)
    values = [str(v).upper() for v in image_type] if image_type is not None else []
    return "LOCALIZER" in values


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def scan_series(path: str | Path) -> list[SeriesInfo]:
    """Split the instances under ``path`` (folder or zip) into series.

    Ordered as they would be chosen: CT series first, then by number of images (descending), then UID.
    Raises :class:`InputError` when there is no DICOM instance at all.
    """
    p = Path(path)
    if not p.exists():
        raise InputError("no such file or folder", p)
    by_uid: dict[str, SeriesInfo] = {}
    for src, ds in iter_instances(p):
        uid = str(ds.SeriesInstanceUID)
        info = by_uid.get(uid)
        if info is None:
            modality = str(ds.get("Modality", "") or "") or None
            info = by_uid[uid] = SeriesInfo(uid, modality, str(ds.get("SeriesDescription", "") or ""),
                                            _as_int(ds.get("SeriesNumber", None)))
        sop = str(ds.SOPInstanceUID)
        if sop in info.sop_uids:  # the same instance twice (a copy in another folder): read once
            continue
        info.sop_uids.add(sop)
        info.instances.append((src, ds))
    if not by_uid:
        what = "folder" if p.is_dir() else "zip archive"
        raise InputError(f"this {what} holds no DICOM files", p, "expected a DICOM series (or a NIfTI file)")
    return sorted(by_uid.values(), key=lambda s: (not s.is_ct, -s.n_images, s.series_uid))


def choose_series(series: Sequence[SeriesInfo], path: str | Path, series_uid: str | None = None) -> SeriesInfo:
    """The series named by ``series_uid``, else the CT series with the most images (TotalSegmentator's
    choice). Raises :class:`InputError` listing the series found when none fits."""
    listing = "; ".join(s.summary() for s in series[:8]) + (" ..." if len(series) > 8 else "")
    if series_uid is not None:
        for s in series:
            if s.series_uid == series_uid:
                if not s.is_ct and s.modality is not None:
                    raise InputError(f"series {series_uid} is {s.modality}, not CT", path)
                return s
        raise InputError(f"no series with SeriesInstanceUID {series_uid}", path, f"found: {listing}")
    candidates = [s for s in series if (s.is_ct or s.modality is None) and s.n_images > 0]
    if not candidates:
        raise InputError("holds no CT series", path, f"found: {listing}")
    return candidates[0]


# ------------------------------------------------------------------------------------------------
# geometry and validation
# ------------------------------------------------------------------------------------------------
def _floats(ds: Any, keyword: str, n: int, where: str) -> np.ndarray:
    value = ds.get(keyword, None)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise InputError(f"image has a missing or malformed {keyword}", where,
                         "not a cross-sectional CT image with patient geometry")
    return arr


def _dim(ds: Any, keyword: str, where: str) -> int:
    value = ds.get(keyword, 0) or 0
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"image has a malformed {keyword} ({str(value)[:40]})", where) from None


def _fmt(v: Sequence[float]) -> str:
    return "[" + ", ".join(f"{x:.4g}" for x in v) + "]"


def stack_geometry(headers: Sequence[Any], where: str | Path) -> tuple[np.ndarray, Affine]:
    """Validate single-frame images as one regular volume; return (slice order, affine voxel -> LPS+ mm).

    The order sorts ``headers`` by position along the slice normal. The affine's columns are: column
    index ``i`` (row direction cosine x column spacing), row index ``j`` (column direction cosine x row
    spacing), slice index ``k`` (the mean slice increment vector), origin the first sorted slice's
    ``ImagePositionPatient`` (all mm, LPS+).
    """
    where = str(where)
    n = len(headers)
    sizes = {(_dim(h, "Rows", where), _dim(h, "Columns", where)) for h in headers}
    if len(sizes) > 1:
        raise InputError(f"the series mixes image sizes {sorted(sizes)} (rows, columns)", where,
                         "choose one stack with --series-uid or split the series")
    (rows, cols), = sizes
    if rows < 1 or cols < 1:
        raise InputError("images have no Rows/Columns", where)
    iops = np.stack([_floats(h, "ImageOrientationPatient", 6, where) for h in headers])
    spacings = np.stack([_floats(h, "PixelSpacing", 2, where) for h in headers])
    ipps = np.stack([_floats(h, "ImagePositionPatient", 3, where) for h in headers])
    if not np.allclose(iops, iops[0], rtol=ORIENTATION_ATOL, atol=ORIENTATION_ATOL):
        bad = int(np.argmax(np.abs(iops - iops[0]).max(axis=1)))
        raise InputError(
            f"slices have different orientations (ImageOrientationPatient {_fmt(iops[0])} and {_fmt(iops[bad])})",
            where, "the series mixes several stacks; choose one with --series-uid")
    r, c = iops[0, :3], iops[0, 3:]
    if abs(np.linalg.norm(r) - 1) > 1e-2 or abs(np.linalg.norm(c) - 1) > 1e-2 or abs(float(r @ c)) > 1e-2:
        raise InputError(f"ImageOrientationPatient {_fmt(iops[0])} is not two orthogonal unit vectors", where)
    r, c = r / np.linalg.norm(r), c / np.linalg.norm(c)
    if not np.allclose(spacings, spacings[0], rtol=1e-4, atol=1e-6) or np.any(spacings[0] <= 0):
        raise InputError(f"images have different or invalid PixelSpacing ({_fmt(spacings[0])} ...)", where)
    if n < 2:
        raise InputError("the series has a single image, not a volume", where, "a CT series needs several slices")
    normal = np.cross(r, c)
    dist = ipps @ normal
    order = np.argsort(dist, kind="stable")
    d_sorted = dist[order]
    gaps = np.diff(d_sorted)
    if np.any(gaps < DUPLICATE_TOL_MM):
        k = int(np.argmax(gaps < DUPLICATE_TOL_MM))
        n_dup = int(np.count_nonzero(gaps < DUPLICATE_TOL_MM))
        raise InputError(
            f"{n_dup} image(s) repeat the slice position of another (e.g. at {_fmt(ipps[order[k]])} mm)",
            where, "several acquisitions, phases or echoes in one series; choose or split them")
    step = _regular_step(ipps[order], normal, where)
    affine = np.eye(4)
    affine[:3, 0] = r * spacings[0][1]  # along a row: next column, spaced by PixelSpacing[1]
    affine[:3, 1] = c * spacings[0][0]  # down a column: next row, spaced by PixelSpacing[0]
    affine[:3, 2] = step
    affine[:3, 3] = ipps[order[0]]
    return order, affine


def _regular_step(pos: np.ndarray, normal: np.ndarray, where: str) -> np.ndarray:
    """The mean slice increment (LPS+ mm) of slice positions ``pos`` sorted along the slice normal; an
    :class:`InputError` when the increments are uneven (missing slices, mixed stacks) or step more than
    :data:`TILT_TOL` off the normal (gantry tilt)."""
    n = len(pos)
    incs = np.diff(pos, axis=0)
    ref = np.median(incs, axis=0)
    dev = np.linalg.norm(incs - ref, axis=1)
    tol = INCREMENT_ATOL_MM + INCREMENT_RTOL * float(np.linalg.norm(ref))
    if np.any(dev > tol):
        k = int(np.argmax(dev))
        raise InputError(
            f"uneven slice spacing: {np.linalg.norm(incs[k]):.3f} mm between slices {k} and {k + 1} "
            f"(at {_fmt(pos[k])} and {_fmt(pos[k + 1])} mm) where the series' spacing is "
            f"{np.linalg.norm(ref):.3f} mm", where, "slices are missing or the series mixes stacks")
    step = (pos[-1] - pos[0]) / (n - 1)
    tilt = float(np.linalg.norm(step / np.linalg.norm(step) - normal))
    if tilt > TILT_TOL:
        angle = float(np.degrees(np.arccos(np.clip(step @ normal / np.linalg.norm(step), -1, 1))))
        raise InputError(f"slices are stacked {angle:.1f} degrees off their normal (gantry tilt)", where,
                         "resample the series to an orthogonal grid first (e.g. dcm2niix)")
    return step


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def _with_transfer_syntax(ds: Any) -> Any:
    """A raw data set (no file meta) gets the uncompressed transfer syntax it was read with, so that its pixel
    data can be decoded."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return ds
    implicit, little = ds.original_encoding
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


class _Opener:
    """Open instance files, keeping one zip archive open while a series is read."""

    def __init__(self) -> None:
        self._zips: dict[Path, zipfile.ZipFile] = {}

    def read(self, src: DicomSource) -> Any:
        import pydicom

        # (force: a raw data set without preamble was accepted as an instance when the headers were read)
        if src.member is None:
            return _with_transfer_syntax(pydicom.dcmread(src.path, force=True))
        zf = self._zips.get(src.path)
        if zf is None:
            zf = self._zips[src.path] = zipfile.ZipFile(src.path)
        return _with_transfer_syntax(pydicom.dcmread(io.BytesIO(zf.read(src.member)), force=True))

    def close(self) -> None:
        for zf in self._zips.values():
            zf.close()
        self._zips.clear()


def _pixel_hu(ds: Any, src: DicomSource) -> tuple[np.ndarray, bool]:
    """Stored pixels -> modality values (HU for CT); second value: the mapping was integral."""
    from pydicom.pixels import apply_modality_lut

    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for undecodable pixel data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts))
        raise InputError(f"cannot decode the pixel data ({name}): {str(exc).splitlines()[0][:160]}", str(src),
                         "compressed DICOM needs pylibjpeg/gdcm plugins; or decompress it first") from None
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    inter = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    integral = slope == 1.0 and inter == round(inter) and "ModalityLUTSequence" not in ds
    if integral:
        return arr.astype(np.int32) + int(inter), True
    return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64), False


def _compact(data: np.ndarray, integral: bool) -> np.ndarray:
    if not integral:
        return data.astype(np.float32)
    lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
    if np.iinfo(np.int16).min <= lo and hi <= np.iinfo(np.int16).max:
        return data.astype(np.int16)
    return data.astype(np.int32)


def _nifti_header(data: np.ndarray, affine_ras: Affine, description: str) -> nib.Nifti1Header:
    img = nib.Nifti1Image(data, affine_ras)
    img.set_sform(affine_ras, code=1)  # scanner anatomical
    img.set_qform(affine_ras, code=1)
    hdr = img.header
    hdr.set_xyzt_units("mm", "sec")
    hdr["descrip"] = description.encode("ascii", "replace")[:79]
    return hdr


def _date_iso(value: Any) -> str | None:
    s = str(value or "").strip()
    if len(s) >= 8 and s[:8].isdigit():
        try:
            return date(int(s[:4]), int(s[4:6]), int(s[6:8])).isoformat()
        except ValueError:
            return None
    return None


def _text(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword, None)
    s = str(value).strip() if value is not None else ""
    return s or None


def series_sha256(series_uid: str, sop_instance_uids: Sequence[str]) -> str:
    """Identity hash of a DICOM series: SHA-256 of its UID and its sorted SOP instance UIDs (hex)."""
    h = hashlib.sha256(f"dicom-series:{series_uid}".encode())
    for uid in sorted(str(u) for u in sop_instance_uids):
        h.update(b"\n" + uid.encode())
    return h.hexdigest()


def _meta(series: SeriesInfo, first: Any, n_slices: int, sop_uids: Sequence[str]) -> DicomMeta:
    thickness = first.get("SliceThickness", None)
    try:
        thickness_mm = float(thickness) if thickness not in (None, "") else None
    except (TypeError, ValueError):
        thickness_mm = None
    return DicomMeta(
        patient_id=_text(first, "PatientID"), study_uid=_text(first, "StudyInstanceUID"),
        study_date=_date_iso(first.get("StudyDate", None)), study_description=_text(first, "StudyDescription"),
        accession_number=_text(first, "AccessionNumber"), modality=series.modality,
        series_uid=series.series_uid, series_number=series.series_number,
        series_description=series.description or None,
        frame_of_reference_uid=_text(first, "FrameOfReferenceUID"), manufacturer=_text(first, "Manufacturer"),
        slice_thickness_mm=thickness_mm, n_slices=n_slices,
        source_sha256=series_sha256(series.series_uid, sop_uids),
    )


#: At most this many images of a series may lie in another orientation than the rest and be left out as scouts.
MAX_STRAY_IMAGES = 3


def _volume_images(series: SeriesInfo) -> list[tuple[DicomSource, Any]]:
    """The series' images that make the volume: localizers (ImageType LOCALIZER) left out, and, as dicom2nifti
    (TotalSegmentator's reader) does, up to :data:`MAX_STRAY_IMAGES` images whose orientation differs from all
    the others' (scouts without that type); more are a mixed series (:func:`stack_geometry` refuses it)."""
    images = [(s, ds) for s, ds in series.instances if not _is_localizer(ds)]
    groups: dict[tuple[float, ...], list[int]] = {}
    for k, (_, ds) in enumerate(images):
        try:
            key = tuple(round(float(v), 3) for v in ds.get("ImageOrientationPatient", None) or ())
        except (TypeError, ValueError):
            key = ()
        groups.setdefault(key, []).append(k)
    if len(groups) < 2:
        return images
    main = max(groups.values(), key=len)
    if len(images) - len(main) > MAX_STRAY_IMAGES or len(main) < 2 * (len(images) - len(main)) + 2:
        return images
    return [images[k] for k in main]


def dicom_metadata(path: str | Path, series_uid: str | None = None) -> DicomMeta:
    """Study/series tags of the series :func:`read_dicom_ct` would read (headers only, no pixel data)."""
    series = choose_series(scan_series(path), path, series_uid)
    images = _volume_images(series)
    return _meta(series, images[0][1], sum(_n_frames(ds) for _, ds in images),
                 [str(ds.SOPInstanceUID) for _, ds in images])


def read_dicom_ct(path: str | Path, series_uid: str | None = None) -> DicomImage3D:
    """Read one CT series from a DICOM folder or zip (see the module docstring for axes and frames).

    Raises :class:`InputError` (one line, naming the folder or file) for no DICOM, no CT series, an
    unknown ``series_uid``, irregular geometry, or undecodable pixel data.
    """
    p = Path(path)
    series = choose_series(scan_series(p), p, series_uid)
    images = _volume_images(series)
    if not images:
        raise InputError(f"series {series.series_uid} holds only localizer images", p)
    if len(images) == 1 and _n_frames(images[0][1]) > 1:
        return _read_multiframe(p, series, images[0])
    if any(_n_frames(ds) > 1 for _, ds in images):
        raise InputError(f"series {series.series_uid} mixes several multi-frame images", p,
                         "expected single-frame slices or one enhanced CT image")
    headers = [ds for _, ds in images]
    order, affine_lps = stack_geometry(headers, p)
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    data = np.empty((cols, rows, len(order)), dtype=np.float64)
    integral_all = True
    opener = _Opener()
    try:
        for k, idx in enumerate(order):
            src = images[int(idx)][0]
            try:
                ds = opener.read(src)
            except Exception as exc:  # noqa: BLE001 - truncated/corrupt file found while reading pixels
                raise InputError(f"cannot read DICOM file ({type(exc).__name__}: {str(exc)[:120]})",
                                 str(src)) from None
            hu, integral = _pixel_hu(ds, src)
            if hu.shape != (rows, cols):
                raise InputError(f"pixel data has shape {hu.shape}, expected ({rows}, {cols})", str(src))
            data[:, :, k] = hu.T
            integral_all &= integral
    finally:
        opener.close()
    vol = _compact(data, integral_all)
    affine_ras = validate_affine(LPS_TO_RAS @ affine_lps, p)
    sorted_headers = [headers[int(i)] for i in order]
    meta = _meta(series, sorted_headers[0], len(order), [str(h.SOPInstanceUID) for h in headers])
    return DicomImage3D(data=vol, affine=affine_ras, header=_nifti_header(vol, affine_ras, f"DICOM {series.series_uid}"),
                        path=p, meta=meta, datasets=sorted_headers, multiframe=False)


def _frame_positions_affine(ds: Any, affine_lps: np.ndarray, n_slices: int, where: str) -> np.ndarray:
    """highdicom's volume affine of an enhanced CT (``[column, row, slice]`` -> LPS+ mm), checked against the
    frames' own ImagePositionPatient: highdicom steps along the slice normal, so a stack with gantry tilt
    (frames stepping off their normal) gets the frames' mean step instead, as single-frame series do (up to
    :data:`TILT_TOL`; more is refused like theirs)."""
    try:
        groups = ds.PerFrameFunctionalGroupsSequence
        pos = np.asarray([[float(v) for v in g.PlanePositionSequence[0].ImagePositionPatient] for g in groups],
                         dtype=np.float64)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return affine_lps  # positions not per frame: nothing to check them against
    if pos.ndim != 2 or pos.shape[1] != 3 or not np.all(np.isfinite(pos)):
        return affine_lps
    step = affine_lps[:3, 2]
    normal = step / np.linalg.norm(step)
    pos = pos[np.argsort(pos @ normal, kind="stable")]
    keep = np.concatenate([[True], np.linalg.norm(np.diff(pos, axis=0), axis=1) > DUPLICATE_TOL_MM])
    pos = pos[keep]  # (several frames per position: e.g. temporal positions)
    predicted = affine_lps[:3, 3] + np.arange(n_slices)[:, None] * step
    if len(pos) != n_slices or float(np.abs(pos - predicted).max()) <= 0.01:
        return affine_lps
    out = affine_lps.copy()
    out[:3, 2] = _regular_step(pos, normal, where)
    out[:3, 3] = pos[0]
    return out


def _read_multiframe(p: Path, series: SeriesInfo, image: tuple[DicomSource, Any]) -> DicomImage3D:
    """An enhanced (multi-frame) CT image, read and validated by highdicom's volume API."""
    import highdicom as hd

    src, header = image
    opener = _Opener()
    try:
        ds = opener.read(src)
    finally:
        opener.close()
    try:
        vol = hd.Image.from_dataset(ds, copy=False).get_volume(dtype=np.float64)
    except (ValueError, RuntimeError, AttributeError, KeyError) as exc:
        raise InputError(f"multi-frame image is not a regular volume ({str(exc).splitlines()[0][:160]})",
                         str(src)) from None
    arr = np.asarray(vol.array)
    if arr.ndim != 3:
        raise InputError(f"multi-frame image has {arr.ndim}-D pixel data, expected 3-D", str(src))
    # highdicom: array [slice, row, column], affine -> LPS+ mm; ours: [column, row, slice].
    affine_lps = _frame_positions_affine(ds, np.asarray(vol.affine, dtype=np.float64)[:, [2, 1, 0, 3]],
                                         arr.shape[0], str(src))
    data = np.ascontiguousarray(arr.transpose(2, 1, 0))
    integral = bool(np.all(data == np.round(data)))
    out = _compact(data, integral)
    affine_ras = validate_affine(LPS_TO_RAS @ affine_lps, p)
    meta = _meta(series, header, out.shape[2], [str(header.SOPInstanceUID)])
    return DicomImage3D(data=out, affine=affine_ras, header=_nifti_header(out, affine_ras, f"DICOM {series.series_uid}"),
                        path=p, meta=meta, datasets=[header], multiframe=True)
