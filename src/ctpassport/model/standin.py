"""Write nnU-Net model folders: the fast model's plans, and stand-in weights in TotalSegmentator's layout.

Stand-ins have the exact fast-model architecture (PlainConvUNet, 5 stages, 32..320 features, 118 outputs,
patch 112x112x128 at 3 mm) with seeded random weights (nnU-Net's own He initialisation). TotalSegmentator
2.18 runs them from ``TOTALSEG_HOME_DIR=HOME`` without downloading anything; they give the same compute as
the real weights (timing) and a deterministic network for parity tests, but no anatomy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from ..io.atomic import check_writable, write_text_atomic
from .classes import TOTAL_CLASSES
from .folder import (
    CHECKPOINT_NAME,
    FAST_CONFIGURATION,
    FAST_DATASET,
    FAST_PLANS,
    FAST_TRAINER,
    FAST_TRAINER_FOLDER,
)

#: CT intensity statistics of the fast model's training data (spec; plans.json
#: ``foreground_intensity_properties_per_channel``).
FAST_INTENSITY = {
    "max": 3071.0, "mean": -50.3869, "median": 14.0, "min": -1024.0,
    "percentile_00_5": -1004.0, "percentile_99_5": 1588.0, "std": 503.3923,
}
FAST_PATCH = [112, 112, 128]  # nnU-Net axis order (z, y, x)
FAST_SPACING = [3.0, 3.0, 3.0]


def make_plans(
    *,
    dataset_name: str = FAST_DATASET,
    base_features: int = 32,
    max_features: int = 320,
    n_stages: int = 5,
    patch_size: list[int] | None = None,
    spacing: list[float] | None = None,
    intensity: dict[str, float] | None = None,
    plans_format: Literal["flat", "architecture"] = "flat",
) -> dict[str, Any]:
    """An nnU-Net v2 ``plans.json`` for a 3d_fullres PlainConvUNet CT model.

    ``plans_format="flat"`` writes nnU-Net's older keys as real TotalSegmentator plans do; ``"architecture"``
    writes the newer ``architecture`` block. ``patch_size``/``spacing`` are in nnU-Net axis order.
    """
    patch = list(patch_size or FAST_PATCH)
    sp = [float(s) for s in (spacing or FAST_SPACING)]
    strides = [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1)
    kernels = [[3, 3, 3]] * n_stages
    feats = [min(base_features * 2**i, max_features) for i in range(n_stages)]
    conf: dict[str, Any] = {
        "data_identifier": f"{FAST_PLANS}_{FAST_CONFIGURATION}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": patch,
        "median_image_size_in_voxels": [int(p * 1.2) for p in patch],
        "spacing": sp,
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                               "force_separate_z": None},
        "batch_dice": False,
    }
    if plans_format == "flat":
        conf.update({
            "UNet_class_name": "PlainConvUNet",
            "UNet_base_num_features": base_features,
            "n_conv_per_stage_encoder": [2] * n_stages,
            "n_conv_per_stage_decoder": [2] * (n_stages - 1),
            "num_pool_per_axis": [n_stages - 1] * 3,
            "pool_op_kernel_sizes": strides,
            "conv_kernel_sizes": kernels,
            "unet_max_num_features": max_features,
        })
    else:
        conf["architecture"] = {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n_stages, "features_per_stage": feats, "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": kernels, "strides": strides, "n_conv_per_stage": [2] * n_stages,
                "n_conv_per_stage_decoder": [2] * (n_stages - 1), "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        }
    return {
        "dataset_name": dataset_name,
        "plans_name": FAST_PLANS,
        "original_median_spacing_after_transp": sp,
        "original_median_shape_after_transp": [int(p * 1.2) for p in patch],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {FAST_CONFIGURATION: conf},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(intensity or FAST_INTENSITY)},
    }


def make_dataset_json(labels: dict[int, str] | None = None, num_training: int = 1559) -> dict[str, Any]:
    """nnU-Net v2 ``dataset.json`` for a one-channel CT model with ``{id: name}`` labels (0 = background)."""
    names = {0: "background", **(labels or TOTAL_CLASSES)}
    return {
        "channel_names": {"0": "CT"},
        "labels": {name: idx for idx, name in sorted(names.items())},
        "numTraining": num_training,
        "file_ending": ".nii.gz",
    }


def write_model_folder(
    trainer_dir: Path,
    plans: dict[str, Any],
    dataset: dict[str, Any],
    state_dict: dict[str, Any],
    *,
    trainer_name: str = FAST_TRAINER,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``plans.json``, ``dataset.json`` and ``fold_0/checkpoint_final.pth`` (nnU-Net's checkpoint keys)."""
    from .network import require_torch

    torch = require_torch("writing a checkpoint")
    trainer_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(trainer_dir / "plans.json", json.dumps(plans, indent=4))
    write_text_atomic(trainer_dir / "dataset.json", json.dumps(dataset, indent=4))
    ckpt = {
        "network_weights": state_dict,
        "trainer_name": trainer_name,
        "init_args": {"plans": plans, "configuration": FAST_CONFIGURATION, "fold": 0,
                      "dataset_json": dataset, "device": "cpu"},
        "inference_allowed_mirroring_axes": (0, 1, 2),
        "current_epoch": 0,
        **(extra or {}),
    }
    (trainer_dir / "fold_0").mkdir(exist_ok=True)
    # torch.save names the archive's members after the file it writes: saved as checkpoint_final.pth in a
    # temporary folder (members checkpoint_final/..., as nnU-Net's own), then moved into place, so the same
    # weights give the same bytes (and checkpoint hash, hence the same cached ONNX export) every time
    import os
    import tempfile

    fold = trainer_dir / "fold_0"
    with tempfile.TemporaryDirectory(prefix=".checkpoint_final.tmp-", dir=fold) as tmp_dir:
        torch.save(ckpt, Path(tmp_dir) / CHECKPOINT_NAME)
        os.replace(Path(tmp_dir) / CHECKPOINT_NAME, fold / CHECKPOINT_NAME)
    return trainer_dir


def write_totalseg_home_config(home: Path) -> None:
    """TotalSegmentator's ``config.json`` with usage statistics off (no network calls)."""
    cfg = home / "config.json"
    if not cfg.exists():
        write_text_atomic(cfg, json.dumps(
            {"totalseg_id": "totalseg_ctpassport", "send_usage_stats": False, "prediction_counter": 0}, indent=4))


def make_standin(home: str | Path, seed: int = 0, *, force: bool = False,
                 plans_format: Literal["flat", "architecture"] = "flat") -> Path:
    """Write a TotalSegmentator home dir with stand-in fast-model weights; returns the trainer folder.

    Weights: the fast architecture with nnU-Net's He initialisation under ``torch.manual_seed(seed)``.
    """
    from .folder import parse_architecture
    from .network import build_network, require_torch

    torch = require_torch("making stand-in weights")
    home = Path(home)
    trainer_dir = home / "nnunet" / "results" / FAST_DATASET / FAST_TRAINER_FOLDER
    check_writable(trainer_dir / "fold_0" / CHECKPOINT_NAME, force)
    plans = make_plans(plans_format=plans_format)
    dataset = make_dataset_json()
    arch = parse_architecture(plans["configurations"][FAST_CONFIGURATION], trainer_dir / "plans.json")
    torch.manual_seed(seed)
    net = build_network(arch, 1, len(dataset["labels"]))
    # Save the state dict as is: the decoder references the encoder, and torch.save stores shared
    # storages once (cloning would double the file).
    state = net.state_dict()
    write_model_folder(trainer_dir, plans, dataset, state,
                       extra={"ctpassport_standin": {"seed": int(seed)}})
    write_totalseg_home_config(home)
    return trainer_dir
