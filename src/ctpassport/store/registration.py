"""Register two stored studies from their passports alone (no images needed).

The passports are read from the store and handed to :func:`ctpassport.register.register_passports`; the
result is written like ``ctpassport register`` writes it (``transform.h5``, ``displacement.nii.gz``,
``registration.json``; the transform maps **fixed**-space points to **moving**-space points, world mm RAS+),
with the two studies' keys, source hashes and metadata added to ``registration.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .db import StudyRecord


def register_studies(fixed: StudyRecord, moving: StudyRecord, output: str | Path, *, tier: str = "rigid",
                     method: str | None = None, force: bool = False) -> Any:
    """Register ``moving`` to ``fixed`` and save the result folder at ``output``; returns the
    :class:`~ctpassport.register.RegistrationResult`."""
    from ..register import register_passports

    kwargs: dict[str, Any] = {"method": method} if method else {}
    result = register_passports(fixed.load_passport(), moving.load_passport(), tier=tier, **kwargs)
    result.summary["store"] = {
        role: {"study_key": r.study_key, "source_sha256": r.source_sha256, "patient_id": r.patient_id,
               "study_date": r.study_date, "modality": r.modality, "study_uid": r.study_uid,
               "series_uid": r.series_uid}
        for role, r in (("fixed", fixed), ("moving", moving))
    }
    result.save(output, force=force)
    return result
