"""Inference backends: one object per loaded model, created once and reused for every tile and call.

A backend maps a float32 batch ``(N, 1, d0, d1, d2)`` in nnU-Net axis order to float32 logits
``(N, C, d0, d1, d2)``. The returned array may be a buffer that the next call overwrites (OpenVINO):
consume it before calling again. Backends may offer more (duck-typed, see :mod:`.sliding_window`):

* ``predict_labels(batch) -> (N, d0, d1, d2) uint8``: the channel argmax computed inside the engine, so the
  118 logit channels never leave it (used when the whole image is one tile);
* ``prepare(shape)``: compile for a static input shape ahead of the first call (model-load time).

Backends (``BACKENDS``; :func:`resolve_backend_name` maps ``auto`` to the fastest one that keeps parity on
this machine):

=================  ===========================================================================================
``onnxruntime``    ONNX Runtime CPU, fp32: the exact parity path (nnU-Net's arithmetic end to end)
``openvino``       OpenVINO CPU, fp32, static patch shape
``openvino-bf16``  OpenVINO CPU, bfloat16 compute (AMX / AVX512-BF16), first block and last stage in fp32:
                   the fast CPU path
``openvino-int8``  OpenVINO CPU, int8 post-training quantisation (NNCF) calibrated on real CT
``cuda``           PyTorch on a CUDA GPU, fp16 autocast, channels-last, optional ``torch.compile``
``torch``          the same PyTorch code on the CPU in fp32 (reference/testing of the GPU code path)
=================  ===========================================================================================
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import ConfigError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    from ..model.folder import ModelFolder


class Backend(Protocol):
    """What the sliding window needs from an inference engine: float32 ``(N, 1, d0, d1, d2)`` -> float32
    logits ``(N, C, d0, d1, d2)``, nnU-Net axis order."""

    name: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


#: The most inference threads asked for (as ``CTPASSPORT_THREADS`` allows): more only slows the run down.
MAX_THREADS = 1024


def default_threads(threads: int | None) -> int:
    """``threads`` if positive (at most :data:`MAX_THREADS`, else :class:`ConfigError`), else the CPUs this
    process may use (its affinity mask)."""
    if threads and threads > MAX_THREADS:
        raise ConfigError(f"{threads} inference threads is more than {MAX_THREADS}",
                          hint="use 0 (all the cores this process may use) or the number of cores")
    if threads and threads > 0:
        return int(threads)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------------
# CPU / GPU capabilities
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (``/proc/cpuinfo``; empty where unavailable)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:  # pragma: no cover - not Linux
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    import platform

    return platform.processor() or "unknown"


def native_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AMX-BF16 tiles or AVX512-BF16 instructions)."""
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def native_int8() -> bool:
    """Whether the CPU has fast int8 dot products (AMX-INT8 or AVX512-VNNI / AVX-VNNI)."""
    flags = cpu_flags()
    return bool({"amx_int8", "avx512_vnni", "avx_vnni"} & flags)


@functools.lru_cache(maxsize=1)
def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_available() -> bool:
    """True when PyTorch is installed and sees a CUDA GPU (imports torch only when an NVIDIA device node
    exists and torch is installed, so the check is cheap on CPU-only machines)."""
    import glob
    import importlib.util

    if not glob.glob("/dev/nvidia*") and not os.path.exists("/dev/dxg"):  # Linux / WSL device nodes
        return False
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


# ------------------------------------------------------------------------------------------------
# ONNX Runtime (exact fp32 parity path)
# ------------------------------------------------------------------------------------------------
class OnnxRuntimeBackend:
    """ONNX Runtime on the CPU, fp32, all graph optimisations, ``threads`` intra-op threads."""

    name = "onnxruntime"
    precision = "fp32"

    def __init__(self, onnx_path: str | Path, threads: int | None = None, **_: Any) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = default_threads(threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(onnx_path), sess_options=opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - any ORT load failure
            raise ModelError(f"ONNX Runtime cannot load the model ({str(exc).splitlines()[0][:160]})",
                             onnx_path) from None
        self.input_name = self.session.get_inputs()[0].name
        self.threads = opts.intra_op_num_threads
        self._onnx_path = Path(onnx_path)
        self._opts = opts
        self._argmax_session: Any = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def predict_labels(self, batch: np.ndarray) -> np.ndarray:
        """Channel argmax inside ONNX Runtime (an ``ArgMax`` node appended to the graph, first index on
        ties): ``(N, d0, d1, d2)`` uint8, without returning the float32 logits. Used by the fast pipeline."""
        if self._argmax_session is None:
            import onnx
            import onnxruntime as ort
            from onnx import TensorProto, helper

            proto = onnx.load(str(self._onnx_path))
            logits = proto.graph.output[0].name
            proto.graph.node.append(helper.make_node("ArgMax", [logits], ["labels"], axis=1, keepdims=0,
                                                     select_last_index=0))
            del proto.graph.output[:]
            proto.graph.output.append(helper.make_tensor_value_info("labels", TensorProto.INT64, None))
            self._argmax_session = ort.InferenceSession(proto.SerializeToString(), sess_options=self._opts,
                                                        providers=["CPUExecutionProvider"])
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return self._argmax_session.run(None, {self.input_name: x})[0].astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# OpenVINO (fp32 / bf16 / int8)
# ------------------------------------------------------------------------------------------------
class OpenVinoBackend:
    """OpenVINO on the CPU with a static input shape per compiled model.

    ``precision``: ``fp32`` (IEEE float32 compute), ``bf16`` (bfloat16 compute with float32 accumulation,
    needs native bf16: AMX or AVX512-BF16; the network's first block and last decoder stage stay in float32, see
    :func:`keep_ends_fp32`) or ``int8`` (an NNCF-quantised IR, ``model_xml``). Models are
    compiled lazily per input shape (the exported ONNX has dynamic spatial axes; a static shape lets the
    CPU plugin pick its fastest kernels). :meth:`predict_labels` compiles a variant with the channel argmax
    (``TopK``, k=1, first index on ties) appended, so only one byte per voxel leaves the engine.
    """

    def __init__(self, onnx_path: str | Path, threads: int | None = None, *, precision: str = "fp32",
                 model_xml: str | Path | None = None, **_: Any) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise ModelError("the OpenVINO backends need openvino",
                             hint="pip install 'ctpassport[openvino]'") from None
        if precision not in ("fp32", "bf16", "int8"):
            raise ValueError(f"unknown precision {precision!r}")
        self.precision = precision
        self.name = {"fp32": "openvino", "bf16": "openvino-bf16", "int8": "openvino-int8"}[precision]
        self.threads = default_threads(threads)
        self.core = ov.Core()
        source = Path(model_xml) if model_xml is not None else Path(onnx_path)
        try:
            self.model = self.core.read_model(str(source))
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"OpenVINO cannot read the model ({str(exc).splitlines()[0][:160]})", source) from None
        if precision == "bf16":
            self.model = keep_ends_fp32(self.core, self.model)
        self.input_name = self.model.inputs[0].get_any_name()
        # int8 IRs keep their quantised convolutions; the rest of such a graph runs in bf16 where native.
        hint = {"fp32": "f32", "bf16": "bf16", "int8": "bf16" if native_bf16() else "f32"}[precision]
        self.config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
                       "INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1}
        self._requests: dict[tuple[tuple[int, ...], bool], Any] = {}
        self._used: tuple[tuple[int, ...], bool] | None = None

    def _request(self, shape: tuple[int, ...], argmax: bool, run: bool = True) -> Any:
        """The infer request for ``shape`` (and the argmax variant), compiled on first use.

        A compiled model allocates its activation memory (~1-1.5 GB for the fast model's patch) at its
        first inference and keeps it; when another variant is about to run, the one that ran before is
        released, so at most one holds that memory.
        """
        key = (tuple(int(s) for s in shape), argmax)
        if run and self._used is not None and self._used != key:
            self._requests.pop(self._used, None)
        if run:
            self._used = key
        req = self._requests.get(key)
        if req is None:
            import openvino as ov

            model = self.model.clone()
            model.reshape({self.input_name: list(key[0])})
            if argmax:
                import openvino.opset13 as ops

                logits = model.get_results()[0].input_value(0)
                top = ops.topk(logits, ops.constant(np.int64(1)), 1, "max", "value", "i32", stable=True)
                model = ov.Model([top.output(1)], model.get_parameters(), "argmax")
            try:
                compiled = self.core.compile_model(model, "CPU", self.config)
            except Exception as exc:  # noqa: BLE001
                raise ModelError(f"OpenVINO cannot compile the model for {key[0]} "
                                 f"({str(exc).splitlines()[0][:160]})") from None
            req = compiled.create_infer_request()
            self._requests[key] = req
        return req

    def prepare(self, shape: tuple[int, ...], argmax: bool = True) -> None:
        """Compile for input ``shape`` (N, 1, d0, d1, d2) now (and its argmax variant when ``argmax``)."""
        self._request(shape, False, run=False)
        if argmax:
            self._request(shape, True, run=False)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        req = self._request(x.shape, False)
        req.infer({0: x})
        return req.get_output_tensor(0).data  # owned by the request: valid until the next call

    def predict_labels(self, batch: np.ndarray) -> np.ndarray:
        """Channel argmax of the logits, computed in the engine: ``(N, d0, d1, d2)`` uint8."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        req = self._request(x.shape, True)
        req.infer({0: x})
        idx = req.get_output_tensor(0).data
        return idx[:, 0].astype(np.uint8)


def keep_ends_fp32(core: Any, model: Any) -> Any:
    """``model`` with its first convolution block and its whole last decoder stage (the last transposed
    convolution, both 3x3x3 convolutions with their norms and activations, and the 1x1x1 output layer) marked
    to stay in float32 under bf16.

    Under ``INFERENCE_PRECISION_HINT=bf16`` the CPU plugin rounds every layer's input to bfloat16 (8-bit
    mantissa). Roundings at the ends lose what the rest of the network does not: the normalised CT at the input
    (steps of up to ~8 HU) and, at the output, the features and logits that decide near-equal classes (logits
    in steps of 1/16 between 8 and 16 become exact ties that the argmax breaks toward the lower index). The ops
    up to the second convolution (first convolution, its norm and activation) and from the last transposed
    convolution on (without one: from the second-to-last convolution on) are marked with OpenVINO's
    ``DisablePrecisionConversion`` attribute, which the CPU plugin honours.

    Measured on the demo model, example_ct, against TotalSegmentator 2.18 running it (mean Dice over organs
    >= 1 ml / voxel agreement), on 2026-12-06 with openvino 2026.4.1 and torch 2.14.1: input block and output
    layer only 0.9897 / 0.99878 (earlier install); plus the last 3x3x3 block 0.9897 / 0.99893 (0.9909 on an
    earlier install: below the 0.99 bar on this one); plus the last two blocks 0.9910 / 0.99894; **the whole
    last decoder stage 0.9912 / 0.99900 (kept)**; OpenVINO fp32 0.9973, ONNX Runtime 0.9996. Cost, in-memory
    segmentation of example_ct with stand-in weights (one interleaved run, median of 3): 2.44 s with the last
    block, 2.88 s with the last decoder stage (+18 %); see docs/benchmark.md.

    The attribute has no Python constructor, so the model takes a trip through IR XML (in memory after a
    temporary file): ``save_model`` -> add ``<rt_info><attribute name="DisablePrecisionConversion" .../>`` to the
    chosen layers -> ``read_model``. A model without convolutions is returned unchanged.
    """
    import tempfile
    import xml.etree.ElementTree as ET

    import openvino as ov

    conv_types = ("Convolution", "ConvolutionBackpropData", "GroupConvolution")
    ops = [o for o in model.get_ordered_ops() if o.get_type_name() not in ("Parameter", "Result", "Constant")]
    conv_at = [i for i, o in enumerate(ops) if o.get_type_name() in conv_types]
    if not conv_at:
        return model
    second = conv_at[1] if len(conv_at) > 1 else conv_at[0] + 1
    up_at = [i for i in conv_at if ops[i].get_type_name() == "ConvolutionBackpropData"]
    if up_at and up_at[-1] > second:  # the U-Net's last decoder stage, from its transposed convolution on
        last = up_at[-1]
    else:  # no upsampling: the last 3x3x3 convolution, then the 1x1x1 one
        last = conv_at[-2] if len(conv_at) > 2 else conv_at[-1]
    keep = {o.get_friendly_name() for o in ops[:second] + ops[last:]}
    with tempfile.TemporaryDirectory(prefix="ctpassport-ov-") as tmp:
        xml_path = Path(tmp) / "model.xml"
        ov.save_model(model, str(xml_path), compress_to_fp16=False)
        tree = ET.parse(xml_path)
        for layer in tree.getroot().iter("layer"):
            if layer.get("name") in keep:
                info = layer.find("rt_info")
                if info is None:
                    info = ET.Element("rt_info")
                    layer.insert(1 if layer.find("data") is not None else 0, info)
                # "dynamic:f16" is the value OpenVINO itself writes for disable_fp16_compression; the CPU plugin
                # keeps such layers in f32 under a bf16 hint too (a "dynamic:bf16" value does not parse)
                ET.SubElement(info, "attribute",
                              {"name": "DisablePrecisionConversion", "version": "0", "value": "dynamic:f16"})
        xml = ET.tostring(tree.getroot())
        weights = xml_path.with_suffix(".bin").read_bytes()
    return core.read_model(xml, weights)


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------
BackendFactory = Callable[..., Backend]


def _openvino(precision: str) -> BackendFactory:
    def make(onnx_path: Path, threads: int | None = None, **kw: Any) -> Backend:
        if precision == "int8" and kw.get("model_xml") is None:
            from .quantize import find_or_quantize_int8

            model = kw.get("model")
            if model is None:
                raise ModelError("the int8 backend needs the model folder (to find its quantised IR)")
            kw["model_xml"] = find_or_quantize_int8(model, onnx_path, kw.get("cache_dir"))
        return OpenVinoBackend(onnx_path, threads, precision=precision, **kw)

    return make


def _torch(device: str) -> BackendFactory:
    def make(onnx_path: Path, threads: int | None = None, **kw: Any) -> Backend:
        from .gpu import TorchBackend

        model = kw.get("model")
        if model is None:
            raise ModelError("the PyTorch backends need the model folder (checkpoint)")
        return TorchBackend(model, device=device, threads=threads)

    return make


BACKENDS: dict[str, BackendFactory] = {
    "onnxruntime": OnnxRuntimeBackend,
    "openvino": _openvino("fp32"),
    "openvino-bf16": _openvino("bf16"),
    "openvino-int8": _openvino("int8"),
    "cuda": _torch("cuda"),
    "torch": _torch("cpu"),
}

#: Backends that run the PyTorch checkpoint itself (no ONNX export).
TORCH_BACKENDS = ("cuda", "torch")

#: Backends that compute in float32 (parity bar: Dice >= 0.995); the others are reduced precision (>= 0.99).
FP32_BACKENDS = ("onnxruntime", "openvino", "torch")


def unavailable_reason(name: str) -> str:
    """Why backend ``name`` cannot run on this machine, or ``""`` when it can (imports torch only for the
    PyTorch backends)."""
    import importlib.util

    if name.startswith("openvino") and not openvino_available():
        return "openvino is not installed"
    if name == "openvino-bf16" and not native_bf16():
        return "the CPU has no native bfloat16 (AMX-BF16 or AVX512-BF16)"
    if name == "openvino-int8" and not native_int8():
        return "the CPU has no fast int8 (AMX-INT8 or VNNI)"
    if name in ("cuda", "torch") and importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    if name == "cuda" and not cuda_available():
        return "no CUDA GPU is visible to PyTorch"
    return ""


def backend_status() -> dict[str, str]:
    """``{name: "available" | why not}`` for every registered backend on this machine."""
    return {name: unavailable_reason(name) or "available" for name in BACKENDS}


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine."""
    return [k for k, v in backend_status().items() if v == "available"]


def auto_backend(device: str = "cpu") -> str:
    """The fastest backend that keeps parity here: ``cuda`` for ``device="gpu"`` with a GPU; on the CPU
    OpenVINO bf16 where bf16 is native (AMX / AVX512-BF16), else OpenVINO fp32, else ONNX Runtime fp32.

    int8 is never chosen automatically: on random stand-in weights it misses the parity bar (agreement on
    confident voxels < 0.999; see docs/benchmark.md).
    """
    if device.startswith(("gpu", "cuda")) and cuda_available():
        return "cuda"
    if openvino_available():
        return "openvino-bf16" if native_bf16() else "openvino"
    return "onnxruntime"


def auto_backend_reason(device: str = "cpu") -> str:
    """Why :func:`auto_backend` picks what it picks on this machine (one sentence, for reports)."""
    choice = auto_backend(device)
    if choice == "cuda":
        return "cuda: a CUDA GPU is present and --device gpu was asked"
    if choice == "openvino-bf16":
        have = [f for f in ("amx_bf16", "avx512_bf16") if f in cpu_flags()]
        return (f"openvino-bf16: the CPU computes bfloat16 natively ({', '.join(have)}), and bf16 keeps parity; "
                "int8 is never chosen automatically")
    if choice == "openvino":
        return "openvino (fp32): OpenVINO is installed but the CPU has no native bfloat16 (AMX/AVX512-BF16)"
    return "onnxruntime (fp32): OpenVINO is not installed"


def resolve_backend_name(name: str) -> str:
    """Map ``auto`` (or ``None``) to :func:`auto_backend`; check that a named backend exists and can run here."""
    if name in (None, "", "auto"):
        return auto_backend()
    if name == "gpu":
        name = "cuda"
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}", hint=f"known: auto, {', '.join(BACKENDS)}")
    why = unavailable_reason(name)
    if why:
        raise ModelError(f"backend {name!r} cannot run on this machine: {why}",
                         hint=f"available here: {', '.join(available_backends())}")
    return name


def create_backend(name: str, onnx_path: Path | None, threads: int | None = None, *,
                   model: ModelFolder | None = None, cache_dir: Path | None = None) -> Backend:
    """Create the backend ``name`` (``auto`` picks one) for an exported model (``onnx_path``; None for the
    :data:`TORCH_BACKENDS`, which run ``model``'s checkpoint)."""
    resolved = resolve_backend_name(name)
    if onnx_path is None and resolved not in TORCH_BACKENDS:
        raise ModelError(f"backend {resolved!r} runs an ONNX export: give its path")
    return BACKENDS[resolved](onnx_path, threads, model=model, cache_dir=cache_dir)
