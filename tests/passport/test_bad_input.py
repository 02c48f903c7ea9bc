"""Bad input: one clear line, a nonzero exit code, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ctpassport.cli import app
from ctpassport.errors import InputError
from ctpassport.passport.build import build_passport, passport_from_file
from ctpassport.passport.schema import load_passport

runner = CliRunner()


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), str(path))
    return path


def _good_labels() -> np.ndarray:
    lab = np.zeros((12, 12, 12), dtype=np.uint8)
    lab[3:8, 3:8, 3:8] = 5
    return lab


def _run_fails(args: list[str], out: Path, code: int, *words: str) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == code, res.output
    err = res.stderr.strip()
    assert err.startswith("ctpassport: error:") and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    assert "Traceback" not in res.output
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name.split('.')[0]}")]  # no temp


@pytest.mark.parametrize("case", ["float", "negative", "4d", "corrupt", "missing"])
def test_bad_label_maps(tmp_path: Path, case: str) -> None:
    src = tmp_path / "seg.nii.gz"
    if case == "float":
        _save(src, _good_labels().astype(np.float32) + 0.5)
        words = ("float32", "integer")
    elif case == "negative":
        lab = _good_labels().astype(np.int16)
        lab[0, 0, 0] = -1
        _save(src, lab)
        words = ("negative",)
    elif case == "4d":
        _save(src, np.stack([_good_labels()] * 2, axis=-1))
        words = ("4-D",)
    elif case == "corrupt":
        src.write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
        words = ("gzip",)
    else:
        src = tmp_path / "nothing.nii.gz"
        words = ("no such file",)
    out = tmp_path / "passport.json"
    _run_fails(["passport", "-i", str(src), "-o", str(out)], out, 2, str(src), *words)
    with pytest.raises(InputError):
        passport_from_file(src)


def test_ct_on_another_grid(tmp_path: Path) -> None:
    seg = _save(tmp_path / "seg.nii.gz", _good_labels())
    ct = _save(tmp_path / "ct.nii.gz", np.zeros((10, 12, 12), dtype=np.int16))
    out = tmp_path / "p.json"
    _run_fails(["passport", "-i", str(seg), "-o", str(out), "--ct", str(ct)], out, 2, "ct.nii.gz", "grid")


def test_ct_stored_in_another_axis_order_is_reordered_onto_the_labels(tmp_path: Path) -> None:
    """The same CT saved LPS beside a RAS label map: the HU per organ are the same as with the RAS copy."""
    lab = _good_labels()
    hu = np.random.default_rng(0).integers(-100, 200, lab.shape).astype(np.int16)
    seg = _save(tmp_path / "seg.nii.gz", lab)
    ras = nib.Nifti1Image(hu, np.diag([2.0, 2.0, 2.0, 1.0]))
    nib.save(ras, str(tmp_path / "ct_ras.nii.gz"))
    nib.save(ras.as_reoriented(nib.orientations.axcodes2ornt("LPS")), str(tmp_path / "ct_lps.nii.gz"))
    for name in ("ct_ras", "ct_lps"):
        res = runner.invoke(app, ["passport", "-i", str(seg), "-o", str(tmp_path / f"{name}.json"), "--ct",
                                  str(tmp_path / f"{name}.nii.gz"), "-q"])
        assert res.exit_code == 0, res.output
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["organs"][0] for n in ("ct_ras", "ct_lps"))
    assert a["hu_mean"] == pytest.approx(float(hu[lab == 5].mean()), abs=0.01) and a["hu_mean"] == b["hu_mean"]


def test_ct_as_a_dicom_series(tmp_path: Path) -> None:
    """``--ct`` takes the CT as a DICOM folder or zip too (as ``segment`` and ``store add`` do): the same HU
    per organ as with the NIfTI copy, and the passport records the series' identity hash."""
    import shutil

    from ctpassport.io.dicom_write import write_dicom_series
    from ctpassport.io.load import source_sha256

    lab = _good_labels()
    hu = np.random.default_rng(1).integers(-100, 200, lab.shape).astype(np.int16)
    seg = _save(tmp_path / "seg.nii.gz", lab)
    write_dicom_series(hu, np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path / "ct")
    zipped = Path(shutil.make_archive(str(tmp_path / "ct_zip"), "zip", tmp_path / "ct"))
    for ct in (tmp_path / "ct", zipped):
        out = tmp_path / f"{ct.name}.json"
        res = runner.invoke(app, ["passport", "-i", str(seg), "-o", str(out), "--ct", str(ct), "-q"])
        assert res.exit_code == 0, res.output
        doc = json.loads(out.read_text())
        assert doc["organs"][0]["hu_mean"] == pytest.approx(float(hu[lab == 5].mean()), abs=0.01)
        assert doc["source"]["ct_sha256"] == source_sha256(ct)
    out = tmp_path / "p.json"
    _run_fails(["passport", "-i", str(seg), "-o", str(out), "--series-uid", "1.2.3"], out, 5, "--series-uid", "--ct")
    _run_fails(["passport", "-i", str(seg), "-o", str(out), "--ct", str(tmp_path / "ct"), "--series-uid", "1.2.3"],
               out, 2, "1.2.3")


def test_bad_arrays_in_the_api() -> None:
    with pytest.raises(InputError, match="float"):
        build_passport(np.zeros((4, 4, 4), dtype=np.float64), np.eye(4))
    with pytest.raises(InputError, match="negative"):
        build_passport(-np.ones((4, 4, 4), dtype=np.int8), np.eye(4))
    with pytest.raises(InputError, match="4-D"):
        build_passport(np.zeros((4, 4, 4, 2), dtype=np.uint8), np.eye(4))
    with pytest.raises(InputError, match="affine"):
        build_passport(np.zeros((4, 4, 4), dtype=np.uint8), np.zeros((4, 4)))
    with pytest.raises(InputError, match="CT"):
        build_passport(np.zeros((4, 4, 4), dtype=np.uint8), np.eye(4), ct=np.zeros((4, 4, 5)))


def test_existing_output_needs_force(tmp_path: Path) -> None:
    seg = _save(tmp_path / "seg.nii.gz", _good_labels())
    out = tmp_path / "p.json"
    out.write_text("keep me")
    res = runner.invoke(app, ["passport", "-i", str(seg), "-o", str(out)])
    assert res.exit_code == 4 and "--force" in res.stderr
    assert out.read_text() == "keep me"
    assert runner.invoke(app, ["passport", "-i", str(seg), "-o", str(out), "--force", "-q"]).exit_code == 0
    assert load_passport(out).organs[0].id == 5


def _valid_passport_json(tmp_path: Path) -> dict:
    seg = _save(tmp_path / "seg.nii.gz", _good_labels())
    p = passport_from_file(seg, points=20, normals=True)
    return json.loads(p.model_dump_json())


@pytest.mark.parametrize("case", ["not_json", "truncated", "not_an_object", "bad_version", "missing_grid",
                                  "ascending_eigenvalues", "bad_point", "extra_field", "duplicate_ids",
                                  "normals_count", "normal_not_unit", "nan_point", "infinite_centroid",
                                  "huge_integer", "nested_too_deep", "grid_shape_zero", "grid_shape_negative",
                                  "grid_singular", "grid_last_row", "grid_beyond_100m", "huge_centroid",
                                  "huge_point", "negative_eigenvalues", "huge_covariance", "newer_schema_field",
                                  "malformed_version", "version_three_parts"])
def test_corrupt_or_schema_violating_passports(tmp_path: Path, case: str) -> None:
    good = _valid_passport_json(tmp_path)
    bad = tmp_path / "bad.json"
    words: tuple[str, ...]
    if case == "not_json":
        bad.write_bytes(b"\x00\x01binary")
        words = ("not valid JSON",)
    elif case == "truncated":
        bad.write_text(json.dumps(good)[:200])
        words = ("not valid JSON",)
    elif case == "huge_integer":  # valid JSON, beyond Python's 4300-digit integer conversion
        bad.write_text(json.dumps(good).replace('"seed": 0', '"seed": 1' + "0" * 5000, 1))
        words = ("not valid JSON", "4300 digits")
    elif case == "nested_too_deep":
        bad.write_text(json.dumps(good)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}")
        words = ("not valid JSON", "RecursionError")
    else:
        if case == "not_an_object":
            doc: object = [1, 2, 3]
            words = ("passport must hold a JSON object",)
        elif case == "bad_version":
            good["schema_version"] = "9.0"
            doc, words = good, ("schema_version", "unsupported")
        elif case in ("malformed_version", "version_three_parts"):
            good["schema_version"] = "1.x" if case == "malformed_version" else "1.3.9"
            doc, words = good, ("schema_version", "malformed passport schema version")
        elif case == "missing_grid":
            del good["grid"]
            doc, words = good, ("grid",)
        elif case == "ascending_eigenvalues":
            good["organs"][0]["eigenvalues_mm2"] = [1.0, 2.0, 3.0]
            doc, words = good, ("descending",)
        elif case == "bad_point":
            good["organs"][0]["boundary_points_mm"][0] = [1.0, 2.0]
            doc, words = good, ("boundary_points_mm",)
        elif case == "normals_count":
            good["organs"][0]["boundary_normals"].pop()
            doc, words = good, ("boundary_normals", "one normal per point")
        elif case == "normal_not_unit":
            good["organs"][0]["boundary_normals"][0] = [0.5, 0.0, 0.0]
            doc, words = good, ("boundary_normals", "unit")
        elif case == "nan_point":  # json.dumps writes NaN, which Python's json reads back
            good["organs"][0]["boundary_points_mm"][0] = [float("nan"), 2.0, 3.0]
            doc, words = good, ("boundary_points_mm", "finite")
        elif case == "infinite_centroid":
            good["organs"][0]["centroid_mm"] = [float("inf"), 2.0, 3.0]
            doc, words = good, ("centroid_mm", "finite")
        elif case.startswith("grid_"):
            g = good["grid"]
            if case == "grid_shape_zero":
                g["shape"][0] = 0
                words = ("grid", "at least 1 voxel")
            elif case == "grid_shape_negative":
                g["shape"][1] = -5
                words = ("grid", "at least 1 voxel")
            elif case == "grid_singular":
                g["affine"][0][:3] = [0.0, 0.0, 0.0]
                words = ("grid", "singular")
            elif case == "grid_last_row":
                g["affine"][3] = [1.0, 2.0, 3.0, 4.0]
                words = ("grid", "last row")
            else:
                g["shape"] = [100_000, 100_000, 100_000]
                words = ("grid", "beyond +-100000 mm")
            doc = good
        elif case == "huge_centroid":
            good["organs"][0]["centroid_mm"] = [1e308, 2.0, 3.0]
            doc, words = good, ("centroid_mm", "beyond +-100000 mm")
        elif case == "huge_point":
            good["organs"][0]["boundary_points_mm"][0] = [1e308, -1e308, 0.0]
            doc, words = good, ("boundary_points_mm", "beyond +-100000 mm")
        elif case == "negative_eigenvalues":
            good["organs"][0]["eigenvalues_mm2"] = [-1.0, -2.0, -3.0]
            doc, words = good, ("eigenvalues_mm2", "negative")
        elif case == "huge_covariance":
            good["organs"][0]["covariance_mm2"][0][0] = 1e300
            doc, words = good, ("covariance_mm2", "beyond")
        elif case == "newer_schema_field":  # a newer minor version's addition: say so, not just "extra field"
            good["schema_version"] = "1.4"
            good["organs"][0]["new_thing"] = 1
            doc, words = good, ("newer than this ctpassport reads (1.3)", "new_thing", "upgrade ctpassport")
        elif case == "extra_field":
            good["organs"][0]["colour"] = "red"
            doc, words = good, ("colour",)
        else:
            good["organs"].append(good["organs"][0])
            doc, words = good, ("unique", f"found id {good['organs'][0]['id']} more than once")
        bad.write_text(json.dumps(doc))
    with pytest.raises(InputError):
        load_passport(bad)
    out = tmp_path / "pic.png"
    _run_fails(["show", str(bad), "-o", str(out), "--html", str(tmp_path / "pic.html")], out, 2, "bad.json", *words)
    assert not (tmp_path / "pic.html").exists()


def test_byte_order_mark_and_newer_compatible_minor_version_load(tmp_path: Path) -> None:
    """A passport saved with a UTF-8 byte-order mark (Windows editors) loads; so does a newer minor version
    that adds nothing this version does not know."""
    doc = _valid_passport_json(tmp_path)
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(doc).encode())
    assert load_passport(bom).organs[0].centroid_mm == tuple(doc["organs"][0]["centroid_mm"])
    doc["schema_version"] = "1.4"
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(doc))
    assert load_passport(newer).schema_version == "1.4"


def test_schema_1_1_passport_without_normals_still_loads(tmp_path: Path) -> None:
    """Passports written before schema 1.2 have no ``boundary_normals``: they load (normals None); a 1.2 passport
    built with normals has one unit normal per boundary point."""
    doc = _valid_passport_json(tmp_path)
    assert doc["schema_version"] == "1.3"
    o = doc["organs"][0]
    assert len(o["boundary_normals"]) == len(o["boundary_points_mm"])
    for organ in doc["organs"]:
        del organ["boundary_normals"]
    doc["schema_version"] = "1.1"
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    p = load_passport(old)
    assert p.schema_version == "1.1" and all(o.boundary_normals is None for o in p.organs)
