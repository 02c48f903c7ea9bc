"""Export a model folder's network to ONNX (fp32, dynamic spatial axes) and cache it by checkpoint hash.

The exported graph takes ``input`` of shape ``(batch, 1, d0, d1, d2)`` in **nnU-Net axis order** (see
:attr:`ModelFolder.nnunet_axes`) with each spatial size a multiple of the network's total stride (16 for
the fast model), and returns ``logits`` ``(batch, C, d0, d1, d2)`` (channel k = class k).

Every export is verified twice before it is used: ``onnx.checker`` and a numerical comparison with the
PyTorch network on a seeded random patch (tolerance :data:`EXPORT_ATOL` on logits, absolute).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import ModelError, OutputExistsError
from ..io.atomic import atomic_path, make_folder, write_text_atomic
from .folder import ModelFolder
from .network import load_network, require_torch

#: Largest absolute logit difference allowed between ONNX Runtime and PyTorch (fp32, CPU).
EXPORT_ATOL = 2e-3
ONNX_OPSET = 18


@dataclass(frozen=True)
class ExportReport:
    """What an export produced and how it was checked."""

    onnx_path: str
    checkpoint_sha256: str
    opset: int
    check_shape: tuple[int, ...]
    max_abs_diff: float
    tolerance: float
    seconds: float
    ctpassport_version: str = __version__


def total_stride(model: ModelFolder) -> tuple[int, int, int]:
    """Product of the encoder strides per axis (input sizes must be multiples of it)."""
    s = np.prod(np.array(model.architecture.strides), axis=0)
    return tuple(int(v) for v in s)  # type: ignore[return-value]


def export_onnx(model: ModelFolder, out: str | Path, *, check_shape: tuple[int, int, int] | None = None,
                seed: int = 0) -> ExportReport:
    """Export ``model`` to ``out`` (single file, weights embedded), check it, return the report.

    ``check_shape`` (nnU-Net order) is the random patch used for the numerical check; default: a 64^3
    cube, or the patch size when that is smaller. Raises :class:`ModelError` if a check fails.
    """
    torch = require_torch("ONNX export")
    import onnx

    t0 = time.perf_counter()
    out = Path(out)
    net = load_network(model)
    stride = total_stride(model)
    dims = {
        0: torch.export.Dim("batch", min=1, max=64),
        **{2 + a: stride[a] * torch.export.Dim(n, min=1, max=4096 // stride[a]) for a, n in enumerate("zyx")},
    }
    example = torch.zeros((1, 1, *[2 * s for s in stride]), dtype=torch.float32)
    with atomic_path(out) as tmp:
        try:
            torch.onnx.export(
                net, (example,), str(tmp), input_names=["input"], output_names=["logits"],
                dynamic_shapes={"x": dims}, opset_version=ONNX_OPSET, dynamo=True, external_data=False,
                verbose=False,
            )
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"ONNX export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                             model.path) from None
        proto = onnx.load(str(tmp))
        onnx.checker.check_model(proto, full_check=True)
        meta = {
            "ctpassport_version": __version__,
            "checkpoint_sha256": model.checkpoint_sha256,
            "network_sha256": model.network_sha256,
            "model_id": model.model_id,
            "axis_order": "nnunet",
            "patch_size": json.dumps(list(model.patch_size)),
            "spacing": json.dumps(list(model.spacing)),
        }
        for k, v in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(proto, str(tmp))
        shape = check_shape or tuple(min(64, p) // s * s for p, s in zip(model.patch_size, stride))
        diff = _numeric_check(net, tmp, shape, seed)
        if not diff <= EXPORT_ATOL:
            raise ModelError(f"ONNX output differs from PyTorch by {diff:.2e} (> {EXPORT_ATOL:.0e})", model.path)
    report = ExportReport(onnx_path=str(out), checkpoint_sha256=model.checkpoint_sha256, opset=ONNX_OPSET,
                          check_shape=tuple(shape), max_abs_diff=float(diff), tolerance=EXPORT_ATOL,
                          seconds=time.perf_counter() - t0)
    write_text_atomic(out.with_suffix(".json"), json.dumps(asdict(report), indent=2))
    return report


def _numeric_check(net: object, onnx_path: Path, shape: tuple[int, ...], seed: int) -> float:
    torch = require_torch("ONNX export check")
    import onnxruntime as ort

    x = np.random.default_rng(seed).standard_normal((1, 1, *shape)).astype(np.float32)
    with torch.inference_mode():
        ref = net(torch.from_numpy(x)).numpy()  # type: ignore[operator]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x})[0]
    return float(np.max(np.abs(got - ref)))


def onnx_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (read without loading the weights into a session)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def cached_onnx_path(model: ModelFolder, cache_dir: Path) -> Path:
    """Where the export of ``model`` is cached: ``<cache>/onnx/<checkpoint sha256>-<network sha256[:16]>.onnx``
    (the weights and the network definition plans.json gives them)."""
    return cache_dir / "onnx" / f"{model.checkpoint_sha256}-{model.network_sha256[:16]}.onnx"


def find_or_export_onnx(model: ModelFolder, cache_dir: Path) -> Path:
    """Return an ONNX export of ``model``, exporting once per checkpoint and network definition.

    Looked up in order: ``fold_0/checkpoint_final.onnx`` shipped beside the checkpoint (used when its
    recorded checkpoint and network hashes match; a file that records no network hash is stale), then the
    cache; otherwise exported into the cache (needs torch).
    """
    sha, net = model.checkpoint_sha256, model.network_sha256
    for cand in (model.checkpoint.with_suffix(".onnx"), cached_onnx_path(model, cache_dir)):
        if cand.is_file():
            try:
                meta = onnx_metadata(cand)
            except Exception:  # noqa: BLE001 - unreadable cache entry: re-export below
                continue
            if meta.get("checkpoint_sha256") == sha and meta.get("network_sha256") == net:
                return cand
    target = cached_onnx_path(model, cache_dir)
    make_folder(target.parent, "the ONNX cache folder", "set CTPASSPORT_CACHE_DIR to a writable folder")
    try:
        export_onnx(model, target)
    except OutputExistsError:  # another process exported the same model meanwhile: use its file
        if onnx_metadata(target).get("checkpoint_sha256") != sha:
            raise
    return target
