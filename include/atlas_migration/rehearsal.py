"""Rehearsal bookkeeping: one history line per scheduled rehearsal and a trend table people can read.

Pure functions over what the run's tasks returned (XCom) and its validation report; the only I/O is
appending to and reading the JSON-lines history file.

Scratch databases are claimed before they are written: a marker document per database
(``__atlas_migration.rehearsal_scratch``, ``_id`` = the database name) is written on the target before the
rehearsal creates it, and the clean-up drops only databases that carry a marker, never by prefix alone
(a prefix of ``app`` would otherwise drop a real ``app_prod``). The decisions are the pure functions below.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

SCRATCH_MARKER_DB = "__atlas_migration"
SCRATCH_MARKER_COLLECTION = "rehearsal_scratch"


def scratch_conflicts(planned: list[str], existing: set[str], marked: set[str]) -> list[str]:
    """Planned scratch databases that already exist on the target without a rehearsal's marker: a rehearsal
    must not write into (or later drop) a database it did not create."""
    return sorted(db for db in set(planned) if db in existing and db not in marked)


def databases_to_drop(existing: set[str], marked: set[str], prefix: str) -> list[str]:
    """What the clean-up drops: databases a rehearsal recorded creating, under this prefix; nothing else."""
    if not prefix:
        return []
    return sorted(db for db in existing if db in marked and db.startswith(prefix))


def _span(items: list[dict[str, Any]], start_key: str, end_key: str) -> float | None:
    starts = [i[start_key] for i in items if i.get(start_key) is not None]
    ends = [i[end_key] for i in items if i.get(end_key) is not None]
    return round(max(ends) - min(starts), 3) if starts and ends else None


def summarise_run(
    *,
    run_id: str,
    started_at: dt.datetime | None,
    profile: dict[str, Any] | None,
    decision: dict[str, Any],
    restored: list[dict[str, Any]],
    validation_report: dict[str, Any] | None,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """One history entry: status, per-phase wall times, volume, throughput and mismatches."""
    now = now or dt.datetime.now(dt.UTC)
    documents = sum(r.get("documents") or 0 for r in restored)
    nbytes = sum(r.get("bytes") or 0 for r in restored)
    dump = _span(restored, "dump_started", "dump_finished")
    restore = _span(restored, "restore_started", "restore_finished")
    copy = _span([{**r, "s": r.get("dump_started"), "e": r.get("restore_finished")} for r in restored], "s", "e")
    mismatches: list[str] = []
    verdict = None
    validate_seconds = None
    if validation_report:
        verdict = validation_report.get("verdict")
        validate_seconds = validation_report.get("seconds")
        mismatches = [r["namespace"] for r in validation_report.get("namespaces", []) if r.get("status") != "match"]
    if decision.get("dry_run"):
        status, failure = "dry_run", ""
    elif verdict == "PASS":
        status, failure = "success", ""
    elif verdict == "FAIL":
        status, failure = "failed", f"validation found {len(mismatches)} mismatching namespace(s): {', '.join(mismatches)}"
    else:
        status, failure = "failed", "the migration did not reach validation (see the first failed task's log)"
    return {
        "run_id": run_id,
        "started_at": started_at.isoformat(timespec="seconds") if started_at else None,
        "recorded_at": now.isoformat(timespec="seconds"),
        "status": status,
        "failure": failure,
        "strategy": decision.get("strategy"),
        "source_documents": (profile or {}).get("collections") and sum(
            c.get("documents") or 0 for c in profile["collections"] if c.get("type") != "view"),
        "namespaces": len(restored),
        "documents": documents,
        "bytes": nbytes,
        "dump_seconds": dump,
        "restore_seconds": restore,
        "copy_seconds": copy,
        "validate_seconds": validate_seconds,
        "total_seconds": round((now - started_at).total_seconds(), 3) if started_at else None,
        "docs_per_second": round(documents / copy, 1) if copy else None,
        "mismatches": mismatches,
    }


def append_history(path: Path, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Append ``entry`` (a retried record task replaces its own earlier line) and return the whole history."""
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = read_history(path)
    entries = [e for e in entries if e.get("run_id") != entry["run_id"]] + [entry]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
    tmp.replace(path)
    return entries


def read_history(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _num(value: Any, fmt: str = "{:,.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def render_trend(entries: list[dict[str, Any]]) -> str:
    """A Markdown table, newest last, with the change in throughput against the previous success."""
    lines = [
        "# Rehearsal trend",
        "",
        "| run | started | status | strategy | documents | MB | dump s | restore s | copy s | validate s | total s | docs/s | mismatches |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for e in entries:
        lines.append(
            f"| {e['run_id']} | {e.get('started_at') or '-'} | {e['status']} | {e.get('strategy') or '-'} | "
            f"{_num(e.get('documents'), '{:,}')} | {_num((e.get('bytes') or 0) / 1e6)} | {_num(e.get('dump_seconds'))} | "
            f"{_num(e.get('restore_seconds'))} | {_num(e.get('copy_seconds'))} | {_num(e.get('validate_seconds'))} | "
            f"{_num(e.get('total_seconds'))} | {_num(e.get('docs_per_second'), '{:,.0f}')} | "
            f"{', '.join(e.get('mismatches') or []) or '-'} |"
        )
    successes = [e for e in entries if e["status"] == "success" and e.get("docs_per_second")]
    if len(successes) >= 2:
        last, previous = successes[-1]["docs_per_second"], successes[-2]["docs_per_second"]
        lines += ["", f"Throughput of the last successful rehearsal: {last:,.0f} docs/s "
                      f"({(last - previous) / previous:+.0%} against the one before)."]
    failed = sum(1 for e in entries if e["status"] == "failed")
    lines += ["", f"{len(entries)} rehearsal(s) shown, {failed} failed."]
    return "\n".join(lines) + "\n"
