"""Run a batch: discover the CTs, skip finished ones on ``--resume``, dispatch :func:`run_case` in
process, on a local process pool, or on a Dask distributed cluster, and keep ``batch.json`` /
``batch.csv`` up to date after every case (so a killed batch still has a truthful summary).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ConfigError, CTPassportError, InputError, OutputError, OutputExistsError
from ..io.atomic import folder_lock, remove_leftovers, write_text_atomic
from .discover import Case, discover_cases, input_signature
from .worker import BatchOptions, read_case_record, run_case

BATCH_JSON = "batch.json"
BATCH_CSV = "batch.csv"
CSV_COLUMNS = ("case_id", "status", "resumed", "seconds", "kind", "input", "output", "source_sha256", "error")


class BatchFailed(CTPassportError):
    """Some cases of a batch failed (the others were written); the summary names them."""

    exit_code = 8


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class BatchSummary:
    """State of a batch run; :meth:`write` saves ``batch.json`` and ``batch.csv`` atomically."""

    in_dir: str
    out_dir: str
    executor: str
    options: dict[str, Any]
    cases: list[Case]
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: str = field(default_factory=_now)
    finished: str | None = None
    status: str = "running"

    def counts(self) -> dict[str, int]:
        recs = [self.records.get(c.case_id, {"status": "pending"}) for c in self.cases]
        return {
            "total": len(self.cases),
            "ok": sum(r["status"] == "ok" for r in recs),
            "failed": sum(r["status"] == "failed" for r in recs),
            "pending": sum(r["status"] == "pending" for r in recs),
            "resumed": sum(bool(r.get("resumed")) for r in recs),
        }

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records.values() if r["status"] == "failed"]

    def as_dict(self) -> dict[str, Any]:
        rows = []
        for c in self.cases:
            rec = self.records.get(c.case_id) or {"case_id": c.case_id, "input": c.path, "kind": c.kind,
                                                  "status": "pending"}
            rows.append(rec)
        return {"ctpassport_version": __version__, "in_dir": self.in_dir, "out_dir": self.out_dir,
                "status": self.status, "started": self.started, "finished": self.finished,
                "executor": self.executor, "options": self.options, "counts": self.counts(), "cases": rows}

    def write(self) -> None:
        out = Path(self.out_dir)
        doc = self.as_dict()
        write_text_atomic(out / BATCH_JSON, json.dumps(doc, indent=2))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for rec in doc["cases"]:
            writer.writerow({k: ("" if rec.get(k) is None else rec.get(k)) for k in CSV_COLUMNS})
        write_text_atomic(out / BATCH_CSV, buf.getvalue())


def _is_case_dir(p: Path) -> bool:
    return p.is_dir() and not p.name.startswith(".") and (p / "case.json").is_file()


def clean_partial(out_dir: Path) -> list[Path]:
    """Remove what a killed run left: hidden ``.<case>.tmp-*`` / ``.<case>.old-*`` folders and files."""
    return remove_leftovers(out_dir)


def output_lock(out_dir: Path) -> AbstractContextManager[None]:
    """Hold an exclusive lock on the batch output folder ``out_dir`` (see :func:`~ctpassport.io.atomic.folder_lock`),
    so that a second batch into the same folder is refused instead of removing the first one's temporary case
    folders or interleaving its summary."""
    return folder_lock(out_dir, "is being written by another ctpassport batch",
                       "wait for it to finish, or choose another OUT_DIR")


def finished_record(case: Case, out_dir: Path, opts: BatchOptions | None = None,
                    model_id: str | None = None) -> dict[str, Any] | None:
    """The record of ``case`` when its folder is complete and made from the same, unchanged input (and, when
    given, with the same output-shaping options and the same model)."""
    rec = read_case_record(out_dir / case.case_id)
    if rec is None or rec.get("input") != case.path:
        return None
    if opts is not None:
        made = rec.get("output_options")
        if isinstance(made, dict) and "passport_body" not in made:  # made before --body: passports without one
            made = {**made, "passport_body": False if made.get("passport") else None}
        if made != opts.output_options():
            return None
    if model_id is not None and rec.get("model_id") != model_id:
        return None
    sig = rec.get("input_signature")
    if sig is not None and sig != input_signature(case.path):
        return None
    return rec


def default_threads(workers: int) -> int:
    """Inference threads per worker when ``workers`` share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _failed(case: Case, error: str) -> dict[str, Any]:
    return {"case_id": case.case_id, "input": case.path, "kind": case.kind, "status": "failed",
            "error": error, "seconds": None, "output": None, "finished": _now()}


# ------------------------------------------------------------------------------------------------
# executors: each yields one record per case, in completion order
# ------------------------------------------------------------------------------------------------
def _run_inline(todo: list[Case], out: str, opts: BatchOptions) -> Iterator[dict[str, Any]]:
    for case in todo:
        yield run_case(case, out, opts)


#: How often (s) a local pool's worker checks that the batch process that started it is still alive.
PARENT_CHECK_S = 0.5


def _exit_with_parent(parent_pid: int) -> None:
    """A local pool worker's initializer: a daemon thread ends the worker (at once, mid-case if need be: its
    output is written atomically, and a resumed batch removes the temporary folder) when the batch process
    that started it is gone (killed with SIGKILL, which runs no clean-up), so that no orphaned worker keeps
    writing into OUT_DIR beside a resumed batch."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, name="ctpassport-parent-watch", daemon=True).start()


def _run_pool(todo: list[Case], out: str, opts: BatchOptions, workers: int) -> Iterator[dict[str, Any]]:
    """A local pool of ``workers`` spawned processes (each loads the model once); at most ``workers``
    cases in flight, and a dead worker process fails only the cases it may have held."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = list(todo)

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_exit_with_parent,
                                   initargs=(os.getpid(),))

    pool = new_pool()
    running: dict[Future[dict[str, Any]], Case] = {}
    try:
        while queue or running:
            while queue and len(running) < workers:
                case = queue.pop(0)
                running[pool.submit(run_case, case, out, opts)] = case
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            broken = False
            for fut in done:
                case = running.pop(fut)
                try:
                    yield fut.result()
                except BrokenProcessPool:
                    broken = True
                    yield _failed(case, "the worker process died (out of memory or killed)")
            if broken:
                for fut, case in list(running.items()):
                    yield _failed(case, "the worker process died (out of memory or killed)")
                running.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = new_pool()
    except BaseException:  # Ctrl-C, or the consumer closed us: stop the workers now, not after their case
        procs = list((getattr(pool, "_processes", None) or {}).values())
        for proc in procs:
            proc.terminate()
        for proc in procs:  # gone before the caller cleans their temporary folders up
            proc.join(timeout=10)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True, cancel_futures=True)


def _dask_client(scheduler: str, connect_timeout: float = 30.0) -> Any:
    """A Dask distributed client of ``scheduler`` (:class:`CTPassportError` when it cannot be reached)."""
    try:
        from distributed import Client
    except ImportError:
        raise CTPassportError("--scheduler needs dask.distributed", hint="pip install 'ctpassport[batch]'") from None
    try:
        return Client(scheduler, timeout=f"{connect_timeout}s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise CTPassportError(f"cannot reach the Dask scheduler at {scheduler} ({exc})") from None


def _run_dask(todo: list[Case], out: str, opts: BatchOptions, client: Any) -> Iterator[dict[str, Any]]:
    """The same :func:`run_case` on a Dask distributed cluster (``client``: :func:`_dask_client`; input, output
    and model paths must be visible to every worker; each worker process loads the model once). Closes the
    client when done."""
    from distributed import as_completed

    tag = uuid.uuid4().hex[:8]
    futures: dict[Any, Case] = {}
    try:
        futures = {client.submit(run_case, case, out, opts, key=f"ctpassport-{tag}-{case.case_id}",
                                 pure=False, retries=0): case for case in todo}
        for fut in as_completed(futures, loop=client.loop):
            case = futures[fut]
            try:
                yield fut.result()
            except Exception as exc:  # noqa: BLE001 - KilledWorker, lost connection...
                yield _failed(case, f"Dask: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    finally:
        # stopped early (Ctrl-C): cases not started never start; a case already running on a worker cannot be
        # stopped from here and finishes into its folder (batch.json lists it as pending: --resume adopts it)
        pending = [f for f in futures if not f.done()]
        if pending:
            client.cancel(pending, force=True)
        client.close()


def _raise_on_sigterm() -> Any:
    """In the main thread, make SIGTERM (``kill``, a job scheduler's stop) end the batch like Ctrl-C: workers
    stopped, ``batch.json`` marked interrupted. Returns the previous handler (None when not installed)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def _stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, _stop)


def run_batch(in_dir: str | Path, out_dir: str | Path, opts: BatchOptions | None = None, *, workers: int = 1,
              scheduler: str | None = None, resume: bool = False, force: bool = False,
              on_record: Callable[[dict[str, Any]], None] | None = None,
              on_plan: Callable[[int, int], None] | None = None, connect_timeout: float = 30.0) -> BatchSummary:
    """Segment every CT under ``in_dir`` into ``out_dir/<case_id>/`` and return the summary.

    ``workers > 1``: a local process pool; ``scheduler``: a Dask scheduler address (``tcp://host:8786``).
    ``resume``: keep finished cases (complete folder, same input path and unchanged files) and redo the
    rest; without it an existing batch output is refused unless ``force`` (then every case is redone, and
    case folders of inputs no longer there are removed).
    ``on_plan(total, already_done)`` is called once before work starts, ``on_record(record)`` after every
    case. Failing cases are recorded and the others go on; ``batch.json``/``batch.csv`` are rewritten
    after every case. ``connect_timeout``: seconds to wait for the Dask scheduler. An interrupted batch
    (Ctrl-C, SIGTERM) stops its local workers and removes their half-written folders; on Dask, cases not
    started are cancelled, and a case already running on a worker finishes into its folder (listed as
    pending in ``batch.json``; ``--resume`` adopts it). While a batch runs, its output folder is locked: a second
    batch into the same folder is refused (:class:`OutputError`) and the first goes on undisturbed.
    """
    opts = opts or BatchOptions()
    src = Path(in_dir).resolve()
    out = Path(out_dir).resolve()
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {workers}")
    from ..config import Config

    Config.from_env()  # a malformed CTPASSPORT_* setting stops the batch here, not in every case
    if scheduler is not None and workers != 1:
        raise ConfigError("use either --workers (local pool) or --scheduler (Dask), not both")
    cases = discover_cases(src, exclude=out)
    if not cases:
        raise InputError("no CT found (NIfTI .nii/.nii.gz files, DICOM folders or zips of them)", src)
    from ..errors import ModelError
    from ..model.folder import load_model_folder, locate_model

    model_id = None
    try:  # fail fast on a missing or broken model; the id also tells --resume which cases another model made
        model_id = load_model_folder(locate_model(opts.model)).model_id
    except ModelError:
        if scheduler is None:
            raise
        # Dask workers may see paths this process does not: they load it; --resume then cannot tell models apart
    if out.exists() and not out.is_dir():
        raise OutputError("is a file, but the batch output is a folder", out, "name a folder")
    existing = out.is_dir() and ((out / BATCH_JSON).exists() or any(_is_case_dir(p) for p in out.iterdir()))
    if existing and not (resume or force):
        raise OutputExistsError(out)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        return _run_locked(cases, src, out, opts, workers=workers, scheduler=scheduler, resume=resume,
                           force=force, model_id=model_id, on_record=on_record, on_plan=on_plan,
                           connect_timeout=connect_timeout)


def _run_locked(cases: list[Case], src: Path, out: Path, opts: BatchOptions, *, workers: int,
                scheduler: str | None, resume: bool, force: bool, model_id: str | None,
                on_record: Callable[[dict[str, Any]], None] | None, on_plan: Callable[[int, int], None] | None,
                connect_timeout: float) -> BatchSummary:
    """:func:`run_batch` once its inputs are checked and the output folder ``out`` is locked."""
    # the scheduler is reached before anything in OUT_DIR changes: an unreachable one leaves it as it was
    client = _dask_client(scheduler, connect_timeout) if scheduler is not None else None
    try:
        return _run_with(client, cases, src, out, opts, workers=workers, scheduler=scheduler, resume=resume,
                         force=force, model_id=model_id, on_record=on_record, on_plan=on_plan)
    finally:
        if client is not None:
            client.close()  # (again, when _run_dask closed it: harmless)


def _run_with(client: Any, cases: list[Case], src: Path, out: Path, opts: BatchOptions, *, workers: int,
              scheduler: str | None, resume: bool, force: bool, model_id: str | None,
              on_record: Callable[[dict[str, Any]], None] | None,
              on_plan: Callable[[int, int], None] | None) -> BatchSummary:
    clean_partial(out)
    if force and not resume:  # the output is redone as a whole: no case folder of an input that is gone stays
        planned = {c.case_id for c in cases}
        for p in out.iterdir():
            if _is_case_dir(p) and p.name not in planned:
                shutil.rmtree(p)
    if scheduler is not None:
        executor = f"dask({scheduler})"
    elif workers > 1:
        executor = f"local-pool({workers})"
        if opts.threads is None:
            opts = replace(opts, threads=default_threads(workers))
    else:
        executor = "in-process"
    summary = BatchSummary(in_dir=str(src), out_dir=str(out), executor=executor, options=opts.as_dict(),
                           cases=cases)
    todo: list[Case] = []
    for case in cases:
        rec = finished_record(case, out, opts, model_id) if resume else None
        if rec is not None:
            # (the folder where it is now: OUT_DIR may have been moved since the case was made)
            summary.records[case.case_id] = {**rec, "resumed": True, "output": str(out / case.case_id)}
        else:
            todo.append(case)
    if on_plan is not None:
        on_plan(len(cases), len(cases) - len(todo))
    summary.write()
    if scheduler is not None:
        stream: Iterable[dict[str, Any]] = _run_dask(todo, str(out), opts, client)
    elif workers > 1:
        stream = _run_pool(todo, str(out), opts, workers)
    else:
        stream = _run_inline(todo, str(out), opts)
    old_term = _raise_on_sigterm()
    try:
        for rec in stream:
            summary.records[rec["case_id"]] = {**rec, "resumed": False}
            summary.write()
            if on_record is not None:
                on_record(rec)
    except BaseException:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        if scheduler is None:  # local workers are stopped: what they were writing is partial (Dask: see above)
            clean_partial(out)
        summary.status = "interrupted"
        summary.finished = _now()
        summary.write()
        raise
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    clean_partial(out)  # e.g. a Dask worker killed mid-case (the case itself was rerun elsewhere)
    summary.status = "complete"
    summary.finished = _now()
    summary.write()
    return summary
