"""The report pages' pure functions (``atlas_migration.report_view``) on reports made by the real code.

Reports come from ``validation`` itself: snapshots of real BSON documents (``multiset_digest``),
``compare_namespace``, ``NamespaceResult.with_document_differences`` and ``ValidationReport.to_dict``; the
rehearsal trend from ``rehearsal.summarise_run``; file import rows from ``file_import.check_namespaces``.
No server is needed.
"""

from __future__ import annotations

import datetime as dt
import json
import re

import bson
import pytest

from atlas_migration import rehearsal, report_view, validation
from atlas_migration.report_view import (
    bound_report,
    build_migrations_page,
    build_run_page,
    phase_times,
    render_migrations_page,
    render_run_page,
    summarise_run,
    throughput,
)

T0 = dt.datetime(2026, 11, 30, 6, 0, tzinfo=dt.UTC)


def snapshot(db: str, coll: str, documents: list[dict], indexes: list[dict] | None = None) -> validation.NamespaceSnapshot:
    count, digest = validation.multiset_digest(bson.encode(d) for d in documents)
    return validation.NamespaceSnapshot(
        db=db, coll=coll, mode="full", exists=True, type="collection", count=count, digest=digest,
        indexes=validation.normalize_indexes(indexes or [{"v": 2, "key": {"_id": 1}, "name": "_id_"}]),
    )


def real_report(*, extra_matching: int = 0, notes: list[str] | None = None) -> validation.ValidationReport:
    """shop.orders matches; shop.customers lost one document and has one changed; plus N matching ones."""
    orders = [{"_id": i, "total": i * 10} for i in range(5)]
    customers = [{"_id": f"c{i}", "name": f"n{i}"} for i in range(4)]
    changed = [customers[0], {"_id": "c1", "name": "renamed"}, customers[2]]
    results = [validation.compare_namespace(snapshot("shop", "orders", orders), snapshot("shop", "orders", orders))]
    mismatch = validation.compare_namespace(snapshot("shop", "customers", customers),
                                            snapshot("shop", "customers", changed))
    found = [validation.DocumentDifference("different", validation.format_id("c1")),
             validation.DocumentDifference("missing_in_target", validation.format_id("c3"))]
    results.append(mismatch.with_document_differences(found, validation.DEFAULT_DIFFERENCE_LIMIT))
    many_indexes = [{"v": 2, "key": {"_id": 1}, "name": "_id_"},
                    *({"v": 2, "key": {f"field_{k}": 1, "other": -1}, "name": f"field_{k}_1"} for k in range(8))]
    for n in range(extra_matching):
        docs = [{"_id": n}]
        results.append(validation.compare_namespace(snapshot("bulk", f"c{n:05d}", docs, many_indexes),
                                                    snapshot("bulk", f"c{n:05d}", docs, many_indexes)))
    return validation.ValidationReport(
        run_id="manual__2026-11-30T06:00:00+00:00", strategy="mongorestore", mode="full",
        started_at="2026-11-30T06:01:00Z", finished_at="2026-11-30T06:01:04Z", seconds=4.2,
        results=sorted(results, key=lambda r: r.namespace), notes=list(notes or []))


DECISION = {"strategy": "mongorestore", "rule": "no_oplog", "requested": "auto",
            "reasons": ["the source is a standalone server: it has no oplog to follow"], "warnings": [],
            "dry_run": False, "available": True}


def test_a_small_report_goes_to_xcom_unchanged() -> None:
    data = real_report().to_dict()
    assert bound_report(data) == data
    assert "xcom_bounds" not in bound_report(data)


def test_a_large_report_is_shortened_in_steps_keeping_verdict_totals_and_mismatches() -> None:
    data = real_report(extra_matching=300).to_dict()
    full_size = len(json.dumps(data))
    assert full_size > report_view.XCOM_REPORT_MAX_BYTES  # the case this guards against

    bounded = bound_report(data, full_report="/work/run/report/validation.json")
    assert len(json.dumps(bounded, separators=(",", ":")).encode()) <= report_view.XCOM_REPORT_MAX_BYTES
    assert (bounded["verdict"], bounded["totals"]) == ("FAIL", data["totals"])
    # Step 1 was enough: every namespace is still there, without index lists in the snapshots.
    assert len(bounded["namespaces"]) == 302 and bounded["xcom_bounds"]["snapshot_details_dropped"] is True
    assert "namespaces_omitted" not in bounded["xcom_bounds"]
    assert all("indexes" not in row["source"] for row in bounded["namespaces"] if row["status"] == "match")
    assert "/work/run/report/validation.json" in bounded["notes"][-1]
    assert data["namespaces"][0]["source"]["indexes"], "the input must not be modified"


def test_a_tight_budget_leaves_out_matching_namespaces_before_mismatching_ones() -> None:
    data = real_report(extra_matching=50).to_dict()
    bounded = bound_report(data, max_bytes=6_000)
    assert len(json.dumps(bounded, separators=(",", ":")).encode()) <= 6_000
    kept = {row["namespace"]: row["status"] for row in bounded["namespaces"]}
    assert kept["shop.customers"] == "mismatch"
    omitted = bounded["xcom_bounds"]["namespaces_omitted"]
    assert omitted == 52 - len(kept) and omitted > 0
    assert bounded["xcom_bounds"]["mismatching_namespaces_omitted"] == 0
    assert f"{omitted} namespaces left out" in bounded["notes"][-1]
    assert bounded["totals"]["namespaces"] == 52


def test_rejected_rows_are_counted_not_listed_when_the_report_is_too_large() -> None:
    from atlas_migration.strategies.file_import import check_namespaces

    checks = check_namespaces([{"namespace": "imp.rows", "mode": "upsert", "rows": 5000, "rejected": 3000,
                                "documents": 2000, "matched": 2000}], {"imp.rows": 2000}, {})
    rejections = [{"file": "rows.csv", "line": n, "reason": "not a number in column 'qty'", "action": "skipped"}
                  for n in range(3000)]
    report = {"verdict": "PASS", "strategy": "file_import", "mode": "counts",
              "namespaces": [c.to_dict() for c in checks], "rejections": rejections, "rejections_not_listed": 7}
    bounded = bound_report(report, max_bytes=40_000)
    assert len(bounded["rejections"]) == report_view.XCOM_MAX_REJECTIONS
    assert bounded["rejections_not_listed"] == 7 + 3000 - report_view.XCOM_MAX_REJECTIONS
    page = build_run_page(dag_id="mongo_to_atlas", run_id="r", run_state="success", report=bounded,
                          decision={"strategy": "file_import", "rule": "files", "reasons": []})
    assert [(r.namespace, r.source_count, r.target_count, r.ok) for r in page.namespaces] == [
        ("imp.rows", None, 2000, True)]
    assert page.totals["namespaces"] == 1 and "3,000 row(s) rejected" in page.namespaces[0].differences


def test_run_page_shows_verdict_decision_counts_digests_and_mismatching_ids() -> None:
    report = real_report(notes=["Cutover fence: placed at mongodb://admin:hunter22@db.example:27017/"]).to_dict()
    task_instances = [
        {"task_id": "inspect_source", "state": "success", "start_date": T0, "end_date": T0 + dt.timedelta(seconds=3)},
        {"task_id": "route", "state": "success", "start_date": T0 + dt.timedelta(seconds=3),
         "end_date": T0 + dt.timedelta(seconds=4)},
        {"task_id": "mongorestore.copy.dump", "state": "success", "start_date": T0 + dt.timedelta(seconds=5),
         "end_date": T0 + dt.timedelta(seconds=9)},
        {"task_id": "mongorestore.copy.restore", "state": "success", "start_date": T0 + dt.timedelta(seconds=9),
         "end_date": T0 + dt.timedelta(seconds=15)},
        {"task_id": "live_pull.copy", "state": "skipped", "start_date": T0 + dt.timedelta(seconds=4),
         "end_date": T0 + dt.timedelta(seconds=5)},
        {"task_id": "validate", "state": "failed", "start_date": T0 + dt.timedelta(seconds=16),
         "end_date": T0 + dt.timedelta(seconds=20)},
    ]
    restored = [{"namespace": "shop.orders", "documents": 5, "bytes": 500, "dump_started": 100.0,
                 "restore_finished": 102.0},
                {"namespace": "shop.customers", "documents": 3, "bytes": 300, "dump_started": 101.0,
                 "restore_finished": 104.0}]
    page = build_run_page(dag_id="mongo_to_atlas", run_id=report["run_id"], run_state="failed", report=report,
                          decision=DECISION, task_instances=task_instances, restored=restored)
    assert page.verdict == "FAIL" and page.strategy == "mongorestore" and page.rule == "no_oplog"
    assert [p.name for p in page.phases] == ["inspect_source", "route", "mongorestore", "validate"]
    assert [(p.seconds, p.tasks) for p in page.phases][2] == (10.0, 2)
    customers = next(r for r in page.namespaces if r.namespace == "shop.customers")
    assert (customers.source_count, customers.target_count, customers.ok) == (4, 3, False)
    assert customers.documents == [("different", '"c1"'), ("missing_in_target", '"c3"')]
    assert customers.source_digest.startswith("sum-sha256:") and customers.source_digest != customers.target_digest

    html = render_run_page(page, migrations_href="../../migrations")
    assert '<span class="verdict FAIL">FAIL</span>' in html
    assert "rule <code>no_oplog</code>" in html and "it has no oplog to follow" in html
    assert "<code>shop.orders</code>" in html and "<code>shop.customers</code>" in html
    assert re.search(r'<td class="num">4</td>\s*<td class="num">3</td>', html)
    assert "<code>&quot;c1&quot;</code></td><td>different</td>" in html
    assert "<code>&quot;c3&quot;</code></td><td>missing in target</td>" in html
    assert "document count: source 4, target 3 (-1)" in html
    assert customers.source_digest.split(":")[1][:12] in html
    # Throughput: 8 documents from the first dump start (100) to the last restore end (104).
    assert "Copied 8 documents" in html and "2 docs/s" in html and html.count("<svg") == 2
    assert "hunter22" not in html and "mongodb://admin:***@db.example" in html
    assert "<script" not in html


def test_names_and_ids_from_a_run_are_escaped() -> None:
    report = validation.ValidationReport(
        run_id="r", strategy="mongorestore", mode="full", started_at="", finished_at="", seconds=0.1,
        results=[validation.compare_namespace(snapshot("x", "<script>alert(1)</script>", [{"_id": 1}]),
                                              snapshot("x", "<script>alert(1)</script>", [{"_id": 1}]))]).to_dict()
    html = render_run_page(build_run_page(dag_id="d", run_id='r"><b>', run_state="success", report=report,
                                          decision=DECISION))
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'r&quot;&gt;&lt;b&gt;' in html


def test_pages_without_a_report_say_why() -> None:
    dry = build_run_page(dag_id="mongo_to_atlas", run_id="r", run_state="success", report=None,
                         decision={**DECISION, "dry_run": True})
    assert dry.missing_reason.startswith("a dry run")
    other = build_run_page(dag_id="some_other_dag", run_id="r", run_state="success", report=None, decision=None)
    assert "not a migration run" in other.missing_reason
    assert "no verdict" in render_run_page(other)
    running = build_run_page(dag_id="mongo_to_atlas", run_id="r", run_state="running", report=None,
                             decision=DECISION, task_instances=[{"task_id": "mongorestore.copy.dump",
                                                                 "state": "running", "start_date": T0,
                                                                 "end_date": None}])
    assert running.missing_reason == "the run has not reached validation yet"
    assert running.phases[0].state == "running" and running.phases[0].seconds is None


def test_phase_state_is_the_worst_of_its_tasks_and_throughput_needs_results() -> None:
    phases = phase_times([
        {"task_id": "mongorestore.copy.restore", "state": "success", "start_date": T0.isoformat(),
         "end_date": (T0 + dt.timedelta(seconds=2)).isoformat()},
        {"task_id": "mongorestore.copy.restore", "state": "failed", "start_date": T0.isoformat(),
         "end_date": (T0 + dt.timedelta(seconds=5)).isoformat()},
    ])
    assert [(p.name, p.state, p.seconds, p.tasks) for p in phases] == [("mongorestore", "failed", 5.0, 2)]
    assert throughput([]) is None


def test_migrations_page_lists_runs_and_draws_the_rehearsal_trend() -> None:
    passed, failed = real_report().to_dict(), real_report().to_dict()
    passed["verdict"] = "PASS"  # the same shape, as a passing run would leave it
    runs = [summarise_run({"run_id": "manual__1", "state": "success", "start_date": T0,
                           "end_date": T0 + dt.timedelta(seconds=75)}, passed, DECISION),
            summarise_run({"run_id": "manual__2+x", "state": "failed", "start_date": T0 + dt.timedelta(hours=1),
                           "end_date": T0 + dt.timedelta(hours=1, seconds=30)}, failed, DECISION)]
    restored = [{"documents": 1000, "bytes": 10_000, "dump_started": 0.0, "restore_finished": 2.0}]
    trend = [rehearsal.summarise_run(run_id=f"scheduled__{day}", started_at=T0 + dt.timedelta(days=day),
                                     profile=None, decision=DECISION, restored=restored if day != 1 else [],
                                     validation_report=passed if day != 1 else failed,
                                     now=T0 + dt.timedelta(days=day, seconds=60)) for day in range(3)]
    page = build_migrations_page("mongo_to_atlas", list(reversed(runs)), trend)
    assert [r.run_id for r in page.runs] == ["manual__2+x", "manual__1"]  # newest first
    assert [e["status"] for e in page.trend] == ["success", "failed", "success"]
    html = render_migrations_page(page)
    assert 'href="runs/mongo_to_atlas/manual__2%2Bx"' in html
    assert html.count('class="verdict PASS"') == 1 and html.count('class="verdict FAIL"') == 1
    assert "<td class=\"num\">75</td>" in html
    # The failed rehearsal is a gap in the throughput line: two points, no line between them.
    throughput_chart = html.split("<svg")[1]
    assert throughput_chart.count("<circle") == 2 and "<polyline" not in throughput_chart
    assert "500 docs/s" in throughput_chart
    # A run from before the report was published has only the validate task's return value.
    older = summarise_run({"run_id": "manual__0", "state": "success"}, {"verdict": "PASS", "namespaces": 7,
                                                                          "files": {"json": "/w/validation.json"}}, None)
    assert (older.verdict, older.namespaces, older.documents, older.seconds) == ("PASS", 7, None, None)
    empty = build_migrations_page("mongo_to_atlas", [], [])
    assert "no rehearsal has been recorded yet" in render_migrations_page(empty)


@pytest.mark.parametrize("values", [[], [("a", None)], [("a", 0.0), ("b", 3.5)]])
def test_charts_draw_any_series(values) -> None:
    svg = report_view.svg_bar_chart(values, unit="s", title="t")
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count("<rect") == sum(1 for _, v in values if v)
    line = report_view.svg_line_chart(values, unit="s", title="t")
    assert line.count("<circle") == sum(1 for _, v in values if v is not None)
