"""The web app driven headless with ``streamlit.testing.v1.AppTest``: upload, segmentation, viewer sliders and
windows, the organ table, passport charts, registration with known truth, downloads, and bad uploads."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ctpassport.app import APP_SCRIPT
from ctpassport.io.atomic import OUTPUT_MARKER

#: Seconds one AppTest run may take (segmenting a one-patch case with stand-in weights takes ~20 s here).
RUN_TIMEOUT = 600


def workspace_files(tmp: Path) -> list[Path]:
    """Every file the app left under its temporary folder."""
    return sorted(p for p in tmp.rglob("*") if p.is_file())


def nifti_bytes(data: np.ndarray, affine: np.ndarray | None = None, compress: bool = True) -> bytes:
    import nibabel as nib

    from ctpassport.io.nifti import nifti_bytes as _nb

    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine)
    return _nb(img, compress=compress)


def new_app() -> Any:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=RUN_TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


def plotly_by_title(at: Any) -> dict[str, dict]:
    specs = {}
    for el in at.get("plotly_chart"):
        spec = json.loads(el.proto.spec)
        title = spec.get("layout", {}).get("title", {})
        text = title.get("text", "") if isinstance(title, dict) else str(title)
        specs[text] = spec
    return specs


def all_titles(at: Any) -> list[str]:
    return [json.loads(el.proto.spec)["layout"]["title"]["text"] for el in at.get("plotly_chart")]


def viewer_titles(at: Any) -> dict[str, str]:
    """{plane: figure title} of the slice viewer (e.g. ``Axial 15/30 (z = ... mm)``)."""
    out = {}
    for text in plotly_by_title(at):
        for plane in ("Axial", "Coronal", "Sagittal"):
            if text.startswith(plane + " "):
                out[plane.lower()] = text
    return out


def upload(at: Any, name: str, data: bytes, key: str = "upload") -> Any:
    at.file_uploader(key=key).upload(name, data)
    at.run()
    assert not at.exception, at.exception
    return at


def demo_phantom(at: Any, seed: int = 2, spacing: float = 4.0) -> Any:
    at.sidebar.radio(key="source").set_value("Demo phantom").run()
    at.toggle(key="reference").set_value(True)
    at.number_input(key="ph_seed").set_value(seed)
    at.select_slider(key="ph_spacing").set_value(spacing)
    at.button(key="ph_go").click().run()
    assert not at.exception, at.exception
    return at


# ------------------------------------------------------------------------------------------------
def test_landing_page_without_model_says_how_to_get_one(app_tmp: Path) -> None:
    from ctpassport.app import core

    at = new_app()
    text = " ".join(m.value for m in at.markdown) + " ".join(c.value for c in at.caption)
    for part in (
        "1. Load a study",
        "2. Segment and inspect",
        "3. Register and download",
        "deleted when it ends",
    ):
        assert part in text
    warns = " ".join(w.value for w in at.warning)
    if core.demo_model_dir() is None:  # no weights installed and no demo model: say how to get one
        assert "No segmentation model found" in warns and "totalseg_download_weights" in warns
    else:  # the shipped demo model is the fallback
        assert not warns and any("ctpassport demo model" in c.value for c in at.sidebar.caption)
    assert at.sidebar.radio(key="source").options == ["Upload", "Demo phantom"]  # no server root configured


@pytest.mark.torch
@pytest.mark.slow
def test_upload_segment_view_table(with_model: Path, app_tmp: Path, ct_dir: Path) -> None:
    """Upload the small real CT, segment it (stand-in weights), then use the viewer and the organ table."""
    at = new_app()
    assert not at.warning, [w.value for w in at.warning]
    upload(at, "example_ct_sm.nii.gz", (ct_dir / "example_ct_sm.nii.gz").read_bytes())
    assert not at.error, [e.value for e in at.error]
    metrics = {m.label: m.value for m in at.metric}
    seg = at.session_state["seg"]
    passport = seg.passport
    assert metrics["Organs"] == str(len(passport.organs)) and len(passport.organs) > 0
    assert metrics["Backend"] == seg.backend and seg.backend in at.selectbox(key="backend").options
    assert int(metrics["Patches"]) == seg.n_tiles >= 1
    assert seg.labels.shape == (122, 101, 30)
    # the passport names the user's file and its hash, as `ctpassport segment` does (not the session's copy)
    raw = (ct_dir / "example_ct_sm.nii.gz").read_bytes()
    assert passport.source.path == "example_ct_sm.nii.gz" and passport.source.ct_path is None
    assert passport.source.sha256 == hashlib.sha256(raw).hexdigest()
    # the progress bar ended at all the network's patches
    bars = [el.proto for el in at.get("progress")]
    assert (
        bars
        and bars[-1].value == 100
        and bars[-1].text == f"Inference: {seg.n_tiles} of {seg.n_tiles} patches"
    )
    caption = " ".join(c.value for c in at.caption)
    assert "TotalSegmentator fast-model weights" in caption
    for stage in ("model load", "preprocess", "infer", "postprocess", "passport"):
        assert stage in caption and stage in seg.timings
    # the organ table: one row per organ of the passport, with volume (ml), mean HU and truncated
    df = at.dataframe[0].value
    assert list(df.columns) == ["id", "organ", "volume_ml", "mean_HU", "sd_HU", "voxels", "truncated"]
    assert len(df) == len(passport.organs)
    by_id = passport.by_id()
    for _, row in df.iterrows():
        o = by_id[int(row["id"])]
        assert row["volume_ml"] == pytest.approx(o.volume_mm3 / 1000.0, abs=0.01)
        assert row["mean_HU"] == pytest.approx(o.hu_mean, abs=0.06)
        assert bool(row["truncated"]) == o.truncated
        assert row["voxels"] == int(np.count_nonzero(seg.labels == o.id))
    # filter and sort
    at.text_input(key="organ_filter").set_value("lung").run()
    df = at.dataframe[0].value
    assert len(df) >= 1 and all("lung" in n for n in df["organ"])
    at.text_input(key="organ_filter").set_value("").run()
    at.selectbox(key="organ_sort").set_value("volume (largest first)").run()
    vols = list(at.dataframe[0].value["volume_ml"])
    assert vols == sorted(vols, reverse=True)
    at.selectbox(key="organ_trunc").set_value("hide").run()
    assert not any(at.dataframe[0].value["truncated"])
    # the viewer: three planes, sliders move the slices
    titles = viewer_titles(at)
    assert set(titles) == {"axial", "coronal", "sagittal"}
    ax = at.slider(key="slice_axial")
    assert ax.min == 1 and ax.max == 30
    old = plotly_by_title(at)[titles["axial"]]
    ax.set_value(3).run()
    titles2 = viewer_titles(at)
    assert titles2["axial"].startswith("Axial 3/30")
    new = plotly_by_title(at)[titles2["axial"]]
    assert new["data"][0]["source"] != old["data"][0]["source"]  # a different slice image
    heat = new["data"][1]
    assert heat["type"] == "heatmap" and "%{text}" in heat["hovertemplate"]  # hovering names the organ
    # hover names are the organs under the cursor on that slice
    k = 2  # canonical index of axial slice 3 (RAS input)
    present = {by_id[i].name for i in np.unique(seg.labels[:, :, k]) if i > 0}
    names = {t for row in _decode(heat["text"]) for t in row if t}
    assert names and names <= present
    # window presets change the picture, opacity 0 hides the labels
    at.segmented_control(key="window").set_value("Lung").run()
    lung = plotly_by_title(at)[viewer_titles(at)["axial"]]["data"][0]["source"]
    assert lung != new["data"][0]["source"]
    at.slider(key="opacity").set_value(0.0).run()
    plain = plotly_by_title(at)[viewer_titles(at)["axial"]]["data"][0]["source"]
    assert plain != lung
    # the legend names the organs shown
    legend = " ".join(m.value for m in at.markdown if "border-radius:9px" in m.value)
    assert all(n in legend for n in present)
    # passport charts: the 3-D map and the volume chart hold every organ
    specs = plotly_by_title(at)
    vol = next(s for t, s in specs.items() if t.startswith("Organ volumes"))
    assert sorted(vol["data"][0]["y"]) == sorted(o.name for o in passport.organs)
    assert any(t.startswith("Organ map") for t in specs)
    # downloads are offered
    labels = [b.label for b in at.get("download_button")]
    assert {
        "Label map (NIfTI)",
        "Masks per class (zip)",
        "Passport (JSON)",
        "Report (HTML)",
        "Organ table (CSV)",
        "Transform files (zip)",
    } == set(labels)


def _decode(value: Any) -> list[list[str]]:
    """Plotly's JSON for a 2-D text array (plain nested lists)."""
    return [list(r) for r in value]


# ------------------------------------------------------------------------------------------------
BAD_UPLOADS = {
    "text file renamed .nii.gz": (
        "scan.nii.gz",
        b"this is not an image\n" * 20,
        "named .gz but is not gzip-compressed",
    ),
    "2-D image": ("slice.nii.gz", None, "is 2-D with shape (40, 50), expected a 3-D volume"),
    "empty zip": ("series.zip", None, "holds no DICOM files"),
    "label map": ("labels.nii.gz", None, "looks like a label map"),
    "not CT (MR-like)": ("mr.nii.gz", None, "does not look like a CT in Hounsfield units"),
    "wrong type": ("notes.txt", b"hello", "is not a NIfTI file (.nii, .nii.gz) or a zip of a DICOM series"),
    "empty file": ("empty.nii.gz", b"", "is empty"),
}


def _bad_bytes(case: str) -> bytes:
    _, data, _ = BAD_UPLOADS[case]
    if data is not None:
        return data
    rng = np.random.default_rng(0)
    if case == "2-D image":
        return nifti_bytes(np.zeros((40, 50), np.int16))
    if case == "empty zip":
        buf = io.BytesIO()
        zipfile.ZipFile(buf, "w").close()
        return buf.getvalue()
    if case == "label map":
        return nifti_bytes(rng.integers(0, 6, (20, 20, 20)).astype(np.uint8))
    return nifti_bytes(rng.uniform(0, 800, (20, 20, 20)).astype(np.float32))


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_shows_a_clear_message(app_tmp: Path, case: str) -> None:
    name, _, expected = BAD_UPLOADS[case]
    at = new_app()
    upload(at, name, _bad_bytes(case))
    errors = [e.value for e in at.error]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"Upload: {name}: ") and expected in errors[0], errors[0]
    assert (
        "Traceback" not in errors[0] and str(app_tmp) not in errors[0]
    )  # the user's name, not a server path
    assert at.session_state["study"] is None
    assert workspace_files(app_tmp) == []  # nothing of the failed upload stays on disk


def test_upload_over_the_limit(app_tmp: Path) -> None:
    from streamlit import config

    old = config.get_option("server.maxUploadSize")
    config.set_option("server.maxUploadSize", 1)
    try:
        at = new_app()
        upload(at, "big.nii", b"\0" * (2 * 2**20))
    finally:
        config.set_option("server.maxUploadSize", old)
    errors = [e.value for e in at.error]
    assert errors and "is too large: 2 MB, over the upload limit of 1 MB" in errors[0]
    assert workspace_files(app_tmp) == []


# ------------------------------------------------------------------------------------------------
def test_phantom_registration_with_known_truth(app_tmp: Path) -> None:
    """A demo phantom and its follow-up (known motion), reference labels: rigid then deformable registration,
    residuals per organ, TRE, fused overlays in the viewer, transform files to download."""
    at = demo_phantom(new_app())
    study = at.session_state["study"]
    assert study.source == "demo" and study.truth_labels is not None
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Labels"] == "phantom reference"
    n_organs = len(at.session_state["seg"].passport.organs)
    assert metrics["Organs"] == str(n_organs) == str(len(np.unique(study.truth_labels)) - 1)
    assert at.selectbox(key="reg_fu").options[0] == "Phantom follow-up (known motion)"
    results = {}
    for tier in ("rigid", "deformable"):
        at.segmented_control(key="reg_tier").set_value(tier)
        at.button(key="reg_go").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        reg = at.session_state["reg"]
        assert reg.tier == tier and reg.tre is not None and reg.warped is not None
        results[tier] = reg.tre
        metrics = {m.label: m.value for m in at.metric}
        assert metrics["TRE (true error)"] == f"{reg.tre['registered']['mean']:.2f} mm"
        assert int(metrics["Organs used"]) == len(reg.result.rigid_fit.used) >= 3
        # residual table: one row per organ of the rigid fit, numbers as computed
        res = next(d.value for d in at.dataframe if "centroid_mm" in d.value.columns)
        assert len(res) == len(reg.result.rigid_fit.organs)
        used = res[res["status"] == "used"]
        assert len(used) >= 3 and used["centroid_mm"].max() < 10.0
        chart = next(s for t, s in plotly_by_title(at).items() if t.startswith("Centroid residual"))
        assert sum(len(t["x"]) for t in chart["data"]) == min(40, int(res["centroid_mm"].notna().sum()))
        table = {r.organ: (r.centroid_mm, r.status) for r in res.itertuples()}
        for trace in chart["data"]:  # every bar is the table's number, coloured by the organ's status
            for organ, x in zip(trace["y"], trace["x"]):
                assert x == pytest.approx(table[organ][0])
                assert trace["name"] == table[organ][1] or (
                    trace["name"].startswith("not used") and table[organ][1] not in ("used", "downweighted")
                )
        # TRE table: before / rigid / registered
        tre = next(d.value for d in at.dataframe if "stage" in d.value.columns)
        assert list(tre["stage"]) == ["before", "rigid", "registered"]
        # the fused viewer on the baseline grid, with its own sliders
        titles = [t for t in all_titles(at) if t.startswith("Axial ")]
        assert len(titles) == 2  # the study viewer and the registration viewer
        at.slider(key="reg_slice_axial").set_value(5).run()
        assert any(t.startswith("Axial 5/") for t in plotly_by_title(at))
        files = sorted(p.name for p in reg.folder.iterdir())
        assert files == sorted(
            [OUTPUT_MARKER, "displacement.nii.gz", "registration.json", "residuals.csv", "tre.json", "transform.h5"]
        )
    # the motion is ~10-20 mm; registration brings it close to the truth, deformable better than rigid
    assert results["rigid"]["before"]["mean"] > 5.0
    assert results["rigid"]["registered"]["mean"] < 3.0
    assert results["deformable"]["registered"]["mean"] < results["rigid"]["registered"]["mean"]
    # only the latest registration's files stay in the workspace
    assert len([p for p in app_tmp.rglob("transform.h5")]) == 1
    # overlay modes
    for mode in ("Fusion before", "Warped follow-up", "Baseline"):
        at.segmented_control(key="reg_mode").set_value(mode).run()
        assert not at.exception


def test_downloads_and_report(app_tmp: Path) -> None:
    import nibabel as nib

    from ctpassport.app import downloads
    from ctpassport.io.labels import read_label_table
    from ctpassport.passport.schema import Passport

    at = demo_phantom(new_app(), seed=3, spacing=6.0)
    at.button(key="reg_go").click().run()
    ss = at.session_state
    study, run, reg = ss["study"], ss["seg"], ss["reg"]
    img = nib.Nifti1Image.from_bytes(
        __import__("gzip").decompress(downloads.labels_nifti(run.labels, study.image))
    )
    assert np.array_equal(np.asarray(img.dataobj), run.labels) and np.allclose(img.affine, study.image.affine)
    assert read_label_table(img)[5] == "liver"
    with zipfile.ZipFile(io.BytesIO(downloads.masks_zip(run.labels, study.image))) as zf:
        names = set(zf.namelist())
        assert names == {f"{o.name}.nii.gz" for o in run.passport.organs}
        liver = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(zf.read("liver.nii.gz")))
        assert int(np.asarray(liver.dataobj).sum()) == int((run.labels == 5).sum())
    back = Passport.model_validate_json(downloads.passport_json(run.passport))
    csv_lines = downloads.organs_csv(run.passport).splitlines()
    assert csv_lines[0] == "id,organ,volume_ml,mean_HU,sd_HU,voxels,truncated"
    assert len(csv_lines) == len(run.passport.organs) + 1 and any(",liver," in r for r in csv_lines)
    assert [o.id for o in back.organs] == [o.id for o in run.passport.organs]
    with zipfile.ZipFile(io.BytesIO(downloads.folder_zip(reg.folder))) as zf:
        assert {"transform.h5", "displacement.nii.gz", "registration.json", "residuals.csv"} <= set(
            zf.namelist()
        )
    html = downloads.report_html(study, run, reg)
    for part in (
        "<h2>Segmentation</h2>",
        "<h2>Organs",
        "<h2>Passport</h2>",
        "<h2>Registration</h2>",
        "liver",
        "True registration error",
        "data:image/png;base64,",
    ):
        assert part in html
    assert html.count("<tr>") >= len(run.passport.organs)


# ------------------------------------------------------------------------------------------------
def test_server_folder_only_under_root(
    app_tmp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ctpassport.app import core, demo

    root = tmp_path / "root"
    (root / "cases").mkdir(parents=True)
    (tmp_path / "outside.nii.gz").write_bytes(b"x")
    (root / "cases" / "phantom.nii.gz").write_bytes(demo.nifti_bytes_of(demo.phantom_study(4, 6.0)))
    (root / "cases" / "notes.txt").write_text("not a CT")
    (root / "escape.nii.gz").symlink_to(tmp_path / "outside.nii.gz")
    monkeypatch.setenv("CTPASSPORT_APP_ROOT", str(root))
    at = new_app()
    assert at.sidebar.radio(key="source").options == ["Upload", "Demo phantom", "Server folder"]
    at.sidebar.radio(key="source").set_value("Server folder").run()
    box = at.selectbox(key="server_pick")
    assert box.options == ["cases/phantom.nii.gz", "escape.nii.gz"]
    box.set_value("escape.nii.gz")
    at.button(key="server_go").click().run()
    assert any("is outside the folder the app may read" in e.value for e in at.error)
    at.selectbox(key="server_pick").set_value("cases/phantom.nii.gz")
    at.toggle(key="auto").set_value(False)
    at.button(key="server_go").click().run()
    assert not at.error and at.session_state["study"].name == "cases/phantom.nii.gz"
    assert at.session_state["seg"] is None and at.button(key="segment_go") is not None
    with pytest.raises(Exception, match="outside the folder"):
        core.resolve_under_root(root, "../outside.nii.gz")


def test_changed_settings_offer_to_segment_again(with_model: Path, app_tmp: Path, ct_dir: Path) -> None:
    """Settings changed after a segmentation are not silently ignored: the page says which ones, and
    "Segment again" makes the run they describe."""
    at = new_app()
    upload(at, "example_ct_sm.nii.gz", (ct_dir / "example_ct_sm.nii.gz").read_bytes())
    first = at.session_state["seg"]
    assert first.passport.grid.kind == "output" and "segment_again" not in [b.key for b in at.button]
    at.radio(key="pgrid").set_value("model").run()
    notes = [i.value for i in at.info if "Settings changed" in i.value]
    assert len(notes) == 1 and "passport grid: output → model" in notes[0], [i.value for i in at.info]
    assert at.session_state["seg"] is first  # nothing re-ran by itself
    at.button(key="segment_again").click().run()
    assert not at.error, [e.value for e in at.error]
    second = at.session_state["seg"]
    assert second is not first and second.passport.grid.kind == "model"
    assert not [i.value for i in at.info if "Settings changed" in i.value]
    assert "segment_again" not in [b.key for b in at.button]
    assert np.array_equal(second.labels, first.labels)  # the same model and input: the same labels


def test_store_passports_register_without_images(app_tmp: Path) -> None:
    """Passports added to the store can be registered later, without their images (residuals only); a study
    is never registered with itself (one store record on both sides, or the current study and its copy)."""
    at = demo_phantom(new_app(), seed=5, spacing=6.0)
    at.text_input(key="store_patient").set_value("P1")
    at.text_input(key="store_date").set_value("2024-01-02")
    at.button(key="store_add").click().run()
    assert any("Added: study" in s.value for s in at.success), [e.value for e in at.error]
    at.button(key="store_add").click().run()
    assert any("Already stored" in s.value for s in at.success)
    store_opts = [o for o in at.selectbox(key="reg_fu").options if o.startswith("Store: ")]
    assert len(store_opts) == 1 and "P1" in store_opts[0] and "2024-01-02" in store_opts[0]
    same = "Registration: the baseline and the follow-up are the same study: choose two different ones"
    # the current study against its own stored passport is refused with a message
    at.selectbox(key="reg_fu").set_value(store_opts[0])
    at.button(key="reg_go").click().run()
    assert [e.value for e in at.error] == [same] and at.session_state["reg"] is None
    # a second study in the store: the two stored passports register without their images
    demo_phantom(at, seed=6, spacing=6.0)
    at.text_input(key="store_patient").set_value("P2")
    at.button(key="store_add").click().run()
    store_opts = [o for o in at.selectbox(key="reg_fu").options if o.startswith("Store: ")]
    p1, p2 = (next(o for o in store_opts if p in o) for p in ("P1", "P2"))
    at.selectbox(key="reg_base").set_value(p1)
    at.selectbox(key="reg_fu").set_value(p2)
    at.button(key="reg_go").click().run()
    assert not at.error, [e.value for e in at.error]
    reg = at.session_state["reg"]
    assert reg is not None and not reg.has_images and reg.tre is None and reg.residuals
    assert reg.fixed.name.startswith(p1.removeprefix("Store: ")[:12]) and "P2" in reg.moving.name
    assert any("residuals only" in i.value for i in at.info)
    # one store record picked for both sides is refused too; the earlier result stays, labelled as such
    at.selectbox(key="reg_fu").set_value(p1)
    at.button(key="reg_go").click().run()
    assert [e.value for e in at.error] == [same]
    assert at.session_state["reg"] is reg
    assert any(c.value.startswith("Shown below: the previous registration") and "P2" in c.value
               for c in at.caption), [c.value for c in at.caption]


def test_workspace_removed_at_session_end(app_tmp: Path) -> None:
    at = demo_phantom(new_app(), seed=2, spacing=6.0)
    at.button(key="reg_go").click().run()
    path = at.session_state["ws"].path
    assert path.is_dir() and any(p.name == "transform.h5" for p in workspace_files(app_tmp))
    # a new study replaces the old one: its registration and files go
    at.number_input(key="ph_seed").set_value(3)
    at.button(key="ph_go").click().run()
    assert at.session_state["reg"] is None and at.session_state["study"].name.startswith("Phantom 3 ")
    assert workspace_files(app_tmp) == []
    at.button(key="reg_go").click().run()
    assert workspace_files(app_tmp)
    del at  # the session ends: Streamlit drops its state
    gc.collect()
    assert not path.exists()
    assert workspace_files(app_tmp) == []


def test_dicom_zip_upload(app_tmp: Path, tmp_path: Path) -> None:
    """A zip of a DICOM series (written from a phantom, LPS slices) loads as the same CT on the same grid."""
    pytest.importorskip("pydicom")
    from ctpassport.app import demo
    from ctpassport.io.dicom_write import write_dicom_series

    study = demo.phantom_study(6, 6.0)
    folder = tmp_path / "series"
    write_dicom_series(study.image.data, study.image.affine, folder)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"study/ct/{f.name}")
    at = new_app()
    at.toggle(key="auto").set_value(False)
    upload(at, "phantom_dicom.zip", buf.getvalue())
    assert not at.error, [e.value for e in at.error]
    loaded = at.session_state["study"]
    assert loaded.name == "phantom_dicom.zip" and loaded.source == "upload"
    # same voxels in the world: compare through the canonical views
    from ctpassport.app import viewer

    a = viewer.canonical_view(loaded.image.data, loaded.image.affine)
    b = viewer.canonical_view(study.image.data, study.image.affine)
    assert a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-3) and np.array_equal(a.ct, b.ct)
    assert at.session_state["seg"] is None and len(viewer_titles(at)) == 3  # the CT alone in the viewer
    assert [p.name for p in workspace_files(app_tmp)] == ["phantom_dicom.zip"]


def test_bad_follow_up_upload(app_tmp: Path) -> None:
    at = demo_phantom(new_app(), seed=2, spacing=6.0)
    at.selectbox(key="reg_fu").set_value("Upload a follow-up").run()
    assert at.button(key="reg_go").disabled
    upload(at, "follow_up.nii.gz", nifti_bytes(np.ones((8, 8, 8), np.uint8)), key="fu_upload")
    at.button(key="reg_go").click().run()
    errors = [e.value for e in at.error]
    assert errors == [
        (
            "Registration: follow_up.nii.gz: looks like a label map or a mask (small non-negative "
            "integers), not a CT (upload the CT image itself)"
        )
    ]
    assert at.session_state["reg"] is None and workspace_files(app_tmp) == []


def test_registration_error_is_a_message(app_tmp: Path) -> None:
    """A follow-up passport with too few organs: a one-line message, no result, no files left."""
    from ctpassport.passport.build import build_passport
    from ctpassport.store.db import PassportStore, StudyMeta

    lab = np.zeros((30, 30, 30), np.uint8)
    lab[5:10, 5:10, 5:10] = 5
    lab[15:20, 15:20, 15:20] = 1
    with PassportStore() as store:  # $CTPASSPORT_DB of the test
        store.add(build_passport(lab, np.eye(4)), StudyMeta(source_sha256="ab" * 32, study_key="tiny"))
    at = demo_phantom(new_app(), seed=2, spacing=6.0)
    opt = next(o for o in at.selectbox(key="reg_fu").options if o.startswith("Store: tiny"))
    at.selectbox(key="reg_fu").set_value(opt)
    at.button(key="reg_go").click().run()
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and errors[0].startswith("Registration: only 2 usable organ(s)"), errors
    assert at.session_state["reg"] is None and workspace_files(app_tmp) == []


def test_segment_again_replaces_the_registration_of_the_old_labels(
    app_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registration made from a study's earlier segmentation is not shown (or downloaded) with a new one; a
    failed "Segment again" keeps its error on the page and the earlier results as they were."""
    from ctpassport.app import core

    at = demo_phantom(new_app(), seed=3, spacing=6.0)
    at.button(key="reg_go").click().run()
    reg = at.session_state["reg"]
    assert reg is not None and not at.error
    at.toggle(key="reference").set_value(False).run()  # labels from the model now: the settings changed
    assert "segment_again" in [b.key for b in at.button]

    def no_memory(*_a: Any, **_k: Any) -> Any:
        raise MemoryError

    monkeypatch.setattr(core, "segment_study", no_memory)
    at.button(key="segment_again").click().run()
    assert [e.value for e in at.error] == ["Segmentation: out of memory"]
    assert at.session_state["reg"] is reg and reg.folder.is_dir()
    monkeypatch.undo()
    at.button(key="segment_again").click().run()
    assert not at.error, [e.value for e in at.error]
    assert at.session_state["seg"].model_kind != "reference"
    assert at.session_state["reg"] is None and not reg.folder.exists()
    assert not list(app_tmp.rglob("transform.h5"))
    assert "TRE (true error)" not in [m.label for m in at.metric]
