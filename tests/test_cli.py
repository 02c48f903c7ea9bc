"""The command line, in-process: TotalSegmentator-like segment, --force, -q, --version, one-line errors."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ctpassport import __version__
from ctpassport.cli import app
from ctpassport.model.folder import FAST_DATASET, FAST_TRAINER_FOLDER

runner = CliRunner()


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    aff = np.diag([3.0, 3.0, 3.0, 1.0]) if affine is None else affine
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        img = nib.Nifti1Image(data, None)
        img.header.set_sform(aff, code=1)
        img.header["pixdim"][1:4] = np.sqrt((aff[:3, :3] ** 2).sum(0))
        nib.save(img, str(path))
    return path


def _save_unoriented(path: Path, data: np.ndarray) -> Path:
    img = nib.Nifti1Image(data, None)
    img.header["sform_code"] = img.header["qform_code"] = 0
    img.header["pixdim"][1:4] = 0.0
    nib.save(img, str(path))
    return path


def test_version() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"ctpassport {__version__}"


def test_help_lists_commands() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("segment", "model", "classes"):
        assert cmd in res.stdout


def test_readme_lists_every_exit_code() -> None:
    """Each exit code the CLI can give (the error classes' codes and the ones handle_errors sets) is explained in
    the README's list, so a script's author can rely on it."""
    import importlib
    import inspect
    import re

    from ctpassport.errors import CTPassportError

    for mod in ("ctpassport.errors", "ctpassport.store.db", "ctpassport.fetch", "ctpassport.batch.runner",
                "ctpassport.bench.runner"):
        importlib.import_module(mod)

    def subclasses(cls: type) -> set[type]:
        return {cls} | {s for c in cls.__subclasses__() for s in subclasses(c)}

    codes = {c.exit_code for c in subclasses(CTPassportError)}
    source = inspect.getsource(importlib.import_module("ctpassport.cli").handle_errors)
    codes |= {int(v) for v in re.findall(r"typer\.Exit\((\d+)\)", source)}
    assert {1, 2, 3, 4, 5, 6, 7, 8, 9, 70, 75, 130, 141} <= codes
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    listing = " ".join(readme.split("a nonzero exit (", 1)[1].split("`--debug` shows", 1)[0].split())
    listed = {int(v) for v in re.findall(r"(?:^|[(;,] )(\d+) [a-z]", listing)}
    assert codes <= listed, f"exit codes not explained in the README: {sorted(codes - listed)}"


def test_classes() -> None:
    res = runner.invoke(app, ["classes"])
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 117 and lines[0] == "1\tspleen"


BAD_INPUTS = {
    "missing": (None, "no such file"),
    "text": (lambda p: p.write_text("not an image"), "not gzip-compressed"),
    "corrupt_gzip": (lambda p: p.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 50), "corrupt gzip"),
    "two_d": (lambda p: _save(p, np.zeros((16, 16), np.int16)), "2-D"),
    "four_d": (lambda p: _save(p, np.zeros((8, 8, 8, 2), np.int16)), "4-D"),
    "nan": (lambda p: _save(p, np.full((8, 8, 8), np.nan, np.float32)), "NaN"),
    "zero_spacing": (lambda p: _save(p, np.zeros((8, 8, 8), np.int16), np.diag([0.0, 3, 3, 1])), "spacing"),
    "huge_spacing": (lambda p: _save(p, np.zeros((8, 8, 8), np.int16), np.diag([1e6, 3, 3, 1])), "spacing"),
    # no sform/qform and pixdim 0: nibabel would make it 1 mm (and log to stderr)
    "pixdim_zero": (lambda p: _save_unoriented(p, np.zeros((8, 8, 8), np.int16)), "spacing is unknown"),
    # 1 mm thick: no voxel of the model's 3 mm grid fits
    "thin_slab": (lambda p: _save(p, np.full((8, 8, 1), -1000, np.int16), np.diag([3.0, 3, 1, 1])), "too thin"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_error_and_no_output(case: str, tmp_path: Path) -> None:
    maker, message = BAD_INPUTS[case]
    inp = tmp_path / f"{case}.nii.gz"
    if maker is not None:
        maker(inp)
    out = tmp_path / "out" / "seg.nii.gz"
    res = runner.invoke(app, ["segment", "-i", str(inp), "-o", str(out), "--ml", "--model", "demo", "-q"])
    assert res.exit_code != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("ctpassport: error: ") and message in lines[0] and inp.name in lines[0]
    assert "Traceback" not in res.output
    assert not out.exists()
    assert not (out.parent.exists() and any(out.parent.iterdir()))


@pytest.mark.parametrize("extra,code,message", [
    (["--passport-grid", "fine", "--ml"], 5, "--passport-grid must be output or model"),
    (["--output-type", "png"], 5, "--output-type must be nifti or dicom_seg"),
    (["-ot", "dicom"], 5, "--output-type dicom (DICOM RT-STRUCT) is not supported (use --output-type dicom_seg"),
    (["-ss", "-s"], 5, "--skip_saving is not supported"),
    (["--preview"], 5, "--preview is not supported"),
    (["-bs"], 5, "--body_seg is not supported"),
    (["-ta", "lung_vessels"], 5, "--task 'lung_vessels' is not supported"),
    (["-d", "mps"], 5, "--device must be cpu, gpu or gpu:N"),
    (["-d", "GPU"], 5, "--device must be cpu, gpu or gpu:N"),
    (["--ml", "-o", "seg.nrrd"], 2, "must end with .nii or .nii.gz"),
    (["-nr", "-1"], 5, "--nr_thr must be >= 0"),
    (["--statistics-path", "s.json"], 5, "add -s (--statistics)"),
    (["--ts-unsupported", "-ff"], 5, "TotalSegmentator's -ff is not supported (the 6 mm model"),
])
def test_settings_and_output_names_are_checked_before_any_work(tmp_path: Path, extra: list[str], code: int,
                                                               message: str) -> None:
    """A mistake that would only fail at the end (after inference) fails at once, before the input is read."""
    args = ["segment", "-i", str(tmp_path / "not_read_yet.nii.gz"), "-o", str(tmp_path / "seg.nii.gz"), "-q"]
    if "-o" in extra:
        args[4] = str(tmp_path / extra[extra.index("-o") + 1])
        extra = [e for i, e in enumerate(extra) if e != "-o" and (i == 0 or extra[i - 1] != "-o")]
    res = runner.invoke(app, [*args, *extra])
    assert res.exit_code == code and len(res.stderr.strip().splitlines()) == 1 and message in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_totalsegmentator_command_lines_mean_what_they_mean_there(tmp_path: Path, ct_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """TotalSegmentator's spellings work: -ml, --fast/-f (always on), -fs, -ns, -v, -ta total are accepted;
    -f is --fast there, so it never overwrites (--force does); --device gpu without a GPU falls back to the CPU
    with a warning, as TotalSegmentator does; gpu:N names a visible GPU."""
    from ctpassport.segment.backends import cuda_available

    ct = str(ct_dir / "example_ct_sm.nii.gz")
    out = tmp_path / "seg.nii.gz"
    ts = ["segment", "-i", ct, "-o", str(out), "-ml", "-f", "-fs", "-ns", "2", "-v", "-ta", "total",
          "--model", "demo", "-q"]
    res = runner.invoke(app, ts)
    assert res.exit_code == 0 and out.is_file(), res.output
    made = out.stat().st_mtime_ns
    res = runner.invoke(app, ts)  # -f is --fast: the existing output is kept
    assert res.exit_code == 4 and "--force" in res.stderr and out.stat().st_mtime_ns == made
    if not cuda_available():
        res = runner.invoke(app, [*ts, "--force", "-d", "gpu"])
        assert res.exit_code == 0, res.output
        assert res.stderr.strip() == "ctpassport: warning: no CUDA GPU is visible: running on the CPU"
        assert out.stat().st_mtime_ns != made
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    res = runner.invoke(app, [*ts, "--force", "-d", "gpu:1"])
    assert res.exit_code == 5 and "only 1 GPU(s) are visible (CUDA_VISIBLE_DEVICES=3)" in res.stderr


def test_roi_subset_takes_several_names_after_one_flag(tmp_path: Path, ct_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """TotalSegmentator's `-rs liver spleen` (several names after one flag) works from the command line."""
    from ctpassport.cli import main, totalsegmentator_argv

    assert totalsegmentator_argv(["segment", "-rs", "liver", "spleen", "-q"]) == [
        "segment", "-rs", "liver", "-rs", "spleen", "-q"]
    assert totalsegmentator_argv(["--debug", "segment", "--roi_subset", "liver", "-rs", "aorta"]) == [
        "--debug", "segment", "--roi_subset", "liver", "-rs", "aorta"]
    assert totalsegmentator_argv(["segment", "-rs", "-q"]) == ["segment", "-rs", "-q"]  # the parser reports it
    assert totalsegmentator_argv(["passport", "-rs", "a", "b"]) == ["passport", "-rs", "a", "b"]
    # TotalSegmentator options this parser would misread (-ff as -f -f, -sii as -s -i i) or not know
    assert totalsegmentator_argv(["segment", "-ff", "-i", "x"]) == ["segment", "--ts-unsupported", "-ff", "-i", "x"]
    assert totalsegmentator_argv(["segment", "-rsr", "liver", "spleen", "-q"]) == [
        "segment", "--ts-unsupported", "-rsr", "-q"]
    assert totalsegmentator_argv(["segment", "-rmb", "-q"]) == ["segment", "--ts-unsupported", "-rmb", "-q"]
    assert totalsegmentator_argv(["segment", "-rmb", "200", "-q"]) == ["segment", "--ts-unsupported", "-rmb", "-q"]
    assert totalsegmentator_argv(["segment", "-s", "st.json", "-i", "x"]) == [
        "segment", "-s", "--statistics-path", "st.json", "-i", "x"]
    assert totalsegmentator_argv(["segment", "-s", "-i", "x"]) == ["segment", "-s", "-i", "x"]
    assert totalsegmentator_argv(["segment", "--nr_thr_resamp", "2"]) == ["segment", "-nr", "2"]
    assert totalsegmentator_argv(["segment", "-ot", "nifti", "dicom_seg", "-q"]) == [
        "segment", "--ts-unsupported", "-ot with several types", "-q"]
    assert totalsegmentator_argv(["segment", "-ot", "dicom_seg", "-q"]) == ["segment", "-ot", "dicom_seg", "-q"]
    assert totalsegmentator_argv(["segment", "-i", "x", "--debug"]) == ["--debug", "segment", "-i", "x"]
    out = tmp_path / "seg.nii.gz"
    monkeypatch.setattr(sys, "argv", ["ctpassport", "segment", "-i", str(ct_dir / "example_ct_sm.nii.gz"), "-o",
                                      str(out), "-ml", "-rs", "liver", "spleen", "--model", "demo", "-q"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None)
    found = set(np.unique(np.asanyarray(nib.load(str(out)).dataobj)).tolist())
    assert found <= {0, 1, 5} and {1, 5} <= found  # spleen 1, liver 5 and nothing else


def test_nifti2_input_gives_a_quiet_nifti1_output_on_its_grid(tmp_path: Path, ct_dir: Path) -> None:
    src = nib.load(str(ct_dir / "example_ct_sm.nii.gz"))
    inp = tmp_path / "ct_nifti2.nii.gz"
    nib.save(nib.Nifti2Image(np.asanyarray(src.dataobj), src.affine), str(inp))
    out = tmp_path / "seg.nii.gz"
    res = runner.invoke(app, ["segment", "-i", str(inp), "-o", str(out), "--ml", "--model", "demo", "-q"])
    assert res.exit_code == 0 and res.output == "", res.output
    img = nib.load(str(out))
    assert type(img) is nib.Nifti1Image and img.shape == src.shape
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)


def test_unknown_roi_name(tmp_path: Path, ct_dir: Path) -> None:
    res = runner.invoke(app, ["segment", "-i", str(ct_dir / "example_ct_sm.nii.gz"), "-o", str(tmp_path / "s.nii.gz"),
                              "--ml", "--roi_subset", "liver", "--roi_subset", "unicorn"])
    assert res.exit_code != 0 and "unicorn" in res.stderr


@pytest.mark.torch
def test_model_without_checkpoint(tmp_path: Path, standin_home: Path, ct_dir: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(standin_home, home)
    (home / "nnunet/results" / FAST_DATASET / FAST_TRAINER_FOLDER / "fold_0/checkpoint_final.pth").unlink()
    out = tmp_path / "seg.nii.gz"
    res = runner.invoke(app, ["segment", "-i", str(ct_dir / "example_ct_sm.nii.gz"), "-o", str(out), "--ml",
                              "--model", str(home), "-q"])
    assert res.exit_code == 3
    assert len(res.stderr.strip().splitlines()) == 1 and "no checkpoint" in res.stderr
    assert not out.exists()


@pytest.mark.torch
def test_segment_outputs_force_and_quiet(tmp_path: Path, standin_home: Path, onnx_cache: Path, ct_dir: Path) -> None:
    ct = ct_dir / "example_ct_sm.nii.gz"
    out = tmp_path / "seg.nii.gz"
    timings = tmp_path / "t.json"
    args = ["segment", "-i", str(ct), "-o", str(out), "--ml", "--model", str(standin_home), "--statistics",
            "--timings", str(timings), "--nr_thr", "2"]
    res = runner.invoke(app, [*args, "-q"])
    assert res.exit_code == 0, res.output
    assert res.stderr == ""  # quiet
    img = nib.load(str(out))
    assert img.shape == nib.load(str(ct)).shape and img.get_data_dtype() == np.uint8
    stats = json.loads((tmp_path / "statistics.json").read_text())
    assert len(stats) == 117 and set(stats["liver"]) == {"volume", "intensity"}
    t = json.loads(timings.read_text())
    assert {"load", "preprocess", "infer", "postprocess", "write"} <= set(t["seconds"]) and t["peak_rss_mb"] > 0
    # refuses to overwrite
    res = runner.invoke(app, [*args, "-q"])
    assert res.exit_code == 4 and "--force" in res.stderr
    res = runner.invoke(app, [*args, "--force"])
    assert res.exit_code == 0 and "Wrote" in res.stderr  # progress/messages when not quiet
    # roi subset keeps only the named classes, table lists only them
    sub = tmp_path / "sub.nii.gz"
    res = runner.invoke(app, ["segment", "-i", str(ct), "-o", str(sub), "--ml", "--model", str(standin_home),
                              "-rs", "liver", "-rs", "spleen", "-q"])
    assert res.exit_code == 0, res.output
    vals = set(np.unique(np.asanyarray(nib.load(str(sub)).dataobj)).tolist())
    assert vals <= {0, 1, 5}
    # --statistics beside another output in the same folder: statistics.json exists, so not without --force
    other = tmp_path / "other.nii.gz"
    res = runner.invoke(app, ["segment", "-i", str(ct), "-o", str(other), "--ml", "--model", str(standin_home),
                              "--statistics", "-q"])
    assert res.exit_code == 4 and "statistics.json" in res.stderr and not other.exists()


@pytest.mark.torch
def test_model_standin_and_export_commands(tmp_path: Path) -> None:
    home = tmp_path / "home"
    res = runner.invoke(app, ["model", "standin", "-o", str(home), "--seed", "3", "--plans-format", "architecture", "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["model", "standin", "-o", str(home), "-q"])
    assert res.exit_code == 4
    info = runner.invoke(app, ["model", "info", str(home)])
    assert json.loads(info.stdout)["features_per_stage"] == [32, 64, 128, 256, 320]
    onnx_path = tmp_path / "m.onnx"
    res = runner.invoke(app, ["model", "export", str(home), "-o", str(onnx_path)])
    assert res.exit_code == 0, res.output
    assert onnx_path.stat().st_size > 60_000_000 and "tolerance" in res.stderr


def test_totalsegmentator_statistics_path_and_incomplete_organs(tmp_path: Path, ct_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """TotalSegmentator's `-s PATH` writes statistics.json there; `-sii` reports the organs within 3 voxels of
    the border too (the shared slab cuts the liver: 0 by default, its volume with -sii); an unsupported
    TotalSegmentator option (here -ff, which the parser would read as -f -f) is one line, exit 5."""
    from ctpassport.cli import main

    out = tmp_path / "seg.nii.gz"
    stats = tmp_path / "elsewhere.json"
    base = ["ctpassport", "segment", "-i", str(ct_dir / "example_ct_sm.nii.gz"), "-o", str(out), "-ml",
            "--model", "demo", "-q"]
    monkeypatch.setattr(sys, "argv", [*base, "-s", str(stats), "-sii"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None)
    assert stats.is_file() and not (tmp_path / "statistics.json").exists()
    with_incomplete = json.loads(stats.read_text())
    assert with_incomplete["liver"]["volume"] > 100_000  # mm3
    monkeypatch.setattr(sys, "argv", [*base, "-s", "--force"])
    with pytest.raises(SystemExit):
        main()
    default = json.loads((tmp_path / "statistics.json").read_text())
    assert default["liver"]["volume"] == 0.0 and default.keys() == with_incomplete.keys()
    monkeypatch.setattr(sys, "argv", [*base, "-ff", "--force"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 5


@pytest.mark.parametrize(("argv", "words"), [
    (["segment", "-i", "ct.nii.gz", "-o", "seg", "-nr", "abc"], "Invalid value for '--nr_thr' / '-nr'"),
    (["segment", "-o", "seg"], "Missing option '-i' / '--input'"),
    (["segment", "--bogus"], "No such option: --bogus"),
    (["frobnicate"], "No such command 'frobnicate'"),
])
def test_command_lines_the_parser_cannot_read_are_one_line(argv: list[str], words: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """From the console command, a malformed value, a missing or unknown option or command is one line naming
    it and the command's help, exit 2 (Click drew a several-line box); help and --version are unchanged."""
    from ctpassport.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ctpassport", *argv])
    with pytest.raises(SystemExit) as done:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("ctpassport: error: ") and words in err[0] and "--help`)" in err[0]
    assert list(tmp_path.iterdir()) == []
    for ok in (["--version"], ["segment", "--help"]):
        monkeypatch.setattr(sys, "argv", ["ctpassport", *ok])
        with pytest.raises(SystemExit) as done:
            main()
        assert done.value.code == 0 and capsys.readouterr().out


@pytest.mark.parametrize("module,args,extra", [
    ("sqlalchemy", ["store", "list"], "store"),
    ("pydicom", ["segment", "-i", "{d}", "-o", "{t}/x.nii.gz"], "dicom"),
])
def test_a_missing_optional_package_is_one_line_naming_its_extra(
    module: str, args: list[str], extra: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from ctpassport.io.dicom_write import SeriesTags, write_dicom_series

    write_dicom_series(np.zeros((8, 8, 4), np.int16), np.eye(4), tmp_path / "dcm", SeriesTags())
    monkeypatch.setenv("CTPASSPORT_DB", str(tmp_path / "s.sqlite"))
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    res = CliRunner().invoke(app, [a.format(d=tmp_path / "dcm", t=tmp_path) for a in args])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert f"needs the optional package {module} (pip install 'ctpassport[{extra}]')" in lines[0]
