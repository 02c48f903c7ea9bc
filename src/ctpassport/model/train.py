"""Train the embedded demo model: the fast model's topology, narrow, on phantoms plus the shared real CT slab.

The network is nnU-Net's ``PlainConvUNet`` built from plans written by :func:`ctpassport.model.standin.make_plans`
(5 stages, features 8-16-32-64-80, 3x3x3 kernels, 118 outputs, patch 112x112x128 and 3 mm spacing: the fast
model's plans with narrower features), so the result is an nnU-Net trainer folder that both ctpassport and
TotalSegmentator 2.18 run unchanged.

Training data go through ctpassport's own preprocessing (:func:`ctpassport.segment.preprocess.to_model_grid`
and :func:`~ctpassport.segment.preprocess.network_input`), so the network sees exactly what inference feeds it:

* phantoms (:mod:`ctpassport.phantom`) with seeds ``phantom_seed0 ...``, most at 3 mm RAS, a few at other
  spacings and orientations (resampled by the pipeline; labels rendered directly on the 3 mm model grid);
* ``example_ct_sm`` with ``example_seg_fast`` (the real fast model's labels) and the full ``example_ct`` with
  the loss only on the slices those labels cover.

Random crops of ``crop`` = (z, y, x) voxels in nnU-Net order -- by default slabs as wide as the inference patch
(112 x 128 in-plane), so that every crop shows the body's midline and outline: telling left from right organs
needs that context, and small cubic crops never learn it -- with rotation/scaling (trilinear image, nearest labels),
intensity scale/shift, noise and blur; voxels outside the volume read as nnU-Net's padding (0 after
normalisation) and carry no loss. Loss: cross-entropy + soft Dice over the classes that occur in the training
data (the *active* classes), with nnU-Net's deep supervision (the same loss at 1/2, 1/4 and 1/8 resolution on
the decoder's other segmentation layers, weights 8:4:2:1); the head biases start at the log class frequencies.
The head rows of classes that never occur get weight 0 and bias :data:`INACTIVE_BIAS` so they are never
predicted. AdamW with warm-up and cosine decay, the 1x1x1 segmentation layers at ``head_lr_mult`` times the
learning rate (8 features feed 85 logits: with one step size the network commits to classes far too slowly);
nnU-Net's SGD as an option. bf16
autocast on CPUs that support it. Deterministic for a seed, torch build and thread count (crops are drawn from
``default_rng([seed, step])``, so a resumed run continues identically).

``calibrate`` (``--calibrate``) ends a stage with a head-bias calibration (:func:`calibrate_head_biases`): the
network runs over every training volume as inference runs it, and the output layer's bias of background and the
named classes is shifted to maximise the mean Dice of its own predictions there (a prior correction: crops centred
by class and ``--focus`` show the network some organs more often than inference does, and an over-predicted organ
sprays false voxels far from itself). ``--steps 0 --calibrate ... --init-from X`` calibrates trained weights
without training them further. Only training volumes are used; the held-out phantoms stay held out.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..errors import ConfigError, InputError, ModelError
from ..io.atomic import atomic_path, write_text_atomic

DEMO_BASE_FEATURES = 8
DEMO_MAX_FEATURES = 80
INACTIVE_BIAS = -50.0
#: Classes called "large organs" in the demo model's evaluation (Dice >= 0.9 on held-out phantoms is tested).
LARGE_ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "heart", "stomach", "urinary_bladder",
                "lung_left", "lung_right")
LUNG_GROUPS = {"lung_left": ("lung_upper_lobe_left", "lung_lower_lobe_left"),
               "lung_right": ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right")}


@dataclass
class TrainConfig:
    """Recipe of ``ctpassport model train-demo`` (all sizes in voxels of the 3 mm model grid)."""

    seed: int = 0
    steps: int = 1000
    crop: tuple[int, int, int] = (32, 112, 128)  # (z, y, x) voxels of the 3 mm grid, nnU-Net order
    crop_start: tuple[int, int, int] | None = None  # other crops for the first ``crop_switch`` of the steps
    crop_switch: float = 0.0
    batch: int = 1
    optimizer: str = "adamw"  # "adamw" (warm-up, cosine decay) or "sgd" (nnU-Net's: Nesterov 0.99, poly decay)
    lr: float = 3e-3
    head_lr_mult: float = 10.0  # the 1x1x1 segmentation layers learn this much faster (see below)
    weight_decay: float = 1e-5
    warmup: int = 40  # adamw only
    deep_supervision: bool = True  # nnU-Net's: losses at 1, 1/2, 1/4, 1/8 resolution, weights 8:4:2:1
    prior_bias: bool = True  # start the head's biases at the log class frequencies of the training data
    n_phantoms: int = 16
    phantom_seed0: int = 1000
    extra_spacings: tuple[str, ...] = ("2.0", "1.5,1.5,2.5", "2.5,2.5,2.0:LPS")
    source_weights: dict[str, float] = field(default_factory=lambda: {"phantom": 0.65, "example_ct_sm": 0.15,
                                                                      "example_ct": 0.2})
    threads: int = 2
    bf16: bool = True
    checkpoint_every: int = 100
    class_power: float = 0.5  # crop centres: class chosen with probability ~ voxel count ** class_power
    ce_class_power: float = 0.0  # cross-entropy class weights ~ voxel count ** -ce_class_power (0 = unweighted)
    class_focus: dict[str, float] = field(default_factory=dict)  # class name -> factor on its crop-centre odds
    init_from: str | None = None  # start from this trainer folder's weights (a further training stage)
    # hard-example mining: this fraction of crops is centred on a voxel the starting weights get grossly wrong
    # (mined once before training; needs init_from; see gross_errors)
    hard_negatives: float = 0.0
    hard_classes: tuple[str, ...] = ()  # mine only the errors that name or miss these classes (empty: all)
    # after the steps, fit the output layer's biases on the training volumes (see calibrate_head_biases)
    calibrate: bool = False
    calibrate_classes: tuple[str, ...] = ()  # the classes whose bias is fitted, besides background (empty: all)


@dataclass
class Sample:
    """One training volume in nnU-Net order: normalised image, labels, loss mask (None = everywhere)."""

    name: str
    source: str
    image: np.ndarray  # float32 (z, y, x)
    labels: np.ndarray  # uint8 (z, y, x)
    mask: np.ndarray | None  # bool (z, y, x)
    class_voxels: dict[int, np.ndarray] = field(default_factory=dict)  # class -> (n, 3) voxel indices


# ------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------
def _canonical_labels_on(resampled: Any, labels_input_grid: np.ndarray) -> np.ndarray:
    """Labels given on the input grid -> canonical orientation (no resampling: only for 3 mm inputs)."""
    return np.ascontiguousarray(resampled.reorient.to_canonical(labels_input_grid))


def _to_network_order(arr: np.ndarray, model: Any, bbox: tuple[tuple[int, int], ...]) -> np.ndarray:
    t = np.transpose(arr, model.nnunet_axes)
    return np.ascontiguousarray(t[tuple(slice(a, b) for a, b in bbox)])


def _phantom_raw(seed: int, spacing: str) -> tuple[Any, np.ndarray]:
    """(resampled CT on the 3 mm canonical grid, labels on that grid) of phantom ``seed`` at ``spacing``."""
    from ..io.nifti import Image3D
    from ..phantom import make_scan
    from ..phantom.render import Grid, render_labels_and_hu
    from ..segment.preprocess import to_model_grid

    sp, _, orient = spacing.partition(":")
    scan = make_scan(seed, spacing=sp, orientation=orient or "RAS")
    image = Image3D(data=scan.ct, affine=scan.affine, header=None)  # type: ignore[arg-type]
    resampled = to_model_grid(image, (3.0, 3.0, 3.0))
    if resampled.resampled:
        grid = Grid(shape=tuple(resampled.data.shape), affine=resampled.affine)
        labels, _, _ = render_labels_and_hu(scan.phantom, grid)
    else:
        labels = _canonical_labels_on(resampled, scan.labels)
    return resampled, labels


def _real_raw(ct_path: Path, seg_path: Path) -> tuple[Any, np.ndarray, np.ndarray]:
    """(resampled CT, labels, mask) for a real CT whose reference labels cover a sub-grid of it (3 mm only)."""
    from ..io.nifti import read_image
    from ..segment.preprocess import to_model_grid

    ct = read_image(ct_path, kind="CT")
    seg = read_image(seg_path, kind="label map")
    if not np.allclose(ct.affine[:3, :3], seg.affine[:3, :3], atol=1e-4):
        raise InputError("labels are not on the CT's voxel grid (different spacing or orientation)", seg_path)
    offset = np.linalg.solve(ct.affine[:3, :3], seg.affine[:3, 3] - ct.affine[:3, 3])
    off = np.rint(offset).astype(int)
    if np.max(np.abs(offset - off)) > 1e-3 or np.any(off < 0) or np.any(off + seg.shape > np.array(ct.shape)):
        raise InputError("labels do not cover a whole-voxel sub-grid of the CT", seg_path)
    labels = np.zeros(ct.shape, dtype=np.uint8)
    mask = np.zeros(ct.shape, dtype=bool)
    sl = tuple(slice(int(o), int(o) + n) for o, n in zip(off, seg.shape))
    labels[sl] = np.asarray(seg.data, dtype=np.uint8)
    mask[sl] = True
    resampled = to_model_grid(ct, (3.0, 3.0, 3.0))
    if resampled.resampled:
        raise InputError("training on real CTs needs 3 mm images (the labels are not resampled)", ct_path)
    return resampled, _canonical_labels_on(resampled, labels), _canonical_labels_on(resampled, mask)


def intensity_properties(values: np.ndarray) -> dict[str, float]:
    """nnU-Net's ``foreground_intensity_properties_per_channel`` entry for HU samples of labelled voxels."""
    v = np.asarray(values, dtype=np.float64)
    return {"max": float(v.max()), "mean": float(v.mean()), "median": float(np.median(v)), "min": float(v.min()),
            "percentile_00_5": float(np.percentile(v, 0.5)), "percentile_99_5": float(np.percentile(v, 99.5)),
            "std": float(v.std())}


def _class_voxels(labels: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator,
                  per_class: int = 3000) -> dict[int, np.ndarray]:
    out = {}
    lab = labels if mask is None else np.where(mask, labels, 0)
    for k in np.unique(lab):
        if k == 0:
            continue
        idx = np.argwhere(lab == k)
        if len(idx) > per_class:
            idx = idx[rng.choice(len(idx), per_class, replace=False)]
        out[int(k)] = idx.astype(np.int32)
    return out


def prepare_data(cfg: TrainConfig, ct_dir: Path, log: Callable[[str], None],
                 intensity: dict[str, float] | None = None) -> tuple[list[Sample], dict[str, float]]:
    """Render/load every training volume, compute the intensity properties (HU of labelled voxels), normalise.
    Returns samples + props. ``intensity``: normalise with these properties instead (those of the weights a
    further stage starts from: the network's input normalisation is part of the model)."""
    from ..segment.preprocess import nonzero_bbox

    raw: list[tuple[str, str, Any, np.ndarray, np.ndarray | None]] = []
    spacings = ["3.0"] * cfg.n_phantoms
    for i, sp in enumerate(cfg.extra_spacings):
        if i < cfg.n_phantoms:
            spacings[-1 - i] = sp
    for i, sp in enumerate(spacings):
        t0 = time.perf_counter()
        seed = cfg.phantom_seed0 + i
        res, lab = _phantom_raw(seed, sp)
        raw.append((f"phantom_{seed}@{sp}", "phantom", res, lab, None))
        log(f"phantom seed {seed} at {sp} mm: {res.data.shape} in {time.perf_counter() - t0:.1f} s")
    sm_ct, sm_seg, full_ct = (ct_dir / f"{n}.nii.gz" for n in ("example_ct_sm", "example_seg_fast", "example_ct"))
    for p in (sm_ct, sm_seg, full_ct):
        if not p.is_file():
            raise InputError("shared training CT is missing", p, "set CTPASSPORT_SHARED to the folder holding data/ct")
    res, lab, _ = _real_raw(sm_ct, sm_seg)
    raw.append(("example_ct_sm", "example_ct_sm", res, lab, None))
    res, lab, mask = _real_raw(full_ct, sm_seg)
    raw.append(("example_ct", "example_ct", res, lab, mask))
    # intensity statistics of labelled voxels, as nnU-Net computes them (sampled per case)
    rng = np.random.default_rng([cfg.seed, 17])
    fg = []
    for _, _, r_img, r_lab, r_mask in raw:
        sel = r_lab > 0 if r_mask is None else (r_lab > 0) & r_mask
        vals = np.asarray(r_img.data)[sel].astype(np.float32)
        fg.append(vals if len(vals) <= 10000 else vals[rng.choice(len(vals), 10000, replace=False)])
    # (the voxels above are sampled even when ``intensity`` is given: the random stream after stays the same)
    props = (intensity_properties(np.concatenate(fg)) if intensity is None
             else {k: float(v) for k, v in intensity.items()})
    lo, hi, mean, std = props["percentile_00_5"], props["percentile_99_5"], props["mean"], props["std"]
    samples = []
    for name, source, r_img, r_lab, r_mask in raw:
        arr = np.transpose(np.asarray(r_img.data), (2, 1, 0))  # nnU-Net order for SimpleITK-read plans
        bbox = nonzero_bbox(arr)
        sl = tuple(slice(a, b) for a, b in bbox)
        img = np.clip(arr[sl].astype(np.float32), lo, hi)
        img = (img - np.float32(mean)) / np.float32(max(std, 1e-8))
        labs = np.ascontiguousarray(np.transpose(r_lab, (2, 1, 0))[sl])
        msk = None if r_mask is None else np.ascontiguousarray(np.transpose(r_mask, (2, 1, 0))[sl])
        s = Sample(name=name, source=source, image=np.ascontiguousarray(img, dtype=np.float32), labels=labs, mask=msk)
        s.class_voxels = _class_voxels(labs, msk, rng)
        samples.append(s)
    return samples, props


# ------------------------------------------------------------------------------------------------------
# crops
# ------------------------------------------------------------------------------------------------------
def _rotation(rng: np.random.Generator) -> np.ndarray:
    from ..phantom.geometry import rotation_xyz

    # nnU-Net order (z, y, x): mostly in-plane (axial) rotation, i.e. about axis 0
    a0, a1, a2 = rng.uniform(-10, 10), rng.uniform(-4, 4), rng.uniform(-4, 4)
    return rotation_xyz(a0, a1, a2)


def sample_crop(sample: Sample, rng: np.random.Generator, crop: int | tuple[int, int, int], *, augment: bool = True,
                centre: np.ndarray | None = None, class_power: float = 0.0,
                class_counts: dict[int, int] | None = None,
                class_focus: dict[int, float] | None = None, hard: np.ndarray | None = None,
                hard_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One augmented crop of ``crop`` voxels (one size or (z, y, x)): (image float32, target int64 with -100 where
    there is no loss)).

    The centre (voxel indices, nnU-Net order) is drawn: 2/3 of the time near a voxel of a class present (all
    classes equally likely, or with probability ``count ** class_power`` given ``class_counts``, times
    ``class_focus[class]`` where given), else anywhere in the loss mask / volume; ``centre`` fixes it instead.
    With ``hard`` ((n, 3) voxel indices, e.g. from :func:`gross_errors`), a fraction ``hard_fraction`` of the
    centres is drawn near one of those voxels instead (no extra random draw when ``hard`` is None, so crops
    without it are the same as before).
    """
    from scipy import ndimage

    shape = np.asarray(sample.image.shape)
    size = np.broadcast_to(np.asarray(crop, dtype=np.float64), (3,)).copy()
    r = rng.random()
    if centre is None and hard is not None and len(hard) and rng.random() < hard_fraction:
        centre = hard[int(rng.integers(len(hard)))].astype(np.float64) + rng.uniform(-1, 1, 3) * size / 8
    if centre is not None:
        centre = np.asarray(centre, dtype=np.float64)
    elif sample.class_voxels and r < 0.67:
        classes = sorted(sample.class_voxels)
        if (class_power > 0 and class_counts) or class_focus:
            counts, focus = class_counts or {}, class_focus or {}
            pw = np.array([float(counts.get(c, 1)) ** class_power * focus.get(c, 1.0) for c in classes])
            k = classes[int(rng.choice(len(classes), p=pw / pw.sum()))]
        else:
            k = classes[int(rng.integers(len(classes)))]
        vox = sample.class_voxels[k]
        centre = vox[int(rng.integers(len(vox)))].astype(np.float64) + rng.uniform(-1, 1, 3) * size / 4
    elif sample.mask is not None:
        idx = np.argwhere(sample.mask[:: 4, :: 4, :: 4]) * 4
        centre = idx[int(rng.integers(len(idx)))].astype(np.float64)
    else:
        centre = rng.uniform(0, 1, 3) * (shape - 1)
    half = (size - 1) / 2.0
    g = np.indices(tuple(int(v) for v in size), dtype=np.float64).reshape(3, -1) - half[:, None]
    if augment:
        scale = rng.uniform(0.9, 1.12)
        m = _rotation(rng) * scale
    else:
        m = np.eye(3)
    coords = (m @ g) + centre[:, None]
    coords = coords.reshape(3, *(int(v) for v in size))
    img = ndimage.map_coordinates(sample.image, coords, order=1, mode="nearest", output=np.float32)
    lab = ndimage.map_coordinates(sample.labels, coords, order=0, mode="nearest")
    in_volume = np.all([(coords[a] >= -0.5) & (coords[a] <= shape[a] - 0.5) for a in range(3)], axis=0)
    inside = in_volume.copy()
    if sample.mask is not None:
        inside &= ndimage.map_coordinates(sample.mask.astype(np.uint8), coords, order=0, mode="nearest").astype(bool)
    target = np.where(inside, lab.astype(np.int64), np.int64(-100))
    img = np.where(in_volume, img, np.float32(0.0)).astype(np.float32)  # nnU-Net pads with 0 (normalised)
    if augment:
        if rng.random() < 0.2:
            img = ndimage.gaussian_filter(img, sigma=rng.uniform(0.4, 1.0)).astype(np.float32)
        img = img * np.float32(rng.uniform(0.92, 1.08)) + np.float32(rng.uniform(-0.06, 0.06))
        if rng.random() < 0.5:
            img = img + rng.normal(0, rng.uniform(0.0, 0.04), img.shape).astype(np.float32)
        img = np.where(in_volume, img, np.float32(0.0)).astype(np.float32)  # the padding stays exactly 0
    return img, target


# ------------------------------------------------------------------------------------------------------
# network helpers
# ------------------------------------------------------------------------------------------------------
def demo_plans(intensity: dict[str, float]) -> dict[str, Any]:
    """The demo model's plans: the fast model's, with features 8-16-32-64-80 and the training data's intensities."""
    from .standin import make_plans

    return make_plans(base_features=DEMO_BASE_FEATURES, max_features=DEMO_MAX_FEATURES, intensity=intensity)


class _ActiveHead:
    """Runs the final 1x1x1 conv for the active classes only (rows of the original weight)."""

    def __init__(self, conv: Any, active: list[int]) -> None:
        import torch

        self.conv = conv
        self.index = torch.tensor(active, dtype=torch.long)

    def __call__(self, x: Any) -> Any:
        import torch.nn.functional as F

        return F.conv3d(x, self.conv.weight[self.index], self.conv.bias[self.index])


def _forward_active(net: Any, x: Any, heads: list[_ActiveHead]) -> list[Any]:
    """The PlainConvUNet forward with the segmentation layers restricted to the active classes.

    ``heads`` holds one head per decoder stage that is read out (the last one = full resolution); returns their
    logits, lowest resolution first.
    """
    import torch

    skips = net.encoder(x)
    dec = net.decoder
    lres = skips[-1]
    first = len(dec.stages) - len(heads)
    outs = []
    for s in range(len(dec.stages)):
        y = torch.cat((dec.transpconvs[s](lres), skips[-(s + 2)]), 1)
        lres = dec.stages[s](y)
        if s >= first:
            outs.append(heads[s - first](lres))
    return outs


def _loss(logits: Any, target: Any, n_active: int, class_weights: Any = None) -> Any:
    """Cross-entropy (ignore -100; optionally class-weighted, normalised by the weights of the voxels, as
    PyTorch's ``cross_entropy(weight=...)``) + soft Dice over the active foreground classes present in the target.

    Dice terms per class c: intersection = sum of p_c over voxels labelled c, sizes = sum of p_c and the
    voxel count of c (computed with gathers and bincounts instead of a one-hot tensor).
    """
    import torch

    logp = torch.log_softmax(logits.float(), 1)
    valid = target >= 0
    tgt = torch.where(valid, target, torch.zeros_like(target))
    logp_t = logp.gather(1, tgt.unsqueeze(1)).squeeze(1)
    w = valid.to(logp.dtype) if class_weights is None else class_weights[tgt] * valid
    ce = -(logp_t * w).sum() / w.sum().clamp(min=1e-8)
    probs = logp.exp()
    vflat = valid.reshape(-1)
    tflat = tgt.reshape(-1)[vflat]
    inter = torch.zeros(n_active, dtype=probs.dtype).index_add_(0, tflat, logp_t.exp().reshape(-1)[vflat])
    psum = (probs * valid.unsqueeze(1)).sum((0, 2, 3, 4))
    count = torch.bincount(tflat, minlength=n_active).to(probs.dtype)
    present = count > 0
    present[0] = False
    if bool(present.any()):
        dice = (2 * inter + 1e-5) / (psum + count + 1e-5)
        dice_loss = 1.0 - dice[present].mean()
    else:
        dice_loss = torch.zeros((), dtype=probs.dtype)
    return ce + dice_loss, ce.detach(), dice_loss.detach()


# ------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------
def train_demo(output: str | Path, *, ct_dir: str | Path, cfg: TrainConfig | None = None,
               work_dir: str | Path | None = None, force: bool = False,
               log: Callable[[str], None] = print) -> Path:
    """Train the demo model and write it as an nnU-Net trainer folder at ``output`` (plus its ONNX export).

    ``work_dir`` keeps resumable state (every ``checkpoint_every`` steps); a rerun with the same config resumes.
    """
    from .folder import CHECKPOINT_NAME, load_model_folder
    from .network import build_network, require_torch
    from .standin import make_dataset_json, write_model_folder

    torch = require_torch("training the demo model")
    cfg = cfg or TrainConfig()
    out = Path(output)
    if (out / "fold_0" / CHECKPOINT_NAME).exists() and not force:
        from ..errors import OutputExistsError

        raise OutputExistsError(out / "fold_0" / CHECKPOINT_NAME)
    work = Path(work_dir) if work_dir else out.parent / f".{out.name}.train"
    torch.set_num_threads(max(1, cfg.threads))
    for c in (cfg.crop, cfg.crop_start or cfg.crop):
        if len(c) != 3 or any(int(v) % 16 or int(v) < 16 for v in c):
            raise ConfigError(f"crop {tuple(c)} must be three multiples of 16 (the network's total stride)")
    from .classes import NAME_TO_ID

    _check_class_names("--focus", cfg.class_focus)
    focus_ids = {NAME_TO_ID[n]: float(f) for n, f in cfg.class_focus.items()} or None
    if not 0.0 <= cfg.hard_negatives <= 1.0:
        raise ConfigError(f"--hard-negatives {cfg.hard_negatives:g} must be a fraction between 0 and 1")
    if cfg.hard_negatives > 0 and not cfg.init_from:
        raise ConfigError("--hard-negatives mines the errors of trained weights: give --init-from a trained model")
    _check_class_names("--hard-classes", cfg.hard_classes)
    _check_class_names("--calibrate", cfg.calibrate_classes)
    if cfg.steps < 0 or (cfg.steps == 0 and not (cfg.calibrate and cfg.init_from)):
        raise ConfigError(f"--steps {cfg.steps}: a stage without optimiser steps only calibrates trained weights"
                         " (give --calibrate and --init-from)" if cfg.steps == 0 else
                         f"--steps {cfg.steps} must not be negative")
    work.mkdir(parents=True, exist_ok=True)  # after the checks: a refused recipe leaves nothing behind
    t_start = time.perf_counter()
    inherited = None
    if cfg.init_from:  # a further stage keeps the normalisation its starting weights were trained with
        from .folder import plans_intensity

        init_plans = Path(cfg.init_from) / "plans.json"
        try:
            inherited = plans_intensity(json.loads(init_plans.read_text(encoding="utf-8")))
        except (OSError, ValueError, AttributeError):
            inherited = None
        if not isinstance(inherited, dict) or not {"mean", "std"} <= inherited.keys():
            raise ModelError("has no intensity properties (foreground_intensity_properties_per_channel) to keep",
                             init_plans)
    samples, props, t_made = _cached_data(cfg, Path(ct_dir), work, log, inherited)
    t_data = time.perf_counter() - t_start if t_made is None else t_made
    plans = demo_plans(props)
    dataset = make_dataset_json()
    active = sorted({0} | {int(k) for s in samples for k in np.unique(s.labels)})
    log(f"data ready in {t_data:.0f} s: {len(samples)} volumes, {len(active) - 1} active classes, "
        f"intensity mean {props['mean']:.1f} std {props['std']:.1f} HU")
    from .folder import FAST_CONFIGURATION, parse_architecture

    arch = parse_architecture(plans["configurations"][FAST_CONFIGURATION], out / "plans.json")
    torch.manual_seed(cfg.seed)
    net: Any = build_network(arch, 1, len(dataset["labels"]))
    previous = None
    if cfg.init_from:
        from .network import load_checkpoint

        src = Path(cfg.init_from)
        ck = load_checkpoint(src / "fold_0" / CHECKPOINT_NAME)
        try:
            net.load_state_dict(ck["network_weights"])
        except (KeyError, RuntimeError) as exc:
            raise ModelError(f"cannot start from these weights ({str(exc).splitlines()[0][:120]})", src) from None
        if (src / "training.json").is_file():
            rec = json.loads((src / "training.json").read_text(encoding="utf-8"))
            previous = {k: rec.get(k) for k in ("config", "seconds", "final_loss", "previous", "torch", "threads",
                                                "calibration")}
        log(f"initialised from {src}")
    n_heads = min(4, len(net.decoder.stages)) if cfg.deep_supervision else 1
    seg_layers = list(net.decoder.seg_layers)[-n_heads:]
    heads = [_ActiveHead(layer, active) for layer in seg_layers]
    ds_weights = np.array([2.0 ** -i for i in range(n_heads)])[::-1]  # lowest resolution first
    ds_weights /= ds_weights.sum()
    counts = np.zeros(len(active))
    lut0 = {k: i for i, k in enumerate(active)}
    for smp in samples:
        u, cnt = np.unique(smp.labels if smp.mask is None else smp.labels[smp.mask], return_counts=True)
        for k, n in zip(u, cnt):
            counts[lut0[int(k)]] += n
    class_weights = None
    if cfg.ce_class_power > 0:
        # rarer classes weigh more (background, most voxels, least): weights ~ count ** -p, median class 1
        cw = np.maximum(counts, 1.0) ** -cfg.ce_class_power
        class_weights = torch.tensor(cw / np.median(cw), dtype=torch.float32)
    if cfg.prior_bias and previous is None:
        prior = torch.tensor(np.log(counts / counts.sum() + 1e-5), dtype=torch.float32)
        with torch.no_grad():
            for layer in seg_layers:
                layer.bias[torch.tensor(active)] = prior
    # Parameter groups: with 8 features feeding 85 logits, a uniform step size makes the logits grow (and the
    # network commit to classes) very slowly; the segmentation layers get head_lr_mult x the learning rate.
    head_ids = {id(p) for layer in net.decoder.seg_layers for p in layer.parameters()}
    groups = [{"params": [p for p in net.parameters() if id(p) not in head_ids], "mult": 1.0},
              {"params": [p for p in net.parameters() if id(p) in head_ids], "mult": cfg.head_lr_mult}]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay)
    else:
        raise InputError(f"unknown optimizer {cfg.optimizer!r} (sgd or adamw)")
    lut = np.full(256, -100, dtype=np.int64)
    lut[active] = np.arange(len(active))
    state_path = work / "state.pt"
    step0, history = 0, []
    cfg_key = json.dumps(asdict(cfg), sort_keys=True)
    if state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        if st.get("cfg") == cfg_key:
            net.load_state_dict(st["net"])
            opt.load_state_dict(st["opt"])
            step0, history = int(st["step"]), list(st["history"])
            log(f"resuming at step {step0}")
    counts_of = {smp.name: _label_counts(smp) for smp in samples} if cfg.class_power > 0 else {
        smp.name: None for smp in samples}
    by_source: dict[str, list[Sample]] = {}
    for s in samples:
        by_source.setdefault(s.source, []).append(s)
    sources = sorted(cfg.source_weights)
    weights = np.array([cfg.source_weights[k] for k in sources], dtype=np.float64)
    weights /= weights.sum()
    use_bf16 = cfg.bf16 and _bf16_ok(torch)
    hard_of: dict[str, np.ndarray] = {}
    t_mine: float | None = None
    if cfg.hard_negatives > 0:
        patch = tuple(int(v) for v in plans["configurations"][FAST_CONFIGURATION]["patch_size"])
        mined, t_mine = _cached_mining(Path(cfg.init_from or ""), work, samples, log,
                               lambda: mine_hard_voxels(net, heads, active, samples, patch, bf16=use_bf16, log=log))
        hard_of = select_hard_voxels(mined, {s.name: s.labels for s in samples},
                                     [NAME_TO_ID[n] for n in cfg.hard_classes])
        if cfg.hard_classes:
            log(f"hard examples naming or missing {', '.join(cfg.hard_classes)}: "
                f"{sum(len(v) for v in hard_of.values())} voxels in {len(hard_of)} volumes")
    net.train()
    t_loop = time.perf_counter()
    for step in range(step0, cfg.steps):
        rng = np.random.default_rng([cfg.seed, 99991, step])
        xs, ys = [], []
        for _ in range(cfg.batch):
            pool = by_source[sources[int(rng.choice(len(sources), p=weights))]]
            crop = cfg.crop_start if cfg.crop_start and step < int(cfg.crop_switch * cfg.steps) else cfg.crop
            smp = pool[int(rng.integers(len(pool)))]
            img, tgt = sample_crop(smp, rng, crop, class_power=cfg.class_power, class_counts=counts_of[smp.name],
                                   class_focus=focus_ids, hard=hard_of.get(smp.name),
                                   hard_fraction=cfg.hard_negatives)
            xs.append(img[None])
            ys.append(np.where(tgt >= 0, lut[np.clip(tgt, 0, 255)], -100))
        x = torch.from_numpy(np.stack(xs))
        y = torch.from_numpy(np.stack(ys))
        lr = _lr(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr * group["mult"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            outs = _forward_active(net, x, heads)
        loss, ce, dl = _loss(outs[-1], y, len(active), class_weights)
        loss = loss * float(ds_weights[-1])
        for i in range(n_heads - 1):
            f = 2 ** (n_heads - 1 - i)
            part, _, _ = _loss(outs[i], y[:, ::f, ::f, ::f], len(active), class_weights)
            loss = loss + float(ds_weights[i]) * part
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        opt.step()
        history.append((step, float(loss.detach()), float(ce), float(dl)))
        done = step + 1
        if done % 20 == 0 or done == cfg.steps:
            recent = np.mean([h[1] for h in history[-20:]])
            el = time.perf_counter() - t_loop
            rate = el / max(1, done - step0)
            log(f"step {done}/{cfg.steps} loss {recent:.3f} (ce {np.mean([h[2] for h in history[-20:]]):.3f} "
                f"dice {np.mean([h[3] for h in history[-20:]]):.3f}) lr {lr:.2e} {rate:.2f} s/step "
                f"eta {rate * (cfg.steps - done) / 60:.1f} min")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            with atomic_path(state_path) as tmp:
                torch.save({"cfg": cfg_key, "net": net.state_dict(), "opt": opt.state_dict(), "step": done,
                            "history": history}, tmp)
    t_train = time.perf_counter() - t_loop
    calibration, t_cal = None, None
    if cfg.calibrate:
        t0 = time.perf_counter()
        patch = tuple(int(v) for v in plans["configurations"][FAST_CONFIGURATION]["patch_size"])
        calibration = calibrate_head_biases(net, heads, active, samples, patch,
                                            [NAME_TO_ID[n] for n in cfg.calibrate_classes], log=log)
        t_cal = time.perf_counter() - t0
    # inactive classes: never predicted
    with torch.no_grad():
        conv = net.decoder.seg_layers[-1]
        inactive = [k for k in range(conv.weight.shape[0]) if k not in set(active)]
        conv.weight[inactive] = 0.0
        conv.bias[inactive] = INACTIVE_BIAS
    net.eval()
    meta = {
        "ctpassport_demo": {
            "config": asdict(cfg), "active_classes": active, "intensity": props,
            "seconds": {"data": round(t_data, 1), "train": round(t_train, 1),
                        **({"mine": round(t_mine, 1)} if t_mine is not None else {}),
                        **({"calibrate": round(t_cal, 1)} if t_cal is not None else {})},
            "torch": str(torch.__version__), "threads": cfg.threads, "bf16": use_bf16,
            "final_loss": float(np.mean([h[1] for h in history[-50:]])) if history else None,
            "previous": previous,
            **({"calibration": calibration} if calibration is not None else {}),
        }
    }
    tmp_dir = out.parent / f".{out.name}.new"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    write_model_folder(tmp_dir, plans, dataset, net.state_dict(), trainer_name="nnUNetTrainer_4000epochs_NoMirroring",
                       extra=meta)
    from .export import export_onnx

    model = load_model_folder(tmp_dir)
    export_onnx(model, tmp_dir / "fold_0" / "checkpoint_final.onnx")
    write_text_atomic(tmp_dir / "training.json", json.dumps({
        **meta["ctpassport_demo"], "history": [list(h) for h in history[:: max(1, len(history) // 400)]],
    }, indent=1))
    out.mkdir(parents=True, exist_ok=True)
    for name in ("plans.json", "dataset.json", "training.json"):
        shutil.copy2(tmp_dir / name, out / name)
    (out / "fold_0").mkdir(exist_ok=True)
    for f in (tmp_dir / "fold_0").iterdir():
        shutil.copy2(f, out / "fold_0" / f.name)
    shutil.rmtree(tmp_dir)
    log(f"wrote {out} (training {t_train / 60:.1f} min)")
    return out


def _label_counts(sample: Sample) -> dict[int, int]:
    lab = sample.labels if sample.mask is None else sample.labels[sample.mask]
    u, c = np.unique(lab, return_counts=True)
    return {int(k): int(n) for k, n in zip(u, c) if k > 0}


def gross_errors(pred: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None, *,
                 margin: int = 2) -> np.ndarray:
    """Voxels (indices in the arrays' own axis order, (n, 3) int) where ``pred`` names a class with no voxel of
    that class in ``labels`` within ``margin`` voxels (26-connected steps): a false organ or a missed interior,
    not a boundary drawn a voxel or two off. Only inside ``mask`` where given. Background counts as a class
    (organ interiors labelled background are gross errors too)."""
    from scipy import ndimage

    wrong = pred != labels
    if mask is not None:
        wrong &= mask
    gross = np.zeros(pred.shape, dtype=bool)
    cube = ndimage.generate_binary_structure(3, 3)
    for k in np.unique(pred[wrong]):
        cand = wrong & (pred == k)
        where = np.argwhere(cand)
        lo = np.maximum(where.min(0) - margin, 0)
        hi = np.minimum(where.max(0) + margin + 1, pred.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        near = ndimage.binary_dilation(labels[box] == k, structure=cube, iterations=margin)
        gross[box] |= cand[box] & ~near
    return np.argwhere(gross)


def _volume_logits(net: Any, heads: list[_ActiveHead], n_active: int, samples: list[Sample], patch: tuple[int, ...],
                   *, bf16: bool) -> Iterator[tuple[Sample, np.ndarray]]:
    """Each sample with ``net``'s logits of the ``n_active`` active classes over it (sliding window as at inference:
    step 0.8, nnU-Net order, float32 sums; bf16 autocast if asked); the network is in eval mode meanwhile and
    back in its own mode after."""
    import torch

    from ..segment.sliding_window import sliding_window_logits

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return _forward_active(net, torch.from_numpy(x), heads)[-1].float().numpy()

    was_training = net.training
    net.eval()
    try:
        for smp in samples:
            yield smp, sliding_window_logits(smp.image[None].astype(np.float32), predict, patch, n_active,
                                             step=0.8, accumulate="fp32")
    finally:
        net.train(was_training)


def mine_hard_voxels(net: Any, heads: list[_ActiveHead], active: list[int], samples: list[Sample],
                     patch: tuple[int, ...], *, bf16: bool, log: Callable[[str], None],
                     margin: int = 2) -> dict[str, np.ndarray]:
    """Run ``net`` (sliding window, step 0.8, nnU-Net order) over every training volume and return, per sample
    name, its :func:`gross_errors` as (n, 4) int32 rows: voxel indices and the class the network named there
    (samples without any are left out). Logs the classes the network names wrongly most often."""
    from ..segment.sliding_window import argmax_channels
    from .classes import TOTAL_CLASSES

    active_arr = np.asarray(active)
    mined: dict[str, np.ndarray] = {}
    by_class: dict[int, int] = {}
    t0 = time.perf_counter()
    for i, (smp, logits) in enumerate(_volume_logits(net, heads, len(active), samples, patch, bf16=bf16)):
        pred = active_arr[argmax_channels(logits)].astype(smp.labels.dtype)
        idx = gross_errors(pred, smp.labels, smp.mask, margin=margin)
        if len(idx):
            named = pred[tuple(idx.T)]
            mined[smp.name] = np.column_stack([idx, named]).astype(np.int32)
            u, c = np.unique(named, return_counts=True)
            for k, n in zip(u, c):
                by_class[int(k)] = by_class.get(int(k), 0) + int(n)
        log(f"mined {smp.name} ({i + 1}/{len(samples)}): {len(idx)} grossly wrong voxels in"
            f" {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
    top = sorted(by_class.items(), key=lambda kv: -kv[1])[:8]
    total = sum(by_class.values())
    log(f"hard examples: {total} grossly wrong voxels in {len(mined)} of {len(samples)} volumes; named most often: "
        + ", ".join(f"{TOTAL_CLASSES.get(k, 'background')} {n / max(total, 1):.0%}" for k, n in top))
    return mined


@dataclass
class CalibrationVolume:
    """One training volume's evidence for :func:`fit_class_biases` (classes as indices into the active list).

    ``counts``: (3, n_active) int64: reference voxels per class, then predicted voxels and correct voxels per
    class among the *certain* voxels (top-1 logit ahead of the second by at least ``2 * bound``: no shift within
    the bound can change them). ``values`` / ``classes``: (n, k) float32 logits and int16 class indices of the
    other (uncertain) voxels, largest first; ``reference``: (n,) their reference class."""

    counts: np.ndarray
    values: np.ndarray
    classes: np.ndarray
    reference: np.ndarray


def calibration_volume(logits: np.ndarray, reference: np.ndarray, *, bound: float, k: int = 5) -> CalibrationVolume:
    """Reduce ``logits`` (n_active, n) float32 of n voxels and their ``reference`` (n,) class indices to a
    :class:`CalibrationVolume` (the ``k`` largest logits of each uncertain voxel)."""
    n_active = logits.shape[0]
    k = min(k, n_active)
    idx = np.argpartition(-logits, k - 1, axis=0)[:k].T
    val = np.take_along_axis(logits.T, idx, axis=1)
    order = np.argsort(-val, axis=1, kind="stable")
    val = np.take_along_axis(val, order, axis=1).astype(np.float32)
    idx = np.take_along_axis(idx, order, axis=1).astype(np.int16)
    certain = (val[:, 0] - val[:, 1] >= 2 * bound) if k > 1 else np.ones(len(val), dtype=bool)
    pred, ref = idx[certain, 0], reference[certain]
    counts = np.stack([np.bincount(reference, minlength=n_active), np.bincount(pred, minlength=n_active),
                       np.bincount(pred[pred == ref], minlength=n_active)]).astype(np.int64)
    return CalibrationVolume(counts, np.ascontiguousarray(val[~certain]), np.ascontiguousarray(idx[~certain]),
                             reference[~certain].astype(np.int16))


def fit_class_biases(volumes: list[CalibrationVolume], free: list[int], *, bound: float = 3.0,
                     deltas: tuple[float, ...] = (-1.0, -0.5, -0.25, -0.1, 0.1, 0.25, 0.5, 1.0),
                     rounds: int = 8) -> tuple[np.ndarray, float, float]:
    """Shifts of the output logits (one per active class; nonzero only for the indices in ``free``, each
    within +-``bound``) that maximise the mean over volumes of the mean Dice over the classes each volume's
    reference holds, by coordinate ascent: each round tries every shift in ``deltas`` on each free class in
    turn and keeps the best that raises the objective; stops after ``rounds`` or a round without a change.
    Returns ``(shifts, objective before, objective after)``. Exact for shifts within the bound as long as a
    voxel's winner stays among its k stored logits (the certain voxels cannot change: see
    :class:`CalibrationVolume`)."""
    n_active = volumes[0].counts.shape[1]
    ref_n = np.stack([v.counts[0] for v in volumes]).astype(np.float64)
    pred_n = np.stack([v.counts[1] for v in volumes]).astype(np.float64)
    true_n = np.stack([v.counts[2] for v in volumes]).astype(np.float64)
    present = ref_n > 0
    n_present = np.maximum(present.sum(1), 1)
    values = np.concatenate([v.values for v in volumes])
    classes = np.concatenate([v.classes for v in volumes]).astype(np.int64)
    reference = np.concatenate([v.reference for v in volumes]).astype(np.int64)
    vol = np.concatenate([np.full(len(v.reference), i) for i, v in enumerate(volumes)])
    shift = np.zeros(n_active)

    def predict(sel: np.ndarray) -> np.ndarray:
        s = values[sel] + shift[classes[sel]]
        return classes[sel][np.arange(len(s)), s.argmax(1)]

    def counted(v: np.ndarray, c: np.ndarray) -> np.ndarray:  # voxels per (volume, class)
        return np.bincount(v * n_active + c, minlength=ref_n.size).reshape(ref_n.shape)

    def objective(pred_c: np.ndarray, true_c: np.ndarray) -> float:
        dice = np.where(present, 2 * true_c / np.maximum(pred_c + ref_n, 1), 0.0)
        return float(np.mean(dice.sum(1) / n_present))

    cur = predict(np.arange(len(reference)))
    hit = cur == reference
    pred_n += counted(vol, cur)
    true_n += counted(vol[hit], cur[hit])
    start = best = objective(pred_n, true_n)
    where = {c: np.nonzero((classes == c).any(1))[0] for c in free}
    for _ in range(rounds):
        changed = False
        for c in free:
            sel = where[c]
            if not len(sel):
                continue
            old, ref, vv = cur[sel], reference[sel], vol[sel]
            pick = None
            for d in deltas:
                if abs(shift[c] + d) > bound + 1e-9:
                    continue
                shift[c] += d
                new = predict(sel)
                shift[c] -= d
                ch = new != old
                if not ch.any():
                    continue
                lost, won = ch & (old == ref), ch & (new == ref)
                p2 = pred_n - counted(vv[ch], old[ch]) + counted(vv[ch], new[ch])
                t2 = true_n - counted(vv[lost], old[lost]) + counted(vv[won], new[won])
                obj = objective(p2, t2)
                if obj > best + 1e-7 and (pick is None or obj > pick[0]):
                    pick = (obj, d, new, p2, t2)
            if pick is not None:
                best, d, new, pred_n, true_n = pick
                shift[c] += d
                cur[sel] = new
                changed = True
        if not changed:
            break
    return shift, start, best


def calibrate_head_biases(net: Any, heads: list[_ActiveHead], active: list[int], samples: list[Sample],
                          patch: tuple[int, ...], classes: list[int], *, log: Callable[[str], None],
                          bound: float = 3.0) -> dict[str, Any]:
    """Fit the output layer's bias of background and ``classes`` (TotalSegmentator ids; every active class
    when empty) on the training volumes and add the shifts to ``net``'s last segmentation layer.

    The network runs in float32 (sliding window, step 0.8, nnU-Net order, as at inference) over every sample;
    a constant added to a class's logits passes unchanged through the Gaussian averaging, so the fit
    (:func:`fit_class_biases`, on the loss-masked voxels) predicts exactly what the shifted network does.
    Returns the record the model card states (shifts by class name, objective before and after)."""
    import torch

    from .classes import TOTAL_CLASSES

    to_index = np.full(256, -1, dtype=np.int64)
    to_index[active] = np.arange(len(active))
    volumes = []
    t0 = time.perf_counter()
    for i, (smp, logits) in enumerate(_volume_logits(net, heads, len(active), samples, patch, bf16=False)):
        ref = to_index[smp.labels]
        if smp.mask is None:  # every voxel: a view, not a copy of the logits
            volumes.append(calibration_volume(logits.reshape(len(active), -1), ref.ravel(), bound=bound))
        else:
            volumes.append(calibration_volume(logits[:, smp.mask], ref[smp.mask], bound=bound))
        del logits
        log(f"calibration logits {smp.name} ({i + 1}/{len(samples)}) in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
    free = [0] + [int(to_index[k]) for k in (classes or active[1:]) if k > 0 and to_index[k] >= 0]
    shift, before, after = fit_class_biases(volumes, free, bound=bound)
    with torch.no_grad():
        conv = net.decoder.seg_layers[-1]
        conv.bias[torch.tensor(active)] += torch.tensor(shift, dtype=conv.bias.dtype)
    shifts = {TOTAL_CLASSES.get(active[i], "background"): round(float(shift[i]), 3) for i in free if shift[i]}
    log(f"head-bias calibration: mean training Dice {before:.4f} -> {after:.4f}; shifts "
        + ", ".join(f"{n} {v:+g}" for n, v in shifts.items()))
    return {"classes": [TOTAL_CLASSES.get(active[i], "background") for i in free], "shifts": shifts,
            "objective_before": round(before, 5), "objective_after": round(after, 5), "volumes": len(volumes),
            "bound": bound}


def select_hard_voxels(mined: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                       classes: list[int]) -> dict[str, np.ndarray]:
    """Voxel indices ((n, 3), the volumes' axis order) of :func:`mine_hard_voxels` rows, restricted to errors
    that name one of ``classes`` or lie where the reference has one (all rows when ``classes`` is empty);
    volumes left without any are dropped."""
    out = {}
    for name, rows in mined.items():
        if classes:
            keep = np.isin(rows[:, 3], classes) | np.isin(labels[name][tuple(rows[:, :3].T)], classes)
            rows = rows[keep]
        if len(rows):
            out[name] = np.ascontiguousarray(rows[:, :3])
    return out


def _cached_mining(init_from: Path, work: Path, samples: list[Sample], log: Callable[[str], None],
                   mine: Callable[[], dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], float | None]:
    """``mine()``, cached in the work folder, keyed by the starting weights' bytes and the training volumes (a
    resumed run does not mine again); also the seconds the mining took (None when unknown)."""
    import hashlib

    from .folder import CHECKPOINT_NAME

    h = hashlib.sha256(b"rows: z, y, x, named class\n")
    h.update((init_from / "fold_0" / CHECKPOINT_NAME).read_bytes())
    h.update(json.dumps([(smp.name, smp.image.shape) for smp in samples]).encode())

    def load(path: Path) -> dict[str, np.ndarray]:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    def save(mined: dict[str, np.ndarray], fh: Any) -> None:
        np.savez(fh, **cast(dict[str, Any], mined))  # (names are sample names, never savez's own keywords)

    mined, seconds, made = _timed_cache(work / f"hard-{h.hexdigest()[:16]}.npz", "hard examples", log, mine,
                                        load, save)
    if made:
        log(f"mined in {seconds:.0f} s")
    return mined, seconds


def _timed_cache(path: Path, what: str, log: Callable[[str], None], make: Callable[[], Any],
                 load: Callable[[Path], Any], save: Callable[[Any, Any], None]) -> tuple[Any, float | None, bool]:
    """``make()`` cached at ``path`` (written atomically by ``save(value, binary file)``, read by ``load``),
    with the seconds it took in a ``.seconds`` file beside it: ``(value, seconds or None when unknown, made
    now)``. A cache hit reports the time the making took, not the time the reading took."""
    seconds_path = path.with_suffix(".seconds")
    if path.is_file():
        log(f"{what} from cache {path}")
        value = load(path)
        return value, float(seconds_path.read_text()) if seconds_path.is_file() else None, False
    t0 = time.perf_counter()
    value = make()
    seconds = time.perf_counter() - t0
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        save(value, fh)
    write_text_atomic(seconds_path, f"{seconds:.1f}")
    return value, seconds, True


def _cached_data(cfg: TrainConfig, ct_dir: Path, work: Path, log: Callable[[str], None],
                 intensity: dict[str, float] | None = None) -> tuple[list[Sample], dict[str, float], float | None]:
    """:func:`prepare_data`, cached in the work folder (keyed by everything that determines the data); also the
    seconds the data took to make (None when unknown)."""
    import hashlib
    import pickle

    from ..phantom import ANATOMY_VERSION

    key = json.dumps({"anatomy": ANATOMY_VERSION, "n": cfg.n_phantoms, "seed0": cfg.phantom_seed0,
                      "spacings": list(cfg.extra_spacings), "seed": cfg.seed, "ct_dir": str(ct_dir.resolve()),
                      **({"intensity": intensity} if intensity is not None else {})}, sort_keys=True)

    def load(path: Path) -> Any:
        with open(path, "rb") as fh:
            return pickle.load(fh)

    data, seconds, _ = _timed_cache(work / f"data-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pkl",
                                    "training data", log, lambda: prepare_data(cfg, ct_dir, log, intensity), load,
                                    lambda value, fh: pickle.dump(value, fh, protocol=4))
    return data[0], data[1], seconds


def _bf16_ok(torch: Any) -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and bool(
            getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    except Exception:  # noqa: BLE001
        return False


def _lr(cfg: TrainConfig, step: int) -> float:
    if cfg.optimizer == "sgd":  # nnU-Net's polynomial decay
        return cfg.lr * (1.0 - step / cfg.steps) ** 0.9
    if step < cfg.warmup:
        return cfg.lr * (0.1 + 0.9 * step / max(1, cfg.warmup))
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * t)))


# ------------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------------
def dice_per_class(pred: np.ndarray, ref: np.ndarray, classes: list[int] | None = None) -> dict[int, float]:
    """Dice (0..1) per class id present in ``ref`` (or ``classes``; 1.0 for one absent from both maps);
    arrays on the same grid. :func:`ctpassport.bench.metrics.dice_per_class` restricted to those ids."""
    from ..bench.metrics import dice_per_class as dice_either

    d = dice_either(pred, ref)
    ids = classes if classes is not None else [int(k) for k in np.unique(ref) if k > 0]
    return {int(k): d.get(int(k), 1.0) for k in ids}


def grouped_dice(pred: np.ndarray, ref: np.ndarray, names: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """Dice of unions of classes (e.g. all lobes of a lung), by group name."""
    from .classes import NAME_TO_ID

    out = {}
    for g, members in names.items():
        ids = [NAME_TO_ID[m] for m in members]
        a, b = np.isin(pred, ids), np.isin(ref, ids)
        denom = int(a.sum()) + int(b.sum())
        out[g] = 1.0 if denom == 0 else 2.0 * int((a & b).sum()) / denom
    return out


def evaluate_demo(model_dir: str | Path, *, ct_dir: str | Path,
                  phantom_seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5), train_seed: int = 1000,
                  cache_dir: str | Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Dice per class of the model (run by ctpassport's ONNX :class:`~ctpassport.segment.pipeline.Segmenter`) on:
    held-out phantom seeds, one training phantom, ``example_ct_sm`` vs ``example_seg_fast`` and the same
    slices inside the full ``example_ct``. Returns ``{source: {"mean_dice", "per_class", "large_organs"}}``."""
    from ..config import Config
    from ..io.nifti import Image3D, read_image
    from ..phantom import make_scan
    from ..segment.pipeline import Segmenter
    from .classes import TOTAL_CLASSES

    cfg = Config.from_env(cache_dir=Path(cache_dir) if cache_dir else None)
    seg = Segmenter(model_dir, config=cfg)
    ct_dir = Path(ct_dir)
    results: dict[str, Any] = {}

    def summarise(name: str, pred: np.ndarray, ref: np.ndarray, seconds: float) -> None:
        per = dice_per_class(pred, ref)
        lungs = grouped_dice(pred, ref, LUNG_GROUPS)
        named = {TOTAL_CLASSES[k]: round(v, 4) for k, v in per.items()}
        large = {n: round(named[n], 4) if n in named else round(lungs[n], 4) for n in LARGE_ORGANS
                 if n in named or (n in lungs and any(m in named for m in LUNG_GROUPS[n]))}
        results[name] = {"mean_dice": round(float(np.mean(list(per.values()))), 4) if per else None,
                         "n_classes": len(per), "large_organs": large, "per_class": named,
                         "seconds": round(seconds, 2)}
        log(f"{name}: mean Dice {results[name]['mean_dice']} over {len(per)} classes; large organs {large}")

    for seed in (*phantom_seeds, train_seed):
        scan = make_scan(seed)
        t0 = time.perf_counter()
        res = seg.segment(Image3D(data=scan.ct, affine=scan.affine, header=None))  # type: ignore[arg-type]
        kind = "train" if seed == train_seed else "heldout"
        summarise(f"phantom_{kind}_seed{seed}", res.labels, scan.labels, time.perf_counter() - t0)
    sm = read_image(ct_dir / "example_ct_sm.nii.gz", kind="CT")
    ref = np.asarray(read_image(ct_dir / "example_seg_fast.nii.gz").data)
    t0 = time.perf_counter()
    res = seg.segment(sm)
    summarise("example_ct_sm", res.labels, ref, time.perf_counter() - t0)
    full = read_image(ct_dir / "example_ct.nii.gz", kind="CT")
    t0 = time.perf_counter()
    res = seg.segment(full)
    off = int(np.rint(np.linalg.solve(full.affine[:3, :3], sm.affine[:3, 3] - full.affine[:3, 3])[2]))
    summarise("example_ct_slab", res.labels[:, :, off: off + ref.shape[2]], ref, time.perf_counter() - t0)
    results["model_id"] = seg.model.model_id
    return results


def _csv(v: Any) -> str:
    return ",".join(str(int(x)) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))


def _crop_text(cfg: dict[str, Any]) -> str:
    final = "x".join(str(int(x)) for x in (cfg["crop"] if isinstance(cfg["crop"], (list, tuple)) else [cfg["crop"]] * 3))
    start = cfg.get("crop_start")
    if start and cfg.get("crop_switch"):
        first = "x".join(str(int(x)) for x in (start if isinstance(start, (list, tuple)) else [start] * 3))
        return f"{first} for the first {cfg['crop_switch']:.0%} of the steps, then {final}"
    return final


def _ce_text(cfg: dict[str, Any]) -> str:
    power = float(cfg.get("ce_class_power", 0.0))
    return f"cross-entropy class weights ~ voxel count ^ -{power:g}" if power > 0 else "unweighted cross-entropy"


def _csv_focus(cfg: dict[str, Any]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in cfg.get("class_focus", {}).items())


def _focus_text(cfg: dict[str, Any]) -> str:
    focus = cfg.get("class_focus") or {}
    return " (odds " + ", ".join(f"{k} x{v:g}" for k, v in focus.items()) + ")" if focus else ""


def _check_class_names(option: str, names: Any) -> None:
    """A :class:`~ctpassport.errors.ConfigError` naming ``option`` if any of ``names`` is not a TotalSegmentator class name."""
    from .classes import NAME_TO_ID

    unknown = sorted(set(names) - set(NAME_TO_ID))
    if unknown:
        raise ConfigError(f"{option} names unknown classes: {', '.join(unknown)} (use TotalSegmentator class names)")


def _mine_text(seconds: dict[str, float]) -> str:
    return f" hard-example mining {seconds['mine'] / 60:.1f} min," if "mine" in seconds else ""


def _normalisation_text(props: dict[str, float], inherited: bool) -> str:
    """The card's line on the network's input normalisation (nnU-Net's CT scheme, plans.json)."""
    return (f"* Input normalisation (nnU-Net CT, `plans.json`): HU clipped to [{props['percentile_00_5']:g},"
            f" {props['percentile_99_5']:g}] (0.5 / 99.5 percentiles of labelled voxels), minus {props['mean']:.1f},"
            f" over {props['std']:.1f}; "
            + ("kept from the weights this stage started from." if inherited else
               "measured on this stage's training data."))


def _calibration_text(cal: dict[str, Any], steps: int) -> str:
    shifts = ", ".join(f"{n} {v:+g}" for n, v in sorted(cal["shifts"].items(), key=lambda kv: -abs(kv[1])))
    return (f"* Head-bias calibration{' after the steps' if steps else ''}: the output layer's bias of background and"
            f" {len(cal['classes']) - 1} classes shifted (each within +-{cal['bound']:g}) to maximise the mean"
            f" Dice of the network's own predictions on the {cal['volumes']} training volumes (float32 sliding"
            f" window as at inference; coordinate ascent); that mean Dice {cal['objective_before']:.4f} ->"
            f" {cal['objective_after']:.4f}. No held-out volume was used. Shifts: {shifts or 'none'}.")


def _calibrate_option(cfg: dict[str, Any]) -> str:
    if not cfg.get("calibrate"):
        return ""
    return " --calibrate " + (",".join(cfg.get("calibrate_classes") or []) or "all")


def _hard_text(cfg: dict[str, Any]) -> str:
    frac = float(cfg.get("hard_negatives", 0.0))
    which = cfg.get("hard_classes") or []
    limited = f", errors naming or missing {', '.join(which)}" if which else ""
    return (f"; {frac:.0%} of the crops centred on voxels the starting weights got grossly wrong (hard-example"
            f" mining{limited})" if frac > 0 else "")


def _source_text(cfg: dict[str, Any]) -> str:
    sw = cfg["source_weights"]
    return ",".join(f"{sw[k]:g}" for k in ("phantom", "example_ct_sm", "example_ct"))


def _optimizer_text(cfg: dict[str, Any]) -> str:
    head = f", segmentation layers x{cfg.get('head_lr_mult', 1.0):g}"
    if cfg.get("optimizer", "adamw") == "sgd":
        return (f"SGD (Nesterov, momentum 0.99, lr {cfg['lr']}{head}, polynomial decay, weight decay"
                f" {cfg['weight_decay']})")
    return f"AdamW (lr {cfg['lr']}{head}, warm-up {cfg['warmup']}, cosine decay, weight decay {cfg['weight_decay']})"


def write_model_card(model_dir: str | Path, evaluation: dict[str, Any]) -> Path:
    """Write ``MODEL_CARD.md`` beside the demo model from its training record and an evaluation."""
    from .classes import TOTAL_CLASSES

    d = Path(model_dir)
    train = json.loads((d / "training.json").read_text(encoding="utf-8"))
    cfg = train["config"]
    active = [k for k in train["active_classes"] if k > 0]
    lines = [
        "# ctpassport demo model (TotalSegmentator fast topology, narrow)",
        "",
        "**A demonstration model. It was trained on synthetic phantoms and on one real CT slab; it does not",
        "generalise to other patients and must not be used for any clinical or research measurement.**",
        "Its purpose: let `ctpassport demo` and the parity/benchmark work run end to end with a trained model",
        "on machines without TotalSegmentator's real weights.",
        "",
        "## Network",
        "nnU-Net `PlainConvUNet` exactly as in TotalSegmentator's fast model plans (5 stages, 3x3x3 kernels,",
        "strides 1-2-2-2-2, 2 convolutions per stage, InstanceNorm, LeakyReLU, 118 outputs, patch 112x112x128,",
        f"3 mm spacing, CT normalisation) but with features {[min(DEMO_BASE_FEATURES * 2 ** i, DEMO_MAX_FEATURES) for i in range(5)]}.",
        "Folder layout: nnU-Net trainer folder (`plans.json`, `dataset.json`, `fold_0/checkpoint_final.pth`) plus",
        "`fold_0/checkpoint_final.onnx` (ctpassport's checked export). TotalSegmentator 2.18 runs it from a home",
        "made by `ctpassport.model.demo.make_demo_home`.",
        "",
        "## Training data",
        (f"* {cfg['n_phantoms']} phantoms (`ctpassport phantom`, seeds {cfg['phantom_seed0']}.."
         f"{cfg['phantom_seed0'] + cfg['n_phantoms'] - 1}; most at 3 mm RAS, others at {', '.join(cfg['extra_spacings'])}"
         " mm resampled by the pipeline; held-out seeds for evaluation are below 1000)."),
        "* `example_ct_sm` with `example_seg_fast` (the real fast model's labels, 40 classes) and the full",
        "  `example_ct` with the loss only on the slices those labels cover (TotalSegmentator's Apache-2.0 test data).",
        (f"* Random crops of {_crop_text(cfg)} voxels (z, y, x; 3 mm); batch {cfg['batch']}; source weights"
         f" {cfg['source_weights']}; crop centres by class with power {cfg.get('class_power', 0.0):g}"
         f"{_focus_text(cfg)}{_hard_text(cfg)}; {_ce_text(cfg)};"),
        "  rotation +-10 deg in-plane / +-4 deg out of plane, scaling 0.9-1.12, intensity scale/shift, noise, blur.",
        (f"* {cfg['steps']} steps of {_optimizer_text(cfg)}, cross-entropy + soft Dice"
         f"{' with deep supervision (1, 1/2, 1/4, 1/8 resolution)' if cfg.get('deep_supervision') else ''},"
         f" head biases started at the log class frequencies: {bool(cfg.get('prior_bias'))}, bf16 autocast:"
         f" {train['bf16']}, {train['threads']} CPU threads, torch {train['torch']}, seed {cfg['seed']}."
         if cfg["steps"] else
         f"* No optimiser steps in this stage: the earlier stage's weights, calibrated (next line); {train['threads']}"
         f" CPU threads, torch {train['torch']}."),
        *([_calibration_text(train["calibration"], cfg["steps"])] if train.get("calibration") else []),
        _normalisation_text(train["intensity"], bool(cfg.get("init_from"))),
        (f"* Time: data {train['seconds']['data'] / 60:.1f} min,{_mine_text(train['seconds'])} training"
         f" {train['seconds']['train'] / 60:.1f} min"
         f"{', calibration ' + format(train['seconds']['calibrate'] / 60, '.1f') + ' min' if 'calibrate' in train['seconds'] else ''}"
         " (on a shared 2-core CPU)."),
        (f"* Reproduce: `ctpassport model train-demo --steps {cfg['steps']} --crop {_csv(cfg['crop'])}"
         f"{' --crop-start ' + _csv(cfg['crop_start']) + ' --crop-switch ' + str(cfg['crop_switch']) if cfg.get('crop_start') else ''}"
         f" --optimizer {cfg.get('optimizer', 'adamw')}"
         f" --lr {cfg['lr']} --head-lr-mult {cfg.get('head_lr_mult', 1.0):g} --class-power"
         f" {cfg.get('class_power', 0.0):g} --ce-class-power {cfg.get('ce_class_power', 0.0):g}"
         f" --source-weights {_source_text(cfg)}"
         f"{' --focus ' + _csv_focus(cfg) if cfg.get('class_focus') else ''}"
         f"{' --hard-negatives ' + format(cfg['hard_negatives'], 'g') if cfg.get('hard_negatives') else ''}"
         f"{' --hard-classes ' + ','.join(cfg['hard_classes']) if cfg.get('hard_classes') else ''}"
         f"{_calibrate_option(cfg)}"
         f" --phantoms {cfg['n_phantoms']}"
         f"{' --init-from STAGE_BEFORE' if cfg.get('init_from') else ''}"
         f" --seed {cfg['seed']} --threads {cfg['threads']} --force` (writes this folder; bit-identical only with the"
         " same torch build and thread count)."),
    ]
    prev = train.get("previous")
    stage = 1
    while prev:
        pc = prev["config"]
        done = (f"{pc['stopped_at']} steps (stopped early, of a {pc['steps']}-step schedule)" if pc.get("stopped_at")
                else f"{pc['steps']} steps")
        if prev.get("calibration"):
            done += (f" then head-bias calibration ({len(prev['calibration']['classes'])} biases; training mean Dice"
                     f" {prev['calibration']['objective_before']:.4f} -> {prev['calibration']['objective_after']:.4f})")
        lines.append(f"* Earlier stage (this one started from its weights): {done}, crops "
                     f"{_crop_text(pc)}, {_optimizer_text(pc)}, crop-centre class power {pc.get('class_power', 0.0):g}"
                     f"{_focus_text(pc)}{_hard_text(pc)},"
                     f" cross-entropy class-weight power {pc.get('ce_class_power', 0.0):g}, source weights"
                     f" {pc['source_weights']}, {pc['n_phantoms']} phantoms, seed {pc['seed']},"
                     f" training {prev['seconds']['train'] / 60:.1f} min.")
        prev = prev.get("previous")
        stage += 1
    if stage > 1:
        lines.append(f"* {stage} stages in all; reproduce them in order, each with `--init-from` the previous output.")
    lines += [
        "",
        f"It predicts {len(active)} classes (those in its training data); the other head rows are disabled",
        f"(weight 0, bias {INACTIVE_BIAS}).",
        "",
        "## Status against its goal",
        "",
        *_status_lines(evaluation),
        "",
        "## Dice per source (ctpassport ONNX pipeline)",
        "",
        "| source | what it is | mean Dice | classes |",
        "|---|---|---|---|",
    ]
    what = {"heldout": "held-out phantom (not trained on)", "train": "training phantom",
            "example_ct_sm": "trained on it: a pipeline oracle, not accuracy",
            "example_ct_slab": "same slices inside the full CT (trained on)"}
    srcs = [k for k in evaluation if isinstance(evaluation[k], dict)]
    for k in srcs:
        key = "heldout" if "heldout" in k else "train" if "train" in k else k
        lines.append(f"| {k} | {what.get(key, '')} | {evaluation[k]['mean_dice']} | {evaluation[k]['n_classes']} |")
    lines += ["", "### Large organs", "", "| source | " + " | ".join(LARGE_ORGANS) + " |",
              "|---|" + "---|" * len(LARGE_ORGANS)]
    for k in srcs:
        lo = evaluation[k]["large_organs"]
        lines.append(f"| {k} | " + " | ".join(str(lo.get(n, "-")) for n in LARGE_ORGANS) + " |")
    lines += ["", "### Every class", ""]
    for k in srcs:
        per = evaluation[k]["per_class"]
        lines.append(f"**{k}**: " + ", ".join(f"{n} {v:.3f}" for n, v in sorted(per.items(), key=lambda kv: -kv[1])))
        lines.append("")
    lines += ["Classes the model knows: " + ", ".join(TOTAL_CLASSES[k] for k in active), ""]
    path = d / "MODEL_CARD.md"
    write_text_atomic(path, "\n".join(lines))
    write_text_atomic(d / "evaluation.json", json.dumps(evaluation, indent=1))
    return path


def _status_lines(evaluation: dict[str, Any], bar: float = 0.9) -> list[str]:
    """The card's verdict: how many large organs reach ``bar`` on the held-out phantoms (issue 6's goal)."""
    held = {k: v for k, v in evaluation.items() if isinstance(v, dict) and "heldout" in k}
    if not held:
        return ["No held-out phantom was evaluated."]
    vals = [(k, n, float(d)) for k, v in held.items() for n, d in v["large_organs"].items()]
    ok = [x for x in vals if x[2] >= bar]
    worst = sorted(vals, key=lambda x: x[2])[:3]
    verdict = "met" if len(ok) == len(vals) else "**not met**"
    return [f"Goal: Dice >= {bar} for every large organ ({', '.join(LARGE_ORGANS)}) on held-out phantoms:",
            f"{verdict} ({len(ok)} of {len(vals)} organ/phantom pairs reach it; lowest: "
            + ", ".join(f"{n} {d:.3f} ({k})" for k, n, d in worst) + ").",
            "Where it is not met the model was trained too briefly (on a 2-core CPU, times above): its outputs",
            "are less confident than a fully trained model's, so small structures flip between near-tied classes.",
            "Continue training with `ctpassport model train-demo --init-from <this folder> -o NEW_FOLDER` to improve "
            "it (without `-o` the output is this folder itself, which is refused unless `--force` replaces it)."]


def check_trained_folder(path: Path) -> None:
    """Raise :class:`ModelError` unless ``path`` holds a trained demo model folder."""
    for rel in ("plans.json", "dataset.json", "fold_0/checkpoint_final.pth"):
        if not (path / rel).is_file():
            raise ModelError(f"demo model lacks {rel}", path, "run `ctpassport model train-demo`")
