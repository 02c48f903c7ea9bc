"""The web app's logic without Streamlit: loading studies, checks, model choice, segmentation, organ tables.

Everything here is plain Python (testable without a browser); :mod:`ctpassport.app.streamlit_app` only lays
out widgets and calls these functions. Frames and units: images are :class:`~ctpassport.io.nifti.Image3D`
(``data[i, j, k]`` in the file's storage order, HU; ``affine`` voxel -> RAS+ world mm); organ volumes are
millilitres (1 ml = 1000 mm^3); mean HU are Hounsfield units.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import CTPassportError, InputError, ModelError
from ..io.nifti import Image3D
from .workspace import Workspace, safe_name

#: Default upload limit of ``ctpassport app`` in MB (Streamlit's own default is 200 MB).
DEFAULT_MAX_UPLOAD_MB = 4096
#: Largest volume the app accepts (voxels): about 1.4 GB of float32 per copy.
MAX_VOXELS = 350_000_000
#: A CT in Hounsfield units holds air (-1000 HU) or fat (about -100 HU): its minimum lies below this value (HU).
#: A crop inside the body (fat, no air) passes; raw or normalised MR (z-scores above -10) does not.
CT_MIN_BELOW_HU = -50.0
#: Upload names the app accepts.
UPLOAD_TYPES = ("nii", "nii.gz", "gz", "zip")
#: Environment variable naming a model folder for the app (a trainer folder or a TotalSegmentator home).
MODEL_ENV = "CTPASSPORT_APP_MODEL"


# ------------------------------------------------------------------------------------------------
# studies
# ------------------------------------------------------------------------------------------------
@dataclass
class Study:
    """One loaded CT, ready to segment.

    ``image``: the CT (HU, storage order, affine voxel -> RAS+ mm). ``source``: ``upload`` | ``demo`` |
    ``server``. ``path``: the file or folder it came from (uploads live in the session workspace).
    ``truth_labels``: reference labels on the image grid when known (phantoms). ``truth``: extra known facts,
    e.g. a phantom follow-up's true transform (``truth["transform"]``).
    """

    name: str
    source: str
    image: Image3D
    path: Path | None = None
    truth_labels: np.ndarray | None = None
    truth: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None  # workspace folder owned by this study (removed when it is replaced)

    @property
    def summary(self) -> str:
        """``shape @ spacing`` and the orientation codes, e.g. ``512x512x281 voxels @ 0.7031x0.7031x1.25 mm, LPS``
        (voxel sizes to 4 significant digits)."""
        from ..io.orientation import axcodes

        sh = "x".join(str(s) for s in self.image.shape)
        sp = "x".join(f"{s:.4g}" for s in self.image.spacing)
        return f"{sh} voxels @ {sp} mm, {''.join(axcodes(self.image.affine))}"


def _relabel(exc: CTPassportError, name: str) -> InputError:
    """The same problem, named after the user's file instead of the server-side temporary path."""
    return InputError(exc.problem, name, exc.hint)


def check_ct(image: Image3D, name: str) -> None:
    """Refuse images that are not a CT volume in Hounsfield units (one-line :class:`InputError`).

    * a single slice along some axis (a 2-D image stored as 3-D);
    * more than :data:`MAX_VOXELS` voxels;
    * integer data in 0..255 with few values (a label map or a mask, not a CT);
    * no value below :data:`CT_MIN_BELOW_HU` HU (no air or fat: MR, PET, a normalised or unscaled image).
    """
    shape = image.shape
    if min(shape) < 2:
        raise InputError(f"is a single slice (shape {shape}), expected a 3-D CT volume", name)
    n = int(np.prod(shape))
    _check_voxels(n, name)
    data = image.data
    sample = data.ravel()[:: max(1, n // 2_000_000)]
    lo, hi = float(sample.min()), float(sample.max())
    lo = min(lo, float(data.min())) if lo > CT_MIN_BELOW_HU else lo
    if data.dtype.kind in "biu" and lo >= 0 and hi <= 255 and np.unique(sample).size <= 256:
        raise InputError(
            "looks like a label map or a mask (small non-negative integers), not a CT",
            name,
            "upload the CT image itself",
        )
    if lo > CT_MIN_BELOW_HU:
        raise InputError(
            f"does not look like a CT in Hounsfield units: no voxel below {CT_MIN_BELOW_HU:.0f} HU "
            f"(values {lo:.4g} to {hi:.4g})",
            name,
            "expected air around -1000 HU and fat around -100 HU; MR or normalised images do not work",
        )


def _check_voxels(n: int, name: str) -> None:
    if n > MAX_VOXELS:
        raise InputError(
            f"is too large: {n / 1e6:.0f} M voxels (the app accepts up to {MAX_VOXELS / 1e6:.0f} M)",
            name,
            "crop or downsample it, or use `ctpassport segment` on the command line",
        )


def upload_kind(name: str) -> str:
    """``nifti`` or ``zip`` from an upload's file name; :class:`InputError` for anything else."""
    low = name.lower()
    if low.endswith((".nii", ".nii.gz")):
        return "nifti"
    if low.endswith(".zip"):
        return "zip"
    raise InputError(
        "is not a NIfTI file (.nii, .nii.gz) or a zip of a DICOM series", name, "upload one of those"
    )


def load_upload(
    name: str, data: bytes | BinaryIO, workspace: Workspace, *, max_bytes: int | None = None
) -> Study:
    """Store an uploaded file in the session workspace, load and validate it as a CT.

    ``name``: the browser's file name; ``data``: its bytes or a binary file object (copied in chunks, so a
    large upload is not held twice in memory). NIfTI (``.nii``, ``.nii.gz``) or a zip of a DICOM series.
    Raises :class:`InputError` naming the upload (never the temporary path); on any error the stored file
    is removed.
    """
    size = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else _stream_size(data)
    if size == 0:
        raise InputError("is empty (0 bytes)", name)
    if max_bytes is not None and size > max_bytes:
        raise InputError(
            f"is too large: {size / 2**20:.0f} MB, over the upload limit of {max_bytes / 2**20:.0f} MB",
            name,
            "restart the app with a larger --max-upload-mb",
        )
    kind = upload_kind(name)
    with workspace.run_folder("upload") as folder:
        path = folder / safe_name(name, "upload.nii.gz" if kind == "nifti" else "upload.zip")
        with path.open("wb") as fh:
            if isinstance(data, (bytes, bytearray, memoryview)):
                fh.write(data)
            else:
                data.seek(0)
                shutil.copyfileobj(data, fh, length=1 << 22)
        study = load_path(path, display_name=name, source="upload")
        study.folder = folder
    return study


def _stream_size(f: BinaryIO) -> int:
    pos = f.tell()
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(pos)
    return size


def load_path(path: str | Path, *, display_name: str | None = None, source: str = "server") -> Study:
    """Load a NIfTI file, DICOM folder or DICOM zip with :func:`ctpassport.io.load.load_ct` and check it is a CT.

    Errors name ``display_name`` (default: the path) in one line.
    """
    from ..io.load import is_nifti_name, load_ct
    from ..io.nifti import nifti_header_shape

    p = Path(path)
    name = display_name or str(p)
    declared = nifti_header_shape(p) if p.is_file() and is_nifti_name(p) else None
    if declared:  # refused from the header, before a small compressed file decompresses to gigabytes
        _check_voxels(math.prod(declared), name)
    try:
        image = load_ct(p)
    except CTPassportError as exc:
        raise _relabel(exc, name) from None
    except MemoryError:
        raise InputError("does not fit in memory", name) from None
    check_ct(image, name)
    return Study(name=name, source=source, image=image, path=p)


# ------------------------------------------------------------------------------------------------
# files on the server (only under the configured root)
# ------------------------------------------------------------------------------------------------
def resolve_under_root(root: str | Path, relative: str | Path) -> Path:
    """``root / relative`` resolved (symlinks followed); :class:`InputError` when it lies outside ``root``."""
    base = Path(root).resolve()
    target = (base / relative).resolve()
    try:
        target.relative_to(base)
    except ValueError:
        raise InputError(
            "is outside the folder the app may read", str(relative), f"choose a file under {base}"
        ) from None
    if not target.exists():
        raise InputError("no such file or folder", str(relative))
    return target


def server_studies(root: str | Path, *, max_entries: int = 500, max_depth: int = 4) -> list[str]:
    """CT inputs under ``root`` as paths relative to it: NIfTI files, zips, and folders holding DICOM files.

    Hidden files and folders are skipped; at most ``max_entries`` entries, ``max_depth`` folder levels.
    """
    from ..io.dicom import is_dicom_file
    from ..io.load import is_nifti_name

    base = Path(root).resolve()
    found: list[str] = []
    if not base.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(base):
        d = Path(dirpath)
        depth = len(d.relative_to(base).parts)
        dirnames[:] = sorted(x for x in dirnames if not x.startswith(".")) if depth < max_depth else []
        files = sorted(f for f in filenames if not f.startswith("."))
        dicom_here = False
        for f in files:
            if is_nifti_name(f) or f.lower().endswith(".zip"):
                found.append(str((d / f).relative_to(base)))
            elif not dicom_here and is_dicom_file(d / f):
                dicom_here = True
        if dicom_here:  # (the root itself, when it is a series folder: "./")
            found.append(str(d.relative_to(base)) + "/")
        if len(found) >= max_entries:
            break
    return sorted(found)[:max_entries]


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelChoice:
    """The model folder the app uses and where it came from (``configured`` | ``installed`` | ``demo``)."""

    path: Path
    kind: str

    @property
    def description(self) -> str:
        return {
            "configured": "configured model",
            "installed": "TotalSegmentator fast-model weights",
            "demo": "ctpassport demo model (trained on phantoms; a demo, not for patients)",
        }[self.kind]


def demo_model_dir() -> Path | None:
    """The project's own demo model folder (:func:`ctpassport.model.demo.demo_model_dir`), None while it is
    missing or incomplete."""
    try:
        from ..model.demo import demo_model_dir as shipped
    except ImportError:
        return None
    try:
        return shipped()
    except ModelError:
        return None


NO_MODEL_HELP = (
    "No segmentation model found. Install TotalSegmentator's fast-model weights "
    "(`pip install TotalSegmentator` then `totalseg_download_weights -t total_fast`), or point the app at a "
    f"model folder with `ctpassport app --model PATH` (or ${MODEL_ENV}=PATH); `ctpassport model standin -o HOME` "
    "makes random stand-in weights for trying the app out (their labels are meaningless)."
)


def choose_model(explicit: str | Path | None = None, environ: dict[str, str] | None = None) -> ModelChoice:
    """Pick the model: ``explicit`` (or ``$CTPASSPORT_APP_MODEL``), else installed TotalSegmentator weights,
    else the demo model; :class:`ModelError` with :data:`NO_MODEL_HELP` when there is none."""
    from ..model.folder import locate_model

    env = os.environ if environ is None else environ
    chosen = explicit if explicit not in (None, "") else env.get(MODEL_ENV) or None
    if chosen is not None:
        path = locate_model(chosen)
        demo = demo_model_dir()  # `ctpassport app --model demo` names it: keep saying what it is
        is_demo = demo is not None and path.resolve() == locate_model(demo).resolve()
        return ModelChoice(path, "demo" if is_demo else "configured")
    try:
        return ModelChoice(locate_model(None, environ=dict(env)), "installed")
    except ModelError:
        pass
    demo = demo_model_dir()
    if demo is not None:
        return ModelChoice(locate_model(demo), "demo")
    raise ModelError(NO_MODEL_HELP)


# ------------------------------------------------------------------------------------------------
# segmentation
# ------------------------------------------------------------------------------------------------
@dataclass
class SegmentationRun:
    """A finished segmentation: labels on the study's grid, its passport and timings (seconds per stage)."""

    labels: np.ndarray
    passport: Any
    timings: dict[str, float]
    model_id: str
    backend: str
    model_kind: str
    n_tiles: int
    model_labels: np.ndarray | None = None
    model_affine: np.ndarray | None = None
    model_path: str = ""
    figures: dict[str, Any] | None = None  # passport pictures, made on first view
    settings: dict[str, str] = field(default_factory=dict)  # what made it: see :func:`run_settings`


#: The settings that shape a segmentation run, as the page names them.
RUN_SETTING_NAMES = {"labels": "labels", "grid": "passport grid", "backend": "inference backend"}


def run_settings(settings: dict[str, Any], study: Study) -> dict[str, str]:
    """What a segmentation of ``study`` with the page's ``settings`` (keys ``reference``, ``grid``,
    ``backend``) is made of: the phantom's reference labels, or the model with a passport grid and a
    backend. Compared with a finished run's by :func:`settings_changed`."""
    if settings.get("reference") and study.truth_labels is not None:
        return {"labels": "phantom reference labels"}
    return {"labels": "model", "grid": str(settings.get("grid") or "output"),
            "backend": str(settings.get("backend") or "auto")}


def settings_changed(run: SegmentationRun, settings: dict[str, Any], study: Study) -> list[str]:
    """The settings changed since ``run`` was made (e.g. ``passport grid: output -> model``); empty when the
    run is what the settings would make now (or when it does not record its settings)."""
    if not run.settings:
        return []
    now = run_settings(settings, study)
    keys = ["labels"] if run.settings.get("labels") != now["labels"] else list(now)  # other labels: that says it
    return [f"{RUN_SETTING_NAMES[k]}: {run.settings.get(k)} -> {now.get(k)}"
            for k in keys if run.settings.get(k) != now.get(k)]


def estimate_tiles(image: Image3D, segmenter: Any) -> int:
    """Number of sliding-window patches the segmenter will run on ``image`` (for a progress bar).

    From the image's extent in the canonical (RAS+) frame resampled to the model spacing; exact unless the
    nnU-Net crop removes a zero border.
    """
    from ..segment.sliding_window import tiles

    m = segmenter.model
    spacing_nib = np.asarray(m.spacing, dtype=float)[np.argsort(m.nnunet_axes)]
    ornt = _canonical_perm(image.affine)
    extent = np.asarray(image.shape, dtype=float)[ornt] * np.asarray(image.spacing)[ornt]
    shape_nib = np.maximum(np.round(extent / spacing_nib).astype(int), 1)
    shape_nn = shape_nib[list(m.nnunet_axes)]
    shape = [max(int(s), int(p)) for s, p in zip(shape_nn, m.patch_size)]
    return len(tiles(tuple(shape), m.patch_size, segmenter.step))


def _canonical_perm(affine: np.ndarray) -> list[int]:
    """Storage axis that becomes canonical axis 0, 1, 2 (closest to R, A, S)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    perm = [0, 0, 0]
    for src, (dst, _) in enumerate(ornt):
        perm[int(dst)] = src
    return perm


def study_source(study: Study) -> Any:
    """The passport's ``source`` for a segmented study, as ``ctpassport segment`` records its input: ``path``
    is the user's name for the CT (an upload's file name, never the session's temporary copy; a server file's
    path) and ``sha256`` the study's hash (:func:`study_sha256`, the key the passport store uses)."""
    from ..passport.schema import Source

    path = study.path
    name = str(path) if study.source == "server" and path is not None else study.name
    return Source(path=name, sha256=study_sha256(study))


def segment_study(
    segmenter: Any,
    study: Study,
    *,
    model_kind: str = "configured",
    grid: str = "output",
    progress: Callable[[int], None] | None = None,
) -> SegmentationRun:
    """Segment ``study`` and build its passport (``grid``: ``output`` = the study's grid, with mean HU of the
    CT; ``model`` = the 3 mm model grid). ``progress`` is called with the number of patches just finished.
    Timings: seconds per stage (preprocess, infer, postprocess, passport)."""
    from ..passport.build import PassportWarning, build_passport
    from ..segment.pipeline import Timings

    tm = Timings()
    res = segmenter.segment(study.image, timings=tm, progress=progress)
    with tm.stage("passport"):
        if grid == "model":
            labels, affine, ct = res.model_labels, res.model_affine, res.model_ct
        else:
            labels, affine, ct = res.labels, study.image.affine, study.image.data
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PassportWarning)  # an empty map is reported in passport.warnings
            passport = build_passport(
                labels,
                affine,
                ct=ct,
                grid_kind=grid,
                source=study_source(study),
                model_id=segmenter.model.model_id,
                timings=dict(tm.seconds),
                normals=True,  # the app registers studies: normals and the body outline make it more accurate
                body=True,
            )
    return SegmentationRun(
        labels=res.labels,
        passport=passport,
        timings=dict(tm.seconds),
        model_id=segmenter.model.model_id,
        backend=segmenter.backend_name,
        model_kind=model_kind,
        n_tiles=res.n_tiles,
        model_labels=res.model_labels,
        model_affine=res.model_affine,
    )


def organ_rows(passport: Any) -> list[dict[str, Any]]:
    """One row per organ of a passport: id, organ, volume (ml), mean HU, HU SD, voxels, truncated."""
    rows = []
    for o in passport.organs:
        rows.append(
            {
                "id": int(o.id),
                "organ": o.name or f"label {o.id}",
                "volume_ml": round(o.volume_mm3 / 1000.0, 2),
                "mean_HU": None if o.hu_mean is None else round(float(o.hu_mean), 1),
                "sd_HU": None if o.hu_std is None else round(float(o.hu_std), 1),
                "voxels": int(o.voxel_count),
                "truncated": bool(o.truncated),
            }
        )
    return rows


SORT_KEYS = {
    "id": ("id", False),
    "organ": ("organ", False),
    "volume (largest first)": ("volume_ml", True),
    "mean HU": ("mean_HU", False),
    "truncated first": ("truncated", True),
}


def filter_rows(
    rows: list[dict[str, Any]], text: str = "", *, truncated: str = "all", sort: str = "id"
) -> list[dict[str, Any]]:
    """Rows whose organ name contains every word of ``text`` (case-insensitive), optionally only the
    truncated (``truncated="only"``) or complete (``"hide"``) organs, sorted by one of :data:`SORT_KEYS`."""
    words = text.lower().replace(",", " ").split()
    out = [r for r in rows if all(w in str(r["organ"]).lower() for w in words)]
    if truncated == "only":
        out = [r for r in out if r["truncated"]]
    elif truncated == "hide":
        out = [r for r in out if not r["truncated"]]
    key, reverse = SORT_KEYS.get(sort, ("id", False))
    present = [r for r in out if r[key] is not None]
    return sorted(present, key=lambda r: r[key], reverse=reverse) + [r for r in out if r[key] is None]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def reference_run(study: Study) -> SegmentationRun:
    """A "segmentation" from a phantom's reference labels (no model), its passport on the study's grid: for
    demonstrating passports and registration with labels known to be right. :class:`InputError` when the
    study has none."""
    from ..passport.build import PassportWarning, build_passport
    from ..segment.pipeline import Timings

    if study.truth_labels is None:
        raise InputError("has no reference labels (only demo phantoms do)", study.name)
    tm = Timings()
    labels = np.asarray(study.truth_labels).astype(np.uint8, copy=False)
    with tm.stage("passport"), warnings.catch_warnings():
        warnings.simplefilter("ignore", PassportWarning)
        passport = build_passport(
            labels,
            study.image.affine,
            ct=study.image.data,
            grid_kind="output",
            source=study_source(study),
            model_id="phantom reference labels",
            normals=True,
            body=True,
            timings={},
        )
    return SegmentationRun(
        labels=labels,
        passport=passport,
        timings=dict(tm.seconds),
        model_id="phantom reference labels",
        backend="none",
        model_kind="reference",
        n_tiles=0,
    )


# ------------------------------------------------------------------------------------------------
# the passport store
# ------------------------------------------------------------------------------------------------
def store_location() -> str | None:
    """The store the app reads (``$CTPASSPORT_DB`` or the user's default SQLite file), or None when there is
    none yet (the app never creates an empty store just by looking)."""
    from ..store.db import DB_ENV, default_db_path

    value = os.environ.get(DB_ENV)
    if value:
        return value
    path = default_db_path()
    return str(path) if path.is_file() else None


def store_label() -> str:
    """The store as the page may show it: its location with any database password masked (``***``)."""
    from ..store.db import redact_url

    loc = store_location()
    return redact_url(loc) if loc else "a new SQLite file in your data folder"


def store_records() -> list[Any]:
    """The studies in the passport store (:class:`ctpassport.store.db.StudyRecord`), newest last; [] when
    there is no store. Errors of an unreachable store raise :class:`CTPassportError`."""
    loc = store_location()
    if loc is None:
        return []
    from ..store.db import PassportStore

    try:
        store_ = PassportStore(loc, read_only=True)
    except InputError:  # no SQLite file yet: nothing stored (and none is created by looking)
        return []
    with store_ as store:
        try:
            return store.list()
        except CTPassportError as exc:
            if "no such table" in str(exc):
                return []
            raise


def study_sha256(study: Study) -> str:
    """A hash identifying the study's CT: the source file's (or DICOM series') hash, or for generated studies
    the SHA-256 of the voxel data, shape and affine."""
    import hashlib

    if study.path is not None and study.path.exists():
        from ..io.load import source_sha256

        return source_sha256(study.path)
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(study.image.data).tobytes())
    h.update(repr(study.image.shape).encode())
    h.update(np.asarray(study.image.affine, dtype=np.float64).tobytes())
    return h.hexdigest()


def add_to_store(
    study: Study,
    run: SegmentationRun,
    *,
    patient_id: str | None = None,
    study_date: str | None = None,
    description: str | None = None,
) -> tuple[Any, bool]:
    """Add the study's passport to the store (created when missing); returns (record, whether it was new).
    Adding the same CT again changes nothing (the store is idempotent by source hash)."""
    from ..store.db import PassportStore, StudyMeta

    meta = StudyMeta(
        source_sha256=run.passport.source.sha256 or study_sha256(study),  # the app's passports carry it
        patient_id=patient_id or None,
        study_date=study_date or None,
        modality="CT",
        description=description or study.name,
        source_path=str(study.path) if study.path is not None and study.source == "server" else None,
    )
    with PassportStore(store_location()) as store:
        return store.add(run.passport, meta)
