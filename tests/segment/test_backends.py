"""Backends and the fast pipeline: automatic choice, engine-side argmax, the sliding slab, fast resampling,
the PyTorch (GPU code) path on the CPU, int8 quantisation on a tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from ctpassport.errors import ConfigError, ModelError
from ctpassport.segment import backends as B
from ctpassport.segment.postprocess import zoom_labels
from ctpassport.segment.preprocess import memory_order_axes, zoom_linear_fast
from ctpassport.segment.sliding_window import (
    argmax_channels,
    argmax_into,
    sliding_window_labels,
    sliding_window_logits,
    top2_margin,
)

needs_openvino = pytest.mark.skipif(not B.openvino_available(), reason="openvino is not installed")


# ------------------------------------------------------------------------------------------------
# choice of backend
# ------------------------------------------------------------------------------------------------
def test_auto_backend_follows_cpu_features() -> None:
    expected = ("openvino-bf16" if B.native_bf16() else "openvino") if B.openvino_available() else "onnxruntime"
    assert B.auto_backend("cpu") == expected == B.resolve_backend_name("auto")
    assert B.resolve_backend_name("onnxruntime") == "onnxruntime"
    assert "openvino-int8" != B.auto_backend("cpu")  # int8 misses the parity bar: never automatic


def test_unknown_and_unavailable_backends() -> None:
    with pytest.raises(ConfigError, match="unknown backend"):
        B.resolve_backend_name("tensorflow")
    if not B.cuda_available():
        with pytest.raises(ModelError, match="cannot run on this machine"):
            B.resolve_backend_name("cuda")
    status = B.backend_status()
    assert status["onnxruntime"] == "available" and set(status) == set(B.BACKENDS)


def test_cpu_flags_and_name() -> None:
    assert isinstance(B.cpu_flags(), frozenset)
    assert B.cpu_model_name()


# ------------------------------------------------------------------------------------------------
# fast argmax and sliding window (NumPy)
# ------------------------------------------------------------------------------------------------
def test_argmax_into_equals_numpy_with_ties(rng: np.random.Generator) -> None:
    v = rng.integers(0, 4, (7, 9, 10, 11)).astype(np.float32)  # many ties
    out = np.empty(v.shape[1:], np.uint8)
    np.testing.assert_array_equal(argmax_into(v, out), np.argmax(v, axis=0))
    strided = v[:, ::2, 1:, ::-1]
    out2 = np.empty(strided.shape[1:], np.int16)
    np.testing.assert_array_equal(argmax_into(strided, out2), np.argmax(strided, axis=0))


class _Net:
    """Deterministic per-voxel network with spatially varying logits (no ties), NumPy."""

    def __init__(self, c: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.w = rng.standard_normal(c).astype(np.float32)
        self.b = rng.standard_normal(c).astype(np.float32)
        self.calls = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        _, _, *sp = x.shape
        grid = np.add.outer(np.add.outer(np.arange(sp[0]), 2 * np.arange(sp[1])), 3 * np.arange(sp[2])) % 11
        out = x * self.w[None, :, None, None, None] + self.b[None, :, None, None, None]
        return (out + 0.05 * np.sin(grid)[None, None] * self.w[None, :, None, None, None]).astype(np.float32)


@pytest.mark.parametrize("shape", [(20, 30, 25), (45, 37, 50), (16, 16, 16)])
def test_sliding_window_labels_match_full_accumulation(shape: tuple[int, int, int],
                                                       rng: np.random.Generator) -> None:
    patch, c = (16, 16, 16), 6
    data = rng.standard_normal((1, *shape)).astype(np.float32)
    net = _Net(c)
    labels = sliding_window_labels(data, net, patch, c, step=0.5, threads=2)
    logits = sliding_window_logits(data, _Net(c), patch, c, step=0.5, accumulate="fp32")
    ref = argmax_channels(logits)
    assert labels.shape == shape and labels.dtype == np.uint8
    margin = top2_margin(logits)
    clear = margin > 1e-4 * np.abs(logits).max(axis=0)  # the division by the weights may round near-ties
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(labels[clear], ref[clear])


def test_single_tile_uses_engine_argmax(rng: np.random.Generator) -> None:
    class WithArgmax(_Net):
        def predict_labels(self, x: np.ndarray) -> np.ndarray:
            self.label_calls = getattr(self, "label_calls", 0) + 1
            return np.argmax(self(x), axis=1).astype(np.uint8)

    net = WithArgmax(5)
    data = rng.standard_normal((1, 12, 14, 9)).astype(np.float32)
    labels = sliding_window_labels(data, net, (16, 16, 16), 5)
    assert net.label_calls == 1 and labels.shape == (12, 14, 9)
    ref = argmax_channels(sliding_window_logits(data, _Net(5), (16, 16, 16), 5, accumulate="fp32"))
    assert (labels == ref).mean() > 0.999


# ------------------------------------------------------------------------------------------------
# resampling: layouts and the fast order-1 zoom
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["C", "F"])
def test_zoom_labels_keeps_layout_and_equals_scipy(order: str, rng: np.random.Generator) -> None:
    lab = np.asarray(rng.integers(0, 118, (13, 11, 7)).astype(np.uint8), order=order)
    target = (40, 31, 20)
    got = zoom_labels(lab, target)
    ref = ndimage.zoom(np.ascontiguousarray(lab), np.array(target) / np.array(lab.shape), order=0, mode="nearest")
    np.testing.assert_array_equal(got, ref)
    assert got.flags.f_contiguous if order == "F" else got.flags.c_contiguous
    assert memory_order_axes(got) == ((2, 1, 0) if order == "F" else (0, 1, 2))


def test_zoom_linear_fast_matches_exact_resampling(rng: np.random.Generator) -> None:
    base = ndimage.gaussian_filter(rng.standard_normal((60, 50, 40)), 3) * 3000
    data = np.asfortranarray(base.astype(np.int16))
    zoom = np.array([0.8 / 3, 0.8 / 3, 1.5 / 3]) * 3
    exact = ndimage.zoom(np.ascontiguousarray(data), zoom, output=np.float64, order=1, mode="nearest").astype(np.int32)
    fast = zoom_linear_fast(data, zoom)
    assert fast.shape == exact.shape and fast.dtype == np.int32
    diff = np.abs(fast.astype(np.int64) - exact)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


# ------------------------------------------------------------------------------------------------
# OpenVINO on the stand-in
# ------------------------------------------------------------------------------------------------
@needs_openvino
def test_openvino_fp32_matches_onnxruntime(segmenter, rng: np.random.Generator) -> None:  # type: ignore[no-untyped-def]
    ov = B.OpenVinoBackend(segmenter.onnx_path, 2, precision="fp32")
    x = rng.standard_normal((1, 1, 32, 48, 32)).astype(np.float32)
    ref = segmenter.backend(x)
    got = np.array(ov(x))
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 5e-2
    labels = ov.predict_labels(x)
    assert labels.shape == (1, 32, 48, 32) and labels.dtype == np.uint8
    assert (labels == np.argmax(ref, axis=1)).mean() > 0.99


def _conv_chain(n_convs: int, rng: np.random.Generator):  # type: ignore[no-untyped-def]
    """A tiny OpenVINO model: ``n_convs`` 3x3x3 convolutions (8 channels, bias, ReLU between)."""
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([1, 1, 16, 16, 16], np.float32, name="x")
    y = x
    for i in range(n_convs):
        c_in = 1 if i == 0 else 8
        w = ops.constant(rng.standard_normal((8, c_in, 3, 3, 3)).astype(np.float32) * 0.3)
        b = ops.constant(rng.standard_normal((1, 8, 1, 1, 1)).astype(np.float32) * 0.1)
        y = ops.add(ops.convolution(y, w, [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]), b)
        if i < n_convs - 1:
            y = ops.relu(y)
    return ov.Model([y], [x], "chain")


def _conv_precisions(compiled) -> list[str]:  # type: ignore[no-untyped-def]
    """Runtime precision of each convolution of a compiled OpenVINO model, in execution order."""
    return [str(o.get_rt_info()["runtimePrecision"].astype(str)) for o in compiled.get_runtime_model().get_ordered_ops()
            if o.get_rt_info()["layerType"].astype(str) == "Convolution"]


def _bf16_conv_precisions(core, model) -> list[str]:  # type: ignore[no-untyped-def]
    return _conv_precisions(core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16",
                                                              "INFERENCE_NUM_THREADS": 1}))


def _unet_tail(rng: np.random.Generator):  # type: ignore[no-untyped-def]
    """Two 3x3x3 convolutions, a stride-2 transposed convolution, two more 3x3x3 and a 1x1x1 output layer."""
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([1, 1, 16, 16, 16], np.float32, name="x")
    y = x
    for i in range(2):
        w = ops.constant(rng.standard_normal((8, 1 if i == 0 else 8, 3, 3, 3)).astype(np.float32) * 0.3)
        y = ops.relu(ops.convolution(y, w, [2 if i == 1 else 1] * 3, [1, 1, 1], [1, 1, 1], [1, 1, 1]))
    w_up = ops.constant(rng.standard_normal((8, 8, 2, 2, 2)).astype(np.float32) * 0.3)
    y = ops.convolution_backprop_data(y, w_up, strides=[2, 2, 2], pads_begin=[0, 0, 0], pads_end=[0, 0, 0])
    for k in (3, 3, 1):
        w = ops.constant(rng.standard_normal((8, 8, k, k, k)).astype(np.float32) * 0.3)
        y = ops.convolution(y, w, [1, 1, 1], [k // 2] * 3, [k // 2] * 3, [1, 1, 1])
        if k == 3:
            y = ops.relu(y)
    return ov.Model([y], [x], "unet_tail")


@needs_openvino
@pytest.mark.skipif(not B.native_bf16(), reason="this CPU has no native bf16 (AMX / AVX512-BF16) [allowed]")
def test_bf16_keeps_the_last_decoder_stage_in_fp32(rng: np.random.Generator) -> None:
    import openvino as ov

    core = ov.Core()
    model = _unet_tail(rng)
    assert _bf16_conv_precisions(core, model) == ["bf16"] * 5
    # first block fp32, the second (strided) convolution bf16, everything from the transposed convolution on fp32
    assert _bf16_conv_precisions(core, B.keep_ends_fp32(core, model)) == ["f32", "bf16", "f32", "f32", "f32"]


@needs_openvino
@pytest.mark.skipif(not B.native_bf16(), reason="this CPU has no native bf16 (AMX / AVX512-BF16) [allowed]")
def test_bf16_keeps_network_ends_in_fp32(rng: np.random.Generator) -> None:
    import openvino as ov

    core = ov.Core()
    plain = _conv_chain(5, rng)
    assert _bf16_conv_precisions(core, plain) == ["bf16"] * 5
    # the first block, and the last two convolutions (in the U-Net: the last 3x3x3 block and the output layer)
    assert _bf16_conv_precisions(core, B.keep_ends_fp32(core, plain)) == ["f32", "bf16", "bf16", "f32", "f32"]
    # two convolutions: both ends, so the whole network is float32 and equals the fp32 compile
    two = _conv_chain(2, rng)
    x = rng.standard_normal((1, 1, 16, 16, 16)).astype(np.float32) * 3
    fp32 = core.compile_model(two, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
    bf16 = core.compile_model(two, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})(x)[0]
    kept = core.compile_model(B.keep_ends_fp32(core, two), "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})(x)[0]
    assert np.abs(bf16 - fp32).max() > 1e-3  # bf16 rounding is visible ...
    np.testing.assert_allclose(kept, fp32, rtol=1e-5, atol=1e-5)  # ... and gone where the ends stay fp32


@needs_openvino
@pytest.mark.skipif(not B.native_bf16(), reason="this CPU has no native bf16 (AMX / AVX512-BF16) [allowed]")
def test_bf16_backend_runs_first_and_last_blocks_in_fp32(segmenter) -> None:  # type: ignore[no-untyped-def]
    ov = B.OpenVinoBackend(segmenter.onnx_path, 2, precision="bf16")
    for argmax in (False, True):
        convs = _conv_precisions(ov._request((1, 1, 32, 48, 32), argmax, run=False).get_compiled_model())
        assert len(convs) == 19  # 10 encoder, 8 decoder, 1 segmentation layer
        # the first convolution; the last decoder stage (its two 3x3x3 convolutions) and the segmentation layer
        assert convs[0] == "f32" and convs[-3:] == ["f32"] * 3 and set(convs[1:-3]) == {"bf16"}, convs


# ------------------------------------------------------------------------------------------------
# the PyTorch path (GPU code) on the CPU: bit-identical to the exact NumPy sliding window
# ------------------------------------------------------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize("shape", [(20, 40, 25), (16, 16, 16)])
def test_torch_sliding_window_equals_exact_numpy(shape: tuple[int, int, int], rng: np.random.Generator) -> None:
    torch = pytest.importorskip("torch")
    from ctpassport.segment.gpu import TorchBackend

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.LeakyReLU(0.01),
                              torch.nn.Conv3d(4, 7, 1))
    be = TorchBackend(None, device="cpu", net=net, threads=2, batch=3)
    data = rng.standard_normal((1, *shape)).astype(np.float32)
    got = be.sliding_window_labels(data, (16, 16, 16), 7, step=0.5)
    ref = argmax_channels(sliding_window_logits(data, be, (16, 16, 16), 7, step=0.5, accumulate="fp16"))
    np.testing.assert_array_equal(got, ref)


@pytest.mark.torch
def test_torch_resampling_matches_scipy(rng: np.random.Generator) -> None:
    pytest.importorskip("torch")
    from ctpassport.segment.gpu import resample_linear, zoom_labels_torch

    data = (ndimage.gaussian_filter(rng.standard_normal((30, 28, 20)), 2) * 2000).astype(np.int16)
    zoom = np.array([0.4, 0.55, 1.7])
    exact = ndimage.zoom(data, zoom, output=np.float64, order=1, mode="nearest").astype(np.int32)
    got = resample_linear(data, zoom, "cpu")
    assert got.shape == exact.shape
    assert np.abs(got.astype(np.int64) - exact).max() <= 1
    lab = rng.integers(0, 50, (9, 8, 7)).astype(np.uint8)
    np.testing.assert_array_equal(zoom_labels_torch(lab, (20, 17, 30), "cpu"), zoom_labels(lab, (20, 17, 30)))


@pytest.mark.skipif(not B.cuda_available(), reason="no CUDA GPU on this machine [allowed]")
def test_cuda_path_agrees_with_exact_on_example_ct(segmenter, standin_home: Path,  # type: ignore[no-untyped-def]
                                                   example_ct: Path) -> None:
    from ctpassport.io.nifti import read_image
    from ctpassport.segment.pipeline import Segmenter

    gpu = Segmenter(standin_home, backend="cuda", config=segmenter.config)
    img = read_image(example_ct)
    ref = segmenter.segment(img, keep_logits=True)
    got = gpu.segment(img)
    res, net_in = segmenter.preprocess(img)
    from ctpassport.segment.postprocess import to_input_grid

    assert ref.logits is not None
    margin = to_input_grid(top2_margin(ref.logits), net_in, res, segmenter.model)
    conf = margin > 0.5
    assert (got.labels[conf] == ref.labels[conf]).mean() >= 0.999


# ------------------------------------------------------------------------------------------------
# int8: quantisation pipeline on a tiny model (fast), calibrated on the real CT
# ------------------------------------------------------------------------------------------------
@needs_openvino
@pytest.mark.torch
def test_int8_quantisation_runs_on_real_ct_calibration(tmp_path: Path, ct_dir: Path, onnx_cache: Path) -> None:
    pytest.importorskip("nncf")
    from ctpassport.bench.tiny import make_tiny_home
    from ctpassport.config import Config
    from ctpassport.io.nifti import read_image
    from ctpassport.segment.pipeline import Segmenter
    from ctpassport.segment.quantize import calibration_inputs, find_or_quantize_int8

    home = make_tiny_home(tmp_path / "tiny")
    cfg = Config.from_env(cache_dir=tmp_path / "cache")
    exact = Segmenter(home, backend="onnxruntime", config=cfg)
    calib = calibration_inputs(exact.model, [ct_dir / "example_ct_sm.nii.gz"], n=4)
    assert len(calib) == 4 and all(c.shape == (1, 1, 32, 32, 32) and c.dtype == np.float32 for c in calib)
    assert np.abs(calib[0]).max() > 0  # real CT, normalised
    xml = find_or_quantize_int8(exact.model, exact.onnx_path, cfg.cache_dir, [ct_dir / "example_ct_sm.nii.gz"])
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    assert find_or_quantize_int8(exact.model, exact.onnx_path, cfg.cache_dir,
                                 [ct_dir / "example_ct_sm.nii.gz"]) == xml  # cached
    int8 = Segmenter(home, backend="openvino-int8", config=cfg)
    img = read_image(ct_dir / "example_ct_sm.nii.gz")
    lab = int8.segment(img).labels
    assert lab.shape == img.shape and lab.dtype == np.uint8


# ------------------------------------------------------------------------------------------------
# `ctpassport segment --backend`
# ------------------------------------------------------------------------------------------------
@pytest.mark.torch
def test_segment_cli_backend_option(tmp_path: Path, ct_dir: Path, onnx_cache: Path) -> None:
    import json

    from typer.testing import CliRunner

    from ctpassport.bench.tiny import make_tiny_home
    from ctpassport.cli import app

    home = make_tiny_home(tmp_path / "tiny")
    ct = str(ct_dir / "example_ct_sm.nii.gz")
    runner = CliRunner()
    labels = {}
    for backend in ["onnxruntime", "auto"] + (["openvino"] if B.openvino_available() else []):
        out, tj = tmp_path / f"{backend}.nii.gz", tmp_path / f"{backend}.json"
        res = runner.invoke(app, ["segment", "-i", ct, "-o", str(out), "--ml", "--model", str(home), "--backend",
                                  backend, "--timings", str(tj), "-q"])
        assert res.exit_code == 0, res.output
        t = json.loads(tj.read_text())
        assert t["backend"] == (B.auto_backend() if backend == "auto" else backend)
        import nibabel as nib

        labels[backend] = np.asanyarray(nib.load(str(out)).dataobj)
    assert labels["auto"].shape == labels["onnxruntime"].shape
    res = runner.invoke(app, ["segment", "-i", ct, "-o", str(tmp_path / "x.nii.gz"), "--ml", "--model", str(home),
                              "--backend", "tensorflow", "-q"])
    assert res.exit_code == 5 and "unknown backend" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    if not B.cuda_available():
        # the CUDA backend named: it cannot run here (exit 3); --device gpu: the CPU, with a warning (as
        # TotalSegmentator falls back)
        res = runner.invoke(app, ["segment", "-i", ct, "-o", str(tmp_path / "g.nii.gz"), "--ml", "--model",
                                  str(home), "--backend", "cuda", "-q"])
        assert res.exit_code == 3 and "no CUDA GPU" in res.stderr
        res = runner.invoke(app, ["segment", "-i", ct, "-o", str(tmp_path / "g.nii.gz"), "--ml", "--model",
                                  str(home), "--device", "gpu", "-q"])
        assert res.exit_code == 0 and "no CUDA GPU is visible: running on the CPU" in res.stderr


@pytest.mark.torch
def test_torch_gather_keeps_fortran_layout(rng: np.random.Generator) -> None:
    pytest.importorskip("torch")
    from ctpassport.segment.gpu import resample_linear, zoom_labels_torch

    lab = np.asfortranarray(rng.integers(0, 50, (9, 8, 7)).astype(np.uint8))
    got = zoom_labels_torch(lab, (20, 17, 30), "cpu")
    assert got.flags.f_contiguous
    np.testing.assert_array_equal(got, zoom_labels(np.ascontiguousarray(lab), (20, 17, 30)))
    data = np.asfortranarray(rng.integers(-1000, 1000, (12, 10, 9)).astype(np.int16))
    np.testing.assert_array_equal(resample_linear(data, np.array([0.5, 1.5, 1.0]), "cpu"),
                                  resample_linear(np.ascontiguousarray(data), np.array([0.5, 1.5, 1.0]), "cpu"))


@pytest.mark.torch
def test_torch_backend_full_pipeline_on_cpu(tmp_path: Path, ct_dir: Path) -> None:
    """The GPU pipeline (device resampling, device sliding window, device label gather) run on the CPU with
    a tiny network: it agrees with the exact ONNX Runtime path wherever the logits are not near-ties."""
    pytest.importorskip("torch")
    from ctpassport.bench.tiny import make_tiny_home
    from ctpassport.config import Config
    from ctpassport.io.nifti import read_image
    from ctpassport.segment.pipeline import Segmenter
    from ctpassport.segment.postprocess import to_input_grid

    home = make_tiny_home(tmp_path / "tiny")
    cfg = Config.from_env(cache_dir=tmp_path / "cache")
    exact = Segmenter(home, backend="onnxruntime", config=cfg)
    dev = Segmenter(home, backend="torch", config=cfg)
    assert dev.mode == "fast" and dev.backend_name == "torch"
    # a resampled, reoriented input exercises the device resampling both ways
    import nibabel as nib

    src = nib.load(str(ct_dir / "example_ct_sm.nii.gz"))
    data = np.asanyarray(src.dataobj).astype(np.int16)
    fine = ndimage.zoom(data.astype(np.float32), (1.5, 1.5, 2.0), order=1)[::-1].astype(np.int16)
    aff = src.affine.copy()
    aff[:3, :3] = src.affine[:3, :3] / np.array([1.5, 1.5, 2.0])
    aff[:3, 0] *= -1
    path = tmp_path / "fine_lps.nii.gz"
    nib.save(nib.Nifti1Image(fine, aff), str(path))
    img = read_image(path)
    ref = exact.segment(img, keep_logits=True)
    got = dev.segment(img)
    assert got.labels.shape == img.shape == ref.labels.shape
    res, net_in = exact.preprocess(img)
    assert ref.logits is not None
    margin = to_input_grid(top2_margin(ref.logits), net_in, res, exact.model)
    conf = margin > 0.05
    assert conf.mean() > 0.3
    assert (got.labels[conf] == ref.labels[conf]).mean() > 0.999


@pytest.mark.torch
def test_int8_cache_key_covers_network_normalisation_and_calibration_content(tmp_path: Path, ct_dir: Path) -> None:
    """The quantised model is cached per network definition, CT normalisation and calibration content, not just
    per checkpoint and file names (a changed plans.json or other CTs of the same names reused a stale IR)."""
    import json
    import shutil

    from ctpassport.bench.tiny import make_tiny_home
    from ctpassport.model.folder import load_model_folder, locate_model
    from ctpassport.segment.quantize import int8_cache_path

    home = make_tiny_home(tmp_path / "tiny")
    model = load_model_folder(locate_model(home))
    ct = tmp_path / "calib" / "example_ct_sm.nii.gz"
    ct.parent.mkdir()
    shutil.copy(ct_dir / "example_ct_sm.nii.gz", ct)
    base = int8_cache_path(model, [ct], tmp_path / "cache")
    assert int8_cache_path(load_model_folder(model.path), [ct], tmp_path / "cache") == base
    plans_path = model.path / "plans.json"
    plans = json.loads(plans_path.read_text())
    props = plans["foreground_intensity_properties_per_channel"]["0"]
    props["std"] = float(props["std"]) * 2
    plans_path.write_text(json.dumps(plans))
    assert int8_cache_path(load_model_folder(model.path), [ct], tmp_path / "cache") != base
    props["std"] = float(props["std"]) / 2
    plans_path.write_text(json.dumps(plans))
    assert int8_cache_path(load_model_folder(model.path), [ct], tmp_path / "cache") == base
    shutil.copy(ct_dir / "example_ct.nii.gz", ct)  # same name, other content
    assert int8_cache_path(model, [ct], tmp_path / "cache") != base


@pytest.mark.torch
def test_torch_backend_needs_no_onnx_export(tmp_path: Path) -> None:
    from ctpassport.bench.tiny import make_tiny_home
    from ctpassport.config import Config
    from ctpassport.segment.pipeline import Segmenter

    home = make_tiny_home(tmp_path / "tiny")
    for onnx in home.rglob("*.onnx"):
        onnx.unlink()
    seg = Segmenter(home, backend="torch", config=Config.from_env(cache_dir=tmp_path / "cache"))
    assert seg.onnx_path is None and not list(tmp_path.rglob("*.onnx"))


def test_device_gpu_with_a_named_backend(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``-d gpu:N`` makes GPU N the visible one whatever ``--backend`` says; ``auto`` then means cuda; a CPU backend
    named with it runs as named, with a warning."""
    from ctpassport import cli

    monkeypatch.setattr(B, "cuda_available", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert cli._device_backend("cuda", 1) == "cuda"
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert cli._device_backend("auto", 0) == "cuda" and cli._device_backend(None, 0) == "cuda"
    assert cli._device_backend("onnxruntime", 0) == "onnxruntime"
    assert "--backend onnxruntime runs on the CPU" in capsys.readouterr().err
    assert cli._device_backend("auto", None) == "auto" and cli._device_backend(None, None) is None


def test_thread_counts_are_capped_like_the_setting() -> None:
    assert B.default_threads(3) == 3 and B.default_threads(None) >= 1
    with pytest.raises(ConfigError, match="100000 inference threads is more than 1024"):
        B.default_threads(100_000)
