"""`ctpassport bench` on a tiny configuration: it runs vanilla TotalSegmentator and two ctpassport pipelines,
and writes results.json, report.md, latency.png and dice.png, which are read back and checked."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from ctpassport.bench.memory import PeakMemory, reset_peak
from ctpassport.bench.metrics import agreement, dice_per_class, summarize
from ctpassport.cli import app
from ctpassport.io.atomic import OUTPUT_MARKER

runner = CliRunner()


# ------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------
def test_dice_and_agreement_analytic() -> None:
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[:5] = 1  # 500 voxels
    ref[5:, :2] = 2  # 100 voxels
    pred = ref.copy()
    pred[:5, :5] = 0  # organ 1 loses half
    pred[9, 9, 9] = 3  # an extra organ
    d = dice_per_class(pred, ref)
    assert d[1] == pytest.approx(2 * 250 / (250 + 500))
    assert d[2] == 1.0 and d[3] == 0.0
    names = {1: "spleen", 2: "liver", 3: "stomach"}
    margin = np.zeros(ref.shape, np.float16)
    margin[5:] = 1.0
    margin[9, 9, 9] = 0.0  # confident only where both agree
    a = agreement(pred, ref, names, margin)
    assert a["organs_missing"] == [] and a["organs_extra"] == ["stomach"]
    assert a["mean_dice"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert a["agreement_margin_0.5"] == 1.0 and a["confident_fraction_0.5"] == 0.499
    assert a["voxel_agreement"] == pytest.approx(1 - 251 / 1000)
    big = agreement(pred, ref, names, voxel_ml=0.01)  # 500 voxels = 5 ml, 100 = 1 ml, 1 voxel = 0.01 ml
    assert big["mean_dice_1ml"] == pytest.approx((2 / 3 + 1) / 2) and big["organs_below_1ml"] == ["stomach"]
    assert agreement(pred, ref, names, voxel_ml=1e-6)["mean_dice_1ml"] is None  # no organ to judge: no figure
    s = summarize([3.0, 1.0, 2.0, 10.0])
    assert s["min"] == 1.0 and s["median"] == 2.5 and s["max"] == 10.0 and 3.0 < s["p95"] < 10.0


def test_peak_memory_is_per_run_not_per_process() -> None:
    if not reset_peak():
        pytest.skip("the kernel does not allow resetting VmHWM here")
    with PeakMemory(interval=0.005) as big:
        block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
        time.sleep(0.05)
        del block
    with PeakMemory(interval=0.005) as small:
        time.sleep(0.05)
    assert big.peak_mib - small.peak_mib > 250  # ru_maxrss would report the 300 MiB again
    assert "clear_refs" in big.method


# ------------------------------------------------------------------------------------------------
# the command, end to end
# ------------------------------------------------------------------------------------------------
def _png(path: Path) -> np.ndarray:
    import matplotlib.image

    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200, img.shape
    assert float(img[..., :3].std()) > 0.02  # not a blank canvas
    return img


@pytest.mark.vanilla
@pytest.mark.torch
@pytest.mark.slow
def test_bench_tiny_end_to_end(tiny_home: Path, ct_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    args = ["bench", "-i", str(ct_dir / "example_ct_sm.nii.gz"), "--model", str(tiny_home), "-o", str(out),
            "--configs", "vanilla,onnx,optimized", "--repeat", "1", "--warmup", "0", "--variant", "2x2x2",
            "--price-per-hour", "0.5", "--threads", "2", "--cpus", ",".join(map(str, sorted(os.sched_getaffinity(0)))),
            "--passport-speed", "tiny", "-q"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output + (str(res.exception) if res.exception else "")
    assert res.stdout == ""  # quiet: the tables are in report.md (read below)

    r = json.loads((out / "results.json").read_text())
    assert r["machine"]["cpu_model"] and r["machine"]["libraries"]["numpy"]
    assert r["machine"]["logical_cpus"] >= 1 and "amx_bf16" in r["machine"]["cpu_features"]
    assert [c["name"] for c in r["cases"]] == ["example_ct_sm", "example_ct_sm_2x2x2mm"]
    assert r["cases"][1]["spacing_mm"] == [2.0, 2.0, 2.0] and r["cases"][1]["shape"] == [183, 152, 45]
    assert len(r["runs"]) == 2 * 3  # cases x configurations x repeats
    for run in r["runs"]:
        assert run["total_s"] > 0 and run["peak_mem_mb"] > 50 and run["cpu_s"] > 0
        assert sum(run["seconds"].values()) == pytest.approx(run["total_s"], rel=1e-3, abs=1e-3)
        if run["config"] == "vanilla":
            assert {"infer", "model_init", "write"} <= set(run["seconds"])
        else:
            assert {"load", "preprocess", "infer", "postprocess", "passport", "write"} <= set(run["seconds"])
    assert r["configs"]["onnx"]["backend"] == "onnxruntime" and r["configs"]["onnx"]["mode"] == "exact"
    assert r["configs"]["optimized"]["mode"] == "fast"
    assert r["configs"]["vanilla"]["threads"] == 2
    for case in ("example_ct_sm", "example_ct_sm_2x2x2mm"):
        per = r["summary"][case]
        assert per["vanilla"]["speedup_median"] == pytest.approx(1.0)
        for name in ("onnx", "optimized"):
            e = per[name]
            assert e["speedup_median"] == pytest.approx(per["vanilla"]["total_s"]["median"] / e["total_s"]["median"])
            assert e["scans_per_hour"] == pytest.approx(3600 / e["total_s"]["median"])
            assert e["cost_per_1000_scans"] == pytest.approx(0.5 * 1000 / e["scans_per_hour"])
            a = r["agreement"][case][name]
            assert 0 <= a["mean_dice"] <= 1 and 0 <= a["voxel_agreement"] <= 1
            assert a["agreement_margin_0.5"] is None or a["agreement_margin_0.5"] >= 0.99
        # the exact path reproduces TotalSegmentator even with a random tiny network
        assert r["agreement"][case]["onnx"]["agreement_margin_0.1"] >= 0.999
    assert r["settings"]["reference"] == "vanilla" and r["settings"]["cpus"]
    assert "maps" in r["passport_speed"] and r["passport_speed"]["maps"]["3mm"]["build_passport"]["median_s"] > 0
    assert "optimized" in r["targets"]

    md = (out / "report.md").read_text()
    assert "ctpassport bench -i" in md and "--configs vanilla,onnx,optimized" in md
    for needle in ("| configuration | backend | median s | min s | p95 s | speedup (median)", "## Stages",
                   "## Throughput and cost", "$0.5/h", "## Passport speed", "## Targets", "example_ct_sm_2x2x2mm"):
        assert needle in md, needle
    for name in ("vanilla", "onnx", "optimized"):
        assert f"| {name} |" in md or f"| **{name}** |" in md
    _png(out / "latency.png")
    _png(out / "dice.png")
    assert not (out / "outputs").exists()  # label maps are removed unless --keep-outputs

    again = runner.invoke(app, args)
    assert again.exit_code == 4 and "--force" in again.stderr


def test_without_vanilla_the_exact_onnx_run_is_the_reference(tiny_home: Path, ct_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    res = runner.invoke(app, ["bench", "-i", str(ct_dir / "example_ct_sm.nii.gz"), "--model", str(tiny_home), "-o",
                              str(out), "--configs", "onnx,onnx-fast", "--repeat", "1", "--warmup", "0",
                              "--passport-speed", "off", "-q"])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "results.json").read_text())
    assert r["settings"]["reference"] == "onnx"
    per = r["summary"]["example_ct_sm"]
    assert per["onnx-fast"]["speedup_median"] == pytest.approx(per["onnx"]["total_s"]["median"]
                                                              / per["onnx-fast"]["total_s"]["median"])
    assert 0.9 <= r["agreement"]["example_ct_sm"]["onnx-fast"]["voxel_agreement"] <= 1.0
    assert all(run["memory_method"] for run in r["runs"])
    case = r["cases"][0]  # what a rerun must match: the input's bytes and the code that ran
    assert len(case["sha256"]) == 64 and case["bytes"] == (ct_dir / "example_ct_sm.nii.gz").stat().st_size
    assert "ctpassport_source" in r and r["machine"]["physical_cores"] >= 1
    md = (out / "report.md").read_text()
    assert "Agreement is against `onnx`'s output" in md and r["machine"]["auto_backend_reason"] in md


def test_bench_rejects_bad_options(tmp_path: Path, ct_dir: Path) -> None:
    ct = str(ct_dir / "example_ct_sm.nii.gz")
    res = runner.invoke(app, ["bench", "-i", ct, "-o", str(tmp_path / "r"), "--configs", "vanilla,fastest"])
    assert res.exit_code != 0 and "fastest" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = runner.invoke(app, ["bench", "-i", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "r")])
    assert res.exit_code == 2 and "no such file" in res.stderr
    res = runner.invoke(app, ["bench", "-i", ct, "-o", str(tmp_path / "r"), "--variant", "0.8xfoo"])
    assert res.exit_code == 5 and "spacing" in res.stderr
    for bad in ("nan", "1,nan,1", "0"):  # NaN passed the range test and failed inside the resampling (exit 70)
        res = runner.invoke(app, ["bench", "-i", ct, "-o", str(tmp_path / "r"), "--variant", bad])
        assert res.exit_code == 5 and "needs three sizes in (0, 100] mm" in res.stderr, res.output
    res = runner.invoke(app, ["bench", "-i", ct, "-o", str(tmp_path / "r"), "--price-per-hour", "inf"])
    assert res.exit_code == 5 and "--price-per-hour must be a finite price" in res.stderr  # (JSON has no inf)
    labels_only = tmp_path / "labels_only"
    labels_only.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), str(labels_only / "seg.nii.gz"))
    res = runner.invoke(app, ["bench", "-i", str(labels_only), "-o", str(tmp_path / "r")])
    err = res.stderr.strip()
    assert res.exit_code == 2 and len(err.splitlines()) == 1 and "labels_only: no CT images found" in err
    assert "skipped seg.nii.gz: uint8 label map" in err
    res = runner.invoke(app, ["bench", "-i", ct, "-o", str(tmp_path / "r"), "--cpus", "999"])
    assert res.exit_code != 0 and "--cpus" in res.stderr
    res = runner.invoke(app, ["bench", "-i", ct, "-o", str(tmp_path / "r"), "--configs", "vanilla,fastest"])
    assert res.exit_code == 5  # a bad setting
    res = runner.invoke(app, ["bench", "-i", ct, "-o", str(tmp_path / "r"), "--device", "tpu"])
    assert res.exit_code == 5 and "--device" in res.stderr
    (tmp_path / "notes.nii.gz").write_text("not an image")
    res = runner.invoke(app, ["bench", "-i", str(tmp_path / "notes.nii.gz"), "-o", str(tmp_path / "r")])
    assert res.exit_code == 2 and "notes.nii.gz" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # nothing made before the inputs were read


def test_bench_fails_before_writing_and_a_failed_run_leaves_no_report(tmp_path: Path, ct_dir: Path,
                                                                       tiny_home: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ct = str(ct_dir / "example_ct_sm.nii.gz")
    res = runner.invoke(app, ["bench", "-i", ct, "-o", str(tmp_path / "r"), "--model", str(tmp_path / "nomodel"),
                              "--configs", "onnx", "-q"])
    assert res.exit_code == 3 and len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()

    import ctpassport.bench.runner as bench_runner

    def interrupted(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_runner, "run_benchmark", interrupted)
    args = ["bench", "-i", ct, "--model", str(tiny_home), "--configs", "onnx", "-q"]
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "new")])
    assert res.exit_code == 130 and not (tmp_path / "new").exists()  # a first run leaves no half folder
    old = tmp_path / "old"  # a --force rerun removes the last report first: a failed rerun shows no stale one
    old.mkdir()
    (old / OUTPUT_MARKER).write_text("")
    for name in ("results.json", "report.md", "latency.png", "dice.png"):
        (old / name).write_text("from an earlier run")
    res = runner.invoke(app, [*args, "-o", str(old), "--force"])
    assert res.exit_code == 130 and old.is_dir() and not (old / "report.md").exists()
    assert not (old / "results.json").exists()


def test_bench_never_writes_into_a_folder_it_did_not_make(tmp_path: Path, ct_dir: Path) -> None:
    """The report folder is filled in place: a folder holding someone's files is refused, --force or not."""
    ct = str(ct_dir / "example_ct_sm.nii.gz")
    proj = tmp_path / "project"
    (proj / "outputs").mkdir(parents=True)
    (proj / "outputs" / "important.txt").write_text("keep")
    (proj / "report.md").write_text("mine")
    for extra in ([], ["--force"]):
        res = runner.invoke(app, ["bench", "-i", ct, "-o", str(proj), "--configs", "onnx", "-q", *extra])
        assert res.exit_code == 4 and len(res.stderr.strip().splitlines()) == 1, res.output
    assert (proj / "outputs" / "important.txt").read_text() == "keep" and (proj / "report.md").read_text() == "mine"
    res = runner.invoke(app, ["bench", "-i", ct, "-o", ct, "--configs", "onnx", "-q"])
    assert res.exit_code == 4 and "is a file" in res.stderr


def test_bench_variants_of_inputs_named_alike_are_kept_apart(tmp_path: Path, ct_dir: Path) -> None:
    import nibabel as nib

    from ctpassport.bench.inputs import make_variant

    src = nib.load(str(ct_dir / "example_ct_sm.nii.gz"))
    for sub, crop in (("a", slice(None)), ("b", slice(0, 8))):
        (tmp_path / sub).mkdir()
        data = np.asanyarray(src.dataobj)[crop]
        nib.save(nib.Nifti1Image(data, src.affine, src.header), str(tmp_path / sub / "ct.nii.gz"))
    va = make_variant(tmp_path / "a" / "ct.nii.gz", (6.0, 6.0, 6.0), tmp_path / "cache")
    vb = make_variant(tmp_path / "b" / "ct.nii.gz", (6.0, 6.0, 6.0), tmp_path / "cache")
    assert va != vb and nib.load(str(va)).shape != nib.load(str(vb)).shape
    assert make_variant(tmp_path / "a" / "ct.nii.gz", (6.0, 6.0, 6.0), tmp_path / "cache") == va  # cached
    # an input named like another input's variant: two cases, two names (their runs were merged as one case)
    from ctpassport.bench.inputs import prepare_cases

    (tmp_path / "c").mkdir()
    nib.save(nib.load(str(vb)), str(tmp_path / "c" / "ct_6x6x6mm.nii.gz"))
    cases, _ = prepare_cases([tmp_path / "c" / "ct_6x6x6mm.nii.gz", tmp_path / "a" / "ct.nii.gz"], ["6"],
                             tmp_path / "work")
    names = [c.name for c in cases]
    assert len(set(names)) == len(names) == 4, names


@pytest.mark.parametrize(("device", "expected"), [("cpu", "cpu"), ("gpu", "gpu"), ("cuda", "gpu")])
def test_vanilla_gets_totalsegmentators_device_names(tiny_home: Path, tmp_path: Path, device: str,
                                                     expected: str) -> None:
    """TotalSegmentator's API takes 'gpu' or 'cpu' (it rejects 'cuda'): the vanilla worker is told that."""
    from ctpassport.bench.runner import CONFIGS, BenchSettings, _worker_spec

    s = BenchSettings(inputs=[], model=str(tiny_home), out_dir=tmp_path, configs=[CONFIGS["vanilla"]], device=device)
    assert _worker_spec(CONFIGS["vanilla"], s, tmp_path)["device"] == expected


def test_bench_with_no_configuration_able_to_run_is_a_backend_problem(tmp_path: Path, ct_dir: Path,
                                                                       tiny_home: Path) -> None:
    """Every named configuration failing to start (here: `gpu` without a CUDA GPU) exits 3, the README's "model
    or backend problem", with one line naming the configuration and why, and leaves no report folder."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU, so the gpu configuration can run [allowed]")
    res = runner.invoke(app, ["bench", "-i", str(ct_dir / "example_ct_sm.nii.gz"), "--model", str(tiny_home),
                              "-o", str(tmp_path / "r"), "--configs", "gpu", "--repeat", "1", "--warmup", "0",
                              "--passport-speed", "off", "--no-margins", "-q"])
    assert res.exit_code == 3, res.output
    assert "no configuration could run: gpu:" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
