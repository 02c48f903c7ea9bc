"""The per-case function of a batch, the same for the in-process loop, a local process pool and Dask.

:func:`run_case` segments one CT and writes its output folder atomically: everything goes into a hidden
temporary sibling (``.<case>.tmp-*``) that is renamed to ``<case>/`` only when complete, so a killed
batch never leaves a half-written case. Models are loaded once per worker process and reused
(:func:`get_segmenter`); inference is serialised within a process (a Dask worker with several threads
does not oversubscribe its cores).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import CTPassportError
from .discover import Case, input_signature

CASE_JSON = "case.json"
LABELS = "labels.nii.gz"
PASSPORT = "passport.json"
STATISTICS = "statistics.json"
TIMINGS = "timings.json"


@dataclass(frozen=True)
class BatchOptions:
    """How each case is processed (picklable: it travels to pool and Dask workers).

    ``model``: trainer folder or TotalSegmentator home (``None``: search like TotalSegmentator); must be
    readable at the same path on every worker. ``threads``: inference threads per worker (``None``: the
    backend's default). ``cache_dir``: ONNX export cache (``None``: ``Config.from_env``).
    """

    model: str | None = None
    backend: str | None = None
    threads: int | None = None
    passport: bool = False
    passport_grid: str = "model"
    passport_normals: bool = False
    passport_body: bool = False
    roi_subset: tuple[str, ...] | None = None
    cache_dir: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def output_options(self) -> dict[str, Any]:
        """The options that shape a case's outputs (a resumed case must have been made with the same)."""
        return {"passport": self.passport, "passport_grid": self.passport_grid if self.passport else None,
                "passport_normals": self.passport_normals if self.passport else None,
                "passport_body": self.passport_body if self.passport else None,
                "roi_subset": sorted(self.roi_subset) if self.roi_subset else None}


@dataclass
class _WorkerState:
    segmenters: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    loads: dict[tuple[Any, ...], int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


_STATE = _WorkerState()


def _key(opts: BatchOptions) -> tuple[Any, ...]:
    return (opts.model, opts.backend, opts.threads, opts.cache_dir)


def get_segmenter(opts: BatchOptions) -> tuple[Any, int]:
    """The process-wide :class:`~ctpassport.segment.pipeline.Segmenter` for ``opts`` (created on first
    use) and how many times this process has loaded it (1 unless loading failed before)."""
    from ..config import Config
    from ..segment.pipeline import Segmenter

    key = _key(opts)
    with _STATE.lock:
        seg = _STATE.segmenters.get(key)
        if seg is None:
            cfg = Config.from_env(cache_dir=opts.cache_dir)
            seg = Segmenter(opts.model, backend=opts.backend, threads=opts.threads, config=cfg)
            _STATE.segmenters[key] = seg
            _STATE.loads[key] = _STATE.loads.get(key, 0) + 1
        return seg, _STATE.loads[key]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, CTPassportError):
        return str(exc)
    first = (str(exc).splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def run_case(case: Case, out_dir: str, opts: BatchOptions) -> dict[str, Any]:
    """Segment ``case`` into ``out_dir/<case_id>/`` and return its summary record (never raises for a
    bad case: the error goes into the record with ``status: "failed"`` and nothing is left on disk).

    The folder holds ``labels.nii.gz`` (uint8 multilabel with the label table, on the input's grid),
    ``statistics.json`` (volume mm3 and mean HU per class), ``timings.json`` (seconds per stage),
    ``passport.json`` (with ``opts.passport``) and ``case.json`` (this record plus the study metadata).
    """
    from ..io.atomic import atomic_path, write_text_atomic
    from ..io.dicom import DicomImage3D
    from ..io.load import label_map_suspicion, load_ct, source_sha256
    from ..segment.pipeline import Timings

    t0 = time.perf_counter()
    record: dict[str, Any] = {
        "case_id": case.case_id, "input": case.path, "kind": case.kind, "status": "failed", "error": None,
        "seconds": None, "output": None, "started": _now(), "finished": None,
        "worker": {"host": socket.gethostname(), "pid": os.getpid()},
    }
    target = Path(out_dir) / case.case_id
    try:
        signature = input_signature(case.path)
        seg, loads = get_segmenter(opts)
        record["worker"]["segmenter_loads"] = loads
        with _STATE.lock:  # one inference at a time per process
            tm = Timings()
            with tm.stage("load"):
                image = load_ct(case.path)
            why = label_map_suspicion(image.data)
            if why:  # segmented all the same (as `segment` does), with the warning in the record
                record["warnings"] = [f"the input {why}"]
            if isinstance(image, DicomImage3D) and image.meta is not None:
                meta = image.meta.as_dict()
                source_hash = image.meta.source_sha256
            else:
                meta = {"modality": None, "patient_id": None, "study_date": None, "study_uid": None}
                source_hash = source_sha256(case.path)
            with atomic_path(target, is_dir=True) as tmp:
                passport_fn = None
                if opts.passport:
                    from ..passport.build import passport_from_segmentation

                    def passport_fn(result: Any, timings: Any) -> None:
                        passport_from_segmentation(result, tmp / PASSPORT, input_path=case.path,
                                                   grid=opts.passport_grid, model_id=seg.model.model_id,
                                                   timings=timings.seconds, normals=opts.passport_normals,
                                                   body=opts.passport_body)

                res = seg.segment_file(case.path, tmp / LABELS, ml=True,
                                       roi_subset=list(opts.roi_subset) if opts.roi_subset else None,
                                       statistics=tmp / STATISTICS, timings_path=tmp / TIMINGS, force=True,
                                       passport=passport_fn, image=image, timings=tm)
                record.update(
                    status="ok", output=str(target), source_sha256=source_hash, study=meta,
                    input_signature=signature, shape=list(image.shape),
                    spacing_mm=[round(s, 6) for s in image.spacing],
                    n_labels=int(np.count_nonzero(np.bincount(res.labels.ravel(), minlength=1)[1:])),
                    model_id=seg.model.model_id, backend=seg.backend_name,
                    stage_seconds={k: round(v, 4) for k, v in tm.seconds.items()},
                    passport=PASSPORT if opts.passport else None, ctpassport_version=__version__,
                    output_options=opts.output_options(),
                )
                record["seconds"] = round(time.perf_counter() - t0, 4)
                record["finished"] = _now()
                write_text_atomic(tmp / CASE_JSON, json.dumps(record, indent=2))
    except Exception as exc:  # noqa: BLE001 - a failing case is recorded, the batch goes on
        record.update(status="failed", error=_one_line(exc), output=None,
                      seconds=round(time.perf_counter() - t0, 4), finished=_now())
        if (target / CASE_JSON).is_file():  # an earlier run's output of this case: stale now that it failed
            shutil.rmtree(target, ignore_errors=True)
    return record


def read_case_record(case_dir: Path) -> dict[str, Any] | None:
    """The ``case.json`` of a finished case folder, or None when absent or unreadable."""
    try:
        rec = json.loads((case_dir / CASE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("status") == "ok" else None
