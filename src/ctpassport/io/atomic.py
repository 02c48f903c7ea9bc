"""Atomic writes: a crash or an error never leaves a half-written output behind.

Folder outputs (mask folders, registration and report folders) carry a marker file, ``.ctpassport-output``.
``--force`` replaces an existing folder as a whole only when it is empty or holds that marker, so a
mistyped ``-o ~/Documents --force`` is refused instead of deleting what the folder held.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError, OutputExistsError

#: Name of the marker file every folder output holds; an existing folder is replaced only when it has one.
OUTPUT_MARKER = ".ctpassport-output"


@contextmanager
def folder_lock(folder: Path, busy: str, hint: str, *, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``flock`` on the folder itself, no lock file; released when the
    block ends or the process dies). Another holder: :class:`OutputError` ``busy`` (with ``hint``), or with
    ``wait`` wait for it (for short read-modify-write updates). A file system without locks (some network
    shares) or a platform without ``fcntl`` runs unlocked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        taken = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            taken = exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)
        if taken:
            raise OutputError(busy, folder, hint)
        yield
    finally:
        os.close(fd)


def remove_leftovers(folder: Path, name: str | None = None) -> list[Path]:
    """Remove what a killed writer left in ``folder``: the hidden temporary siblings ``.<name>.tmp-*`` and
    ``.<name>.old-*`` of :func:`atomic_path` (of every name when ``name`` is None). Call it only while holding
    :func:`folder_lock` on ``folder``, so that no live writer's temporary is removed."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        stem = p.name[1:].split(".tmp-")[0].split(".old-")[0]
        if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name) and name in (None, stem):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def check_writable(path: str | Path, force: bool, *, folder: bool = False) -> Path:
    """Refuse to overwrite ``path`` unless ``force``; create its parent folder. Returns the path.

    ``folder``: the output is a folder (else a file). A file output that names an existing folder (or the
    reverse), a parent that cannot be made or written to, and a folder that ctpassport did not write (see
    :data:`OUTPUT_MARKER`) are refused with :class:`~ctpassport.errors.OutputError`, ``force`` or not.
    """
    p = Path(path)
    if p.is_dir() and not folder:
        raise OutputError("is a folder, but this output is a file", p, "name a file")
    if p.exists() and not p.is_dir() and folder:
        raise OutputError("is a file, but this output is a folder", p, "name a folder")
    if p.exists() and not force:
        raise OutputExistsError(p)
    if folder and p.is_dir():
        _check_replaceable(p)
    _make_parent(p)
    return p


def make_folder(folder: Path, what: str, hint: str | None = None) -> Path:
    """Create ``folder`` (and its parents) where a command keeps files of its own (a cache, a download area);
    :class:`OutputError` "cannot create ``what`` (why)" naming it, with ``hint``, when it cannot be made."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {what} ({exc.strerror or exc})", folder, hint) from None
    return folder


def _make_parent(p: Path) -> None:
    parent = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError("cannot be written: a part of its folder path is a file", p) from None
    except OSError as exc:
        raise OutputError(f"cannot create its folder {parent}: {exc.strerror}", p) from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot be written: no permission to write in {parent}", p)


def mark_output_folder(path: str | Path) -> None:
    """Write :data:`OUTPUT_MARKER` into a folder output (:func:`atomic_path` does it for the folders it makes;
    call it for a folder that ctpassport fills in place)."""
    marker = Path(path) / OUTPUT_MARKER
    if not marker.is_file():
        marker.write_text("written by ctpassport; --force may replace this folder's contents\n")


def _check_replaceable(p: Path) -> None:
    """Raise unless the existing folder ``p`` is empty or is a ctpassport output (holds the marker)."""
    if (p / OUTPUT_MARKER).is_file():
        return
    entries = sorted(e.name for e in p.iterdir())
    if entries:
        raise OutputError(f"is a folder that ctpassport did not write ({len(entries)} entries, e.g. "
                          f"{entries[0]!r}); not replaced, even with --force", p, "name a new or empty folder")


def _tmp_sibling(path: Path, is_dir: bool) -> Path:
    # Keep the full suffix (".nii.gz") so that writers inferring the format from the name still work.
    suffix = "".join(path.suffixes) if not is_dir else ""
    prefix = f".{path.name[: len(path.name) - len(suffix)]}.tmp-"
    try:
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; give the folder normal permissions
            return tmp
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot be written: {exc.strerror}", path) from None
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
    return Path(name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, *, is_dir: bool = False, foreign_ok: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success rename it onto ``path``, on error remove it.

    For a folder (``is_dir=True``) an existing ``path`` is replaced as a whole, and only when it is empty
    or holds :data:`OUTPUT_MARKER` (written into every folder made here), unless ``foreign_ok``: for caches
    whose path ctpassport chose itself and for DICOM folders, which get no marker. A file output never
    replaces a folder.
    """
    target = Path(path)
    if target.is_dir() and not is_dir:
        raise OutputError("is a folder, but this output is a file", target, "name a file")
    if is_dir and target.is_dir() and not foreign_ok:
        _check_replaceable(target)
    _make_parent(target)
    existed = target.exists() or target.is_symlink()
    tmp = _tmp_sibling(target, is_dir)
    try:
        if is_dir and not foreign_ok:
            mark_output_folder(tmp)
        yield tmp
        if not existed:
            _commit_new(tmp, target, is_dir)
        elif is_dir and target.exists():
            _commit_over_folder(tmp, target)
        else:
            os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _commit_new(tmp: Path, target: Path, is_dir: bool) -> None:
    """Move ``tmp`` to ``target``, which did not exist when the write began: never onto what another process
    wrote there since (it was not there to be checked, ``--force`` or not): :class:`OutputExistsError`."""
    try:
        if is_dir:
            if target.exists() or target.is_symlink():
                raise FileExistsError(errno.EEXIST, "exists", str(target))
            os.rename(tmp, target)  # (onto a non-empty folder made meanwhile: ENOTEMPTY; an empty one: nothing lost)
        else:
            os.link(tmp, target)  # fails when target exists: an atomic "create, never replace"
            tmp.unlink()
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise OutputExistsError(target) from None
        if is_dir or exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        if target.exists() or target.is_symlink():  # a file system without hard links: check, then replace
            raise OutputExistsError(target) from None
        os.replace(tmp, target)


def _commit_over_folder(tmp: Path, target: Path) -> None:
    """Replace the folder ``target`` by ``tmp`` (two renames: folders cannot be swapped in one). Another
    process committing the same folder at the same moment: :class:`OutputError`, the folders left whole."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        os.replace(target, old)
        os.replace(tmp, target)
    except OSError:
        if old.exists() and not target.exists():
            os.replace(old, target)  # put the previous folder back
        raise OutputError("was replaced by another process while this one wrote it", target,
                          "write one output folder from one process at a time") from None
    finally:
        if old.exists() and old != target:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))
