"""Find the CTs of a batch: NIfTI files, DICOM folders and zips of DICOM folders under one folder."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io.atomic import OUTPUT_MARKER
from ..io.dicom import is_dicom_file
from ..io.load import InputKind, is_nifti_name


@dataclass(frozen=True)
class Case:
    """One CT of a batch. ``case_id`` names its output folder; ``path`` is absolute."""

    case_id: str
    path: str
    kind: InputKind

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: Files that mark a folder as ctpassport's own output (the folder-output marker, a batch's and a case's record).
_OUTPUT_FILES = (OUTPUT_MARKER, "batch.json", "case.json")


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _strip_suffix(name: str) -> str:
    low = name.lower()
    for suffix in (".nii.gz", ".nii", ".zip"):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


#: Longest case id (an output folder name; its temporary sibling ``.<id>.tmp-XXXXXXXX`` must stay under the
#: file systems' 255 bytes): longer ids keep their start and end around a hash of the whole.
MAX_CASE_ID = 120
#: Names in the batch output folder that are not cases (a case named like them gets a suffix).
RESERVED_IDS = frozenset({"batch.json", "batch.csv", OUTPUT_MARKER.lower()})


def case_id_for(rel: Path) -> str:
    """Output folder name for a path relative to the batch input: parts joined by ``__``, suffix dropped,
    characters outside ``[A-Za-z0-9._-]`` replaced by ``_``; at most :data:`MAX_CASE_ID` characters (a long
    id keeps its start and end around 10 hex digits of its SHA-256)."""
    import hashlib

    parts = list(rel.parts[:-1]) + [_strip_suffix(rel.name)] if rel.parts else ["case"]
    cid = "__".join(_SAFE.sub("_", p) for p in parts if p not in ("", "."))
    cid = cid.lstrip(".") or "case"
    if len(cid) > MAX_CASE_ID:
        tag = hashlib.sha256(cid.encode()).hexdigest()[:10]
        keep = (MAX_CASE_ID - len(tag) - 2) // 2
        cid = f"{cid[:keep]}-{tag}-{cid[-keep:]}"
    return cid


def _has_dicom_files(folder: Path, files: list[str]) -> bool:
    for name in files:
        if _hidden(name) or name.upper() == "DICOMDIR":
            continue
        if name.lower().endswith(".dcm") or is_dicom_file(folder / name):
            return True
    return False


def _walk(root: Path) -> Iterator[tuple[Path, Path, list[str], list[str]]]:
    """``os.walk`` following links to folders, each real folder once (a link back up is not a loop):
    ``(folder, its resolved path, its subfolders (prune in place), its files)``."""
    seen: set[Path] = set()
    for dirpath, dirs, files in os.walk(root, followlinks=True):
        real = Path(dirpath).resolve()
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        yield Path(dirpath), real, dirs, files


def discover_cases(in_dir: str | Path, exclude: str | Path | None = None) -> list[Case]:
    """Every CT under ``in_dir``, sorted by path.

    * ``*.nii`` / ``*.nii.gz`` files and ``*.zip`` files are one case each;
    * a folder that directly holds DICOM files (``DICM`` preamble or ``.dcm``) is one case (the loader
      picks its largest CT series, looking into its subfolders too, so DICOM files below it are part of that
      case); NIfTI files and zips beside or below DICOM files are cases of their own, and every folder is
      searched. ``in_dir`` itself may be such a DICOM folder.

    Hidden entries (``.*``, ``__MACOSX``), ``exclude`` (e.g. an output folder inside ``in_dir``; it may not be
    ``in_dir`` itself) and folders that ctpassport wrote (holding its output marker, a ``batch.json`` or a
    ``case.json``: an earlier batch's label maps are not CTs) are skipped. Symbolic links to folders are
    followed (each real folder once). Case ids are unique (``-2``, ``-3``... appended on collisions) and never
    one of :data:`RESERVED_IDS`.
    """
    root = Path(in_dir).resolve()
    if not root.exists():
        raise InputError("no such folder", root)
    if not root.is_dir():
        raise InputError("is not a folder", root, "batch takes a folder of NIfTI files and DICOM folders")
    skip = Path(exclude).resolve() if exclude is not None else None
    if skip is not None and skip == root:
        raise InputError("is both the input and the output folder", root,
                         "write the batch's outputs to another folder (it may be inside the input folder)")
    found: list[tuple[Path, InputKind]] = []
    dicom_folders: list[Path] = []
    for here, real, dirs, files in _walk(root):
        if skip is not None and (real == skip or skip in real.parents):
            dirs[:] = []
            continue
        if here != root and any(name in files for name in _OUTPUT_FILES):
            dirs[:] = []  # a ctpassport output (an earlier batch, a case, a mask folder): not a CT
            continue
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        # the DICOM loader reads a DICOM folder recursively: DICOM files below one are part of its case, but
        # the NIfTI files and zips beside or below them are cases of their own
        if _has_dicom_files(here, files) and not any(d == here or d in here.parents for d in dicom_folders):
            found.append((here, "dicom-folder"))
            dicom_folders.append(here)
        for name in sorted(files):
            if _hidden(name):
                continue
            if is_nifti_name(name):
                found.append((here / name, "nifti"))
            elif name.lower().endswith(".zip"):
                found.append((here / name, "dicom-zip"))
    found.sort(key=lambda t: str(t[0]))
    cases: list[Case] = []
    used: set[str] = set()
    for path, kind in found:
        rel = path.relative_to(root) if path != root else Path(root.name)
        cid = base = case_id_for(rel)
        n = 2
        while cid.lower() in used or cid.lower() in RESERVED_IDS:
            cid = f"{base}-{n}"
            n += 1
        used.add(cid.lower())
        cases.append(Case(case_id=cid, path=str(path), kind=kind))
    return cases


def input_signature(path: str | Path) -> dict[str, int]:
    """Cheap change detector for a case input: file count, total bytes and newest mtime (ns)."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return {"files": 1, "bytes": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}
    n = size = newest = 0
    for here, _real, dirs, files in _walk(p):
        dirs[:] = [d for d in dirs if not _hidden(d)]
        for name in files:
            if _hidden(name):
                continue
            try:
                st = (here / name).stat()
            except OSError:
                continue
            n += 1
            size += int(st.st_size)
            newest = max(newest, int(st.st_mtime_ns))
    return {"files": n, "bytes": size, "mtime_ns": newest}
