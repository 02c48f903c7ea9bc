"""The ``ctpassport`` command line. Every command lives here; each is a thin wrapper over the stage APIs.

Conventions: TotalSegmentator-like flags (``-i``, ``-o``, ``--ml``, ``--roi_subset``, ``--statistics``,
``--device``, ``-q``); outputs are never overwritten without ``--force``; expected failures print one line
``ctpassport: error: <file>: <problem>`` to stderr and exit nonzero (``--debug`` shows the traceback).
Commands are testable in-process with ``typer.testing.CliRunner`` on :data:`app`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from . import __version__
from .errors import CTPassportError

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
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - last resort: still one line, no traceback
            if _STATE["debug"]:
                raise
            first = (str(exc).splitlines() or [""])[0][:300]
            _err(f"internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)")
            raise typer.Exit(70) from None

    return wrapper  # type: ignore[return-value]


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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rich.console import Console

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
@app.command("segment")
@handle_errors
def segment_cmd(
    input: Annotated[Path, typer.Option("-i", "--input", help="CT image: NIfTI file (or DICOM folder/zip).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output NIfTI (--ml) or folder of masks.")],
    ml: Annotated[bool, typer.Option("--ml", help="One multilabel file with the label table (like TotalSegmentator --ml).")] = False,
    roi_subset: Annotated[list[str] | None, typer.Option("--roi_subset", "-rs", help="Keep only these classes (names).")] = None,
    statistics: Annotated[bool, typer.Option("--statistics", "-s", help="Write statistics.json (volume mm3, mean HU).")] = False,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Trainer folder or TotalSegmentator home dir.")] = None,
    device: Annotated[str, typer.Option("--device", "-d", help="cpu or gpu (gpu: CUDA backend when available).")] = "cpu",
    backend: Annotated[str | None, typer.Option("--backend", help="auto, onnxruntime, openvino-bf16, ...")] = None,
    nr_thr: Annotated[int, typer.Option("--nr_thr", "-nr", help="Inference threads (0 = all cores).")] = 0,
    timings: Annotated[Path | None, typer.Option("--timings", help="Write per-stage seconds and peak RSS (JSON).")] = None,
    passport: Annotated[Path | None, typer.Option("--passport", help="Also write the passport JSON here.")] = None,
    passport_grid: Annotated[str, typer.Option("--passport-grid", help="model (3 mm grid, like the study) or output.")] = "model",
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing outputs.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Segment a CT with TotalSegmentator's fast model (same labels as `TotalSegmentator --fast`)."""
    from .config import Config
    from .io.atomic import check_writable
    from .segment.pipeline import Segmenter

    from .segment.pipeline import Timings, classes_for, load_input

    cfg = Config.from_env()
    check_writable(output, force)
    if passport is not None:
        check_writable(passport, force)
    if timings is not None:
        check_writable(timings, force)
    classes_for(roi_subset)  # fail early on unknown names
    tm = Timings()
    image = load_input(input, tm)  # validate the input before the (slow) model load
    chosen = backend or ("cuda" if device.startswith(("gpu", "cuda")) else None)
    _say(quiet, "Loading model...")
    seg = Segmenter(model, backend=chosen, threads=nr_thr or None, config=cfg)
    _say(quiet, f"Model {seg.model.model_id} on {seg.backend_name}")
    progress, task = _progress(quiet, 1, "Segmenting")
    passport_fn = None
    if passport is not None:
        from .passport.build import passport_from_segmentation

        def passport_fn(result: Any, tm: Any) -> None:
            passport_from_segmentation(result, passport, input_path=input, grid=passport_grid,
                                       model_id=seg.model.model_id, timings=tm.seconds)

    with progress:
        def tick(n: int) -> None:
            progress.update(task, advance=n)

        res = seg.segment_file(input, output, ml=ml, roi_subset=roi_subset, statistics=statistics,
                               timings_path=timings, force=True, passport=passport_fn,
                               progress=tick, image=image, timings=tm)
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

    if plans_format not in ("flat", "architecture"):
        raise CTPassportError(f"--plans-format must be flat or architecture, not {plans_format!r}")
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
    from .io.atomic import check_writable
    from .model.export import export_onnx, find_or_export_onnx
    from .model.folder import load_model_folder, locate_model

    folder = load_model_folder(locate_model(model))
    if output is None:
        path = find_or_export_onnx(folder, Config.from_env().cache_dir)
        _say(quiet, f"ONNX model: {path}")
        typer.echo(str(path))
        return
    check_writable(output, force)
    rep = export_onnx(folder, output)
    _say(quiet, f"Wrote {output} (max |ONNX - PyTorch| = {rep.max_abs_diff:.2e} on a {rep.check_shape} patch, "
                f"tolerance {rep.tolerance:.0e})")


@model_app.command("info")
@handle_errors
def model_info_cmd(
    model: Annotated[Path | None, typer.Argument(help="Trainer folder or TotalSegmentator home dir.")] = None,
) -> None:
    """Show the model folder that would be used and its key facts (JSON)."""
    import json

    from .model.folder import load_model_folder, locate_model

    m = load_model_folder(locate_model(model))
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

# ------------------------------------------------------------------------------------------------
# registration (issue 4)  -- commands: register, warp, validate-registration
# ------------------------------------------------------------------------------------------------

# ------------------------------------------------------------------------------------------------
# phantom + demo (issue 6) -- commands: phantom, demo, model train-demo
# ------------------------------------------------------------------------------------------------

# ------------------------------------------------------------------------------------------------
# benchmark (issue 5)     -- commands: bench
# ------------------------------------------------------------------------------------------------

# ------------------------------------------------------------------------------------------------
# hospital plumbing (issue 7) -- commands: batch, store, fetch-data
# ------------------------------------------------------------------------------------------------

# ------------------------------------------------------------------------------------------------
# web app (issue 8)       -- commands: app
# ------------------------------------------------------------------------------------------------


def main() -> None:
    """Console-script entry point."""
    app(prog_name="ctpassport")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
