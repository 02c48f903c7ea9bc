"""NIfTI reading/writing: validation of bad inputs, atomic writes, label table round trip."""

from __future__ import annotations

import gzip
import io
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctpassport.errors import InputError
from ctpassport.io.labels import add_label_table, read_label_table
from ctpassport.io.nifti import make_nifti, read_image, save_nifti
from ctpassport.model.classes import TOTAL_CLASSES


def _write(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    aff = np.diag([1.5, 1.5, 2.0, 1.0]) if affine is None else affine
    with warnings.catch_warnings(), np.errstate(all="ignore"):  # degenerate affines on purpose
        warnings.simplefilter("ignore")
        img = nib.Nifti1Image(data, None)
        img.header.set_sform(aff, code=1)  # sform only: nibabel cannot build a qform from a singular affine
        img.header["pixdim"][1:4] = np.sqrt((aff[:3, :3] ** 2).sum(0))
        nib.save(img, str(path))
    return path


def _claim_shape(path: Path, shape: tuple[int, int, int]) -> Path:
    """Rewrite an uncompressed file's header to declare ``shape`` without adding voxel data."""
    raw = path.read_bytes()
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    hdr.set_data_shape(shape)
    path.write_bytes(hdr.binaryblock + raw[348:])
    return path


def test_reads_valid_image(tmp_path: Path) -> None:
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = read_image(_write(tmp_path / "a.nii.gz", data))
    assert img.shape == (2, 3, 4)
    assert img.data.dtype == np.int16  # unscaled integers keep their dtype
    np.testing.assert_array_equal(img.data, data)
    assert img.spacing == pytest.approx((1.5, 1.5, 2.0))


def test_scaled_data_becomes_float(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.arange(8, dtype=np.int16).reshape(2, 2, 2), np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "s.nii"))
    out = read_image(tmp_path / "s.nii")
    assert out.data.dtype == np.float32
    assert out.data.ravel()[3] == pytest.approx(3 * 2.0 - 1024.0)


def test_trailing_singleton_dimension_is_accepted(tmp_path: Path) -> None:
    img = read_image(_write(tmp_path / "a.nii.gz", np.zeros((4, 5, 6, 1), np.int16)))
    assert img.shape == (4, 5, 6)


@pytest.mark.parametrize(
    ("name", "maker", "message"),
    [
        ("missing.nii.gz", None, "no such file"),
        ("text.nii.gz", lambda p: p.write_text("hello, not an image"), "gzip"),
        ("text.nii", lambda p: p.write_bytes(b"hello, not an image" * 40), "not a NIfTI"),
        ("flat.nii.gz", lambda p: _write(p, np.zeros((8, 8), np.int16)), "2-D"),
        ("movie.nii.gz", lambda p: _write(p, np.zeros((4, 4, 4, 3), np.int16)), "4-D"),
        ("nan.nii.gz", lambda p: _write(p, np.full((4, 4, 4), np.nan, np.float32)), "NaN"),
        ("zero.nii.gz", lambda p: _write(p, np.zeros((4, 4, 4), np.int16), np.diag([0.0, 1, 1, 1])), "spacing"),
        ("huge.nii.gz", lambda p: _write(p, np.zeros((4, 4, 4), np.int16), np.diag([1e6, 1, 1, 1])), "spacing"),
        ("rgb.nii.gz", lambda p: _write(p, np.zeros((4, 4, 4), [("R", "u1"), ("G", "u1"), ("B", "u1")])), "RGB"),
        ("complex.nii.gz", lambda p: _write(p, np.zeros((4, 4, 4), np.complex64)), "complex voxels"),
        ("claims.nii", lambda p: _claim_shape(_write(p, np.zeros((4, 4, 4), np.int16)), (3000, 3000, 3000)),
         "header declares 54000000352"),
        ("short.nii", lambda p: p.write_bytes(_write(p, np.zeros((8, 8, 8), np.int16)).read_bytes()[:-100]),
         "truncated file or wrong dimensions"),
    ],
)
def test_bad_inputs_raise_one_line_errors(tmp_path: Path, name: str, maker, message: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / name
    if maker is not None:
        maker(path)
    with pytest.raises(InputError) as info:
        read_image(path)
    text = str(info.value)
    assert "\n" not in text
    assert message in text
    assert name in text


def test_truncated_gzip(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.nii.gz", np.random.default_rng(0).integers(-1000, 1000, (20, 20, 20)).astype(np.int16))
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="corrupt gzip"):
        read_image(bad)


def test_uncompressed_named_gz_is_rejected(tmp_path: Path) -> None:
    raw = tmp_path / "raw.nii"
    _write(raw, np.zeros((3, 3, 3), np.int16))
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(raw.read_bytes())
    with pytest.raises(InputError, match="not gzip"):
        read_image(fake)


def test_save_is_atomic_and_readable_by_nibabel(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(0, 5, (6, 7, 8)).astype(np.uint8)
    aff = np.array([[-1.5, 0, 0, 10], [0, -1.5, 0, 20], [0, 0, 2, -30], [0, 0, 0, 1]], float)
    out = save_nifti(make_nifti(data, aff), tmp_path / "x.nii.gz")
    assert gzip.decompress(out.read_bytes())[:4] == (348).to_bytes(4, "little")
    back = nib.load(str(out))
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), data)
    np.testing.assert_allclose(back.affine, aff)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.nii.gz"]  # no temporary left behind


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctpassport.io.nifti as mod

    def boom(img: object, compress: bool) -> bytes:
        raise RuntimeError("disk full")

    monkeypatch.setattr(mod, "nifti_bytes", boom)
    with pytest.raises(RuntimeError):
        save_nifti(make_nifti(np.zeros((2, 2, 2), np.uint8), np.eye(4)), tmp_path / "y.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_make_nifti_copies_header_geometry(tmp_path: Path) -> None:
    src = nib.Nifti1Image(np.zeros((3, 4, 5), np.int16), np.diag([0.7, 0.8, 2.5, 1]))
    src.header.set_xyzt_units("mm", "sec")
    src.header.set_slope_inter(1.0, -1024.0)
    src.set_qform(src.affine, code=1)
    src.set_sform(src.affine, code=2)
    out = make_nifti(np.ones((3, 4, 5), np.uint8), src.affine, src.header, dtype=np.uint8)
    assert out.get_data_dtype() == np.uint8
    assert int(out.header["sform_code"]) == 2 and int(out.header["qform_code"]) == 1
    assert out.header.get_xyzt_units() == ("mm", "sec")
    slope, inter = out.header.get_slope_inter()
    assert slope is None and inter is None


def test_make_nifti_keeps_a_qform_that_differs_from_the_sform(tmp_path: Path) -> None:
    """An output on the input's grid keeps the input's qform and sform as they are (nibabel/TotalSegmentator)."""
    sform = np.diag([-1.5, -1.5, 3.0, 1.0])
    sform[:3, 3] = [100.0, 120.0, -50.0]
    qform = sform.copy()
    qform[:3, 3] += [0.7, 0.0, 0.0]
    src = nib.Nifti1Image(np.zeros((3, 4, 5), np.int16), None)
    src.set_sform(sform, code=2)
    src.set_qform(qform, code=1)
    path = tmp_path / "in.nii.gz"
    nib.save(src, str(path))
    img = read_image(path)
    out = make_nifti(np.ones((3, 4, 5), np.uint8), img.affine, img.header, dtype=np.uint8)
    np.testing.assert_allclose(out.header.get_qform(), qform, atol=1e-4)
    np.testing.assert_allclose(out.header.get_sform(), sform, atol=1e-6)
    assert int(out.header["sform_code"]) == 2 and int(out.header["qform_code"]) == 1
    moved = sform.copy()
    moved[:3, 3] += 10.0  # another grid: both forms follow the new affine
    out = make_nifti(np.ones((3, 4, 5), np.uint8), moved, img.header, dtype=np.uint8)
    np.testing.assert_allclose(out.header.get_qform(), moved, atol=1e-4)
    np.testing.assert_allclose(out.header.get_sform(), moved, atol=1e-6)


def test_an_uncoded_input_gives_an_uncoded_output_that_overlays_it_in_itk(tmp_path: Path) -> None:
    """No sform, no qform: nibabel falls back to a centred LAS affine, ITK to origin 0 and identity directions.
    The output stays uncoded (as TotalSegmentator's copied header does), so it overlays the input in both."""
    sitk = pytest.importorskip("SimpleITK")
    src = nib.Nifti1Image(np.zeros((6, 7, 8), np.int16), None)
    src.header.set_zooms((2.0, 2.5, 3.0))
    src.header.set_sform(None, code=0)
    src.header.set_qform(None, code=0)
    nib.save(src, str(tmp_path / "in.nii.gz"))
    img = read_image(tmp_path / "in.nii.gz")
    save_nifti(make_nifti(np.ones(img.shape, np.uint8), img.affine, img.header, dtype=np.uint8),
               tmp_path / "out.nii.gz")
    back = nib.load(str(tmp_path / "out.nii.gz"))
    assert int(back.header["sform_code"]) == 0 and int(back.header["qform_code"]) == 0
    np.testing.assert_allclose(back.affine, img.affine, atol=1e-6)
    a, b = sitk.ReadImage(str(tmp_path / "in.nii.gz")), sitk.ReadImage(str(tmp_path / "out.nii.gz"))
    assert a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing())


def test_label_table_round_trip(tmp_path: Path) -> None:
    img = make_nifti(np.zeros((2, 2, 2), np.uint8), np.eye(4))
    add_label_table(img, TOTAL_CLASSES)
    save_nifti(img, tmp_path / "ml.nii.gz")
    assert read_label_table(nib.load(str(tmp_path / "ml.nii.gz"))) == TOTAL_CLASSES


@pytest.mark.vanilla
def test_label_table_reads_in_totalsegmentator(tmp_path: Path) -> None:
    pytest.importorskip("totalsegmentator")
    from totalsegmentator.nifti_ext_header import load_multilabel_nifti

    img = make_nifti(np.zeros((2, 2, 2), np.uint8), np.eye(4))
    subset = {1: "spleen", 5: "liver", 117: "costal_cartilages"}
    add_label_table(img, subset)
    save_nifti(img, tmp_path / "ml.nii.gz")
    _, label_map = load_multilabel_nifti(tmp_path / "ml.nii.gz")
    assert {int(k): v for k, v in label_map.items()} == subset
