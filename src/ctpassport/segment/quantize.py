"""int8 post-training quantisation of the exported network with OpenVINO NNCF, calibrated on real CT.

Calibration inputs are what the network sees at inference: real CTs through the exact preprocessing
(canonical RAS+, 3 mm, crop, CT normalisation), zero-padded to the patch like nnU-Net, as the sliding
window's own tiles plus shifted patch-size windows (so the statistics cover tiles cut at other places).
The quantised IR (weights int8 per channel, activations int8, NNCF's ``MIXED`` preset: symmetric weights,
asymmetric activations, fast bias correction) is cached beside the ONNX export, keyed by the checkpoint
hash and the calibration files.

Measured on this project's machine (2-core Xeon with AMX, stand-in weights, one 112x112x128 patch of
example_ct): int8 runs ~1-2 s but agrees with fp32 on only ~0.93 of the voxels whose top-2 logit margin
exceeds 0.5 (bar: 0.999), so ``auto`` never chooses it; ``openvino-int8`` stays available by name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ModelError, OutputExistsError

if TYPE_CHECKING:  # pragma: no cover
    from ..model.folder import ModelFolder

#: Default calibration CTs: NIfTI files in the shared data folder whose names contain this.
CALIBRATION_NAME_PART = "_ct"


def default_calibration_images() -> list[Path]:
    """Real CTs for calibration: ``<shared>/data/ct/*_ct*.nii*`` (``CTPASSPORT_SHARED``)."""
    from ..config import Config

    folder = Config.from_env().ct_data_dir
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CALIBRATION_NAME_PART in p.name and ".nii" in p.name)


def calibration_inputs(model: ModelFolder, images: list[Path], n: int = 8, seed: int = 0) -> list[np.ndarray]:
    """Up to ``n`` network inputs ``(1, 1, *patch)`` float32 (nnU-Net order) from real CTs (see module doc)."""
    from ..io.nifti import read_image
    from .preprocess import network_input, to_model_grid
    from .sliding_window import pad_to_patch, tiles

    patch = tuple(model.patch_size)
    spacing_nib = tuple(np.asarray(model.spacing)[np.argsort(model.nnunet_axes)])
    rng = np.random.default_rng(seed)
    volumes = []
    for path in images:
        net_in = network_input(to_model_grid(read_image(path, kind="CT"), spacing_nib), model)
        padded, _ = pad_to_patch(net_in.data, patch)
        volumes.append(padded)
    if not volumes:
        raise ModelError("int8 calibration needs at least one real CT")
    out: list[np.ndarray] = []
    for vol in volumes:  # the sliding window's own tiles first
        for sl in tiles(vol.shape[1:], patch, 0.8):
            out.append(np.ascontiguousarray(vol[(slice(None), *sl)][None]))
    k = 0
    while len(out) < n:  # then shifted windows, zero-padded where they leave the volume
        vol = volumes[k % len(volumes)]
        k += 1
        shift = [int(rng.integers(-p // 3, p // 3 + 1)) for p in patch]
        win = np.zeros((1, 1, *patch), dtype=np.float32)
        src, dst = [], []
        for s, p, size in zip(shift, patch, vol.shape[1:]):
            a = max(0, s)
            b = min(size, s + p)
            src.append(slice(a, b))
            dst.append(slice(a - s, b - s))
        dst_index: tuple[int | slice, ...] = (0, 0, *dst)
        src_index: tuple[int | slice, ...] = (0, *src)
        win[dst_index] = vol[src_index]
        out.append(win)
    return out[:n]


def quantize_int8(model: ModelFolder, onnx_path: Path, out_xml: Path, images: list[Path], n: int = 8) -> Path:
    """Quantise ``onnx_path`` to an int8 OpenVINO IR at ``out_xml`` (``.xml`` + ``.bin`` in a folder of
    their own, written atomically), calibrated on ``n`` inputs from ``images`` (real CTs). Takes about a
    minute on two cores."""
    try:
        import nncf
        import openvino as ov
    except ImportError:
        raise ModelError("int8 quantisation needs openvino and nncf", hint="pip install 'ctpassport[openvino]'") \
            from None
    from ..io.atomic import atomic_path

    data = calibration_inputs(model, images, n=n)
    ov_model = ov.Core().read_model(str(onnx_path))
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout is the command's output
        quantized = nncf.quantize(ov_model, nncf.Dataset(data), subset_size=len(data), fast_bias_correction=True,
                                  preset=nncf.QuantizationPreset.MIXED)
    try:
        with atomic_path(out_xml.parent, is_dir=True, foreign_ok=True) as tmp:  # the .xml and .bin appear together
            ov.save_model(quantized, str(tmp / out_xml.name), compress_to_fp16=False)
    except OutputExistsError:  # another process quantised the same model meanwhile: its IR is as good
        if not (out_xml.is_file() and out_xml.with_suffix(".bin").is_file()):
            raise
    return out_xml


def int8_cache_path(model: ModelFolder, images: list[Path], cache_dir: Path) -> Path:
    """``<cache>/openvino/<checkpoint sha>-int8-<key>/model.xml``; the key covers everything else the quantised
    model depends on: the network definition, the CT normalisation, patch size and spacing (which shape the
    calibration inputs) and the calibration CTs' content."""
    from ..io.load import source_sha256

    parts = {"network": model.network_sha256, "intensity": model.intensity_properties,
             "patch": list(model.patch_size), "spacing": list(model.spacing),
             "images": sorted(source_sha256(p) for p in images)}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / "openvino" / f"{model.checkpoint_sha256}-int8-{key}" / "model.xml"


def find_or_quantize_int8(model: ModelFolder, onnx_path: Path, cache_dir: Path | None,
                          images: list[Path] | None = None) -> Path:
    """The cached int8 IR of ``model``, quantised now (calibrated on ``images`` or the shared CTs) if absent."""
    from ..config import Config
    from ..io.atomic import make_folder

    imgs = list(images) if images else default_calibration_images()
    if not imgs:
        raise ModelError("int8 needs real CTs for calibration and none were found",
                         hint="set CTPASSPORT_SHARED to the folder holding data/ct")
    cache = Path(cache_dir) if cache_dir is not None else Config.from_env().cache_dir
    path = int8_cache_path(model, imgs, cache)
    if path.is_file() and path.with_suffix(".bin").is_file():
        return path
    # before the minute of calibration, not after it
    make_folder(path.parent.parent, "the OpenVINO cache folder", "set CTPASSPORT_CACHE_DIR to a writable folder")
    return quantize_int8(model, Path(onnx_path), path, imgs)
