"""What the benchmark ran on: CPU model and features, cores, affinity, memory, GPU, library versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Any

#: Distributions whose versions go into the report (those not installed are listed as null).
LIBRARIES = ("ctpassport", "numpy", "scipy", "nibabel", "isal", "onnxruntime", "openvino", "nncf", "torch",
             "TotalSegmentator", "nnunetv2", "SimpleITK", "matplotlib")
#: CPU flags that decide which backends are fast.
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
                "avx512_fp16", "amx_fp16")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def memory_total_mb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:  # pragma: no cover
        pass
    return None


def gpu_info() -> dict[str, Any]:
    """``{"available": bool, "name": ..., "note": ...}`` (imports torch only when a GPU device node exists)."""
    from ..segment.backends import cuda_available

    if not cuda_available():
        return {"available": False, "name": None,
                "note": "no CUDA GPU on this machine: the GPU path (backend 'cuda') was not measured"}
    import torch

    return {"available": True, "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda}


def physical_cores() -> int | None:
    """Physical cores (distinct physical id / core id pairs of ``/proc/cpuinfo``), None where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores = set()
    for block in text.split("\n\n"):
        fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in block.splitlines() if ":" in line)}
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or None


def machine_info() -> dict[str, Any]:
    """A JSON-serialisable description of this machine and its software."""
    from ..segment.backends import auto_backend, auto_backend_reason, cpu_flags, cpu_model_name

    flags = cpu_flags()
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        affinity = None
    return {
        "cpu_model": cpu_model_name(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "affinity": affinity,
        "cpu_features": {f: f in flags for f in CPU_FEATURES},
        "memory_total_mb": memory_total_mb(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "libraries": library_versions(),
        "gpu": gpu_info(),
        "auto_backend_cpu": auto_backend("cpu"),
        "auto_backend_reason": auto_backend_reason("cpu"),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
