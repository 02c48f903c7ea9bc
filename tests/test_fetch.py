"""fetch-data against a local HTTP server (127.0.0.1): layout, resume with Range, checksums, cleanup."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ctpassport.cli import app
from ctpassport.errors import OutputError
from ctpassport.fetch import DATASETS, FETCH_JSON, FetchError, download, fetch_dataset, partial_download
from ctpassport.io.nifti import make_nifti, nifti_bytes, read_image


class ArchiveServer:
    """Serves ``files`` (name -> bytes) with HTTP Range support. ``drop_after`` makes the next N responses
    close the connection after that many body bytes; ``ranges`` logs the Range headers received."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drop_after: int | None = None
        self.drops_left = 0
        self.ignore_range = False
        self.requests: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/").split("?")[0]
                rng = self.headers.get("Range")
                server.requests.append(rng)
                if name not in server.files:
                    self.send_error(404)
                    return
                body = server.files[name]
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                part = body[start:]
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                if server.drops_left > 0 and server.drop_after is not None:
                    server.drops_left -= 1
                    self.wfile.write(part[: server.drop_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(part)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[ArchiveServer]:
    s = ArchiveServer()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # First-download checksums are recorded in the cache: keep each test's apart.
    monkeypatch.setenv("CTPASSPORT_CACHE_DIR", str(tmp_path / "cache"))


def tiny_nifti(value: int) -> bytes:
    data = np.full((4, 5, 6), value, dtype=np.int16)
    return nifti_bytes(make_nifti(data, np.diag([2.0, 2.0, 3.0, 1.0])), compress=True)


def msd_tar() -> bytes:
    """A miniature Task09_Spleen.tar with the real archive's layout, AppleDouble junk included."""
    members = {
        "Task09_Spleen/dataset.json": json.dumps({"name": "Spleen", "numTraining": 2}).encode(),
        "Task09_Spleen/imagesTr/spleen_2.nii.gz": tiny_nifti(-100),
        "Task09_Spleen/imagesTr/spleen_3.nii.gz": tiny_nifti(50),
        "Task09_Spleen/imagesTr/._spleen_2.nii.gz": b"\0\5\26\7AppleDouble",
        "Task09_Spleen/labelsTr/spleen_2.nii.gz": tiny_nifti(1),
        "Task09_Spleen/labelsTr/spleen_3.nii.gz": tiny_nifti(1),
        "Task09_Spleen/imagesTs/spleen_1.nii.gz": tiny_nifti(7),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def lung_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for case in ("case_001", "case_002"):
            zf.writestr(f"training/scans/{case}_insp.nii.gz", tiny_nifti(-800))
            zf.writestr(f"training/scans/{case}_exp.nii.gz", tiny_nifti(-700))
            zf.writestr(f"training/lungMasks/{case}_insp.nii.gz", tiny_nifti(1))
    return buf.getvalue()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_msd_spleen_layout_via_cli(server: ArchiveServer, tmp_path: Path) -> None:
    blob = msd_tar()
    server.files["Task09_Spleen.tar"] = blob
    dest = tmp_path / "data"
    res = CliRunner().invoke(app, ["fetch-data", "msd-spleen", "--dest", str(dest), "--url",
                                   server.url("Task09_Spleen.tar"), "--sha256", sha(blob), "-q"])
    assert res.exit_code == 0, res.output
    root = dest / "msd-spleen"
    assert res.stdout.strip() == str(root)
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == ["spleen_2.nii.gz", "spleen_3.nii.gz"]
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == ["spleen_2.nii.gz", "spleen_3.nii.gz"]
    assert (root / "imagesTs" / "spleen_1.nii.gz").is_file() and (root / "dataset.json").is_file()
    assert read_image(root / "imagesTr" / "spleen_3.nii.gz").data.max() == 50
    info = json.loads((root / FETCH_JSON).read_text())
    assert info["sha256"] == sha(blob) and info["bytes"] == len(blob)
    assert info["checksum_source"] == "given on the command line" and info["benchmark_input"] == "imagesTr"
    assert info["cts"][:2] == ["imagesTr/spleen_2.nii.gz", "imagesTr/spleen_3.nii.gz"]
    assert sorted(p.name for p in dest.iterdir()) == ["msd-spleen"]  # no archive, no partial files left
    # Already there: nothing is downloaded again.
    n = len(server.requests)
    res = CliRunner().invoke(app, ["fetch-data", "msd-spleen", "--dest", str(dest), "--url",
                                   server.url("Task09_Spleen.tar"), "-q"])
    assert res.exit_code == 0 and len(server.requests) == n


def test_learn2reg_layout_and_first_download_checksum(server: ArchiveServer, tmp_path: Path) -> None:
    blob = lung_zip()
    server.files["training.zip"] = blob
    root = fetch_dataset("learn2reg-lungct", tmp_path / "d", url=server.url("training.zip"))
    assert (root / "pairs.csv").read_text().splitlines() == [
        "case,fixed,moving", "case_001,scans/case_001_insp.nii.gz,scans/case_001_exp.nii.gz",
        "case_002,scans/case_002_insp.nii.gz,scans/case_002_exp.nii.gz"]
    assert len(list((root / "scans").iterdir())) == 4 and (root / "lungMasks").is_dir()
    info = json.loads((root / FETCH_JSON).read_text())
    assert info["sha256"] == sha(blob) and "recorded now" in info["checksum_source"]
    # The recorded SHA-256 now guards later downloads of that URL: a changed file is refused and removed.
    server.files["training.zip"] = blob[:-10] + b"X" * 10
    with pytest.raises(FetchError, match="SHA-256 mismatch"):
        fetch_dataset("learn2reg-lungct", tmp_path / "d2", url=server.url("training.zip"))
    assert not (tmp_path / "d2").exists()
    server.files["training.zip"] = blob
    again = fetch_dataset("learn2reg-lungct", tmp_path / "d3", url=server.url("training.zip"))
    assert "recorded on the first download" in json.loads((again / FETCH_JSON).read_text())["checksum_source"]


def test_failed_checksum_leaves_nothing(server: ArchiveServer, tmp_path: Path) -> None:
    server.files["a.tar"] = msd_tar()
    dest = tmp_path / "data"
    res = CliRunner().invoke(app, ["fetch-data", "msd-spleen", "--dest", str(dest), "--url", server.url("a.tar"),
                                   "--sha256", "0" * 64, "-q"])
    assert res.exit_code == FetchError.exit_code
    assert "SHA-256 mismatch" in res.output and "Traceback" not in res.output
    assert not dest.exists()
    # The published MD5 applies to a mirror too: a file that is not the real archive is refused.
    with pytest.raises(FetchError, match="MD5 mismatch"):
        fetch_dataset("msd-spleen", dest, url=server.url("a.tar"))
    assert not dest.exists()
    # Into an existing folder: only what was there before stays.
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(FetchError):
        fetch_dataset("msd-spleen", dest, url=server.url("a.tar"), md5="0" * 32)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


def test_resume_with_range_after_dropped_connection(server: ArchiveServer, tmp_path: Path) -> None:
    blob = msd_tar()
    server.files["t.tar"] = blob
    server.drop_after, server.drops_left = 3000, 1
    root = fetch_dataset("msd-spleen", tmp_path / "d", url=server.url("t.tar"), sha256=sha(blob))
    assert server.requests == [None, "bytes=3000-"]  # the retry continued where the data stopped
    assert (root / FETCH_JSON).is_file()


def test_resume_across_runs(server: ArchiveServer, tmp_path: Path) -> None:
    blob = lung_zip()
    server.files["z.zip"] = blob
    server.drop_after, server.drops_left = 1000, 1
    dest = tmp_path / "d"
    with pytest.raises(FetchError, match="run the command again to resume"):
        fetch_dataset("learn2reg-lungct", dest, url=server.url("z.zip"), sha256=sha(blob), retries=0)
    part = partial_download(dest, "learn2reg-lungct", server.url("z.zip"))
    assert part.stat().st_size == 1000 and not (dest / "learn2reg-lungct").exists()
    root = fetch_dataset("learn2reg-lungct", dest, url=server.url("z.zip"), sha256=sha(blob), retries=0)
    assert server.requests[-1] == "bytes=1000-" and (root / "pairs.csv").is_file()
    assert not (dest / ".downloads").exists()


def test_server_without_range_support_restarts(server: ArchiveServer, tmp_path: Path) -> None:
    blob = lung_zip()
    server.files["z.zip"] = blob
    part = tmp_path / "x.part"
    part.write_bytes(b"garbage-from-before")
    server.ignore_range = True
    download(server.url("z.zip"), part)
    assert part.read_bytes() == blob


def test_http_errors_and_unsafe_archives(server: ArchiveServer, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_dataset("msd-spleen", tmp_path / "a", url=server.url("missing.tar"), sha256="0" * 64)
    assert not (tmp_path / "a").exists()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../evil.txt", "x")
    server.files["evil.zip"] = buf.getvalue()
    with pytest.raises(FetchError, match="outside the dataset folder"):
        fetch_dataset("learn2reg-lungct", tmp_path / "b", url=server.url("evil.zip"), sha256=sha(buf.getvalue()))
    assert not (tmp_path / "b").exists() and not (tmp_path / "evil.txt").exists()
    server.files["plain.zip"] = lung_zip().replace(b"scans", b"other")
    with pytest.raises(FetchError, match="no scans/ folder"):
        fetch_dataset("learn2reg-lungct", tmp_path / "c", url=server.url("plain.zip"),
                      sha256=sha(server.files["plain.zip"]))
    assert not (tmp_path / "c").exists()
    res = CliRunner().invoke(app, ["fetch-data", "nope", "--dest", str(tmp_path / "d"), "-q"])
    assert res.exit_code != 0 and "unknown dataset 'nope'" in res.output


def test_registry_points_at_the_public_archives() -> None:
    assert DATASETS["msd-spleen"].url == "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task09_Spleen.tar"
    assert DATASETS["msd-spleen"].md5 == "410d4a301da4e5b2f6f86ec3ddba524e"
    assert DATASETS["learn2reg-lungct"].url.startswith("https://zenodo.org/records/3835682/")
    assert DATASETS["learn2reg-lungct"].md5 is None and DATASETS["learn2reg-lungct"].sha256 is None


@pytest.mark.parametrize("args,code,message", [
    (["bogus", "--dest", "{d}/fd"], 2, "unknown dataset 'bogus'"),
    (["msd-spleen", "--dest", "{d}/a_file"], 4, "is a file, but --dest must be a folder"),
    (["msd-spleen", "--dest", "{d}/fd", "--url", "notaurl"], 5, "--url must be"),
    (["msd-spleen", "--dest", "{d}/fd", "--sha256", "nothex"], 5, "--sha256 must be 64 hexadecimal digits"),
    (["msd-spleen", "--dest", "{d}/fd", "--md5", "abc"], 5, "--md5 must be 32 hexadecimal digits"),
])
def test_arguments_checked_before_any_download(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    (tmp_path / "a_file").write_text("x")
    res = CliRunner().invoke(app, ["fetch-data", *[a.format(d=tmp_path) for a in args]])
    assert res.exit_code == code and len(res.stderr.strip().splitlines()) == 1 and message in res.stderr, res.output
    assert not (tmp_path / "fd").exists()


@pytest.mark.parametrize("force", [False, True])
def test_a_dataset_folder_that_ctpassport_did_not_fetch_is_never_replaced(
    server: ArchiveServer, tmp_path: Path, force: bool
) -> None:
    blob = msd_tar()
    server.files["Task09_Spleen.tar"] = blob
    dest = tmp_path / "data"
    (dest / "msd-spleen").mkdir(parents=True)
    (dest / "msd-spleen" / "my_notes.txt").write_text("mine")
    (dest / "learn2reg-lungct").write_text("a file where the dataset folder goes")
    for name, what in (("msd-spleen", "did not fetch"), ("learn2reg-lungct", "is not a folder")):
        res = CliRunner().invoke(app, ["fetch-data", name, "--dest", str(dest), "--url",
                                       server.url("Task09_Spleen.tar"), "--sha256", sha(blob), "-q"]
                                 + (["--force"] if force else []))
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 4 and len(lines) == 1 and what in lines[0], res.output
    assert server.requests == []  # refused before any download
    assert (dest / "msd-spleen" / "my_notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (dest / "msd-spleen").iterdir()) == ["my_notes.txt"]
    assert (dest / "learn2reg-lungct").read_text().startswith("a file")
    # a folder it fetched itself is replaced by --force
    (dest / "msd-spleen" / "my_notes.txt").unlink()
    (dest / "msd-spleen").rmdir()
    res = CliRunner().invoke(app, ["fetch-data", "msd-spleen", "--dest", str(dest), "--url",
                                   server.url("Task09_Spleen.tar"), "--sha256", sha(blob), "-q"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["fetch-data", "msd-spleen", "--dest", str(dest), "--url",
                                   server.url("Task09_Spleen.tar"), "--sha256", sha(blob), "-q", "--force"])
    assert res.exit_code == 0 and (dest / "msd-spleen" / FETCH_JSON).is_file(), res.output


def test_fetch_dataset_with_force_never_replaces_a_foreign_folder(server: ArchiveServer, tmp_path: Path) -> None:
    """The library call is protected like the command: ``force=True`` replaces only what ctpassport fetched."""
    blob = msd_tar()
    server.files["Task09_Spleen.tar"] = blob
    (tmp_path / "msd-spleen").mkdir()
    (tmp_path / "msd-spleen" / "results.csv").write_text("mine")
    with pytest.raises(OutputError, match="did not fetch"):
        fetch_dataset("msd-spleen", tmp_path, url=server.url("Task09_Spleen.tar"), sha256=sha(blob), force=True)
    assert server.requests == [] and (tmp_path / "msd-spleen" / "results.csv").read_text() == "mine"


def test_a_bad_first_download_does_not_become_the_reference(server: ArchiveServer, tmp_path: Path) -> None:
    """Trust on first use records the SHA-256 only once the archive unpacked into the dataset's layout: an error
    page served as the archive fails, and the genuine archive is still accepted afterwards."""
    blob = lung_zip()
    server.files["training.zip"] = b"<html>Service temporarily unavailable</html>"
    with pytest.raises(FetchError, match="neither a tar nor a zip"):
        fetch_dataset("learn2reg-lungct", tmp_path / "d", url=server.url("training.zip"), retries=0)
    server.files["training.zip"] = blob
    root = fetch_dataset("learn2reg-lungct", tmp_path / "d", url=server.url("training.zip"), retries=0)
    assert json.loads((root / FETCH_JSON).read_text())["sha256"] == sha(blob)
    # a partial download from another URL is never resumed with this one's bytes
    dest = tmp_path / "e"
    server.files["other.zip"] = msd_tar()
    server.drop_after, server.drops_left = 700, 1
    with pytest.raises(FetchError, match="to resume"):
        fetch_dataset("learn2reg-lungct", dest, url=server.url("other.zip"), retries=0)
    assert partial_download(dest, "learn2reg-lungct", server.url("other.zip")).stat().st_size == 700
    server.files["training2.zip"] = blob
    root = fetch_dataset("learn2reg-lungct", dest, url=server.url("training2.zip"), sha256=sha(blob), retries=0)
    assert server.requests[-1] is None and (root / "pairs.csv").is_file()


def _damaged_zip() -> bytes:
    blob = bytearray(lung_zip_deflated())
    start = blob.index(b"case_001_exp.nii.gz") + len("case_001_exp.nii.gz")
    blob[start + 5: start + 40] = b"\xff" * 35  # a broken deflate stream (zlib.error, not BadZipFile)
    return bytes(blob)


def lung_zip_deflated() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for case in ("case_001", "case_002"):
            zf.writestr(f"training/scans/{case}_insp.nii.gz", np.arange(4000, dtype=np.int16).tobytes())
            zf.writestr(f"training/scans/{case}_exp.nii.gz", np.arange(4000, dtype=np.int16).tobytes())
    return buf.getvalue()


def test_a_damaged_archive_is_one_line_and_deleted(server: ArchiveServer, tmp_path: Path) -> None:
    server.files["bad.zip"] = bad = _damaged_zip()
    dest = tmp_path / "d"
    res = CliRunner().invoke(app, ["fetch-data", "learn2reg-lungct", "--dest", str(dest), "--url",
                                   server.url("bad.zip"), "--sha256", sha(bad), "-q"])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == FetchError.exit_code and len(lines) == 1 and "damaged" in lines[0], res.output
    assert not dest.exists()  # the download went with it: a rerun downloads afresh


def test_a_full_disk_while_unpacking_keeps_the_verified_download(
    server: ArchiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import ctpassport.fetch as fetch

    blob = lung_zip()
    server.files["z.zip"] = blob
    dest = tmp_path / "d"

    def full(archive: Path, root: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fetch, "_unpack", full)
    with pytest.raises(OutputError, match="No space left on device.*kept in"):
        fetch_dataset("learn2reg-lungct", dest, url=server.url("z.zip"), retries=0)
    part = partial_download(dest, "learn2reg-lungct", server.url("z.zip"))
    assert part.read_bytes() == blob and not (dest / "learn2reg-lungct").exists()
    assert [p.name for p in dest.iterdir() if p.name.startswith(".learn2reg")] == []
    monkeypatch.undo()
    monkeypatch.setenv("CTPASSPORT_CACHE_DIR", str(tmp_path / "cache"))
    n = len(server.requests)
    root = fetch_dataset("learn2reg-lungct", dest, url=server.url("z.zip"), retries=0)
    assert server.requests[n:] == [f"bytes={len(blob)}-"]  # nothing downloaded again
    assert "recorded now" in json.loads((root / FETCH_JSON).read_text())["checksum_source"]


def test_leftovers_of_a_killed_unpack_are_removed(server: ArchiveServer, tmp_path: Path) -> None:
    server.files["z.zip"] = blob = lung_zip()
    dest = tmp_path / "d"
    (dest / ".learn2reg-lungct.tmp-k1ll3d" / "scans").mkdir(parents=True)
    (dest / ".other.tmp-x").mkdir()  # someone else's: kept
    fetch_dataset("learn2reg-lungct", dest, url=server.url("z.zip"), sha256=sha(blob))
    assert sorted(p.name for p in dest.iterdir()) == [".other.tmp-x", "learn2reg-lungct"]


def test_checksums_given_for_a_dataset_already_there_must_match_it(server: ArchiveServer, tmp_path: Path) -> None:
    server.files["z.zip"] = blob = lung_zip()
    fetch_dataset("learn2reg-lungct", tmp_path, url=server.url("z.zip"), sha256=sha(blob))
    n = len(server.requests)
    assert fetch_dataset("learn2reg-lungct", tmp_path, url=server.url("z.zip"), sha256=sha(blob).upper()).is_dir()
    with pytest.raises(OutputError, match="holds a download whose SHA256 is .*pass --force"):
        fetch_dataset("learn2reg-lungct", tmp_path, url=server.url("y.zip"), sha256="1" * 64)
    with pytest.raises(OutputError, match="whose MD5"):
        fetch_dataset("learn2reg-lungct", tmp_path, md5="2" * 32)
    assert len(server.requests) == n


def test_learn2reg_lungct_is_a_learn2reg_task_folder(server: ArchiveServer, tmp_path: Path) -> None:
    from ctpassport.register.validate import learn2reg_listed_pairs

    server.files["z.zip"] = blob = lung_zip()
    root = fetch_dataset("learn2reg-lungct", tmp_path, url=server.url("z.zip"), sha256=sha(blob))
    pairs = learn2reg_listed_pairs(root)
    assert [(f.name, m.name, test) for f, m, test in pairs] == [
        ("case_001_insp.nii.gz", "case_001_exp.nii.gz", False), ("case_002_insp.nii.gz", "case_002_exp.nii.gz", False)]
    assert all(f.is_file() and m.is_file() for f, m, _ in pairs)


@pytest.mark.parametrize("dest,url,code,message", [
    ("{d}/a_file/sub", None, 4, "lies under a file"),
    ("{d}/fd", "http://[::1/t.tar", 5, "--url must be"),
    ("{d}/fd", "http:///no-host.tar", 5, "--url must be"),
    ("{d}/fd", "http://example.org/a file.tar", 5, "--url must be"),
])
def test_more_arguments_checked_before_any_download(tmp_path: Path, dest: str, url: str | None, code: int,
                                                    message: str) -> None:
    (tmp_path / "a_file").write_text("x")
    res = CliRunner().invoke(app, ["fetch-data", "msd-spleen", "--dest", dest.format(d=tmp_path)]
                             + (["--url", url] if url else []))
    assert res.exit_code == code and len(res.stderr.strip().splitlines()) == 1 and message in res.stderr, res.output


def test_a_url_that_cannot_work_is_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctpassport.fetch as fetch

    def no_sleep(_s: float) -> None:
        raise AssertionError("retried")

    monkeypatch.setattr(fetch.time, "sleep", no_sleep)
    with pytest.raises(FetchError, match="download failed"):
        download((tmp_path / "missing.tar").as_uri(), tmp_path / "x.part")


def test_first_download_records_made_at_once_are_all_kept(tmp_path: Path) -> None:
    """Several fetches recording their first-download SHA-256 at the same moment each keep theirs (the record
    file is read, updated and written under a lock)."""
    from concurrent.futures import ThreadPoolExecutor

    import ctpassport.fetch as fetch

    urls = [f"http://mirror{i}.example/a.zip" for i in range(12)]
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda u: fetch._record_checksum(u, hashlib.sha256(u.encode()).hexdigest()), urls))
    doc = json.loads(fetch.checksum_record_path().read_text())
    assert doc == {u: hashlib.sha256(u.encode()).hexdigest() for u in urls}
