"""Peak memory of one benchmark run, per run, in a process that runs many.

``ru_maxrss`` only grows over a process's life, so it cannot give the peak of the *n*-th case. Instead:

* the worker's own peak: Linux resets the "high water mark" ``VmHWM`` to the current RSS when ``5`` is
  written to ``/proc/self/clear_refs`` (since Linux 4.0); :class:`PeakMemory` does that at the start of a
  run and reads ``VmHWM`` at its end (exact, no sampling);
* child processes (TotalSegmentator spawns pools for preprocessing and export): a sampling thread adds
  the children's proportional set size (PSS: shared pages divided among the processes sharing them, so
  the libraries a spawned child maps again are not counted twice) every ``interval`` seconds.

The reported peak is ``max(worker VmHWM, max over samples of worker RSS + children PSS)``; where
``clear_refs`` is unavailable the worker's RSS is sampled too (``method`` says which was used).
All figures are MiB.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Self

_MIB = 1024 * 1024


def _status_kib(field: str, pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def reset_peak() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _pss_kib(pid: int) -> int:
    """PSS of a process (``smaps_rollup``; RSS where that is unreadable), KiB; 0 if it has gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return _status_kib("VmRSS", pid) or 0


def _children(pid: int) -> list[int]:
    """All descendants of ``pid`` (via ``/proc/<pid>/task/*/children``)."""
    out: list[int] = []
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children", encoding="ascii") as fh:
                    kids = [int(x) for x in fh.read().split()]
            except (OSError, ValueError):
                continue
            out.extend(kids)
            stack.extend(kids)
    return out


class PeakMemory:
    """Context manager measuring the peak memory of the code it wraps (see the module docstring)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_mib = 0.0
        self.self_peak_mib = 0.0
        self.children_peak_mib = 0.0
        self.method = ""
        self._stop = threading.Event()
        self._sampled = 0
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            rss = _status_kib("VmRSS") or 0
            kids = sum(_pss_kib(c) for c in _children(me))
            self._sampled = max(self._sampled, rss + kids)
            self.children_peak_mib = max(self.children_peak_mib, kids / 1024)
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._hwm = reset_peak()
        self.method = ("VmHWM reset via /proc/self/clear_refs + sampled children PSS" if self._hwm
                       else "sampled RSS + children PSS")
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        hwm = (_status_kib("VmHWM") or 0) if self._hwm else 0
        self.self_peak_mib = (hwm or _status_kib("VmRSS") or 0) / 1024
        self.peak_mib = max(hwm, self._sampled) / 1024


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children so far."""
    import resource

    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def now() -> float:
    return time.perf_counter()
