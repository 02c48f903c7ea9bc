"""Parity of the optimised backends with TotalSegmentator 2.18 itself, on the shared CT (issue 5 bars).

* Random stand-in (exact architecture): voxel agreement with vanilla on voxels whose top-2 logit margin
  (of the exact fp32 path's aggregated logits) exceeds 0.5 must be >= 0.999. Random weights give
  near-ties almost everywhere, so the overall agreement is only reported.
* The trained demo model (:mod:`ctpassport.model.demo`, confident outputs): mean Dice against vanilla
  >= 0.995 for fp32 backends and >= 0.99 for reduced precision (bf16).

A backend the CPU cannot run natively (bf16 without AMX/AVX512-BF16) is skipped with an ``[allowed]``
reason. Figures are printed (``pytest -s``) and listed in docs/benchmark.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_parity_totalseg import run_totalsegmentator  # type: ignore[import-not-found]

from ctpassport.bench.metrics import agreement
from ctpassport.config import Config
from ctpassport.io.nifti import read_image
from ctpassport.model.classes import TOTAL_CLASSES
from ctpassport.segment import backends as B
from ctpassport.segment.pipeline import Segmenter
from ctpassport.segment.postprocess import to_input_grid
from ctpassport.segment.sliding_window import top2_margin

pytestmark = [pytest.mark.vanilla, pytest.mark.torch, pytest.mark.slow]

FAST_BACKENDS = ["openvino", "openvino-bf16"]


def _skip_unless_runs(backend: str) -> None:
    why = B.unavailable_reason(backend)
    if why:
        pytest.skip(f"{backend}: {why} [allowed]")


@pytest.fixture(scope="module")
def standin_reference(segmenter, example_ct: Path, standin_home: Path,  # type: ignore[no-untyped-def]
                      tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("ts_standin") / "ts.nii.gz"
    run_totalsegmentator(example_ct, out, standin_home)
    img = read_image(example_ct)
    res, net_in = segmenter.preprocess(img)
    _, logits = segmenter.infer(net_in, keep_logits=True)
    margin = to_input_grid(top2_margin(logits), net_in, res, segmenter.model)
    return {"vanilla": np.asanyarray(nib.load(str(out)).dataobj), "margin": margin}


@pytest.mark.parametrize("backend", FAST_BACKENDS + ["auto"])
def test_fast_backend_parity_on_standin(backend: str, standin_reference: dict[str, np.ndarray],  # type: ignore[no-untyped-def]
                                        standin_home: Path, onnx_cache: Path, example_ct: Path) -> None:
    if backend != "auto":
        _skip_unless_runs(backend)
    seg = Segmenter(standin_home, backend=backend, config=Config.from_env(cache_dir=onnx_cache))
    assert seg.mode == "fast"
    labels = seg.segment(read_image(example_ct)).labels
    a = agreement(labels, standin_reference["vanilla"], TOTAL_CLASSES, standin_reference["margin"])
    print(json.dumps({"model": "stand-in", "backend": seg.backend_name, "voxel_agreement": a["voxel_agreement"],
                      "agreement_margin_0.5": a["agreement_margin_0.5"],
                      "confident_fraction_0.5": a["confident_fraction_0.5"],
                      "agreement_margin_0.1": a["agreement_margin_0.1"]}))
    assert a["agreement_margin_0.5"] >= 0.999, a
    assert a["confident_fraction_0.5"] > 0.05  # the bar is tested on a real share of the voxels


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ctpassport.model.demo import demo_model_dir, make_demo_home

    try:
        demo_model_dir()
    except Exception as exc:  # noqa: BLE001 - the demo model is trained by another issue
        pytest.skip(f"the trained demo model is not available yet: {exc}")
    return make_demo_home(tmp_path_factory.mktemp("demo_home")).parents[3]


@pytest.mark.parametrize("backend", ["onnxruntime"] + FAST_BACKENDS + ["auto"])
def test_backend_dice_on_demo_model(backend: str, demo_home: Path, example_ct: Path, onnx_cache: Path,  # type: ignore[no-untyped-def]
                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    if backend != "auto":
        _skip_unless_runs(backend)
    ref_path = demo_home / "vanilla_example_ct.nii.gz"
    if not ref_path.is_file():
        run_totalsegmentator(example_ct, ref_path, demo_home)
    ref_img = nib.load(str(ref_path))
    ref = np.asanyarray(ref_img.dataobj)
    seg = Segmenter(demo_home, backend=backend, config=Config.from_env(cache_dir=onnx_cache))
    labels = seg.segment(read_image(example_ct)).labels
    a = agreement(labels, ref, TOTAL_CLASSES, voxel_ml=float(np.prod(ref_img.header.get_zooms()[:3])) / 1000.0)
    bar = 0.995 if seg.backend_name in B.FP32_BACKENDS else 0.99
    print(json.dumps({"model": "demo", "backend": seg.backend_name, "mode": seg.mode, "mean_dice": a["mean_dice"],
                      "mean_dice_1ml": a["mean_dice_1ml"], "below_1ml": a["organs_below_1ml"],
                      "voxel_agreement": a["voxel_agreement"], "organs": a["organs_reference"],
                      "missing": a["organs_missing"], "extra": a["organs_extra"], "bar": bar}))
    assert a["organs_reference"] > 0
    # measured on the eleven-stage demo model (2026-12-06, openvino 2026.4.1): openvino-bf16 with its first block and
    # its whole last decoder stage in fp32: mean Dice (>= 1 ml) 0.9912, voxel agreement 0.99900 (with only the
    # last 3x3x3 block and the output layer in fp32 0.9897 / 0.99893 on this install, 0.9909 on an earlier
    # one: below the bar). OpenVINO fp32 0.9973, ONNX Runtime 0.9996. The head-bias calibrated model shipped on
    # 2026-12-07 (same AMD EPYC): bf16 0.9902 / 0.99893 (a margin of 0.0002), OpenVINO fp32 0.9971, ONNX Runtime
    # 0.9996. A retrained or recalibrated model must be checked against this bar before it ships.
    assert a["mean_dice_1ml"] >= bar, a
