"""One benchmark configuration in a process of its own: ``python -m ctpassport.bench.worker SPEC_JSON``.

The parent (:mod:`ctpassport.bench.runner`) starts one worker per configuration and keeps it for the whole
benchmark, so each configuration loads its model once and is measured in isolation (its own peak memory,
its own thread settings and CPU affinity). Protocol: one JSON command per line on stdin; each answer is
one line ``@@ctpassport-bench@@ {json}`` on the original stdout (everything else the libraries print is
sent to stderr, which the parent keeps as a log).

Commands: ``{"cmd": "run", "case": CT, "out": NIfTI, "passport": JSON or null}`` -> seconds per stage,
total, CPU seconds, peak memory; ``{"cmd": "margins", "case": CT, "out": .npy}`` -> top-2 logit margins of
the exact fp32 path on the input grid (float16); ``{"cmd": "quit"}``.

Configurations (``spec["kind"]``):

* ``vanilla``: TotalSegmentator's Python API, ``totalsegmentator(case, out, fast=True, ml=True,
  device=...)`` with its default settings. Stage times come from wrapping TotalSegmentator's own functions
  in this process: ``load`` = reading the input (``get_fdata`` before the prediction), ``preprocess`` =
  ``as_closest_canonical`` + ``change_spacing``, ``model_init`` = ``nnUNetPredictor
  .initialize_from_trained_model_folder`` (done on every call by the API), ``infer`` = the rest of
  ``nnUNetv2_predict`` (nnU-Net's preprocessing, sliding window, export, its temporary files),
  ``postprocess`` = resampling back + ``undo_canonical`` + reading the prediction, ``write`` = saving the
  output; ``other`` = the remainder (API checks, temporary input file, ...). ``torch.set_num_threads`` is
  capped at the benchmark's thread count.
* ``ctpassport``: :class:`~ctpassport.segment.pipeline.Segmenter` with the given backend and mode;
  stages are the pipeline's own (load, preprocess, infer, postprocess, passport, write).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from typing import Any

MARKER = "@@ctpassport-bench@@ "


def apply_cpu_settings(threads: int | None, cpus: list[int] | None) -> dict[str, Any]:
    """Pin this process (and its future children) to ``cpus`` and export thread-count variables.

    Returns what is in effect: ``{"threads": n, "cpus": [...]}``.
    """
    if cpus:
        try:
            os.sched_setaffinity(0, set(cpus))
        except (AttributeError, OSError) as exc:  # pragma: no cover - not Linux / bad CPU list
            raise SystemExit(f"cannot set CPU affinity {cpus}: {exc}") from None
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        allowed = list(range(os.cpu_count() or 1))
    n = int(threads) if threads else len(allowed)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_MAX_THREADS"):
        os.environ[var] = str(n)
    return {"threads": n, "cpus": allowed}


class _Clock:
    """Wall time per stage of TotalSegmentator's run, from wrapped functions (outermost call counts)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.predicted = False
        self._depth = 0

    def reset(self) -> None:
        self.seconds = defaultdict(float)
        self.predicted = False
        self._depth = 0

    def wrap(self, fn: Callable[..., Any], stage: Callable[[tuple, dict], str], *,
             always: bool = False, after: Callable[[], None] | None = None) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            name = stage(args, kwargs)
            if self._depth and not always:
                return fn(*args, **kwargs)
            self._depth += 0 if always else 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self._depth -= 0 if always else 1
                if after is not None:
                    after()

        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapper


class VanillaRunner:
    """TotalSegmentator's Python API with per-stage clocks (see the module docstring)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import warnings

        warnings.filterwarnings("ignore")
        for k, v in (spec.get("env") or {}).items():
            os.environ[k] = str(v)
        t0 = time.perf_counter()
        import nibabel
        import torch
        from nibabel.dataobj_images import DataobjImage
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from totalsegmentator import nnunet as ts_nnunet
        from totalsegmentator.python_api import totalsegmentator

        self.import_seconds = time.perf_counter() - t0
        self.device = spec.get("device", "cpu")
        cap = int(spec["threads"])
        real_set = torch.set_num_threads
        torch.set_num_threads = lambda n: real_set(max(1, min(int(n), cap)))  # type: ignore[assignment]
        torch.set_num_threads(cap)
        self.clock = clock = _Clock()
        self._out: str | None = None

        def after_predict() -> None:
            clock.predicted = True

        for name in ("change_spacing", "as_closest_canonical", "undo_canonical"):
            fn = getattr(ts_nnunet, name)
            setattr(ts_nnunet, name, clock.wrap(
                fn, lambda a, k: "postprocess" if clock.predicted else "preprocess"))
        ts_nnunet.nnUNetv2_predict = clock.wrap(ts_nnunet.nnUNetv2_predict, lambda a, k: "infer",
                                                after=after_predict)
        nnUNetPredictor.initialize_from_trained_model_folder = clock.wrap(
            nnUNetPredictor.initialize_from_trained_model_folder, lambda a, k: "model_init", always=True)
        real_save = nibabel.save
        nibabel.save = clock.wrap(real_save, lambda a, k: "write" if self._is_output(a) else "other")
        ts_nnunet.nib.save = nibabel.save
        DataobjImage.get_fdata = clock.wrap(  # type: ignore[method-assign]
            DataobjImage.get_fdata, lambda a, k: "postprocess" if clock.predicted else "load")
        self.totalsegmentator = totalsegmentator
        from importlib.metadata import version

        self.info = {"backend": f"pytorch (TotalSegmentator {version('TotalSegmentator')})", "mode": "vanilla",
                     "precision": "fp32",
                     "import_s": round(self.import_seconds, 3), "model_load_s": None,
                     "torch_threads": torch.get_num_threads()}

    def _is_output(self, args: tuple) -> bool:
        return len(args) > 1 and self._out is not None and str(args[1]) == self._out

    def run(self, case: str, out: str, passport: str | None) -> dict[str, Any]:
        self.clock.reset()
        self._out = out
        t0 = time.perf_counter()
        self.totalsegmentator(case, out, fast=True, ml=True, device=self.device, quiet=True)
        total = time.perf_counter() - t0
        sec = dict(self.clock.seconds)
        init = sec.get("model_init", 0.0)
        if "infer" in sec:
            sec["infer"] = max(0.0, sec["infer"] - init)
        sec["other"] = sec.get("other", 0.0) + max(0.0, total - sum(sec.values()))
        return {"seconds": sec, "total_s": total, "n_tiles": None}


class PipelineRunner:
    """ctpassport's :class:`~ctpassport.segment.pipeline.Segmenter` for one backend and mode."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from ..config import Config
        from ..segment.pipeline import Segmenter

        cfg = Config.from_env(cache_dir=spec.get("cache_dir"))
        t0 = time.perf_counter()
        self.seg = Segmenter(spec["model"], backend=spec["backend"], threads=spec["threads"], config=cfg,
                             mode=spec.get("mode"))
        self.info = {"backend": self.seg.backend_name, "mode": self.seg.mode,
                     "precision": getattr(self.seg.backend, "precision", "fp32"),
                     "model_load_s": round(time.perf_counter() - t0, 3), "model_id": self.seg.model.model_id,
                     "onnx": str(self.seg.onnx_path) if self.seg.onnx_path is not None else None}

    def run(self, case: str, out: str, passport: str | None) -> dict[str, Any]:
        from ..segment.pipeline import Timings

        seg = self.seg
        tm = Timings()
        fn = None
        if passport:
            from ..passport.build import passport_from_segmentation

            def fn(result: Any, tm_: Any) -> None:
                passport_from_segmentation(result, passport, input_path=case, grid="model",
                                           model_id=seg.model.model_id, timings=tm_.seconds)
        t0 = time.perf_counter()
        res = seg.segment_file(case, out, ml=True, force=True, passport=fn, timings=tm)
        total = time.perf_counter() - t0
        sec = dict(tm.seconds)
        sec["other"] = max(0.0, total - sum(sec.values()))
        return {"seconds": sec, "total_s": total, "n_tiles": res.n_tiles}

    def margins(self, case: str, out: str) -> dict[str, Any]:
        """Top-2 logit margins of this (exact) path on the input grid, saved as float16 ``.npy``."""
        import numpy as np

        from ..io.nifti import read_image
        from ..segment.postprocess import to_input_grid
        from ..segment.sliding_window import top2_margin

        seg = self.seg
        image = read_image(case, kind="CT")
        res, net_in = seg.preprocess(image)
        _, logits = seg.infer(net_in, keep_logits=True)
        assert logits is not None
        margin = top2_margin(logits).astype(np.float16)
        del logits
        m = to_input_grid(margin, net_in, res, seg.model)
        from ..io.atomic import atomic_path

        with atomic_path(out) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.asarray(m))
        return {"out": out}


def _serve(spec: dict[str, Any], reply: Callable[[dict[str, Any]], None]) -> None:
    from .memory import PeakMemory, cpu_seconds

    settings = apply_cpu_settings(spec.get("threads"), spec.get("cpus"))
    spec["threads"] = settings["threads"]
    try:
        runner: VanillaRunner | PipelineRunner = (VanillaRunner(spec) if spec["kind"] == "vanilla"
                                                   else PipelineRunner(spec))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which marks the config failed
        reply({"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
               "traceback": traceback.format_exc()[-3000:]})
        return
    reply({"ok": True, "info": {**runner.info, **settings, "pid": os.getpid()}})
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        cmd = msg.get("cmd")
        if cmd == "quit":
            reply({"ok": True})
            return
        try:
            if cmd == "run":
                c0 = cpu_seconds()
                with PeakMemory() as mem:
                    out = runner.run(msg["case"], msg["out"], msg.get("passport"))
                out.update(cpu_s=cpu_seconds() - c0, peak_mem_mb=mem.peak_mib, peak_rss_self_mb=mem.self_peak_mib,
                           peak_children_mb=mem.children_peak_mib, memory_method=mem.method,
                           loadavg=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
                reply({"ok": True, **out})
            elif cmd == "margins":
                if not isinstance(runner, PipelineRunner):
                    raise ValueError("margins need a ctpassport configuration")
                reply({"ok": True, **runner.margins(msg["case"], msg["out"])})
            else:
                raise ValueError(f"unknown command {cmd!r}")
        except Exception as exc:  # noqa: BLE001
            reply({"ok": False, "error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}",
                   "traceback": traceback.format_exc()[-3000:]})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(args[0])
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # anything else printed (by us or by libraries) goes to the log
    sys.stdout = sys.stderr

    def reply(obj: dict[str, Any]) -> None:
        proto.write(MARKER + json.dumps(obj) + "\n")
        proto.flush()

    _serve(spec, reply)
    return 0


if __name__ == "__main__":
    sys.exit(main())
