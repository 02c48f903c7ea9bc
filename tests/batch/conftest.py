"""Batch fixtures: a tiny model (same code paths, one small patch per case: fast enough for many cases
and several worker processes) and a folder of small CTs cut from the shared example CT."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from ctpassport.io.nifti import make_nifti, read_image, save_nifti


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, onnx_cache: Path) -> Path:
    """A trainer folder with a 2-stage, 4..8-feature PlainConvUNet (118 outputs, 3 mm, patch 32x64x64 in
    nnU-Net order): the full pipeline on a ~60 x 60 x 30 CT in about a second."""
    torch = pytest.importorskip("torch")
    from ctpassport.model.folder import (
        FAST_CONFIGURATION,
        FAST_DATASET,
        FAST_TRAINER_FOLDER,
        parse_architecture,
    )
    from ctpassport.model.network import build_network
    from ctpassport.model.standin import make_dataset_json, make_plans, write_model_folder

    trainer = tmp_path_factory.mktemp("tiny_model") / "nnunet" / "results" / FAST_DATASET / FAST_TRAINER_FOLDER
    plans = make_plans(base_features=4, max_features=8, n_stages=2, patch_size=[32, 64, 64])
    dataset = make_dataset_json()
    arch = parse_architecture(plans["configurations"][FAST_CONFIGURATION], trainer / "plans.json")
    torch.manual_seed(1)
    net = build_network(arch, 1, len(dataset["labels"]))
    write_model_folder(trainer, plans, dataset, net.state_dict())
    return trainer


@pytest.fixture(scope="session")
def small_cts(ct_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Three 60 x 60 x 30 crops (HU, RAS+ affines) of example_ct_sm at different places."""
    ct = read_image(ct_dir / "example_ct_sm.nii.gz")
    out = []
    for i0, j0 in [(10, 10), (50, 30), (30, 40)]:
        affine = ct.affine.copy()
        affine[:3, 3] = ct.affine[:3, :3] @ np.array([i0, j0, 0]) + ct.affine[:3, 3]
        out.append((np.ascontiguousarray(ct.data[i0:i0 + 60, j0:j0 + 60, :]), affine))
    return out


@pytest.fixture
def batch_in(tmp_path: Path, small_cts: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    """IN_DIR with: a/ct1.nii.gz, b_ct2.nii.gz, patient3/series/ (DICOM), and a hidden file to ignore."""
    from ctpassport.io.dicom_write import SeriesTags, write_dicom_series

    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    save_nifti(make_nifti(small_cts[0][0], small_cts[0][1]), root / "a" / "ct1.nii.gz")
    save_nifti(make_nifti(small_cts[1][0], small_cts[1][1]), root / "b_ct2.nii.gz")
    write_dicom_series(small_cts[2][0], small_cts[2][1], root / "patient3" / "series",
                       SeriesTags(patient_id="P3", study_date="20240202", uid_seed="batch"))
    (root / ".DS_Store").write_bytes(b"junk")
    return root


@pytest.fixture
def corrupt(batch_in: Path, ct_dir: Path) -> Path:
    """A truncated NIfTI among the good cases (sorted between them)."""
    raw = (ct_dir / "example_ct_sm.nii.gz").read_bytes()
    bad = batch_in / "a" / "ct1_broken.nii.gz"
    bad.write_bytes(raw[: len(raw) // 3])
    return bad


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
