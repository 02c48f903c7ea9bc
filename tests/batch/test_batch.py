"""Batch processing: discovery, per-case outputs, failures recorded, kill + resume, local pool, Dask."""

from __future__ import annotations

import csv
import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ctpassport.batch.discover import discover_cases
from ctpassport.batch.runner import BATCH_CSV, BATCH_JSON, output_lock, run_batch
from ctpassport.batch.worker import BatchOptions
from ctpassport.cli import app
from ctpassport.errors import ConfigError, CTPassportError, InputError, OutputError, OutputExistsError
from ctpassport.io.atomic import OUTPUT_MARKER
from ctpassport.io.load import load_ct
from ctpassport.io.nifti import read_image

pytestmark = pytest.mark.torch

CASES = ["a__ct1", "b_ct2", "patient3__series"]


def check_case(case_dir: Path, source: Path) -> dict:  # type: ignore[type-arg]
    """A finished case folder is complete and its labels lie on the input's grid."""
    rec = json.loads((case_dir / "case.json").read_text())
    assert rec["status"] == "ok" and rec["error"] is None
    lab = read_image(case_dir / "labels.nii.gz")
    src = load_ct(source)
    assert lab.shape == src.shape
    np.testing.assert_allclose(lab.affine, src.affine, atol=1e-4)
    assert lab.data.dtype == np.uint8 and lab.data.max() > 0
    stats = json.loads((case_dir / "statistics.json").read_text())
    assert len(stats) == 117 and {"volume", "intensity"} <= set(stats["spleen"])
    tm = json.loads((case_dir / "timings.json").read_text())
    assert {"load", "preprocess", "infer", "postprocess", "write"} <= set(tm["seconds"])
    assert len(rec["source_sha256"]) == 64
    return rec


def test_discover(tmp_path: Path, batch_in: Path) -> None:
    (batch_in / "scans.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an (empty) zip is a candidate case
    out = batch_in / "results"  # an output folder inside the input is not searched
    (out / "x").mkdir(parents=True)
    (out / "x" / "labels.nii.gz").write_bytes(b"")
    cases = discover_cases(batch_in, exclude=out)
    assert [(c.case_id, c.kind) for c in cases] == [("a__ct1", "nifti"), ("b_ct2", "nifti"),
                                                    ("patient3__series", "dicom-folder"), ("scans", "dicom-zip")]
    # Folders ctpassport wrote (an earlier batch's output, a mask folder) are not searched either.
    for marker, where in (("batch.json", "old_batch"), ("case.json", "old_case"), (OUTPUT_MARKER, "masks")):
        (batch_in / where / "sub").mkdir(parents=True)
        (batch_in / where / marker).write_text("{}")
        (batch_in / where / "labels.nii.gz").write_bytes(b"")
        (batch_in / where / "sub" / "labels.nii.gz").write_bytes(b"")
    assert [c.case_id for c in discover_cases(batch_in, exclude=out)] == [c.case_id for c in cases]
    # A DICOM folder given as IN_DIR is itself the one case.
    only = discover_cases(batch_in / "patient3" / "series")
    assert [(c.case_id, c.kind) for c in only] == [("series", "dicom-folder")]
    # DICOM files do not hide the NIfTI files beside or below them (a stray .dcm among NIfTI files, a dcm2niix
    # output inside the series folder); DICOM files below a DICOM folder stay part of its case
    series = batch_in / "patient3" / "series"
    (series / "dcm2niix.nii.gz").write_bytes(b"")
    (series / "more").mkdir()
    (series / "more" / "other.dcm").write_bytes(b"")
    (series / "more" / "converted.nii").write_bytes(b"")
    ids = [(c.case_id, c.kind) for c in discover_cases(batch_in, exclude=out)]
    assert ids == [("a__ct1", "nifti"), ("b_ct2", "nifti"), ("patient3__series", "dicom-folder"),
                   ("patient3__series__dcm2niix", "nifti"), ("patient3__series__more__converted", "nifti"),
                   ("scans", "dicom-zip")], ids
    stray = tmp_path / "stray"
    (stray / "sub").mkdir(parents=True)
    for name in ("ct0.nii.gz", "sub/ct.nii.gz", "notes.dcm"):
        (stray / name).write_bytes(b"")
    ids = [(c.case_id, c.kind) for c in discover_cases(stray)]
    assert ids == [("stray", "dicom-folder"), ("ct0", "nifti"), ("sub__ct", "nifti")], ids
    with pytest.raises(InputError, match="no such folder"):
        discover_cases(tmp_path / "nope")


def test_batch_records_a_corrupt_case_and_goes_on(batch_in: Path, corrupt: Path, tiny_model: Path,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["batch", str(batch_in), str(out), "--model", str(tiny_model), "-q"])
    assert res.exit_code == 8, res.output
    assert "1 of 4 cases failed" in res.output and "Traceback" not in res.output
    doc = json.loads((out / BATCH_JSON).read_text())
    assert doc["status"] == "complete" and doc["counts"] == {"total": 4, "ok": 3, "failed": 1, "pending": 0,
                                                             "resumed": 0}
    by_id = {r["case_id"]: r for r in doc["cases"]}
    assert set(by_id) == {*CASES, "a__ct1_broken"}
    bad = by_id["a__ct1_broken"]
    assert bad["status"] == "failed" and "ct1_broken.nii.gz" in bad["error"] and "\n" not in bad["error"]
    assert not (out / "a__ct1_broken").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([*CASES, BATCH_JSON, BATCH_CSV])  # nothing partial
    check_case(out / "a__ct1", batch_in / "a" / "ct1.nii.gz")
    check_case(out / "b_ct2", batch_in / "b_ct2.nii.gz")
    rec = check_case(out / "patient3__series", batch_in / "patient3" / "series")
    assert rec["study"]["patient_id"] == "P3" and rec["study"]["study_date"] == "2024-02-02"
    assert rec["study"]["modality"] == "CT" and rec["kind"] == "dicom-folder"
    rows = list(csv.DictReader((out / BATCH_CSV).read_text().splitlines()))
    assert [(r["case_id"], r["status"]) for r in rows] == [(c, by_id[c]["status"]) for c in sorted(by_id)]
    # The model is loaded once for the whole (in-process) batch.
    assert {by_id[c]["worker"]["segmenter_loads"] for c in CASES} == {1}
    # An existing batch output is not overwritten without --resume or --force.
    res = CliRunner().invoke(app, ["batch", str(batch_in), str(out), "--model", str(tiny_model), "-q"])
    assert res.exit_code == OutputExistsError.exit_code and "--force" in res.output


def _wait(pred, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_killed_batch_resumes_without_redoing_finished_cases(batch_in: Path, tiny_model: Path, tmp_path: Path,
                                                             ct_dir: Path) -> None:
    # Make the second case (b_*) big so the kill lands while it is being written: many tiles.
    big = read_image(ct_dir / "example_ct.nii.gz")
    from ctpassport.io.nifti import make_nifti, save_nifti

    (batch_in / "b_ct2.nii.gz").unlink()
    save_nifti(make_nifti(big.data, big.affine, big.header), batch_in / "b_big.nii.gz")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ctpassport.cli", "batch", str(batch_in), str(out),
                             "--model", str(tiny_model), "-q"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        first_done = _wait(lambda: (out / "a__ct1" / "case.json").exists(), 180)
        second_started = _wait(lambda: any(p.name.startswith(".b_big.tmp-") for p in out.iterdir()), 60)
        assert first_done and second_started, proc.stderr.read().decode() if proc.poll() is not None else ""
        assert proc.poll() is None, "the batch finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc.stdout.close()
    proc.stderr.close()
    # Killed: the finished case is complete, the interrupted one exists only as a hidden temporary folder.
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert "b_big" not in visible and "a__ct1" in visible
    check_case(out / "a__ct1", batch_in / "a" / "ct1.nii.gz")
    doc = json.loads((out / BATCH_JSON).read_text())
    assert doc["status"] == "running" and {r["case_id"]: r["status"] for r in doc["cases"]}["a__ct1"] == "ok"
    before = {p.name: p.stat().st_mtime_ns for p in (out / "a__ct1").iterdir()}
    first_record = (out / "a__ct1" / "case.json").read_text()

    res = CliRunner().invoke(app, ["batch", str(batch_in), str(out), "--model", str(tiny_model), "--resume", "-q"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / BATCH_JSON).read_text())
    by_id = {r["case_id"]: r for r in doc["cases"]}
    assert doc["status"] == "complete" and doc["counts"]["ok"] == 3 and doc["counts"]["resumed"] == 1
    assert by_id["a__ct1"]["resumed"] is True and by_id["b_big"]["resumed"] is False
    # Nothing of the finished case was redone or rewritten.
    assert {p.name: p.stat().st_mtime_ns for p in (out / "a__ct1").iterdir()} == before
    assert (out / "a__ct1" / "case.json").read_text() == first_record
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the half-written case was removed
    check_case(out / "b_big", batch_in / "b_big.nii.gz")
    check_case(out / "patient3__series", batch_in / "patient3" / "series")
    # A changed input is redone on resume.
    time.sleep(0.01)
    os.utime(batch_in / "a" / "ct1.nii.gz")
    summary = run_batch(batch_in, out, BatchOptions(model=str(tiny_model)), resume=True)
    assert summary.counts()["resumed"] == 2
    assert summary.records["a__ct1"]["resumed"] is False


def _labels(out: Path, case: str) -> np.ndarray:
    return read_image(out / case / "labels.nii.gz").data


def test_local_pool(batch_in: Path, tiny_model: Path, tmp_path: Path) -> None:
    # One inference thread everywhere: the random tiny model has near-tied logits, and another thread count
    # changes float summation order (and so a few argmax ties) -- not what this test is about.
    ref = run_batch(batch_in, tmp_path / "ref", BatchOptions(model=str(tiny_model), threads=1))
    summary = run_batch(batch_in, tmp_path / "pool", BatchOptions(model=str(tiny_model), threads=1), workers=2)
    assert summary.executor == "local-pool(2)" and summary.counts()["ok"] == 3
    pids = {r["worker"]["pid"] for r in summary.records.values()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert {r["worker"]["segmenter_loads"] for r in summary.records.values()} == {1}
    for case in CASES:  # the same labels whichever executor ran them
        np.testing.assert_array_equal(_labels(tmp_path / "pool", case), _labels(tmp_path / "ref", case))
    assert ref.counts()["ok"] == 3


@pytest.mark.slow
def test_dask_local_cluster(batch_in: Path, corrupt: Path, tiny_model: Path, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    ref = run_batch(batch_in, tmp_path / "ref", BatchOptions(model=str(tiny_model), threads=1))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=40) as cluster:
        address = cluster.scheduler_address
        res = CliRunner().invoke(app, ["batch", str(batch_in), str(tmp_path / "dask"), "--scheduler", address,
                                       "--model", str(tiny_model), "--nr_thr", "1", "-q"])
    assert res.exit_code == 8, res.output  # the corrupt case
    doc = json.loads((tmp_path / "dask" / BATCH_JSON).read_text())
    assert doc["executor"] == f"dask({address})"
    assert doc["counts"]["ok"] == 3 and doc["counts"]["failed"] == 1
    ok = [r for r in doc["cases"] if r["status"] == "ok"]
    pids = {r["worker"]["pid"] for r in ok}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert {r["worker"]["segmenter_loads"] for r in ok} == {1}  # loaded once per worker
    for case in CASES:
        np.testing.assert_array_equal(_labels(tmp_path / "dask", case), _labels(tmp_path / "ref", case))
    assert ref.counts()["ok"] == 3
    # --resume on Dask with another model redoes the cases (as locally): the model is read here when this
    # process sees it too. (A copy of the tiny model with one weight changed: another checkpoint hash.)
    torch = pytest.importorskip("torch")
    other = tmp_path / "other_model" / tiny_model.parent.name / tiny_model.name
    shutil.copytree(tiny_model, other)
    ckpt = other / "fold_0" / "checkpoint_final.pth"
    state = torch.load(ckpt, weights_only=False)
    key = next(k for k, v in state["network_weights"].items() if v.dtype.is_floating_point)
    state["network_weights"][key] = state["network_weights"][key] + 1e-3
    torch.save(state, ckpt)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=40) as cluster:
        res = CliRunner().invoke(app, ["batch", str(batch_in), str(tmp_path / "dask"), "--scheduler",
                                       cluster.scheduler_address, "--model", str(other), "--nr_thr", "1", "-q",
                                       "--resume"])
    doc = json.loads((tmp_path / "dask" / BATCH_JSON).read_text())
    assert doc["counts"]["resumed"] == 0 and doc["counts"]["ok"] == 3, res.output


def test_discover_reserved_and_long_names_linked_folders_and_the_output_folder(tmp_path: Path) -> None:
    """Case ids never name the batch's own files and stay short enough for their temporary folders; linked
    folders are searched (each real folder once); the input folder cannot be the output folder."""
    from ctpassport.batch.discover import MAX_CASE_ID

    root = tmp_path / "in"
    root.mkdir()
    for name in ("batch.json.nii.gz", "batch.csv.nii", "x" * 243 + ".nii.gz", "y" * 243 + ".nii.gz"):
        (root / name).write_bytes(b"")
    site = tmp_path / "site1" / "patient"
    site.mkdir(parents=True)
    (site / "ct.nii.gz").write_bytes(b"")
    (root / "cohort").mkdir()
    (root / "cohort" / "site1").symlink_to(tmp_path / "site1", target_is_directory=True)
    (site / "loop").symlink_to(tmp_path / "site1", target_is_directory=True)  # a link back up: searched once
    ids = [c.case_id for c in discover_cases(root)]
    assert "batch.json-2" in ids and "batch.csv-2" in ids and "batch.json" not in ids and "batch.csv" not in ids
    assert "cohort__site1__patient__ct" in ids and len(ids) == 5, ids
    long_ids = [i for i in ids if i.startswith(("x", "y"))]
    assert len(long_ids) == 2 and len(set(long_ids)) == 2 and all(len(i) <= MAX_CASE_ID for i in long_ids)
    assert len(f".{long_ids[0]}.tmp-12345678".encode()) < 255
    with pytest.raises(InputError, match="is both the input and the output folder"):
        discover_cases(root, exclude=root)


def test_ctrl_c_stops_a_local_pool_and_its_workers(batch_in: Path, tiny_model: Path, tmp_path: Path,
                                                   ct_dir: Path) -> None:
    psutil = pytest.importorskip("psutil")
    big = read_image(ct_dir / "example_ct.nii.gz")
    from ctpassport.io.nifti import make_nifti, save_nifti

    for name in ("x_big1", "x_big2", "x_big3", "x_big4"):
        save_nifti(make_nifti(big.data, big.affine, big.header), batch_in / f"{name}.nii.gz")
    out = tmp_path / "out"
    # A suite run as a background job of a script has SIGINT ignored, and an ignored signal stays ignored in the
    # child (where Python then installs no Ctrl-C handler): give the child the default disposition.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "ctpassport.cli", "batch", str(batch_in), str(out),
                                 "--model", str(tiny_model), "--workers", "2", "-q"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finally:
        signal.signal(signal.SIGINT, old)
    try:
        parent = psutil.Process(proc.pid)
        # while the workers start (spawn, imports, model load): where an interrupted pool used to hang
        assert _wait(lambda: len(parent.children(recursive=True)) >= 2, 180)
        time.sleep(1.0)
        workers = parent.children(recursive=True)
        finished_before = sorted(p.parent.name for p in out.glob("*/case.json"))
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.returncode == 130 and "interrupted" in err, err
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, alive
    # stopped at once: the cases in flight were not carried on to the end after the interrupt
    assert sorted(p.parent.name for p in out.glob("*/case.json")) == finished_before
    assert json.loads((out / BATCH_JSON).read_text())["status"] == "interrupted"
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]  # nothing half-written stays


def test_workers_end_when_the_batch_process_is_killed(batch_in: Path, tiny_model: Path, tmp_path: Path,
                                                      ct_dir: Path) -> None:
    """SIGKILL runs no clean-up in the batch process: its local pool's workers notice that their parent is gone
    and end within a second or so, instead of carrying on writing into OUT_DIR (where a resumed batch would
    collide with them) with a model loaded each."""
    psutil = pytest.importorskip("psutil")
    big = read_image(ct_dir / "example_ct.nii.gz")
    from ctpassport.io.nifti import make_nifti, save_nifti

    for name in ("x_big1", "x_big2", "x_big3"):
        save_nifti(make_nifti(big.data, big.affine, big.header), batch_in / f"{name}.nii.gz")
    proc = subprocess.Popen([sys.executable, "-m", "ctpassport.cli", "batch", str(batch_in), str(tmp_path / "out"),
                             "--model", str(tiny_model), "--workers", "2", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        parent = psutil.Process(proc.pid)
        assert _wait(lambda: len(parent.children(recursive=True)) >= 2, 180)
        time.sleep(1.0)
        workers = parent.children(recursive=True)
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    _, alive = psutil.wait_procs(workers, timeout=15)
    for p in alive:  # (do not leave them behind if the test fails)
        p.kill()
    assert not alive, alive


def test_sigterm_marks_the_batch_interrupted(batch_in: Path, tiny_model: Path, tmp_path: Path,
                                            ct_dir: Path) -> None:
    big = read_image(ct_dir / "example_ct.nii.gz")
    from ctpassport.io.nifti import make_nifti, save_nifti

    save_nifti(make_nifti(big.data, big.affine, big.header), batch_in / "x_big.nii.gz")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "ctpassport.cli", "batch", str(batch_in), str(out),
                             "--model", str(tiny_model), "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait(lambda: out.is_dir() and any((".tmp-" in p.name) or (p / "case.json").is_file()
                                                  for p in out.iterdir()), 180)  # cases are being made
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert json.loads((out / BATCH_JSON).read_text())["status"] == "interrupted"  # not left "running"


def test_resume_redoes_cases_made_with_other_options(batch_in: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = run_batch(batch_in, out, BatchOptions(model=str(tiny_model), threads=1))
    assert first.counts()["ok"] == 3
    again = run_batch(batch_in, out, BatchOptions(model=str(tiny_model), threads=1), resume=True)
    assert again.counts()["resumed"] == 3  # same options: kept
    moved = tmp_path / "moved"
    out.rename(moved)  # the summary names the folders where the resumed cases are now
    in_moved = run_batch(batch_in, moved, BatchOptions(model=str(tiny_model), threads=1), resume=True)
    assert in_moved.counts()["resumed"] == 3
    assert {r["output"] for r in in_moved.records.values()} == {str(moved / case) for case in CASES}
    assert str(out) not in (moved / "batch.csv").read_text()
    moved.rename(out)
    changed = run_batch(batch_in, out, BatchOptions(model=str(tiny_model), threads=1, passport=True), resume=True)
    assert changed.counts()["resumed"] == 0 and changed.counts()["ok"] == 3
    assert all((out / case / "passport.json").is_file() for case in CASES)
    normals = BatchOptions(model=str(tiny_model), threads=1, passport=True, passport_normals=True)
    assert run_batch(batch_in, out, normals, resume=True).counts()["resumed"] == 0
    assert run_batch(batch_in, out, normals, resume=True).counts()["resumed"] == 3
    body = BatchOptions(model=str(tiny_model), threads=1, passport=True, passport_normals=True, passport_body=True)
    assert run_batch(batch_in, out, body, resume=True).counts()["resumed"] == 0  # --body: redone, with the outline
    assert all(json.loads((out / case / "passport.json").read_text())["body"]["name"] == "body" for case in CASES)
    for case in CASES:  # a case made before --body existed records no passport_body: it had no outline
        rec_path = out / case / "case.json"
        rec = json.loads(rec_path.read_text())
        del rec["output_options"]["passport_body"]
        rec_path.write_text(json.dumps(rec))
    assert run_batch(batch_in, out, normals, resume=True).counts()["resumed"] == 3


def test_a_failed_redo_leaves_no_stale_output(batch_in: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_batch(batch_in, out, BatchOptions(model=str(tiny_model), threads=1)).counts()["ok"] == 3
    src = batch_in / "a" / "ct1.nii.gz"
    src.write_bytes(src.read_bytes()[:1000])  # now corrupt
    redo = run_batch(batch_in, out, BatchOptions(model=str(tiny_model), threads=1), force=True)
    assert redo.records["a__ct1"]["status"] == "failed"
    assert not (out / "a__ct1").exists()  # the earlier "ok" folder would contradict batch.csv
    # an input gone from the cohort: --force redoes the output as a whole, its old case folder goes too
    (batch_in / "b_ct2.nii.gz").unlink()
    redo = run_batch(batch_in, out, BatchOptions(model=str(tiny_model), threads=1), force=True)
    assert "b_ct2" not in redo.records and not (out / "b_ct2").exists()
    assert sorted(p.parent.name for p in out.glob("*/case.json")) == ["patient3__series"]


def test_a_second_batch_into_a_running_batchs_folder_is_refused(batch_in: Path, tiny_model: Path,
                                                                 tmp_path: Path) -> None:
    """The output folder is locked while a batch runs: a second batch there (even with --force) is refused and
    leaves the first one's temporary case folders alone; once the first is done the folder is free again."""
    out = tmp_path / "out"
    out.mkdir()
    partial = out / ".a__ct1.tmp-1234abcd"  # what the running batch is writing
    partial.mkdir()
    with output_lock(out):
        with pytest.raises(OutputError, match="another ctpassport batch"):
            run_batch(batch_in, out, BatchOptions(model=str(tiny_model), threads=1), force=True)
        assert partial.is_dir()
        res = CliRunner().invoke(app, ["batch", str(batch_in), str(out), "--model", str(tiny_model), "--force",
                                       "-q"])
        assert res.exit_code != 0 and "another ctpassport batch" in res.output, res.output
        assert partial.is_dir() and not (out / BATCH_JSON).exists()
    assert run_batch(batch_in, out, BatchOptions(model=str(tiny_model), threads=1)).counts()["ok"] == 3
    assert not partial.exists()  # the lock is free: this batch cleans what the other left


@pytest.mark.parametrize(("err", "refused"), [("EWOULDBLOCK", True), ("ENOLCK", False), ("EOPNOTSUPP", False)])
def test_output_lock_on_file_systems_without_locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: str,
                                                   refused: bool) -> None:
    """Only a lock held elsewhere refuses the batch; a file system that cannot lock (some network shares)
    runs it unlocked rather than blaming another batch."""
    import errno
    import fcntl

    def flock(fd: int, op: int) -> None:
        raise OSError(getattr(errno, err), err)

    monkeypatch.setattr(fcntl, "flock", flock)
    ran = []
    if refused:
        with pytest.raises(OutputError, match="another ctpassport batch"), output_lock(tmp_path):
            ran.append(1)
    else:
        with output_lock(tmp_path):
            ran.append(1)
    assert ran == ([] if refused else [1])


def test_batch_output_kinds_and_demo_model(batch_in: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    res = CliRunner().invoke(app, ["batch", str(batch_in), str(a_file), "--model", "demo", "-q"])
    assert res.exit_code == 4 and "is a file" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = CliRunner().invoke(app, ["batch", str(batch_in), str(tmp_path / "o"), "--model", "demo",
                                   "--passport-grid", "fine", "-q"])
    assert res.exit_code == 5


def test_a_label_map_given_as_a_ct_is_segmented_with_a_warning(tiny_model: Path, tmp_path: Path) -> None:
    """As `segment` does: the case runs, and the warning is on stderr (with -q too) and in its record."""
    from ctpassport.io.nifti import make_nifti, save_nifti

    src = tmp_path / "in"
    src.mkdir()
    lab = np.zeros((40, 40, 20), np.uint8)
    lab[5:20, 5:20, 3:12], lab[22:35, 10:30, 5:15] = 5, 2
    save_nifti(make_nifti(lab, np.diag([3.0, 3.0, 3.0, 1.0])), src / "seg.nii.gz")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["batch", str(src), str(out), "--model", str(tiny_model), "-q"])
    assert res.exit_code == 0, res.output
    assert "ctpassport: warning: seg: the input holds only 3 distinct values" in res.stderr
    rec = json.loads((out / "seg" / "case.json").read_text())
    assert rec["status"] == "ok" and "label map" in rec["warnings"][0]


def test_bad_arguments(batch_in: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="either --workers"):
        run_batch(batch_in, tmp_path / "o", workers=2, scheduler="tcp://127.0.0.1:1")
    with pytest.raises(ConfigError, match="--workers must be at least 1"):
        run_batch(batch_in, tmp_path / "o", workers=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no CT found"):
        run_batch(empty, tmp_path / "o2")
    with pytest.raises(CTPassportError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:1"):
        run_batch(batch_in, tmp_path / "o3", scheduler="tcp://127.0.0.1:1", connect_timeout=1.0)
    # nothing was written: no batch.json marked "interrupted" that would refuse a plain rerun
    assert not (tmp_path / "o3" / BATCH_JSON).exists() and list((tmp_path / "o3").iterdir()) == []


@pytest.mark.slow
def test_standin_batch_with_passports_into_the_store(ct_dir: Path, standin_home: Path, tmp_path: Path) -> None:
    """The real-size stand-in model: the same CT as NIfTI and as DICOM gives the same labels; the passports
    go into the store with the metadata recorded by the batch."""
    from ctpassport.io.dicom_write import SeriesTags, write_dicom_series
    from ctpassport.passport.schema import load_passport
    from ctpassport.store.db import PassportStore

    src = tmp_path / "in"
    src.mkdir()
    ct = read_image(ct_dir / "example_ct_sm.nii.gz")
    (src / "sm.nii.gz").write_bytes((ct_dir / "example_ct_sm.nii.gz").read_bytes())
    write_dicom_series(ct.data, ct.affine, src / "sm_dicom", SeriesTags(patient_id="P9", study_date="20250101"))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["batch", str(src), str(out), "--passport", "--normals", "--model",
                                   str(standin_home), "-q"])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(_labels(out, "sm"), _labels(out, "sm_dicom"))
    p1, p2 = load_passport(out / "sm" / "passport.json"), load_passport(out / "sm_dicom" / "passport.json")
    assert p1.organs and [o.id for o in p1.organs] == [o.id for o in p2.organs]
    assert all(len(o.boundary_normals or []) == len(o.boundary_points_mm) for o in p1.organs)  # --normals
    db = str(tmp_path / "store.sqlite")
    res = CliRunner().invoke(app, ["store", "add", str(out / "sm" / "passport.json"),
                                   str(out / "sm_dicom" / "passport.json"), "--db", db])
    assert res.exit_code == 0, res.output
    with PassportStore(db) as store:
        recs = {r.source_path: r for r in store.list()}
    dicom_rec = recs[str(src / "sm_dicom")]
    assert (dicom_rec.patient_id, dicom_rec.study_date, dicom_rec.modality) == ("P9", "2025-01-01", "CT")
    nifti_rec = recs[str(src / "sm.nii.gz")]
    assert nifti_rec.n_organs == len(p1.organs) and nifti_rec.patient_id is None
    # Both passports describe the same scan: registering them from the store gives the identity.
    res = CliRunner().invoke(app, ["store", "register", "--fixed-study", nifti_rec.study_key, "--moving-study",
                                   dicom_rec.study_key, "-o", str(tmp_path / "reg"), "--db", db, "-q"])
    assert res.exit_code == 0, res.output
    from ctpassport.register import load_transform

    reg = load_transform(tmp_path / "reg")
    np.testing.assert_allclose(reg.rotation, np.eye(3), atol=1e-6)
    np.testing.assert_allclose(reg.translation, 0.0, atol=1e-4)


def test_missing_model_fails_before_any_case(batch_in: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["batch", str(batch_in), str(tmp_path / "o"), "--model", str(tmp_path / "nomodel"),
                                   "-q"])
    assert res.exit_code == 3 and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()
    res = CliRunner().invoke(app, ["batch", str(batch_in), str(tmp_path / "o"), "--model", "demo", "-q"],
                             env={"CTPASSPORT_THREADS": "abc"})
    assert res.exit_code == 5 and "CTPASSPORT_THREADS='abc'" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()  # refused before any case (was: every case failed with it)
