"""The segmentation pipeline: load -> preprocess -> infer -> postprocess -> write, each stage timed.

:class:`Segmenter` loads the model folder and creates the inference session once; call
:meth:`Segmenter.segment` (arrays) or :meth:`Segmenter.segment_file` (files) as often as needed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..config import Config
from ..errors import InputError
from ..io.atomic import atomic_path, check_writable, write_text_atomic
from ..io.load import load_ct
from ..io.nifti import Image3D, make_nifti, save_nifti
from ..model.classes import resolve_roi_subset
from ..model.export import find_or_export_onnx
from ..model.folder import ModelFolder, load_model_folder, locate_model
from ..types import Affine
from .backends import TORCH_BACKENDS, Backend, create_backend, default_threads, resolve_backend_name
from .postprocess import model_grid_labels, to_input_grid
from .preprocess import NetworkInput, Resampled, network_input, to_model_grid
from .sliding_window import Accumulate, argmax_channels, sliding_window_labels, sliding_window_logits, tiles

Mode = Literal["exact", "fast"]
from .statistics import basic_statistics

STAGES = ("load", "preprocess", "infer", "postprocess", "passport", "write")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class Timings:
    """Seconds per stage (wall clock) for one case."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    @property
    def total(self) -> float:
        return float(sum(self.seconds.values()))

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": {k: round(v, 6) for k, v in self.seconds.items()}, "total": round(self.total, 6),
                "peak_rss_mb": round(peak_rss_mb(), 1)}


@dataclass
class SegmentationResult:
    """Labels on the input's grid plus the model-grid intermediates other stages reuse.

    ``labels``: uint8, input storage order and shape, TotalSegmentator class ids; ``affine``: the input's
    voxel -> RAS+ mm. ``model_labels`` / ``model_ct`` (HU) / ``model_affine`` (voxel -> RAS+ mm): the 3 mm
    canonical (RAS+) grid on which the network ran, nibabel axis order. ``logits`` (when kept): ``(C, d0, d1,
    d2)`` in nnU-Net axis order on the network's cropped grid.
    """

    labels: np.ndarray
    affine: Affine
    header: Any
    model_labels: np.ndarray
    model_ct: np.ndarray
    model_affine: Affine
    timings: Timings
    logits: np.ndarray | None = None
    n_tiles: int = 0


class Segmenter:
    """TotalSegmentator-fast segmentation with a reusable inference session.

    ``model``: a trainer folder / TotalSegmentator home / ``None`` (search like TotalSegmentator).
    ``backend``: ``auto`` or a name from :data:`~ctpassport.segment.backends.BACKENDS`.
    ``step``: sliding-window step as a fraction of the patch (TotalSegmentator uses 0.8 for ``total``).
    ``accumulate``: ``fp16`` reproduces nnU-Net's float16 sums; ``fp32`` keeps float32 (exact mode only).
    ``mode``: ``exact`` reproduces TotalSegmentator's arithmetic (float64 resampling, nnU-Net's float16
    logit sums; the parity path); ``fast`` uses float32 resampling in memory order, float32 sums in a
    sliding slab and the engine's own argmax for single-tile images (labels within the parity bars, see
    docs/benchmark.md). Default (``None``): ``exact`` for the ``onnxruntime`` backend, ``fast`` otherwise.
    """

    def __init__(self, model: ModelFolder | str | Path | None = None, *, backend: str | None = None,
                 threads: int | None = None, config: Config | None = None, step: float = 0.8,
                 accumulate: Accumulate = "fp16", batch: int = 1, mode: Mode | None = None) -> None:
        self.config = config or Config.from_env()
        t0 = time.perf_counter()
        self.model = model if isinstance(model, ModelFolder) else load_model_folder(locate_model(model))
        self.backend_name = resolve_backend_name(backend or self.config.backend)
        # the PyTorch backends run the checkpoint itself: no ONNX export to make (or to need a cache for)
        self.onnx_path: Path | None = (None if self.backend_name in TORCH_BACKENDS
                                       else find_or_export_onnx(self.model, self.config.cache_dir))
        threads = threads if threads is not None else (self.config.threads or None)
        self.threads = default_threads(threads)
        self.backend: Backend = create_backend(self.backend_name, self.onnx_path, threads, model=self.model,
                                               cache_dir=self.config.cache_dir)
        if mode not in (None, "exact", "fast"):
            raise ValueError(f"mode must be 'exact' or 'fast', not {mode!r}")
        self.mode: Mode = mode or ("exact" if self.backend_name == "onnxruntime" else "fast")
        prepare = getattr(self.backend, "prepare", None)
        if prepare is not None:  # compile for the patch shape now: model-load time, not the first case
            prepare((batch if self.mode == "exact" else 1, 1, *self.model.patch_size))
        self.load_seconds = time.perf_counter() - t0
        self.step = step
        self.accumulate = accumulate
        self.batch = batch

    # -- stages -----------------------------------------------------------------------------------
    def preprocess(self, image: Image3D) -> tuple[Resampled, NetworkInput]:
        """Canonical RAS+, resample to the model spacing, nnU-Net crop and normalisation."""
        spacing_nib = tuple(np.asarray(self.model.spacing)[np.argsort(self.model.nnunet_axes)])
        resample = getattr(self.backend, "to_model_grid", None) if self.mode == "fast" else None
        if resample is not None:  # e.g. the GPU backend resamples on the device
            resampled = resample(image, spacing_nib)
        else:
            resampled = to_model_grid(image, spacing_nib, fast=self.mode == "fast")
        return resampled, network_input(resampled, self.model)

    def n_tiles(self, net_input: NetworkInput) -> int:
        shape = [max(s, p) for s, p in zip(net_input.data.shape[1:], self.model.patch_size)]
        return len(tiles(tuple(shape), self.model.patch_size, self.step))

    def infer(self, net_input: NetworkInput, *, keep_logits: bool = False,
              progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Sliding-window inference; returns (labels in nnU-Net order on the cropped grid, logits or None).

        In ``fast`` mode without ``keep_logits`` the labels come from :func:`sliding_window_labels` (or the
        backend's own device-side sliding window); logits are only computed when asked for.
        """
        if self.mode == "fast" and not keep_logits:
            own = getattr(self.backend, "sliding_window_labels", None)
            if own is not None:
                return own(net_input.data, self.model.patch_size, self.model.num_channels_out,
                           step=self.step, progress=progress), None
            return sliding_window_labels(net_input.data, self.backend, self.model.patch_size,
                                         self.model.num_channels_out, step=self.step, threads=self.threads,
                                         progress=progress), None
        logits = sliding_window_logits(net_input.data, self.backend, self.model.patch_size,
                                       self.model.num_channels_out, step=self.step,
                                       accumulate=self.accumulate, batch=self.batch, progress=progress)
        return argmax_channels(logits), (logits if keep_logits else None)

    def segment(self, image: Image3D, *, keep_logits: bool = False, timings: Timings | None = None,
                progress: Callable[[int], None] | None = None) -> SegmentationResult:
        """Run preprocess, infer and postprocess on a loaded image (see :class:`SegmentationResult`)."""
        tm = timings or Timings()
        with tm.stage("preprocess"):
            resampled, net_in = self.preprocess(image)
        with tm.stage("infer"):
            labels_nn, logits = self.infer(net_in, keep_logits=keep_logits, progress=progress)
        with tm.stage("postprocess"):
            zoom = getattr(self.backend, "zoom_labels", None) if self.mode == "fast" else None
            labels = to_input_grid(labels_nn, net_in, resampled, self.model, zoom=zoom)
            mlabels = model_grid_labels(labels_nn, net_in, self.model)
        return SegmentationResult(labels=labels, affine=image.affine, header=image.header,
                                  model_labels=mlabels, model_ct=resampled.data, model_affine=resampled.affine,
                                  timings=tm, logits=logits, n_tiles=self.n_tiles(net_in))

    def segment_file(self, input_path: str | Path, output: str | Path, *, ml: bool = True,
                     roi_subset: list[str] | None = None, statistics: bool | str | Path = False,
                     timings_path: str | Path | None = None, force: bool = False,
                     passport: Callable[[SegmentationResult, Timings], None] | None = None,
                     progress: Callable[[int], None] | None = None,
                     image: Image3D | None = None, timings: Timings | None = None,
                     stats_include_incomplete: bool = False) -> SegmentationResult:
        """Segment ``input_path`` and write TotalSegmentator-style outputs.

        ``ml``: one uint8 multilabel NIfTI with the label table extension at ``output``; otherwise ``output``
        is a folder with one ``<class>.nii.gz`` mask per class. ``statistics`` writes ``statistics.json``
        beside the output (or to the given path); classes within 3 voxels of the border get 0 unless
        ``stats_include_incomplete`` (TotalSegmentator's ``-sii``). Nothing is written when any stage fails. ``image`` (with
        ``timings`` holding its load time) skips loading when the caller already read the input.
        """
        out = Path(output)
        check_writable(out, force, folder=not ml)
        classes = classes_for(roi_subset)
        tm = timings or Timings()
        if image is None:
            image = load_input(input_path, tm)
        result = self.segment(image, timings=tm, progress=progress)
        if roi_subset:
            keep_classes(result, classes)
        if passport is not None:
            with tm.stage("passport"):
                passport(result, tm)
        with tm.stage("write"):
            write_segmentation(result.labels, image.affine, image.header, out, classes, ml=ml)
            if statistics:
                write_statistics(result, classes, statistics, out, ml=ml,
                                 include_incomplete=stats_include_incomplete)
        if timings_path is not None:
            info = tm.as_dict()
            info.update(model_load_seconds=round(self.load_seconds, 6), backend=self.backend_name,
                        model_id=self.model.model_id, n_tiles=result.n_tiles, input=str(input_path))
            write_text_atomic(Path(timings_path), json.dumps(info, indent=2))
        return result


def keep_classes(result: SegmentationResult, classes: dict[int, str]) -> None:
    """Set every label not in ``classes`` to 0 in ``result.labels`` (input grid) and ``result.model_labels``
    (model grid), in place, so the output, the passport and the statistics describe the same subset."""
    keep = np.zeros(256, dtype=bool)
    keep[list(classes)] = True
    result.labels = np.where(keep[result.labels], result.labels, 0).astype(np.uint8)
    result.model_labels = np.where(keep[result.model_labels], result.model_labels, 0).astype(np.uint8)


def write_statistics(result: SegmentationResult, classes: dict[int, str], statistics: bool | str | Path,
                     output: str | Path, *, ml: bool, include_incomplete: bool = False) -> Path:
    """Write ``statistics.json`` of ``result`` (on the model grid, as TotalSegmentator) to the path
    ``statistics`` or, for ``True``, :func:`statistics_path` of ``output``; classes within 3 voxels of the
    border get 0 unless ``include_incomplete`` (TotalSegmentator's ``-sii``). Atomic; returns the path."""
    stats = basic_statistics(result.model_labels, result.model_ct, result.model_affine, classes,
                             exclude_masks_at_border=not include_incomplete)
    target = Path(statistics) if isinstance(statistics, (str, Path)) else statistics_path(output, ml=ml)
    write_text_atomic(target, json.dumps(stats, indent=4))
    return target


def statistics_path(output: str | Path, *, ml: bool) -> Path:
    """Where ``--statistics`` writes ``statistics.json``: beside a single output file (``--ml``, DICOM SEG),
    inside a per-class mask folder otherwise (as TotalSegmentator)."""
    out = Path(output)
    return (out.parent if ml else out) / "statistics.json"


def classes_for(roi_subset: list[str] | None) -> dict[int, str]:
    """``{id: name}`` of the classes to output (all 117, or the ``--roi_subset`` names)."""
    try:
        return resolve_roi_subset(roi_subset)
    except ValueError as exc:
        raise InputError(str(exc), hint="`ctpassport classes` lists the names") from None


def load_input(path: str | Path, timings: Timings | None = None, series_uid: str | None = None) -> Image3D:
    """The ``load`` stage: read and validate the CT (NIfTI file, DICOM folder or zip; see ``io.load``)."""
    tm = timings or Timings()
    with tm.stage("load"):
        return load_ct(path, series_uid=series_uid)


def write_segmentation(labels: np.ndarray, affine: Affine, header: Any, out: Path, classes: dict[int, str],
                       *, ml: bool) -> None:
    """Write labels like TotalSegmentator: a multilabel file with label table, or a folder of masks.

    ``labels``: the input's storage order and shape, with its ``affine`` (voxel -> RAS+ mm). The input's
    header is copied (geometry, units, codes) with the data type set to uint8.
    """
    from ..io.labels import add_label_table

    if ml:
        img = make_nifti(labels.astype(np.uint8, copy=False), affine, header, dtype=np.uint8)
        add_label_table(img, classes)
        save_nifti(img, out)
        return
    with atomic_path(out, is_dir=True) as tmp:
        for k, name in classes.items():
            mask = (labels == k).astype(np.uint8)
            save_nifti(make_nifti(mask, affine, header, dtype=np.uint8), tmp / f"{name}.nii.gz")
