"""DICOM CT input: series splitting and choice, sorting, validation, geometry (checked against SimpleITK)."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ctpassport.errors import InputError
from ctpassport.io.dicom import DicomImage3D, dicom_metadata, scan_series
from ctpassport.io.dicom_write import SeriesTags, write_dicom_series
from ctpassport.io.load import input_kind, load_ct, source_sha256
from ctpassport.io.nifti import read_image

pydicom = pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def ct_sm(ct_dir: Path):  # type: ignore[no-untyped-def]
    return read_image(ct_dir / "example_ct_sm.nii.gz")


TAGS = SeriesTags(patient_id="PAT-0042", patient_name="Doe^Jane", patient_birth_date="19600101", patient_sex="F",
                  study_date="20230415", study_time="101500", study_description="CT CHEST ABDOMEN",
                  accession_number="ACC123", series_number=3, series_description="AX 3mm", uid_seed="tests")


@pytest.fixture
def series_dir(tmp_path: Path, ct_sm) -> Path:  # type: ignore[no-untyped-def]
    folder = tmp_path / "study" / "ct"
    write_dicom_series(ct_sm.data, ct_sm.affine, folder, TAGS)
    return folder


def rotation(ax: int, deg: float) -> np.ndarray:
    t = np.radians(deg)
    c, s = np.cos(t), np.sin(t)
    i, j = [a for a in range(3) if a != ax]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def sitk_read(folder: Path):  # type: ignore[no-untyped-def]
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def test_roundtrip_matches_nifti_and_simpleitk(series_dir: Path, ct_sm) -> None:  # type: ignore[no-untyped-def]
    img = load_ct(series_dir)
    assert isinstance(img, DicomImage3D)
    assert img.shape == ct_sm.shape
    np.testing.assert_array_equal(img.data, ct_sm.data)
    assert img.data.dtype == np.int16
    np.testing.assert_allclose(img.affine, ct_sm.affine, atol=1e-4)
    # An independent reader (ITK/GDCM, LPS+): same voxels, same geometry.
    s = sitk_read(series_dir)
    arr = np.asarray(__import__("SimpleITK").GetArrayFromImage(s))  # [slice, row, column]
    np.testing.assert_array_equal(arr.transpose(2, 1, 0), img.data)
    for ijk in [(0, 0, 0), (121, 0, 0), (5, 100, 29), (60, 50, 15)]:
        lps = np.array(s.TransformIndexToPhysicalPoint(tuple(int(v) for v in ijk)))
        ras = img.affine @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-3)
    m = img.meta
    assert m is not None
    assert (m.patient_id, m.study_date, m.modality, m.accession_number) == ("PAT-0042", "2023-04-15", "CT", "ACC123")
    assert m.slice_thickness_mm == pytest.approx(3.0)
    assert m.n_slices == 30 and m.series_number == 3 and m.series_description == "AX 3mm"
    assert len(img.datasets) == 30
    z = [float(ds.ImagePositionPatient[2]) for ds in img.datasets]
    assert z == sorted(z)  # headers in the volume's slice order


@pytest.mark.parametrize("case", ["oblique", "flipped"])
def test_any_orientation(tmp_path: Path, rng: np.random.Generator, case: str) -> None:
    data = rng.integers(-1000, 2000, size=(20, 16, 12)).astype(np.int16)
    affine = np.eye(4)
    if case == "oblique":
        affine[:3, :3] = rotation(2, 25) @ rotation(0, 12) @ np.diag([0.8, 0.9, 2.5])
    else:  # stored L->R, P->A... with slices running inferior
        affine[:3, :3] = np.diag([-0.7, -0.7, -1.5])
    affine[:3, 3] = [12.5, -40.0, 100.0]
    write_dicom_series(data, affine, tmp_path / "s", SeriesTags(uid_seed=case))
    img = load_ct(tmp_path / "s")
    s = sitk_read(tmp_path / "s")
    # Compare voxel by voxel in world space: the same world point has the same value.
    assert img.shape == data.shape
    for ijk in [(0, 0, 0), (19, 15, 11), (3, 7, 5), (10, 2, 9)]:
        world = img.affine @ np.array([*ijk, 1.0])
        lps = world[:3] * [-1, -1, 1]
        idx = s.TransformPhysicalPointToIndex(tuple(float(v) for v in lps))
        arr = __import__("SimpleITK").GetArrayFromImage(s)
        assert img.data[ijk] == arr[idx[2], idx[1], idx[0]]
    # And the geometry equals the written one up to the slice order the reader chose.
    orig_world = affine @ np.array([3, 7, 5, 1.0])
    mine = np.linalg.solve(img.affine, orig_world)
    np.testing.assert_allclose(mine, np.round(mine), atol=1e-3)
    assert img.data[tuple(round(v) for v in mine[:3])] == data[3, 7, 5]


def test_file_order_and_names_do_not_matter(series_dir: Path, tmp_path: Path, ct_sm, rng) -> None:  # type: ignore[no-untyped-def]
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    files = sorted(series_dir.iterdir())
    for n, f in zip(rng.permutation(len(files)), files):
        shutil.copy(f, shuffled / f"x{n:03d}")  # no .dcm suffix, random order
    (shuffled / "README.txt").write_text("not dicom")
    img = load_ct(shuffled)
    np.testing.assert_array_equal(img.data, ct_sm.data)
    assert source_sha256(shuffled) == source_sha256(series_dir)


def test_zip_input(series_dir: Path, tmp_path: Path, ct_sm) -> None:  # type: ignore[no-untyped-def]
    zpath = tmp_path / "series.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(series_dir.iterdir()):
            zf.write(f, f"export/CT/{f.name}")
        zf.writestr("export/notes.txt", "hello")
        zf.writestr("__MACOSX/export/._IM00001.dcm", b"\0" * 300)
    assert input_kind(zpath) == "dicom-zip"
    img = load_ct(zpath)
    np.testing.assert_array_equal(img.data, ct_sm.data)
    np.testing.assert_allclose(img.affine, ct_sm.affine, atol=1e-4)
    assert source_sha256(zpath) == source_sha256(series_dir)


def test_largest_ct_series_is_chosen_or_by_uid(tmp_path: Path, ct_sm) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "mixed"
    big = SeriesTags(series_uid="1.2.3.1", series_number=1, uid_seed="m", study_uid="1.2.3")
    small = SeriesTags(series_uid="1.2.3.2", series_number=2, uid_seed="m", study_uid="1.2.3")
    mr = SeriesTags(series_uid="1.2.3.3", series_number=3, uid_seed="m", study_uid="1.2.3", modality="MR")
    write_dicom_series(ct_sm.data, ct_sm.affine, root / "a", big)
    write_dicom_series(ct_sm.data[10:50, 10:50, :12], ct_sm.affine, root / "b", small)
    mr_data = np.zeros((16, 16, 40), dtype=np.int16)
    write_dicom_series(mr_data, np.diag([2.0, 2.0, 2.0, 1.0]), root / "c", mr)
    found = scan_series(root)
    assert [s.series_uid for s in found] == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]  # CT first, then size
    assert load_ct(root).meta.series_uid == "1.2.3.1"
    small_img = load_ct(root, series_uid="1.2.3.2")
    assert small_img.shape == (40, 40, 12)
    np.testing.assert_array_equal(small_img.data, ct_sm.data[10:50, 10:50, :12])
    with pytest.raises(InputError, match=r"no series with SeriesInstanceUID 9\.9.*found: 1\.2\.3\.1 \(CT, 30 images"):
        load_ct(root, series_uid="9.9")
    with pytest.raises(InputError, match="is MR, not CT"):
        load_ct(root, series_uid="1.2.3.3")
    with pytest.raises(InputError, match="holds no CT series"):
        load_ct(root / "c")
    assert dicom_metadata(root, "1.2.3.2").n_slices == 12


def _edit(path: Path, **tags: object) -> None:
    ds = pydicom.dcmread(path)
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)


def test_missing_slice_is_a_clear_error(series_dir: Path) -> None:
    (series_dir / "IM00014.dcm").unlink()
    with pytest.raises(InputError, match=r"uneven slice spacing: 6\.000 mm between slices 12 and 13.*3\.000 mm") as e:
        load_ct(series_dir)
    assert str(series_dir) in str(e.value) and "\n" not in str(e.value)


def test_mixed_orientation_is_a_clear_error(series_dir: Path) -> None:
    for k in range(7, 11):  # more images than a few scouts
        _edit(series_dir / f"IM{k:05d}.dcm", ImageOrientationPatient=["1", "0", "0", "0", "0.9", "0.43589"])
    with pytest.raises(InputError, match="slices have different orientations"):
        load_ct(series_dir)


def test_one_image_in_another_orientation_is_not_a_slice(series_dir: Path) -> None:
    """An image of another orientation inside the stack (not a scout) leaves its slice missing: refused."""
    _edit(series_dir / "IM00007.dcm", ImageOrientationPatient=["1", "0", "0", "0", "0.9", "0.43589"])
    with pytest.raises(InputError, match="uneven slice spacing"):
        load_ct(series_dir)


def test_an_untyped_scout_in_the_series_is_left_out(series_dir: Path, ct_sm) -> None:  # type: ignore[no-untyped-def]
    """A scout whose ImageType does not say LOCALIZER, in the CT's series with the CT's image size: left out
    as dicom2nifti (TotalSegmentator's reader) does, not a reason to refuse the series."""
    ds = pydicom.dcmread(series_dir / "IM00001.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]  # coronal
    ds.save_as(series_dir / "scout.dcm", enforce_file_format=True)
    np.testing.assert_array_equal(load_ct(series_dir).data, ct_sm.data)


def test_raw_data_sets_duplicates_and_linked_folders(series_dir: Path, tmp_path: Path, ct_sm) -> None:  # type: ignore[no-untyped-def]
    """Files without the 128-byte preamble (raw data sets) are read like GDCM reads them, not skipped (which
    shortened the volume when they were its end slices); the same instance twice is read once; a series in a
    linked sub-folder is found."""
    files = sorted(series_dir.iterdir())
    for f in (files[0], files[-1]):
        ds = pydicom.dcmread(f)
        ds.preamble = None
        del ds.file_meta  # a bare data set: no preamble, no file meta group
        raw = tmp_path / "raw.dcm"
        ds.save_as(raw, enforce_file_format=False, implicit_vr=True, little_endian=True)
        assert raw.read_bytes()[128:132] != b"DICM"
        raw.replace(f)
    shutil.copy(files[5], series_dir / "copy_of_IM00006.dcm")
    top = tmp_path / "linked"
    top.mkdir()
    (top / "series").symlink_to(series_dir, target_is_directory=True)
    (series_dir / "loop").symlink_to(top, target_is_directory=True)  # a link cycle is walked once
    img = load_ct(top)
    assert img.shape == ct_sm.shape
    np.testing.assert_array_equal(img.data, ct_sm.data)
    np.testing.assert_allclose(img.affine, load_ct(tmp_path / "study").affine)


@pytest.mark.parametrize("vr", [b"VS", b"\x4c\x0f"])
def test_a_damaged_header_value_names_the_file(series_dir: Path, vr: bytes) -> None:
    f = series_dir / "IM00004.dcm"
    raw = f.read_bytes()
    tag = b"\x28\x00\x30\x00DS"  # PixelSpacing, explicit VR little endian
    assert raw.count(tag) == 1
    f.write_bytes(raw.replace(tag, b"\x28\x00\x30\x00" + vr))
    with pytest.raises(InputError, match=r"IM00004\.dcm: damaged DICOM header"):
        load_ct(series_dir)


def enhanced_copy(series_dir: Path, out: Path) -> DicomImage3D:
    """The single-frame series in ``series_dir`` converted to one enhanced CT image in ``out``, read back."""
    hd = pytest.importorskip("highdicom")
    legacy = [pydicom.dcmread(f) for f in sorted(series_dir.iterdir())]
    mf = hd.legacy.LegacyConvertedEnhancedCTImage(legacy, series_instance_uid=hd.UID(), series_number=9,
                                                  sop_instance_uid=hd.UID(), instance_number=1)
    out.mkdir()
    mf.save_as(out / "enhanced.dcm", enforce_file_format=True)
    img = load_ct(out)
    assert isinstance(img, DicomImage3D) and img.multiframe
    return img


def test_enhanced_ct_of_a_tilted_stack_keeps_the_tilt(series_dir: Path, tmp_path: Path) -> None:
    """An enhanced (multi-frame) CT of slices stepping slightly off their normal is placed where its frames say,
    as the same slices read as single files are (highdicom's volume steps along the normal)."""
    for k, f in enumerate(sorted(series_dir.iterdir())):
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.6f}", f"{y + 0.08 * k:.6f}", f"{z:.6f}"]  # ~1.5 degrees
        ds.save_as(f, enforce_file_format=True)
    single = load_ct(series_dir)
    multi = enhanced_copy(series_dir, tmp_path / "enhanced")
    m = np.linalg.solve(multi.affine, single.affine)  # single voxel -> multi voxel: a permutation/flip
    np.testing.assert_allclose(m[:3, :3], np.round(m[:3, :3]), atol=1e-4)
    np.testing.assert_allclose(m[:3, 3], np.round(m[:3, 3]), atol=1e-3)
    corners = np.array([[i, j, k, 1.0] for i in (0, 121) for j in (0, 100) for k in (0, 29)])
    np.testing.assert_allclose((corners @ single.affine.T)[:, :3],
                               (np.rint(corners @ m.T) @ multi.affine.T)[:, :3], atol=1e-3)


def test_duplicate_positions_are_a_clear_error(series_dir: Path) -> None:
    ds = pydicom.dcmread(series_dir / "IM00005.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(series_dir / "IM00005b.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match="repeat the slice position"):
        load_ct(series_dir)


def test_gantry_tilt_is_a_clear_error(series_dir: Path) -> None:
    for k, f in enumerate(sorted(series_dir.iterdir())):
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:.6g}", f"{y + 0.5 * k:.6g}", f"{z:.6g}"]  # ~9.5 degrees
        ds.save_as(f, enforce_file_format=True)
    with pytest.raises(InputError, match=r"degrees off their normal \(gantry tilt\)"):
        load_ct(series_dir)


def test_mixed_sizes_and_single_slice(series_dir: Path, tmp_path: Path) -> None:
    write_dicom_series(np.zeros((8, 8, 1), dtype=np.int16), np.eye(4), tmp_path / "one", SeriesTags())
    with pytest.raises(InputError, match="single image"):
        load_ct(tmp_path / "one")
    ds = pydicom.dcmread(series_dir / "IM00003.dcm")
    ds.Rows = 50
    ds.PixelData = b"\0" * (50 * int(ds.Columns) * 2)
    ds.save_as(series_dir / "IM00003.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match="mixes image sizes"):
        load_ct(series_dir)


def test_localizer_in_the_series_is_ignored(series_dir: Path, ct_sm) -> None:  # type: ignore[no-untyped-def]
    ds = pydicom.dcmread(series_dir / "IM00001.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]  # a coronal scout
    ds.save_as(series_dir / "scout.dcm", enforce_file_format=True)
    img = load_ct(series_dir)
    np.testing.assert_array_equal(img.data, ct_sm.data)


def test_rescale_slope_and_float_values(tmp_path: Path, rng: np.random.Generator) -> None:
    data = rng.uniform(-1024.0, 3000.0, size=(10, 12, 6))
    write_dicom_series(data, np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "f", SeriesTags())
    assert pydicom.dcmread(min((tmp_path / "f").iterdir())).PixelRepresentation == 0
    img = load_ct(tmp_path / "f")
    assert img.data.dtype == np.float32
    slope = (data.max() - data.min()) / 65535
    np.testing.assert_allclose(img.data, data, atol=slope * 0.51 + 1e-3)


def test_not_dicom_inputs(tmp_path: Path, series_dir: Path, ct_dir: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    with pytest.raises(InputError, match="holds no DICOM files"):
        load_ct(empty)
    with pytest.raises(InputError, match="single DICOM file.*pass the folder"):
        load_ct(series_dir / "IM00001.dcm")
    with pytest.raises(InputError, match="no such file or folder"):
        load_ct(tmp_path / "missing")
    other = tmp_path / "x.bin"
    other.write_bytes(b"hello")
    with pytest.raises(InputError, match="not a NIfTI file"):
        load_ct(other)
    with pytest.raises(InputError, match="applies to DICOM input"):
        load_ct(ct_dir / "example_ct_sm.nii.gz", series_uid="1.2.3")
    bad_zip = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad_zip, "w") as zf:
        zf.writestr("a.txt", "x")
    with pytest.raises(InputError, match="zip archive holds no DICOM files"):
        load_ct(bad_zip)


def test_truncated_file_names_the_file(series_dir: Path) -> None:
    f = series_dir / "IM00010.dcm"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) - 5000])
    with pytest.raises(InputError, match="IM00010.dcm"):
        load_ct(series_dir)


def test_nifti_dispatch_and_hash(ct_dir: Path) -> None:
    p = ct_dir / "example_ct_sm.nii.gz"
    img = load_ct(p)
    assert not isinstance(img, DicomImage3D)
    assert img.shape == (122, 101, 30)
    import hashlib

    assert source_sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest()


def test_multiframe_enhanced_ct(series_dir: Path, tmp_path: Path, ct_sm) -> None:  # type: ignore[no-untyped-def]
    img = enhanced_copy(series_dir, tmp_path / "enhanced")
    # Same world geometry and values as the single-frame series (axis order may differ).
    ref = load_ct(series_dir)
    m = np.linalg.solve(img.affine, ref.affine)
    perm = np.round(m[:3, :3])
    np.testing.assert_allclose(m[:3, :3], perm, atol=1e-4)
    for ijk in [(0, 0, 0), (121, 100, 29), (50, 20, 7)]:
        mine = np.round(m @ np.array([*ijk, 1.0])).astype(int)[:3]
        assert img.data[tuple(mine)] == ref.data[ijk]
