"""Atomic writes: a crash or an error never leaves a half-written output behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputExistsError


def check_writable(path: str | Path, force: bool) -> Path:
    """Refuse to overwrite ``path`` unless ``force``; create its parent folder. Returns the path."""
    p = Path(path)
    if p.exists() and not force:
        raise OutputExistsError(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _tmp_sibling(path: Path, is_dir: bool) -> Path:
    # Keep the full suffix (".nii.gz") so that writers inferring the format from the name still work.
    suffix = "".join(path.suffixes) if not is_dir else ""
    prefix = f".{path.name[: len(path.name) - len(suffix)]}.tmp-"
    if is_dir:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
    return Path(name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success rename it onto ``path``, on error remove it.

    For a folder (``is_dir=True``) an existing ``path`` is replaced as a whole.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(target, is_dir)
    try:
        yield tmp
        if is_dir:
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
            else:
                os.replace(tmp, target)
        else:
            os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))
