"""Work out the study metadata of a passport file before it goes into the store.

Sources, first match wins per field (explicit options always win):

1. the CT given with ``--ct`` (a DICOM folder/zip gives patient id, study date, modality, study and
   series UIDs; any CT gives the source hash of :func:`ctpassport.io.load.source_sha256`);
2. the ``case.json`` beside a passport written by ``ctpassport batch`` (the same fields, recorded when the
   case was segmented);
3. the passport's own ``source`` block (``ct_sha256``, else ``sha256`` of the label map it was made from).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..passport.schema import Passport
from .db import StudyMeta


def _case_json(passport_path: Path) -> dict[str, Any] | None:
    p = passport_path.parent / "case.json"
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("source_sha256") else None


def study_meta_for(passport: Passport, passport_path: str | Path | None = None, *, ct: str | Path | None = None,
                   series_uid: str | None = None, study_key: str | None = None, patient_id: str | None = None,
                   study_date: str | None = None, modality: str | None = None,
                   description: str | None = None) -> StudyMeta:
    """The :class:`StudyMeta` for ``passport`` (see the module docstring for where each field comes from).

    Raises :class:`InputError` when no source hash can be found (pass ``ct``).
    """
    found: dict[str, Any] = {}
    if ct is not None:
        from ..io.load import input_kind, source_sha256

        kind = input_kind(ct)
        if kind == "nifti":
            from ..io.nifti import load_nifti

            load_nifti(ct)  # a readable NIfTI image, not any file (one-line InputError otherwise)
            found.update(source_sha256=source_sha256(ct), source_path=str(Path(ct).resolve()))
        else:
            from ..io.dicom import dicom_metadata

            m = dicom_metadata(ct, series_uid)
            found.update(source_sha256=m.source_sha256, source_path=str(Path(ct).resolve()),
                         patient_id=m.patient_id, study_date=m.study_date, modality=m.modality,
                         study_uid=m.study_uid, series_uid=m.series_uid,
                         description=m.study_description or m.series_description)
    elif passport_path is not None and (case := _case_json(Path(passport_path))) is not None:
        study = case.get("study") or {}
        found.update(source_sha256=case["source_sha256"], source_path=case.get("input"),
                     patient_id=study.get("patient_id"), study_date=study.get("study_date"),
                     modality=study.get("modality"), study_uid=study.get("study_uid"),
                     series_uid=study.get("series_uid"),
                     description=study.get("study_description") or study.get("series_description"))
    else:
        src = passport.source
        sha = src.ct_sha256 or src.sha256
        if sha:
            found.update(source_sha256=sha, source_path=src.ct_path or src.path)
    if not found.get("source_sha256"):
        raise InputError("cannot tell which CT this passport belongs to (no source hash in it)",
                         passport_path, "pass the CT with --ct")
    explicit = {"patient_id": patient_id, "study_date": study_date, "modality": modality,
                "description": description}
    found.update({k: v for k, v in explicit.items() if v is not None})
    return StudyMeta(study_key=study_key, **found)
