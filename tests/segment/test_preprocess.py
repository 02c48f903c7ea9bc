"""Preprocessing and postprocessing reproduce TotalSegmentator's resampling and nnU-Net's crop/normalisation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ctpassport.io.nifti import Image3D
from ctpassport.model.folder import load_model_folder, locate_model
from ctpassport.segment.postprocess import to_input_grid, zoom_labels
from ctpassport.segment.preprocess import network_input, nonzero_bbox, to_model_grid
from ctpassport.segment.sliding_window import argmax_channels


def _image(shape: tuple[int, int, int], affine: np.ndarray, seed: int = 0) -> Image3D:
    import nibabel as nib

    data = np.random.default_rng(seed).integers(-1024, 1500, shape).astype(np.int16)
    return Image3D(data=data, affine=affine, header=nib.Nifti1Header())


@pytest.mark.parametrize(("n_in", "n_out"), [(51, 101), (101, 51), (7, 7), (3, 10), (224, 112)])
def test_zoom_labels_equals_scipy(n_in: int, n_out: int) -> None:
    lab = np.random.default_rng(0).integers(0, 118, (n_in, 9, 5)).astype(np.uint8)
    target = (n_out, 13, 5)
    ref = ndimage.zoom(lab.astype(np.float64), np.array(target) / np.array(lab.shape), order=0, mode="nearest")
    np.testing.assert_array_equal(zoom_labels(lab, target), ref.astype(np.uint8))


def test_nonzero_bbox() -> None:
    a = np.zeros((6, 7, 8))
    a[1:3, 2, 5:7] = 4
    assert nonzero_bbox(a) == ((1, 3), (2, 3), (5, 7))
    assert nonzero_bbox(np.zeros((2, 3, 4))) == ((0, 2), (0, 3), (0, 4))


@pytest.mark.vanilla
@pytest.mark.parametrize("spacing", [(1.5, 1.5, 2.0), (0.8, 0.8, 1.5), (3.0, 3.0, 3.0), (2.99, 3.2, 5.0)])
def test_resampling_equals_totalsegmentator(spacing: tuple[float, float, float]) -> None:
    pytest.importorskip("totalsegmentator")
    import nibabel as nib
    from totalsegmentator.resampling import change_spacing

    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS storage
    aff[:3, 3] = [120.5, 98.25, -300.0]
    img = _image((40, 33, 21), aff)
    ours = to_model_grid(img, (3.0, 3.0, 3.0))
    ts_in = nib.as_closest_canonical(nib.Nifti1Image(img.data.astype(np.float64), aff))
    ts = change_spacing(ts_in, [3.0, 3.0, 3.0], order=1, dtype=np.int32, nr_cpus=1)
    np.testing.assert_array_equal(ours.data, np.asanyarray(ts.dataobj))
    np.testing.assert_allclose(ours.affine, ts.affine, rtol=0, atol=1e-9)


@pytest.mark.vanilla
def test_normalisation_and_crop_equal_nnunet(standin_home) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("nnunetv2")
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

    model = load_model_folder(locate_model(standin_home))
    img = _image((30, 20, 26), np.diag([3.0, 3.0, 3.0, 1.0]), seed=4)
    img.data[:3] = 0  # a zero border that nnU-Net crops away
    img.data[:, -2:] = 0
    res = to_model_grid(img, (3.0, 3.0, 3.0))
    ours = network_input(res, model)
    arr = np.transpose(res.data, (2, 1, 0))[None].astype(np.float32)
    cropped, _, bbox = crop_to_nonzero(arr)
    assert [tuple(b) for b in bbox] == list(ours.bbox)
    norm = CTNormalization(use_mask_for_norm=False, intensityproperties=model.intensity_properties)
    np.testing.assert_array_equal(ours.data, norm.run(cropped.copy()))


@pytest.mark.parametrize("codes", ["RAS", "LPS", "PIR"])
@pytest.mark.parametrize("spacing", [(3.0, 3.0, 3.0), (1.5, 2.0, 2.5)])
def test_round_trip_lands_on_input_grid(standin_home, codes: str, spacing) -> None:  # type: ignore[no-untyped-def]
    """A 'network' that thresholds intensity must give labels where the input is bright, on the input grid."""
    model = load_model_folder(locate_model(standin_home))
    perm = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    aff = np.zeros((4, 4))
    for col, c in enumerate(codes):
        row, sign = perm[c]
        aff[row, col] = sign * spacing[col]
    aff[:3, 3] = [10, -20, 30]
    aff[3, 3] = 1
    shape = (48, 40, 36)
    data = np.full(shape, -1000, np.int16)
    data[10:30, 8:24, 6:20] = 800  # a bright box, several voxels thick at 3 mm
    img = Image3D(data=data, affine=aff, header=None)  # type: ignore[arg-type]
    res = to_model_grid(img, (3.0, 3.0, 3.0))
    net_in = network_input(res, model)
    logits = np.stack([np.zeros_like(net_in.data[0]), net_in.data[0]])  # class 1 where bright
    labels = to_input_grid(argmax_channels(logits), net_in, res, model)
    assert labels.shape == shape
    truth = data > 0
    inter = np.logical_and(labels == 1, truth).sum()
    dice = 2 * inter / ((labels == 1).sum() + truth.sum())
    assert dice > (0.999 if spacing == (3.0, 3.0, 3.0) else 0.85)
