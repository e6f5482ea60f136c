"""Run benchmark work in child processes and measure it there: wall time, CPU and peak RSS.

Why a child process per measured task: a copy task runs as its own process in Airflow, and a process's
peak RSS is a kernel-kept high-water mark (``ru_maxrss``) that only ever grows. Each child reports its
own ``RUSAGE_SELF`` peak (plus ``RUSAGE_CHILDREN`` for the external tools it ran, mongodump and
mongorestore). The parent's ``RUSAGE_CHILDREN`` would not do: it is the maximum over every child waited
for so far, so once one phase has peaked, later and smaller phases cannot be told apart.

Why ``forkserver``: every child is forked from a small, clean server process that has already imported
the work modules. Like ``spawn``, a child inherits none of the parent's memory, threads or sockets (so
its RSS is its own and pymongo's fork warnings do not apply), but it starts in milliseconds, not the
half second an interpreter plus pymongo take to import.

Work functions take a ``Meter`` first and wrap the stretch to measure in ``meter.section(label)``;
setup (building batches, connecting) stays outside, so it is in the peak RSS but not in the timings. A
section also records the CPU time of the child and, through psutil (a dependency of Airflow, so present
wherever the package runs; optional here), of the server processes: which side uses a whole core tells
what bounds a phase.
"""

from __future__ import annotations

import cProfile
import multiprocessing
import multiprocessing.connection
import resource
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # optional: only the server CPU columns need it
    import psutil
except ImportError:  # pragma: no cover - psutil ships with Airflow
    psutil = None

# Modules the fork server imports once, so children start with them loaded.
PRELOAD = ["bench.workers"]
_CHILD_TIMEOUT_S = 6 * 3600.0
_RELEASE_TIMEOUT_S = 600.0


class BenchError(RuntimeError):
    """A benchmark step failed (a child raised or died); the message carries the child's traceback."""


def _mb(kib_or_bytes: int) -> float:
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    return kib_or_bytes / (1024 * 1024) if sys.platform == "darwin" else kib_or_bytes / 1024


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """The high-water mark of resident memory of this process (or of its largest waited-for child)."""
    return _mb(resource.getrusage(who).ru_maxrss)


def _own_cpu_seconds() -> float:
    # Every thread of this process, plus the external tools it ran and waited for (mongodump/mongorestore).
    own, tools = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + tools.ru_utime + tools.ru_stime


class CpuProbe:
    """CPU seconds used so far by named processes (the servers), or nothing without psutil."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self._processes: dict[str, Any] = {}
        if psutil is None:
            return
        for name, pid in pids.items():
            try:
                self._processes[name] = psutil.Process(pid)
            except psutil.Error:
                continue

    @property
    def available(self) -> bool:
        return bool(self._processes)

    def snapshot(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, process in self._processes.items():
            try:
                times = process.cpu_times()
                out[name] = times.user + times.system
            except psutil.Error:
                continue
        return out

    @staticmethod
    def delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
        return {name: after[name] - before[name] for name in before if name in after}


class LoadMonitor:
    """Samples, in a background thread, the CPU used by processes outside this process tree.

    Other work on the machine (another test suite, a build) competes with the servers for the same cores,
    so every result carries how much CPU such processes took while it ran. Processes that start and end
    between two samples are missed; the machine-wide busy figure still includes them.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[int, tuple[str, float, float]] = {}  # pid -> (name, CPU when first seen, CPU last seen)
        self._started_wall = self._started_epoch = 0.0
        self._started_cpu: Any = None

    def _ours(self) -> set[int]:
        me = psutil.Process()
        return {me.pid, *(child.pid for child in me.children(recursive=True))}

    def _sample(self, first: bool) -> None:
        ours = self._ours()
        for process in psutil.process_iter(["name", "create_time"]):
            if process.pid in ours:
                continue
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            used = times.user + times.system
            if process.pid in self._seen:
                name, base, _ = self._seen[process.pid]
                self._seen[process.pid] = (name, base, used)
            else:
                # A process born after the start counts from zero; one already running, from now.
                born_after = not first and (process.info["create_time"] or 0) >= self._started_epoch
                self._seen[process.pid] = (process.info["name"] or "?", 0.0 if born_after else used, used)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample(first=False)

    def start(self) -> LoadMonitor:
        if psutil is None:
            return self
        self._started_wall, self._started_epoch = time.perf_counter(), time.time()
        self._started_cpu = psutil.cpu_times()
        self._sample(first=True)
        self._thread = threading.Thread(target=self._loop, name="bench-load-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        """Stop sampling; return the machine's busy share and the other processes' CPU use."""
        if psutil is None or self._thread is None:
            return {"available": False}
        self._stop.set()
        self._thread.join()
        self._sample(first=False)
        wall = time.perf_counter() - self._started_wall
        now = psutil.cpu_times()
        busy = sum(getattr(now, f) - getattr(self._started_cpu, f) for f in now._fields if f not in ("idle", "iowait"))
        total = sum(getattr(now, f) - getattr(self._started_cpu, f) for f in now._fields)
        others = sorted(((used - base, name, pid) for pid, (name, base, used) in self._seen.items()), reverse=True)
        other_cpu = sum(cpu for cpu, _, _ in others)
        return {
            "available": True,
            "seconds": round(wall, 1),
            "machine_busy_percent": round(100 * busy / total, 1) if total > 0 else None,
            "other_processes_cpu_seconds": round(other_cpu, 1),
            "other_processes_cores": round(other_cpu / wall, 2) if wall > 0 else None,
            "top_other_processes": [f"{name}[{pid}] {cpu:.0f} CPU-s" for cpu, name, pid in others[:5] if cpu >= 1],
        }


@dataclass
class Section:
    """One measured stretch of work inside a child."""

    label: str
    seconds: float = 0.0
    documents: int = 0
    bytes: int = 0
    cpu_self: float = 0.0  # CPU seconds of the child process, all threads
    cpu_servers: dict[str, float] = field(default_factory=dict)  # CPU seconds per server process
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label, "seconds": round(self.seconds, 4), "documents": self.documents,
            "bytes": self.bytes, "cpu_self": round(self.cpu_self, 3),
            "cpu_servers": {k: round(v, 3) for k, v in self.cpu_servers.items()}, "extra": self.extra,
        }


class Meter:
    """Handed to a work function: ``with meter.section(label) as s: ...; s.documents = n``."""

    def __init__(self, server_pids: Mapping[str, int]) -> None:
        self._probe = CpuProbe(server_pids)
        self.sections: list[Section] = []

    @contextmanager
    def section(self, label: str) -> Iterator[Section]:
        section = Section(label=label)
        servers_before, cpu_before = self._probe.snapshot(), _own_cpu_seconds()
        started = time.perf_counter()
        yield section
        section.seconds = time.perf_counter() - started
        section.cpu_self = _own_cpu_seconds() - cpu_before
        section.cpu_servers = CpuProbe.delta(servers_before, self._probe.snapshot())
        self.sections.append(section)


@dataclass
class ChildOutcome:
    """What one child measured: its sections, the work function's return value and its memory."""

    sections: list[Section]
    value: Any
    baseline_rss_mb: float  # peak RSS before the work function ran (interpreter and imports)
    peak_rss_mb: float  # peak RSS of the child over its whole life
    tool_peak_rss_mb: float  # peak RSS of the largest external tool the child ran (0 without one)
    profile_path: str | None = None


@dataclass
class GroupOutcome:
    """Children run together: each one's outcome, plus the wall time and server CPU of the whole group."""

    children: list[ChildOutcome]
    wall_seconds: float
    cpu_servers: dict[str, float]


def _child_main(
    conn: multiprocessing.connection.Connection,
    func: Callable[..., Any],
    kwargs: dict[str, Any],
    server_pids: dict[str, int],
    start: Any,
    profile_path: str | None,
) -> None:
    try:
        meter = Meter(server_pids)
        if start is not None:
            conn.send(("ready", None))
            # Bounded: should the parent die before releasing the group, the child must not wait forever.
            if not start.wait(_RELEASE_TIMEOUT_S):
                raise BenchError(f"not released within {_RELEASE_TIMEOUT_S:.0f}s of reporting ready")
        baseline = peak_rss_mb()
        if profile_path:
            profiler = cProfile.Profile()
            value = profiler.runcall(func, meter, **kwargs)
            profiler.dump_stats(profile_path)
        else:
            value = func(meter, **kwargs)
        outcome = ChildOutcome(
            sections=meter.sections, value=value, baseline_rss_mb=baseline, peak_rss_mb=peak_rss_mb(),
            tool_peak_rss_mb=peak_rss_mb(resource.RUSAGE_CHILDREN), profile_path=profile_path,
        )
        conn.send(("ok", outcome))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises BenchError
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def run_children(
    func: Callable[..., Any],
    kwargs_list: list[dict[str, Any]],
    *,
    server_pids: Mapping[str, int],
    profile_dir: Path | None = None,
    name: str = "child",
) -> GroupOutcome:
    """Run ``func(meter, **kwargs)`` in one child per ``kwargs_list`` entry, all released at the same moment.

    The children start, import and report ready; only then are they released together and the group's
    wall clock and the servers' CPU start counting, so process start-up is never part of a figure.
    """
    context = _context()
    start = context.Event()
    children: list[tuple[Any, multiprocessing.connection.Connection]] = []
    for index, kwargs in enumerate(kwargs_list):
        receiver, sender = context.Pipe(duplex=False)
        profile_path = str(profile_dir / f"{name}-{index}.prof") if profile_dir else None
        process = context.Process(
            target=_child_main, args=(sender, func, kwargs, dict(server_pids), start, profile_path),
            name=f"bench-{name}-{index}", daemon=True,
        )
        process.start()
        sender.close()  # the child holds the only writing end: EOF on it means the child is gone
        children.append((process, receiver))
    try:
        for process, receiver in children:
            _expect(receiver, process, "ready")
        probe = CpuProbe(server_pids)
        servers_before = probe.snapshot()
        started = time.perf_counter()
        start.set()
        outcomes = [_expect(receiver, process, "ok") for process, receiver in children]
        wall = time.perf_counter() - started
        cpu_servers = CpuProbe.delta(servers_before, probe.snapshot())
        for process, _ in children:
            process.join(timeout=30)
    finally:
        for process, receiver in children:
            receiver.close()
            if process.is_alive():  # only on failure: a sibling raised and this one is still working
                process.terminate()
                process.join(timeout=10)
    return GroupOutcome(children=outcomes, wall_seconds=wall, cpu_servers=cpu_servers)


def run_child(
    func: Callable[..., Any],
    *,
    server_pids: Mapping[str, int],
    profile_dir: Path | None = None,
    name: str = "child",
    **kwargs: Any,
) -> ChildOutcome:
    """Run ``func(meter, **kwargs)`` in one child process and return what it measured."""
    return run_children(func, [kwargs], server_pids=server_pids, profile_dir=profile_dir, name=name).children[0]


def _expect(receiver: multiprocessing.connection.Connection, process: Any, kind: str) -> Any:
    if not receiver.poll(_CHILD_TIMEOUT_S):
        raise BenchError(f"{process.name} sent nothing for {_CHILD_TIMEOUT_S:.0f}s")
    try:
        got, payload = receiver.recv()
    except EOFError:
        process.join(timeout=10)
        raise BenchError(f"{process.name} died (exit code {process.exitcode}) before reporting") from None
    if got == "error":
        raise BenchError(f"{process.name} failed:\n{payload}")
    if got != kind:
        raise BenchError(f"{process.name} sent {got!r} where {kind!r} was expected")
    return payload


__all__ = [
    "BenchError",
    "ChildOutcome",
    "CpuProbe",
    "GroupOutcome",
    "LoadMonitor",
    "Meter",
    "Section",
    "peak_rss_mb",
    "run_child",
    "run_children",
]
