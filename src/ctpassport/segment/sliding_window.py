"""nnU-Net v2's sliding-window inference, reproduced in NumPy (no torch).

* the input is zero-padded (after normalisation) to at least the patch size, centred, the odd voxel
  going to the high side (``acvl_utils.pad_nd_image``);
* tile starts per axis: ``n = ceil((I - P) / (P * step)) + 1`` spread evenly and rounded;
* each tile's logits are multiplied by a Gaussian importance map (sigma = patch/8, peak 10, stored in
  float16 with zeros replaced by the smallest nonzero value) and summed; the sum is divided by the summed
  weights and the class is the argmax over channels.

nnU-Net keeps both sums in float16, even on the CPU (``accumulate="fp16"``, the default here, reproduces
its rounding: each addition is done in float32 and rounded to float16). ``accumulate="fp32"`` keeps
float32 sums. All arrays are in nnU-Net axis order, channels first.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Literal

import numpy as np
from scipy.ndimage import gaussian_filter

Accumulate = Literal["fp16", "fp32"]


def pad_to_patch(data: np.ndarray, patch: tuple[int, ...]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Zero-pad the spatial axes of ``data`` (C, d0, d1, d2) to at least ``patch``; return the slicer that
    undoes it (applies to spatial axes)."""
    spatial = data.shape[1:]
    pads = [max(p - s, 0) for s, p in zip(spatial, patch)]
    lo = [p // 2 for p in pads]
    hi = [p // 2 + p % 2 for p in pads]
    if not any(pads):
        return data, tuple(slice(0, s) for s in spatial)
    out = np.pad(data, [(0, 0)] + list(zip(lo, hi)), mode="constant", constant_values=0)
    return out, tuple(slice(a, a + s) for a, s in zip(lo, spatial))


def tile_starts(image_size: tuple[int, ...], patch: tuple[int, ...], step: float) -> list[list[int]]:
    """nnU-Net's ``compute_steps_for_sliding_window``: tile start indices per axis."""
    if not 0 < step <= 1:
        raise ValueError("step must be in (0, 1]")
    steps = []
    for size, p in zip(image_size, patch):
        if size < p:
            raise ValueError(f"image size {size} is smaller than the patch {p}; pad first")
        n = int(np.ceil((size - p) / (p * step))) + 1
        if n > 1:
            actual = (size - p) / (n - 1)
            steps.append([int(np.round(actual * i)) for i in range(n)])
        else:
            steps.append([0])
    return steps


def tiles(image_size: tuple[int, ...], patch: tuple[int, ...], step: float) -> list[tuple[slice, ...]]:
    """Spatial slicers of all tiles, in nnU-Net's order (last axis fastest)."""
    s0, s1, s2 = tile_starts(image_size, patch, step)
    return [(slice(a, a + patch[0]), slice(b, b + patch[1]), slice(c, c + patch[2]))
            for a in s0 for b in s1 for c in s2]


@lru_cache(maxsize=4)
def gaussian_importance(patch: tuple[int, ...], sigma_scale: float = 1.0 / 8, peak: float = 10.0) -> np.ndarray:
    """nnU-Net's ``compute_gaussian`` as float16 (converted through float32, as torch does)."""
    tmp = np.zeros(patch)
    tmp[tuple(p // 2 for p in patch)] = 1
    g = gaussian_filter(tmp, [p * sigma_scale for p in patch], 0, mode="constant", cval=0)
    g /= np.max(g) / peak
    g16 = g.astype(np.float32).astype(np.float16)
    nz = g16 != 0
    g16[~nz] = g16[nz].min()
    g16.setflags(write=False)
    return g16


PredictFn = Callable[[np.ndarray], np.ndarray]
"""Maps a batch ``(N, 1, d0, d1, d2)`` float32 to logits ``(N, C, d0, d1, d2)`` float32."""


def iter_tiles(data: np.ndarray, slicers: list[tuple[slice, ...]], batch: int) -> Iterator[
        tuple[list[tuple[slice, ...]], np.ndarray]]:
    """Yield ``(slicers, batch array)`` groups of contiguous tiles of ``data`` (1, d0, d1, d2)."""
    for i in range(0, len(slicers), batch):
        group = slicers[i:i + batch]
        yield group, np.stack([data[(slice(None), *s)] for s in group]).astype(np.float32, copy=False)


def sliding_window_logits(
    data: np.ndarray,
    predict: PredictFn,
    patch: tuple[int, ...],
    num_classes: int,
    *,
    step: float = 0.8,
    accumulate: Accumulate = "fp16",
    batch: int = 1,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Gaussian-weighted sliding-window logits of ``data`` (1, d0, d1, d2) float32, nnU-Net order.

    Returns the averaged logits ``(C, d0, d1, d2)`` (float16 for ``accumulate="fp16"``) on the unpadded grid.
    """
    padded, unpad = pad_to_patch(data, patch)
    slicers = tiles(padded.shape[1:], patch, step)
    g16 = gaussian_importance(tuple(patch))
    g32 = g16.astype(np.float32)
    acc_dtype = np.float16 if accumulate == "fp16" else np.float32
    acc = np.zeros((num_classes, *padded.shape[1:]), dtype=acc_dtype)
    weight = np.zeros(padded.shape[1:], dtype=acc_dtype)
    for group, x in iter_tiles(padded, slicers, batch):
        out = predict(x)
        if out.shape[1] != num_classes:
            raise ValueError(f"network returned {out.shape[1]} channels, expected {num_classes}")
        for k, sl in enumerate(group):
            pred = out[k]
            # One channel at a time: the same float32 products and float32 sums rounded to the accumulator's
            # type as a whole-tile operation, with small temporaries (faster, and no tile-sized copies).
            for c in range(num_classes):
                p = pred[c]
                p *= g32
                index: tuple[int | slice, ...] = (c, *sl)
                region = acc[index]
                if accumulate == "fp16":
                    tmp = region.astype(np.float32)
                    tmp += p
                    region[...] = tmp  # float32 -> float16, round to nearest even (torch's cast)
                else:
                    region += p
            if accumulate == "fp16":
                np.add(weight[sl], g16, out=weight[sl], dtype=np.float32, casting="unsafe")
            else:
                weight[sl] += g32
        if progress is not None:
            progress(len(group))
    acc = acc[(slice(None), *unpad)]
    weight = weight[unpad]
    w32 = weight.astype(np.float32)
    for c in range(num_classes):
        np.divide(acc[c], w32, out=acc[c], dtype=np.float32, casting="unsafe")
    return acc


def argmax_channels(logits: np.ndarray) -> np.ndarray:
    """Class index per voxel (first maximum on ties, like torch/numpy); uint8 when < 256 classes."""
    lab = np.argmax(logits, axis=0)
    return lab.astype(np.uint8 if logits.shape[0] <= 256 else np.uint16)


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """Difference between the largest and second-largest logit per voxel (float32)."""
    part = np.partition(logits.astype(np.float32), -2, axis=0)
    return part[-1] - part[-2]


# ------------------------------------------------------------------------------------------------
# fast path: labels without materialising the aggregated logits of the whole volume
# ------------------------------------------------------------------------------------------------
def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``[start, stop)`` ranges covering ``range(n)`` (empty ones dropped)."""
    edges = np.linspace(0, n, max(1, parts) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges) if b > a]


def argmax_into(values: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[...] = argmax(values, axis=0)`` (first maximum on ties) with one pass per channel.

    ``values``: ``(C, ...)`` float32 (any strides); ``out``: integer array of shape ``values.shape[1:]``.
    Equal to ``np.argmax`` for NaN-free input, and much faster than its strided reduction over axis 0.
    """
    best = np.array(values[0], dtype=np.float32, copy=True)
    out[...] = 0
    mask = np.empty(best.shape, dtype=bool)
    for c in range(1, values.shape[0]):
        v = values[c]
        np.greater(v, best, out=mask)
        np.copyto(out, c, where=mask)
        np.maximum(best, v, out=best)
    return out


def _parallel(pool: ThreadPoolExecutor | None, fn: Callable[[int, int], None], n: int, parts: int) -> None:
    ranges = _chunks(n, parts)
    if pool is None or len(ranges) == 1:
        for a, b in ranges:
            fn(a, b)
        return
    for fut in [pool.submit(fn, a, b) for a, b in ranges]:
        fut.result()


def sliding_window_labels(
    data: np.ndarray,
    predict: PredictFn,
    patch: tuple[int, ...],
    num_classes: int,
    *,
    step: float = 0.8,
    threads: int = 1,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Labels (argmax of the Gaussian-weighted tile logits) of ``data`` (1, d0, d1, d2), nnU-Net order.

    Same tiles, padding and Gaussian as :func:`sliding_window_logits`, accumulated in float32 and without
    the final division (the summed weights are one positive number per voxel, shared by all channels, so
    they cannot change the argmax). Memory: the accumulator is a sliding slab of one patch depth along
    axis 0 (``C x P0 x d1 x d2`` float32), rows are turned into labels as soon as no later tile touches
    them. A single-tile image with a backend offering ``predict_labels`` never leaves the engine: the
    argmax is computed there. ``threads`` NumPy worker threads split channels (sums) and rows (argmax).
    Returns uint8 labels ``(d0, d1, d2)`` on the unpadded grid.
    """
    if num_classes > 256:
        raise ValueError("the fast path stores labels as uint8 (at most 256 classes)")
    padded, unpad = pad_to_patch(data, patch)
    space = padded.shape[1:]
    slicers = tiles(space, patch, step)
    if len(slicers) == 1 and hasattr(predict, "predict_labels"):
        labels = predict.predict_labels(padded[None])[0]
        if progress is not None:
            progress(1)
        return np.ascontiguousarray(labels[unpad])
    g32 = gaussian_importance(tuple(patch)).astype(np.float32)
    labels = np.empty(space, dtype=np.uint8)
    p0 = patch[0]
    acc = np.zeros((num_classes, p0, *space[1:]), dtype=np.float32)
    window0 = slicers[0][0].start  # absolute row of acc[:, 0]
    pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None

    def finalize(rows: int) -> None:
        def run(a: int, b: int) -> None:
            argmax_into(acc[:, a:b], labels[window0 + a:window0 + b])
        _parallel(pool, run, rows, threads)

    try:
        for sl in slicers:
            start0 = sl[0].start
            if start0 != window0:  # rows before the new start are final: label them, slide the slab
                shift = start0 - window0
                finalize(shift)

                def slide(a: int, b: int, shift: int = shift) -> None:
                    for c in range(a, b):
                        acc[c, :p0 - shift] = acc[c, shift:]
                        acc[c, p0 - shift:] = 0
                _parallel(pool, slide, num_classes, threads)
                window0 = start0
            out = predict(padded[(slice(None), *sl)][None])
            if out.shape[1] != num_classes:
                raise ValueError(f"network returned {out.shape[1]} channels, expected {num_classes}")
            pred = out[0]
            if len(slicers) == 1:  # one tile: the weights cancel in the argmax
                def direct(a: int, b: int, pred: np.ndarray = pred) -> None:
                    argmax_into(pred[:, a:b], labels[a:b])
                _parallel(pool, direct, p0, threads)
                if progress is not None:
                    progress(1)
                return np.ascontiguousarray(labels[unpad])

            def add(a: int, b: int, pred: np.ndarray = pred, sl: tuple[slice, ...] = sl) -> None:
                for c in range(a, b):
                    p = pred[c]
                    np.multiply(p, g32, out=p)
                    region = acc[c, :, sl[1], sl[2]]
                    region += p
            _parallel(pool, add, num_classes, threads)
            if progress is not None:
                progress(1)
        finalize(p0)
    finally:
        if pool is not None:
            pool.shutdown()
    return np.ascontiguousarray(labels[unpad])
