"""The PyTorch path: CUDA GPU (fp16 autocast, channels-last, ``torch.compile``) or CPU fp32 for reference.

Everything between the two NumPy ends runs on the device:

* resampling to the model grid (:func:`resample_linear`): trilinear with corner-aligned grids
  (``align_corners=True``), the same mapping as ``scipy.ndimage.zoom(order=1)`` in TotalSegmentator;
  values truncated to int32 like ``change_spacing(..., dtype=np.int32)``;
* the sliding window (:meth:`TorchBackend.sliding_window_labels`): nnU-Net's own arithmetic (float16
  logit and weight sums, Gaussian importance, division, argmax), tiles batched through the network;
* nearest-neighbour label resampling back to the input grid (:func:`zoom_labels_torch`): the indices of
  ``ndimage.zoom(order=0)`` applied with ``index_select`` per axis (exact).

Importing this module does not import torch; constructing :class:`TorchBackend` does (``ModelError`` when
torch or, for ``device="cuda"``, a CUDA GPU is missing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ModelError
from ..io.nifti import Image3D
from .backends import default_threads
from .preprocess import Resampled, to_model_grid, zoom_output_shape
from .sliding_window import gaussian_importance, tiles

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..model.folder import ModelFolder


def _torch() -> Any:
    from ..model.network import require_torch

    return require_torch("the PyTorch backends")


def resample_linear(data: np.ndarray, zoom: np.ndarray, device: Any) -> np.ndarray:
    """Order-1 resampling of a 3-D volume by ``zoom`` (per-axis factors, array axis order) on ``device``.

    Output shape and sample positions are ``scipy.ndimage.zoom``'s (``round(n * zoom)`` samples, corner
    aligned); computed in float32, truncated to int32. Returns a NumPy int32 array.
    """
    torch = _torch()
    out_shape = zoom_output_shape(data.shape, np.asarray(zoom, dtype=np.float64))
    x = _upload(data, device).to(torch.float32)[None, None]
    y = torch.nn.functional.interpolate(x, size=out_shape, mode="trilinear", align_corners=True)
    return y[0, 0].to(torch.int32).cpu().numpy()


def _upload(arr: np.ndarray, device: Any) -> torch.Tensor:
    """``arr`` as a tensor on ``device`` in its logical axis order, copied in memory order (a Fortran-ordered
    NIfTI array is uploaded as is and permuted on the device: no transposing copy on the CPU)."""
    torch = _torch()
    from .preprocess import memory_order_axes

    perm = memory_order_axes(arr)
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(perm))).to(device)
    return t.permute(*[int(i) for i in np.argsort(perm)]).contiguous()


def _download(t: torch.Tensor, fortran: bool) -> np.ndarray:
    """A 3-D tensor to NumPy, Fortran-ordered when ``fortran`` (what NIfTI writing wants)."""
    if not fortran:
        return t.cpu().numpy()
    return t.permute(2, 1, 0).contiguous().cpu().numpy().T


def zoom_labels_torch(labels: np.ndarray, target_shape: tuple[int, ...], device: Any) -> np.ndarray:
    """Exact ``ndimage.zoom(labels, target/shape, order=0, mode="nearest")`` with per-axis gathers on
    ``device`` (the same source indices as :func:`ctpassport.segment.postprocess.nearest_indices`); the
    result keeps the input's memory layout (Fortran in, Fortran out)."""
    torch = _torch()
    from .postprocess import nearest_indices

    shape = labels.shape
    if tuple(shape) == tuple(target_shape):
        return labels
    zoom = np.asarray(target_shape, dtype=np.float64) / np.asarray(shape, dtype=np.float64)
    out_shape = zoom_output_shape(shape, zoom)
    t = _upload(labels, device)
    for ax, (n, m) in enumerate(zip(shape, out_shape)):
        idx = torch.from_numpy(nearest_indices(n, m)).to(device)
        t = t.index_select(ax, idx)
    return _download(t, fortran=labels.flags.f_contiguous and not labels.flags.c_contiguous)


class TorchBackend:
    """The model folder's PyTorch network on ``device`` (``cuda`` or ``cpu``).

    On CUDA: fp16 autocast (as nnU-Net runs on GPUs), channels-last-3d weights and inputs, and
    ``torch.compile`` (``compile=None`` means on for CUDA). On the CPU: fp32, ``threads`` intra-op threads.
    ``net`` replaces the checkpoint's network (any module mapping ``(N, 1, ...)`` to ``(N, C, ...)``; tests).
    """

    def __init__(self, model: ModelFolder | None, *, device: str = "cuda", threads: int | None = None,
                 half: bool | None = None, compile: bool | None = None, channels_last: bool | None = None,
                 net: Any = None, batch: int = 4) -> None:
        torch = _torch()
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError("no CUDA GPU is visible to PyTorch", hint="use --device cpu")
        self.device = torch.device(device)
        is_cuda = self.device.type == "cuda"
        self.name = "cuda" if is_cuda else "torch"
        self.half = is_cuda if half is None else bool(half)
        self.precision = "fp16" if self.half else "fp32"
        self.channels_last = is_cuda if channels_last is None else bool(channels_last)
        self.batch = max(1, int(batch))
        self.threads = default_threads(threads)
        if not is_cuda:
            torch.set_num_threads(self.threads)
        if net is None:
            if model is None:
                raise ModelError("the PyTorch backend needs a model folder")
            from ..model.network import load_network

            net = load_network(model)
        net = net.eval().to(self.device)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last_3d)
        self.compiled = bool(compile if compile is not None else is_cuda)
        if self.compiled:
            net = torch.compile(net)
        self.net = net
        if is_cuda:
            torch.backends.cudnn.benchmark = True

    # -- network -------------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        torch = _torch()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self.half):
            return self.net(x)

    def prepare(self, shape: tuple[int, ...]) -> None:
        """Run zero batches of ``shape`` and of the sliding window's batch size (compiles and autotunes
        before the first case, so model-load time holds it)."""
        torch = _torch()
        if self.device.type != "cuda" and not self.compiled:
            return  # nothing to compile or autotune: eager CPU runs need no warm-up
        for n in sorted({int(shape[0]), self.batch}):
            self._forward(torch.zeros((n, *shape[1:]), device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = _torch()
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        return self._forward(x).float().cpu().numpy()

    # -- device-side stages -------------------------------------------------------------------------
    def to_model_grid(self, image: Image3D, target_spacing: tuple[float, float, float]) -> Resampled:
        """:func:`ctpassport.segment.preprocess.to_model_grid` (fast) with the resampling on the device."""
        return to_model_grid(image, target_spacing, fast=True,
                             resample=lambda data, zoom: resample_linear(data, zoom, self.device))

    def zoom_labels(self, labels: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
        """:func:`zoom_labels_torch` on this backend's device (same axis order in and out)."""
        return zoom_labels_torch(labels, target_shape, self.device)

    def sliding_window_labels(self, data: np.ndarray, patch: tuple[int, ...], num_classes: int, *,
                              step: float = 0.8, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """nnU-Net's sliding window on the device: ``data`` (1, d0, d1, d2) float32, nnU-Net order ->
        uint8 labels (d0, d1, d2). Float16 sums of Gaussian-weighted logits and weights, then division
        and argmax, exactly as ``nnUNetPredictor.predict_sliding_window_return_logits``."""
        torch = _torch()
        from .sliding_window import pad_to_patch

        padded, unpad = pad_to_patch(data, patch)
        space = padded.shape[1:]
        slicers = tiles(space, patch, step)
        dev = self.device
        with torch.inference_mode():
            x_all = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32)).to(dev)
            g16 = torch.from_numpy(np.array(gaussian_importance(tuple(patch)))).to(dev)
            logits = torch.zeros((num_classes, *space), dtype=torch.float16, device=dev)
            weights = torch.zeros(space, dtype=torch.float16, device=dev)
            for i in range(0, len(slicers), self.batch):
                group = slicers[i:i + self.batch]
                xb = torch.stack([x_all[(slice(None), *sl)] for sl in group])
                if len(slicers) > 1 and len(group) < self.batch:  # keep one compiled batch shape
                    xb = torch.cat([xb, xb.new_zeros((self.batch - len(group), *xb.shape[1:]))])
                pred = self._forward(xb)
                for k, sl in enumerate(group):
                    p = pred[k]
                    if p.dtype != torch.float16:
                        p = p.float() * g16  # fp32 logits times the fp16 Gaussian, as nnU-Net on the CPU
                    else:
                        p = p * g16  # autocast: fp16 logits, as nnU-Net on a GPU
                    logits[(slice(None), *sl)] += p
                    weights[sl] += g16
                if progress is not None:
                    progress(len(group))
            logits /= weights
            lab = logits.argmax(0)[tuple(unpad)].to(torch.uint8)
            return lab.cpu().numpy()
