"""DICOM SEG output: opens with highdicom and pydicom, references the source series, codes and labels right."""

from __future__ import annotations

from pathlib import Path

import json
import numpy as np
import pytest
from typer.testing import CliRunner

from ctpassport.cli import app
from ctpassport.errors import CTPassportError, InputError
from ctpassport.io.dicom import LPS_TO_RAS, DicomImage3D
from ctpassport.io.dicom_seg import dicom_seg_labels, read_dicom_seg, snomed_table, snomed_table_from_csv, write_dicom_seg
from ctpassport.io.dicom_write import SeriesTags, write_dicom_series
from ctpassport.io.load import load_ct
from ctpassport.io.nifti import read_image
from ctpassport.model.classes import NAME_TO_ID, TOTAL_CLASSES

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")


@pytest.fixture
def dicom_ct(tmp_path: Path, ct_dir: Path) -> DicomImage3D:
    ct = read_image(ct_dir / "example_ct_sm.nii.gz")
    write_dicom_series(ct.data, ct.affine, tmp_path / "ct", SeriesTags(patient_id="P1", uid_seed="seg"))
    img = load_ct(tmp_path / "ct")
    assert isinstance(img, DicomImage3D)
    return img


def seg_on_grid(path: Path, image: DicomImage3D) -> np.ndarray:
    """The SEG's segments as TotalSegmentator class ids on ``image``'s grid (the reader checks the grids
    coincide): what the round-trip tests compare with the label map written."""
    return dicom_seg_labels(path, image)


def test_seg_of_real_labels_roundtrips(dicom_ct: DicomImage3D, ct_dir: Path, tmp_path: Path) -> None:
    labels = read_image(ct_dir / "example_seg_fast.nii.gz").data.astype(np.uint8)
    out = write_dicom_seg(labels, dicom_ct, TOTAL_CLASSES, tmp_path / "seg.dcm", model_id="test-model")
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.Modality == "SEG"
    assert ds.SegmentationType == "BINARY"
    # The source series is referenced: the series UID, every frame to one of its instances, same patient/study.
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == dicom_ct.meta.series_uid
    source_uids = {str(d.SOPInstanceUID) for d in dicom_ct.datasets}
    refs = {str(d.ReferencedSOPInstanceUID) for d in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs <= source_uids and refs
    for frame in ds.PerFrameFunctionalGroupsSequence:
        src = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert str(src) in source_uids
    assert ds.PatientID == "P1" and ds.StudyInstanceUID == dicom_ct.meta.study_uid
    assert ds.FrameOfReferenceUID == dicom_ct.meta.frame_of_reference_uid
    # One segment per class present, named and coded like TotalSegmentator.
    present = sorted(int(k) for k in np.unique(labels) if k)
    _, names = read_dicom_seg(out)
    assert [names[n] for n in sorted(names)] == [TOTAL_CLASSES[k] for k in present]
    by_label = {str(s.SegmentLabel): s for s in ds.SegmentSequence}
    spleen = by_label["spleen"]
    assert spleen.SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"
    assert spleen.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert spleen.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    kidney = by_label["kidney_left"].SegmentedPropertyTypeCodeSequence[0]
    assert kidney.CodeValue == "64033007"
    assert kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"
    assert spleen.SegmentAlgorithmType == "AUTOMATIC"
    assert spleen.SegmentationAlgorithmIdentificationSequence[0].AlgorithmSource == "test-model"
    # Colours follow TotalSegmentator's table.
    rgb = hd.color.CIELabColor.from_dicom_value(tuple(spleen.RecommendedDisplayCIELabValue)).to_rgb()
    np.testing.assert_allclose(rgb, snomed_table()["spleen"]["rgb"], atol=2)
    # The voxels come back exactly.
    np.testing.assert_array_equal(seg_on_grid(out, dicom_ct), labels)


def test_oblique_series_and_class_subset(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.integers(-200, 200, size=(24, 20, 10)).astype(np.int16)
    t = np.radians(20)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]) @ np.diag([1.2, 1.2, 3.0])
    affine[:3, 3] = [5, -7, 30]
    write_dicom_series(data, affine, tmp_path / "ob", SeriesTags(uid_seed="ob"))
    img = load_ct(tmp_path / "ob")
    labels = np.zeros(img.shape, dtype=np.uint8)
    labels[3:10, 4:12, 2:6] = 1  # spleen
    labels[12:20, 5:9, 4:9] = 5  # liver
    labels[1:3, 1:3, 0:2] = 200  # not a TotalSegmentator id: not in `classes`, left out
    classes = {1: "spleen", 5: "liver"}
    out = write_dicom_seg(labels, img, classes, tmp_path / "ob.dcm")
    _, names = read_dicom_seg(out)
    assert names == {1: "spleen", 2: "liver"}
    back = seg_on_grid(out, img)
    np.testing.assert_array_equal(back, np.where(labels == 200, 0, labels))


def test_seg_of_an_enhanced_multiframe_ct(tmp_path: Path, rng: np.random.Generator) -> None:
    write_dicom_series(rng.integers(-100, 100, (16, 14, 8)).astype(np.int16), np.diag([1.0, 1.0, 2.0, 1.0]),
                       tmp_path / "s", SeriesTags())
    legacy = [pydicom.dcmread(f) for f in sorted((tmp_path / "s").iterdir())]
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(legacy, series_instance_uid=hd.UID(), series_number=9,
                                                  sop_instance_uid=hd.UID(), instance_number=1)
    (tmp_path / "mf").mkdir()
    mf.save_as(tmp_path / "mf" / "e.dcm", enforce_file_format=True)
    img = load_ct(tmp_path / "mf")
    assert isinstance(img, DicomImage3D) and img.multiframe
    labels = np.zeros(img.shape, np.uint8)
    labels[3:9, 2:7, 1:5] = 1
    out = write_dicom_seg(labels, img, {1: "spleen"}, tmp_path / "mf.dcm")
    ref = pydicom.dcmread(out).ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert ref.ReferencedSOPInstanceUID == img.datasets[0].SOPInstanceUID
    np.testing.assert_array_equal(seg_on_grid(out, img), labels)


@pytest.mark.parametrize("shift_mm", [0.08, 0.0005])  # ~1.5 degrees of gantry tilt; a 0.01 mm drift overall
def test_seg_of_a_slightly_tilted_stack(tmp_path: Path, rng: np.random.Generator, shift_mm: float) -> None:
    """A stack the reader accepts though its slices step slightly off their normal (its mean-step affine is
    not orthogonal): every SEG frame sits at its source image's own position and holds that slice's labels."""
    write_dicom_series(rng.integers(-100, 100, (20, 16, 24)).astype(np.int16), np.diag([1.0, 1.0, 3.0, 1.0]),
                       tmp_path / "t", SeriesTags(uid_seed="tilt"))
    for k, f in enumerate(sorted((tmp_path / "t").iterdir())):
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.6f}", f"{y + shift_mm * k:.6f}", f"{z:.6f}"]
        ds.save_as(f, enforce_file_format=True)
    img = load_ct(tmp_path / "t")
    assert isinstance(img, DicomImage3D) and abs(img.affine[1, 2]) > 0  # sheared: not a highdicom Volume
    labels = np.zeros(img.shape, np.uint8)
    labels[3:12, 2:9, 2:20] = 1
    labels[14:18, 10:15, 5:9] = 5
    out = write_dicom_seg(labels, img, {1: "spleen", 5: "liver"}, tmp_path / "t.dcm")
    ds = pydicom.dcmread(out)
    _, names = read_dicom_seg(out)
    by_uid = {str(d.SOPInstanceUID): k for k, d in enumerate(img.datasets)}
    seen = set()
    for f, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        src = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        k = by_uid[src]
        np.testing.assert_allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in img.datasets[k].ImagePositionPatient], atol=1e-4)
        cid = NAME_TO_ID[names[int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]]
        np.testing.assert_array_equal(ds.pixel_array[f].astype(bool), labels[:, :, k].T == cid)
        seen.add((cid, k))
    assert seen == {(c, int(k)) for c in (1, 5) for k in np.unique(np.nonzero(labels == c)[2])}
    # and it reads back onto that same tilted series, voxel for voxel
    np.testing.assert_array_equal(dicom_seg_labels(out, img), np.where(labels == 5, 5, labels))


def test_errors(dicom_ct: DicomImage3D, ct_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CTPassportError, match="nothing to store"):
        write_dicom_seg(np.zeros(dicom_ct.shape, np.uint8), dicom_ct, TOTAL_CLASSES, tmp_path / "e.dcm")
    assert not (tmp_path / "e.dcm").exists()
    nifti = read_image(ct_dir / "example_ct_sm.nii.gz")
    with pytest.raises(InputError, match="needs DICOM input"):
        write_dicom_seg(np.ones(nifti.shape, np.uint8), nifti, TOTAL_CLASSES, tmp_path / "n.dcm")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="does not match"):
        write_dicom_seg(np.ones((2, 2, 2), np.uint8), dicom_ct, TOTAL_CLASSES, tmp_path / "s.dcm")
    assert not list(tmp_path.glob("*.dcm"))


def test_anonymised_series_without_patient_tags(tmp_path: Path) -> None:
    write_dicom_series(np.zeros((10, 10, 5), np.int16), np.eye(4), tmp_path / "anon", SeriesTags())
    for f in (tmp_path / "anon").iterdir():
        ds = pydicom.dcmread(f)
        for k in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "StudyTime", "StudyID"):
            delattr(ds, k)
        ds.save_as(f, enforce_file_format=True)
    img = load_ct(tmp_path / "anon")
    labels = np.zeros(img.shape, np.uint8)
    labels[2:5, 2:5, 1:3] = 1
    out = write_dicom_seg(labels, img, {1: "spleen"}, tmp_path / "anon.dcm")
    ds = pydicom.dcmread(out)
    assert ds.PatientID == "" and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == img.meta.series_uid
    assert "PatientID" not in img.datasets[0]  # the loaded headers are left as they were
    np.testing.assert_array_equal(seg_on_grid(out, img), labels)


def test_unknown_class_names_get_tissue_code(dicom_ct: DicomImage3D, tmp_path: Path) -> None:
    labels = np.zeros(dicom_ct.shape, dtype=np.uint8)
    labels[10:20, 10:20, 5:9] = 7
    out = write_dicom_seg(labels, dicom_ct, {7: "my_lesion"}, tmp_path / "t.dcm")
    s = pydicom.dcmread(out).SegmentSequence[0]
    assert s.SegmentLabel == "my_lesion"
    assert s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Tissue"


def test_table_covers_all_classes() -> None:
    table = snomed_table()
    assert set(TOTAL_CLASSES.values()) <= set(table)
    assert all(e["type"][0] == "SCT" and len(e["rgb"]) == 3 for e in table.values())


@pytest.mark.vanilla
def test_table_equals_totalsegmentators_csv() -> None:
    ts = pytest.importorskip("totalsegmentator")
    csv_path = Path(ts.__file__).parent / "resources" / "totalsegmentator_snomed_mapping.csv"
    assert snomed_table_from_csv(csv_path, list(TOTAL_CLASSES.values())) == {n: snomed_table()[n] for n in
                                                                             TOTAL_CLASSES.values()}


@pytest.mark.torch
@pytest.mark.slow
def test_cli_segment_dicom_to_seg_and_nifti(dicom_ct: DicomImage3D, standin_home: Path, tmp_path: Path) -> None:
    folder = dicom_ct.path
    runner = CliRunner()
    out = tmp_path / "out" / "seg.dcm"
    res = runner.invoke(app, ["segment", "-i", str(folder), "-o", str(out), "--output-type", "dicom_seg",
                              "--model", str(standin_home), "--statistics", "--timings", str(tmp_path / "t.json"),
                              "-q"])
    assert res.exit_code == 0, res.output
    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG" and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == dicom_ct.meta.series_uid
    assert (out.parent / "statistics.json").is_file()
    _, names = read_dicom_seg(out)
    assert names and set(names.values()) <= set(TOTAL_CLASSES.values())
    # NIfTI output of the same DICOM input, chosen by --series-uid: the same labels on the same grid.
    nii = tmp_path / "labels.nii.gz"
    res = runner.invoke(app, ["segment", "-i", str(folder), "-o", str(nii), "--ml", "--series-uid",
                              dicom_ct.meta.series_uid, "--model", str(standin_home), "-q"])
    assert res.exit_code == 0, res.output
    lab = read_image(nii)
    np.testing.assert_allclose(lab.affine, dicom_ct.affine, atol=1e-4)
    np.testing.assert_array_equal(seg_on_grid(out, dicom_ct), lab.data)
    # TotalSegmentator's spelling (-ot) and an existing folder as -o: the SEG is <its SeriesInstanceUID>.dcm in it
    box = tmp_path / "segs"
    box.mkdir()
    res = runner.invoke(app, ["segment", "-i", str(folder), "-o", str(box), "-ot", "dicom_seg",
                              "--model", str(standin_home), "-q"])
    assert res.exit_code == 0, res.output
    (made,) = box.iterdir()
    assert made.name == f"{pydicom.dcmread(made).SeriesInstanceUID}.dcm"
    np.testing.assert_array_equal(seg_on_grid(made, dicom_ct), lab.data)


def test_cli_dicom_seg_needs_dicom_input(ct_dir: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["segment", "-i", str(ct_dir / "example_ct_sm.nii.gz"), "-o",
                                   str(tmp_path / "x.dcm"), "--output-type", "dicom_seg", "-q"])
    assert res.exit_code != 0
    assert "needs DICOM input" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["segment", "-i", str(ct_dir / "example_ct_sm.nii.gz"), "-o",
                                   str(tmp_path / "x.dcm"), "--output-type", "rtstruct", "-q"])
    assert res.exit_code != 0 and "--output-type must be nifti or dicom_seg" in res.output


def test_cli_dicom_seg_refuses_a_series_without_frame_of_reference_before_the_model(tmp_path: Path) -> None:
    hu = np.random.default_rng(0).integers(-1000, 1000, (10, 10, 5)).astype(np.int16)
    write_dicom_series(hu, np.eye(4), tmp_path / "nofor", SeriesTags())
    for f in (tmp_path / "nofor").iterdir():
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(f, enforce_file_format=True)
    # the model does not exist: the error below comes before any model is loaded (or any inference runs)
    res = CliRunner().invoke(app, ["segment", "-i", str(tmp_path / "nofor"), "-o", str(tmp_path / "x.dcm"),
                                   "--output-type", "dicom_seg", "--model", str(tmp_path / "no_model"), "-q"])
    assert res.exit_code == 2, res.output
    assert "no FrameOfReferenceUID" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.dcm").exists()


@pytest.mark.torch
@pytest.mark.slow
def test_cli_series_choice_and_class_subset_reach_the_passport(dicom_ct: DicomImage3D, standin_home: Path,
                                                               tmp_path: Path) -> None:
    """A folder with two series: ``--series-uid`` of the smaller one is the one segmented, hashed in the
    passport and read again for its HU; ``-rs`` with DICOM SEG output keeps the passport to the same subset as
    the SEG (as on the NIfTI path)."""
    import shutil

    from ctpassport.io.load import source_sha256

    folder = tmp_path / "two"
    shutil.copytree(dicom_ct.path, folder)
    big = np.zeros((*dicom_ct.data.shape[:2], dicom_ct.data.shape[2] + 6), dtype=np.int16) - 1000
    write_dicom_series(big, dicom_ct.affine, tmp_path / "big", SeriesTags(patient_id="P1", uid_seed="big"))
    for f in (tmp_path / "big").iterdir():
        shutil.copy(f, folder / f"big_{f.name}")
    uid = dicom_ct.meta.series_uid
    assert source_sha256(folder) != source_sha256(folder, uid)  # the largest series is not the one we ask for
    runner = CliRunner()
    p_nii = tmp_path / "p_nii.json"
    res = runner.invoke(app, ["segment", "-i", str(folder), "--series-uid", uid, "-o", str(tmp_path / "l.nii.gz"),
                              "--ml", "--passport", str(p_nii), "--passport-grid", "output",
                              "--model", str(standin_home), "-q"])
    assert res.exit_code == 0, res.output
    pas = json.loads(p_nii.read_text())
    assert pas["source"]["sha256"] == source_sha256(folder, uid)
    assert tuple(pas["grid"]["shape"]) == dicom_ct.data.shape
    assert any(o["hu_mean"] is not None and o["hu_mean"] > -900 for o in pas["organs"])  # HU of the chosen series
    p_seg = tmp_path / "p_seg.json"
    res = runner.invoke(app, ["segment", "-i", str(folder), "--series-uid", uid, "-o", str(tmp_path / "s.dcm"),
                              "--output-type", "dicom_seg", "-rs", "liver", "-rs", "spleen", "--passport", str(p_seg),
                              "--model", str(standin_home), "-q"])
    assert res.exit_code == 0, res.output
    _, names = read_dicom_seg(tmp_path / "s.dcm")
    organs = {o["name"] for o in json.loads(p_seg.read_text())["organs"]}
    assert organs and organs <= {"liver", "spleen"} and set(names.values()) <= {"liver", "spleen"}


def test_passport_of_a_dicom_seg_with_its_ct(dicom_ct: DicomImage3D, ct_dir: Path, tmp_path: Path) -> None:
    """``passport -i seg.dcm --ct ct_dir``: the SEG placed on its CT's grid gives the passport of the label map it
    was written from (same organs, volumes, centroids, HU); without the CT, with another CT, or with segment
    labels that are not class names: one line, exit 2, nothing written."""
    import pydicom

    nifti = ct_dir / "example_seg_fast.nii.gz"
    labels = read_image(nifti).data.astype(np.uint8)
    seg = write_dicom_seg(labels, dicom_ct, TOTAL_CLASSES, tmp_path / "seg.dcm")
    runner = CliRunner()
    for name, args in (("from_seg", ["-i", str(seg)]), ("from_nifti", ["-i", str(nifti)])):
        r = runner.invoke(app, ["passport", *args, "--ct", str(tmp_path / "ct"), "-o", str(tmp_path / f"{name}.json"),
                                "--points", "50", "-q"])
        assert r.exit_code == 0, r.output
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("from_seg", "from_nifti"))
    assert [o["id"] for o in a["organs"]] == [o["id"] for o in b["organs"]] and len(a["organs"]) > 20
    for oa, ob in zip(a["organs"], b["organs"]):
        assert oa["volume_mm3"] == pytest.approx(ob["volume_mm3"], rel=1e-9)
        np.testing.assert_allclose(oa["centroid_mm"], ob["centroid_mm"], atol=1e-3)
        assert oa["hu_mean"] == pytest.approx(ob["hu_mean"], abs=1e-3) and oa["truncated"] == ob["truncated"]

    def fails(args: list[str], *words: str) -> None:
        out = tmp_path / "bad.json"
        r = runner.invoke(app, ["passport", *args, "-o", str(out)])
        err = r.stderr.strip()
        assert r.exit_code == 2 and len(err.splitlines()) == 1 and not out.exists(), r.output
        assert all(w in err for w in words), err

    fails(["-i", str(seg)], "seg.dcm", "DICOM SEG", "--ct")
    other = load_ct(tmp_path / "ct")
    write_dicom_series(other.data[:, :, 5:], other.affine @ _shift(0, 0, 5.5), tmp_path / "other",
                       SeriesTags(uid_seed="other"))
    fails(["-i", str(seg), "--ct", str(tmp_path / "other")], "seg.dcm", "CT")
    ds = pydicom.dcmread(seg)
    ds.SegmentSequence[0].SegmentLabel = "Tumour"
    ds.save_as(tmp_path / "renamed.dcm")
    fails(["-i", str(tmp_path / "renamed.dcm"), "--ct", str(tmp_path / "ct")], "renamed.dcm", "Tumour",
          "class names")


def _shift(i: float, j: float, k: float) -> np.ndarray:
    out = np.eye(4)
    out[:3, 3] = (i, j, k)
    return out


def test_segment_labels_other_tools_write() -> None:
    from ctpassport.io.dicom_seg import _class_id

    assert _class_id("kidney_left") == NAME_TO_ID["kidney_left"] == _class_id("Kidney Left")
    assert _class_id("Vertebrae L1") == NAME_TO_ID["vertebrae_L1"] == _class_id("vertebrae-l1")
    assert _class_id("Tumour") is None


def test_a_seg_is_placed_only_on_the_series_it_was_made_from(tmp_path: Path) -> None:
    """Another study's CT on the same grid is refused (frame of reference), and so is another series of the same
    frame of reference that the SEG does not reference: the organs' HU would come from the wrong images."""
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    write_dicom_series(np.full((20, 16, 24), 40, np.int16), aff, tmp_path / "a", SeriesTags(uid_seed="A"))
    write_dicom_series(np.full((20, 16, 24), 900, np.int16), aff, tmp_path / "b", SeriesTags(uid_seed="B"))
    img = load_ct(tmp_path / "a")
    assert isinstance(img, DicomImage3D)
    labels = np.zeros(img.shape, np.uint8)
    labels[3:12, 2:9, 2:20] = 1
    out = write_dicom_seg(labels, img, {1: "spleen"}, tmp_path / "seg.dcm")
    np.testing.assert_array_equal(dicom_seg_labels(out, img), labels)
    with pytest.raises(InputError, match="its frame of reference .* is not the one of the CT given with it"):
        dicom_seg_labels(out, load_ct(tmp_path / "b"))
    write_dicom_series(np.full((20, 16, 24), 900, np.int16), aff, tmp_path / "c",
                       SeriesTags(uid_seed="A", series_number=7, frame_of_reference_uid=img.meta.frame_of_reference_uid))
    with pytest.raises(InputError, match="it was made on series .*not on the CT series given with it"):
        dicom_seg_labels(out, load_ct(tmp_path / "c"))
