"""Build the PyTorch network of a model folder (needs the ``torch`` extra).

The network is dynamic-network-architectures' own class, constructed from the plans exactly as nnU-Net's
``get_network_from_plans`` does (deep supervision off for inference), so checkpoints load unchanged.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelError
from .folder import Architecture, ModelFolder

if TYPE_CHECKING:  # pragma: no cover
    import torch


def require_torch(purpose: str) -> Any:
    """Import torch or fail with a message saying which extra to install."""
    try:
        import torch
    except ImportError:  # pragma: no cover - exercised on torch-free installs
        raise ModelError(f"{purpose} needs PyTorch", hint="pip install 'ctpassport[torch]'") from None
    return torch


def _locate(dotted: str) -> Any:
    """The class at ``dotted``; failing that, a class of that name in dynamic_network_architectures'
    ``architectures.unet`` module (nnU-Net falls back to a search by name too: plans name e.g.
    ``...residual_unet.ResidualEncoderUNet``, which lives in ``...architectures.unet`` in the released package)."""
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        # the U-Nets all live in the architectures' ``unet`` module of the released package
        found = getattr(importlib.import_module("dynamic_network_architectures.architectures.unet"), name, None)
        if isinstance(found, type):
            return found
        raise


def build_network(arch: Architecture, in_channels: int, num_classes: int,
                  deep_supervision: bool = False) -> torch.nn.Module:
    """Instantiate the architecture with freshly initialised weights (nnU-Net's He init, slope 1e-2)."""
    torch = require_torch("building the network")
    try:
        cls = _locate(arch.network_class_name)
    except (ImportError, AttributeError):
        raise ModelError(f"network class {arch.network_class_name} is not importable",
                         hint="pip install 'ctpassport[torch]' (dynamic-network-architectures)") from None
    kw = dict(arch.raw_arch_kwargs)
    kw.update(
        n_stages=arch.n_stages,
        features_per_stage=list(arch.features_per_stage),
        kernel_sizes=[list(k) for k in arch.kernel_sizes],
        strides=[list(s) for s in arch.strides],
        n_conv_per_stage_decoder=list(arch.n_conv_per_stage_decoder),
        conv_bias=arch.conv_bias,
        conv_op=torch.nn.Conv3d,
        norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": arch.norm_eps, "affine": arch.norm_affine},
        dropout_op=None,
        dropout_op_kwargs=None,
        nonlin=_locate(arch.nonlin),
        nonlin_kwargs=dict(arch.nonlin_kwargs),
    )
    if arch.short_name == "PlainConvUNet":
        kw.pop("n_blocks_per_stage", None)
        kw["n_conv_per_stage"] = list(arch.n_conv_per_stage)
    else:
        kw.pop("n_conv_per_stage", None)
        kw["n_blocks_per_stage"] = list(arch.n_conv_per_stage)
    kw.pop("_kw_requires_import", None)
    net = cls(input_channels=in_channels, num_classes=num_classes, deep_supervision=deep_supervision, **kw)
    if hasattr(net, "initialize"):
        net.apply(net.initialize)
    return net


def load_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``; numpy scalars in nnU-Net's training logs are allowed."""
    torch = require_torch("loading the checkpoint")
    import numpy as np

    safe: list[Any] = [np.dtype, np.ndarray]
    try:  # numpy >= 2 moved numpy.core to numpy._core (the old name warns)
        from numpy._core.multiarray import _reconstruct, scalar  # type: ignore[attr-defined, unused-ignore]
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[attr-defined, no-redef, unused-ignore]
    safe += [scalar, _reconstruct]
    # checkpoints written under numpy 1.x (nnU-Net's released weights) name them numpy.core.multiarray.*
    safe += [(scalar, "numpy.core.multiarray.scalar"), (_reconstruct, "numpy.core.multiarray._reconstruct")]
    safe += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch colours its message for terminals
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        why = f"it holds {refused.group(1)}, which a weights-only load does not allow" if refused else \
            f"{type(exc).__name__}: {text.strip().splitlines()[0][:160] if text.strip() else ''}"
        raise ModelError(f"cannot load checkpoint ({why})", path) from None


def load_network(model: ModelFolder) -> torch.nn.Module:
    """The model folder's network with its checkpoint weights, in eval mode, on the CPU."""
    net = build_network(model.architecture, 1, model.num_channels_out)
    ckpt = load_checkpoint(model.checkpoint)
    state = ckpt.get("network_weights")
    if not isinstance(state, dict):
        raise ModelError("checkpoint has no 'network_weights'", model.checkpoint)
    from .checkpoint import unwrap_state_keys

    try:
        net.load_state_dict(unwrap_state_keys(state))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:200]
        raise ModelError(f"checkpoint weights do not fit plans.json's network ({first})", model.checkpoint) from None
    return net.eval()
