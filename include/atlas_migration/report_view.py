"""The migration report as web pages: pure functions from what a run left in the metadata DB to HTML.

The validation report is written to a folder on the worker's disk (``validation.write_report``), which an
api-server on another machine cannot read. So the validate task also pushes the report as an XCom
(``REPORT_XCOM_KEY``), bounded by ``bound_report`` so one run can never put megabytes into the metadata
DB, and the Airflow plugin (``plugins/migration_report.py``) reads it back with the run's other XComs and
task instances, then calls the functions here:

- ``bound_report``: the copy of a report that goes to XCom, shortened (and saying so) when too large;
- ``build_run_page`` / ``render_run_page``: one run (verdict, routing decision and reasons, namespaces with
  counts, digests and mismatching ``_id`` values, phase times, throughput, lag);
- ``build_migrations_page`` / ``render_migrations_page``: recent runs and the rehearsal trend;
- ``svg_bar_chart`` / ``svg_line_chart``: inline SVG, so the pages need no JavaScript and no build step.

Nothing here imports Airflow or a driver. Every value that reaches the HTML is escaped, and free text that
came from a run (reasons, notes, differences) also passes through ``redact``: reports never hold
credentials, and a page is one more place to make sure of it.
"""

from __future__ import annotations

import datetime as dt
import html
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from atlas_migration.redaction import redact

# The XCom key under which the validate task publishes its report (beside its small return value).
REPORT_XCOM_KEY = "validation_report"
# The largest report kept in XCom, as JSON. A thousand matching namespaces with a few indexes each take
# about 1 MB with their snapshots; the metadata DB is not the place for that, the file on disk is.
XCOM_REPORT_MAX_BYTES = 256 * 1024
# Rejected rows (file import) listed in the XCom copy; the rest are counted in ``rejections_not_listed``.
XCOM_MAX_REJECTIONS = 100
# Where the plugin serves its pages; the external views, the extra link and the tests use the same prefix.
URL_PREFIX = "/migration-report"


def run_page_path(dag_id: str, run_id: str) -> str:
    """The path of one run's report page (run ids hold ``:`` and ``+``: quoted)."""
    from urllib.parse import quote

    return f"{URL_PREFIX}/runs/{quote(dag_id, safe='')}/{quote(run_id, safe='')}"


# --------------------------------------------------------------------------------------------------------
# The XCom copy of a report
# --------------------------------------------------------------------------------------------------------


def _size(data: Any) -> int:
    return len(json.dumps(data, separators=(",", ":")).encode())


def bound_report(report: Mapping[str, Any], max_bytes: int = XCOM_REPORT_MAX_BYTES, *,
                 full_report: str | None = None) -> dict[str, Any]:
    """A copy of ``report`` whose JSON fits in ``max_bytes``, shortened in steps only as far as needed.

    1. matching namespaces drop their snapshots' index and option lists (equal on both sides: nothing to
       read there), then every namespace does (the differences already name what differs);
    2. rejected rows beyond ``XCOM_MAX_REJECTIONS`` are counted, not listed;
    3. whole namespaces are left out, matching ones first, mismatching ones last.

    Totals and the verdict are never changed. A shortened copy says what was left out in ``xcom_bounds``
    and in a note, naming ``full_report`` (where the whole file is) when given. Per-namespace lists are
    already capped where they are made (``validation.DEFAULT_DIFFERENCE_LIMIT`` differing documents, the
    file engine's ``MAX_REJECTIONS_KEPT`` rejected rows per range).
    """
    data: dict[str, Any] = json.loads(json.dumps(report))
    if _size(data) <= max_bytes:
        return data
    bounds: dict[str, Any] = {"max_bytes": max_bytes}
    namespaces: list[dict[str, Any]] = [ns for ns in data.get("namespaces") or [] if isinstance(ns, dict)]

    def strip_snapshots(rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            for side in ("source", "target"):
                snapshot = row.get(side)
                if isinstance(snapshot, dict):
                    snapshot.pop("indexes", None)
                    snapshot.pop("options", None)
        bounds["snapshot_details_dropped"] = True

    strip_snapshots(ns for ns in namespaces if ns.get("status") == "match")
    if _size(data) > max_bytes:
        strip_snapshots(namespaces)
    rejections = data.get("rejections")
    if _size(data) > max_bytes and isinstance(rejections, list) and len(rejections) > XCOM_MAX_REJECTIONS:
        omitted = len(rejections) - XCOM_MAX_REJECTIONS
        data["rejections"] = rejections[:XCOM_MAX_REJECTIONS]
        data["rejections_not_listed"] = int(data.get("rejections_not_listed") or 0) + omitted
        bounds["rejections_omitted"] = omitted
    if _size(data) > max_bytes and namespaces:
        # Keep mismatches first (they are what a reader looks for), then matches, in report order.
        ranked = sorted(range(len(namespaces)), key=lambda i: (_is_match(namespaces[i]), i))
        data["namespaces"] = []
        budget = max_bytes - _size(data) - 400  # room for xcom_bounds and the note
        kept: set[int] = set()
        for index in ranked:
            cost = _size(namespaces[index]) + 1
            if cost <= budget:
                kept.add(index)
                budget -= cost
        data["namespaces"] = [namespaces[i] for i in sorted(kept)]
        omitted_rows = [namespaces[i] for i in range(len(namespaces)) if i not in kept]
        bounds["namespaces_omitted"] = len(omitted_rows)
        bounds["mismatching_namespaces_omitted"] = sum(1 for row in omitted_rows if not _is_match(row))
    if full_report:
        bounds["full_report"] = full_report
    data["xcom_bounds"] = bounds
    where = f"; the whole report is in {full_report}" if full_report else ""
    data["notes"] = [*(data.get("notes") or []), f"This copy of the report was shortened to fit in "
                     f"{max_bytes // 1024} KiB of XCom ({_describe_bounds(bounds)}){where}"]
    return data


def _is_match(row: Mapping[str, Any]) -> bool:
    status = row.get("status")
    if status is not None:
        return status == "match"
    return not row.get("problems")  # file import checks: no problems is a match


def _describe_bounds(bounds: Mapping[str, Any]) -> str:
    parts = []
    if bounds.get("snapshot_details_dropped"):
        parts.append("index and option lists of the snapshots left out")
    if bounds.get("rejections_omitted"):
        parts.append(f"{bounds['rejections_omitted']:,} rejected rows counted, not listed")
    if bounds.get("namespaces_omitted"):
        parts.append(f"{bounds['namespaces_omitted']:,} namespaces left out, "
                     f"{bounds.get('mismatching_namespaces_omitted', 0):,} of them mismatching")
    return "; ".join(parts) or "nothing left out"


# --------------------------------------------------------------------------------------------------------
# Page models
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NamespaceRow:
    """One namespace of the report as the page shows it."""

    namespace: str
    target_namespace: str
    kind: str
    status: str
    source_count: int | None
    target_count: int | None
    source_digest: str | None
    target_digest: str | None
    differences: list[str]
    # (kind, _id as relaxed Extended JSON) of the documents named as differing.
    documents: list[tuple[str, str]]

    @property
    def ok(self) -> bool:
        return self.status == "match"


def elapsed_seconds(started: dt.datetime | None, finished: dt.datetime | None) -> float | None:
    """Wall time between two instants, or None when either is unknown (never negative)."""
    if started is None or finished is None:
        return None
    return max(0.0, (finished - started).total_seconds())


@dataclass(frozen=True)
class Phase:
    """A top-level task or task group of the run, with its wall time."""

    name: str
    state: str
    started: dt.datetime | None
    finished: dt.datetime | None
    tasks: int

    @property
    def seconds(self) -> float | None:
        return elapsed_seconds(self.started, self.finished)


@dataclass(frozen=True)
class Throughput:
    """What the copy moved and how fast (from the restore tasks' results)."""

    documents: int
    bytes: int
    seconds: float | None
    # (namespace, documents per second) per restored collection that reported its own timing.
    per_namespace: list[tuple[str, float]]

    @property
    def docs_per_second(self) -> float | None:
        return self.documents / self.seconds if self.seconds else None


@dataclass(frozen=True)
class RunPage:
    dag_id: str
    run_id: str
    run_state: str
    verdict: str | None
    strategy: str | None
    rule: str | None
    requested: str | None
    reasons: list[str]
    warnings: list[str]
    mode: str | None
    validated_at: str | None
    validation_seconds: float | None
    totals: dict[str, int]
    namespaces: list[NamespaceRow]
    notes: list[str]
    phases: list[Phase]
    throughput: Throughput | None
    lag_seconds: float | None
    # Why there is no report, when there is none (dry run, run still going, validation never reached).
    missing_reason: str | None = None
    bounds: dict[str, Any] = field(default_factory=dict)


def _as_datetime(value: Any) -> dt.datetime | None:
    if value is None or isinstance(value, dt.datetime):
        return value
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def phase_times(task_instances: Iterable[Mapping[str, Any]]) -> list[Phase]:
    """Task instances grouped by their top-level task or group (``mongorestore.copy.dump`` counts toward
    ``mongorestore``), each phase spanning its first start to its last end, in order of start."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for ti in task_instances:
        groups.setdefault(str(ti["task_id"]).split(".", 1)[0], []).append(ti)
    phases = []
    for name, members in groups.items():
        starts = [s for s in (_as_datetime(m.get("start_date")) for m in members) if s]
        ends = [e for e in (_as_datetime(m.get("end_date")) for m in members) if e]
        states = {str(m.get("state") or "none") for m in members}
        # The worst state names the phase: one failed mapped instance fails the phase.
        state = next((s for s in ("failed", "upstream_failed", "running", "up_for_retry", "queued", "scheduled",
                                  "deferred", "success", "skipped") if s in states), sorted(states)[0])
        finished = max(ends) if ends and state not in ("running", "queued", "scheduled", "deferred") else None
        phases.append(Phase(name=name, state=state, started=min(starts) if starts else None, finished=finished,
                            tasks=len(members)))
    far_future = dt.datetime.max.replace(tzinfo=dt.UTC)
    return sorted(phases, key=lambda p: (p.started or far_future, p.name))


def throughput(restored: Iterable[Mapping[str, Any]]) -> Throughput | None:
    """Documents, bytes and rate of the copy, from the restore tasks' results (None when there are none)."""
    rows = [r for r in restored if isinstance(r, Mapping)]
    if not rows:
        return None
    starts = [r.get("dump_started") or r.get("restore_started") for r in rows]
    ends = [r.get("restore_finished") for r in rows]
    starts = [s for s in starts if s is not None]
    ends = [e for e in ends if e is not None]
    seconds = round(max(ends) - min(starts), 3) if starts and ends else None
    per_namespace = []
    for r in rows:
        began, done = r.get("dump_started") or r.get("restore_started"), r.get("restore_finished")
        if began is not None and done is not None and done > began and r.get("documents"):
            per_namespace.append((str(r.get("namespace") or "?"), round(r["documents"] / (done - began), 1)))
    return Throughput(documents=sum(int(r.get("documents") or 0) for r in rows),
                      bytes=sum(int(r.get("bytes") or 0) for r in rows), seconds=seconds,
                      per_namespace=sorted(per_namespace))


def _namespace_row(row: Mapping[str, Any]) -> NamespaceRow:
    if "problems" in row and "status" not in row:  # a file import check (file_import.NamespaceCheck)
        problems = list(row.get("problems") or [])
        return NamespaceRow(
            namespace=str(row.get("namespace")), target_namespace=str(row.get("namespace")),
            kind=f"file import ({row.get('mode')})", status="mismatch" if problems else "match",
            source_count=row.get("expected_documents", row.get("documents")),
            target_count=row.get("target_documents"), source_digest=row.get("digest_expected"),
            target_digest=row.get("digest_target"),
            differences=[*problems, *([f"{row['rejected']:,} row(s) rejected"] if row.get("rejected") else [])],
            documents=[],
        )
    source, target = row.get("source") or {}, row.get("target") or {}
    return NamespaceRow(
        namespace=str(row.get("namespace")), target_namespace=str(row.get("target_namespace") or row.get("namespace")),
        kind=str(row.get("type") or source.get("type") or target.get("type") or "-"),
        status=str(row.get("status")), source_count=row.get("source_count"), target_count=row.get("target_count"),
        source_digest=source.get("digest"), target_digest=target.get("digest"),
        differences=[str(d) for d in row.get("differences") or []],
        documents=[(str(d.get("kind")), str(d.get("id"))) for d in row.get("document_differences") or []],
    )


def build_run_page(*, dag_id: str, run_id: str, run_state: str, report: Mapping[str, Any] | None,
                   decision: Mapping[str, Any] | None, task_instances: Iterable[Mapping[str, Any]] = (),
                   restored: Iterable[Mapping[str, Any]] = (), catch_up: Mapping[str, Any] | None = None) -> RunPage:
    """The run page's model from the run's validation report (XCom), routing decision (the ``route``
    task's result), task instances, restore results and live catch-up result; any of them may be absent."""
    decision = decision or {}
    missing = None
    if report is None:
        if decision.get("dry_run"):
            missing = "a dry run: nothing was migrated, so nothing was validated"
        elif run_state in ("running", "queued"):
            missing = "the run has not reached validation yet"
        elif not decision:
            missing = "this run left no migration decision: it is not a migration run, or it failed before routing"
        else:
            missing = "the run ended without a validation report (see the first failed task's log)"
    report = report or {}
    namespaces = [_namespace_row(row) for row in report.get("namespaces") or [] if isinstance(row, Mapping)]
    totals = dict(report.get("totals") or {})
    if report and not totals:  # file import reports carry no totals: derive them
        matched = sum(1 for n in namespaces if n.ok)
        totals = {"namespaces": len(namespaces), "matched": matched, "mismatched": len(namespaces) - matched,
                  "source_documents": sum(n.source_count or 0 for n in namespaces),
                  "target_documents": sum(n.target_count or 0 for n in namespaces)}
    lag = (catch_up or {}).get("lag_seconds")
    return RunPage(
        dag_id=dag_id, run_id=run_id, run_state=run_state, verdict=report.get("verdict"),
        strategy=decision.get("strategy") or report.get("strategy"), rule=decision.get("rule"),
        requested=decision.get("requested"), reasons=[str(r) for r in decision.get("reasons") or []],
        warnings=[str(w) for w in decision.get("warnings") or []], mode=report.get("mode"),
        validated_at=report.get("finished_at"), validation_seconds=report.get("seconds"), totals=totals,
        namespaces=namespaces, notes=[str(n) for n in report.get("notes") or []],
        # Groups of strategies the branch did not take are all skipped: they did nothing worth a row.
        phases=[p for p in phase_times(task_instances) if p.state != "skipped"], throughput=throughput(restored),
        lag_seconds=float(lag) if isinstance(lag, int | float) else None, missing_reason=missing,
        bounds=dict(report.get("xcom_bounds") or {}),
    )


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    state: str
    started: dt.datetime | None
    finished: dt.datetime | None
    verdict: str | None
    strategy: str | None
    namespaces: int | None
    documents: int | None

    @property
    def seconds(self) -> float | None:
        return elapsed_seconds(self.started, self.finished)


@dataclass(frozen=True)
class MigrationsPage:
    dag_id: str
    runs: list[RunSummary]
    trend: list[dict[str, Any]]
    # Why the trend is not shown (no rehearsal recorded, or the user may not read the rehearsal DAG).
    trend_note: str | None


def summarise_run(run: Mapping[str, Any], report: Mapping[str, Any] | None,
                  decision: Mapping[str, Any] | None) -> RunSummary:
    """One row of the migrations page from a DAG run (``run_id``, ``state``, ``start_date``, ``end_date``)."""
    report, decision = report or {}, decision or {}
    totals = report.get("totals") or {}
    rows = report.get("namespaces")
    # A report lists its namespaces; the validate task's return value (an older run's only record) counts them.
    counted = len(rows) if isinstance(rows, list) else rows if isinstance(rows, int) else None
    return RunSummary(
        run_id=str(run["run_id"]), state=str(run.get("state") or "-"), started=_as_datetime(run.get("start_date")),
        finished=_as_datetime(run.get("end_date")), verdict=report.get("verdict"),
        strategy=decision.get("strategy") or report.get("strategy"),
        namespaces=totals.get("namespaces", counted),
        documents=totals.get("target_documents"),
    )


def build_migrations_page(dag_id: str, runs: Sequence[RunSummary], trend: Sequence[Mapping[str, Any]],
                          trend_note: str | None = None) -> MigrationsPage:
    """Recent runs, newest first, and the rehearsal history entries (``rehearsal.summarise_run``), oldest
    first, as the trend chart reads left to right."""
    ordered_trend = sorted((dict(e) for e in trend if isinstance(e, Mapping)),
                           key=lambda e: str(e.get("started_at") or e.get("recorded_at") or ""))
    if not ordered_trend and trend_note is None:
        trend_note = "no rehearsal has been recorded yet (DAG mongo_to_atlas_rehearsal)"
    far_past = dt.datetime.min.replace(tzinfo=dt.UTC)
    return MigrationsPage(dag_id=dag_id, runs=sorted(runs, key=lambda r: r.started or far_past, reverse=True),
                          trend=ordered_trend, trend_note=trend_note)


# --------------------------------------------------------------------------------------------------------
# SVG charts
# --------------------------------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _text(value: Any) -> str:
    """Free text from a run: redacted, then escaped."""
    return _esc(redact(str(value)))


def _number(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.{digits}f}"


def svg_bar_chart(items: Sequence[tuple[str, float | None]], *, unit: str, title: str, width: int = 640) -> str:
    """Horizontal bars, one per (label, value); a value of None is drawn as "–" without a bar."""
    label_width, bar_height, gap = 200, 18, 6
    height = 28 + len(items) * (bar_height + gap)
    largest = max((v for _, v in items if v), default=0) or 1
    room = width - label_width - 110
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}"><title>{_esc(title)}</title>',
             f'<text x="0" y="14" class="chart-title">{_esc(title)}</text>']
    for i, (label, value) in enumerate(items):
        y = 24 + i * (bar_height + gap)
        shown = label if len(label) <= 30 else label[:29] + "…"
        parts.append(f'<text x="{label_width - 6}" y="{y + 13}" text-anchor="end">{_esc(shown)}</text>')
        bar = int(room * (value or 0) / largest)
        if value:
            parts.append(f'<rect x="{label_width}" y="{y}" width="{max(bar, 1)}" height="{bar_height}" class="bar"/>')
        parts.append(f'<text x="{label_width + bar + 6}" y="{y + 13}">{_number(value)} {_esc(unit)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_line_chart(points: Sequence[tuple[str, float | None]], *, unit: str, title: str,
                   width: int = 640, height: int = 200) -> str:
    """A line through (label, value) points left to right; None leaves a gap (e.g. a failed rehearsal)."""
    left, right, top, bottom = 70, 20, 28, 40
    values = [v for _, v in points if v is not None]
    largest = max(values, default=0) or 1
    plot_w, plot_h = width - left - right, height - top - bottom
    step = plot_w / max(len(points) - 1, 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        return left + i * step, top + plot_h - plot_h * v / largest

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}"><title>{_esc(title)}</title>',
             f'<text x="0" y="14" class="chart-title">{_esc(title)}</text>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" class="axis"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" class="axis"/>',
             f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{_number(largest, 0)}</text>',
             f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">0 {_esc(unit)}</text>']
    segment: list[str] = []
    segments: list[list[str]] = []
    for i, (label, value) in enumerate(points):
        if value is None:
            if segment:
                segments.append(segment)
            segment = []
            parts.append(f'<text x="{left + i * step:.1f}" y="{top + plot_h - 4}" text-anchor="middle" '
                         f'class="gap">×</text>')
            continue
        x, y = xy(i, value)
        segment.append(f"{x:.1f},{y:.1f}")
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" class="point"><title>{_esc(label)}: '
                     f'{_number(value)} {_esc(unit)}</title></circle>')
    if segment:
        segments.append(segment)
    parts += [f'<polyline points="{" ".join(s)}" class="line"/>' for s in segments if len(s) > 1]
    if points:
        first, last = points[0][0], points[-1][0]
        parts.append(f'<text x="{left}" y="{height - 12}">{_esc(first[:28])}</text>')
        if len(points) > 1:
            parts.append(f'<text x="{width - right}" y="{height - 12}" text-anchor="end">{_esc(last[:28])}</text>')
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1f2328;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.muted{color:#57606a}.verdict{display:inline-block;padding:4px 12px;border-radius:6px;font-weight:700;color:#fff}
.PASS{background:#1a7f37}.FAIL{background:#cf222e}.NONE{background:#6e7781}
table{border-collapse:collapse;font-size:13px;margin:6px 0}th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}tr.bad td{background:#fff1f0}
code{font-size:12px}ul{margin:4px 0 4px 18px;padding:0}.charts{display:flex;flex-wrap:wrap;gap:24px}
svg text{font-size:12px;fill:#1f2328}svg .chart-title{font-weight:600}svg .bar{fill:#0969da}
svg .line{fill:none;stroke:#0969da;stroke-width:2}svg .point{fill:#0969da}svg .axis{stroke:#8c959f}svg .gap{fill:#cf222e}
"""


def _page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{_STYLE}</style></head><body>\n" + "\n".join(body)
            + "\n</body></html>\n")


def _verdict_badge(verdict: str | None) -> str:
    return f'<span class="verdict {_esc(verdict) if verdict in ("PASS", "FAIL") else "NONE"}">' \
           f'{_esc(verdict or "no verdict")}</span>'


def _short_digest(digest: str | None) -> str:
    if not digest:
        return "–"
    algorithm, _, hexdigest = digest.partition(":")
    return f'<code title="{_esc(digest)}">{_esc(algorithm)}:{_esc(hexdigest[:12])}…</code>' if hexdigest else \
        f"<code>{_esc(digest[:16])}</code>"


def _when(moment: dt.datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "–"


def render_run_page(page: RunPage, *, migrations_href: str | None = None) -> str:
    """The run page: a self-contained HTML document (inline CSS and SVG, no script)."""
    body = [f"<h1>Migration report {_verdict_badge(page.verdict)}</h1>",
            f'<p class="muted">DAG <code>{_esc(page.dag_id)}</code>, run <code>{_esc(page.run_id)}</code> '
            f"({_esc(page.run_state)})"
            + (f' · <a href="{_esc(migrations_href)}">all migrations</a>' if migrations_href else "") + "</p>"]
    if page.missing_reason:
        body.append(f"<p><strong>No validation report:</strong> {_text(page.missing_reason)}.</p>")
    body.append("<h2>Strategy</h2>")
    if page.strategy:
        how = "chosen automatically" if page.requested in (None, "auto") else f"requested (strategy={page.requested})"
        body.append(f"<p><strong>{_esc(page.strategy)}</strong> ({_esc(how)}; rule <code>{_esc(page.rule or '-')}</code>)</p>")
        if page.reasons:
            body.append("<p>Because:</p><ul>" + "".join(f"<li>{_text(r)}</li>" for r in page.reasons) + "</ul>")
        if page.warnings:
            body.append("<p>Warnings:</p><ul>" + "".join(f"<li>{_text(w)}</li>" for w in page.warnings) + "</ul>")
    else:
        body.append("<p class=\"muted\">No routing decision recorded for this run.</p>")
    if page.verdict:
        t = page.totals
        body += ["<h2>Validation</h2>",
                 f"<p>{_number(t.get('matched'))} of {_number(t.get('namespaces'))} namespaces match; documents: "
                 f"source {_number(t.get('source_documents'))}, target {_number(t.get('target_documents'))}. "
                 f"Mode <code>{_esc(page.mode or '-')}</code>; validated {_esc(page.validated_at or '-')}"
                 + (f" in {_number(page.validation_seconds)} s" if page.validation_seconds is not None else "")
                 + ".</p>"]
        if page.notes:
            body.append("<ul>" + "".join(f"<li>{_text(n)}</li>" for n in page.notes) + "</ul>")
        body.append("<table><thead><tr><th>namespace</th><th>type</th><th>source count</th><th>target count</th>"
                    "<th>source digest</th><th>target digest</th><th>status</th></tr></thead><tbody>")
        for row in page.namespaces:
            name = row.namespace if row.target_namespace == row.namespace else f"{row.namespace} → {row.target_namespace}"
            body.append(f'<tr class="{"ok" if row.ok else "bad"}"><td><code>{_esc(name)}</code></td>'
                        f"<td>{_esc(row.kind)}</td><td class=\"num\">{_number(row.source_count)}</td>"
                        f"<td class=\"num\">{_number(row.target_count)}</td><td>{_short_digest(row.source_digest)}</td>"
                        f"<td>{_short_digest(row.target_digest)}</td><td>{_esc(row.status.replace('_', ' '))}</td></tr>")
        body.append("</tbody></table>")
        bad = [row for row in page.namespaces if not row.ok]
        body.append("<h2>Mismatches</h2>")
        if not bad:
            body.append("<p>None: every namespace matches.</p>")
        for row in bad:
            body.append(f"<h3><code>{_esc(row.namespace)}</code></h3>")
            fields = [d for d in row.differences if not d.startswith("document _id ")]
            if fields:
                body.append("<ul>" + "".join(f"<li>{_text(d)}</li>" for d in fields) + "</ul>")
            if row.documents:
                body.append("<table><thead><tr><th>_id</th><th>difference</th></tr></thead><tbody>"
                            + "".join(f"<tr><td><code>{_text(doc_id)}</code></td><td>{_esc(kind.replace('_', ' '))}</td></tr>"
                                      for kind, doc_id in row.documents) + "</tbody></table>")
    body.append("<h2>Phases</h2>")
    if page.phases:
        body.append("<table><thead><tr><th>phase</th><th>tasks</th><th>state</th><th>started</th><th>seconds</th>"
                    "</tr></thead><tbody>" + "".join(
                        f"<tr><td>{_esc(p.name)}</td><td class=\"num\">{p.tasks}</td><td>{_esc(p.state)}</td>"
                        f"<td>{_when(p.started)}</td><td class=\"num\">{_number(p.seconds)}</td></tr>" for p in page.phases)
                    + "</tbody></table>")
        charts = [svg_bar_chart([(p.name, p.seconds) for p in page.phases], unit="s", title="Wall time per phase")]
        if page.throughput and page.throughput.per_namespace:
            charts.append(svg_bar_chart(page.throughput.per_namespace, unit="docs/s", title="Copy rate per collection"))
        body.append('<div class="charts">' + "".join(charts) + "</div>")
    else:
        body.append("<p class=\"muted\">No task instances recorded.</p>")
    if page.throughput or page.lag_seconds is not None:
        body.append("<h2>Throughput and lag</h2><ul>")
        if page.throughput:
            tp = page.throughput
            body.append(f"<li>Copied {_number(tp.documents)} documents ({_number(tp.bytes / 1e6)} MB) in "
                        f"{_number(tp.seconds)} s: {_number(tp.docs_per_second, 0)} docs/s</li>")
        if page.lag_seconds is not None:
            body.append(f"<li>Lag at the end of catch-up: {_number(page.lag_seconds)} s</li>")
        body.append("</ul>")
    return _page(f"Migration report: {page.run_id}", body)


def render_migrations_page(page: MigrationsPage, *, run_href: str = "runs/{dag_id}/{run_id}") -> str:
    """Recent runs (newest first) with verdict, strategy and duration, then the rehearsal trend chart."""
    from urllib.parse import quote

    body = ["<h1>Migrations</h1>", f'<p class="muted">Recent runs of <code>{_esc(page.dag_id)}</code></p>']
    if page.runs:
        body.append("<table><thead><tr><th>run</th><th>state</th><th>verdict</th><th>strategy</th><th>started</th>"
                    "<th>duration s</th><th>namespaces</th><th>documents</th></tr></thead><tbody>")
        for run in page.runs:
            href = run_href.format(dag_id=quote(page.dag_id, safe=""), run_id=quote(run.run_id, safe=""))
            body.append(f'<tr class="{"bad" if run.verdict == "FAIL" or run.state == "failed" else "ok"}">'
                        f'<td><a href="{_esc(href)}">{_esc(run.run_id)}</a></td><td>{_esc(run.state)}</td>'
                        f"<td>{_verdict_badge(run.verdict) if run.verdict else '–'}</td><td>{_esc(run.strategy or '–')}</td>"
                        f"<td>{_when(run.started)}</td><td class=\"num\">{_number(run.seconds)}</td>"
                        f"<td class=\"num\">{_number(run.namespaces)}</td><td class=\"num\">{_number(run.documents)}</td></tr>")
        body.append("</tbody></table>")
    else:
        body.append("<p>No runs yet.</p>")
    body.append("<h2>Rehearsal trend</h2>")
    if page.trend_note:
        body.append(f"<p class=\"muted\">{_text(page.trend_note)}.</p>")
    if page.trend:
        labels = [str(e.get("started_at") or e.get("run_id") or "?") for e in page.trend]
        rates = [(label, e.get("docs_per_second") if e.get("status") == "success" else None)
                 for label, e in zip(labels, page.trend, strict=True)]
        totals = [(label, e.get("total_seconds")) for label, e in zip(labels, page.trend, strict=True)]
        body.append('<div class="charts">' + svg_line_chart(rates, unit="docs/s", title="Copy throughput per rehearsal")
                    + svg_line_chart(totals, unit="s", title="Total duration per rehearsal") + "</div>")
        body.append("<table><thead><tr><th>run</th><th>status</th><th>strategy</th><th>documents</th><th>copy s</th>"
                    "<th>validate s</th><th>total s</th><th>docs/s</th><th>mismatches</th></tr></thead><tbody>")
        for e in reversed(page.trend):
            body.append(f"<tr class=\"{'bad' if e.get('status') == 'failed' else 'ok'}\"><td>{_esc(e.get('run_id'))}</td>"
                        f"<td>{_esc(e.get('status'))}</td><td>{_esc(e.get('strategy') or '–')}</td>"
                        f"<td class=\"num\">{_number(e.get('documents'))}</td><td class=\"num\">{_number(e.get('copy_seconds'))}</td>"
                        f"<td class=\"num\">{_number(e.get('validate_seconds'))}</td>"
                        f"<td class=\"num\">{_number(e.get('total_seconds'))}</td>"
                        f"<td class=\"num\">{_number(e.get('docs_per_second'), 0)}</td>"
                        f"<td>{_text(', '.join(e.get('mismatches') or []) or '–')}</td></tr>")
        body.append("</tbody></table>")
    return _page("Migrations", body)
