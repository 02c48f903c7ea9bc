"""Run the benchmark: every configuration in a worker process of its own, interleaved per case.

Order of work (one ``ctpassport bench`` run):

1. inputs: the given CTs plus resampled variants (:mod:`.inputs`);
2. one worker per configuration (:mod:`.worker`), each loading its model once (model-load time reported);
3. warm-up: every configuration segments the smallest case ``warmup`` times (not recorded);
4. ``repeat`` rounds; in each round every case is run by every configuration back to back, the order of
   the configurations rotating from round to round, so all configurations see the same background load
   (the project machine is shared) and ratios are fair;
5. margins of the exact fp32 path per case (for the agreement on confident voxels);
6. agreement of every configuration's output with the reference (``vanilla`` when it ran, else the exact
   ``onnx`` configuration when it ran);
7. the passport speed figures (:func:`ctpassport.passport.bench.passport_speed`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ConfigError, CTPassportError
from .inputs import Case, prepare_cases
from .metrics import agreement, summarize
from .worker import MARKER

STAGE_ORDER = ("load", "preprocess", "model_init", "infer", "postprocess", "passport", "write", "other")


@dataclass(frozen=True)
class ConfigSpec:
    """A named benchmark configuration."""

    name: str
    kind: str  # "vanilla" or "ctpassport"
    description: str
    backend: str | None = None
    mode: str | None = None


CONFIGS: dict[str, ConfigSpec] = {c.name: c for c in (
    ConfigSpec("vanilla", "vanilla", "TotalSegmentator (2.18 pinned) Python API (fast=True, ml=True), PyTorch fp32 on the "
               "same device, its default settings"),
    ConfigSpec("onnx", "ctpassport", "ONNX Runtime fp32, exact pipeline (nnU-Net's float16 sums, float64 "
               "resampling): the foundation's parity path", "onnxruntime", "exact"),
    ConfigSpec("onnx-fast", "ctpassport", "ONNX Runtime fp32 with the fast pipeline (float32 sums and resampling)",
               "onnxruntime", "fast"),
    ConfigSpec("openvino", "ctpassport", "OpenVINO fp32, static patch shape, fast pipeline", "openvino", "fast"),
    ConfigSpec("openvino-bf16", "ctpassport", "OpenVINO bfloat16 (AMX or AVX512-BF16; the first block and the "
               "last decoder stage fp32), "
               "argmax in the engine, fast pipeline", "openvino-bf16", "fast"),
    ConfigSpec("int8", "ctpassport", "OpenVINO int8 (NNCF post-training quantisation calibrated on real CT), "
               "fast pipeline", "openvino-int8", "fast"),
    ConfigSpec("optimized", "ctpassport", "the fastest configuration that keeps parity on this machine "
               "(backend 'auto'), fast pipeline", "auto", "fast"),
    ConfigSpec("gpu", "ctpassport", "PyTorch on CUDA: fp16 autocast, channels-last, torch.compile, resampling "
               "and sliding window on the GPU", "cuda", "fast"),
    ConfigSpec("torch", "ctpassport", "the GPU code path run on the CPU in fp32 (PyTorch)", "torch", "fast"),
)}


#: The reference of agreement and speedups, in order of preference: the first of these that ran.
REFERENCES = ("vanilla", "onnx")


def resolve_configs(text: str) -> list[ConfigSpec]:
    """``"vanilla,onnx,optimized"`` -> specs (unknown names are a :class:`ConfigError`)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--configs is empty", hint=f"choose from {', '.join(CONFIGS)}")
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        raise ConfigError(f"unknown configuration(s) {', '.join(bad)}", hint=f"choose from {', '.join(CONFIGS)}")
    if len(set(names)) != len(names):
        raise ConfigError("a configuration is named twice in --configs")
    return [CONFIGS[n] for n in names]


@dataclass
class BenchSettings:
    inputs: list[str]
    model: str | None
    out_dir: Path
    configs: list[ConfigSpec]
    repeat: int = 3
    warmup: int = 1
    variants: list[str] = field(default_factory=list)
    threads: int | None = None
    cpus: list[int] | None = None
    price_per_hour: float | None = None
    passport: bool = True
    margins: bool = True
    passport_speed: str = "quick"  # quick | full | off
    device: str = "cpu"
    keep_outputs: bool = False
    command: str = ""


class WorkerError(CTPassportError):
    """A benchmark configuration could not start or failed (a model or backend problem: exit 3)."""

    exit_code = 3


class Worker:
    """A running worker process (see :mod:`.worker`)."""

    def __init__(self, spec: dict[str, Any], log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "ctpassport.bench.worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=env, bufsize=1)
        self.info: dict[str, Any] = {}

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                raise WorkerError(f"worker {self.spec['config']!r} exited (code {self.proc.returncode}); "
                                  f"last log lines: {self.log_tail()}")
            if line.startswith(MARKER):
                return json.loads(line[len(MARKER):])

    def log_tail(self, n: int = 3) -> str:
        self._log.flush()
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return " | ".join(lines[-n:])[-600:]

    def start(self) -> dict[str, Any]:
        msg = self._read()
        if not msg.get("ok"):
            raise WorkerError(f"configuration {self.spec['config']!r} could not start: {msg.get('error')}")
        self.info = msg["info"]
        return self.info

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        msg = self._read()
        if not msg.get("ok"):
            raise WorkerError(f"configuration {self.spec['config']!r} failed on {cmd.get('case')}: {msg.get('error')}")
        return msg

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:  # ask it to quit without waiting for an answer: after a Ctrl-C it may never give one
                    assert self.proc.stdin is not None
                    self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                    self.proc.stdin.flush()
                except (OSError, ValueError):
                    pass
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    try:
                        pipe.close()
                    except OSError:
                        pass
            self._log.close()


def _totalseg_env(model: Path | None, work: Path) -> dict[str, str]:
    """Environment that makes TotalSegmentator use ``model`` (a home dir or a trainer folder)."""
    from ..model.folder import FAST_DATASET, FAST_TRAINER_FOLDER, locate_model
    from ..model.standin import write_totalseg_home_config

    trainer = locate_model(model)
    home_candidate = trainer.parents[3] if len(trainer.parents) > 3 else None
    if (home_candidate is not None and trainer.parent.name == FAST_DATASET and trainer.name == FAST_TRAINER_FOLDER
            and trainer.parents[1].name == "results" and trainer.parents[2].name == "nnunet"):
        home = home_candidate
        write_totalseg_home_config(home) if os.access(home, os.W_OK) else None
        return {"TOTALSEG_HOME_DIR": str(home), "TOTALSEG_WEIGHTS_PATH": str(trainer.parents[1])}
    # a trainer folder elsewhere: link it into a private weights folder of TotalSegmentator's layout
    weights = work / "totalseg_home" / "nnunet" / "results"
    link = weights / FAST_DATASET / FAST_TRAINER_FOLDER
    link.parent.mkdir(parents=True, exist_ok=True)
    if (link.is_symlink() or link.exists()) and link.resolve() != trainer.resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(trainer.resolve(), target_is_directory=True)
    write_totalseg_home_config(work / "totalseg_home")
    return {"TOTALSEG_HOME_DIR": str(work / "totalseg_home"), "TOTALSEG_WEIGHTS_PATH": str(weights)}


def _source_revision() -> dict[str, Any] | None:
    """The git commit (and whether the tree had changes) of the ctpassport checkout that ran, or None when it
    is not a git checkout (an installed wheel: its version says it)."""
    import subprocess

    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return None
    return {"git_commit": commit, "uncommitted_changes": dirty}


def _worker_spec(cfg: ConfigSpec, s: BenchSettings, work: Path) -> dict[str, Any]:
    from ..config import Config

    spec: dict[str, Any] = {"config": cfg.name, "kind": cfg.kind, "threads": s.threads, "cpus": s.cpus,
                            "model": s.model, "cache_dir": str(Config.from_env().cache_dir)}
    if cfg.kind == "vanilla":
        spec["env"] = _totalseg_env(Path(s.model) if s.model else None, work)
        spec["device"] = "gpu" if s.device.startswith(("gpu", "cuda")) else "cpu"  # TotalSegmentator's names
    else:
        backend = cfg.backend
        if backend == "auto":
            from ..segment.backends import auto_backend

            backend = auto_backend(s.device)
        spec["backend"] = backend
        spec["mode"] = cfg.mode
    return spec


def _unavailable(cfg: ConfigSpec, device: str) -> str:
    """Why a configuration cannot run here ("" when it can)."""
    if cfg.kind == "vanilla":
        import importlib.util

        return "" if importlib.util.find_spec("totalsegmentator") else "TotalSegmentator is not installed"
    from ..segment.backends import auto_backend, unavailable_reason

    backend = auto_backend(device) if cfg.backend == "auto" else str(cfg.backend)
    return unavailable_reason(backend)


def run_benchmark(s: BenchSettings, *, log: Callable[[str], None] = lambda m: None,
                  progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark described by ``s``; returns the results dict (also written by the caller).

    ``progress(done, total, what)`` is called after every unit of work (model load, run, margin map).
    """
    from ..model.classes import TOTAL_CLASSES
    from .machine import machine_info

    started = datetime.now(UTC)
    out = s.out_dir
    work = out / "work"
    cases, notes = prepare_cases(s.inputs, s.variants, out, log=log)
    cases_sorted = sorted(cases, key=lambda c: c.voxels)

    available = [c for c in s.configs if not _unavailable(c, s.device)]
    skipped = {c.name: _unavailable(c, s.device) for c in s.configs if _unavailable(c, s.device)}
    need_margins = (s.margins and any(c.kind == "ctpassport" for c in available)
                    and any(c.name in REFERENCES for c in available))  # margins only qualify an agreement
    n_units = (len(available) + len(available) * s.warmup + len(available) * len(cases) * s.repeat
               + (len(cases) if need_margins else 0))
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, n_units, what)

    workers: dict[str, Worker] = {}
    config_info: dict[str, Any] = {}
    runs: list[dict[str, Any]] = []
    try:
        for cfg in available:
            log(f"starting {cfg.name}")
            w = Worker(_worker_spec(cfg, s, work), out / "logs" / f"{cfg.name}.log")
            workers[cfg.name] = w
            try:
                config_info[cfg.name] = w.start()
            except WorkerError as exc:
                skipped[cfg.name] = str(exc)
                w.close()
                del workers[cfg.name]
            tick(f"loaded {cfg.name}")
        active = [c for c in available if c.name in workers]
        if not active:
            raise WorkerError("no configuration could run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        outputs = out / "outputs"
        passports = work / "passports"
        for k in range(s.warmup):
            for cfg in active:
                c = cases_sorted[0]
                workers[cfg.name].call(cmd="run", case=c.path, out=str(work / "warmup" / cfg.name / f"{c.name}.nii.gz"),
                                       passport=str(passports / f"warmup_{cfg.name}.json") if s.passport else None)
                tick(f"warm-up {cfg.name}")
        order = 0
        for r in range(s.repeat):
            for c in cases:
                shift = (r + cases.index(c)) % len(active)
                for cfg in active[shift:] + active[:shift]:
                    dst = outputs / cfg.name / f"{c.name}.nii.gz"
                    pp = (str(passports / cfg.name / f"{c.name}.json")
                          if s.passport and cfg.kind == "ctpassport" else None)
                    res = workers[cfg.name].call(cmd="run", case=c.path, out=str(dst), passport=pp)
                    runs.append({"case": c.name, "config": cfg.name, "repeat": r, "order": order,
                                 "seconds": {k: round(v, 6) for k, v in res["seconds"].items()},
                                 "total_s": round(res["total_s"], 6), "cpu_s": round(res["cpu_s"], 4),
                                 "peak_mem_mb": round(res["peak_mem_mb"], 1),
                                 "peak_rss_self_mb": round(res["peak_rss_self_mb"], 1),
                                 "peak_children_mb": round(res["peak_children_mb"], 1),
                                 "memory_method": res.get("memory_method"),
                                 "n_tiles": res.get("n_tiles"), "loadavg_1min": res.get("loadavg")})
                    order += 1
                    tick(f"{c.name} / {cfg.name} ({r + 1}/{s.repeat})")
        margin_files: dict[str, Path] = {}
        if need_margins:
            mw = workers.get("onnx")
            own = None
            if mw is None:
                own = Worker(_worker_spec(CONFIGS["onnx"], s, work), out / "logs" / "margins.log")
                own.start()
                mw = own
            try:
                for c in cases:
                    f = work / "margins" / f"{c.name}.npy"
                    mw.call(cmd="margins", case=c.path, out=str(f))
                    margin_files[c.name] = f
                    tick(f"margins {c.name}")
            finally:
                if own is not None:
                    own.close()
    finally:
        for w in workers.values():
            w.close()
    finished_runs = datetime.now(UTC)

    ran = {r["config"] for r in runs} | set(workers)
    # vanilla TotalSegmentator when it ran; else the exact fp32 ONNX pipeline (its parity path), if it ran
    reference = next((name for name in REFERENCES if name in ran), None)
    agreements = _agreements(cases, active, reference, outputs, margin_files, TOTAL_CLASSES, log)
    results: dict[str, Any] = {
        "benchmark": "ctpassport bench",
        "ctpassport_version": __version__,
        "ctpassport_source": _source_revision(),
        "command": s.command,
        "started": started.isoformat(timespec="seconds"),
        "finished_runs": finished_runs.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {
            "repeat": s.repeat, "warmup": s.warmup, "threads": s.threads, "cpus": s.cpus, "device": s.device,
            "price_per_hour": s.price_per_hour, "passport_stage": s.passport, "variants": s.variants,
            "model": _model_info(s.model), "reference": reference,
            "order": "configurations interleaved per case; their order rotates every round",
        },
        "configs": {c.name: {"description": c.description, "kind": c.kind,
                             **({"backend": config_info[c.name].get("backend"), **config_info[c.name]}
                                if c.name in config_info else {}),
                             **({"skipped": skipped[c.name]} if c.name in skipped else {})} for c in s.configs},
        "cases": [c.as_dict() for c in cases],
        "input_notes": notes,
        "runs": runs,
    }
    results["summary"] = summarize_runs(results, cases, [c.name for c in active], reference, s.price_per_hour)
    results["agreement"] = agreements
    results["passport_speed"] = _passport_speed(s.passport_speed, work, log)
    results["targets"] = check_targets(results)
    results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    if not s.keep_outputs:
        shutil.rmtree(outputs, ignore_errors=True)
    shutil.rmtree(work / "warmup", ignore_errors=True)
    shutil.rmtree(work / "margins", ignore_errors=True)
    return results


def _model_info(model: str | None) -> dict[str, Any]:
    import json as _json

    from ..model.folder import load_model_folder, locate_model

    m = load_model_folder(locate_model(model))
    info: dict[str, Any] = {"path": str(m.path), "model_id": m.model_id,
                            "features_per_stage": list(m.architecture.features_per_stage),
                            "patch_size_nnunet": list(m.patch_size)}
    try:  # stand-ins record their seed in the checkpoint; cheap check via plans/training files
        training = m.path / "training.json"
        info["kind"] = "trained" if training.is_file() else "unknown"
        if training.is_file():
            info["training"] = {k: v for k, v in _json.loads(training.read_text()).items()
                                if k in ("steps", "seed", "finished")}
    except (OSError, ValueError):
        pass
    from ..model.checkpoint import read_checkpoint_structure

    try:
        struct = read_checkpoint_structure(m.checkpoint)
        if isinstance(struct, dict) and isinstance(struct.get("ctpassport_standin"), dict):
            info["kind"] = "random stand-in"
            info["standin_seed"] = struct["ctpassport_standin"].get("seed")
    except Exception as exc:  # noqa: BLE001 - informative only
        info["checkpoint_note"] = f"not inspected ({type(exc).__name__})"
    return info


def _agreements(cases: list[Case], active: list[ConfigSpec], reference: str | None, outputs: Path,
                margin_files: dict[str, Path], names: dict[int, str], log: Callable[[str], None]) -> dict[str, Any]:
    import numpy as np

    from ..io.nifti import read_image

    if reference is None:
        return {"note": f"none of {' or '.join(REFERENCES)} ran: no reference to compare with"}
    out: dict[str, Any] = {}
    for c in cases:
        ref_path = outputs / reference / f"{c.name}.nii.gz"
        if not ref_path.is_file():
            continue
        ref_img = read_image(ref_path, kind="label map")
        ref = ref_img.data
        voxel_ml = float(abs(np.linalg.det(ref_img.affine[:3, :3]))) / 1000.0
        margin = np.load(margin_files[c.name]) if c.name in margin_files else None
        out[c.name] = {}
        for cfg in active:
            if cfg.name == reference:
                continue
            p = outputs / cfg.name / f"{c.name}.nii.gz"
            if p.is_file():
                log(f"agreement {c.name} / {cfg.name}")
                out[c.name][cfg.name] = agreement(read_image(p, kind="label map").data, ref, names, margin,
                                                   voxel_ml=voxel_ml)
    return out


def summarize_runs(results: dict[str, Any], cases: list[Case], configs: list[str], reference: str | None,
                   price: float | None) -> dict[str, Any]:
    """Per case and configuration: total / CPU / memory statistics, median stages, speedups, throughput, cost."""
    import statistics

    summary: dict[str, Any] = {}
    runs = results["runs"]
    for c in cases:
        per: dict[str, Any] = {}
        for name in configs:
            rs = [r for r in runs if r["case"] == c.name and r["config"] == name]
            if not rs:
                continue
            totals = [r["total_s"] for r in rs]
            stages = sorted({k for r in rs for k in r["seconds"]}, key=lambda k: (
                STAGE_ORDER.index(k) if k in STAGE_ORDER else len(STAGE_ORDER), k))
            med = statistics.median(totals)
            per[name] = {
                "total_s": summarize(totals),
                "cpu_s": summarize([r["cpu_s"] for r in rs]),
                "peak_mem_mb": summarize([r["peak_mem_mb"] for r in rs]),
                "stages_median_s": {k: statistics.median([r["seconds"].get(k, 0.0) for r in rs]) for k in stages},
                "n_tiles": rs[0].get("n_tiles"),
                "scans_per_hour": 3600.0 / med if med > 0 else None,
            }
            if price is not None and med > 0:
                per[name]["cost_per_1000_scans"] = price * 1000.0 * med / 3600.0
        if reference in per:
            ref = per[reference]
            ref_init = ref["stages_median_s"].get("model_init", 0.0)
            for name, e in per.items():
                e["speedup_median"] = ref["total_s"]["median"] / e["total_s"]["median"]
                e["speedup_min"] = ref["total_s"]["min"] / e["total_s"]["min"]
                e["speedup_cpu"] = ref["cpu_s"]["median"] / e["cpu_s"]["median"] if e["cpu_s"]["median"] else None
                e["speedup_excl_vanilla_model_init"] = ((ref["total_s"]["median"] - ref_init) / e["total_s"]["median"])
                e["memory_ratio"] = e["peak_mem_mb"]["max"] / ref["peak_mem_mb"]["max"]
        summary[c.name] = per
    return summary


def check_targets(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's CPU targets, evaluated on this run's figures: speedup >= 8 end to end per case, peak
    memory <= half of vanilla's on the largest case, and the parity bar that fits the model: on a random
    stand-in, agreement >= 0.999 on voxels whose top-2 logit margin exceeds 0.5 (its near-tie voxels make
    Dice meaningless); on a trained model, mean Dice >= 0.995 (fp32 backends) or >= 0.99 (bf16, int8)."""
    from ..segment.backends import FP32_BACKENDS

    standin = results.get("settings", {}).get("model", {}).get("kind") == "random stand-in"
    out: dict[str, Any] = {}
    summary = results.get("summary", {})
    agree = results.get("agreement", {})
    cases = results.get("cases", [])
    largest = max(cases, key=lambda c: c["voxels"])["name"] if cases else None
    for cname, per in summary.items():
        if "vanilla" not in per:
            continue
        for name, e in per.items():
            if name == "vanilla":
                continue
            entry = out.setdefault(name, {})
            entry.setdefault("speedup_ge_8", {})[cname] = bool(e["speedup_median"] >= 8)
            if cname == largest:
                entry["memory_le_half_of_vanilla_on_largest"] = bool(e["memory_ratio"] <= 0.5)
            a = agree.get(cname, {}).get(name)
            if a and not standin:
                backend = results["configs"].get(name, {}).get("backend")
                bar = 0.995 if backend in FP32_BACKENDS else 0.99
                # judged on organs of at least 1 ml (few-voxel fragments flip on single near-tie voxels)
                value = a.get("mean_dice_1ml", a["mean_dice"])  # None: no organ of 1 ml, nothing to judge
                entry.setdefault("mean_dice_bar", {})[cname] = {"bar": bar, "value": value,
                                                                "pass": None if value is None else bool(value >= bar)}
            elif a and a.get("agreement_margin_0.5") is not None:
                entry.setdefault("agreement_margin_0.5_ge_0.999", {})[cname] = bool(a["agreement_margin_0.5"] >= 0.999)
    return out


def _passport_speed(kind: str, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    if kind == "off":
        return {"skipped": "--passport-speed off"}
    try:
        from ..passport.bench import passport_speed
    except ImportError as exc:
        return {"skipped": f"ctpassport.passport.bench is not available ({exc})"}
    log("passport speed")
    t0 = time.perf_counter()
    if kind == "full":
        rep = passport_speed()
    elif kind == "tiny":
        rep = passport_speed(repeats_3mm=2, repeats_full=1, shape_3mm=(45, 45, 79), shape_full=None, points=50,
                             naive=False)
    else:
        rep = passport_speed(repeats_3mm=5, repeats_full=2, naive=False)
    rep["bench_seconds"] = round(time.perf_counter() - t0, 2)
    rep["settings"] = kind
    return rep
