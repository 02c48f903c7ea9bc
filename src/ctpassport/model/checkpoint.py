"""Read a PyTorch checkpoint's structure (keys, tensor shapes) without importing torch.

A ``.pth`` file written by ``torch.save`` is a zip archive holding a pickle (``data.pkl``) whose tensors
refer to storages stored beside it. To validate a model folder cheaply (and on machines without torch)
the pickle is read with an unpickler that builds only containers and tensor *descriptions*; it never calls
arbitrary code. The weights themselves are loaded with ``torch.load(weights_only=True)`` where needed.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelError


@dataclass(frozen=True)
class TensorInfo:
    """Shape and storage dtype of one tensor in a checkpoint."""

    shape: tuple[int, ...]
    dtype: str


class _Opaque:
    """Stands in for any object the checkpoint references that is not a container or a tensor."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _opaque_factory(module: str, name: str) -> Any:
    def make(*args: Any, **kwargs: Any) -> _Opaque:
        return _Opaque(module, name, *args)

    return make


def _rebuild_tensor(storage: Any, offset: int, size: tuple[int, ...], *args: Any) -> TensorInfo:
    dtype = storage[1] if isinstance(storage, tuple) else "unknown"
    return TensorInfo(shape=tuple(int(s) for s in size), dtype=str(dtype))


def _rebuild_parameter(data: Any, *args: Any) -> Any:
    return data


class _MetaUnpickler(pickle.Unpickler):
    _SAFE = {
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._SAFE:
            return self._SAFE[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return name
        return _opaque_factory(module, name)

    def persistent_load(self, pid: Any) -> Any:
        # ('storage', storage_type, key, location, numel)
        if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] == "storage":
            storage_type = pid[1]
            dtype = getattr(storage_type, "__name__", str(storage_type))
            dtype = str(getattr(storage_type, "dtype", dtype))
            return ("storage", dtype)
        return ("storage", "unknown")


def read_checkpoint_structure(path: str | Path) -> dict[str, Any]:
    """Return the checkpoint's top-level dict with tensors replaced by :class:`TensorInfo`.

    Raises :class:`ModelError` for a missing, truncated or non-PyTorch file.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError("checkpoint file is missing", p, "the model folder needs fold_0/checkpoint_final.pth")
    if p.stat().st_size == 0:
        raise ModelError("checkpoint file is empty", p, "re-download or re-create the weights")
    try:
        with zipfile.ZipFile(p) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ModelError(f"checkpoint is corrupt (member {bad} fails its CRC)", p,
                                 "re-download or re-create the weights")
            pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pkl:
                raise ModelError("not a PyTorch checkpoint (no data.pkl inside)", p)
            blob = zf.read(pkl[0])
    except (zipfile.BadZipFile, UnicodeDecodeError, ValueError):  # (a damaged member name fails to decode)
        raise ModelError("checkpoint is truncated, corrupt or not a PyTorch (zip) checkpoint", p,
                         "re-download or re-create the weights") from None
    except (OSError, EOFError) as exc:
        raise ModelError(f"cannot read checkpoint ({exc})", p) from None
    try:
        obj = _MetaUnpickler(io.BytesIO(blob)).load()
    except Exception as exc:  # any malformed pickle
        raise ModelError(f"checkpoint pickle is unreadable ({type(exc).__name__})", p) from None
    if not isinstance(obj, dict):
        raise ModelError("checkpoint does not hold a dict (expected nnU-Net's checkpoint layout)", p)
    return obj


def network_weight_shapes(structure: dict[str, Any], path: Path | None = None) -> dict[str, tuple[int, ...]]:
    """The ``network_weights`` state dict's parameter shapes from :func:`read_checkpoint_structure`."""
    weights = structure.get("network_weights")
    if not isinstance(weights, dict) or not weights:
        raise ModelError("checkpoint has no 'network_weights' (not an nnU-Net v2 checkpoint)", path)
    return {k: v.shape for k, v in unwrap_state_keys(weights).items() if isinstance(v, TensorInfo)}


#: Prefixes a training wrapper adds to every parameter name: ``torch.compile`` and DistributedDataParallel.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def unwrap_state_keys(state: dict[Any, Any]) -> dict[str, Any]:
    """``state`` with a prefix that :data:`WRAPPER_PREFIXES` names removed when *every* key carries it (a
    checkpoint saved from a compiled or DDP-wrapped network), as nnU-Net's trainer does when loading one."""
    out = {str(k): v for k, v in state.items()}
    for prefix in WRAPPER_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out
