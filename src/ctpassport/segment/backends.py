"""Inference backends: one object per loaded model, created once and reused for every tile and call.

A backend maps a float32 batch ``(N, 1, d0, d1, d2)`` in nnU-Net axis order to float32 logits
``(N, C, d0, d1, d2)``. ONNX Runtime (CPU) is the portable baseline; other backends register themselves in
:data:`BACKENDS` (OpenVINO, CUDA) and are chosen by name or automatically.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import ModelError


class Backend(Protocol):
    """What the sliding window needs from an inference engine."""

    name: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def default_threads(threads: int | None) -> int:
    """``threads`` if positive, else the CPUs this process may use."""
    if threads and threads > 0:
        return int(threads)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class OnnxRuntimeBackend:
    """ONNX Runtime on the CPU, fp32, all graph optimisations, ``threads`` intra-op threads."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, threads: int | None = None) -> None:
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

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


BackendFactory = Callable[[Path, int | None], Backend]
BACKENDS: dict[str, BackendFactory] = {"onnxruntime": OnnxRuntimeBackend}


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine."""
    return list(BACKENDS)


def resolve_backend_name(name: str) -> str:
    """Map ``auto`` to the fastest available backend that keeps parity on this machine."""
    if name == "auto":
        return "onnxruntime"
    if name not in BACKENDS:
        raise ModelError(f"unknown or unavailable backend {name!r}",
                         hint=f"available here: {', '.join(available_backends())}")
    return name


def create_backend(name: str, onnx_path: Path, threads: int | None = None) -> Backend:
    """Create the backend ``name`` (``auto`` picks one) for an exported model."""
    return BACKENDS[resolve_backend_name(name)](onnx_path, threads)
