"""Write a benchmark's results: ``results.json``, ``report.md``, ``latency.png`` and ``dice.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_path, write_text_atomic
from .runner import STAGE_ORDER

STAGE_COLORS = {"load": "#4e79a7", "preprocess": "#f28e2b", "model_init": "#b07aa1", "infer": "#e15759",
                "postprocess": "#76b7b2", "passport": "#59a14f", "write": "#edc948", "other": "#bab0ac"}


def _f(x: Any, digits: int = 2, suffix: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}{suffix}"
    return f"{x}{suffix}"


def _stages(results: dict[str, Any]) -> list[str]:
    present = {k for per in results["summary"].values() for e in per.values() for k in e["stages_median_s"]}
    return [s for s in STAGE_ORDER if s in present] + sorted(present - set(STAGE_ORDER))


def markdown_table(results: dict[str, Any], case: str) -> str:
    """The end-to-end table of one case (the study's columns plus agreement)."""
    per = results["summary"].get(case, {})
    agree = results.get("agreement", {}).get(case, {})
    cfgs = results["configs"]
    ref = results["settings"].get("reference")
    head = ("| configuration | backend | median s | min s | p95 s | speedup (median) | speedup (min) | "
            "speedup (CPU s) | peak memory MiB | mean Dice | voxel agreement | agreement, margin > 0.5 | "
            "missing / extra organs |")
    rows = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for name, e in per.items():
        a = agree.get(name, {})
        is_ref = name == ref
        rows.append("| " + " | ".join([
            f"**{name}**" if name == "optimized" else name,
            str(cfgs.get(name, {}).get("backend", "-")),
            _f(e["total_s"]["median"]), _f(e["total_s"]["min"]), _f(e["total_s"]["p95"]),
            _f(e.get("speedup_median"), 1, "x"), _f(e.get("speedup_min"), 1, "x"), _f(e.get("speedup_cpu"), 1, "x"),
            _f(e["peak_mem_mb"]["max"], 0),
            "reference" if is_ref else _f(a.get("mean_dice"), 4),
            "reference" if is_ref else _f(a.get("voxel_agreement"), 5),
            "reference" if is_ref else _f(a.get("agreement_margin_0.5"), 5),
            "-" if is_ref or not a else f"{len(a.get('organs_missing', []))} / {len(a.get('organs_extra', []))}",
        ]) + " |")
    return "\n".join(rows)


def stage_table(results: dict[str, Any]) -> str:
    stages = _stages(results)
    head = "| case | configuration | " + " | ".join(stages) + " | total (median) |"
    rows = [head, "|" + "|".join(["---"] * (len(stages) + 3)) + "|"]
    for case, per in results["summary"].items():
        for name, e in per.items():
            st = e["stages_median_s"]
            rows.append(f"| {case} | {name} | " + " | ".join(_f(st.get(s), 3) if s in st else "-" for s in stages)
                        + f" | {_f(e['total_s']['median'], 3)} |")
    return "\n".join(rows)


def cost_table(results: dict[str, Any]) -> str:
    price = results["settings"].get("price_per_hour")
    head = ("| case | configuration | scans per hour (one stream) | "
            + (f"cost of 1,000 scans at ${price:g}/h |" if price is not None else "cost of 1,000 scans |"))
    rows = [head, "|---|---|---|---|"]
    for case, per in results["summary"].items():
        for name, e in per.items():
            cost = e.get("cost_per_1000_scans")
            rows.append(f"| {case} | {name} | {_f(e.get('scans_per_hour'), 0)} | "
                        f"{('$' + format(cost, '.2f')) if cost is not None else 'give --price-per-hour'} |")
    return "\n".join(rows)


def targets_text(results: dict[str, Any]) -> str:
    lines = []
    for name, t in results.get("targets", {}).items():
        parts = []
        if "speedup_ge_8" in t:
            parts.append("speedup >= 8x: " + ", ".join(f"{c} {'yes' if ok else 'NO'}"
                                                      for c, ok in t["speedup_ge_8"].items()))
        if "memory_le_half_of_vanilla_on_largest" in t:
            parts.append("peak memory <= half of vanilla's on the largest case: "
                         + ("yes" if t["memory_le_half_of_vanilla_on_largest"] else "NO"))
        if "mean_dice_bar" in t:
            parts.append("mean Dice (organs >= 1 ml) bar: " + ", ".join(
                f"{c} n/a (no organ of 1 ml)" if v["value"] is None else
                f"{c} {v['value']:.4f} >= {v['bar']} {'yes' if v['pass'] else 'NO'}" for c, v in t["mean_dice_bar"].items()))
        if "agreement_margin_0.5_ge_0.999" in t:
            parts.append("agreement on margin > 0.5 >= 0.999: " + ", ".join(
                f"{c} {'yes' if ok else 'NO'}" for c, ok in t["agreement_margin_0.5_ge_0.999"].items()))
        lines.append(f"- **{name}**: " + "; ".join(parts))
    if not lines:
        return "- (no vanilla reference in this run)"
    kind = results.get("settings", {}).get("model", {}).get("kind")
    note = ("Parity on this random stand-in is judged on confident voxels (top-2 margin > 0.5); its Dice values "
            "are reported above but not judged (random weights make most voxels near-ties)."
            if kind == "random stand-in" else
            "Parity on this trained model: mean Dice >= 0.995 for fp32 backends, >= 0.99 for bf16/int8.")
    return "\n".join(lines) + "\n\n" + note


def passport_text(results: dict[str, Any]) -> str:
    ps = results.get("passport_speed") or {}
    if "skipped" in ps:
        return f"Not measured: {ps['skipped']}."
    lines = ["| map | shape | labels | build_passport median | min | budget | study's 2.1 s / ours |",
             "|---|---|---|---|---|---|---|"]
    for name, e in ps.get("maps", {}).items():
        b = e["build_passport"]
        lines.append(f"| {name} | {' x '.join(map(str, e['shape']))} | {e['labels_present']} | "
                     f"{1000 * b['median_s']:.1f} ms | {1000 * b['min_s']:.1f} ms | "
                     f"{1000 * ps['budgets_s'][name]:.0f} ms | {e['ratios']['study_over_ours']:.0f}x |")
    lines.append("")
    lines.append(f"From `ctpassport.passport.bench.passport_speed` ({ps.get('settings')} settings): "
                 + str(ps.get("what", "")) + ".")
    return "\n".join(lines)


def _source_line(results: dict[str, Any]) -> str:
    """Which ctpassport ran (version, git commit) and the inputs' SHA-256: what a rerun must match."""
    src = results.get("ctpassport_source") or {}
    rev = (f", commit {src['git_commit'][:12]}" + (" with uncommitted changes" if src.get("uncommitted_changes") else "")
           if src.get("git_commit") else "")
    inputs = "; ".join(f"{c['name']} sha256 {c['sha256'][:16]}" for c in results.get("cases", []) if c.get("sha256"))
    return f"ctpassport {results.get('ctpassport_version')}{rev}. Inputs: {inputs or '-'}."


def _memory_methods(results: dict[str, Any]) -> set[str]:
    """How the workers measured their peak memory in this run (see :mod:`.memory`)."""
    return {str(r["memory_method"]) for r in results.get("runs", []) if r.get("memory_method")}


def write_markdown(results: dict[str, Any], path: Path) -> Path:
    m = results["machine"]
    s = results["settings"]
    feats = ", ".join(k for k, v in m["cpu_features"].items() if v) or "none"
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if v)
    model = s["model"]
    out = [
        "# ctpassport benchmark",
        "",
        (f"Run {results['started']} to {results['finished']} (UTC) on **{m['cpu_model']}**, "
        f"{m['logical_cpus']} logical CPUs (affinity {m['affinity']}), {m['memory_total_mb']:.0f} MB RAM; "
        f"CPU features: {feats}. Load average at the end: {m['load_average']}."),
        f"Threads per configuration: {s['threads'] or 'all allowed'}; CPU affinity: {s['cpus'] or 'not pinned'}.",
        f"Model: `{model['model_id']}` ({model.get('kind', 'unknown')}; features {model['features_per_stage']}).",
        f"GPU: {m['gpu'].get('name') or m['gpu'].get('note')}.",
        (f"Backend `auto` (the `optimized` configuration) here: {m['auto_backend_reason']}."
         if m.get("auto_backend_reason") else ""),
        "",
        f"Command: `{results['command']}`" if results.get("command") else "",
        "",
        _source_line(results),
        "",
        f"Libraries: {libs}.",
        "",
        "## Summary",
        "",
        readme_table(results),
        "",
        "## End to end, file to file",
        "",
        (f"Seconds from reading the CT to the written label map (and passport where the pipeline makes one), "
        f"{s['repeat']} repeats after {s['warmup']} warm-up run(s); all configurations interleaved per case, "
        f"their order rotating each round. Speedups are relative to `{s.get('reference') or '-'}` in this run: "
        f"median/median, min/min and CPU-seconds/CPU-seconds. Agreement is against `{s.get('reference') or '-'}`'s output "
        "(Dice over the organs present in either map; margin > 0.5: voxels where the exact fp32 logits' "
        "top-2 margin exceeds 0.5)."),
        "",
    ]
    for c in results["cases"]:
        per = results["summary"].get(c["name"], {})
        tiles = next((e.get("n_tiles") for e in per.values() if e.get("n_tiles")), None)
        out += [f"### {c['name']}: {' x '.join(map(str, c['shape']))} voxels of "
                f"{' x '.join(f'{v:g}' for v in c['spacing_mm'])} mm ({c['orientation']})"
                + (f", {tiles} tile(s) at 3 mm" if tiles else ""), "", markdown_table(results, c["name"]), ""]
    out += ["## Stages (median seconds)", "",
            ("`model_init` is TotalSegmentator's per-call model loading (its Python API loads the network on "
            "every call); ctpassport loads its model once per process (see Configurations). `other` is the "
            "rest of the wall time (API overhead, temporary files)."), "", stage_table(results), "",
            "## Throughput and cost", "", cost_table(results), "",
            "## Targets (issue 5)", "", targets_text(results), "",
            "## Passport speed", "", passport_text(results), "",
            "## Configurations", ""]
    for name, c in results["configs"].items():
        if "skipped" in c:
            out.append(f"- `{name}`: {c['description']}. **Not run**: {c['skipped']}")
        else:
            extra = ", ".join(f"{k} {c[k]}" for k in ("backend", "mode", "precision", "model_load_s", "threads",
                                                        "cpus") if c.get(k) is not None)
            out.append(f"- `{name}`: {c['description']} ({extra})")
    if results.get("input_notes"):
        out += ["", "Inputs: " + "; ".join(results["input_notes"])]
    out += ["", "## How it was measured", "",
            ("- Each configuration runs in a worker process of its own (model loaded once), driven by one "
            "`ctpassport bench` process; vanilla calls TotalSegmentator's Python API in its worker."),
            ("- Peak memory per run (MiB) of the worker and its child processes (TotalSegmentator spawns "
            f"preprocessing/export processes), measured by: {'; '.join(sorted(_memory_methods(results))) or '-'}."),
            "- CPU seconds: user + system time of the worker and its children for the run.",
            "- The machine may be shared: compare configurations within this run (ratios), not across runs.",
            ]
    text = "\n".join(out) + "\n"
    write_text_atomic(path, text)
    return path


def plot_latency(results: dict[str, Any], path: Path) -> Path:
    """Stacked median stage seconds per configuration, one panel per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c["name"] for c in results["cases"] if results["summary"].get(c["name"])]
    stages = _stages(results)
    fig, axes = plt.subplots(1, max(1, len(cases)), figsize=(4.5 * max(1, len(cases)), 4.8), squeeze=False)
    for ax, case in zip(axes[0], cases):
        per = results["summary"][case]
        names = list(per)
        bottom = [0.0] * len(names)
        for st in stages:
            vals = [per[n]["stages_median_s"].get(st, 0.0) for n in names]
            ax.bar(names, vals, bottom=bottom, color=STAGE_COLORS.get(st, "#999999"), label=st)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for i, n in enumerate(names):  # the label is the median total (the tables' figure), not the stack's sum
            sp = per[n].get("speedup_median")
            total = per[n]["total_s"]["median"]
            ax.text(i, bottom[i], f"{total:.1f} s" + (f"\n{sp:.1f}x" if sp and n != "vanilla" else ""),
                    ha="center", va="bottom", fontsize=8)
        ax.set_title(case, fontsize=9)
        ax.set_ylabel("seconds (median)")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.set_ylim(0, max(bottom) * 1.25 if bottom and max(bottom) > 0 else 1)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(stages), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_dice(results: dict[str, Any], path: Path) -> Path:
    """Per-organ Dice against the reference, one panel per case, one marker series per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..model.classes import NAME_TO_ID

    agree = {k: v for k, v in (results.get("agreement") or {}).items() if isinstance(v, dict) and v}
    cases = [c for c in agree if any(agree[c].values())]
    fig, axes = plt.subplots(max(1, len(cases)), 1, figsize=(16, 3.6 * max(1, len(cases))), squeeze=False)
    if not cases:
        ax = axes[0][0]
        ax.text(0.5, 0.5, "no reference (vanilla or onnx) in this run: no agreement to plot", ha="center",
                va="center")
        ax.set_axis_off()
    markers = "osD^v<>ph*"
    for ax, case in zip(axes[:, 0], cases):
        organs = sorted({o for a in agree[case].values() for o in a["dice"]}, key=lambda o: NAME_TO_ID.get(o, 999))
        for k, (name, a) in enumerate(agree[case].items()):
            # an organ this configuration and the reference both lack has no Dice (a gap, not 0)
            ax.plot(range(len(organs)), [a["dice"].get(o, float("nan")) for o in organs], markers[k % len(markers)],
                    ms=4, alpha=0.8, label=f"{name} (mean {a['mean_dice']:.4f})")
        ax.set_xticks(range(len(organs)))
        ax.set_xticklabels(organs, rotation=90, fontsize=6)
        ax.set_ylim(min(0.9, min((v for a in agree[case].values() for v in a["dice"].values()), default=1)) - 0.02,
                    1.005)
        ax.axhline(0.99, color="grey", lw=0.6, ls="--")
        ref = results["settings"].get("reference") or "-"
        ax.set_ylabel(f"Dice vs {ref}")
        ax.set_title(f"{case}: per-organ agreement with {ref}", fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def readme_table(results: dict[str, Any]) -> str:
    """One compact table of all cases (for the README): end-to-end seconds, speedups, memory, agreement."""
    cfgs = results["configs"]
    ref = results["settings"].get("reference")
    head = ("| input | configuration | backend | median s (min) | speedup vs vanilla | peak memory MiB | "
            "mean Dice | agreement, margin > 0.5 |")
    rows = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for c in results["cases"]:
        per = results["summary"].get(c["name"], {})
        agree = results.get("agreement", {}).get(c["name"], {})
        label = f"{c['name']} ({' x '.join(map(str, c['shape']))})"
        for name, e in per.items():
            a = agree.get(name, {})
            rows.append("| " + " | ".join([
                label, f"**{name}**" if name == "optimized" else name, str(cfgs.get(name, {}).get("backend", "-")),
                f"{e['total_s']['median']:.2f} ({e['total_s']['min']:.2f})",
                _f(e.get("speedup_median"), 1, "x") if name != ref else "1.0x",
                _f(e["peak_mem_mb"]["max"], 0),
                "reference" if name == ref else _f(a.get("mean_dice"), 4),
                "reference" if name == ref else _f(a.get("agreement_margin_0.5"), 5),
            ]) + " |")
    return "\n".join(rows)


def write_all(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``results.json``, ``report.md``, ``latency.png`` and ``dice.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results": out_dir / "results.json", "report": out_dir / "report.md",
             "latency": out_dir / "latency.png", "dice": out_dir / "dice.png"}
    write_text_atomic(paths["results"], json.dumps(results, indent=2, default=str))
    write_markdown(results, paths["report"])
    plot_latency(results, paths["latency"])
    plot_dice(results, paths["dice"])
    return paths
