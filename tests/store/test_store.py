"""The passport store on SQLite and PostgreSQL: idempotent adds, lookups, concurrent writers, the CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ctpassport.cli import app
from ctpassport.errors import ConfigError, InputError
from ctpassport.passport.schema import load_passport, save_passport
from ctpassport.store.db import PassportStore, StoreError, StudyMeta, resolve_db_url

pytest.importorskip("sqlalchemy")


def sha(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def meta(n: int, **kw: object) -> StudyMeta:
    return StudyMeta(source_sha256=sha(n), **kw)  # type: ignore[arg-type]


def test_add_get_list_roundtrip(db_url: str, make_passport) -> None:  # type: ignore[no-untyped-def]
    pp = make_passport()
    with PassportStore(db_url) as store:
        rec, created = store.add(pp, meta(1, patient_id="P1", study_date="20240105", modality="CT",
                                         study_uid="1.2.3", series_uid="1.2.3.4", description="chest"))
        assert created and rec.study_key == sha(1)[:12]
        assert (rec.patient_id, rec.study_date, rec.modality, rec.n_organs) == ("P1", "2024-01-05", "CT", 4)
        got = store.get(rec.study_key)
        back = got.load_passport()
        assert [o.id for o in back.organs] == [o.id for o in pp.organs]
        for a, b in zip(back.organs, pp.organs):
            np.testing.assert_allclose(a.centroid_mm, b.centroid_mm)
            assert a.boundary_points_mm == b.boundary_points_mm
        store.add(make_passport(shift_mm=(5, 0, 0)), meta(2, study_key="baseline", patient_id="P1",
                                                          study_date="2023-12-01"))
        store.add(make_passport(), meta(3, patient_id="P2"))
        assert [r.study_key for r in store.list()] == ["baseline", rec.study_key, sha(3)[:12]]
        assert [r.study_key for r in store.list(patient_id="P1")] == ["baseline", rec.study_key]
        assert store.count() == 3


def test_duplicate_adds_are_idempotent_by_source_hash(db_url: str, make_passport) -> None:  # type: ignore[no-untyped-def]
    with PassportStore(db_url) as store:
        first, created = store.add(make_passport(), meta(7, study_key="s7", patient_id="A"))
        assert created
        again, created = store.add(make_passport(shift_mm=(1, 2, 3)), meta(7, study_key="other", patient_id="B"))
        assert not created
        assert again.summary() == first.summary() and again.passport_json == first.passport_json
        assert store.count() == 1
        with pytest.raises(StoreError, match="study key 's7' is already used by another source"):
            store.add(make_passport(), meta(8, study_key="s7"))
        assert store.count() == 1


def test_values_longer_than_the_columns_are_refused_on_every_backend(db_url: str, make_passport) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL refuses a value longer than its column (SQLite would keep it): both refuse it, in one line
    that names the field, and store nothing."""
    with PassportStore(db_url) as store:
        for kw, words in (({"patient_id": "P" * 65}, "patient id (--patient-id) is 65 characters"),
                          ({"modality": "CT ANGIOGRAPHY 3D"}, "modality (--modality) is 17 characters"),
                          ({"study_key": "s" * 129}, "study key (--study) is 129 characters")):
            with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
                store.add(make_passport(), meta(9, **kw))
        assert store.count() == 0
        rec, _ = store.add(make_passport(), meta(9, patient_id="P" * 64, modality="C" * 16))
        assert rec.patient_id == "P" * 64


def test_lookup_by_key_id_and_hash_prefix(db_url: str, make_passport) -> None:  # type: ignore[no-untyped-def]
    with PassportStore(db_url) as store:
        a, _ = store.add(make_passport(), StudyMeta(source_sha256="ab" * 32, study_key="first"))
        b, _ = store.add(make_passport(), StudyMeta(source_sha256="ab" * 31 + "cd", study_key="second"))
        assert store.get("first").id == a.id
        assert store.get(str(b.id)).study_key == "second"
        assert store.get("ab" * 31 + "c").study_key == "second"
        with pytest.raises(StoreError, match="matches 2 studies"):
            store.get("abababab")
        with pytest.raises(StoreError, match="no study 'zzz'"):
            store.get("zzz")
        removed = store.delete("first")
        assert removed.id == a.id and store.count() == 1


def test_a_second_connection_sees_the_same_store(db_url: str, make_passport) -> None:  # type: ignore[no-untyped-def]
    with PassportStore(db_url) as one:
        one.add(make_passport(), meta(11))
    with PassportStore(db_url) as two:  # schema creation again is harmless
        assert two.count() == 1


WRITER = textwrap.dedent("""
    import hashlib, json, random, sys
    from ctpassport.passport.schema import load_passport
    from ctpassport.store.db import PassportStore, StudyMeta
    db, seed, *files = sys.argv[1:]
    rng = random.Random(int(seed))
    jobs = [(f, i) for i, f in enumerate(files)]
    rng.shuffle(jobs)
    out = []
    with PassportStore(db) as store:
        for f, i in jobs:
            name = f.rsplit("/", 1)[-1]
            sha = hashlib.sha256(name.encode()).hexdigest()
            rec, created = store.add(load_passport(f), StudyMeta(source_sha256=sha, patient_id="P" + seed))
            out.append([name, rec.id, created])
    print(json.dumps(out))
""")


def test_concurrent_writers(db_url: str, make_passport, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    shared = []
    for n in range(6):  # every writer adds these (duplicates across processes)
        shared.append(save_passport(make_passport(shift_mm=(n, 0, 0), points=50), tmp_path / f"{n + 1:x}a.json"))
    procs = []
    for w in range(4):
        own = [save_passport(make_passport(shift_mm=(0, w, k), points=50), tmp_path / f"{w}{k}b.json")
               for k in range(3)]
        files = [str(p) for p in shared + own]
        procs.append(subprocess.Popen([sys.executable, "-c", WRITER, db_url, str(w), *files],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out))
    # Each shared passport was created exactly once, all writers agree on its id; nothing is lost.
    for name in [p.name for p in shared]:
        hits = [(rid, created) for res in results for (n, rid, created) in res if n == name]
        assert len(hits) == 4 and len({rid for rid, _ in hits}) == 1
        assert sum(created for _, created in hits) == 1
    with PassportStore(db_url) as store:
        assert store.count() == 6 + 4 * 3
        for rec in store.list():
            assert rec.load_passport().organs  # every row is whole
        if store.engine.dialect.name == "sqlite":
            with store.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"


def test_redact_url_hides_passwords_in_the_address_and_the_query() -> None:
    from ctpassport.store.db import redact_url

    for url in ("postgresql://ctp:s3cret@db.example/passports",
                "postgresql://ctp@/passports?host=/run/pg&password=s3cret&port=5432"):
        shown = redact_url(url)
        assert "s3cret" not in shown and "***" in shown and "ctp" in shown, shown
    assert redact_url("/data/passports.sqlite") == "/data/passports.sqlite"


def test_resolve_db_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_db_url(tmp_path / "x.sqlite") == f"sqlite:///{tmp_path / 'x.sqlite'}"
    assert resolve_db_url("postgresql://u@h:5/d") == "postgresql+psycopg://u@h:5/d"
    assert resolve_db_url("postgresql+psycopg://u@h/d") == "postgresql+psycopg://u@h/d"
    monkeypatch.setenv("CTPASSPORT_DB", str(tmp_path / "env.sqlite"))
    assert resolve_db_url(None).endswith("env.sqlite")
    with pytest.raises(ConfigError, match="unsupported database URL scheme 'mysql'"):
        resolve_db_url("mysql://u@h/d")
    with pytest.raises(StoreError):
        PassportStore("postgresql://nobody@127.0.0.1:1/none")


def test_cli_add_list_show_with_dicom_metadata(db_url: str, make_passport, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ctpassport.io.dicom_write import SeriesTags, write_dicom_series
    from ctpassport.io.load import source_sha256

    ct = tmp_path / "ct"
    write_dicom_series(np.zeros((8, 8, 4), np.int16), np.diag([2.0, 2.0, 3.0, 1.0]), ct,
                       SeriesTags(patient_id="PX-1", study_date="20220317", study_description="CT ABDOMEN"))
    pfile = save_passport(make_passport(), tmp_path / "p.json")
    runner = CliRunner()
    res = runner.invoke(app, ["store", "add", str(pfile), "--ct", str(ct), "--study", "px1-2022", "--db", db_url])
    assert res.exit_code == 0, res.output
    assert "added: px1-2022" in res.output
    res = runner.invoke(app, ["store", "add", str(pfile), "--ct", str(ct), "--db", db_url])
    assert res.exit_code == 0 and "already stored: px1-2022" in res.output
    res = runner.invoke(app, ["store", "list", "--json", "--db", db_url])
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert (row["patient_id"], row["study_date"], row["modality"], row["description"]) == \
        ("PX-1", "2022-03-17", "CT", "CT ABDOMEN")
    assert row["source_sha256"] == source_sha256(ct)
    res = runner.invoke(app, ["store", "show", "px1-2022", "--db", db_url, "--passport-out", str(tmp_path / "o.json")])
    assert res.exit_code == 0 and "spleen" in res.stdout and "patient_id: PX-1" in res.stdout
    assert load_passport(tmp_path / "o.json").organs[0].id == 1
    res = runner.invoke(app, ["store", "show", "px1-2022", "--db", db_url, "--passport-out", str(tmp_path / "q.json"),
                              "-q"])  # export quietly, like every command that writes an output
    assert res.exit_code == 0 and res.stdout == "" and load_passport(tmp_path / "q.json").organs[0].id == 1
    res = runner.invoke(app, ["store", "show", "nope", "--db", db_url])
    assert res.exit_code == StoreError.exit_code and "no study 'nope'" in res.output


def test_reading_never_creates_a_store_and_bad_stores_are_one_line_errors(tmp_path: Path, make_passport) -> None:  # type: ignore[no-untyped-def]
    runner = CliRunner()
    typo = tmp_path / "typo.sqlite"
    res = runner.invoke(app, ["store", "list", "--db", str(typo)])
    assert res.exit_code == 2 and "no such passport store" in res.stderr and not typo.exists()
    not_db = tmp_path / "notes.txt"
    not_db.write_text("not a database " * 100)
    res = runner.invoke(app, ["store", "list", "--db", str(not_db)])
    assert res.exit_code != 0 and "Traceback" not in res.output and len(res.stderr.strip().splitlines()) == 1
    assert "internal error" not in res.stderr
    res = runner.invoke(app, ["store", "list", "--db", str(not_db / "x.sqlite")])  # a parent is a file
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    pfile = save_passport(make_passport(), tmp_path / "p.json")
    res = runner.invoke(app, ["store", "add", str(pfile), "--ct", str(not_db), "--db", str(tmp_path / "s.sqlite")])
    assert res.exit_code == 2 and "notes.txt" in res.stderr  # --ct must be a CT, not any file
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), str(ct))
    res = runner.invoke(app, ["store", "add", str(pfile), "--ct", str(ct), "--study", "  ",
                              "--db", str(tmp_path / "s.sqlite")])
    assert res.exit_code == 2 and "blank" in res.stderr


def test_read_only_opening_reads_and_never_writes(db_url: str, make_passport, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`store list/show/register` open the store read-only: a store on a read-only share can be read."""
    with PassportStore(db_url) as store:
        store.add(make_passport(), meta(1, study_key="a"))
    with PassportStore(db_url, read_only=True) as ro:
        assert [r.study_key for r in ro.list()] == ["a"] and ro.get("a").n_organs == 4
        if db_url.startswith("sqlite"):  # SQLite enforces it (mode=ro); PostgreSQL reads as the same user
            with pytest.raises(StoreError, match="readonly"):
                ro.add(make_passport(), meta(2))
    if db_url.startswith("sqlite"):
        from ctpassport.store.db import _sqlite_read_only_url

        path = db_url[len("sqlite:///"):]
        assert _sqlite_read_only_url(db_url).endswith("?mode=ro&uri=true")  # its folder is writable here
        empty = tmp_path / "empty.sqlite"
        import sqlite3

        sqlite3.connect(empty).close()  # (as a store's file is while its first `store add` runs)
        with pytest.raises(InputError, match="is an empty passport store"):
            PassportStore(empty, read_only=True)
        other = sqlite3.connect(tmp_path / "other.sqlite")
        other.execute("CREATE TABLE t (x)")
        other.close()
        with pytest.raises(StoreError, match="not a passport store"):
            PassportStore(tmp_path / "other.sqlite", read_only=True)
        assert Path(path).is_file()


def test_a_store_read_from_a_read_only_folder_with_pending_changes_is_refused(
    tmp_path: Path, make_passport, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    """Read from a folder this process cannot write, a store is opened immutable (its write-ahead log ignored):
    one whose -wal file holds changes would read stale or damaged, so it is refused in one line."""
    import ctpassport.store.db as db

    store_path = tmp_path / "s.sqlite"
    with PassportStore(store_path) as store:
        store.add(make_passport(), meta(1, study_key="a"))
    real_access = db.os.access
    monkeypatch.setattr(db.os, "access", lambda p, mode: False if mode == db.os.W_OK else real_access(p, mode))
    with PassportStore(store_path, read_only=True) as ro:  # no pending changes: read as it is
        assert [r.study_key for r in ro.list()] == ["a"]
    (tmp_path / "s.sqlite-wal").write_bytes(b"\0" * 4096)  # changes a writer elsewhere has not checkpointed
    with pytest.raises(StoreError, match="write-ahead log"):
        PassportStore(store_path, read_only=True)


def test_cli_add_needs_a_source(tmp_path: Path, make_passport) -> None:  # type: ignore[no-untyped-def]
    pfile = save_passport(make_passport(), tmp_path / "p.json")  # built from arrays: no source hash
    res = CliRunner().invoke(app, ["store", "add", str(pfile), "--db", str(tmp_path / "s.sqlite")])
    assert res.exit_code == InputError.exit_code
    assert "cannot tell which CT" in res.output and "--ct" in res.output


def test_register_from_the_store_without_images(db_url: str, make_passport, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ctpassport.register import load_transform

    shift, angle = np.array([12.0, -6.0, 4.5]), 8.0
    with PassportStore(db_url) as store:
        store.add(make_passport(), meta(101, study_key="2023-baseline", patient_id="P1", study_date="2023-01-10"))
        store.add(make_passport(shift_mm=tuple(shift), angle_deg=angle),
                  meta(102, study_key="2024-followup", patient_id="P1", study_date="2024-01-12"))
    out = tmp_path / "reg"
    res = CliRunner().invoke(app, ["store", "register", "--fixed-study", "2023-baseline", "--moving-study",
                                   "2024-followup", "-o", str(out), "--db", db_url, "-q"])
    assert res.exit_code == 0, res.output
    result = load_transform(out)
    # T maps fixed to moving: the follow-up shows the anatomy rotated about +z and shifted.
    t = np.radians(angle)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    np.testing.assert_allclose(result.rotation, rot, atol=0.02)
    np.testing.assert_allclose(result.translation, shift, atol=1.5)
    summary = json.loads((out / "registration.json").read_text())
    assert summary["store"]["fixed"]["study_key"] == "2023-baseline"
    assert summary["store"]["moving"]["study_date"] == "2024-01-12"
    res = CliRunner().invoke(app, ["store", "register", "--fixed-study", "2023-baseline", "--moving-study",
                                   "nope", "-o", str(tmp_path / "reg2"), "--db", db_url, "-q"])
    assert res.exit_code == StoreError.exit_code and not (tmp_path / "reg2").exists()


def test_a_stored_passport_this_version_cannot_read_is_a_one_line_error(tmp_path: Path, make_passport) -> None:  # type: ignore[no-untyped-def]
    """A store shared with a newer ctpassport may hold a passport of a newer schema: `store show` and
    `store register` name the study and the version instead of failing with an internal error."""
    import sqlite3

    db = tmp_path / "shared.sqlite"
    with PassportStore(db) as store:
        rec, _ = store.add(make_passport(), StudyMeta(source_sha256="cd" * 32, study_key="newer"))
        store.add(make_passport((5.0, 0.0, 0.0)), StudyMeta(source_sha256="ef" * 32, study_key="other"))
    doc = json.loads(rec.passport_json)
    doc["schema_version"] = "1.4"
    doc["organs"][0]["new_field"] = [1, 2]
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE ctp_studies SET passport_json = ? WHERE study_key = 'newer'", (json.dumps(doc),))
    runner = CliRunner()
    want = ("stored study newer: written with passport schema 1.4, newer than this ctpassport reads (1.3)",
            "new_field", "upgrade ctpassport")
    res = runner.invoke(app, ["store", "show", "newer", "--db", str(db)])
    assert res.exit_code == 2 and all(w in res.stderr for w in want), res.stderr
    assert "internal error" not in res.stderr
    res = runner.invoke(app, ["store", "register", "--fixed-study", "other", "--moving-study", "newer",
                              "--db", str(db), "-o", str(tmp_path / "reg")])
    assert res.exit_code == 2 and all(w in res.stderr for w in want), res.stderr
    assert not (tmp_path / "reg").exists()
