"""The ``ctpassport`` command line. Every command lives here; each is a thin wrapper over the stage APIs.

Conventions: TotalSegmentator-like flags (``-i``, ``-o``, ``--ml``, ``--roi_subset``, ``--statistics``,
``--device``, ``-q``); outputs are never overwritten without ``--force``; expected failures print one line
``ctpassport: error: <file>: <problem>`` to stderr and exit nonzero (``--debug`` shows the traceback).
Commands are testable in-process with ``typer.testing.CliRunner`` on :data:`app`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from . import __version__
from .errors import ConfigError, CTPassportError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="ctpassport",
    help="TotalSegmentator-exact fast CT segmentation, anatomical passports and passport registration.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Model folders: stand-in weights, ONNX export, information.", no_args_is_help=True)
app.add_typer(model_app, name="model")

_STATE = {"debug": False}


def _err(message: str) -> None:
    typer.echo(f"ctpassport: error: {message}", err=True)


#: Optional packages (top-level module -> the extra that installs it): a command that needs one that is missing
#: fails in one line naming the extra (exit 1), not with an internal error.
OPTIONAL_PACKAGES = {
    "sqlalchemy": "store", "psycopg": "store", "pydicom": "dicom", "highdicom": "dicom", "dask": "batch",
    "distributed": "batch", "matplotlib": "viz", "plotly": "viz", "streamlit": "app", "openvino": "openvino",
    "nncf": "openvino", "torch": "torch", "dynamic_network_architectures": "torch", "totalsegmentator": "vanilla",
    "nnunetv2": "vanilla",
}


def handle_errors(func: F) -> F:
    """Turn expected errors into one line on stderr and a nonzero exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CTPassportError as exc:
            if _STATE["debug"]:
                raise
            _err(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _err("interrupted")
            raise typer.Exit(130) from None
        except MemoryError:
            _err("out of memory")
            raise typer.Exit(75) from None
        except BrokenPipeError:  # `ctpassport store list | head`: the reader left; not an error of ours
            import os
            import sys

            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            except (OSError, ValueError, AttributeError):  # stdout is not a file (e.g. captured)
                pass
            raise typer.Exit(141) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except ModuleNotFoundError as exc:  # an optional package this command needs is not installed
            package = (exc.name or "").split(".")[0]
            extra = OPTIONAL_PACKAGES.get(package)
            if extra is None or _STATE["debug"]:
                raise
            _err(f"this needs the optional package {package} (pip install 'ctpassport[{extra}]')")
            raise typer.Exit(1) from None
        except Exception as exc:
            if _STATE["debug"]:
                raise
            first = (str(exc).splitlines() or [""])[0][:300]
            _err(f"internal error: {type(exc).__name__}: {first} (rerun as `ctpassport --debug ...` for the "
                 "traceback)")
            raise typer.Exit(70) from None

    return wrapper  # type: ignore[return-value]


def _check_choice(option: str, value: str, allowed: tuple[str, ...]) -> None:
    """A bad option value is a bad setting (exit 5): ``--tier must be rigid or deformable, not 'x'``."""
    if value not in allowed:
        names = f"{', '.join(allowed[:-1])} or {allowed[-1]}" if len(allowed) > 1 else allowed[0]
        raise ConfigError(f"{option} must be {names}, not {value!r}")


def _warn(message: str) -> None:
    """A warning line on stderr (shown with ``-q`` too: it is about the result, not progress)."""
    typer.echo(f"ctpassport: warning: {message}", err=True)


def _warn_if_label_map(path: Path, data: Any) -> None:
    from .io.load import label_map_suspicion

    why = label_map_suspicion(data)
    if why:
        _warn(f"{path}: {why}")


def _passport_grids() -> tuple[str, ...]:
    """Choices of ``--passport-grid`` (segment, batch): the passport schema's ``grid.kind`` values."""
    from .passport.schema import GRID_KINDS

    return GRID_KINDS


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"ctpassport {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
) -> None:
    """ctpassport command line."""
    _STATE["debug"] = debug


def _progress(quiet: bool, total: int, description: str) -> Any:
    """A rich progress bar (a no-op when quiet or when stderr is not a terminal and quiet)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=Console(stderr=True), disable=quiet, transient=False)
    task = progress.add_task(description, total=total)
    return progress, task


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        typer.echo(message, err=True)


# ------------------------------------------------------------------------------------------------
# segment
# ------------------------------------------------------------------------------------------------
def _refuse_ts_options(*, task: str, output_type: str, skip_saving: bool, preview: bool, body_seg: bool,
                       unsupported: tuple[str, ...] | list[str] = ()) -> None:
    """TotalSegmentator options whose result ctpassport does not reproduce: a bad setting (exit 5), at once.
    ``unsupported``: options of :data:`TS_UNSUPPORTED` found on the command line."""
    for flag in unsupported:
        why = TS_UNSUPPORTED.get(flag, (0, "not a ctpassport option"))[1]
        raise ConfigError(f"TotalSegmentator's {flag} is not supported ({why})")
    if task != "total":
        raise ConfigError(f"--task {task!r} is not supported: ctpassport runs TotalSegmentator's 'total' task "
                          "(fast model)")
    if output_type in ("dicom", "dicom_rtstruct"):
        raise ConfigError(f"--output-type {output_type} (DICOM RT-STRUCT) is not supported",
                          hint="use --output-type dicom_seg (a DICOM SEG object)")
    for flag, on, why in (("--skip_saving", skip_saving, "ctpassport always writes the segmentation"),
                          ("--preview", preview, "`ctpassport show` draws a passport"),
                          ("--body_seg", body_seg, "ctpassport segments the whole field of view")):
        if on:
            raise ConfigError(f"{flag} is not supported ({why})")


def _check_torch_seed(seed: int) -> None:
    """A seed torch takes (``torch.manual_seed`` overflows past 64 bits), checked before anything is written."""
    if not 0 <= seed < 2**63:
        raise ConfigError(f"--seed must be from 0 to 2**63 - 1, not {seed}")


def _parse_device(device: str) -> int | None:
    """TotalSegmentator's ``--device``: ``cpu`` -> None; ``gpu`` / ``cuda`` -> GPU 0; ``gpu:N`` / ``cuda:N`` ->
    GPU N. Anything else (``mps`` too: no Apple GPU path here) is a bad setting (exit 5)."""
    import re

    if device == "cpu":
        return None
    m = re.fullmatch(r"(?:gpu|cuda)(?::(\d+))?", device)
    if m is None:
        raise ConfigError(f"--device must be cpu, gpu or gpu:N (N = the GPU's index), not {device!r}")
    return int(m.group(1) or 0)


def _device_backend(backend: str | None, gpu: int | None) -> str | None:
    """The backend for ``--backend`` and ``--device`` together: ``--device gpu[:N]`` always makes GPU N the
    visible one (:func:`_gpu_backend`); ``auto`` (or no ``--backend``) then means cuda, a named backend runs as
    named (a CPU one with a warning that the GPU is not used)."""
    on_gpu = _gpu_backend(gpu)
    if backend in (None, "", "auto"):
        return on_gpu or backend
    if on_gpu is not None and backend not in ("cuda", "gpu"):
        _warn(f"--backend {backend} runs on the CPU: --device gpu is not used")
    return backend


def _gpu_backend(gpu: int | None) -> str | None:
    """The backend for ``--device``: None (auto, CPU) for the CPU, ``cuda`` on GPU ``gpu`` (made the visible
    one, within any ``CUDA_VISIBLE_DEVICES`` already set), or, as TotalSegmentator does, the CPU with a
    warning when no GPU is visible."""
    import os

    from .segment.backends import cuda_available

    if gpu is None:
        return None
    if gpu > 0:
        visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if visible and gpu >= len(visible):
            raise ConfigError(f"--device gpu:{gpu}: only {len(visible)} GPU(s) are visible "
                              f"(CUDA_VISIBLE_DEVICES={','.join(visible)})")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[gpu] if visible else str(gpu)
    if not cuda_available():
        _warn("no CUDA GPU is visible: running on the CPU")
        return None
    return "cuda"


@app.command("segment")
@handle_errors
def segment_cmd(
    input: Annotated[Path, typer.Option("-i", "--input", help="CT image: NIfTI file (or DICOM folder/zip).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output NIfTI (--ml) or folder of masks.")],
    ml: Annotated[bool, typer.Option("--ml", "-ml", help="One multilabel file with the label table (like TotalSegmentator --ml).")] = False,
    roi_subset: Annotated[list[str] | None, typer.Option("--roi_subset", "-rs", help="Keep only these classes (names).")] = None,
    statistics: Annotated[bool, typer.Option("--statistics", "-s", help="Write statistics.json (volume mm3, mean HU).")] = False,
    stats_file: Annotated[Path | None, typer.Option("--statistics-path", help="Where statistics.json goes (TotalSegmentator's -s PATH; default: beside the --ml file, or in the mask folder).")] = None,
    stats_include_incomplete: Annotated[bool, typer.Option("--stats_include_incomplete", "-sii", help="Statistics also for classes within 3 voxels of the image border (TotalSegmentator's -sii; default: those are 0).")] = False,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Trainer folder or TotalSegmentator home dir; `demo` = the embedded demo model.")] = None,
    device: Annotated[str, typer.Option("--device", "-d", help="cpu, gpu or gpu:N (the CUDA backend on GPU N; without a GPU: the CPU, with a warning).")] = "cpu",
    backend: Annotated[str | None, typer.Option("--backend", help="auto (default: the fastest backend that keeps parity on this machine, e.g. openvino-bf16 on AMX CPUs), onnxruntime (exact fp32 parity path), openvino, openvino-bf16, openvino-int8, cuda, torch.")] = None,
    nr_thr: Annotated[int, typer.Option("--nr_thr", "-nr", help="Inference threads (0 = all cores; TotalSegmentator's --nr_thr_resamp is read as this).")] = 0,
    timings: Annotated[Path | None, typer.Option("--timings", help="Write per-stage seconds and peak RSS (JSON).")] = None,
    passport: Annotated[Path | None, typer.Option("--passport", help="Also write the passport JSON here.")] = None,
    passport_grid: Annotated[str, typer.Option("--passport-grid", help="model (3 mm grid, like the study) or output.")] = "model",
    normals: Annotated[bool, typer.Option("--normals", help="Store outward normals at the passport's boundary points (more accurate registration, larger JSON).")] = False,
    body: Annotated[bool, typer.Option("--body", help="Also store the body outline (skin surface points) from the CT: the deformable registration matches it too.")] = False,
    series_uid: Annotated[str | None, typer.Option("--series-uid", help="DICOM input: this SeriesInstanceUID (default: the largest CT series).")] = None,
    output_type: Annotated[str, typer.Option("--output-type", "--output_type", "-ot", help="nifti, or dicom_seg (DICOM input only; -o names the .dcm file, or a folder to hold <SeriesInstanceUID>.dcm).")] = "nifti",
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs (no short form: -f is TotalSegmentator's --fast).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    fast: Annotated[bool, typer.Option("--fast", "-f", help="TotalSegmentator's --fast: always on (ctpassport runs the fast 3 mm model).")] = False,
    task: Annotated[str, typer.Option("--task", "-ta", help="total: the one TotalSegmentator task ctpassport runs.")] = "total",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Accepted for TotalSegmentator command lines (progress is shown unless -q).")] = False,
    force_split: Annotated[bool, typer.Option("--force_split", "-fs", help="Accepted for TotalSegmentator command lines; no effect (the sliding window needs no split).")] = False,
    nr_thr_saving: Annotated[int, typer.Option("--nr_thr_saving", "-ns", help="Accepted for TotalSegmentator command lines; no effect.")] = 6,
    skip_saving: Annotated[bool, typer.Option("--skip_saving", "-ss", help="Not supported (refused): ctpassport always writes the segmentation.")] = False,
    preview: Annotated[bool, typer.Option("--preview", "-p", help="Not supported (refused): see `ctpassport show` for pictures of a passport.")] = False,
    body_seg: Annotated[bool, typer.Option("--body_seg", "-bs", help="Not supported (refused).")] = False,
    ts_unsupported: Annotated[list[str] | None, typer.Option("--ts-unsupported", hidden=True)] = None,
) -> None:
    """Segment a CT with TotalSegmentator's fast model (same labels as `TotalSegmentator --fast`).

    TotalSegmentator's command lines work: its option spellings are accepted (-ml, -rs, -s [PATH], -sii, -ot,
    -d, -nr/--nr_thr_resamp, --fast/-f, --force_split/-fs, -ns, -v, -ta total); options that would change the
    result in ways ctpassport does not reproduce (--skip_saving, --preview, --body_seg, other tasks,
    RT-STRUCT output, and TotalSegmentator's other options) are refused with a one-line message. Differences:
    -nr sets inference threads, -rs selects from a run over the whole field of view (no crop model), and
    overwriting needs --force (long form only). From the command line -rs takes several names (-rs liver
    spleen), as does the repeated form (-rs liver -rs spleen).
    """
    from .config import Config
    from .errors import InputError
    from .io.atomic import check_writable
    from .segment.pipeline import Segmenter, Timings, classes_for, load_input

    del fast, verbose, force_split, nr_thr_saving  # TotalSegmentator's options that change nothing here
    cfg = Config.from_env()
    # settings and output names first: nothing slow runs before a mistake that would fail at the end
    _refuse_ts_options(task=task, output_type=output_type, skip_saving=skip_saving, preview=preview,
                       body_seg=body_seg, unsupported=ts_unsupported or [])
    if nr_thr < 0:
        raise ConfigError(f"--nr_thr must be >= 0 (0: all cores), not {nr_thr}")
    if stats_file is not None and not statistics:  # (-sii without -s changes nothing, as in TotalSegmentator)
        raise ConfigError("--statistics-path names the statistics file: add -s (--statistics)")
    _check_choice("--output-type", output_type, ("nifti", "dicom_seg"))
    gpu = _parse_device(device)
    _check_choice("--passport-grid", passport_grid, _passport_grids())
    if ml and output_type == "nifti" and not output.name.endswith((".nii", ".nii.gz")):
        raise InputError("--ml writes one NIfTI file: its name must end with .nii or .nii.gz", output)
    one_file = ml or output_type == "dicom_seg"  # else a folder of per-class masks
    seg_uid = None
    if output_type == "dicom_seg" and output.is_dir():  # like TotalSegmentator: <SeriesInstanceUID>.dcm in it
        from highdicom import UID

        seg_uid = str(UID())
        output = output / f"{seg_uid}.dcm"
    check_writable(output, force, folder=not one_file)
    if passport is not None:
        check_writable(passport, force)
    if timings is not None:
        check_writable(timings, force)
    if statistics:
        from .segment.pipeline import statistics_path

        check_writable(stats_file or statistics_path(output, ml=one_file), force)
    classes_for(roi_subset)  # fail early on unknown names
    tm = Timings()
    image = load_input(input, tm, series_uid=series_uid)  # validate the input before the (slow) model load
    if output_type == "dicom_seg":
        from .io.dicom_seg import check_seg_source

        check_seg_source(image)
    _warn_if_label_map(input, image.data)
    chosen = _device_backend(backend, gpu)
    _say(quiet, "Loading model...")
    seg = Segmenter(model, backend=chosen, threads=nr_thr or None, config=cfg)
    _say(quiet, f"Model {seg.model.model_id} on {seg.backend_name}")
    progress, task = _progress(quiet, 1, "Segmenting")
    passport_fn = None
    if passport is not None:
        from .passport.build import passport_from_segmentation

        def passport_fn(result: Any, tm: Any) -> None:
            passport_from_segmentation(result, passport, input_path=input, grid=passport_grid,
                                       model_id=seg.model.model_id, timings=tm.seconds, ct=image.data,
                                       normals=normals, body=body, series_uid=series_uid)

    with progress:
        def tick(n: int) -> None:
            progress.update(task, advance=n)

        if output_type == "dicom_seg":
            from .io.dicom_seg import segment_to_dicom_seg

            res = segment_to_dicom_seg(seg, image, output, roi_subset=roi_subset,  # type: ignore[arg-type]
                                       statistics=stats_file or statistics, timings_path=timings, timings=tm,
                                       passport=passport_fn, progress=tick, series_instance_uid=seg_uid,
                                       stats_include_incomplete=stats_include_incomplete)
        else:
            res = seg.segment_file(input, output, ml=ml, roi_subset=roi_subset, statistics=stats_file or statistics,
                                   timings_path=timings, force=True, passport=passport_fn,
                                   progress=tick, image=image, timings=tm,
                                   stats_include_incomplete=stats_include_incomplete)
        progress.update(task, total=res.n_tiles, completed=res.n_tiles)
    _say(quiet, f"Wrote {output} in {res.timings.total:.2f} s")


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------
@model_app.command("standin")
@handle_errors
def model_standin_cmd(
    output: Annotated[Path, typer.Option("-o", "--output", help="TotalSegmentator home dir to create.")],
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the weights.")] = 0,
    plans_format: Annotated[str, typer.Option("--plans-format", help="flat (TotalSegmentator's) or architecture.")] = "flat",
    force: Annotated[bool, typer.Option("--force", "-f")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Write stand-in fast-model weights (exact architecture, seeded random) in TotalSegmentator's layout."""
    from .model.standin import make_standin

    _check_choice("--plans-format", plans_format, ("flat", "architecture"))
    _check_torch_seed(seed)
    folder = make_standin(output, seed=seed, force=force, plans_format=plans_format)  # type: ignore[arg-type]
    _say(quiet, f"Wrote stand-in weights to {folder}")
    _say(quiet, f"Use them with: TOTALSEG_HOME_DIR={output} (TotalSegmentator) or --model {output}")


@model_app.command("export")
@handle_errors
def model_export_cmd(
    model: Annotated[Path | None, typer.Argument(help="Trainer folder or TotalSegmentator home dir.")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="ONNX file to write (default: the cache).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Export the model to ONNX (fp32, dynamic spatial axes), checked against PyTorch."""
    from .config import Config
    from .errors import InputError
    from .io.atomic import check_writable
    from .model.export import export_onnx, find_or_export_onnx
    from .model.folder import load_model_folder, locate_model

    folder = load_model_folder(locate_model(model))
    if output is None:
        path = find_or_export_onnx(folder, Config.from_env().cache_dir)
        _say(quiet, f"ONNX model: {path}")
        typer.echo(str(path))
        return
    if output.suffix != ".onnx":
        raise InputError("the ONNX file's name must end with .onnx (its report goes beside it as .json)", output)
    check_writable(output, force)
    check_writable(output.with_suffix(".json"), force)  # the export report written beside it
    rep = export_onnx(folder, output)
    _say(quiet, f"Wrote {output} (max |ONNX - PyTorch| = {rep.max_abs_diff:.2e} on a {rep.check_shape} patch, "
                f"tolerance {rep.tolerance:.0e})")


@model_app.command("info")
@handle_errors
def model_info_cmd(
    model: Annotated[Path | None, typer.Argument(help="Trainer folder or TotalSegmentator home dir; `demo` = the embedded demo model (default: the installed weights, as `segment` finds them).")] = None,
) -> None:
    """Show the model folder that would be used and its key facts (JSON)."""
    import json

    from .model.folder import load_model_folder, locate_model

    m = load_model_folder(locate_model(model, usage="ctpassport model info"))  # a MODEL argument, no --model
    typer.echo(json.dumps({
        "path": str(m.path), "model_id": m.model_id, "network": m.architecture.short_name,
        "features_per_stage": list(m.architecture.features_per_stage), "patch_size_nnunet": list(m.patch_size),
        "spacing_nnunet": list(m.spacing), "reader": m.image_reader_writer, "classes": m.num_channels_out - 1,
        "normalization": m.normalization, "intensity": m.intensity_properties,
    }, indent=2))


@app.command("classes")
@handle_errors
def classes_cmd() -> None:
    """List TotalSegmentator's class ids and names."""
    from .model.classes import TOTAL_CLASSES

    for k, v in TOTAL_CLASSES.items():
        typer.echo(f"{k}\t{v}")


# ------------------------------------------------------------------------------------------------
# passport (issue 3)      -- commands: passport, show
# ------------------------------------------------------------------------------------------------
@app.command("passport")
@handle_errors
def passport_cmd(
    input: Annotated[Path, typer.Option("-i", "--input", help="Label map (NIfTI, integer ids), e.g. TotalSegmentator --ml output; or a DICOM SEG with its --ct series.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Passport JSON to write.")],
    ct: Annotated[Path | None, typer.Option("--ct", help="CT on the label map's grid (NIfTI, DICOM folder or zip): adds mean/std HU per organ.")] = None,
    series_uid: Annotated[str | None, typer.Option("--series-uid", help="DICOM series of --ct (default: the largest CT series).")] = None,
    points: Annotated[int, typer.Option("--points", min=0, max=10_000_000, help="Boundary points per organ (at most).")] = 500,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the boundary point sampling.")] = 0,
    normals: Annotated[bool, typer.Option("--normals", help="Store outward normals at the boundary points (more accurate registration, larger JSON).")] = False,
    body: Annotated[bool, typer.Option("--body", help="Also store the body outline (skin surface points) from --ct: the deformable registration matches it too.")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Build the anatomical passport (JSON, world mm RAS+) of a label map."""
    import warnings

    from .io.atomic import check_writable
    from .passport.build import PassportWarning, passport_from_file
    from .passport.schema import save_passport

    check_writable(output, force)
    if body and ct is None:
        from .errors import ConfigError

        raise ConfigError("--body needs --ct (the body outline is found in the CT)")
    if series_uid is not None and ct is None:
        from .errors import ConfigError

        raise ConfigError("--series-uid names the DICOM series of --ct: give --ct")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PassportWarning)  # reported below from passport.warnings
        p = passport_from_file(input, ct_path=ct, points=points, seed=seed, normals=normals, body=body,
                               series_uid=series_uid)
    save_passport(p, output)
    for w in p.warnings:
        _warn(f"{input}: {w}")
    n_trunc = sum(o.truncated for o in p.organs)
    _say(quiet, f"Wrote {output}: {len(p.organs)} organs ({n_trunc} touch the image border), "
                f"passport built in {1000 * p.timings.get('passport_build', 0.0):.0f} ms")


@app.command("show")
@handle_errors
def show_cmd(
    passport: Annotated[Path, typer.Argument(help="Passport JSON.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="PNG picture to write.")] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Also write an interactive HTML page (plotly).")] = None,
    dpi: Annotated[int, typer.Option("--dpi", min=20, max=600, help="PNG resolution (100 = 2400 x 3200 pixels).")] = 100,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing outputs.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Draw a passport: 3-D organ map, volumes, axial/coronal/sagittal projections, spine view."""
    from .errors import InputError
    from .io.atomic import check_writable
    from .passport.schema import load_passport
    from .passport.show import render_html, render_png, require_drawing

    if output is None and html is None:
        raise ConfigError("nothing to write: give -o picture.png and/or --html page.html")
    require_drawing(png=output is not None, html=html is not None)
    if output is not None and html is not None and output.resolve() == html.resolve():
        raise InputError("-o and --html name the same file: give the picture and the page different names",
                         output)
    for out in (output, html):
        if out is not None:
            if out.resolve() == passport.resolve():
                raise InputError("is the passport being drawn: name the picture or page another file", out)
            check_writable(out, force)
    p = load_passport(passport)
    if output is not None:
        render_png(p, output, dpi=dpi)
        _say(quiet, f"Wrote {output}")
    if html is not None:
        render_html(p, html)
        _say(quiet, f"Wrote {html}")


# ------------------------------------------------------------------------------------------------
# registration (issue 4)  -- commands: register, warp, validate-registration
# ------------------------------------------------------------------------------------------------
def _read_weights(path: Path | None) -> dict[str, float] | None:
    """``--weights`` JSON: {fnmatch pattern or class name: weight}."""
    import json

    from .errors import ConfigError, InputError

    if path is None:
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("no such weights file", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError("not valid JSON", path) from None
    if not isinstance(d, dict) or not all(isinstance(v, (int, float)) for v in d.values()):
        raise InputError('expected a JSON object like {"vertebrae_*": 1.0, "lung_*": 0.4}', path)
    from .register.rigid import check_weights

    try:
        return check_weights({str(k): float(v) for k, v in d.items()})
    except ConfigError as exc:
        raise InputError(exc.problem, path) from None


@contextmanager
def _naming_inputs(pair: str) -> Iterator[None]:
    """Prefix a :class:`RegistrationError` that names no file with the inputs it is about."""
    from .errors import RegistrationError

    try:
        yield
    except RegistrationError as exc:
        if exc.path is not None:
            raise
        raise RegistrationError(f"{pair}: {exc.problem}", hint=exc.hint) from exc


@app.command("register")
@handle_errors
def register_cmd(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder: transform.h5, displacement.nii.gz, registration.json.")],
    fixed: Annotated[Path | None, typer.Option("--fixed", help="Fixed passport JSON.")] = None,
    moving: Annotated[Path | None, typer.Option("--moving", help="Moving passport JSON.")] = None,
    fixed_points: Annotated[Path | None, typer.Option("--fixed-points", help="Fixed landmarks CSV (header x,y,z; mm).")] = None,
    moving_points: Annotated[Path | None, typer.Option("--moving-points", help="Moving landmarks CSV, rows matching --fixed-points.")] = None,
    tier: Annotated[str, typer.Option("--tier", help="rigid or deformable.")] = "rigid",
    method: Annotated[str | None, typer.Option("--method", help="Deformable smooth fit: demons (passports, default), tps (points, default), bspline, sitk-bspline.")] = None,
    refine_passes: Annotated[int, typer.Option("--refine-passes", help="Passports, demons: this many lattice refinement passes after the Gaussian iterations (0: none; more accurate at large motion, less at small, about 1.5x the time; see the register README).")] = 0,
    lps: Annotated[bool, typer.Option("--lps", help="Point CSVs are LPS (default RAS).")] = False,
    reference: Annotated[Path | None, typer.Option("--reference", help="Points form: fixed image whose grid the displacement field is written on and images are warped onto (without it the field covers the landmarks plus 30 mm, and warp -i needs --reference).")] = None,
    weights: Annotated[Path | None, typer.Option("--weights", help="JSON {class name or pattern: stability weight} overriding the default table.")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Organ name or id to leave out (repeatable).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite the output folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Register two passports (or paired landmarks): T maps fixed-space points to moving-space points (RAS mm)."""
    from .errors import InputError
    from .io.atomic import check_writable

    from .register.api import TIERS

    check_writable(output, force, folder=True)
    _check_choice("--tier", tier, TIERS)
    passports = fixed is not None or moving is not None
    points = fixed_points is not None or moving_points is not None
    if passports == points:
        raise InputError("give either --fixed and --moving (passports) or --fixed-points and --moving-points (CSV)")
    from .register.deformable import METHODS, POINT_METHODS

    allowed = METHODS if passports else POINT_METHODS
    if method is not None and method not in allowed:
        raise ConfigError(f"--method must be one of {', '.join(allowed)} for "
                          f"{'passports' if passports else 'point lists'}, not {method!r}")
    if refine_passes < 0:
        raise ConfigError(f"--refine-passes must be >= 0, not {refine_passes}")
    if refine_passes and (not passports or (method or "demons") != "demons" or tier != "deformable"):
        raise ConfigError("--refine-passes refines the deformable demons fit of passports; drop it for the rigid "
                          "tier, point lists or other methods")
    if passports:
        from .register.api import register_passports

        if fixed is None or moving is None:
            raise InputError("--fixed and --moving are both needed")
        excl: list[int | str] = [int(e) if e.isdigit() else e for e in (exclude or [])]
        with _naming_inputs(f"{fixed} -> {moving}"):
            res = register_passports(fixed, moving, tier, method=method or "demons", weights=_read_weights(weights),
                                     exclude=excl, deformable_options={"refine_passes": refine_passes} if refine_passes else None)
    else:
        from .register.api import register_points
        from .register.points import read_points_csv
        from .register.warp import grid_of

        if fixed_points is None or moving_points is None:
            raise InputError("--fixed-points and --moving-points are both needed")
        ft = read_points_csv(fixed_points, lps=lps)
        mt = read_points_csv(moving_points, lps=lps)
        if len(ft.points) != len(mt.points):
            raise InputError(f"has {len(mt.points)} rows but {fixed_points} has {len(ft.points)}: rows must correspond",
                             moving_points)
        grid = None
        if reference is not None:
            from .io.nifti import read_image

            grid = grid_of(read_image(reference))
        with _naming_inputs(f"{fixed_points} -> {moving_points}"):
            res = register_points(ft.points, mt.points, tier, method=method or "tps", grid=grid)
    res.save(output, force=force)
    r = res.summary["rigid"]
    _say(quiet, f"Rigid: rotation {r['rotation_deg']:.3f} deg, translation "
                f"{sum(v * v for v in r['translation_mm']) ** 0.5:.2f} mm, RMS residual {r['rms_residual_mm']:.2f} mm, "
                f"{r['organs_used']} used" + (f", dropped: {', '.join(map(str, r['organs_dropped']))}" if r["organs_dropped"] else ""))
    for note in res.summary.get("notes", []):
        _say(quiet, f"Note: {note}")
    _say(quiet, f"Wrote {output} ({res.tier}, {res.summary['timings_s']['total'] * 1e3:.1f} ms)")


@app.command("warp")
@handle_errors
def warp_cmd(
    transform: Annotated[Path, typer.Option("--transform", "-t", help="Registration folder, or an ITK transform file (rigid transforms, composed as ITK applies them, optionally followed by one displacement field).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Warped NIfTI, or mapped points CSV with --points.")],
    input: Annotated[Path | None, typer.Option("-i", "--input", help="Moving image or label map (NIfTI).")] = None,
    reference: Annotated[Path | None, typer.Option("--reference", "-r", help="Fixed image defining the output grid (default: the fixed passport's grid recorded in the registration folder - the fixed label map's own grid, or the 3 mm model grid for passports of segment --passport without --passport-grid output; for a bare ITK transform file, its displacement field's grid).")] = None,
    labels: Annotated[bool, typer.Option("--labels", help="Label map: nearest neighbour, no new label values (--fill, if given, must be a whole number the label map's type holds).")] = False,
    points: Annotated[Path | None, typer.Option("--points", help="Fixed-space points CSV (header x,y,z) to map to the moving space.")] = None,
    lps: Annotated[bool, typer.Option("--lps", help="Point CSVs are LPS (default RAS).")] = False,
    fill: Annotated[float | None, typer.Option("--fill", help="Value outside the moving image (default: 0 for labels, the image minimum otherwise).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite the output.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Apply a registration: warp a moving image/labels into the fixed space, or map fixed points to moving."""
    from .errors import InputError
    from .io.atomic import check_writable
    from .io.load import is_nifti_name, label_map_suspicion
    from .register.api import load_transform

    if (input is None) == (points is None):
        raise InputError("give either -i (an image or label map to warp) or --points (a CSV to map)")
    if input is not None and not output.name.endswith((".nii", ".nii.gz")):
        raise InputError("the warped image is NIfTI: its name must end with .nii or .nii.gz", output)
    if transform.is_file() and is_nifti_name(transform):
        raise InputError("is a NIfTI file; warp reads a registration folder or its ITK transform "
                         "(transform.h5)", transform)
    check_writable(output, force)
    res = load_transform(transform)
    if points is not None:
        from .register.points import read_points_csv, write_points_csv

        table = read_points_csv(points, lps=lps)
        write_points_csv(output, table.with_points(res.transform_points(table.points)), lps=lps)
        _say(quiet, f"Mapped {len(table.points)} points to the moving space: {output}")
        return
    import numpy as np

    from .io.nifti import make_nifti, read_image, save_nifti

    assert input is not None
    moving = read_image(input, kind="label map" if labels else "image")
    if labels and not np.issubdtype(moving.data.dtype, np.integer):
        raise InputError("--labels needs an integer label map (found floating-point voxels)", input)
    if not labels and label_map_suspicion(moving.data) is not None:
        _warn(f"{input} looks like a label map or mask (few distinct whole numbers): it is interpolated "
              "linearly, which makes new values at label borders; pass --labels to warp it as labels")
    ref = read_image(reference) if reference is not None else None
    if ref is None and res.fixed_grid is None:
        raise InputError("has no fixed image grid (fitted to points without --reference, or no field): "
                         "pass --reference fixed.nii.gz", transform)
    if ref is None and (res.summary.get("fixed") or {}).get("grid_kind") == "model":
        _warn("the fixed passport was taken on the segmentation's 3 mm model grid, so the output is on that grid "
              "(RAS+, 3 mm), not the fixed image's: pass --reference fixed.nii.gz for the fixed image's own grid")
    out = res.warp_image(moving, ref, labels=labels, fill=fill)
    img = make_nifti(out.data, out.affine, ref.header if ref is not None else None, dtype=out.data.dtype)
    # the reference gives the grid; its display range and description are about its own voxels, not these
    img.header["cal_min"] = img.header["cal_max"] = 0.0
    img.header["descrip"] = f"ctpassport warp of {input.name}".encode("utf-8")[:79]
    if labels:
        from .io.labels import add_label_table, read_label_table
        from .io.nifti import load_nifti

        label_table = read_label_table(load_nifti(input))  # TotalSegmentator's label table, kept when present
        if label_table:
            add_label_table(img, label_table)
    save_nifti(img, output)
    _say(quiet, f"Wrote {output} ({'labels, nearest neighbour' if labels else 'linear'}, grid {out.shape})")


@app.command("validate-registration")
@handle_errors
def validate_registration_cmd(
    output: Annotated[Path, typer.Option("-o", "--output", help="Report folder: report.md, results.json, pictures.")],
    input: Annotated[Path | None, typer.Option("-i", "--input", help="Label map (segmentation) of the fixed scan.")] = None,
    ct: Annotated[Path | None, typer.Option("--ct", help="Its CT (same grid): body mask for the held-out points.")] = None,
    cases: Annotated[int, typer.Option("--cases", help="Random cases per scenario.")] = 3,
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the synthetic motions.")] = 0,
    noise_floor: Annotated[Path | None, typer.Option("--noise-floor", help="A second segmentation of the same scan (e.g. the full model's) for the noise floor.")] = None,
    amplitudes: Annotated[str, typer.Option("--amplitudes", help="Mean deformation amplitudes (mm), comma separated.")] = "0,2.5,5,10,15",
    points: Annotated[int, typer.Option("--points", min=3, max=100_000, help="Boundary points per organ (at most) of the passports registered, as `ctpassport passport --points`.")] = 500,
    refine_passes: Annotated[int, typer.Option("--refine-passes", help="Deformable tier: this many lattice refinement passes after the Gaussian iterations (0: none; see the register README for the measured trade-off).")] = 0,
    compare: Annotated[bool, typer.Option("--compare/--no-compare", help="Compare the smooth fits (demons, bspline, tps, sitk-bspline).")] = True,
    full_fov: Annotated[bool, typer.Option("--full-fov/--no-full-fov", help="Also run the analytic full-torso label map (no organ cut by the field of view).")] = True,
    learn2reg: Annotated[Path | None, typer.Option("--learn2reg", help="A Learn2Reg task folder (imagesTr, keypointsTr/landmarksTr, *_dataset.json).")] = None,
    labels_dir: Annotated[Path | None, typer.Option("--labels-dir", help="Learn2Reg: take label maps from this folder (e.g. labelsTr) instead of segmenting.")] = None,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Learn2Reg: model folder for segmentation.")] = None,
    max_pairs: Annotated[int | None, typer.Option("--max-pairs", help="Learn2Reg: at most this many pairs.")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite the report folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Validate the registration: self-registration, synthetic recovery sweeps, noise floor, or a Learn2Reg folder."""
    from .errors import ConfigError, InputError
    from .io.atomic import check_writable

    check_writable(output, force, folder=True)
    if cases < 1:
        raise ConfigError(f"--cases must be >= 1, not {cases}")
    if max_pairs is not None and max_pairs < 1:
        raise ConfigError(f"--max-pairs must be >= 1, not {max_pairs}")
    if refine_passes < 0:
        raise ConfigError(f"--refine-passes must be >= 0, not {refine_passes}")
    say = (lambda m: None) if quiet else (lambda m: typer.echo(m, err=True))
    if learn2reg is not None:
        from .register.validate import learn2reg_tier_errors, validate_learn2reg

        segment_fn = None
        if labels_dir is None:
            from .config import Config
            from .segment.pipeline import Segmenter

            seg = Segmenter(model, config=Config.from_env())

            def segment_fn(image: Any) -> Any:
                return seg.segment(image).labels

        res = validate_learn2reg(learn2reg, output, segment=segment_fn, labels_dir=labels_dir, max_pairs=max_pairs,
                                 points=points, refine_passes=refine_passes, force=force, progress=say)
        s = res["summary"]
        failed = [r for r in res["pairs"] if "error" in r]
        if s["evaluated"] == 0:
            raise InputError(f"no pair could be evaluated (first: {failed[0]['error']}); see {output / 'report.md'}",
                             learn2reg)
        for r in failed:
            _warn(f"{r['fixed']} <- {r['moving']}: {r['error']}")
        tier_errors = learn2reg_tier_errors(res["pairs"])
        for f in tier_errors:
            _warn(f"{f['fixed']} <- {f['moving']}: {f['tier']} tier: {f['error']}")
        if s["registered"] == 0:
            from .errors import RegistrationError

            raise RegistrationError(f"no pair could be registered (first: {tier_errors[0]['error']}); see "
                                    f"{output / 'report.md'}", learn2reg)
        _say(quiet, f"Learn2Reg: {s['evaluated']}/{s['pairs']} pairs, mean TRE identity {s['tre_identity_mm']} mm, "
                    f"rigid {s['rigid']['tre_mean_mm']} mm, deformable {s['deformable']['tre_mean_mm']} mm; "
                    f"wrote {output}")
        return
    if input is None:
        raise InputError("give -i seg.nii.gz (or --learn2reg DIR)")
    from .register.validate import SuiteOptions, run_suite

    try:
        amps = tuple(float(a) for a in amplitudes.split(",") if a.strip())
    except ValueError:
        raise ConfigError(f"--amplitudes must be numbers separated by commas, not {amplitudes!r}") from None
    if not amps or any(a < 0 for a in amps):
        raise ConfigError("--amplitudes must be one or more non-negative numbers")
    opts = SuiteOptions(cases=cases, seed=seed, amplitudes=amps, full_fov=full_fov, points=points,
                        refine_passes=refine_passes, compare_methods=("demons", "bspline", "tps", "sitk-bspline") if compare else ())
    res = run_suite(input, output, ct=ct, noise_floor_seg=noise_floor, options=opts, force=force, progress=say)
    s10 = res["summary"].get("amplitude_10", {}).get("deformable:demons", {})
    _say(quiet, f"Wrote {output}/report.md (mean TRE at 10 mm: {s10.get('tre_mean_mm')} mm; "
                f"{res['wall_s']:.0f} s)")


# ------------------------------------------------------------------------------------------------
# phantom + demo (issue 6) -- commands: phantom, demo, model train-demo
# ------------------------------------------------------------------------------------------------
@app.command("phantom")
@handle_errors
def phantom_cmd(
    output: Annotated[Path, typer.Option("-o", "--output", help="Phantom CT to write (NIfTI, int16 HU).")],
    labels: Annotated[Path | None, typer.Option("--labels", "-l", help="Also write its labels (TotalSegmentator ids, uint8).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Phantom seed (patient size, organ sizes, position, noise).")] = 0,
    spacing: Annotated[str, typer.Option("--spacing", help="Voxel size in mm: one value or three (array axis order), e.g. 1.5,1.5,3.")] = "3",
    orientation: Annotated[str, typer.Option("--orientation", help="Array axis codes, e.g. RAS, LPS, PIL.")] = "RAS",
    oblique: Annotated[str, typer.Option("--oblique", help="Rotate the grid by these angles (deg) about x,y,z, e.g. 5,0,10.")] = "0,0,0",
    follow_up: Annotated[Path | None, typer.Option("--follow-up", help="Also write a follow-up scan of the same phantom after a known motion.")] = None,
    follow_up_labels: Annotated[Path | None, typer.Option("--follow-up-labels", help="Follow-up labels (default: <follow-up>_labels.nii.gz).")] = None,
    transform: Annotated[Path | None, typer.Option("--transform", help="True transform JSON (default: <follow-up>_true_transform.json): baseline=fixed -> follow-up=moving, world mm RAS+.")] = None,
    motion_seed: Annotated[int, typer.Option("--motion-seed", help="Seed of the follow-up's motion and noise.")] = 1,
    truth: Annotated[Path | None, typer.Option("--truth", help="Write the analytic organ volumes and centroids (JSON).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing outputs.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Make a synthetic torso CT with TotalSegmentator labels (and optionally a follow-up with a known motion)."""
    import math

    from .phantom import write_phantom

    try:
        angles = tuple(float(v) for v in oblique.split(","))
    except ValueError:
        angles = ()
    if len(angles) != 3 or not all(math.isfinite(a) for a in angles):
        raise ConfigError(f"--oblique must be three finite angles in degrees, not {oblique!r}")
    for flag, value in (("--seed", seed), ("--motion-seed", motion_seed)):
        if value < 0:
            raise ConfigError(f"{flag} must be a non-negative integer, not {value}")
    outs = write_phantom(output, labels, seed=seed, spacing=spacing, orientation=orientation,
                         oblique_deg=angles, follow_up=follow_up, follow_up_labels=follow_up_labels,
                         transform=transform, truth=truth, motion_seed=motion_seed, force=force)
    for role, path in outs.items():
        _say(quiet, f"Wrote {role.replace('_', ' ')}: {path}")


@app.command("demo")
@handle_errors
def demo_cmd(
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder to write (report.html, report.json, images, passports, transforms).")] = Path("demo_out"),
    baseline: Annotated[Path | None, typer.Option("--baseline", help="Your baseline CT (default: a phantom).")] = None,
    follow_up: Annotated[Path | None, typer.Option("--follow-up", help="Your follow-up CT (with --baseline).")] = None,
    true_transform: Annotated[Path | None, typer.Option("--true-transform", help="Known baseline->follow-up transform (phantom JSON) for the error against the truth.")] = None,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Trainer folder or TotalSegmentator home (default: installed weights, else the demo model).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Phantom seed.", show_default="0")] = None,
    motion_seed: Annotated[int | None, typer.Option("--motion-seed", help="Seed of the follow-up's known motion.", show_default="1")] = None,
    spacing: Annotated[str | None, typer.Option("--spacing", help="Phantom voxel size in mm (one or three values).", show_default="3")] = None,
    orientation: Annotated[str | None, typer.Option("--orientation", help="Phantom array axis codes, e.g. RAS or LPS.", show_default="RAS")] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="Inference backend (default: auto).")] = None,
    nr_thr: Annotated[int, typer.Option("--nr_thr", "-nr", help="Inference threads (0 = all cores).")] = 0,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Run everything on a phantom (or your two scans): segment, passports, register, warp, report.html."""
    from .demo import run_demo

    phantom = {"--seed": seed, "--motion-seed": motion_seed, "--spacing": spacing, "--orientation": orientation}
    given = [k for k, v in phantom.items() if v is not None]
    if given and (baseline is not None or follow_up is not None):
        raise ConfigError(f"{', '.join(given)} describe the phantom demo; they do not apply to --baseline/--follow-up",
                          hint="leave them out, or leave out --baseline and --follow-up")
    run_demo(output, baseline=baseline, follow_up=follow_up, true_transform=true_transform, model=model,
             seed=0 if seed is None else seed, motion_seed=1 if motion_seed is None else motion_seed,
             spacing=spacing or "3", orientation=orientation or "RAS", backend=backend,
             threads=nr_thr or None, force=force, log=lambda m: _say(quiet, m), warn=_warn)


@model_app.command("train-demo")
@handle_errors
def model_train_demo_cmd(
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Trainer folder to write (default: the embedded demo model's folder).")] = None,
    steps: Annotated[int, typer.Option("--steps", min=0, help="Optimiser steps (0: only --calibrate the --init-from weights).")] = 1000,
    crop: Annotated[str, typer.Option("--crop", help="Crop size z,y,x (voxels of the 3 mm grid, nnU-Net order; multiples of 16).")] = "32,112,128",
    crop_start: Annotated[str | None, typer.Option("--crop-start", help="Other crops z,y,x for the first --crop-switch of the steps.")] = None,
    crop_switch: Annotated[float, typer.Option("--crop-switch", min=0.0, max=1.0, help="Fraction of the steps trained on --crop-start crops.")] = 0.0,
    batch: Annotated[int, typer.Option("--batch", min=1, max=8, help="Crops per step.")] = 1,
    optimizer: Annotated[str, typer.Option("--optimizer", help="adamw or sgd (nnU-Net's).")] = "adamw",
    lr: Annotated[float, typer.Option("--lr", help="Peak (adamw) or initial (sgd) learning rate.")] = 3e-3,
    head_lr_mult: Annotated[float, typer.Option("--head-lr-mult", help="Learning-rate factor of the segmentation layers.")] = 10.0,
    phantoms: Annotated[int, typer.Option("--phantoms", min=1, help="Number of training phantoms.")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (weights and crops).")] = 0,
    threads: Annotated[int, typer.Option("--threads", min=1, help="CPU threads for torch.")] = 2,
    work_dir: Annotated[Path | None, typer.Option("--work-dir", help="Resumable training state (default: beside the output).")] = None,
    init_from: Annotated[Path | None, typer.Option("--init-from", help="Start from this trained model folder (a further training stage).")] = None,
    class_power: Annotated[float, typer.Option("--class-power", min=0.0, max=1.0, help="Crop centres: pick a class with probability ~ voxel count ** this (0 = all classes alike).")] = 0.5,
    ce_class_power: Annotated[float, typer.Option("--ce-class-power", min=0.0, max=1.0, help="Cross-entropy class weights ~ voxel count ** -this (0 = unweighted).")] = 0.0,
    source_weights: Annotated[str | None, typer.Option("--source-weights", help="Sampling weights phantom,example_ct_sm,example_ct (default 0.65,0.15,0.2).")] = None,
    focus: Annotated[str | None, typer.Option("--focus", help="Crop centres: multiply these classes' odds, e.g. kidney_right=4,spleen=2.")] = None,
    hard_negatives: Annotated[float, typer.Option("--hard-negatives", min=0.0, max=1.0, help="Centre this fraction of the crops on voxels the --init-from weights get grossly wrong (hard-example mining).")] = 0.0,
    hard_classes: Annotated[str | None, typer.Option("--hard-classes", help="Mine only errors naming or missing these classes, e.g. spleen,stomach.")] = None,
    calibrate: Annotated[str | None, typer.Option("--calibrate", help="After the steps, fit the output biases of background and these classes (e.g. liver,spleen, or all) to the training volumes' Dice.")] = None,
    evaluate: Annotated[bool, typer.Option("--evaluate/--no-evaluate", help="Measure Dice per source and write MODEL_CARD.md.")] = True,
    evaluate_only: Annotated[bool, typer.Option("--evaluate-only", help="Only evaluate an existing model and rewrite its card.")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing model.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Train the embedded demo model (fast-model topology, features 8-80) on phantoms + the shared real CT slab."""
    from .config import Config
    from .model.demo import DEMO_DIR
    from .model.train import TrainConfig, check_trained_folder, evaluate_demo, train_demo, write_model_card

    cfg_env = Config.from_env()
    out = output or DEMO_DIR
    log = (lambda m: None) if quiet else (lambda m: typer.echo(m, err=True))
    if not evaluate_only:
        _check_torch_seed(seed)

        def zyx(text: str) -> tuple[int, int, int]:
            try:
                vals = tuple(int(v) for v in text.split(","))
            except ValueError:
                vals = ()
            if len(vals) == 1:
                vals = vals * 3
            if len(vals) != 3:
                raise ConfigError(f"crop {text!r} must be one or three integers (z,y,x)")
            return vals

        def class_names(text: str | None) -> tuple[str, ...]:
            return tuple(c.strip() for c in (text or "").split(",") if c.strip())

        cfg = TrainConfig(seed=seed, steps=steps, crop=zyx(crop), crop_start=zyx(crop_start) if crop_start else None,
                          crop_switch=crop_switch,
                          batch=batch, optimizer=optimizer, lr=lr, head_lr_mult=head_lr_mult, n_phantoms=phantoms,
                          threads=threads,
                          init_from=str(init_from) if init_from else None, class_power=class_power,
                          ce_class_power=ce_class_power, hard_negatives=hard_negatives,
                          hard_classes=class_names(hard_classes), calibrate=calibrate is not None,
                          calibrate_classes=tuple(n for n in class_names(calibrate) if n != "all"))
        if source_weights:
            try:
                sw = [float(v) for v in source_weights.split(",")]
            except ValueError:
                sw = []
            if len(sw) != 3 or min(sw) < 0 or sum(sw) <= 0:
                raise ConfigError(f"--source-weights {source_weights!r} must be three non-negative numbers")
            cfg.source_weights = dict(zip(("phantom", "example_ct_sm", "example_ct"), sw))
        if focus:
            try:
                pairs = [item.split("=") for item in focus.split(",")]
                cfg.class_focus = {k.strip(): float(v) for k, v in pairs}
            except ValueError:
                cfg.class_focus = {}
            if not cfg.class_focus or min(cfg.class_focus.values()) <= 0:
                raise ConfigError(f"--focus {focus!r} must be NAME=FACTOR pairs with positive factors")
        train_demo(out, ct_dir=cfg_env.ct_data_dir, cfg=cfg, work_dir=work_dir, force=force, log=log)
    else:
        check_trained_folder(out)
    if evaluate or evaluate_only:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="ctpassport-eval-") as cache:
            ev = evaluate_demo(out, ct_dir=cfg_env.ct_data_dir, cache_dir=cache, log=log)
        card = write_model_card(out, ev)
        _say(quiet, f"Wrote {card}")

# ------------------------------------------------------------------------------------------------
# benchmark (issue 5)     -- commands: bench
# ------------------------------------------------------------------------------------------------
def _parse_cpus(text: str | None) -> list[int] | None:
    """``"0,1"`` / ``"0-3,6"`` -> sorted CPU ids (None when not given)."""
    if not text:
        return None
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                cpus.update(range(int(a), int(b) + 1))
            elif part:
                cpus.add(int(part))
    except ValueError:
        raise ConfigError(f"--cpus {text!r} is not a CPU list (e.g. 0,1 or 0-3)") from None
    import os

    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(cpus)
    if not cpus or not cpus <= allowed:
        raise ConfigError(f"--cpus {text!r}: this process may use CPUs {sorted(allowed)}")
    return sorted(cpus)


def _remove_bench_report(folder: Path) -> None:
    """Remove an earlier benchmark's report files and logs from ``folder`` (kept: its inputs and work caches)."""
    import shutil

    for name in ("results.json", "report.md", "latency.png", "dice.png"):
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / "logs", ignore_errors=True)


@app.command("bench")
@handle_errors
def bench_cmd(
    input: Annotated[list[Path], typer.Option("-i", "--input", help="CT file or folder of CTs (repeatable).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Report folder (results.json, report.md, plots).")],
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Trainer folder or TotalSegmentator home dir (e.g. `ctpassport model standin`).")] = None,
    configs: Annotated[str, typer.Option("--configs", help="Comma-separated: vanilla, onnx, onnx-fast, openvino, openvino-bf16, int8, optimized, gpu, torch.")] = "vanilla,onnx,optimized",
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="Timed runs per case and configuration.")] = 3,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed warm-up runs per configuration.")] = 1,
    variant: Annotated[list[str] | None, typer.Option("--variant", help="Also run each input resampled to this spacing, e.g. 0.8x0.8x1.5 (mm; repeatable).")] = None,
    threads: Annotated[int, typer.Option("--threads", min=0, help="Threads per configuration (0 = all allowed CPUs).")] = 0,
    cpus: Annotated[str | None, typer.Option("--cpus", help="Pin every configuration to these CPUs, e.g. 0,1 or 0-3 (like taskset).")] = None,
    price_per_hour: Annotated[float | None, typer.Option("--price-per-hour", min=0.0, help="Instance price ($/h) for the cost of 1,000 scans.")] = None,
    passport: Annotated[bool, typer.Option("--passport/--no-passport", help="Include the passport stage in ctpassport's runs.")] = True,
    margins: Annotated[bool, typer.Option("--margins/--no-margins", help="Agreement on confident voxels (needs the exact fp32 path's logits).")] = True,
    passport_speed: Annotated[str, typer.Option("--passport-speed", help="Passport speed figures: quick, full, tiny or off.")] = "quick",
    device: Annotated[str, typer.Option("--device", "-d", help="cpu or gpu (vanilla's device and what 'optimized' picks).")] = "cpu",
    keep_outputs: Annotated[bool, typer.Option("--keep-outputs", help="Keep every configuration's label maps.")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing report.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Benchmark TotalSegmentator (vanilla) against ctpassport's pipelines: speed, memory, agreement."""
    from .bench.report import markdown_table, write_all
    from .bench.runner import BenchSettings, resolve_configs, run_benchmark
    from .io.atomic import check_writable, mark_output_folder

    _check_choice("--passport-speed", passport_speed, ("quick", "full", "tiny", "off"))
    if device not in ("cpu", "gpu", "cuda"):
        raise ConfigError(f"--device must be cpu or gpu, not {device!r}")
    from .bench.inputs import collect_inputs, parse_spacing

    specs = resolve_configs(configs)
    cpu_list = _parse_cpus(cpus)
    if price_per_hour is not None and not price_per_hour < float("inf"):
        raise ConfigError(f"--price-per-hour must be a finite price in $/h, not {price_per_hour:g}")
    for v in variant or []:
        parse_spacing(v)
    from .io.nifti import read_image

    for path in collect_inputs(list(input))[0]:  # fail on missing or unreadable inputs before anything is written
        read_image(path, kind="CT")
    existed = output.exists()
    rerun = existed and (not output.is_dir() or any(output.iterdir()))
    if rerun:
        # a report folder is written into (inputs/, work/ and outputs/ are replaced): only an earlier report
        # folder (it holds ctpassport's output marker) and only with --force
        check_writable(output, force, folder=True)
    from .model.folder import load_model_folder, locate_model

    load_model_folder(locate_model(model))  # a missing or broken model fails before anything is written too
    if rerun:
        _remove_bench_report(output)  # a rerun that fails must not leave the last run's report looking current
    output.mkdir(parents=True, exist_ok=True)
    mark_output_folder(output)
    parts = ["ctpassport bench"] + [f"-i {p}" for p in input] + ([f"--model {model}"] if model else [])
    parts += [f"-o {output}", f"--configs {configs}", f"--repeat {repeat}", f"--warmup {warmup}"]
    parts += [f"--variant {v}" for v in variant or []]
    parts += ([f"--threads {threads}"] if threads else []) + ([f"--cpus {cpus}"] if cpus else [])
    parts += ([f"--price-per-hour {price_per_hour:g}"] if price_per_hour is not None else [])
    parts += ([] if passport else ["--no-passport"]) + ([] if margins else ["--no-margins"])
    parts += ([f"--passport-speed {passport_speed}"] if passport_speed != "quick" else [])
    parts += ([f"--device {device}"] if device != "cpu" else [])
    settings = BenchSettings(inputs=[str(p) for p in input], model=str(model) if model else None, out_dir=output,
                             configs=specs, repeat=repeat, warmup=warmup, variants=list(variant or []),
                             threads=threads or None, cpus=cpu_list, price_per_hour=price_per_hour,
                             passport=passport, margins=margins, passport_speed=passport_speed, device=device,
                             keep_outputs=keep_outputs, command=" ".join(parts))
    progress, task = _progress(quiet, 1, "Benchmark")
    with progress:
        def on_progress(done: int, total: int, what: str) -> None:
            progress.update(task, total=total, completed=done, description=f"Benchmark: {what}"[:60])

        try:
            results = run_benchmark(settings, log=lambda m: progress.update(task, description=m[:60]),
                                    progress=on_progress)
        except BaseException:
            if not existed:  # a failed or interrupted first run leaves no half report folder behind
                import shutil

                shutil.rmtree(output, ignore_errors=True)
            raise
    paths = write_all(results, output)
    for c in results["cases"] if not quiet else []:
        typer.echo(f"\n{c['name']} ({' x '.join(map(str, c['shape']))}):")
        typer.echo(markdown_table(results, c["name"]))
    _say(quiet, "\nWrote " + ", ".join(str(p) for p in paths.values()))


# ------------------------------------------------------------------------------------------------
# hospital plumbing (issue 7) -- commands: batch, store, fetch-data
# ------------------------------------------------------------------------------------------------
store_app = typer.Typer(help="Passport store: passports and study metadata in SQLite or PostgreSQL.",
                        no_args_is_help=True)
app.add_typer(store_app, name="store")

_DB_HELP = "Store: an SQLite file or postgresql://user@host:port/db (default: $CTPASSPORT_DB, else $XDG_DATA_HOME/ctpassport/passports.sqlite, ~/.local/share/... without it)."


@app.command("batch")
@handle_errors
def batch_cmd(
    in_dir: Annotated[Path, typer.Argument(help="Folder of CTs: NIfTI files, DICOM folders, zips of DICOM folders.")],
    out_dir: Annotated[Path, typer.Argument(help="Output folder: one sub-folder per case, batch.json, batch.csv.")],
    workers: Annotated[int, typer.Option("--workers", "-w", help="Local worker processes (each loads the model once).")] = 1,
    scheduler: Annotated[str | None, typer.Option("--scheduler", help="Dask scheduler address, e.g. tcp://host:8786 (paths must be shared).")] = None,
    passport: Annotated[bool, typer.Option("--passport", help="Also write passport.json per case.")] = False,
    passport_grid: Annotated[str, typer.Option("--passport-grid", help="model (3 mm grid) or output.")] = "model",
    normals: Annotated[bool, typer.Option("--normals", help="Store outward normals at the passports' boundary points (more accurate registration, larger JSON).")] = False,
    body: Annotated[bool, typer.Option("--body", help="Also store the body outline (skin surface points) from the CT: the deformable registration matches it too.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Keep finished cases, redo the rest.")] = False,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Trainer folder or TotalSegmentator home dir.")] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="auto (default: the fastest backend that keeps parity on this machine, e.g. openvino-bf16 on AMX CPUs), onnxruntime (exact fp32 parity path), openvino, openvino-bf16, openvino-int8, cuda, torch.")] = None,
    nr_thr: Annotated[int, typer.Option("--nr_thr", "-nr", help="Inference threads per worker (0 = share the cores).")] = 0,
    roi_subset: Annotated[list[str] | None, typer.Option("--roi_subset", "-rs", help="Keep only these classes (names).")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Redo every case of an existing batch output.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Segment every CT under IN_DIR into OUT_DIR (one folder per case; failures are recorded, the rest go on)."""
    from .batch.runner import BatchFailed, run_batch
    from .batch.worker import BatchOptions
    from .segment.pipeline import classes_for

    classes_for(roi_subset)
    _check_choice("--passport-grid", passport_grid, _passport_grids())
    from .model.folder import is_demo_alias

    # an absolute path, so that pool and Dask workers find it; `demo` stays the embedded model's name
    model_arg = None if model is None else str(model) if is_demo_alias(model) else str(model.resolve())
    opts = BatchOptions(model=model_arg, backend=backend,
                        threads=nr_thr or None, passport=passport, passport_grid=passport_grid,
                        passport_normals=normals, passport_body=body, roi_subset=tuple(roi_subset) if roi_subset else None)
    progress, task = _progress(quiet, 1, "Batch")

    def on_plan(total: int, done: int) -> None:
        progress.update(task, total=total, completed=done)
        if done:
            _say(quiet, f"Resuming: {done} of {total} cases already finished")

    def on_record(rec: dict[str, Any]) -> None:
        progress.update(task, advance=1)
        if rec["status"] != "ok":
            progress.console.print(f"[red]failed[/red] {rec['case_id']}: {rec['error']}", markup=True,
                                   highlight=False)
        for warning in rec.get("warnings") or ():  # shown with -q too, like segment's: it is about the result
            progress.console.print(f"ctpassport: warning: {rec['case_id']}: {warning}", markup=False,
                                   highlight=False, soft_wrap=True)

    with progress:
        summary = run_batch(in_dir, out_dir, opts, workers=workers, scheduler=scheduler, resume=resume,
                            force=force, on_record=on_record, on_plan=on_plan)
    c = summary.counts()
    _say(quiet, f"{c['ok']} of {c['total']} cases ok ({c['resumed']} from before), {c['failed']} failed; "
                f"summary: {Path(summary.out_dir) / 'batch.json'}")
    if c["failed"]:
        raise BatchFailed(f"{c['failed']} of {c['total']} cases failed (see {Path(summary.out_dir) / 'batch.csv'})")


@store_app.command("add")
@handle_errors
def store_add_cmd(
    passports: Annotated[list[Path], typer.Argument(help="Passport JSON files (e.g. OUT_DIR/*/passport.json of a batch).")],
    db: Annotated[str | None, typer.Option("--db", help=_DB_HELP)] = None,
    ct: Annotated[Path | None, typer.Option("--ct", help="The CT the passport was made from (NIfTI, DICOM folder/zip).")] = None,
    series_uid: Annotated[str | None, typer.Option("--series-uid", help="DICOM series of --ct (default: the largest CT series).")] = None,
    study: Annotated[str | None, typer.Option("--study", help="Study key to use (default: first 12 hex digits of the source hash).")] = None,
    patient_id: Annotated[str | None, typer.Option("--patient-id", help="Patient id (overrides DICOM).")] = None,
    study_date: Annotated[str | None, typer.Option("--study-date", help="YYYY-MM-DD or YYYYMMDD (overrides DICOM).")] = None,
    modality: Annotated[str | None, typer.Option("--modality", help="e.g. CT (overrides DICOM).")] = None,
    description: Annotated[str | None, typer.Option("--description", help="Free text.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Add passports with their study metadata (adding the same source again changes nothing)."""
    from .passport.schema import load_passport
    from .store.db import PassportStore
    from .store.ingest import study_meta_for

    if len(passports) > 1 and (ct is not None or study is not None):
        raise ConfigError("--ct and --study apply to one passport; add the others separately")
    with PassportStore(db) as store:
        for path in passports:
            pp = load_passport(path)
            meta = study_meta_for(pp, path, ct=ct, series_uid=series_uid, study_key=study, patient_id=patient_id,
                                  study_date=study_date, modality=modality, description=description)
            rec, created = store.add(pp, meta)
            _say(quiet, f"{'added' if created else 'already stored'}: {rec.study_key} ({path})")
            typer.echo(rec.study_key)


@store_app.command("list")
@handle_errors
def store_list_cmd(
    db: Annotated[str | None, typer.Option("--db", help=_DB_HELP)] = None,
    patient_id: Annotated[str | None, typer.Option("--patient-id", help="Only this patient.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """List the stored studies."""
    import json

    from .store.db import PassportStore

    with PassportStore(db, read_only=True) as store:
        records = store.list(patient_id=patient_id)
    if as_json:
        for rec in records:
            typer.echo(json.dumps(rec.summary()))
        return
    typer.echo("study\tpatient\tdate\tmodality\torgans\tsource_sha256\tadded")
    for r in records:
        typer.echo("\t".join(str(v if v is not None else "-") for v in (
            r.study_key, r.patient_id, r.study_date, r.modality, r.n_organs, r.source_sha256[:16], r.added_at)))


@store_app.command("show")
@handle_errors
def store_show_cmd(
    study: Annotated[str, typer.Argument(help="Study key, id, or a unique prefix of its source hash.")],
    db: Annotated[str | None, typer.Option("--db", help=_DB_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The record and its passport as JSON.")] = False,
    passport_out: Annotated[Path | None, typer.Option("--passport-out", help="Write the stored passport to this file.")] = None,
    force: Annotated[bool, typer.Option("--force", "-f")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing (with --passport-out: only write the passport); --json still prints.")] = False,
) -> None:
    """Show a stored study: metadata and organs (volume mm3, centroid RAS+ mm)."""
    from .io.atomic import check_writable
    from .passport.schema import save_passport
    from .store.db import PassportStore, record_json

    with PassportStore(db, read_only=True) as store:
        rec = store.get(study)
    if passport_out is not None:
        check_writable(passport_out, force)
        save_passport(rec.load_passport(), passport_out)
    if as_json:
        typer.echo(record_json(rec, with_passport=True))
        return
    if quiet:
        return
    for k, v in rec.summary().items():
        typer.echo(f"{k}: {v if v is not None else '-'}")
    typer.echo("organs (id, name, volume mm3, centroid RAS+ mm):")
    for o in rec.load_passport().organs:
        c = ", ".join(f"{x:.1f}" for x in o.centroid_mm)
        typer.echo(f"  {o.id}\t{o.name or '?'}\t{o.volume_mm3:.0f}\t({c})")


@store_app.command("register")
@handle_errors
def store_register_cmd(
    fixed_study: Annotated[str, typer.Option("--fixed-study", help="Study key (or id, hash prefix) of the fixed scan.")],
    moving_study: Annotated[str, typer.Option("--moving-study", help="Study key of the moving scan.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for transform.h5, displacement.nii.gz, registration.json.")],
    tier: Annotated[str, typer.Option("--tier", help="rigid or deformable.")] = "rigid",
    method: Annotated[str | None, typer.Option("--method", help="Deformable fit (see `ctpassport register --help`).")] = None,
    db: Annotated[str | None, typer.Option("--db", help=_DB_HELP)] = None,
    force: Annotated[bool, typer.Option("--force", "-f")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Register two stored studies from their passports alone (no images needed); T maps fixed to moving."""
    from .io.atomic import check_writable
    from .store.db import PassportStore
    from .store.registration import register_studies

    from .register.api import TIERS
    from .register.deformable import METHODS

    _check_choice("--tier", tier, TIERS)
    if method is not None:
        _check_choice("--method", method, METHODS)
    check_writable(output, force, folder=True)
    with PassportStore(db, read_only=True) as store:
        fixed, moving = store.get(fixed_study), store.get(moving_study)
    result = register_studies(fixed, moving, output, tier=tier, method=method, force=force)
    t = result.translation
    _say(quiet, f"{tier} registration {fixed.study_key} -> {moving.study_key}: rotation "
                f"{result.transform.rigid.angle_deg:.2f} deg, translation ({t[0]:.1f}, {t[1]:.1f}, {t[2]:.1f}) mm; "
                f"wrote {output}")
    typer.echo(str(output))


@app.command("fetch-data")
@handle_errors
def fetch_data_cmd(
    dataset: Annotated[str, typer.Argument(help="msd-spleen or learn2reg-lungct.")],
    dest: Annotated[Path, typer.Option("--dest", help="Folder that receives DATASET/.")],
    url: Annotated[str | None, typer.Option("--url", help="Download from this URL instead (a mirror).")] = None,
    sha256: Annotated[str | None, typer.Option("--sha256", help="Expected SHA-256 of the archive.")] = None,
    md5: Annotated[str | None, typer.Option("--md5", help="Expected MD5 of the archive.")] = None,
    keep_archive: Annotated[bool, typer.Option("--keep-archive", help="Keep the downloaded archive in --dest.")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Fetch again and replace DATASET/ (only a folder that ctpassport fetched; anything else there is refused).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Download a public dataset (resumable, checksum-verified) and unpack it for the benchmarks."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from .fetch import check_dataset_folder, check_fetch_arguments, fetch_dataset

    check_fetch_arguments(dataset, dest, url=url, sha256=sha256, md5=md5)  # before any progress bar
    check_dataset_folder(dest / dataset)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        console=Console(stderr=True), disable=quiet)
    task = progress.add_task(dataset, total=None)
    with progress:
        folder = fetch_dataset(dataset, dest, url=url, sha256=sha256, md5=md5, force=force,
                               keep_archive=keep_archive,
                               progress=lambda got, total: progress.update(task, completed=got, total=total),
                               say=lambda m: _say(quiet, m))
    _say(quiet, f"Dataset in {folder}")
    typer.echo(str(folder))

# ------------------------------------------------------------------------------------------------
# web app (issue 8)       -- commands: app
# ------------------------------------------------------------------------------------------------
@app.command("app")
@handle_errors
def app_cmd(
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port to listen on.", min=1, max=65535)] = 8501,
    host: Annotated[str, typer.Option("--host", help="Address to bind (default: this machine only).")] = "127.0.0.1",
    max_upload_mb: Annotated[int, typer.Option("--max-upload-mb", envvar="CTPASSPORT_APP_MAX_UPLOAD_MB", min=1,
                                               help="Largest upload in MB (Streamlit's default is 200).")] = 4096,
    root: Annotated[Path | None, typer.Option("--root", help="Server folder users may open CTs from "
                                              "(default: $CTPASSPORT_APP_ROOT; none: no server files).")] = None,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Model folder (default: installed "
                                               "TotalSegmentator weights, else the demo model).")] = None,
    db: Annotated[str | None, typer.Option("--db", help="Passport store: SQLite file or postgresql:// URL "
                                           "(default: $CTPASSPORT_DB or the user's store).")] = None,
    print_command: Annotated[bool, typer.Option("--print-command", help="Print the streamlit command and exit.")] = False,
) -> None:
    """Start the web app (Streamlit) on http://HOST:PORT: segment, inspect, register, download."""
    import os
    import shlex
    import subprocess

    from .app import streamlit_command
    from .config import Config

    cfg = Config.from_env(app_root=root)
    env = dict(os.environ)
    if cfg.app_root is not None:
        app_root = Path(cfg.app_root).expanduser().resolve()
        if not app_root.is_dir():
            raise ConfigError("is not a folder", app_root, "pass --root with an existing folder")
        env["CTPASSPORT_APP_ROOT"] = str(app_root)
    if model is not None:
        from .model.folder import locate_model

        env["CTPASSPORT_APP_MODEL"] = str(locate_model(model))
    if db is not None:
        env["CTPASSPORT_DB"] = db
    cmd = streamlit_command(host=host, port=port, max_upload_mb=max_upload_mb)
    if print_command:
        typer.echo(shlex.join(cmd))
        return
    try:
        import streamlit  # noqa: F401
    except ImportError:
        raise CTPassportError("the web app needs Streamlit", hint="pip install 'ctpassport[app]'") from None
    import signal

    typer.echo(f"ctpassport app on http://{host}:{port} (Ctrl+C stops it)", err=True)
    proc = subprocess.Popen(cmd, env=env)
    stopped: list[int] = []

    def forward(signum: int, _frame: Any) -> None:  # SIGTERM/SIGHUP: stop Streamlit cleanly, then exit
        stopped.append(signum)
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if code != 0 and not stopped:
        raise CTPassportError(f"streamlit exited with code {code}")


#: TotalSegmentator 2.18 options that ``segment`` does not take, with the number of values each takes
#: (``"+"``: one or more, ``"?"``: at most one) and why: refused in one line (exit 5), never misread (Click would
#: read an unknown ``-ff`` as ``-f -f`` and ``-sii`` as ``-s -i i``).
TS_UNSUPPORTED: dict[str, tuple[str | int, str]] = {
    **dict.fromkeys(("-ff", "--fastest"), (0, "the 6 mm model: ctpassport runs the fast 3 mm model")),
    **dict.fromkeys(("-sl", "--save_lowres"), (0, "the output is on the input's grid")),
    **dict.fromkeys(("-rsr", "--roi_subset_robust"), ("+", "the crop model is not part of ctpassport; use -rs")),
    **dict.fromkeys(("-rc", "--robust_crop"), (0, "the crop model is not part of ctpassport")),
    **dict.fromkeys(("-ro", "--resampling_order"), (1, "ctpassport resamples as the fast model's default")),
    **dict.fromkeys(("-ho", "--higher_order_resampling", "--high_order_resampling",
                     "--higher_order_resampling_LEGACY", "--high_order_resampling_LEGACY"),
                    (0, "ctpassport resamples as the fast model's default")),
    **dict.fromkeys(("-t", "--nora_tag"), (1, "NORA is not supported")),
    **dict.fromkeys(("-ms", "--model_size"), (1, "ctpassport runs the fast 3 mm model")),
    **dict.fromkeys(("-r", "--radiomics"), (0, "radiomics are not computed")),
    **dict.fromkeys(("-rp", "--report"), (1, "no PDF report")),
    **dict.fromkeys(("-sa", "--stats_aggregation"), (1, "statistics are means")),
    **dict.fromkeys(("-sx", "--statistics_extra"), (0, "the extra statistics are not computed")),
    **dict.fromkeys(("-cp", "--crop_path"), (1, "the crop model is not part of ctpassport")),
    **dict.fromkeys(("-ndm", "--no_derived_masks"), (0, "the 'total' task has no derived masks here")),
    **dict.fromkeys(("-v1o", "--v1_order"), (0, "labels use TotalSegmentator 2's class ids")),
    **dict.fromkeys(("-rmb", "--remove_small_blobs"), ("?", "no postprocessing beyond the model's own")),
    **dict.fromkeys(("-sp", "--save_probabilities"), (1, "probabilities are not written")),
    **dict.fromkeys(("-l", "--license_number"), (1, "ctpassport needs no licence")),
    "--test": (1, "TotalSegmentator's self test"),
    **dict.fromkeys(("-lt", "--list-tasks"), (0, "use `ctpassport classes`")),
    **dict.fromkeys(("-lc", "--list-classes"), ("?", "use `ctpassport classes`")),
    "-ot with several types": (0, "one output type per run: run segment once for each"),
}


def totalsegmentator_argv(argv: list[str]) -> list[str]:
    """``segment`` arguments as TotalSegmentator spells them, made readable by the parser here: the
    several-names-per-flag subset (``-rs liver spleen``, an argparse ``nargs="+"``) as one flag per name
    (``-rs liver -rs spleen``); ``-s PATH`` as ``-s --statistics-path PATH``; ``--nr_thr_resamp N`` as ``-nr N``;
    ``--debug`` moved before the command (it is the program's option here); ``-ot`` with several output types
    and an option of
    :data:`TS_UNSUPPORTED` (and its values) as ``--ts-unsupported OPTION``, which ``segment`` refuses in one
    line. Anything else unchanged."""
    cmd = next((k for k, tok in enumerate(argv) if not tok.startswith("-")), None)
    if cmd is None or argv[cmd] != "segment":
        return list(argv)
    front = list(argv[:cmd])
    out = [argv[cmd]]
    rest = argv[cmd + 1:]

    def values(k: int, count: str | int) -> int:
        """Index after the values of an option whose first value would be at ``k``."""
        limit = len(rest) if count == "+" else 1 if count == "?" else int(count)
        n = 0
        while k < len(rest) and n < limit and not (rest[k].startswith("-") and len(rest[k]) > 1):
            k, n = k + 1, n + 1
        return k

    k = 0
    while k < len(rest):
        tok = rest[k]
        k += 1
        if tok in ("-rs", "--roi_subset"):
            end = values(k, "+")
            out += [x for name in rest[k:end] for x in (tok, name)] or [tok]  # no name: the parser reports it
            k = end
        elif tok in ("-s", "--statistics") and k < len(rest) and not rest[k].startswith("-"):
            out += [tok, "--statistics-path", rest[k]]
            k += 1
        elif tok in ("-ot", "--output_type", "--output-type") and values(k, "+") - k > 1:
            out += ["--ts-unsupported", "-ot with several types"]
            k = values(k, "+")
        elif tok == "--nr_thr_resamp":
            out.append("-nr")
        elif tok == "--debug":
            front.append(tok)
        elif tok in TS_UNSUPPORTED:
            out += ["--ts-unsupported", tok]
            k = values(k, TS_UNSUPPORTED[tok][0])
        else:
            out.append(tok)
    return front + out


def main() -> None:
    """Console-script entry point. A command line the parser cannot read (an unknown option, a malformed value
    such as ``-nr abc``, a missing required option) is one line naming the problem and the command's help,
    exit 2, like every other bad input (Click would draw a several-line box)."""
    import sys

    # Typer's own copy of Click's exceptions (what its parser raises): UsageError is BadParameter's base
    usage_error: type[Exception] = typer.BadParameter.__mro__[1]
    try:
        rv = app(args=totalsegmentator_argv(sys.argv[1:]), prog_name="ctpassport", standalone_mode=False)
    except usage_error as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":  # `ctpassport` or `ctpassport model` alone: the help,
            sys.exit(2)  # which the parser has printed; exit 2 as before
        where = ctx.command_path if ctx is not None else "ctpassport"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _err(f"{' '.join(message.split())} (see `{where} --help`)")
        sys.exit(int(getattr(exc, "exit_code", 2)))
    except typer.Abort:  # Ctrl-C while the parser itself was reading (e.g. a prompt)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
