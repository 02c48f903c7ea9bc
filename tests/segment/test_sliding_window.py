"""The NumPy sliding window reproduces nnU-Net v2's, bit for bit, including its float16 accumulation."""

from __future__ import annotations

import numpy as np
import pytest

from ctpassport.segment.sliding_window import (
    argmax_channels,
    gaussian_importance,
    pad_to_patch,
    sliding_window_logits,
    tile_starts,
    top2_margin,
)


def test_tile_starts_examples() -> None:
    # the example from nnU-Net's docstring: image 110, patch 64, step 0.5 -> 0, 23, 46
    assert tile_starts((110,), (64,), 0.5) == [[0, 23, 46]]
    assert tile_starts((128, 112, 112), (128, 112, 112), 0.8) == [[0], [0], [0]]
    # n = ceil((I - P) / (P * step)) + 1, spread evenly
    assert tile_starts((300,), (128,), 0.8) == [[0, 86, 172]]


def test_pad_is_centred_with_extra_voxel_high() -> None:
    x = np.ones((1, 3, 34, 55), np.float32)
    padded, unpad = pad_to_patch(x, (3, 40, 64))
    assert padded.shape == (1, 3, 40, 64)
    assert unpad == (slice(0, 3), slice(3, 37), slice(4, 59))
    np.testing.assert_array_equal(padded[(slice(None), *unpad)], x)


def test_top2_margin_and_ties() -> None:
    logits = np.array([[1.0, 2.0], [3.0, 2.0], [2.5, 0.0]], np.float16)[:, :, None, None]
    np.testing.assert_allclose(top2_margin(logits)[:, 0, 0], [0.5, 0.0])
    assert argmax_channels(logits)[:, 0, 0].tolist() == [1, 0]  # first maximum on ties


class _LinearNet:
    """A deterministic stand-in network: per-voxel linear map plus a position-dependent term."""

    def __init__(self, c: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.w = rng.standard_normal(c).astype(np.float32)
        self.b = rng.standard_normal(c).astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n, _, *sp = x.shape
        grid = np.add.outer(np.add.outer(np.arange(sp[0]), np.arange(sp[1])), np.arange(sp[2])) % 7
        out = x * self.w[None, :, None, None, None] + self.b[None, :, None, None, None]
        return (out + 0.01 * grid[None, None].astype(np.float32)).astype(np.float32)


@pytest.mark.vanilla
@pytest.mark.parametrize("shape", [(20, 30, 25), (40, 37, 50)])
def test_matches_nnunet_predictor(shape: tuple[int, int, int]) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("nnunetv2")
    from types import SimpleNamespace

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.inference.sliding_window_prediction import (
        compute_gaussian,
        compute_steps_for_sliding_window,
    )

    patch, c = (24, 32, 16), 5
    net = _LinearNet(c)
    x = np.random.default_rng(1).standard_normal((1, *shape)).astype(np.float32)

    class TorchNet(torch.nn.Module):
        def forward(self, t):  # type: ignore[no-untyped-def]
            return torch.from_numpy(net(t.numpy()))

    pred = nnUNetPredictor(tile_step_size=0.8, use_gaussian=True, use_mirroring=False,
                           perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                           allow_tqdm=False)
    pred.network = TorchNet()
    pred.configuration_manager = SimpleNamespace(patch_size=list(patch))
    pred.label_manager = SimpleNamespace(num_segmentation_heads=c)
    pred.allowed_mirroring_axes = None
    ref = pred.predict_sliding_window_return_logits(torch.from_numpy(x)).numpy()

    got = sliding_window_logits(x, net, patch, c, step=0.8, accumulate="fp16")
    assert got.dtype == ref.dtype == np.float16
    np.testing.assert_array_equal(got, ref)
    # the building blocks are nnU-Net's too
    g_ref = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu"))
    np.testing.assert_array_equal(gaussian_importance(patch), g_ref.numpy())
    padded, _ = pad_to_patch(x, patch)
    assert tile_starts(padded.shape[1:], patch, 0.8) == compute_steps_for_sliding_window(padded.shape[1:], patch, 0.8)


def test_fp32_accumulation_is_close_to_fp16() -> None:
    net = _LinearNet(4, seed=3)
    x = np.random.default_rng(2).standard_normal((1, 30, 30, 30)).astype(np.float32)
    a = sliding_window_logits(x, net, (16, 16, 16), 4, accumulate="fp16").astype(np.float32)
    b = sliding_window_logits(x, net, (16, 16, 16), 4, accumulate="fp32")
    assert b.dtype == np.float32
    # Where the Gaussian weights are large the float16 sums agree to float16 precision; at the outer corners
    # of the volume the weights underflow float16 (nnU-Net's own behaviour) and the sums are coarse.
    centre = (slice(None), slice(6, 24), slice(6, 24), slice(6, 24))
    np.testing.assert_allclose(a[centre], b[centre], rtol=4e-3, atol=2e-2)
    assert (argmax_channels(a) == argmax_channels(b)).mean() > 0.9
