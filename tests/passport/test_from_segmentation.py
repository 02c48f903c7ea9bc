"""`passport_from_segmentation`: the passport of a segmentation run on the model grid or the output grid."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ctpassport.cli import app
from ctpassport.passport.build import passport_from_file, passport_from_segmentation
from ctpassport.passport.schema import load_passport
from ctpassport.segment.pipeline import SegmentationResult, Timings


def _result(ct_dir: Path) -> SegmentationResult:
    """A SegmentationResult built from the shared files (no model): a 1.5 mm 'input' grid holding the real
    labels upsampled x2, and the real 3 mm labels as the 'model grid'."""
    seg = nib.load(str(ct_dir / "example_seg_fast.nii.gz"))
    ct = nib.load(str(ct_dir / "example_ct_sm.nii.gz"))
    lab3 = np.asanyarray(seg.dataobj)
    ct3 = np.asanyarray(ct.dataobj).astype(np.int32)
    up = np.repeat(np.repeat(np.repeat(lab3, 2, 0), 2, 1), 2, 2)
    aff15 = seg.affine.copy()
    aff15[:3, :3] /= 2.0
    aff15[:3, 3] -= 0.75  # voxel centres of the finer grid inside the coarse voxels
    return SegmentationResult(labels=np.ascontiguousarray(up), affine=aff15, header=None, model_labels=lab3,
                              model_ct=ct3, model_affine=seg.affine, timings=Timings())


def test_model_grid(tmp_path: Path, ct_dir: Path) -> None:
    res = _result(ct_dir)
    inp = ct_dir / "example_ct_sm.nii.gz"
    out = tmp_path / "p.json"
    p = passport_from_segmentation(res, out, input_path=inp, grid="model", model_id="Dataset297_test",
                                   timings={"infer": 1.25})
    assert load_passport(out).model_dump_json() == p.model_dump_json()
    assert p.grid.kind == "model" and p.model_id == "Dataset297_test"
    assert p.grid.shape == (122, 101, 30) and p.grid.spacing_mm == pytest.approx((3.0, 3.0, 3.0))
    assert p.timings["infer"] == 1.25 and "passport_build" in p.timings
    assert p.source.sha256 == hashlib.sha256(inp.read_bytes()).hexdigest()
    ref = passport_from_file(ct_dir / "example_seg_fast.nii.gz", ct_path=inp)
    for a, b in zip(p.organs, ref.organs):
        assert a.id == b.id
        np.testing.assert_allclose(a.centroid_mm, b.centroid_mm, atol=1e-9)
        assert a.hu_mean == pytest.approx(b.hu_mean)


def test_output_grid_reads_the_input_ct_for_hu(tmp_path: Path, ct_dir: Path) -> None:
    res = _result(ct_dir)
    # The 'input CT' must be on the output grid: write the upsampled CT as the input.
    ct3 = np.asanyarray(nib.load(str(ct_dir / "example_ct_sm.nii.gz")).dataobj)
    up = np.repeat(np.repeat(np.repeat(ct3, 2, 0), 2, 1), 2, 2)
    inp = tmp_path / "ct15.nii.gz"
    nib.save(nib.Nifti1Image(up, res.affine), str(inp))
    p = passport_from_segmentation(res, tmp_path / "p.json", input_path=inp, grid="output", model_id="m")
    assert p.grid.kind == "output" and p.grid.shape == (244, 202, 60)
    assert "passport_read_ct" in p.timings
    coarse = passport_from_segmentation(res, tmp_path / "q.json", input_path=inp, grid="model", model_id="m")
    for a, b in zip(p.organs, coarse.organs):  # same anatomy on both grids: same centroids, volumes, HU
        np.testing.assert_allclose(a.centroid_mm, b.centroid_mm, atol=1e-6)
        assert a.volume_mm3 == pytest.approx(b.volume_mm3)
        assert a.hu_mean == pytest.approx(b.hu_mean)
    # A CT passed through is used instead of reading the file again.
    q = passport_from_segmentation(res, tmp_path / "r.json", input_path=inp, grid="output", ct=up)
    assert "passport_read_ct" not in q.timings and q.organs[0].hu_mean == pytest.approx(p.organs[0].hu_mean)


def test_bad_grid_name(tmp_path: Path, ct_dir: Path) -> None:
    from ctpassport.errors import InputError

    with pytest.raises(InputError, match="passport-grid"):
        passport_from_segmentation(_result(ct_dir), tmp_path / "p.json", input_path=ct_dir / "example_ct_sm.nii.gz",
                                   grid="3mm")
    assert not (tmp_path / "p.json").exists()


@pytest.mark.torch
@pytest.mark.slow
def test_segment_command_writes_the_passport(tmp_path: Path, ct_dir: Path, standin_home: Path,
                                             onnx_cache: Path) -> None:
    out = tmp_path / "seg.nii.gz"
    pp = tmp_path / "passport.json"
    runner = CliRunner()
    res = runner.invoke(app, ["segment", "-i", str(ct_dir / "example_ct_sm.nii.gz"), "-o", str(out), "--ml",
                              "--model", str(standin_home), "--passport", str(pp), "--normals", "-q"])
    assert res.exit_code == 0, res.output
    p = load_passport(pp)
    assert p.grid.kind == "model" and p.model_id and "infer" in p.timings and "passport_build" in p.timings
    assert all(len(o.boundary_normals or []) == len(o.boundary_points_mm) for o in p.organs)  # --normals
    # The input is 3 mm RAS already: the model grid is the output grid, the passports must agree.
    ref = passport_from_file(out)
    assert [o.id for o in p.organs] == [o.id for o in ref.organs] and p.organs
    for a, b in zip(p.organs, ref.organs):
        np.testing.assert_allclose(a.centroid_mm, b.centroid_mm, atol=1e-6)
    assert p.source.sha256 == hashlib.sha256((ct_dir / "example_ct_sm.nii.gz").read_bytes()).hexdigest()
