"""The `passport` and `show` commands, the pictures, and the schema round trip."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ctpassport.cli import app
from ctpassport.passport.build import build_passport
from ctpassport.passport.schema import Passport, load_passport, save_passport
from ctpassport.passport.show import png_size_px, render_html, render_png, spine_chain
from ctpassport.passport.synthetic import torso_labels

runner = CliRunner()


@pytest.fixture(scope="module")
def torso_passport() -> Passport:
    labels, aff = torso_labels((67, 67, 118))  # all 117 classes at ~6 mm (fast)
    labels[labels == 36] = 0  # vertebrae_T8 missing: a gap in the spine
    labels[labels == 29] = 0  # and vertebrae_L3
    return build_passport(labels, aff, points=60)


def test_passport_command(tmp_path: Path, ct_dir: Path) -> None:
    out = tmp_path / "sub" / "passport.json"
    res = runner.invoke(app, ["passport", "-i", str(ct_dir / "example_seg_fast.nii.gz"), "-o", str(out),
                              "--ct", str(ct_dir / "example_ct_sm.nii.gz"), "--points", "100", "--seed", "4"])
    assert res.exit_code == 0, res.output
    assert "40 organs" in res.stderr
    p = load_passport(out)
    assert len(p.organs) == 40 and p.seed == 4 and p.points_per_organ == 100
    assert all(len(o.boundary_points_mm) <= 100 for o in p.organs)
    assert all(o.hu_mean is not None for o in p.organs)
    assert p.source.path and p.source.sha256 and p.source.ct_sha256
    doc = json.loads(out.read_text())
    assert doc["coordinate_frame"] == "RAS+ world mm" and doc["grid"]["kind"] == "output"
    assert all(o.boundary_normals is None for o in p.organs)  # normals only with --normals
    with_n = tmp_path / "with_normals.json"
    res = runner.invoke(app, ["passport", "-i", str(ct_dir / "example_seg_fast.nii.gz"), "-o", str(with_n),
                              "--points", "100", "--seed", "4", "--normals"])
    assert res.exit_code == 0, res.output
    pn = load_passport(with_n)
    assert pn.schema_version == "1.3"
    for a, b in zip(p.organs, pn.organs, strict=True):
        assert a.boundary_points_mm == b.boundary_points_mm and len(b.boundary_normals or []) == len(b.boundary_points_mm)


def test_empty_label_map_warns_on_the_command_line(tmp_path: Path) -> None:
    import nibabel as nib

    src = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), dtype=np.uint8), np.eye(4)), str(src))
    out = tmp_path / "p.json"
    res = runner.invoke(app, ["passport", "-i", str(src), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "warning" in res.stderr and "empty" in res.stderr
    p = load_passport(out)
    assert p.organs == [] and p.warnings


def test_round_trip(tmp_path: Path, torso_passport: Passport) -> None:
    path = save_passport(torso_passport, tmp_path / "p.json")
    again = load_passport(path)
    assert again == Passport.model_validate(json.loads(torso_passport.model_dump_json()))
    assert again.model_dump_json() == torso_passport.model_dump_json()
    assert len(again.organs) == 115


def test_png_is_a_valid_image_of_the_expected_size(tmp_path: Path, torso_passport: Passport) -> None:
    out = render_png(torso_passport, tmp_path / "p.png", dpi=40)
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == png_size_px(40) == (960, 1280)
        arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 10  # not a blank page


def test_show_command_png_and_html(tmp_path: Path, torso_passport: Passport) -> None:
    src = save_passport(torso_passport, tmp_path / "p.json")
    png, page = tmp_path / "p.png", tmp_path / "p.html"
    res = runner.invoke(app, ["show", str(src), "-o", str(png), "--html", str(page), "--dpi", "30"])
    assert res.exit_code == 0, res.output
    with Image.open(png) as im:
        assert im.size == png_size_px(30)
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "plotly" in text.lower()
    for o in torso_passport.organs:
        assert o.name is not None and o.name in text
    assert "T8 missing" in text and "L3 missing" in text
    res = runner.invoke(app, ["show", str(src), "-o", str(png)])
    assert res.exit_code == 4  # exists, no --force
    assert runner.invoke(app, ["show", str(src)]).exit_code == 5  # nothing to write: a bad setting


def test_html_names_unknown_labels(tmp_path: Path) -> None:
    labels = np.zeros((20, 20, 20), dtype=np.uint16)
    labels[2:8, 2:8, 2:8] = 1
    labels[10:16, 10:16, 10:16] = 999
    out = render_html(build_passport(labels, np.eye(4)), tmp_path / "x.html")
    text = out.read_text(encoding="utf-8")
    assert "spleen" in text and "label_999" in text


def test_spine_chain_marks_gaps(torso_passport: Passport) -> None:
    chain = spine_chain(torso_passport)
    names = [c["short"] for c in chain]
    assert names[0] == "C1" and names[-1] == "S1" and len(names) == 25
    missing = [c["short"] for c in chain if not c["present"]]
    assert missing == ["T8", "L3"]
    t8 = next(c for c in chain if c["short"] == "T8")
    t7 = torso_passport.organ("vertebrae_T7")
    t9 = torso_passport.organ("vertebrae_T9")
    assert t7 is not None and t9 is not None
    np.testing.assert_allclose(t8["centroid"], (np.asarray(t7.centroid_mm) + np.asarray(t9.centroid_mm)) / 2)
    # Top to bottom: z decreases along the chain.
    z = [c["centroid"][2] for c in chain]
    assert all(a > b for a, b in itertools.pairwise(z))


def test_show_without_vertebrae_or_organs(tmp_path: Path) -> None:
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    with pytest.warns(UserWarning):
        empty = build_passport(labels, np.eye(4))
    out = render_png(empty, tmp_path / "e.png", dpi=20)
    with Image.open(out) as im:
        assert im.size == png_size_px(20)
    assert spine_chain(empty) == []
    render_html(empty, tmp_path / "e.html")


@pytest.mark.parametrize("missing, option", [("matplotlib", "-o"), ("plotly", "--html")])
def test_show_without_the_viz_extra_is_a_one_line_error(tmp_path: Path, torso_passport: Passport,
                                                        monkeypatch: pytest.MonkeyPatch, missing: str,
                                                        option: str) -> None:
    # a plain `pip install ctpassport` has neither matplotlib nor plotly: say what to install, not exit 70
    src = save_passport(torso_passport, tmp_path / "p.json")
    monkeypatch.setitem(__import__("sys").modules, missing, None)  # `import <missing>` raises ImportError
    out = tmp_path / ("p.png" if option == "-o" else "p.html")
    res = runner.invoke(app, ["show", str(src), option, str(out)])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code not in (0, 70) and len(lines) == 1, res.output
    assert missing in lines[0] and "pip install 'ctpassport[viz]'" in lines[0]
    assert not out.exists()


def test_show_never_draws_over_its_passport_or_twice_into_one_file(tmp_path: Path,
                                                                   torso_passport: Passport) -> None:
    src = save_passport(torso_passport, tmp_path / "p.json")
    before = src.read_bytes()
    for args in (["-o", str(src), "--force"], ["--html", str(tmp_path / "." / "p.json"), "--force"],
                 ["-o", str(tmp_path / "same"), "--html", str(tmp_path / "same")]):
        res = runner.invoke(app, ["show", str(src), *args, "--dpi", "20"])
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1, res.output
        assert lines[0].startswith("ctpassport: error:")
    assert src.read_bytes() == before and not (tmp_path / "same").exists()
