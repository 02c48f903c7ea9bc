"""Atomic outputs: folder replacement only of ctpassport's own folders, wrong-kind and unwritable paths."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctpassport.cli import app
from ctpassport.errors import OutputError, OutputExistsError
from ctpassport.io.atomic import OUTPUT_MARKER, atomic_path, check_writable

runner = CliRunner()


def _write_folder(path: Path, name: str) -> None:
    with atomic_path(path, is_dir=True) as tmp:
        (tmp / name).write_text(name)


def test_folder_output_is_marked_and_replaced_as_a_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write_folder(out, "a.txt")
    assert (out / OUTPUT_MARKER).is_file() and (out / "a.txt").read_text() == "a.txt"
    assert check_writable(out, True, folder=True) == out
    _write_folder(out, "b.txt")
    assert sorted(p.name for p in out.iterdir()) == sorted([OUTPUT_MARKER, "b.txt"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_folder_permissions_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        _write_folder(tmp_path / "out", "a.txt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "a.txt").stat().st_mode) == 0o644


def test_empty_folder_is_used(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    check_writable(out, True, folder=True)
    _write_folder(out, "a.txt")
    assert (out / "a.txt").is_file()


def test_foreign_folder_is_never_replaced(tmp_path: Path) -> None:
    docs = tmp_path / "Documents"
    docs.mkdir()
    (docs / "thesis.docx").write_text("years of work")
    with pytest.raises(OutputExistsError):
        check_writable(docs, False, folder=True)
    with pytest.raises(OutputError, match="did not write.*thesis.docx.*even with --force"):
        check_writable(docs, True, folder=True)
    with pytest.raises(OutputError, match="did not write"):
        _write_folder(docs, "a.txt")
    assert [p.name for p in docs.iterdir()] == ["thesis.docx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Documents"]


def test_wrong_kind_and_unwritable_paths(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    a_file = tmp_path / "file.json"
    a_file.write_text("{}")
    with pytest.raises(OutputError, match="is a folder, but this output is a file"):
        check_writable(folder, True)
    with pytest.raises(OutputError, match="is a folder, but this output is a file"):
        with atomic_path(folder) as tmp:
            tmp.write_text("x")
    with pytest.raises(OutputError, match="is a file, but this output is a folder"):
        check_writable(a_file, True, folder=True)
    with pytest.raises(OutputError, match="part of its folder path is a file"):
        check_writable(a_file / "sub" / "x.json", True)
    assert folder.is_dir() and a_file.read_text() == "{}"


def test_read_only_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root may write anywhere: let the folder answer as it would for a user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    try:
        with pytest.raises(OutputError, match="no permission to write in"):
            check_writable(ro / "x.json", False)
    finally:
        ro.chmod(0o755)


def test_cli_register_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    pts = "x,y,z\n0,0,0\n50,0,0\n0,60,0\n0,0,70\n30,20,10\n"
    fixed, moving = tmp_path / "f.csv", tmp_path / "m.csv"
    fixed.write_text(pts)
    moving.write_text(pts)
    docs = tmp_path / "Documents"
    docs.mkdir()
    (docs / "notes.txt").write_text("keep me")
    args = ["register", "--fixed-points", str(fixed), "--moving-points", str(moving), "-o", str(docs), "-q"]
    res = runner.invoke(app, [*args, "--force"])
    assert res.exit_code == 4, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and "did not write" in res.stderr
    assert [p.name for p in docs.iterdir()] == ["notes.txt"]
    out = tmp_path / "reg"
    assert runner.invoke(app, [*args[:-2], str(out), "-q"]).exit_code == 0
    assert runner.invoke(app, [*args[:-2], str(out), "-q"]).exit_code == 4  # exists, no --force
    assert runner.invoke(app, [*args[:-2], str(out), "-q", "--force"]).exit_code == 0  # its own folder: replaced
    res = runner.invoke(app, [*args[:-2], str(fixed), "-q", "--force"])  # a file where a folder goes
    assert res.exit_code == 4 and "is a file" in res.stderr and fixed.read_text() == pts


def test_an_output_another_process_wrote_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    """Outputs are never replaced without --force: one that did not exist when this write began but does when it
    ends (another process wrote it meanwhile, after this one's check) is refused, file or folder, not replaced."""
    f = tmp_path / "p.json"
    with pytest.raises(OutputExistsError), atomic_path(f) as tmp:
        tmp.write_text("mine")
        f.write_text("theirs")
    assert f.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]
    d = tmp_path / "reg"
    with pytest.raises(OutputExistsError), atomic_path(d, is_dir=True) as tmp:
        (tmp / "a.txt").write_text("mine")
        d.mkdir()
        (d / "b.txt").write_text("theirs")
    assert sorted(p.name for p in d.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "reg"]
    # an output that existed when the write began (checked with --force) is replaced as before
    with atomic_path(f) as tmp:
        tmp.write_text("mine")
    assert f.read_text() == "mine"


def test_two_writers_of_one_folder_at_once_leave_it_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other process's commit lands between this one's two renames: a one-line error, the folders whole."""
    import ctpassport.io.atomic as atomic

    d = tmp_path / "out"
    with atomic_path(d, is_dir=True) as tmp:
        (tmp / "first.txt").write_text("1")
    real_replace = os.replace
    calls = []

    def racing_replace(src: str | Path, dst: str | Path) -> None:
        calls.append(Path(dst).name)
        if len(calls) == 2:  # just before ours: the other writer commits the same folder
            other = tmp_path / "other"
            other.mkdir()
            (other / "other.txt").write_text("2")
            real_replace(other, dst)
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", racing_replace)
    with pytest.raises(OutputError, match="replaced by another process"), atomic_path(d, is_dir=True) as tmp:
        (tmp / "mine.txt").write_text("3")
    monkeypatch.undo()
    assert sorted(p.name for p in d.iterdir()) == ["other.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old-* or .tmp-* left
