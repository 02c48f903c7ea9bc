"""Download the public datasets the benchmarks use: resumable, checksum-verified, unpacked atomically.

``ctpassport fetch-data NAME --dest DIR`` writes ``DIR/NAME/`` (see :data:`DATASETS` for each layout) and
``DIR/NAME/ctpassport-fetch.json`` (URL, size, SHA-256, MD5, where the expected checksum came from).

* **Resumable**: the archive downloads to ``DIR/.downloads/<archive>.part``; an interrupted download
  (lost connection, killed process) continues from where it stopped with an HTTP ``Range`` request (a
  server that ignores ranges makes it start over). Connection errors are retried a few times.
* **Checksums**: the expected value comes from ``--sha256``/``--md5``, else the dataset's published
  checksum (:attr:`Dataset.md5` / :attr:`Dataset.sha256`, with :attr:`Dataset.checksum_source` saying where
  it is published), else a SHA-256 recorded on the first successful download on this machine
  (``<cache>/fetch-checksums.json``: trust on first use; later downloads must match it). A mismatch
  deletes the download and anything unpacked: nothing is left behind.
* **Unpacking** goes to a hidden temporary folder next to ``DIR/NAME`` that is renamed into place when
  complete; members that would land outside it (absolute paths, ``..``, links) are refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.client import HTTPException
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from . import __version__
from .errors import ConfigError, CTPassportError, InputError, OutputError, OutputExistsError
from .io.atomic import OUTPUT_MARKER, atomic_path, folder_lock, make_folder, remove_leftovers, write_text_atomic

FETCH_JSON = "ctpassport-fetch.json"
CHUNK = 1 << 20


class FetchError(CTPassportError):
    """A download failed (network, HTTP status, checksum, archive layout)."""

    exit_code = 9


# ------------------------------------------------------------------------------------------------
# layouts: arrange an unpacked archive (in ``root``) into the dataset folder ``dest``
# ------------------------------------------------------------------------------------------------
def _appledouble(p: Path) -> bool:
    return p.name.startswith("._") or p.name == ".DS_Store" or "__MACOSX" in p.parts


def _find_dir(root: Path, name: str) -> Path | None:
    hits = sorted((p for p in root.rglob(name) if p.is_dir() and not _appledouble(p)),
                  key=lambda p: len(p.parts))
    return hits[0] if hits else None


def _move_clean(src: Path, dst: Path) -> list[str]:
    """Move ``src`` (a folder) to ``dst`` dropping macOS metadata files; returns the moved file names."""
    dst.mkdir(parents=True, exist_ok=True)
    names = []
    for p in sorted(src.iterdir()):
        if _appledouble(p) or p.name.startswith("."):
            continue
        shutil.move(str(p), str(dst / p.name))
        names.append(p.name)
    return names


def _layout_msd_spleen(root: Path, dest: Path) -> dict[str, Any]:
    """MSD Task09_Spleen -> ``imagesTr/`` (41 CTs), ``labelsTr/`` (spleen masks), ``imagesTs/`` (20 CTs),
    ``dataset.json`` (the MSD file); the ``._*`` AppleDouble files of the tar are dropped."""
    task = _find_dir(root, "imagesTr")
    if task is None or not (task.parent / "labelsTr").is_dir():
        raise FetchError("the archive has no Task09_Spleen/imagesTr and labelsTr folders (not MSD Task09_Spleen?)")
    base = task.parent
    images = _move_clean(base / "imagesTr", dest / "imagesTr")
    labels = _move_clean(base / "labelsTr", dest / "labelsTr")
    test = _move_clean(base / "imagesTs", dest / "imagesTs") if (base / "imagesTs").is_dir() else []
    if (base / "dataset.json").is_file():
        shutil.move(str(base / "dataset.json"), str(dest / "dataset.json"))
    cts = [n for n in images if n.endswith((".nii.gz", ".nii"))]
    if not cts:
        raise FetchError("the archive's imagesTr folder holds no NIfTI files")
    return {"cts": [f"imagesTr/{n}" for n in cts] + [f"imagesTs/{n}" for n in test if n.endswith((".nii", ".nii.gz"))],
            "labels": [f"labelsTr/{n}" for n in labels], "benchmark_input": "imagesTr"}


#: The Learn2Reg task description the lung CT layout writes (read by ``validate-registration --learn2reg``).
LUNGCT_TASK_JSON = "LungCT_dataset.json"


def _layout_learn2reg_lungct(root: Path, dest: Path) -> dict[str, Any]:
    """Learn2Reg lung CT (inspiration/expiration pairs) -> ``scans/case_NNN_{insp,exp}.nii.gz``,
    ``lungMasks/``, ``pairs.csv`` (case, fixed = inspiration, moving = expiration) and a Learn2Reg task
    description, :data:`LUNGCT_TASK_JSON` (the pairs as ``training_paired_images``), so that the folder is a
    Learn2Reg task folder for ``validate-registration --learn2reg``. Keypoint CSVs, when the archive has a
    ``keypoints/`` folder, go to ``keypointsTr/`` where that command looks for them (the 2020 training archive
    has none: its keypoints were published separately; put their CSVs there, named like the scans)."""
    scans = _find_dir(root, "scans")
    if scans is None:
        raise FetchError("the archive has no scans/ folder (not the Learn2Reg lung CT training data?)")
    names = _move_clean(scans, dest / "scans")
    for extra, to in (("lungMasks", "lungMasks"), ("keypoints", "keypointsTr")):
        d = _find_dir(root, extra)
        if d is not None:
            _move_clean(d, dest / to)
    pairs = []
    for n in names:
        if "_insp" in n:
            exp = n.replace("_insp", "_exp")
            if exp in names:
                case = n.split("_insp")[0]
                pairs.append((case, f"scans/{n}", f"scans/{exp}"))
    if not pairs:
        raise FetchError("the archive's scans/ folder holds no *_insp / *_exp pairs")
    lines = ["case,fixed,moving"] + [",".join(p) for p in pairs]
    (dest / "pairs.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    task = {"name": "LungCT", "description": "Learn2Reg 2020 task 2 lung CT training pairs, laid out by "
            "ctpassport fetch-data (fixed: inspiration, moving: expiration)", "tensorImageSize": {"0": "3D"},
            "modality": {"0": "CT"}, "numPairedTraining": len(pairs),
            "training_paired_images": [{"fixed": f"./{f}", "moving": f"./{m}"} for _case, f, m in pairs]}
    (dest / LUNGCT_TASK_JSON).write_text(json.dumps(task, indent=2) + "\n", encoding="utf-8")
    return {"cts": [f"scans/{n}" for n in names if n.endswith((".nii", ".nii.gz"))], "pairs": "pairs.csv",
            "task_json": LUNGCT_TASK_JSON, "benchmark_input": "scans"}


@dataclass(frozen=True)
class Dataset:
    """A downloadable dataset: where it is, how to check it, how to lay it out."""

    name: str
    url: str
    archive: str
    description: str
    layout: Callable[[Path, Path], dict[str, Any]]
    md5: str | None = None
    sha256: str | None = None
    checksum_source: str = "none published; SHA-256 recorded on first download"
    license: str = ""


DATASETS: dict[str, Dataset] = {
    "msd-spleen": Dataset(
        name="msd-spleen",
        url="https://msd-for-monai.s3-us-west-2.amazonaws.com/Task09_Spleen.tar",
        archive="Task09_Spleen.tar",
        description="Medical Segmentation Decathlon Task09 Spleen: 41 portal-venous CTs with spleen masks, 20 test CTs",
        layout=_layout_msd_spleen,
        md5="410d4a301da4e5b2f6f86ec3ddba524e",
        checksum_source="MD5 published by MONAI (monai.apps.datasets.DecathlonDataset, Task09_Spleen); "
                        "the SHA-256 is recorded on first download",
        license="CC-BY-SA 4.0 (medicaldecathlon.com)",
    ),
    "learn2reg-lungct": Dataset(
        name="learn2reg-lungct",
        url="https://zenodo.org/records/3835682/files/training.zip?download=1",
        archive="learn2reg_lungct_training.zip",
        description="Learn2Reg 2020 task 2 lung CT training data (Zenodo 3835682): inspiration/expiration pairs "
                    "with lung masks (Radboud UMC)",
        layout=_layout_learn2reg_lungct,
        checksum_source="no checksum known to ctpassport (Zenodo lists an MD5 on the record page, not copied "
                        "here); the SHA-256 is recorded on first download (trust on first use)",
        license="see doi:10.5281/zenodo.3835682",
    ),
}


# ------------------------------------------------------------------------------------------------
# downloading
# ------------------------------------------------------------------------------------------------
def _content_range_start(value: str | None) -> int | None:
    # "bytes 100-199/200"
    if not value or not value.startswith("bytes "):
        return None
    try:
        return int(value[6:].split("-", 1)[0])
    except ValueError:
        return None


def download(url: str, part: Path, *, retries: int = 3, timeout: float = 60.0,
             progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Download ``url`` into ``part``, continuing a partial file with an HTTP Range request.

    ``progress(bytes_so_far, total_or_None)`` is called as data arrives. Connection errors are retried
    ``retries`` times (each retry resumes). On failure the partial file stays for the next call.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    attempt = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": f"ctpassport/{__version__}"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with urlopen(Request(url, headers=headers), timeout=timeout) as resp:
                status = getattr(resp, "status", 200)
                if have and status == 206 and _content_range_start(resp.headers.get("Content-Range")) == have:
                    mode = "ab"
                else:  # full body: the server ignored the range (or there was nothing yet)
                    mode, have = "wb", 0
                length = resp.headers.get("Content-Length")
                total = have + int(length) if length is not None and length.isdigit() else None
                got = have
                with part.open(mode) as fh:
                    while True:
                        block = resp.read(CHUNK)
                        if not block:
                            break
                        fh.write(block)
                        got += len(block)
                        if progress is not None:
                            progress(got, total)
                if total is not None and got < total:
                    raise ConnectionError(f"connection closed after {got} of {total} bytes")
                return part
        except HTTPError as exc:
            if exc.code == 416 and have:  # range not satisfiable: the partial file is already complete
                return part
            raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (URLError, HTTPException, ConnectionError, TimeoutError, OSError) as exc:
            attempt += 1
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, str | FileNotFoundError | IsADirectoryError | NotADirectoryError | PermissionError):
                # "no host given", a file:// URL naming nothing: trying again cannot help
                raise FetchError(f"{url}: download failed ({reason})") from None
            if attempt > retries:
                kept = part.stat().st_size if part.exists() else 0
                raise FetchError(f"{url}: download failed ({reason}); run the command again"
                                 + (" to resume" if kept else ""),
                                 hint=f"{kept} bytes kept in {part}" if kept else None) from None
            time.sleep(min(2.0 ** attempt * 0.25, 10.0))


def file_digests(path: Path) -> dict[str, str]:
    """Hex SHA-256 and MD5 of a file."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            sha.update(block)
            md5.update(block)
    return {"sha256": sha.hexdigest(), "md5": md5.hexdigest()}


def checksum_record_path() -> Path:
    """Where first-download SHA-256s are recorded (``<ctpassport cache>/fetch-checksums.json``)."""
    from .config import Config

    return Config.from_env().cache_dir / "fetch-checksums.json"


def _recorded(url: str) -> str | None:
    try:
        return json.loads(checksum_record_path().read_text(encoding="utf-8")).get(url)
    except (OSError, ValueError):
        return None


def _record_checksum(url: str, sha256: str) -> None:
    path = checksum_record_path()
    make_folder(path.parent, "the cache folder")
    # fetches running at once each add their own record: read, add and write under one lock
    with folder_lock(path.parent, "is locked", "", wait=True):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            doc = {}
        doc[url] = sha256
        write_text_atomic(path, json.dumps(doc, indent=2, sort_keys=True))


# ------------------------------------------------------------------------------------------------
# unpacking
# ------------------------------------------------------------------------------------------------
def _safe_target(root: Path, name: str) -> Path:
    target = (root / name).resolve()
    if name.startswith(("/", "\\")) or (target != root and root not in target.parents):
        raise FetchError(f"the archive member {name!r} would be written outside the dataset folder")
    return target


#: What a damaged or unsupported archive raises while it is read (not while files are written: OSError).
_DAMAGED = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError)


def unpack(archive: Path, into: Path) -> None:
    """Unpack a tar (any compression) or zip archive into ``into``, refusing unsafe members.

    A damaged archive (bad CRC, a broken deflate stream, truncated) or one that cannot be read here (an
    encrypted member, an unsupported compression method) is a :class:`FetchError`; errors writing the files
    (a full disk) stay :class:`OSError`."""
    try:
        _unpack(archive, into.resolve())
    except _DAMAGED as exc:
        raise FetchError(f"{archive.name}: damaged or unsupported archive ({type(exc).__name__}: {exc})") from None


def _unpack(archive: Path, root: Path) -> None:
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                _safe_target(root, m.name)
                if m.issym() or m.islnk() or m.isdev():
                    raise FetchError(f"the archive member {m.name!r} is a link or device (refused)")
            tf.extractall(root, filter="data")
        return
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                target = _safe_target(root, info.filename)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
        return
    raise FetchError(f"{archive.name} is neither a tar nor a zip archive")


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------
def check_fetch_arguments(name: str, dest: str | Path, *, url: str | None = None, sha256: str | None = None,
                          md5: str | None = None) -> None:
    """Fail before any download on an unknown dataset, a ``dest`` that is not a folder, a URL that is not
    http(s)/ftp/file, or checksums that are not 64 (SHA-256) / 32 (MD5) hex digits."""
    from urllib.parse import urlparse

    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}", hint=f"choose one of {', '.join(DATASETS)}")
    d = Path(dest)
    if d.exists() and not d.is_dir():
        raise OutputError("is a file, but --dest must be a folder", d)
    up = next((p for p in d.absolute().parents if p.exists()), None)
    if up is not None and not up.is_dir():
        raise OutputError(f"--dest {str(dest)!r} lies under a file, not a folder", up, "choose another --dest")
    if url is not None:
        try:
            parsed = urlparse(url)
            ok = parsed.scheme in ("http", "https", "ftp", "file") and not any(c.isspace() for c in url)
            ok = ok and (parsed.scheme == "file" or bool(parsed.hostname))
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"--url must be an http(s), ftp or file URL with a host, not {url!r}")
    for flag, value, n in (("--sha256", sha256, 64), ("--md5", md5, 32)):
        if value is not None and not re.fullmatch(f"[0-9a-fA-F]{{{n}}}", value):
            raise ConfigError(f"{flag} must be {n} hexadecimal digits, not {value!r}")


def check_dataset_folder(folder: Path) -> None:
    """Raise :class:`OutputError` unless ``folder`` (``DEST/DATASET``) may be replaced by a fresh download:
    absent, empty, fetched by ctpassport (it holds ``ctpassport-fetch.json``) or written by ctpassport (its
    output marker). Anything else there is the user's own and is never replaced, ``force`` or not."""
    if folder.is_dir():
        if (folder / FETCH_JSON).is_file() or (folder / OUTPUT_MARKER).is_file():
            return
        entries = sorted(e.name for e in folder.iterdir())
        if entries:
            raise OutputError(f"is a folder that ctpassport did not fetch ({len(entries)} entries, e.g. "
                              f"{entries[0]!r}); not replaced, even with --force", folder,
                              "move it away or choose another --dest")
    elif folder.exists() or folder.is_symlink():
        raise OutputError("exists and is not a folder; the dataset is unpacked into a folder of that name",
                          folder, "move it away or choose another --dest")


def _same_archive(final: Path, sha256: str | None, md5: str | None) -> None:
    """An already fetched ``final`` must be the archive the given checksums name, else :class:`OutputError`."""
    try:
        info = json.loads((final / FETCH_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}
    for flag, want, key in (("--sha256", sha256, "sha256"), ("--md5", md5, "md5")):
        have = info.get(key) if isinstance(info, dict) else None
        if want is not None and have != want.lower():
            raise OutputError(f"holds a download whose {key.upper()} is {have}, not the {flag} given", final,
                              "pass --force to fetch that archive instead")


def partial_download(dest: Path, name: str, url: str) -> Path:
    """Where the archive of dataset ``name`` from ``url`` downloads to (``DEST/.downloads/``): one partial file
    per URL, so that a download resumed later never splices another URL's bytes onto this one's."""
    tag = hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]
    return dest / ".downloads" / f"{DATASETS[name].archive}.{tag}.part"


def fetch_dataset(name: str, dest: str | Path, *, url: str | None = None, sha256: str | None = None,
                  md5: str | None = None, force: bool = False, keep_archive: bool = False, retries: int = 3,
                  timeout: float = 60.0, progress: Callable[[int, int | None], None] | None = None,
                  say: Callable[[str], None] | None = None) -> Path:
    """Download, verify and unpack dataset ``name`` into ``dest/name``; returns that folder.

    ``url``/``sha256``/``md5`` override the dataset's (e.g. a mirror). An existing complete dataset
    folder is kept as it is when it is the archive the given checksums name (:class:`OutputError` when it is
    another; :class:`OutputExistsError` with ``force=False`` when the folder exists but is not a finished
    download). A first-download SHA-256 is recorded only once the archive has unpacked into its layout.
    """
    check_fetch_arguments(name, dest, url=url, sha256=sha256, md5=md5)
    ds = DATASETS[name]
    src_url = url or ds.url
    dest = Path(dest).resolve()
    final = dest / name
    note = say or (lambda _msg: None)
    if final.exists() and not force:
        if (final / FETCH_JSON).is_file():
            _same_archive(final, sha256, md5)
            note(f"{final} is already there (delete it or pass --force to fetch again)")
            return final
        raise OutputExistsError(final)
    check_dataset_folder(final)
    created_dest = not dest.exists()
    make_folder(dest, "the --dest folder", "choose another --dest")
    part = partial_download(dest, name, src_url)
    downloads = make_folder(part.parent, "the download folder", "choose another --dest")
    with folder_lock(downloads, f"is being used by another ctpassport fetch-data into {dest}",
                     "wait for it to finish, or choose another --dest"):
        remove_leftovers(dest, name)  # a killed run's half-unpacked copy
        return _fetch_locked(ds, src_url, dest, part, created_dest, sha256=sha256, md5=md5,
                             keep_archive=keep_archive, retries=retries, timeout=timeout, progress=progress,
                             note=note)


def _fetch_locked(ds: Dataset, src_url: str, dest: Path, part: Path, created_dest: bool, *, sha256: str | None,
                  md5: str | None, keep_archive: bool, retries: int, timeout: float,
                  progress: Callable[[int, int | None], None] | None, note: Callable[[str], None]) -> Path:
    final = dest / ds.name
    downloads = part.parent
    if sha256 or md5:  # explicit checksums replace the published ones
        expected_sha, expected_md5 = (sha256 or "").lower() or None, (md5 or "").lower() or None
        source: str | None = "given on the command line"
    else:  # a mirror (--url) serves the same file: the published checksums still apply
        expected_sha, expected_md5 = ds.sha256, ds.md5
        source = ds.checksum_source if (ds.sha256 or ds.md5) else None
    if expected_sha is None and expected_md5 is None:
        expected_sha = _recorded(src_url)
        if expected_sha is not None:
            source = f"recorded on the first download ({checksum_record_path()})"

    def clean_all() -> None:
        part.unlink(missing_ok=True)
        if downloads.is_dir() and not any(downloads.iterdir()):
            downloads.rmdir()
        if created_dest and dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()

    note(f"Downloading {src_url}")
    try:
        download(src_url, part, retries=retries, timeout=timeout, progress=progress)
    except FetchError:
        if not part.exists() or part.stat().st_size == 0:
            clean_all()  # nothing worth resuming
        raise
    digests = file_digests(part)
    for kind, want in (("SHA-256", expected_sha), ("MD5", expected_md5)):
        got = digests["sha256" if kind == "SHA-256" else "md5"]
        if want is not None and got != want:
            clean_all()
            raise FetchError(f"{ds.archive}: {kind} mismatch: expected {want}, got {got}",
                             hint="the download was deleted; nothing was unpacked")
    first = source is None  # trust on first use: recorded below, once the archive proved to be the dataset
    if first:
        source = f"none known; SHA-256 recorded now as the reference for later downloads ({checksum_record_path()})"
    size = part.stat().st_size
    try:
        with atomic_path(final, is_dir=True, foreign_ok=True) as tmp:
            raw = tmp / ".unpacked"
            raw.mkdir()
            unpack(part, raw)
            info = ds.layout(raw, tmp)
            shutil.rmtree(raw)
            info.update(dataset=ds.name, description=ds.description, url=src_url, archive=ds.archive, bytes=size,
                        sha256=digests["sha256"], md5=digests["md5"], checksum_source=source,
                        license=ds.license, fetched=datetime.now(UTC).isoformat(timespec="seconds"),
                        ctpassport_version=__version__)
            write_text_atomic(tmp / FETCH_JSON, json.dumps(info, indent=2))
    except FetchError:  # not the dataset's archive (damaged, unsafe, another layout): not worth keeping
        clean_all()
        raise
    except OSError as exc:  # writing failed (a full disk): the verified download stays for the next run
        raise OutputError(f"cannot unpack the dataset here ({exc.strerror or exc})", dest,
                          f"the verified download is kept in {part}; free space (or choose another --dest) "
                          "and run the command again") from None
    if first:
        try:
            _record_checksum(src_url, digests["sha256"])
        except OutputError as exc:  # the dataset is fine; only later downloads go unchecked
            note(f"warning: the SHA-256 was not recorded for later downloads: {exc}")
    if keep_archive:
        shutil.move(str(part), str(dest / ds.archive))
    clean_all()
    return final


def dataset_help() -> str:
    return "; ".join(f"{d.name}: {d.description}" for d in DATASETS.values())

