"""NIfTI reading and writing with validation, fast gzip (ISA-L) and atomic writes.

Axis order: arrays are returned in the file's storage order ``[i, j, k]`` (nibabel's order); the affine
maps voxel indices to RAS+ world millimetres.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from ..errors import InputError
from ..types import Affine
from .atomic import atomic_path

#: Accepted voxel sizes (mm). Anything outside is a broken header, not a CT.
MIN_SPACING_MM = 0.01
MAX_SPACING_MM = 100.0


@dataclass
class Image3D:
    """A validated 3-D image: ``data[i, j, k]`` in storage order, ``affine`` voxel -> RAS+ mm."""

    data: np.ndarray
    affine: Affine
    header: nib.Nifti1Header
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (voxels) in storage order ``[i, j, k]``."""
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array axes (column norms of the affine)."""
        return tuple(float(v) for v in spacing_from_affine(self.affine))  # type: ignore[return-value]


def spacing_from_affine(affine: Affine) -> np.ndarray:
    """Voxel size (mm) per array axis: the norms of the affine's first three columns (float64)."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            from isal import igzip

            return igzip.decompress(raw)
        except ImportError:  # pragma: no cover - isal is a core dependency
            return gzip.decompress(raw)
        except Exception as exc:  # noqa: BLE001 - isal/zlib/EOF errors all mean a corrupt stream
            raise InputError(f"corrupt gzip data ({str(exc).splitlines()[0][:100]})", path) from None
    if path.name.endswith(".gz"):
        raise InputError("named .gz but is not gzip-compressed", path)
    return raw


@contextmanager
def _nibabel_logs_off() -> Iterator[None]:
    """Silence nibabel's header-check log lines (printed to stderr even under ``-q``); problems that matter
    are turned into :class:`InputError` by the checks after reading."""
    logger = logging.getLogger("nibabel.global")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_nifti(path: str | Path) -> nib.Nifti1Image | nib.Nifti2Image:
    """Read a NIfTI-1/2 file (``.nii`` or ``.nii.gz``) fully into memory.

    Raises :class:`InputError` with a one-line reason for a missing, unreadable or non-NIfTI file.
    """
    p = Path(path)
    if not p.exists():
        raise InputError("no such file", p)
    if p.is_dir():
        raise InputError("is a folder, expected a NIfTI file (.nii or .nii.gz)", p)
    raw = _read_bytes(p)
    klass = _nifti_class(raw)
    if klass is None:
        raise InputError("not a NIfTI image (no NIfTI-1/2 header magic)", p)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"), _nibabel_logs_off():
            # nibabel warns (and logs) about odd headers; the checks below turn real problems into errors.
            warnings.simplefilter("ignore")
            img = klass.from_bytes(raw)
            _ = img.affine
            as_stored = klass.header_class.from_fileobj(io.BytesIO(raw), check=False)  # before nibabel's fixes
    except (ImageFileError, HeaderDataError, ValueError, EOFError, OSError) as exc:
        raise InputError(f"not a readable NIfTI image ({str(exc).splitlines()[0][:120]})", p) from None
    offset = max(int(as_stored.get_data_offset()), int(as_stored.sizeof_hdr))
    declared = offset + math.prod(int(n) for n in img.shape) * img.get_data_dtype().itemsize
    if declared > len(raw):  # checked before any allocation: a header may claim terabytes
        raise InputError(f"holds {len(raw)} bytes but its header declares {declared} (shape {img.shape}, "
                         f"{img.get_data_dtype()}): truncated file or wrong dimensions", p)
    if int(as_stored["sform_code"]) == 0 and int(as_stored["qform_code"]) == 0:
        # No sform/qform: the voxel size comes from pixdim alone, and nibabel silently turns a 0 into 1 mm.
        ndim = max(1, min(3, int(as_stored["dim"][0])))
        pixdim = np.asarray(as_stored["pixdim"][1:1 + ndim], dtype=np.float64)
        if not np.all(np.isfinite(pixdim) & (pixdim != 0)):
            raise InputError(f"has no sform or qform and voxel sizes {tuple(pixdim.tolist())} in pixdim: its "
                             "spacing is unknown", p, "write the voxel size (mm) into the header")
    return img


def nifti_header_shape(path: str | Path) -> tuple[int, ...] | None:
    """The data shape a NIfTI file's header declares (voxels, in stored axis order), read from the file's first
    bytes only (a ``.nii.gz`` is decompressed just that far): to refuse a file that is too large before its
    voxels are read. None when the file is not a readable NIfTI (:func:`load_nifti` says why)."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            gz = fh.read(2) == b"\x1f\x8b"
        with (gzip.open(p, "rb") if gz else p.open("rb")) as fh:
            raw = fh.read(540)
        klass = _nifti_class(raw)
        if klass is None:
            return None
        with _nibabel_logs_off():
            hdr = klass.header_class.from_fileobj(io.BytesIO(raw), check=False)
        return tuple(int(n) for n in hdr.get_data_shape())
    except (OSError, EOFError, zlib.error, ValueError, HeaderDataError):
        return None


def _nifti_class(raw: bytes) -> type[nib.Nifti1Image | nib.Nifti2Image] | None:
    """NIfTI-1 or NIfTI-2 from ``sizeof_hdr`` and the magic string; None for anything else."""
    for order in ("<", ">"):
        if len(raw) >= 348 and int(np.frombuffer(raw[:4], dtype=f"{order}i4")[0]) == 348 \
                and raw[344:347] in (b"n+1", b"ni1"):
            return nib.Nifti1Image
        if len(raw) >= 540 and int(np.frombuffer(raw[:4], dtype=f"{order}i4")[0]) == 540 \
                and raw[4:7] in (b"n+2", b"ni2"):
            return nib.Nifti2Image
    return None


def _squeeze_to_3d(data_shape: tuple[int, ...], path: Path | None) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in data_shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise InputError(
            f"is {len(shape)}-D with shape {shape}, expected a 3-D volume", path,
            "select one 3-D volume first" if len(shape) > 3 else None,
        )
    if min(shape) < 1:
        raise InputError(f"has an empty axis (shape {shape})", path)
    return shape


def validate_affine(affine: np.ndarray, path: Path | None = None) -> Affine:
    """Check that a 4x4 affine (voxel -> RAS+ mm) is finite and invertible with plausible voxel sizes
    (:data:`MIN_SPACING_MM` to :data:`MAX_SPACING_MM` mm per array axis); return it as float64."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise InputError("has a non-finite or malformed affine", path)
    sp = spacing_from_affine(a)
    if np.any(sp < MIN_SPACING_MM) or np.any(sp > MAX_SPACING_MM):
        raise InputError(
            f"has an implausible voxel spacing {tuple(round(float(s), 6) for s in sp)} mm",
            path, f"expected {MIN_SPACING_MM} to {MAX_SPACING_MM} mm per axis; fix the header",
        )
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise InputError("has a singular affine (axes are not independent)", path)
    return a


def read_image(path: str | Path, *, dtype: type | None = None, kind: str = "image") -> Image3D:
    """Load and validate a 3-D NIfTI image.

    * ``data``: storage order ``[i, j, k]``. Integer data without scaling keeps its dtype (saves memory);
      scaled or float data becomes float32 unless ``dtype`` is given.
    * ``affine``: voxel -> RAS+ mm (nibabel's best affine: sform, else qform).

    Raises :class:`InputError` for 2-D/4-D images, NaN/inf voxels, implausible spacing, bad headers.
    """
    p = Path(path)
    img = load_nifti(p)
    shape = _squeeze_to_3d(img.shape, p)
    affine = validate_affine(img.affine, p)
    raw_dtype = img.get_data_dtype()
    if raw_dtype.kind not in "iuf":
        what = "RGB/structured" if raw_dtype.kind == "V" else "complex" if raw_dtype.kind == "c" else "non-numeric"
        raise InputError(f"has {what} voxels ({raw_dtype}); expected one real number per voxel", p)
    try:
        proxy = img.dataobj
        slope = getattr(proxy, "slope", 1.0)
        inter = getattr(proxy, "inter", 0.0)
        if dtype is None and np.issubdtype(raw_dtype, np.integer) and slope == 1.0 and inter == 0.0:
            data = np.asanyarray(proxy)
        else:
            data = np.asarray(img.get_fdata(dtype=np.float32) if dtype is None else np.asanyarray(proxy))
        if dtype is not None:
            data = data.astype(dtype, copy=False)
    except (ValueError, EOFError, OSError, zlib.error) as exc:
        raise InputError(f"cannot read voxel data ({exc})", p) from None
    data = data.reshape(shape)
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        n = int(np.count_nonzero(~np.isfinite(data)))
        raise InputError(f"has {n} NaN or infinite voxels", p, f"fix the {kind} or replace them first")
    # outputs are NIfTI-1: a NIfTI-2 input's header (a Nifti1Image subclass) is converted, not copied
    if type(img) is nib.Nifti1Image:
        header = img.header.copy()
    else:
        with _nibabel_logs_off():  # nibabel notes the converted sizeof_hdr (540 -> 348)
            header = nib.Nifti1Header.from_header(img.header)
    return Image3D(data=data, affine=affine, header=header, path=p)


def make_nifti(data: np.ndarray, affine: Affine, header: nib.Nifti1Header | None = None,
               dtype: type | np.dtype | None = None) -> nib.Nifti1Image:
    """Build a NIfTI-1 image of ``data`` (storage order ``[i, j, k]``) with ``affine`` (voxel -> RAS+ mm) and
    optionally a copy of ``header``.

    With a header (e.g. the input's), its geometry codes, units and description are kept, the data type
    is set to ``dtype`` (default: the array's) and any intensity scaling is removed. When ``affine`` is the
    header's own (an output on the input's grid), its sform and qform are kept as they are, as nibabel and
    TotalSegmentator keep them (a qform that differs from the sform survives; an input with neither stays
    without, so that readers which disagree on an uncoded image's geometry still overlay input and output);
    else both are set to ``affine``.
    """
    hdr = header.copy() if header is not None else None
    if hdr is not None:
        hdr.set_data_dtype(dtype or data.dtype)
        hdr.set_slope_inter(None, None)
        hdr.extensions.clear()
    img = nib.Nifti1Image(data, affine, hdr)
    if dtype is not None:
        img.set_data_dtype(dtype)
    if header is not None:
        sform_code = int(header["sform_code"])
        qform_code = int(header["qform_code"])
        if not np.allclose(header.get_best_affine(), affine, rtol=0, atol=1e-5):
            img.set_sform(affine, code=sform_code if sform_code > 0 else 1)
            img.set_qform(affine, code=qform_code if qform_code > 0 else 1)
        elif sform_code == 0 and qform_code == 0:
            # an uncoded input (no sform, no qform): every reader falls back to its own default geometry
            # (nibabel's centred LAS, ITK's origin 0 and identity directions); an output left uncoded like
            # its input overlays it in each of them, as TotalSegmentator's copied header does
            img.header.set_sform(None, code=0)
            img.header.set_qform(None, code=0)
    return img


def nifti_bytes(img: nib.Nifti1Image, compress: bool) -> bytes:
    """Serialise an image; gzip with ISA-L (level 1, like nibabel's default) when ``compress``."""
    raw = img.to_bytes()
    if not compress:
        return raw
    try:
        from isal import igzip

        return igzip.compress(raw, compresslevel=1)
    except ImportError:  # pragma: no cover
        return gzip.compress(raw, compresslevel=1)


def save_nifti(img: nib.Nifti1Image, path: str | Path) -> Path:
    """Write ``img`` atomically; ``.nii.gz`` is gzip-compressed (ISA-L), ``.nii`` is not."""
    p = Path(path)
    if not (p.name.endswith(".nii") or p.name.endswith(".nii.gz")):
        raise InputError("output name must end with .nii or .nii.gz", p)
    blob = nifti_bytes(img, compress=p.name.endswith(".gz"))
    with atomic_path(p) as tmp:
        tmp.write_bytes(blob)
    return p
