"""The web app's building blocks without a browser: viewer orientation (analytic), CT checks, the organ table,
the per-session workspace, server paths under the root, model choice, the progress estimate, and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ctpassport.app import APP_SCRIPT, core, streamlit_command, viewer
from ctpassport.app.workspace import ROOT_PREFIX, Workspace, safe_name, sweep_stale
from ctpassport.errors import InputError, ModelError
from ctpassport.io.nifti import Image3D


# ------------------------------------------------------------------------------------------------
# viewer: radiological display of any storage orientation
# ------------------------------------------------------------------------------------------------
def _marker_volume(
    codes: str, shape_ras: tuple[int, int, int] = (20, 16, 12)
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """A volume stored with axis codes ``codes`` (e.g. ``LPS``, ``SAR``) holding a marker near the patient's
    right-anterior-superior corner; returns (data, affine, the marker's canonical RAS index)."""
    from nibabel.orientations import axcodes2ornt, inv_ornt_aff, ornt_transform

    ras = np.zeros(shape_ras, np.int16) - 1000
    marker = (shape_ras[0] - 3, shape_ras[1] - 4, shape_ras[2] - 2)  # R, A, S are the high ends in RAS
    ras[marker] = 1000
    t = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(codes)))
    data = nib.orientations.apply_orientation(ras, t)
    aff_ras = np.diag([2.0, 3.0, 4.0, 1.0])
    aff = aff_ras @ inv_ornt_aff(t, shape_ras)
    return data, aff, marker


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "SAR", "PIL"])
def test_viewer_shows_any_orientation_radiologically(codes: str) -> None:
    data, aff, marker = _marker_volume(codes)
    assert "".join(nib.aff2axcodes(aff)) == codes
    view = viewer.canonical_view(data, aff)
    assert view.spacing == (2.0, 3.0, 4.0) and view.shape == (20, 16, 12)
    i, j, k = marker
    # axial: anterior at the top, the patient's right on the screen's left
    ax = viewer.display_slice(view.ct, "axial", k)
    assert ax.shape == (16, 20) and np.argwhere(ax > 0).tolist() == [[16 - 1 - j, 20 - 1 - i]]
    # coronal: superior at the top, right on the left
    co = viewer.display_slice(view.ct, "coronal", j)
    assert co.shape == (12, 20) and np.argwhere(co > 0).tolist() == [[12 - 1 - k, 20 - 1 - i]]
    # sagittal: superior at the top, anterior on the left
    sa = viewer.display_slice(view.ct, "sagittal", i)
    assert sa.shape == (12, 16) and np.argwhere(sa > 0).tolist() == [[12 - 1 - k, 16 - 1 - j]]
    assert viewer.pixel_mm(view, "axial") == (2.0, 3.0) and viewer.pixel_mm(view, "sagittal") == (3.0, 4.0)
    # the slice position is the marker's world coordinate
    world = aff @ np.append(np.argwhere(data > 0)[0], 1.0)
    assert viewer.slice_position_mm(view, "axial", k) == pytest.approx(world[2])
    assert viewer.slice_position_mm(view, "sagittal", i) == pytest.approx(world[0])


def test_window_overlay_and_figure() -> None:
    ct = np.array([[-1000.0, -160.0], [40.0, 240.0]])
    g = viewer.window_gray(ct, *viewer.WINDOWS["Soft tissue"])  # W 400 L 40: -160..240 HU -> 0..255
    assert g.tolist() == [[0, 0], [127, 255]]
    lab = np.array([[0, 5], [5, 0]], np.uint8)
    rgb = viewer.overlay_rgb(g, lab, 1.0)
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 1].tolist() == viewer.COLORS[5].tolist()
    assert viewer.overlay_rgb(g, lab, 0.0)[0, 1].tolist() == [0, 0, 0]
    half = viewer.overlay_rgb(g, lab, 0.5)[1, 0]
    assert np.allclose(half, 0.5 * 127 + 0.5 * viewer.COLORS[5].astype(float), atol=1)
    fig = viewer.slice_figure(rgb, "axial", (2.0, 3.0), title="t", labels2d=lab, ct2d=ct)
    heat = fig.data[1]
    assert list(heat.text[0]) == ["", "liver"] and heat.customdata[1][1] == 240
    assert fig.layout.yaxis.scaleanchor == "x" and tuple(fig.layout.xaxis.range) == (0, 4.0)
    assert "liver" in viewer.legend_html([5]) and viewer.hex_color(5).startswith("#")


# ------------------------------------------------------------------------------------------------
# CT checks and the organ table
# ------------------------------------------------------------------------------------------------
def _img(data: np.ndarray) -> Image3D:
    return Image3D(data=data, affine=np.eye(4), header=nib.Nifti1Header())


def test_check_ct() -> None:
    rng = np.random.default_rng(0)
    ct = rng.integers(-1024, 1500, (10, 10, 10)).astype(np.int16)
    core.check_ct(_img(ct), "ok.nii.gz")
    with pytest.raises(InputError, match="single slice"):
        core.check_ct(_img(ct[:, :, :1]), "x")
    with pytest.raises(InputError, match="label map"):
        core.check_ct(_img(rng.integers(0, 30, (10, 10, 10)).astype(np.uint8)), "x")
    with pytest.raises(InputError, match="no voxel below -50 HU"):
        core.check_ct(_img(rng.uniform(0, 1, (10, 10, 10)).astype(np.float32)), "x")
    with pytest.raises(InputError, match="no voxel below -50 HU"):  # a z-scored MR
        core.check_ct(_img(rng.normal(0, 1, (10, 10, 10)).astype(np.float32)), "x")
    # a crop inside the body: soft tissue and fat (about -100 HU), no air -- a CT, as the CLI accepts it
    body = rng.uniform(20, 80, (10, 10, 10)).astype(np.float32)
    body[:, :, :2] = rng.uniform(-120, -80, (10, 10, 2))
    core.check_ct(_img(body), "in-body.nii")
    with pytest.raises(InputError, match="no voxel below -50 HU"):
        core.check_ct(_img(rng.integers(0, 4096, (10, 10, 10)).astype(np.uint16)), "x")  # not rescaled to HU


def test_upload_keeps_dotted_names(tmp_path: Path) -> None:
    """An upload named after DICOM UIDs (dots in the stem) is stored and read as the NIfTI it is."""
    import io

    ct = np.random.default_rng(1).integers(-1000, 1000, (12, 10, 8)).astype(np.int16)
    buf = io.BytesIO()
    buf.write(nib.Nifti1Image(ct, np.diag([2.0, 2.0, 3.0, 1.0])).to_bytes())
    ws = Workspace("dotted", base=tmp_path)
    study = core.load_upload("1.2.840.113619.2.55.3.nii", buf.getvalue(), ws)
    assert study.name == "1.2.840.113619.2.55.3.nii" and study.image.shape == (12, 10, 8)
    assert study.path is not None and study.path.name == "1.2.840.113619.2.55.3.nii"
    ws.close()


def test_store_label_masks_the_password(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The Passport tab names the store; a PostgreSQL password in CTPASSPORT_DB is never shown."""
    monkeypatch.setenv("CTPASSPORT_DB", "postgresql://alice:S3cretPass@127.0.0.1:1/db")
    label = core.store_label()
    assert "S3cretPass" not in label and label == "postgresql://alice:***@127.0.0.1:1/db"
    path = str(tmp_path / "team@site" / "store.db")  # a file path is shown as it is, '@' and all
    monkeypatch.setenv("CTPASSPORT_DB", path)
    assert core.store_label() == path


def test_settings_changed() -> None:
    """A run records what made it; the page compares that with the settings now."""
    ct = _img(np.full((4, 4, 4), -1000, np.int16))
    plain = core.Study("ct.nii.gz", "upload", ct)
    phantom = core.Study("phantom", "demo", ct, truth_labels=np.zeros((4, 4, 4), np.uint8))
    run = core.SegmentationRun(np.zeros((4, 4, 4), np.uint8), None, {}, "m", "onnxruntime", "demo", 1)
    assert core.settings_changed(run, {"grid": "model"}, plain) == []  # a run without records: nothing to say
    run.settings = core.run_settings({"grid": "output", "backend": None, "reference": True}, plain)
    assert run.settings == {"labels": "model", "grid": "output", "backend": "auto"}  # no reference labels here
    assert core.settings_changed(run, {"grid": "output", "reference": True}, plain) == []
    assert core.settings_changed(run, {"grid": "model", "backend": "openvino"}, plain) == [
        "passport grid: output -> model", "inference backend: auto -> openvino"]
    assert core.settings_changed(run, {"grid": "output", "reference": True}, phantom) == [
        "labels: model -> phantom reference labels"]
    run.settings = core.run_settings({"reference": True, "grid": "model"}, phantom)
    assert core.settings_changed(run, {"reference": True, "grid": "output", "backend": "openvino"}, phantom) == []


def test_filter_rows() -> None:
    rows = [
        {"id": 1, "organ": "spleen", "volume_ml": 200.0, "mean_HU": 45.0, "truncated": False},
        {"id": 10, "organ": "lung_upper_lobe_left", "volume_ml": 900.0, "mean_HU": None, "truncated": True},
        {
            "id": 11,
            "organ": "lung_lower_lobe_left",
            "volume_ml": 1100.0,
            "mean_HU": -850.0,
            "truncated": False,
        },
    ]
    assert [r["id"] for r in core.filter_rows(rows, "LUNG left")] == [10, 11]
    assert [r["id"] for r in core.filter_rows(rows, "lung", truncated="only")] == [10]
    assert [r["id"] for r in core.filter_rows(rows, truncated="hide")] == [1, 11]
    assert [r["id"] for r in core.filter_rows(rows, sort="volume (largest first)")] == [11, 10, 1]
    assert [r["id"] for r in core.filter_rows(rows, sort="mean HU")] == [11, 1, 10]  # missing values last


# ------------------------------------------------------------------------------------------------
# workspace, server root, model choice
# ------------------------------------------------------------------------------------------------
def test_workspace(tmp_path: Path) -> None:
    ws = Workspace("abc", base=tmp_path)
    assert ws.path.parent.name == f"{ROOT_PREFIX}{os.getpid()}" and ws.path.is_dir()
    # patients' data: no other user may enter the server's folder or a session's
    assert ws.path.parent.stat().st_mode & 0o077 == 0 and ws.path.stat().st_mode & 0o077 == 0
    with pytest.raises(RuntimeError), ws.run_folder("upload") as f:
        (f / "a.nii.gz").write_bytes(b"x")
        raise RuntimeError("failed run")
    assert list(ws.path.iterdir()) == []  # nothing of the failed run stays
    with ws.run_folder("upload") as f:
        (f / "a.nii.gz").write_bytes(b"x")
    assert ws.size_bytes() == 1
    outside = tmp_path / "keep.txt"
    outside.write_text("x")
    ws.remove(outside)
    assert outside.exists()
    ws.remove(f)
    assert not f.exists()
    ws.close()
    assert not ws.path.exists() and ws.closed
    assert safe_name("../../etc/passwd") == "passwd" and safe_name("a b?.nii.gz") == "a_b_.nii.gz"
    assert safe_name("腹部.nii.gz") == "file.nii.gz" and safe_name("é.nii") == "file.nii"
    assert safe_name(".hidden") == "file.hidden" and safe_name("...") == "file"
    # dotted names (DICOM UIDs) keep their whole NIfTI extension: the loader recognises the file by it
    assert safe_name("1.2.840.113619.2.55.3.nii.gz") == "1.2.840.113619.2.55.3.nii.gz"
    assert safe_name("patient.ct.series-5.venous.nii.gz") == "patient.ct.series-5.venous.nii.gz"
    assert safe_name("scan.v2.NII") == "scan.v2.NII" and safe_name("..x.zip") == "x.zip"


def test_stale_server_folders_are_swept(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    stale = tmp_path / f"{ROOT_PREFIX}{int(dead.stdout)}"
    (stale / "session-1").mkdir(parents=True)
    mine = tmp_path / f"{ROOT_PREFIX}{os.getpid()}"
    mine.mkdir()
    assert sweep_stale(tmp_path) == [stale]
    assert not stale.exists() and mine.exists()


def test_server_studies_and_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a" / "dicom").mkdir(parents=True)
    (root / "a" / "dicom" / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 10)
    (root / "a" / "ct.nii").write_bytes(b"x")
    (root / "b.zip").write_bytes(b"x")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.nii.gz").write_bytes(b"x")
    (root / "notes.txt").write_text("x")
    assert core.server_studies(root) == ["a/ct.nii", "a/dicom/", "b.zip"]
    assert core.resolve_under_root(root, "a/ct.nii") == (root / "a" / "ct.nii").resolve()
    for bad in ("../root2/x.nii", "/etc/passwd"):
        with pytest.raises(InputError, match="outside the folder"):
            core.resolve_under_root(root, bad)
    with pytest.raises(InputError, match="no such file"):
        core.resolve_under_root(root, "missing.nii")


def test_choose_model(tmp_path: Path, standin_home: Path) -> None:
    env = {"TOTALSEG_HOME_DIR": str(tmp_path / "none"), "HOME": str(tmp_path)}
    if core.demo_model_dir() is None:
        with pytest.raises(ModelError, match="No segmentation model found.*totalseg_download_weights"):
            core.choose_model(environ=env)
    else:
        assert core.choose_model(environ=env).kind == "demo"
    installed = core.choose_model(environ={**env, "TOTALSEG_HOME_DIR": str(standin_home)})
    assert installed.kind == "installed" and (installed.path / "plans.json").is_file()
    configured = core.choose_model(environ={**env, core.MODEL_ENV: str(standin_home)})
    assert configured.kind == "configured" and configured.path == installed.path
    with pytest.raises(ModelError, match="does not exist"):
        core.choose_model(tmp_path / "missing", environ=env)


@pytest.mark.torch
def test_progress_estimate_is_exact(segmenter, ct_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """The progress bar's total equals the number of patches the segmenter runs, for any orientation."""
    from ctpassport.app import demo
    from ctpassport.io.nifti import read_image

    img = read_image(ct_dir / "example_ct_sm.nii.gz")
    flipped = Image3D(
        data=np.ascontiguousarray(img.data[::-1, :, :].transpose(2, 0, 1)),
        affine=img.affine
        @ np.array([[0, -1, 0, img.shape[0] - 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]]),
        header=img.header,
    )
    for image in (img, flipped, demo.phantom_study(1, 6.0, field=demo.FIELDS[1]).image):
        _, net_in = segmenter.preprocess(image)
        assert core.estimate_tiles(image, segmenter) == segmenter.n_tiles(net_in)


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------
def test_cli_app_command(tmp_path: Path) -> None:
    from ctpassport.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["app", "--port", "8611", "--max-upload-mb", "5000", "--print-command"])
    assert res.exit_code == 0, res.output
    cmd = res.stdout.split()
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(APP_SCRIPT)
    opts = dict(zip(cmd[5::2], cmd[6::2]))
    assert opts["--server.address"] == "127.0.0.1" and opts["--server.port"] == "8611"
    assert opts["--server.maxUploadSize"] == "5000" and opts["--server.headless"] == "true"
    assert opts["--browser.gatherUsageStats"] == "false"
    res = runner.invoke(app, ["app", "--host", "0.0.0.0", "--print-command"])
    assert "--server.address 0.0.0.0" in res.stdout and "--server.maxUploadSize 4096" in res.stdout
    res = runner.invoke(app, ["app", "--root", str(tmp_path / "missing"), "--print-command"])
    assert res.exit_code != 0 and "is not a folder" in res.stderr and "Traceback" not in res.output
    res = runner.invoke(app, ["app", "--port", "0"])
    assert res.exit_code != 0
    assert streamlit_command(port=1234)[streamlit_command(port=1234).index("--server.port") + 1] == "1234"


def test_import_stays_light() -> None:
    code = (
        "import sys, ctpassport.app, ctpassport.app.core, ctpassport.app.viewer, ctpassport.app.downloads; "
        "print(sorted(m for m in ('streamlit', 'plotly', 'matplotlib', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_small_file_declaring_a_huge_volume_is_refused_from_its_header(tmp_path: Path) -> None:
    """The voxel limit is applied to the header's dimensions before any voxel is decompressed (a 1 MB .nii.gz
    may declare gigabytes of zeros)."""
    import gzip

    from ctpassport.io.nifti import nifti_header_shape

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2000, 2000, 1000))
    hdr.set_data_dtype(np.int16)
    hdr.set_sform(np.diag([0.5, 0.5, 0.5, 1.0]), code=1)
    raw = hdr.binaryblock + b"\0" * 4
    path = tmp_path / "bomb.nii.gz"
    with gzip.open(path, "wb") as fh:  # the header alone: the data would be 8 GB of int16
        fh.write(raw)
    assert nifti_header_shape(path) == (2000, 2000, 1000)
    with pytest.raises(InputError, match="bomb.nii.gz: is too large: 4000 M voxels"):
        core.load_path(path)
    assert nifti_header_shape(tmp_path / "missing.nii") is None


def test_study_summary_keeps_voxel_sizes(tmp_path: Path) -> None:
    img = Image3D(data=np.zeros((4, 4, 4), np.int16), affine=np.diag([-0.703125, -0.703125, 1.25, 1.0]),
                  header=nib.Nifti1Header())
    study = core.Study(name="x", source="upload", image=img)
    assert study.summary == "4x4x4 voxels @ 0.7031x0.7031x1.25 mm, LPS"


def test_the_root_itself_may_be_a_dicom_series(tmp_path: Path) -> None:
    (tmp_path / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 10)
    assert core.server_studies(tmp_path) == ["./"]
    assert core.resolve_under_root(tmp_path, "./") == tmp_path.resolve()


def test_the_demo_model_named_explicitly_is_still_the_demo_model(tmp_path: Path) -> None:
    demo = core.demo_model_dir()
    if demo is None:
        pytest.skip("the demo model is not shipped in this checkout")
    env = {"TOTALSEG_HOME_DIR": str(tmp_path / "none"), "HOME": str(tmp_path)}
    choice = core.choose_model(demo, environ=env)
    assert choice.kind == "demo" and "not for patients" in choice.description
