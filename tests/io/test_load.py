"""Loading a CT: the warning for an image that looks like a label map (the CT and its segmentation swapped)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from ctpassport.cli import app
from ctpassport.io.load import label_map_suspicion, load_ct


def test_label_maps_and_masks_are_suspicious_cts_are_not(ct_dir: Path) -> None:
    ct = load_ct(ct_dir / "example_ct_sm.nii.gz").data
    assert label_map_suspicion(ct) is None
    assert label_map_suspicion(ct.astype(np.float32) + 0.25) is None  # float HU
    seg = load_ct(ct_dir / "example_seg_fast.nii.gz").data
    why = label_map_suspicion(seg)
    assert why is not None and "label map" in why and "0..117" in why
    assert label_map_suspicion((seg > 0).astype(np.uint8)) is not None  # a binary mask
    soft = np.random.default_rng(0).integers(-1000, 1500, size=(40, 40, 10)).astype(np.int16)
    assert label_map_suspicion(soft) is None
    assert label_map_suspicion(np.zeros((0, 4, 4), np.int16)) is None


def test_segment_warns_but_runs_on_a_label_map(ct_dir: Path, tmp_path: Path, onnx_cache: Path) -> None:
    res = CliRunner().invoke(app, ["segment", "-i", str(ct_dir / "example_seg_fast.nii.gz"), "-o",
                                   str(tmp_path / "s.nii.gz"), "--ml", "--model", "demo", "--backend", "onnxruntime",
                                   "-q"])
    assert res.exit_code == 0, res.output
    assert res.stderr.count("ctpassport: warning:") == 1 and "example_seg_fast.nii.gz" in res.stderr
