"""What the app's download buttons hand out: label map, per-class masks, passport, transforms, a report.

Every function returns the file's bytes (or text) and writes nothing to disk. Label maps keep the study's
grid: ``labels[i, j, k]`` in the study's storage order with its affine (voxel -> RAS+ mm) and header.
"""

from __future__ import annotations

import html
import io
import json
import re
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..io.nifti import Image3D, make_nifti, nifti_bytes
from ..model.classes import TOTAL_CLASSES


def stem_of(name: str) -> str:
    """A short file-name stem from a study's name (``/data/ct_01.nii.gz`` -> ``ct_01``)."""
    base = Path(str(name).rstrip("/")).name
    for ext in (".nii.gz", ".nii", ".zip", ".gz"):
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "study"


def labels_nifti(labels: np.ndarray, image: Image3D) -> bytes:
    """The label map as a gzip-compressed NIfTI (uint8, TotalSegmentator ids, label-table extension), on the
    study's grid with its header (like ``TotalSegmentator --ml``)."""
    from ..io.labels import add_label_table

    img = make_nifti(
        np.asarray(labels).astype(np.uint8, copy=False), image.affine, image.header, dtype=np.uint8
    )
    add_label_table(img, TOTAL_CLASSES)
    return nifti_bytes(img, compress=True)


def masks_zip(labels: np.ndarray, image: Image3D, *, all_classes: bool = False) -> bytes:
    """A zip of one binary mask per class, ``<class name>.nii.gz`` (uint8 0/1, the study's grid).

    Only the classes present are included unless ``all_classes`` (TotalSegmentator writes all 117).
    """
    lab = np.asarray(labels)
    present = {int(k) for k in np.unique(lab) if k > 0}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:  # masks are gzip-compressed already
        for k, name in TOTAL_CLASSES.items():
            if not all_classes and k not in present:
                continue
            mask = (lab == k).astype(np.uint8)
            zf.writestr(
                f"{name}.nii.gz",
                nifti_bytes(make_nifti(mask, image.affine, image.header, dtype=np.uint8), compress=True),
            )
        for k in sorted(present - set(TOTAL_CLASSES)):
            mask = (lab == k).astype(np.uint8)
            zf.writestr(
                f"label_{k}.nii.gz",
                nifti_bytes(make_nifti(mask, image.affine, image.header, dtype=np.uint8), compress=True),
            )
    return buf.getvalue()


def passport_json(passport: Any) -> bytes:
    """The passport as JSON (the schema of :mod:`ctpassport.passport.schema`)."""
    return passport.model_dump_json(indent=1).encode("utf-8")


def organs_csv(passport: Any) -> str:
    """The organ table as CSV: id, organ, volume_ml, mean_HU, sd_HU, voxels, truncated."""
    import csv

    from . import core

    buf = io.StringIO()
    rows = core.organ_rows(passport)
    writer = csv.DictWriter(
        buf,
        fieldnames=["id", "organ", "volume_ml", "mean_HU", "sd_HU", "voxels", "truncated"],
        lineterminator="\n",
    )
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def folder_zip(folder: str | Path) -> bytes:
    """A zip of every file under ``folder`` (paths relative to it)."""
    root = Path(folder)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(root).as_posix())
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# the HTML report
# ------------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1d2330;
padding:0 1rem}h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #dde;
padding-bottom:.3rem}.sub{color:#667;margin-top:0}table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #dde;padding:3px 8px;text-align:right}th{background:#f3f5f9}td.l,th.l{text-align:left}
.imgs{display:flex;gap:10px;flex-wrap:wrap;align-items:flex-start}.imgs figure{margin:0;background:#0e1117;padding:6px;border-radius:6px}
.imgs figcaption{color:#dde;font-size:.8rem;text-align:center}.note{color:#667;font-size:.85rem}
.chip{display:inline-block;padding:0 7px;border-radius:8px;margin:1px 4px 1px 0;font-size:.78rem;color:#111}
"""


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = "".join(
        f"<th class='{'l' if i < 2 else ''}'>{html.escape(t)}</th>" for i, (_, t) in enumerate(columns)
    )
    body = []
    for r in rows:
        cells = []
        for i, (k, _) in enumerate(columns):
            v = r.get(k)
            text = (
                ""
                if v is None
                else (
                    ("yes" if v else "")
                    if isinstance(v, bool)
                    else (f"{v:.2f}" if isinstance(v, float) else str(v))
                )
            )
            cells.append(f"<td class='{'l' if i < 2 else ''}'>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def slice_pngs(
    image: Image3D, labels: np.ndarray | None, *, window: str = "Soft tissue", opacity: float = 0.45
) -> list[tuple[str, str]]:
    """(caption, PNG data URI) of the three central planes through the labelled region (display convention
    of :mod:`ctpassport.app.viewer`), each resampled to square pixels for the report."""
    from . import viewer

    view = viewer.canonical_view(image.data, image.affine, labels)
    cursor = viewer.best_slices(view)
    out = []
    for plane in viewer.PLANES:
        idx = cursor[{"sagittal": 0, "coronal": 1, "axial": 2}[plane]]
        ct2d = viewer.display_slice(view.ct, plane, idx)
        lab2d = viewer.display_slice(view.labels, plane, idx) if view.labels is not None else None
        rgb = viewer.overlay_rgb(viewer.window_gray(ct2d, *viewer.WINDOWS[window]), lab2d, opacity)
        out.append(
            (
                f"{plane} {idx + 1}/{view.n_slices(plane)}",
                viewer.png_data_uri(square_pixels(rgb, viewer.pixel_mm(view, plane))),
            )
        )
    return out


def square_pixels(rgb: np.ndarray, pixel: tuple[float, float], max_side: int = 330) -> np.ndarray:
    """Resize an RGB slice (pixel = (column, row) mm) to square pixels, the longer side ``max_side``."""
    from PIL import Image

    h, w = rgb.shape[:2]
    width_mm, height_mm = w * pixel[0], h * pixel[1]
    scale = max_side / max(width_mm, height_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.NEAREST))


def report_html(study: Any, run: Any, reg: Any = None) -> str:
    """A self-contained HTML report of a study: summary, model and timings, slices with labels, organ table,
    passport pictures, and the registration when there is one."""
    from . import core, pictures

    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        (
            f"<!doctype html><html><head><meta charset='utf-8'><title>ctpassport report: "
            f"{html.escape(study.name)}</title><style>{_CSS}</style></head><body>"
        ),
        f"<h1>ctpassport report: {html.escape(study.name)}</h1>",
        f"<p class='sub'>{html.escape(study.summary)} · {now} · ctpassport {__version__}</p>",
    ]
    if run is not None:
        total = sum(run.timings.values())
        stages = ", ".join(f"{html.escape(k)} {v:.2f} s" for k, v in run.timings.items())
        parts.append("<h2>Segmentation</h2>")
        if run.model_kind == "reference":
            parts.append(
                f"<p>Labels: the phantom's reference labels (no model), {total:.2f} s ({stages}).</p>"
            )
        else:
            parts.append(
                f"<p>Model <b>{html.escape(str(run.model_id))}</b> ({html.escape(run.model_kind)}) on "
                f"<b>{html.escape(run.backend)}</b>, {run.n_tiles} patches, {total:.1f} s in all "
                f"({stages}).</p>"
            )
    figs = slice_pngs(study.image, None if run is None else run.labels)
    parts.append(
        "<div class='imgs'>"
        + "".join(
            f"<figure><img src='{uri}' alt='{html.escape(cap)}'><figcaption>{html.escape(cap)}</figcaption></figure>"
            for cap, uri in figs
        )
        + "</div>"
    )
    if run is not None:
        rows = core.organ_rows(run.passport)
        parts.append(f"<h2>Organs ({len(rows)})</h2>")
        parts.append(
            "<p class='note'>Volumes in millilitres; HU = Hounsfield units; truncated = the organ touches "
            "the edge of the scan and may be incomplete.</p>"
        )
        parts.append(
            _table(
                rows,
                [
                    ("id", "id"),
                    ("organ", "organ"),
                    ("volume_ml", "volume (ml)"),
                    ("mean_HU", "mean HU"),
                    ("sd_HU", "SD HU"),
                    ("voxels", "voxels"),
                    ("truncated", "truncated"),
                ],
            )
        )
        if run.passport.organs:
            parts.append("<h2>Passport</h2>")
            parts.append(pictures.report_figures_html(run.passport))
    if reg is not None:
        parts.append("<h2>Registration</h2>")
        parts.append(reg.report_html())
    parts.append(
        "<p class='note'>Made with ctpassport. Automatic segmentation: check it before clinical use.</p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)


def summary_json(study: Any, run: Any) -> str:
    """Study, model, timings and organ rows as JSON (for scripts)."""
    from . import core

    return json.dumps(
        {
            "study": study.name,
            "summary": study.summary,
            "model_id": run.model_id,
            "backend": run.backend,
            "timings_s": run.timings,
            "organs": core.organ_rows(run.passport),
        },
        indent=1,
    )
