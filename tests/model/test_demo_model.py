"""The embedded demo model: an nnU-Net folder with the fast topology, its Dice, and TotalSegmentator parity.

The model is shipped in ``src/ctpassport/model/demo`` (trained by ``ctpassport model train-demo``; these tests
never retrain it). Bars (issue 6): Dice >= 0.9 for the large organs on a held-out phantom seed (training used
seeds 1000+); on ``example_ct_sm`` vs ``example_seg_fast`` the figure is the one stated in the model card
(it trained on that slab: a pipeline oracle, not a claim of accuracy); ctpassport and TotalSegmentator 2.18
running the same demo model agree with mean Dice >= 0.995.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctpassport.bench.metrics import agreement
from ctpassport.config import Config
from ctpassport.io.nifti import Image3D, read_image
from ctpassport.model.classes import NAME_TO_ID, TOTAL_CLASSES
from ctpassport.model.demo import DEMO_DIR, demo_model_dir, make_demo_home
from ctpassport.model.folder import load_model_folder
from ctpassport.model.train import LARGE_ORGANS, LUNG_GROUPS, dice_per_class, grouped_dice
from ctpassport.phantom import make_scan

HELDOUT_SEED = 0
LARGE_ORGAN_DICE = 0.9
PARITY_MEAN_DICE = 0.995
#: Held-out Dice the shipped model reaches (measured, MODEL_CARD.md); the issue's bar is LARGE_ORGAN_DICE.
SHIPPED_FLOORS = {"lung_left": 0.96, "lung_right": 0.96, "liver": 0.92, "heart": 0.93, "stomach": 0.92,
                  "kidney_left": 0.92, "kidney_right": 0.93, "spleen": 0.9, "urinary_bladder": 0.92}


@pytest.fixture(scope="module")
def demo_segmenter(onnx_cache: Path):  # type: ignore[no-untyped-def]
    from ctpassport.segment.pipeline import Segmenter

    return Segmenter(demo_model_dir(), config=Config.from_env(cache_dir=onnx_cache))


@pytest.fixture(scope="module")
def evaluation() -> dict:
    return json.loads((DEMO_DIR / "evaluation.json").read_text())


def test_demo_folder_is_an_nnunet_fast_topology_model() -> None:
    m = load_model_folder(demo_model_dir())
    a = m.architecture
    assert a.short_name == "PlainConvUNet" and a.n_stages == 5
    assert a.features_per_stage == (8, 16, 32, 64, 80)
    assert a.strides == ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    assert m.num_channels_out == 118 and m.patch_size == (112, 112, 128) and m.spacing == (3.0, 3.0, 3.0)
    assert m.image_reader_writer == "SimpleITKIO" and m.normalization == "CTNormalization"
    pth, onnx_path = m.checkpoint, m.checkpoint.with_suffix(".onnx")
    assert pth.stat().st_size < 8e6 and onnx_path.stat().st_size < 8e6  # "a few MB"
    from ctpassport.model.export import onnx_metadata

    # the shipped ONNX belongs to this checkpoint, so no export (and no torch) is needed to run it
    assert onnx_metadata(onnx_path)["checkpoint_sha256"] == m.checkpoint_sha256
    card = (DEMO_DIR / "MODEL_CARD.md").read_text()
    assert "does not" in card and "generalise" in card and "example_ct_sm" in card and "held-out" in card


def test_the_pipeline_uses_the_shipped_onnx(demo_segmenter) -> None:  # type: ignore[no-untyped-def]
    assert demo_segmenter.onnx_path == demo_segmenter.model.checkpoint.with_suffix(".onnx")


def _large_organ_dice(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    per = dice_per_class(pred, ref, [NAME_TO_ID[n] for n in LARGE_ORGANS if n in NAME_TO_ID])
    lungs = grouped_dice(pred, ref, LUNG_GROUPS)
    return {n: (lungs[n] if n in lungs else per[NAME_TO_ID[n]]) for n in LARGE_ORGANS}


@pytest.fixture(scope="module")
def heldout_large(demo_segmenter) -> dict[str, float]:  # type: ignore[no-untyped-def]
    scan = make_scan(HELDOUT_SEED)
    res = demo_segmenter.segment(Image3D(scan.ct, scan.affine, nib.Nifti1Header()))
    got = _large_organ_dice(res.labels, scan.labels)
    print(json.dumps({k: round(v, 4) for k, v in got.items()}))
    return got


def test_heldout_phantom_figures_are_the_stated_ones(heldout_large: dict[str, float], evaluation: dict) -> None:
    """The model card's held-out figures are what the shipped model gives (any backend: tolerance 0.03)."""
    stated = evaluation[f"phantom_heldout_seed{HELDOUT_SEED}"]["large_organs"]
    for name, value in heldout_large.items():
        assert value == pytest.approx(stated[name], abs=0.03), name
    # what the shipped model does reach on the held-out phantom (a regression guard, below the issue's bar)
    for name, floor in SHIPPED_FLOORS.items():
        assert heldout_large[name] >= floor, (name, heldout_large[name])


def test_heldout_phantom_large_organs_issue_bar(heldout_large: dict[str, float]) -> None:
    """Issue 6's bar on held-out seed 0 (met since the head-bias calibration; over held-out seeds 0-5 the card
    states 39 of the 54 organ/phantom pairs: spleen, kidneys, stomach and bladder stay below 0.9 on some)."""
    low = {k: round(v, 3) for k, v in heldout_large.items() if v < LARGE_ORGAN_DICE}
    assert not low, f"large organs below Dice {LARGE_ORGAN_DICE} on held-out phantom {HELDOUT_SEED}: {low}"


def test_heldout_phantom_lps_resampled(demo_segmenter, heldout_large: dict[str, float]) -> None:  # type: ignore[no-untyped-def]
    """The resampling and reorientation path: the same held-out anatomy rendered at 2.5 x 2.5 x 2 mm, LPS, goes
    through the pipeline and back onto its own grid; organs the model finds at 3 mm RAS it finds here too."""
    scan = make_scan(HELDOUT_SEED, spacing=(2.5, 2.5, 2.0), orientation="LPS")
    res = demo_segmenter.segment(Image3D(scan.ct, scan.affine, nib.Nifti1Header()))
    assert res.labels.shape == scan.labels.shape
    got = _large_organ_dice(res.labels, scan.labels)
    print(json.dumps({k: round(v, 4) for k, v in got.items()}))
    for name, ras in heldout_large.items():
        if ras >= 0.5:
            assert got[name] >= ras - 0.1, (name, got[name], ras)


def test_example_ct_sm_figure_is_the_stated_one(demo_segmenter, ct_dir: Path, evaluation: dict) -> None:  # type: ignore[no-untyped-def]
    sm = read_image(ct_dir / "example_ct_sm.nii.gz")
    ref = np.asarray(read_image(ct_dir / "example_seg_fast.nii.gz").data)
    res = demo_segmenter.segment(sm)
    mean = float(np.mean(list(dice_per_class(res.labels, ref).values())))
    stated = evaluation["example_ct_sm"]["mean_dice"]
    print(json.dumps({"example_ct_sm_mean_dice": round(mean, 4), "stated": stated}))
    assert mean == pytest.approx(stated, abs=0.005)
    # it trained on this slab: a pipeline oracle (orientation, normalisation, padding); a broken pipeline gives ~0
    assert mean > 0.45
    card = (DEMO_DIR / "MODEL_CARD.md").read_text()
    assert str(stated) in card


def test_make_demo_home_layout(tmp_path: Path) -> None:
    from ctpassport.model.folder import locate_model

    trainer = make_demo_home(tmp_path / "home")
    assert locate_model(environ={"TOTALSEG_HOME_DIR": str(tmp_path / "home")}) == trainer
    assert load_model_folder(trainer).checkpoint_sha256 == load_model_folder(demo_model_dir()).checkpoint_sha256
    assert json.loads((tmp_path / "home" / "config.json").read_text())["send_usage_stats"] is False


def _run_totalsegmentator(inp: Path, out: Path, home: Path) -> None:
    pytest.importorskip("totalsegmentator")
    code = ("from totalsegmentator.python_api import totalsegmentator\n"
            f"totalsegmentator({str(inp)!r}, {str(out)!r}, fast=True, ml=True, device='cpu', quiet=True,"
            " nr_thr_resamp=1, nr_thr_saving=1)\n")
    env = dict(os.environ, TOTALSEG_HOME_DIR=str(home), PYTHONWARNINGS="ignore")
    env.pop("TOTALSEG_WEIGHTS_PATH", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.vanilla
@pytest.mark.torch
@pytest.mark.slow
def test_totalsegmentator_runs_the_demo_model_like_ctpassport(ct_dir: Path, onnx_cache: Path, tmp_path: Path) -> None:
    """TotalSegmentator 2.18 and ctpassport's exact fp32 path (ONNX Runtime) on the same demo model; the
    reduced-precision backends have their own bars in tests/segment/test_parity_backends.py."""
    from ctpassport.segment.pipeline import Segmenter

    exact = Segmenter(demo_model_dir(), backend="onnxruntime", config=Config.from_env(cache_dir=onnx_cache))
    home = tmp_path / "home"
    make_demo_home(home)
    from ctpassport.phantom import write_phantom

    phantom = tmp_path / "phantom_lps.nii.gz"
    write_phantom(phantom, seed=HELDOUT_SEED, spacing=(2.5, 2.5, 2.0), orientation="LPS")
    figures = {}
    for name, inp in (("phantom_lps_2.5mm", phantom), ("example_ct_sm", ct_dir / "example_ct_sm.nii.gz")):
        ts_out, our_out = tmp_path / f"{name}_ts.nii.gz", tmp_path / f"{name}_ours.nii.gz"
        _run_totalsegmentator(inp, ts_out, home)
        exact.segment_file(inp, our_out, ml=True)
        ts_img = nib.load(ts_out)
        ts, ours = np.asanyarray(ts_img.dataobj), np.asanyarray(nib.load(our_out).dataobj)
        assert ts.shape == ours.shape
        a = agreement(ours, ts, TOTAL_CLASSES, voxel_ml=float(np.prod(ts_img.header.get_zooms()[:3])) / 1000.0)
        figures[name] = {k: a[k] for k in ("mean_dice", "mean_dice_1ml", "organs_below_1ml", "voxel_agreement",
                                           "organs_reference", "organs_missing", "organs_extra")}
        figures[name]["min_dice"] = min(a["dice"].values())
    print(json.dumps(figures))
    for name, f in figures.items():
        assert f["mean_dice_1ml"] >= PARITY_MEAN_DICE, (name, f)


# ------------------------------------------------------------------------------------------------------
# the training code (small, fast checks; the model itself is never retrained here)
# ------------------------------------------------------------------------------------------------------
def test_sample_crop_targets_and_padding() -> None:
    from ctpassport.model.train import Sample, sample_crop

    img = np.random.default_rng(0).uniform(1.0, 2.0, (20, 30, 40)).astype(np.float32)
    lab = np.zeros((20, 30, 40), dtype=np.uint8)
    lab[5:15, 10:20, 10:30] = 7
    mask = np.zeros(lab.shape, dtype=bool)
    mask[:, :, 20:] = True
    s = Sample("t", "x", img, lab, mask, {7: np.argwhere(lab == 7)})
    rng = np.random.default_rng(1)
    for _ in range(4):
        x, t = sample_crop(s, rng, 32)
        assert x.shape == t.shape == (32, 32, 32) and x.dtype == np.float32 and t.dtype == np.int64
        assert set(np.unique(t)) <= {-100, 0, 7}
    # a crop centred on the volume's corner: beyond the volume the image is nnU-Net's padding (0) and there
    # is no loss; inside the volume but outside the loss mask the image is real and there is no loss
    x, t = sample_crop(s, rng, 32, augment=False, centre=np.array([0.0, 0.0, 20.0]))
    outside = np.zeros((32, 32, 32), dtype=bool)
    outside[:15], outside[:, :15] = True, True
    assert np.all(x[outside] == 0) and np.all(t[outside] == -100)
    inside = ~outside
    assert np.all(x[inside] >= 1.0)
    # crop column k samples volume z = 4.5 + k: columns < 15 lie before the mask (z < 20), columns > 15 in it
    assert np.all(t[:, :, :15][inside[:, :, :15]] == -100)
    assert np.all(t[:, :, 16:][inside[:, :, 16:]] >= 0)


def test_sample_crop_class_focus_shifts_crop_centres() -> None:
    """``class_focus`` multiplies a class's odds of centring a crop: two equal classes at opposite ends of a
    volume; with focus 9 on one, about 90 % of the class-centred crops hold it (1/2 without focus)."""
    from ctpassport.model.train import Sample, sample_crop

    lab = np.zeros((16, 16, 200), dtype=np.uint8)
    lab[4:12, 4:12, 2:10], lab[4:12, 4:12, 190:198] = 3, 5
    s = Sample("t", "x", np.ones(lab.shape, np.float32), lab, None,
               {k: np.argwhere(lab == k) for k in (3, 5)})

    def share_of_5(focus: dict[int, float] | None) -> float:
        rng = np.random.default_rng(0)
        hits = {3: 0, 5: 0}
        for _ in range(600):
            _, t = sample_crop(s, rng, 16, augment=False, class_counts={3: 512, 5: 512}, class_power=0.5,
                               class_focus=focus)
            for k in hits:
                hits[k] += int((t == k).any())
        return hits[5] / max(1, hits[3] + hits[5])

    assert share_of_5(None) == pytest.approx(0.5, abs=0.08)
    assert share_of_5({5: 9.0}) == pytest.approx(0.9, abs=0.05)


def test_train_demo_rejects_unknown_focus_class(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ctpassport.cli import app

    r = CliRunner().invoke(app, ["model", "train-demo", "-o", str(tmp_path / "m"), "--focus", "kidney_right"])
    assert r.exit_code != 0 and "NAME=FACTOR" in r.output
    r = CliRunner().invoke(app, ["model", "train-demo", "-o", str(tmp_path / "m"), "--focus", "kidney_middle=2"])
    assert r.exit_code != 0 and "unknown classes: kidney_middle" in r.output
    assert not (tmp_path / "m").exists()


@pytest.mark.torch
def test_loss_matches_one_hot_reference() -> None:
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from ctpassport.model.train import _loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 8, 8, 8, generator=g)
    target = torch.randint(0, 6, (2, 8, 8, 8), generator=g)
    target[0, :2] = -100
    _, ce, dl = _loss(logits, target, 6)
    assert float(ce) == pytest.approx(float(F.cross_entropy(logits, target, ignore_index=-100)), rel=1e-5)
    valid = target >= 0
    p = torch.softmax(logits, 1) * valid.unsqueeze(1)
    oh = F.one_hot(torch.where(valid, target, 0), 6).permute(0, 4, 1, 2, 3).float() * valid.unsqueeze(1)
    inter, den = (p * oh).sum((0, 2, 3, 4)), p.sum((0, 2, 3, 4)) + oh.sum((0, 2, 3, 4))
    present = oh.sum((0, 2, 3, 4)) > 0
    present[0] = False
    ref = 1 - ((2 * inter + 1e-5) / (den + 1e-5))[present].mean()
    assert float(dl) == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.torch
def test_active_head_forward_equals_network() -> None:
    torch = pytest.importorskip("torch")
    from ctpassport.model.folder import FAST_CONFIGURATION, parse_architecture
    from ctpassport.model.network import build_network
    from ctpassport.model.standin import FAST_INTENSITY
    from ctpassport.model.train import _ActiveHead, _forward_active, demo_plans

    plans = demo_plans(FAST_INTENSITY)
    net = build_network(parse_architecture(plans["configurations"][FAST_CONFIGURATION], Path("p")), 1, 118).eval()
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    active = [0, 1, 5, 52, 117]
    with torch.no_grad():
        full = net(x)
        part = _forward_active(net, x, [_ActiveHead(net.decoder.seg_layers[-1], active)])[-1]
        net.decoder.deep_supervision = True
        ds = net(x)  # nnU-Net's deep-supervision outputs, full resolution first
        net.decoder.deep_supervision = False
        mine = _forward_active(net, x, [_ActiveHead(layer, active) for layer in list(net.decoder.seg_layers)[-3:]])
    # Same function; the 1x1x1 conv over 5 rows instead of 118 may pick another kernel (float32 summation
    # order): equal to float32 rounding of the logits (|logit| <= ~10 here), not bit for bit.
    torch.testing.assert_close(part, full[:, active], rtol=0, atol=1e-5)
    assert [tuple(o.shape[2:]) for o in mine] == [(8, 8, 8), (16, 16, 16), (32, 32, 32)]
    for mine_out, theirs in zip(mine[::-1], ds[:3]):
        torch.testing.assert_close(mine_out, theirs[:, active], rtol=0, atol=1e-5)


def test_gross_errors_ignore_boundary_slips_and_keep_false_organs() -> None:
    """A ball predicted one voxel off along x (boundary slips: not gross), a false blob of the ball's class
    8+ voxels from it (gross), a missed interior core 3+ voxels inside (gross: background named where the
    nearest background is farther than the margin), and a false blob outside the loss mask (ignored)."""
    from ctpassport.model.train import gross_errors

    zz, yy, xx = np.indices((30, 30, 40))
    labels = (((zz - 15) ** 2 + (yy - 15) ** 2 + (xx - 12) ** 2) <= 64).astype(np.uint8) * 4
    pred = np.roll(labels, 1, axis=2)
    pred[2:5, 2:5, 30:33] = 4  # false organ: far from every labelled 4
    pred[14:17, 14:17, 12:15] = 0  # missed core: background 5+ voxels away from any labelled 0
    pred[25:28, 25:28, 35:38] = 4  # would be gross, but outside the mask
    mask = np.ones(labels.shape, dtype=bool)
    mask[:, :, 34:] = False
    got = {tuple(v) for v in gross_errors(pred, labels, mask, margin=2)}
    expected = {(z, y, x) for z in range(2, 5) for y in range(2, 5) for x in range(30, 33)}
    expected |= {(z, y, x) for z in range(14, 17) for y in range(14, 17) for x in range(12, 15)}
    assert got == expected
    assert len(gross_errors(pred, labels, mask, margin=20)) == 0  # every error within 20 voxels of its class


def test_sample_crop_hard_centres() -> None:
    """``hard`` voxels centre the crops they are drawn for (within size / 8), and without ``hard`` the crops
    are those of the same seed before the option existed (no extra random draw)."""
    from ctpassport.model.train import Sample, sample_crop

    ramp = np.broadcast_to(np.arange(200, dtype=np.float32), (16, 16, 200)).copy()  # image value = x index
    lab = np.zeros(ramp.shape, dtype=np.uint8)
    lab[4:12, 4:12, 2:10] = 3
    s = Sample("t", "x", ramp, lab, None, {3: np.argwhere(lab == 3)})
    hard = np.array([[8, 8, 150]])
    rng = np.random.default_rng(0)
    centres = [sample_crop(s, rng, 16, augment=False, hard=hard, hard_fraction=1.0)[0][8, 8, 8] for _ in range(50)]
    assert np.all(np.abs(np.asarray(centres) - 150.5) <= 16 / 8 + 0.5)
    a = sample_crop(s, np.random.default_rng(3), 16, class_power=0.5, class_counts={3: 512})
    b = sample_crop(s, np.random.default_rng(3), 16, class_power=0.5, class_counts={3: 512}, hard=None,
                    hard_fraction=0.5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.torch
def test_mine_hard_voxels_maps_active_classes_back() -> None:
    """Mining runs the network over a volume the size of one patch (one tile: the sliding window's argmax is
    the plain forward's) and returns the gross errors of its labels in TotalSegmentator class ids."""
    torch = pytest.importorskip("torch")
    from ctpassport.model.folder import FAST_CONFIGURATION, parse_architecture
    from ctpassport.model.network import build_network
    from ctpassport.model.standin import FAST_INTENSITY
    from ctpassport.model.train import Sample, _ActiveHead, demo_plans, gross_errors, mine_hard_voxels

    plans = demo_plans(FAST_INTENSITY)
    patch = tuple(int(v) for v in plans["configurations"][FAST_CONFIGURATION]["patch_size"])
    torch.manual_seed(0)
    net = build_network(parse_architecture(plans["configurations"][FAST_CONFIGURATION], Path("p")), 1, 118)
    active = [0, 5, 52, 117]
    heads = [_ActiveHead(net.decoder.seg_layers[-1], active)]
    img = np.random.default_rng(0).normal(0, 1, patch).astype(np.float32)
    lab = np.zeros(patch, dtype=np.uint8)
    lab[20:60, 20:60, 20:60] = 52
    smp = Sample("s", "x", img, lab, None)
    logs: list[str] = []
    mined = mine_hard_voxels(net, heads, active, [smp], patch, bf16=False, log=logs.append)
    assert net.training  # left as found
    with torch.no_grad():
        full = net.eval()(torch.from_numpy(img[None, None]))[0, active].numpy()
    pred = np.asarray(active, dtype=np.uint8)[np.argmax(full, axis=0)]
    ref = gross_errors(pred, lab)
    assert len(ref) > 0 and np.array_equal(mined["s"][:, :3], ref)
    assert np.array_equal(mined["s"][:, 3], pred[tuple(ref.T)])
    assert "grossly wrong voxels in 1 of 1 volumes" in logs[-1]


def test_select_hard_voxels_by_class() -> None:
    from ctpassport.model.train import select_hard_voxels

    lab = np.zeros((4, 4, 4), dtype=np.uint8)
    lab[0, 0, 0], lab[1, 1, 1] = 1, 2  # reference: class 1 at (0,0,0), class 2 at (1,1,1)
    rows = np.array([[0, 0, 0, 5], [1, 1, 1, 0], [2, 2, 2, 1], [3, 3, 3, 7]], dtype=np.int32)  # (index, named)
    assert np.array_equal(select_hard_voxels({"a": rows}, {"a": lab}, [])["a"], rows[:, :3])
    # class 1: missed at (0,0,0) and named falsely at (2,2,2); class 2 missed at (1,1,1)
    assert np.array_equal(select_hard_voxels({"a": rows}, {"a": lab}, [1])["a"], rows[[0, 2], :3])
    assert np.array_equal(select_hard_voxels({"a": rows}, {"a": lab}, [2, 7])["a"], rows[[1, 3], :3])
    assert select_hard_voxels({"a": rows}, {"a": lab}, [9]) == {}


def test_hard_example_mining_is_cached_per_weights(tmp_path: Path) -> None:
    """A resumed run reuses the mined voxels (sample names as the training data writes them); other starting
    weights mine again."""
    from ctpassport.model.folder import CHECKPOINT_NAME
    from ctpassport.model.train import Sample, _cached_mining

    ck = tmp_path / "init" / "fold_0" / CHECKPOINT_NAME
    ck.parent.mkdir(parents=True)
    ck.write_bytes(b"weights 1")
    samples = [Sample(n, "phantom", np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), None)
               for n in ("phantom_1000@3.0", "phantom_1021@2.5,2.5,2.0:LPS")]
    calls: list[int] = []

    def mine() -> dict[str, np.ndarray]:
        calls.append(1)
        return {"phantom_1021@2.5,2.5,2.0:LPS": np.array([[1, 2, 3, 4]], dtype=np.int32)}

    first, t_first = _cached_mining(tmp_path / "init", tmp_path, samples, lambda m: None, mine)
    again, t_again = _cached_mining(tmp_path / "init", tmp_path, samples, lambda m: None, mine)
    assert len(calls) == 1 and again.keys() == first.keys()
    assert np.array_equal(again["phantom_1021@2.5,2.5,2.0:LPS"], [[1, 2, 3, 4]])
    # the cached run reports the time the mining took, not the time it took to read the cache
    assert t_first is not None and t_again == pytest.approx(t_first, abs=0.05)
    ck.write_bytes(b"weights 2")
    _cached_mining(tmp_path / "init", tmp_path, samples, lambda m: None, mine)
    assert len(calls) == 2


def test_hard_negatives_need_trained_weights(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from ctpassport.errors import ConfigError
    from ctpassport.model.train import TrainConfig, train_demo

    with pytest.raises(ConfigError, match="--init-from"):
        train_demo(tmp_path / "m", ct_dir=tmp_path, cfg=TrainConfig(hard_negatives=0.3), work_dir=tmp_path / "w")
    with pytest.raises(ConfigError, match="unknown classes: splen"):
        train_demo(tmp_path / "m", ct_dir=tmp_path, cfg=TrainConfig(hard_negatives=0.3, init_from="x",
                                                                    hard_classes=("splen",)), work_dir=tmp_path / "w")
    with pytest.raises(ConfigError, match="between 0 and 1"):
        train_demo(tmp_path / "m", ct_dir=tmp_path, cfg=TrainConfig(hard_negatives=1.5, init_from="x"),
                   work_dir=tmp_path / "w")


def test_train_config_rejects_crops_off_the_stride(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from ctpassport.errors import ConfigError
    from ctpassport.model.train import TrainConfig, train_demo

    with pytest.raises(ConfigError, match="multiples of 16"):
        train_demo(tmp_path / "m", ct_dir=tmp_path, cfg=TrainConfig(crop=(56, 112, 128)), work_dir=tmp_path / "w")


def test_train_demo_bad_option_values_exit_as_bad_settings(tmp_path: Path) -> None:
    """Option values the recipe refuses are bad settings (exit 5, as the README lists), not bad input files."""
    pytest.importorskip("torch")
    from typer.testing import CliRunner

    from ctpassport.cli import app

    for args, message in ((["--crop", "56,112,128"], "multiples of 16"),
                          (["--steps", "0"], "--calibrate and --init-from"),
                          (["--hard-negatives", "0.3"], "give --init-from")):
        r = CliRunner().invoke(app, ["model", "train-demo", "-o", str(tmp_path / "m"), "-q", *args])
        assert r.exit_code == 5, (args, r.output)
        assert message in r.stderr and "Traceback" not in r.output
        assert not (tmp_path / "m").exists()


def test_shipped_training_record(evaluation: dict) -> None:
    rec = json.loads((DEMO_DIR / "training.json").read_text())
    cfg = rec["config"]
    heldout = {int(k.rsplit("seed", 1)[1]) for k in evaluation if k.startswith("phantom_heldout_seed")}
    assert HELDOUT_SEED in heldout
    stage: dict | None = rec
    while stage is not None:  # no stage ever trained on a held-out phantom
        c = stage["config"]
        assert heldout.isdisjoint(range(c["phantom_seed0"], c["phantom_seed0"] + c["n_phantoms"])), c
        stage = stage.get("previous")
    if cfg["steps"] == 0:  # a calibration stage: no optimiser steps, only the output biases fitted
        cal = rec["calibration"]
        assert cfg["init_from"] and cfg["calibrate"] and not rec["history"]
        assert cal["objective_after"] > cal["objective_before"] and cal["shifts"]
        assert all(abs(v) <= cal["bound"] for v in cal["shifts"].values())
    else:
        losses = [h[1] for h in rec["history"]]
        tenth = max(1, len(losses) // 10)
        # the loss went down: by 10 % in a stage trained from scratch, at all in a further (fine-tuning) stage
        factor = 1.0 if cfg.get("init_from") else 0.9
        assert len(losses) > 10 and np.mean(losses[-tenth:]) < factor * np.mean(losses[:tenth])
    assert rec["intensity"]["std"] > 0
    for src in ("example_ct_sm", "example_ct_slab", f"phantom_heldout_seed{HELDOUT_SEED}"):
        assert evaluation[src]["mean_dice"] is not None


def test_model_card_is_written_from_the_training_record(tmp_path: Path, evaluation: dict) -> None:
    """The shipped card is what :func:`write_model_card` makes of the shipped record; a stage that mined hard
    examples states the mining time beside the data and training times."""
    import shutil

    from ctpassport.model.train import write_model_card

    d = tmp_path / "demo"
    d.mkdir()
    shutil.copy(DEMO_DIR / "training.json", d / "training.json")
    assert write_model_card(d, evaluation).read_text() == (DEMO_DIR / "MODEL_CARD.md").read_text()
    rec = json.loads((d / "training.json").read_text())
    rec["seconds"]["mine"] = 463.0
    (d / "training.json").write_text(json.dumps(rec))
    card = write_model_card(d, evaluation).read_text()
    assert "hard-example mining 7.7 min, training" in card
    # a calibration stage (no steps) says so, states its shifts and time, and its reproduce line carries them;
    # the stage after it names the calibration among the earlier stages
    rec["config"].update(steps=0, calibrate=True, calibrate_classes=["spleen", "liver"])
    rec["seconds"]["calibrate"] = 600.0
    rec["calibration"] = {"classes": ["background", "spleen", "liver"], "shifts": {"spleen": -1.5, "liver": 0.25},
                          "objective_before": 0.5, "objective_after": 0.52, "volumes": 26, "bound": 3.0}
    (d / "training.json").write_text(json.dumps(rec))
    card = write_model_card(d, evaluation).read_text()
    assert "No optimiser steps in this stage" in card and "0.5000 -> 0.5200" in card
    assert "Shifts: spleen -1.5, liver +0.25." in card and "calibration 10.0 min" in card
    assert "--steps 0 " in card and "--calibrate spleen,liver " in card
    later = {**rec, "config": {**rec["config"], "steps": 100, "calibrate": False}, "previous": rec}
    later.pop("calibration")
    (d / "training.json").write_text(json.dumps(later))
    assert "100 steps of" in (card := write_model_card(d, evaluation).read_text())
    assert "0 steps then head-bias calibration (3 biases; training mean Dice 0.5000 -> 0.5200)" in card


def _calibration_volumes(offset: float) -> tuple[list, np.ndarray]:
    """Two volumes of 3 classes whose logits favour class 1 by ``offset`` everywhere (an over-predicted class);
    the reference is the clean argmax of the logits without the offset."""
    from ctpassport.model.train import calibration_volume

    rng = np.random.default_rng(0)
    vols, refs = [], []
    for n in (4000, 6000):
        clean = rng.normal(0.0, 1.0, (3, n)).astype(np.float32)
        ref = np.argmax(clean, axis=0)
        biased = clean.copy()
        biased[1] += offset
        vols.append(calibration_volume(biased, ref, bound=3.0, k=3))
        refs.append(ref)
    return vols, np.concatenate(refs)


def test_fit_class_biases_undoes_a_known_offset() -> None:
    """A class whose logits are raised by 0.75 is over-predicted; the fitted shift brings it back (within the
    0.25 grid the coordinate ascent reaches) and the objective (mean Dice) rises to ~1."""
    from ctpassport.model.train import fit_class_biases

    vols, _ = _calibration_volumes(0.75)
    shift, before, after = fit_class_biases(vols, [0, 1, 2], bound=3.0)
    relative = shift[1] - (shift[0] + shift[2]) / 2  # only differences between classes change an argmax
    assert relative == pytest.approx(-0.75, abs=0.15)
    assert before < 0.9 and after > 0.97 and after > before
    # only the free classes move, within the bound
    shift, _, after_one = fit_class_biases(vols, [1], bound=0.5)
    assert shift[0] == shift[2] == 0.0 and -0.5 <= shift[1] < 0 and before < after_one <= after


def test_calibration_volume_keeps_certain_voxels_as_counts() -> None:
    from ctpassport.model.train import calibration_volume

    logits = np.array([[10.0, 0.0, 0.0, 1.0], [0.0, 10.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.9]], dtype=np.float32)
    ref = np.array([0, 2, 1, 2])
    v = calibration_volume(logits, ref, bound=1.0, k=2)
    assert v.counts.tolist() == [[1, 1, 2], [1, 1, 0], [1, 0, 0]]  # voxels 0 and 1 are certain (margin >= 2)
    assert v.reference.tolist() == [1, 2]
    assert v.classes.tolist() == [[1, 0], [0, 2]] and v.values[:, 0].tolist() == [0.5, 1.0]


def test_calibrate_head_biases_shifts_the_output_layer(tmp_path: Path) -> None:
    """The fitted shifts land in the last segmentation layer's bias of the active classes, and the network's
    new argmax is the one the fit predicted (a one-patch volume: the sliding window is the plain forward)."""
    torch = pytest.importorskip("torch")
    from ctpassport.model.folder import FAST_CONFIGURATION, parse_architecture
    from ctpassport.model.network import build_network
    from ctpassport.model.standin import FAST_INTENSITY
    from ctpassport.model.train import Sample, _ActiveHead, calibrate_head_biases, demo_plans

    plans = demo_plans(FAST_INTENSITY)
    patch = tuple(int(v) for v in plans["configurations"][FAST_CONFIGURATION]["patch_size"])
    torch.manual_seed(0)
    net = build_network(parse_architecture(plans["configurations"][FAST_CONFIGURATION], Path("p")), 1, 118)
    active = [0, 1, 5]
    heads = [_ActiveHead(net.decoder.seg_layers[-1], active)]
    img = np.random.default_rng(0).normal(0, 1, patch).astype(np.float32)
    lab = np.zeros(patch, dtype=np.uint8)
    lab[20:80, 20:80, 20:80] = 5
    lab[40:60, 40:60, 40:60] = 1
    before = net.decoder.seg_layers[-1].bias.detach().clone()
    logs: list[str] = []
    rec = calibrate_head_biases(net, heads, active, [Sample("s", "x", img, lab, None)], patch, [1, 5],
                                log=logs.append)
    after = net.decoder.seg_layers[-1].bias.detach()
    moved = (after - before).numpy()
    assert np.count_nonzero(moved[[k for k in range(118) if k not in active]]) == 0
    assert rec["objective_after"] >= rec["objective_before"] and rec["classes"] == ["background", "spleen", "liver"]
    assert rec["shifts"] == {n: pytest.approx(float(moved[k]), abs=1e-6) for n, k in
                             (("background", 0), ("spleen", 1), ("liver", 5)) if moved[k]}
    with torch.no_grad():
        out = net.eval()(torch.from_numpy(img[None, None]))[0, active].numpy()
    pred = np.asarray(active)[np.argmax(out, axis=0)]
    got = np.mean([2 * np.sum((pred == k) & (lab == k)) / (np.sum(pred == k) + np.sum(lab == k)) for k in active])
    assert got == pytest.approx(rec["objective_after"], abs=2e-3)
    assert "head-bias calibration" in logs[-1]


def test_a_stage_without_steps_needs_calibration_and_weights(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from ctpassport.errors import ConfigError
    from ctpassport.model.train import TrainConfig, train_demo

    with pytest.raises(ConfigError, match="--calibrate and --init-from"):
        train_demo(tmp_path / "m", ct_dir=tmp_path, cfg=TrainConfig(steps=0), work_dir=tmp_path / "w")
    with pytest.raises(ConfigError, match="--calibrate and --init-from"):
        train_demo(tmp_path / "m", ct_dir=tmp_path, cfg=TrainConfig(steps=0, calibrate=True), work_dir=tmp_path / "w")
    with pytest.raises(ConfigError, match="unknown classes: splen"):
        train_demo(tmp_path / "m", ct_dir=tmp_path, cfg=TrainConfig(calibrate=True, calibrate_classes=("splen",)),
                   work_dir=tmp_path / "w")


def test_a_further_stage_keeps_the_normalisation_of_its_starting_weights(ct_dir: Path, tmp_path: Path) -> None:
    """The network's input normalisation is part of the model: a stage started from trained weights normalises
    its data with their plans' intensity properties (not its own sample's), with the same random stream
    otherwise; a starting folder without them is refused."""
    pytest.importorskip("torch")
    from ctpassport.errors import ModelError
    from ctpassport.model.train import TrainConfig, prepare_data, train_demo

    cfg = TrainConfig(n_phantoms=1, extra_spacings=())
    own_samples, own = prepare_data(cfg, ct_dir, lambda m: None)
    given = {**own, "mean": own["mean"] + 40.0, "std": own["std"] * 1.1}
    samples, props = prepare_data(cfg, ct_dir, lambda m: None, given)
    assert props == given
    for a, b in zip(own_samples, samples):
        assert a.name == b.name and all(np.array_equal(a.class_voxels[k], b.class_voxels[k]) for k in a.class_voxels)
        hu_a = a.image * own["std"] + own["mean"]
        hu_b = b.image * given["std"] + given["mean"]
        np.testing.assert_allclose(hu_b, hu_a, atol=0.05)  # same HU, another normalisation
        assert not np.allclose(a.image, b.image)
    (tmp_path / "init").mkdir()
    with pytest.raises(ModelError, match="intensity properties"):
        train_demo(tmp_path / "m", ct_dir=ct_dir, work_dir=tmp_path / "w",
                   cfg=TrainConfig(steps=0, calibrate=True, init_from=str(tmp_path / "init")))
