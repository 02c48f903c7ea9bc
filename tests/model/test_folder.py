"""Model folders: both plans formats, locating TotalSegmentator's weights, clear errors for broken folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ctpassport.errors import ModelError
from ctpassport.model.checkpoint import network_weight_shapes, read_checkpoint_structure
from ctpassport.model.folder import (
    FAST_DATASET,
    FAST_TRAINER_FOLDER,
    load_model_folder,
    locate_model,
    parse_architecture,
)
from ctpassport.model.standin import make_plans

pytestmark = pytest.mark.torch


def _trainer(home: Path) -> Path:
    return home / "nnunet" / "results" / FAST_DATASET / FAST_TRAINER_FOLDER


@pytest.fixture
def folder_copy(standin_home: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "home"
    shutil.copytree(standin_home, dst)
    return _trainer(dst)


def test_standin_matches_the_spec(standin_home: Path) -> None:
    m = load_model_folder(_trainer(standin_home))
    a = m.architecture
    assert a.short_name == "PlainConvUNet"
    assert a.features_per_stage == (32, 64, 128, 256, 320)
    assert a.strides == ((1, 1, 1),) + ((2, 2, 2),) * 4
    assert a.kernel_sizes == ((3, 3, 3),) * 5
    assert a.n_conv_per_stage == (2,) * 5 and a.n_conv_per_stage_decoder == (2,) * 4
    assert m.patch_size == (112, 112, 128) and m.spacing == (3.0, 3.0, 3.0)
    assert m.num_channels_out == 118 and m.labels[1] == "spleen" and m.labels[117] == "costal_cartilages"
    assert m.nnunet_axes == (2, 1, 0)  # SimpleITK reader: nnU-Net sees (z, y, x)
    assert m.intensity_properties["percentile_00_5"] == -1004.0


def test_flat_and_architecture_plans_agree() -> None:
    flat = parse_architecture(make_plans(plans_format="flat")["configurations"]["3d_fullres"], Path("p"))
    new = parse_architecture(make_plans(plans_format="architecture")["configurations"]["3d_fullres"], Path("p"))
    for field in ("network_class_name", "n_stages", "features_per_stage", "kernel_sizes", "strides",
                  "n_conv_per_stage", "n_conv_per_stage_decoder", "conv_bias", "norm_eps"):
        assert getattr(flat, field) == getattr(new, field), field


@pytest.mark.vanilla
def test_flat_plans_convert_like_nnunet() -> None:
    pytest.importorskip("nnunetv2")
    import warnings

    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    conf = make_plans(plans_format="flat")["configurations"]["3d_fullres"]
    ours = parse_architecture(conf, Path("p"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nnU-Net warns that it converts the old format
        cm = ConfigurationManager(json.loads(json.dumps(conf)))
    kw = cm.network_arch_init_kwargs
    assert cm.network_arch_class_name == ours.network_class_name
    assert tuple(kw["features_per_stage"]) == ours.features_per_stage
    assert tuple(map(tuple, kw["strides"])) == ours.strides
    assert tuple(kw["n_conv_per_stage"]) == ours.n_conv_per_stage


def test_checkpoint_structure_without_torch_matches_torch(standin_home: Path) -> None:
    import torch

    ckpt = _trainer(standin_home) / "fold_0" / "checkpoint_final.pth"
    shapes = network_weight_shapes(read_checkpoint_structure(ckpt))
    ref = torch.load(ckpt, map_location="cpu", weights_only=True)["network_weights"]
    assert shapes == {k: tuple(v.shape) for k, v in ref.items()}


def test_locate_by_env_and_path(standin_home: Path, tmp_path: Path) -> None:
    trainer = _trainer(standin_home)
    assert locate_model(environ={"TOTALSEG_HOME_DIR": str(standin_home)}) == trainer
    assert locate_model(environ={"TOTALSEG_WEIGHTS_PATH": str(standin_home / "nnunet" / "results")}) == trainer
    assert locate_model(standin_home) == trainer
    assert locate_model(trainer) == trainer
    assert locate_model(trainer / "fold_0" / "checkpoint_final.pth") == trainer
    # every level a user may point at: the fold, the Dataset297 folder, the home's nnunet folder
    for level in (trainer / "fold_0", trainer.parent, standin_home / "nnunet", standin_home / "nnunet" / "results"):
        assert locate_model(level) == trainer, level
    (trainer / "fold_all").mkdir(exist_ok=True)  # another fold's folder: refused, not fold_0 loaded silently
    with pytest.raises(ModelError, match="loads fold_0/checkpoint_final.pth, as TotalSegmentator does, not fold_all"):
        locate_model(trainer / "fold_all")
    (trainer / "fold_all").rmdir()
    best = tmp_path / "best.pth"
    best.write_bytes(b"")
    with pytest.raises(ModelError, match="loads fold_0/checkpoint_final.pth, as TotalSegmentator does"):
        locate_model(best)  # another checkpoint than the one that would load is refused, not swapped silently
    with pytest.raises(ModelError, match="no TotalSegmentator fast-model weights found"):
        locate_model(environ={"TOTALSEG_HOME_DIR": str(tmp_path / "empty")})
    with pytest.raises(ModelError, match="does not exist"):
        locate_model(tmp_path / "nowhere")


def test_missing_checkpoint(folder_copy: Path) -> None:
    (folder_copy / "fold_0" / "checkpoint_final.pth").unlink()
    with pytest.raises(ModelError, match="no checkpoint") as info:
        load_model_folder(folder_copy)
    assert "\n" not in str(info.value)


def test_truncated_checkpoint(folder_copy: Path) -> None:
    ck = folder_copy / "fold_0" / "checkpoint_final.pth"
    ck.write_bytes(ck.read_bytes()[: 1_000_000])
    with pytest.raises(ModelError, match="truncated"):
        load_model_folder(folder_copy)


def test_wrong_number_of_classes(folder_copy: Path) -> None:
    ds = json.loads((folder_copy / "dataset.json").read_text())
    ds["labels"] = {k: v for k, v in ds["labels"].items() if v < 100}
    (folder_copy / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(ModelError, match="does not list TotalSegmentator's 117 'total' classes"):
        load_model_folder(folder_copy)


def test_another_models_labels_are_refused_not_renamed(folder_copy: Path) -> None:
    """A TotalSegmentator subtask's folder (e.g. Dataset292, label 1 = sacrum) would be run and written with the
    total model's names (label 1 = spleen): refused, naming the first label that differs."""
    ds = json.loads((folder_copy / "dataset.json").read_text())
    swap = {"spleen": "sacrum", "sacrum": "spleen"}  # label 1 is called sacrum, label 25 spleen
    ds["labels"] = {swap.get(k, k): v for k, v in ds["labels"].items()}
    (folder_copy / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(ModelError, match="label 1 is 'sacrum', expected 'spleen'"):
        load_model_folder(folder_copy)


def test_unknown_network_class(folder_copy: Path) -> None:
    plans = json.loads((folder_copy / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["UNet_class_name"] = "MyFancyUNet"
    (folder_copy / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelError, match="unknown network class 'MyFancyUNet'"):
        load_model_folder(folder_copy)


@pytest.mark.parametrize("props", [None, [1, 2], {"mean": 1.0, "std": "wide", "percentile_00_5": -1000,
                                                  "percentile_99_5": 1000}])
def test_bad_intensity_properties(folder_copy: Path, props: object) -> None:
    """A null, non-object or non-numeric entry is a one-line ModelError, not a TypeError from deep inside."""
    plans = json.loads((folder_copy / "plans.json").read_text())
    plans["foreground_intensity_properties_per_channel"] = {"0": props}
    (folder_copy / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelError, match="intensity properties"):
        load_model_folder(folder_copy)


@pytest.mark.parametrize(("where", "value", "words"), [
    (("configurations", "3d_fullres"), None, "wrong kind"),
    (("configurations", "3d_fullres", "UNet_base_num_features"), None, "wrong kind"),
    (("configurations", "3d_fullres", "n_conv_per_stage_encoder"), 2, "wrong kind"),
    (("configurations", "3d_fullres", "n_conv_per_stage_decoder"), [], "disagree with n_stages"),
    (("configurations", "3d_fullres", "patch_size"), "112", "patch_size must be a list of 3 numbers"),
    (("configurations", "3d_fullres", "patch_size"), [0, 64, 64], "patch_size must hold 3 positive numbers"),
    (("configurations", "3d_fullres", "spacing"), [0.0, 3.0, 3.0], "spacing must hold 3 positive numbers"),
    (("configurations", "3d_fullres", "normalization_schemes"), None, "wrong kind"),
    (("transpose_forward",), [5, 1, 0], "not inverse permutations"),
    (("transpose_forward",), [0, 0, 0], "not inverse permutations"),
    (("transpose_forward",), None, "wrong kind"),
    (("foreground_intensity_properties_per_channel", "0", "std"), float("nan"), "finite numbers with std > 0"),
    (("foreground_intensity_properties_per_channel", "0", "std"), 0.0, "finite numbers with std > 0"),
])
def test_plans_values_of_the_wrong_kind(folder_copy: Path, where: tuple[str, ...], value: object,
                                        words: str) -> None:
    """Each was an internal error (TypeError, IndexError, ZeroDivisionError) or, for a NaN std, a run that
    labelled everything background: now a one-line ModelError naming plans.json."""
    plans = json.loads((folder_copy / "plans.json").read_text())
    node = plans
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    (folder_copy / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelError, match=words) as info:
        load_model_folder(folder_copy, check_checkpoint=False)
    assert "\n" not in str(info.value) and "plans.json" in str(info.value)


def test_dataset_json_of_the_wrong_kind(folder_copy: Path) -> None:
    ds = json.loads((folder_copy / "dataset.json").read_text())
    ds["channel_names"] = None
    (folder_copy / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(ModelError, match="wrong kind"):
        load_model_folder(folder_copy, check_checkpoint=False)


def test_checkpoint_with_a_damaged_member_name(folder_copy: Path) -> None:
    """A flipped bit in a member's name inside the zip (not caught by the CRCs of the data) failed to decode:
    an internal error; now the corrupt checkpoint is said so."""
    ck = folder_copy / "fold_0" / "checkpoint_final.pth"
    raw = bytearray(ck.read_bytes())
    at = raw.index(b"PK\x03\x04") + 30  # the first local header's file name
    raw[at] = 0xE5
    ck.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="corrupt"):
        load_model_folder(folder_copy)


def test_broken_json(folder_copy: Path) -> None:
    (folder_copy / "plans.json").write_text("{ not json")
    with pytest.raises(ModelError, match="plans.json is not valid JSON"):
        load_model_folder(folder_copy)


def _numpy1_pickle(path: Path) -> None:
    """Rewrite a torch checkpoint as numpy 1.x pickled it (``numpy.core.multiarray.*``; numpy 2 writes
    ``numpy._core``): how nnU-Net's released checkpoints name the numpy scalars in their training logs."""
    import zipfile

    with zipfile.ZipFile(path) as zin:
        items = [(i.filename, zin.read(i.filename)) for i in zin.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for name, data in items:
            if name.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(name, data)


@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module."])
def test_checkpoints_as_nnunet_trainers_save_them(folder_copy: Path, prefix: str) -> None:
    """A training checkpoint as nnU-Net writes it (optimizer state, numpy scalars in the logs, pickled under
    numpy 1.x; weights of a torch.compile'd or DDP network carry a prefix) loads to the same network."""
    import numpy as np
    import torch

    from ctpassport.model.network import load_checkpoint, load_network

    ck = folder_copy / "fold_0" / "checkpoint_final.pth"
    ref = load_network(load_model_folder(folder_copy)).state_dict()
    raw = torch.load(ck, map_location="cpu", weights_only=True)
    raw["network_weights"] = {prefix + k: v for k, v in raw["network_weights"].items()}
    raw["logging"] = {"ema_fg_dice": [np.float64(0.5), np.float64(0.6)], "epoch": np.int64(3)}
    raw["_best_ema"] = np.float64(0.61)
    raw["optimizer_state"] = {"state": {}, "param_groups": [{"lr": 0.01}]}
    torch.save(raw, ck)
    _numpy1_pickle(ck)
    assert float(load_checkpoint(ck)["_best_ema"]) == pytest.approx(0.61)
    got = load_network(load_model_folder(folder_copy)).state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_a_refused_pickle_global_is_named_in_one_line(folder_copy: Path) -> None:
    import fractions

    import torch

    from ctpassport.model.network import load_checkpoint

    ck = folder_copy / "fold_0" / "checkpoint_final.pth"
    torch.save({"network_weights": {}, "extra": fractions.Fraction(1, 3)}, ck)
    with pytest.raises(ModelError, match=r"it holds fractions\.Fraction, which a weights-only load does not allow") as e:
        load_checkpoint(ck)
    assert "\x1b" not in str(e.value) and "\n" not in str(e.value)


def test_network_classes_are_found_where_the_released_package_has_them() -> None:
    """nnU-Net's plans name ``...architectures.residual_unet.ResidualEncoderUNet``, a module the released
    dynamic-network-architectures does not have (the class is in ``...unet``): found by name, as nnU-Net does."""
    pytest.importorskip("dynamic_network_architectures")
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    from ctpassport.model.folder import SUPPORTED_NETWORKS
    from ctpassport.model.network import _locate

    assert _locate(SUPPORTED_NETWORKS["ResidualEncoderUNet"]) is ResidualEncoderUNet
    assert _locate("dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet") is ResidualEncoderUNet
    with pytest.raises(ImportError):
        _locate("dynamic_network_architectures.architectures.nowhere.NoSuchUNet")


def test_standin_checkpoints_are_byte_identical_for_one_seed(tmp_path: Path) -> None:
    """The same weights written twice give the same bytes (torch.save named the archive's members after the
    random temporary file, so the checkpoint hash - and the cached ONNX export keyed by it - changed every
    time), with the member names nnU-Net's own checkpoints have."""
    import hashlib
    import zipfile

    torch = pytest.importorskip("torch")
    from ctpassport.model.folder import FAST_CONFIGURATION
    from ctpassport.model.network import build_network
    from ctpassport.model.standin import make_dataset_json, write_model_folder

    plans = make_plans(base_features=4, max_features=8, n_stages=2, patch_size=[32, 64, 64])
    dataset = make_dataset_json()
    digests = []
    for k in range(2):
        trainer = tmp_path / f"m{k}" / FAST_TRAINER_FOLDER
        arch = parse_architecture(plans["configurations"][FAST_CONFIGURATION], trainer / "plans.json")
        torch.manual_seed(3)
        write_model_folder(trainer, plans, dataset, build_network(arch, 1, len(dataset["labels"])).state_dict())
        ckpt = trainer / "fold_0" / "checkpoint_final.pth"
        digests.append(hashlib.sha256(ckpt.read_bytes()).hexdigest())
        with zipfile.ZipFile(ckpt) as zf:
            assert all(n.startswith("checkpoint_final/") for n in zf.namelist())
        assert [p.name for p in (trainer / "fold_0").iterdir()] == ["checkpoint_final.pth"]  # no temporary left
    assert digests[0] == digests[1]
