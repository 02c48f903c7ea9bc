"""Per-session temporary folders of the web app: created on demand, removed when the session ends.

Every browser session gets one folder ``<tmp>/ctpassport-app-<pid>/<session>-<random>/`` holding its uploads
and the files of its runs. The folder is removed

* when the :class:`Workspace` object is garbage-collected (Streamlit drops a session's state some time after
  the browser tab closes, see ``server.disconnectedSessionTTL``) or :meth:`Workspace.close` is called;
* when the server process exits (``weakref.finalize`` runs at interpreter exit);
* at the next start of any app server, for folders whose server process no longer runs (a killed server).

A run that fails removes what it wrote (:meth:`Workspace.run_folder` is a context manager that deletes its
folder on error), so nothing of a failed run stays on disk.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT_PREFIX = "ctpassport-app-"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_ROOTS: set[Path] = set()
#: Suffixes that compress another one (``.nii.gz``): :func:`safe_name` keeps the pair.
_COMPRESSED = frozenset({"gz", "bz2", "xz", "zst"})


def safe_name(name: str, default: str = "file") -> str:
    """A file name without folders or odd characters (for storing an upload under its own name); the
    extension is kept: the last suffix, and the one before it when the last is a compression (``.nii.gz``),
    so dotted names survive (``1.2.840.113619.2.55.3.nii.gz`` stays as it is, ``腹部.nii.gz`` ->
    ``file.nii.gz``, ``CT 01.nii.gz`` -> ``CT_01.nii.gz``)."""
    parts = _SAFE.sub("_", Path(str(name)).name).split(".")
    n_ext = 0
    if len(parts) > 1 and parts[-1]:
        n_ext = 2 if len(parts) > 2 and parts[-2] and parts[-1].lower() in _COMPRESSED else 1
    ext = ".".join(parts[len(parts) - n_ext:])[:20] if n_ext else ""
    stem = ".".join(parts[: len(parts) - n_ext]).lstrip("._").rstrip(".")
    if not stem.strip("_"):  # nothing left of a non-ASCII name (or a hidden file's empty stem)
        stem = default
    return f"{stem[:100]}.{ext}" if ext else stem[:120]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def server_root(base: str | Path | None = None) -> Path:
    """This server process's folder of session workspaces (created; stale ones of dead servers removed)."""
    tmp = Path(base) if base is not None else Path(tempfile.gettempdir())
    sweep_stale(tmp)
    root = tmp / f"{ROOT_PREFIX}{os.getpid()}"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)  # patients' data (uploads, segmentations, registrations): this server's user only
    if root not in _ROOTS:
        _ROOTS.add(root)
        atexit.register(shutil.rmtree, str(root), True)  # after the sessions' own finalizers
    return root


def sweep_stale(base: str | Path) -> list[Path]:
    """Remove ``ctpassport-app-<pid>`` folders under ``base`` whose process no longer runs; return them."""
    removed: list[Path] = []
    try:
        entries = list(Path(base).glob(f"{ROOT_PREFIX}*"))
    except OSError:
        return removed
    for d in entries:
        pid = d.name[len(ROOT_PREFIX) :]
        if d.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


class Workspace:
    """The temporary folder of one app session. ``path`` exists until :meth:`close` (or garbage collection)."""

    def __init__(self, session_id: str | None = None, base: str | Path | None = None) -> None:
        tag = safe_name(session_id or "session", "session")[:40]
        self.path = server_root(base) / f"{tag}-{uuid.uuid4().hex[:12]}"
        self.path.mkdir(parents=True, mode=0o700)
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Remove the folder and everything in it (idempotent)."""
        self._finalizer()

    def new_folder(self, prefix: str) -> Path:
        """A fresh, empty sub-folder (``prefix`` + random suffix)."""
        return Path(tempfile.mkdtemp(prefix=f"{safe_name(prefix, 'run')}-", dir=self.path))

    @contextmanager
    def run_folder(self, prefix: str) -> Iterator[Path]:
        """A fresh sub-folder that is deleted when the ``with`` block raises (nothing of a failed run stays)."""
        folder = self.new_folder(prefix)
        try:
            yield folder
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def remove(self, path: str | Path) -> None:
        """Delete a file or folder inside the workspace (paths outside it are refused silently)."""
        p = Path(path)
        try:
            p.resolve().relative_to(self.path.resolve())
        except ValueError:
            return
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

    def size_bytes(self) -> int:
        """Bytes currently held by the workspace."""
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
