"""DICOM SEG output (and reading it back) through highdicom, like TotalSegmentator's ``--output_type dicom_seg``.

One segment per class present in the label map, named with TotalSegmentator's class name and coded with
the SNOMED CT codes, laterality modifiers and display colours of TotalSegmentator's own mapping table
(``totalseg_snomed.json``: the rows of its ``totalsegmentator_snomed_mapping.csv`` for the 117 classes of
the ``total`` task). Class names the table does not know get SNOMED "Tissue" (as TotalSegmentator does)
and a colour derived from the name. The SEG is a BINARY segmentation in the source series' frame of
reference; highdicom matches its frames to the source images from their positions and records them in
``ReferencedSeriesSequence`` / ``SourceImageSequence``.

Label maps are given on the grid of the :class:`~ctpassport.io.dicom.DicomImage3D` they came from
(``[column, row, slice]``, affine voxel -> RAS+ mm).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..errors import CTPassportError, InputError
from .atomic import atomic_path
from .dicom import LPS_TO_RAS, DicomImage3D

if TYPE_CHECKING:
    from ..segment.pipeline import SegmentationResult, Segmenter, Timings

SNOMED_TABLE = Path(__file__).with_name("totalseg_snomed.json")
TISSUE = ("SCT", "85756007", "Tissue")
#: Type 2 patient/study attributes a SEG copies from its source; anonymised series often lack them.
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
          "ReferringPhysicianName", "StudyID", "StudyDate", "StudyTime")


@functools.lru_cache(maxsize=1)
def snomed_table() -> dict[str, dict[str, Any]]:
    """``{class name: {category, type, type_modifier, region, region_modifier, rgb}}``; codes are
    ``[scheme, value, meaning]`` or null."""
    return json.loads(SNOMED_TABLE.read_text(encoding="utf-8"))["classes"]


def snomed_table_from_csv(csv_path: str | Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Rebuild :func:`snomed_table` for ``names`` from TotalSegmentator's mapping CSV (to check or update it)."""
    import csv

    def code(row: dict[str, str], prefix: str) -> list[str] | None:
        value = row[f"{prefix}.CodeValue"]
        return [row[f"{prefix}.CodingSchemeDesignator"], value, row[f"{prefix}.CodeMeaning"]] if value else None

    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = {r["Structure"]: r for r in csv.DictReader(fh)}
    return {n: {"category": code(rows[n], "SegmentedPropertyCategoryCodeSequence"),
                "type": code(rows[n], "SegmentedPropertyTypeCodeSequence"),
                "type_modifier": code(rows[n], "SegmentedPropertyTypeModifierCodeSequence"),
                "region": code(rows[n], "AnatomicRegionSequence"),
                "region_modifier": code(rows[n], "AnatomicRegionModifierSequence"),
                "rgb": [int(x) for x in rows[n]["DicomRGBColor"].split(",")]} for n in names if n in rows}


def _concept(code: list[str] | tuple[str, str, str]) -> Any:
    import highdicom as hd

    scheme, value, meaning = code
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _name_rgb(name: str) -> tuple[int, int, int]:
    """A stable, saturated colour for a class without a table entry."""
    import colorsys

    hue = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def segment_description(number: int, name: str, algorithm: Any) -> Any:
    """highdicom ``SegmentDescription`` for class ``name`` (SNOMED codes and colour when known)."""
    import highdicom as hd

    entry = snomed_table().get(name)
    if entry is not None and entry["category"] and entry["type"]:
        category, prop_type = _concept(entry["category"]), _concept(entry["type"])
        regions = [_concept(entry["region"])] if entry["region"] else None
        rgb = tuple(entry["rgb"])
    else:
        category = prop_type = _concept(TISSUE)
        regions, rgb = None, _name_rgb(name)
    desc = hd.seg.SegmentDescription(
        segment_number=number, segment_label=name[:64], segmented_property_category=category,
        segmented_property_type=prop_type, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, anatomic_regions=regions,
        display_color=hd.color.CIELabColor.from_rgb(*rgb),
    )
    if entry is not None and entry.get("type_modifier"):
        # Laterality (left/right) qualifies the property type, e.g. Kidney + Left.
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _concept(entry["type_modifier"])]
    return desc


def check_seg_source(image: Any) -> None:
    """Raise :class:`InputError` unless ``image`` can be the source of a DICOM SEG (DICOM input whose images
    carry a FrameOfReferenceUID, which the SEG IOD requires); cheap, so callers check before inference."""
    if not isinstance(image, DicomImage3D) or not image.datasets:
        raise InputError("DICOM SEG output needs DICOM input (a DICOM folder or zip)", getattr(image, "path", None),
                         "use --output-type nifti for NIfTI input")
    if not all(str(getattr(ds, "FrameOfReferenceUID", "") or "") for ds in image.datasets):
        raise InputError("the series has no FrameOfReferenceUID, which a DICOM SEG needs", image.path,
                         "use --output-type nifti")


def write_dicom_seg(labels: np.ndarray, image: DicomImage3D, classes: dict[int, str], path: str | Path, *,
                    model_id: str | None = None, series_number: int = 300,
                    series_description: str = "ctpassport segmentation",
                    series_instance_uid: str | None = None) -> Path:
    """Write ``labels`` (class ids on ``image``'s grid, ``[column, row, slice]``) as a DICOM SEG at ``path``
    (a new SeriesInstanceUID unless ``series_instance_uid`` is given).

    Only ids in ``classes`` that occur become segments (numbered 1..n in id order). Atomic write.
    Raises :class:`InputError` when ``image`` did not come from DICOM and :class:`CTPassportError` when no
    class is present (a SEG needs at least one segment).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    check_seg_source(image)
    lab = np.asarray(labels)
    if lab.shape != image.shape:
        raise InputError(f"label map shape {lab.shape} does not match the image {image.shape}")
    present = [int(k) for k in np.unique(lab) if k != 0 and int(k) in classes]
    if not present:
        raise CTPassportError("no structure was found, so there is nothing to store in a DICOM SEG", path)
    lut = np.zeros(max(int(lab.max()), max(present)) + 1, dtype=np.uint8)
    for number, k in enumerate(present, start=1):
        lut[k] = number
    seg_numbers = lut[lab.astype(np.intp, copy=False)]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="ctpassport (TotalSegmentator fast model)", version=__version__,
        family=codes.DCM.ArtificialIntelligence, source=model_id[:64] if model_id else None)
    descriptions = [segment_description(n, classes[k], algorithm) for n, k in enumerate(present, start=1)]
    # Our axes [column, row, slice] -> highdicom's [slice, row, column].
    frames = np.ascontiguousarray(seg_numbers.transpose(2, 1, 0))
    pixels: Any = frames
    if image.multiframe:  # one enhanced image: highdicom matches the volume to its frames by position
        affine_lps = (LPS_TO_RAS @ image.affine)[:, [2, 1, 0, 3]]
        pixels = hd.Volume(array=frames, affine=affine_lps, coordinate_system="PATIENT",
                           frame_of_reference_uid=image.meta.frame_of_reference_uid if image.meta else None)
    # else single-frame slices: frame k is the source image k (``datasets`` are in slice order) and takes
    # that image's own position and orientation, exact also for a slightly tilted or drifting stack, whose
    # mean-step affine is not orthogonal (which a highdicom Volume requires)
    sources = []
    for ds in image.datasets:
        missing = [kw for kw in _TYPE2 if kw not in ds]
        if missing:  # present but empty, as the standard allows for type 2 attributes
            ds = copy.deepcopy(ds)
            for kw in missing:
                setattr(ds, kw, "")
        sources.append(ds)
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
            series_instance_uid=series_instance_uid or hd.UID(), series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer="ctpassport", manufacturer_model_name="ctpassport",
            software_versions=__version__, device_serial_number="0",
            series_description=series_description[:64],
        )
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise InputError(f"cannot build a DICOM SEG for this series ({str(exc).splitlines()[0][:200]})",
                         image.path) from None
    out = Path(path)
    with atomic_path(out) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return out


def read_dicom_seg(path: str | Path) -> tuple[Any, dict[int, str]]:
    """Open a DICOM SEG with highdicom: (the ``highdicom.seg.Segmentation``, ``{segment number: label}``)."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    names = {int(d.SegmentNumber): str(d.SegmentLabel) for d in seg.SegmentSequence}
    return seg, names


SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def is_dicom_seg(path: str | Path) -> bool:
    """True when ``path`` is a DICOM file of the Segmentation Storage SOP class (header only)."""
    import pydicom

    from .dicom import is_dicom_file

    if not is_dicom_file(path):
        return False
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # noqa: BLE001  (unreadable: not a SEG this function can vouch for)
        return False
    return str(getattr(ds, "SOPClassUID", "")) == SEG_SOP_CLASS


@functools.lru_cache(maxsize=1)
def _folded_class_ids() -> dict[str, int]:
    """TotalSegmentator's class ids by lower-case class name (built once)."""
    from ..model.classes import NAME_TO_ID

    return {name.lower(): idx for name, idx in NAME_TO_ID.items()}


def _class_id(label: str) -> int | None:
    """TotalSegmentator's id of a segment label (its class name; case, spaces and dashes as written by other
    tools, e.g. "Kidney Left", are accepted)."""
    return _folded_class_ids().get(label.strip().lower().replace(" ", "_").replace("-", "_"))


def _tilted_like(seg_affine: np.ndarray, ct_affine: np.ndarray) -> np.ndarray:
    """The SEG volume's affine (LPS+ mm; highdicom's array axes slice, row, column) with its slice step taken from
    the CT's when the CT stack is tilted (its slices step off their normal, ``ct_affine[:3, 2]`` not along it):
    highdicom spaces a SEG's slices along the normal, but each frame sits at its source image's position, which
    steps like the CT. Unchanged when the CT is not tilted or the spacing along the normal differs."""
    step, seg_step = ct_affine[:3, 2], seg_affine[:3, 0]
    size = float(np.linalg.norm(seg_step))
    if size == 0 or np.linalg.norm(np.cross(step, seg_step)) <= 1e-6 * size * float(np.linalg.norm(step)):
        return seg_affine
    along = float(step @ seg_step) / size  # the CT's step along the SEG's slice direction (the normal)
    if abs(abs(along) - size) > 1e-3 * size:
        return seg_affine
    out = seg_affine.copy()
    out[:3, 0] = np.sign(along) * step
    return out


def _check_same_series(seg: Any, image: Any, path: str | Path) -> None:
    """A SEG placed on a CT series must have been made on it: the same frame of reference and, when the SEG
    lists its referenced series, the CT's among them (a grid that merely matches is another patient's CT)."""
    meta = getattr(image, "meta", None)
    if meta is None:
        return
    hint = "pass the CT series the SEG was made from"
    ours, theirs = meta.frame_of_reference_uid, str(getattr(seg, "FrameOfReferenceUID", "") or "") or None
    if ours and theirs and ours != theirs:
        raise InputError(f"its frame of reference ({theirs}) is not the one of the CT given with it ({ours})",
                         path, hint)
    refs = {str(getattr(r, "SeriesInstanceUID", "")) for r in getattr(seg, "ReferencedSeriesSequence", [])}
    refs.discard("")
    if refs and meta.series_uid and meta.series_uid not in refs:
        raise InputError(f"it was made on series {sorted(refs)[0]}, not on the CT series given with it "
                         f"({meta.series_uid})", path, hint)


def dicom_seg_labels(path: str | Path, image: Any) -> np.ndarray:
    """A DICOM SEG's segments as a TotalSegmentator label map on ``image``'s grid (``[column, row, slice]``,
    the CT series the SEG was made from; :func:`ctpassport.io.load.load_ct`).

    A SEG stores only the frames that hold a segment, so the CT gives the full grid. Segment labels must be
    TotalSegmentator class names (as ``segment --output-type dicom_seg`` and TotalSegmentator write them).
    Raises :class:`InputError` naming ``path`` for a SEG that cannot be read, whose segments overlap, whose
    labels are not class names, or whose frames do not lie on the CT's voxels.
    """
    try:
        seg, names = read_dicom_seg(path)
    except Exception as exc:  # noqa: BLE001  (pydicom/highdicom raise many types)
        raise InputError(f"cannot read the DICOM SEG ({str(exc).splitlines()[0][:200]})", path) from None
    _check_same_series(seg, image, path)
    unknown = sorted(label for label in names.values() if _class_id(label) is None)
    if unknown:
        raise InputError(f"segment labels that are not TotalSegmentator class names: {', '.join(unknown[:5])}"
                         + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""), path,
                         "see `ctpassport classes`; or convert the SEG to a NIfTI label map of class ids")
    try:
        vol = seg.get_volume(combine_segments=True, relabel=False)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot place the SEG's frames in a volume ({str(exc).splitlines()[0][:200]})",
                         path) from None
    ours_lps = LPS_TO_RAS @ np.asarray(image.affine, dtype=np.float64)
    m = np.linalg.solve(ours_lps, _tilted_like(np.asarray(vol.affine, dtype=np.float64), ours_lps))
    if not (np.allclose(m[:3, :3], np.round(m[:3, :3]), atol=1e-3) and np.allclose(m[:3, 3], np.round(m[:3, 3]),
                                                                                     atol=1e-2)):
        raise InputError("its frames do not lie on the voxels of the CT given with it", path,
                         "pass the CT series the SEG was made from")
    arr = np.asarray(vol.array)
    idx = np.argwhere(arr > 0)
    ours = np.rint(idx @ m[:3, :3].T + m[:3, 3]).astype(np.intp)
    if len(ours) and (ours.min() < 0 or np.any(ours.max(0) >= np.asarray(image.shape))):
        raise InputError("it reaches outside the CT given with it", path, "pass the CT series the SEG was made from")
    to_id = np.zeros(max(names) + 1, dtype=np.uint8)
    for number, label in names.items():
        to_id[number] = _class_id(label) or 0
    out = np.zeros(image.shape, dtype=np.uint8)
    out[tuple(ours.T)] = to_id[arr[tuple(idx.T)]]
    return out


def segment_to_dicom_seg(segmenter: Segmenter, image: DicomImage3D, output: str | Path, *,
                         roi_subset: list[str] | None = None, statistics: bool | str | Path = False,
                         timings_path: str | Path | None = None, timings: Timings | None = None,
                         passport: Callable[[SegmentationResult, Timings], None] | None = None,
                         progress: Callable[[int], None] | None = None,
                         series_instance_uid: str | None = None,
                         stats_include_incomplete: bool = False) -> SegmentationResult:
    """``Segmenter.segment_file`` with a DICOM SEG as the output instead of NIfTI.

    ``statistics`` writes ``statistics.json`` beside ``output`` (or to the given path; see
    ``Segmenter.segment_file`` for ``stats_include_incomplete``); ``timings_path`` the stage timings;
    ``series_instance_uid``: the SEG's series UID (default: a new one).
    """
    from ..io.atomic import write_text_atomic
    from ..segment.pipeline import Timings, classes_for, keep_classes, write_statistics

    classes = classes_for(roi_subset)
    tm = timings or Timings()
    result = segmenter.segment(image, timings=tm, progress=progress)
    if roi_subset:
        keep_classes(result, classes)  # the SEG, the passport and the statistics: the same subset
    if passport is not None:
        with tm.stage("passport"):
            passport(result, tm)
    out = Path(output)
    with tm.stage("write"):
        write_dicom_seg(result.labels, image, classes, out, model_id=segmenter.model.model_id,
                        series_instance_uid=series_instance_uid)
        if statistics:
            write_statistics(result, classes, statistics, out, ml=True, include_incomplete=stats_include_incomplete)
    if timings_path is not None:
        info = tm.as_dict()
        info.update(model_load_seconds=round(segmenter.load_seconds, 6), backend=segmenter.backend_name,
                    model_id=segmenter.model.model_id, n_tiles=result.n_tiles, input=str(image.path),
                    output_type="dicom_seg")
        write_text_atomic(Path(timings_path), json.dumps(info, indent=2))
    return result
