"""Figures, targets, the printed table and the JSON results file.

A ``Figure`` is one row: a measured throughput (documents, bytes, seconds), the peak RSS of the process
that did the work, how busy the client and each server were (percent of one core over the measured time)
and, for engine figures, the ratio to the ceiling it is judged against. A ``Target`` is one of the issue's
goals, evaluated from the figures as PASS or MISS.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MB = 1_000_000  # throughput in decimal megabytes per second, as tools and vendors quote it

INSERT_CEILING = "ceiling.insert"
READ_CEILING = "ceiling.read"


@dataclass
class Figure:
    """One measured figure (a table row)."""

    key: str  # stable identifier, e.g. "dump.native" or "validation.full.4x"
    group: str  # ceiling, dump, restore, copy, tools, validation, scaling, live, memory
    label: str
    documents: int = 0
    bytes: int = 0
    seconds: float = 0.0
    peak_rss_mb: float | None = None
    baseline_rss_mb: float | None = None
    cpu_percent: dict[str, float] = field(default_factory=dict)  # client/source/target, % of one core
    ratio_to: str | None = None  # key of the ceiling figure this one is compared with
    ratio: float | None = None
    status: str = "ok"  # "ok" or "skipped"
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def docs_per_s(self) -> float:
        return self.documents / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 3)
        out["docs_per_s"] = round(self.docs_per_s, 1)
        out["mb_per_s"] = round(self.mb_per_s, 3)
        out["ratio"] = None if self.ratio is None else round(self.ratio, 3)
        for name in ("peak_rss_mb", "baseline_rss_mb"):
            out[name] = None if out[name] is None else round(out[name], 1)
        out["cpu_percent"] = {k: round(v) for k, v in self.cpu_percent.items()}
        return out


@dataclass
class Target:
    """One of the issue's goals: ``value`` (a ratio or megabytes) against ``threshold``."""

    key: str
    label: str
    threshold: float
    higher_is_better: bool
    unit: str = "ratio"  # how the value prints: "ratio", "MB" or "s"
    value: float | None = None
    source: str = ""  # which figure(s) the value comes from
    status: str = "n/a"  # PASS, MISS, or n/a when its figures were not measured

    def evaluate(self, value: float | None, source: str) -> None:
        self.value, self.source = value, source
        if value is None:
            self.status = "n/a"
        elif self.higher_is_better:
            self.status = "PASS" if value >= self.threshold else "MISS"
        else:
            self.status = "PASS" if value < self.threshold else "MISS"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["value"] = None if self.value is None else round(self.value, 3)
        return out


def fill_ratios(figures: list[Figure]) -> None:
    """Each figure's throughput as a fraction of its ceiling's (documents per second)."""
    ceilings = {f.key: f for f in figures if f.group == "ceiling" and f.status == "ok"}
    for figure in figures:
        ceiling = ceilings.get(figure.ratio_to or "")
        if ceiling is not None and ceiling.docs_per_s > 0 and figure.status == "ok":
            figure.ratio = figure.docs_per_s / ceiling.docs_per_s


# Groups whose figures are copy tasks (a dump or restore as the DAG runs it): the memory target's scope.
COPY_TASK_GROUPS = ("dump", "restore", "copy", "scaling", "memory")
MEMORY_LIMIT_MB = 300.0


def _ratio_of(key: str) -> Callable[[list[Figure]], tuple[float | None, str]]:
    def pick(figures: list[Figure]) -> tuple[float | None, str]:
        found = next((f for f in figures if f.key == key and f.ratio is not None), None)
        return (found.ratio, key) if found else (None, key)
    return pick


def _worst_full_validation(figures: list[Figure]) -> tuple[float | None, str]:
    full = [f for f in figures if f.key.startswith("validation.full.") and f.ratio is not None]
    if not full:
        return None, "validation.full.*"
    worst = min(full, key=lambda f: f.ratio or 0.0)
    return worst.ratio, f"{worst.key} (worst of {len(full)} sizes)"


def _largest_copy_task_rss(figures: list[Figure]) -> tuple[float | None, str]:
    tasks = [f for f in figures if f.group in COPY_TASK_GROUPS and f.peak_rss_mb is not None]
    if not tasks:
        return None, "copy tasks"
    largest = max(tasks, key=lambda f: f.peak_rss_mb or 0.0)
    return largest.peak_rss_mb, f"{largest.key} (largest of {len(tasks)} copy-task figures)"


STEADY_TARGET_RATE = 1_000.0  # ops/s: the writer rate the steady-state lag target is set at


def _steady_lag_p95(figures: list[Figure]) -> tuple[float | None, str]:
    """The steady state's p95 lag, when its writer achieved the target's rate (``--live-write-rate 1000``);
    at a lower rate the target is not measured (n/a) and the source says at what rate the row ran."""
    steady = next((f for f in figures if f.key == "live.steady" and f.status == "ok"), None)
    if steady is None:
        return None, "live.steady"
    achieved = float(steady.details.get("writer_ops_per_s") or 0.0)
    if achieved < STEADY_TARGET_RATE * 0.95:  # a paced writer falls a little short of its schedule
        return None, (f"live.steady: writer at {achieved:.0f} ops/s, the target is set at "
                      f"{STEADY_TARGET_RATE:,.0f} (--live-write-rate {STEADY_TARGET_RATE:.0f})")
    return float(steady.details["lag_p95_s"]), f"live.steady (writer at {achieved:.0f} ops/s)"


# The targets: (target, how its value is found). A new phase adds its own here.
TARGETS: list[tuple[Target, Callable[[list[Figure]], tuple[float | None, str]]]] = [
    (Target("target.copy", "end-to-end copy >= 0.85 x insert ceiling", 0.85, True), _ratio_of("copy.native")),
    (Target("target.dump", "dump >= 0.9 x source read ceiling", 0.9, True), _ratio_of("dump.native")),
    (Target("target.validation", "full validation >= 0.8 x raw read ceiling", 0.8, True), _worst_full_validation),
    (Target("target.verify", "verifier compare >= 0.5 x source read ceiling", 0.5, True),
     _ratio_of("live.verify_compare")),
    (Target("target.memory", f"peak RSS of any copy task < {MEMORY_LIMIT_MB:.0f} MB", MEMORY_LIMIT_MB, False,
            "MB"), _largest_copy_task_rss),
    (Target("target.live_copy", "live initial copy >= 0.7 x insert ceiling", 0.7, True),
     _ratio_of("live.initial_copy")),
    (Target("target.catch_up", "live catch-up of a backlog >= 0.5 x insert ceiling", 0.5, True),
     _ratio_of("live.catch_up")),
    (Target("target.steady_lag", "live steady-state lag p95 < 5 s, mixed writer at 1,000 ops/s", 5.0, False, "s"),
     _steady_lag_p95),
]


def evaluate_targets(figures: list[Figure]) -> list[Target]:
    targets = []
    for template, pick in TARGETS:
        target = Target(template.key, template.label, template.threshold, template.higher_is_better, template.unit)
        target.evaluate(*pick(figures))
        targets.append(target)
    return targets


# ------------------------------------------------------------------------------------------- rendering
_COLUMNS = (
    ("figure", 46, "<"), ("docs", 10, ">"), ("time s", 8, ">"), ("docs/s", 9, ">"), ("MB/s", 7, ">"),
    ("ratio", 6, ">"), ("RSS MB", 7, ">"), ("CPU% cl/src/tgt", 15, ">"), ("note", 0, "<"),
)


def _row(cells: Iterable[str]) -> str:
    parts = []
    for (_, width, align), cell in zip(_COLUMNS, cells, strict=True):
        parts.append(cell if not width else f"{cell:{align}{width}}")
    return "  ".join(parts).rstrip()


def _cpu_cell(cpu: dict[str, float]) -> str:
    if not cpu:
        return "—"
    return "/".join("—" if name not in cpu else f"{cpu[name]:.0f}" for name in ("client", "source", "target"))


def _figure_cells(f: Figure) -> list[str]:
    if f.status != "ok":
        return [f.label, "", "", "", "", "", "", "", f.note]
    return [
        f.label,
        f"{f.documents:,}",
        f"{f.seconds:.2f}",
        f"{f.docs_per_s:,.0f}",
        f"{f.mb_per_s:.1f}",
        "" if f.ratio is None else f"{f.ratio:.2f}",
        "" if f.peak_rss_mb is None else f"{f.peak_rss_mb:.0f}",
        _cpu_cell(f.cpu_percent),
        f.note,
    ]


def render_table(figures: list[Figure], targets: list[Target], header: list[str]) -> str:
    lines = list(header)
    lines.append(_row(name for name, _, _ in _COLUMNS))
    lines.append(_row("-" * max(width, len(name)) for name, width, _ in _COLUMNS))
    group = None
    for figure in figures:
        if group is not None and figure.group != group:
            lines.append("")
        group = figure.group
        lines.append(_row(_figure_cells(figure)))
    lines.append("")
    for target in targets:
        value = "—" if target.value is None else {"MB": f"{target.value:.0f} MB", "s": f"{target.value:.1f} s"}.get(
            target.unit, f"{target.value:.2f}")
        lines.append(f"{'target: ' + target.label:<56} {value:>9}  {target.status:<4}  from {target.source}")
    return "\n".join(lines)


def write_json(path: Path, meta: dict[str, Any], dataset: dict[str, Any], figures: list[Figure],
               targets: list[Target]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "meta": meta,
        "dataset": dataset,
        "figures": [f.to_dict() for f in figures],
        "targets": [t.to_dict() for t in targets],
    }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path


__all__ = [
    "INSERT_CEILING",
    "READ_CEILING",
    "TARGETS",
    "Figure",
    "Target",
    "evaluate_targets",
    "fill_ratios",
    "render_table",
    "write_json",
]
