"""Rehearsal bookkeeping (pure) and the rehearsal DAG's shape."""

from __future__ import annotations

import datetime as dt

import pytest

from atlas_migration.dag_params import rehearsal_params
from atlas_migration.errors import ConfigurationError
from atlas_migration.params import MigrationParams
from atlas_migration.rehearsal import append_history, render_trend, summarise_run

T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


def restored(n: int = 2) -> list[dict]:
    return [{"documents": 100, "bytes": 1000, "dump_started": 10.0 + i, "dump_finished": 12.0 + i,
             "restore_started": 12.0 + i, "restore_finished": 15.0 + i} for i in range(n)]


def test_summary_of_a_success():
    entry = summarise_run(run_id="r1", started_at=T0, profile=None, decision={"strategy": "mongorestore"},
                          restored=restored(), validation_report={"verdict": "PASS", "seconds": 2.5, "namespaces": []},
                          now=T0 + dt.timedelta(seconds=30))
    assert entry["status"] == "success" and entry["documents"] == 200 and entry["bytes"] == 2000
    assert (entry["dump_seconds"], entry["restore_seconds"], entry["copy_seconds"]) == (3.0, 4.0, 6.0)
    assert entry["docs_per_second"] == pytest.approx(33.3) and entry["total_seconds"] == 30


def test_summary_of_failures():
    mismatch = summarise_run(run_id="r2", started_at=T0, profile=None, decision={}, restored=restored(1),
                             validation_report={"verdict": "FAIL", "namespaces": [
                                 {"namespace": "shop.orders", "status": "mismatch"},
                                 {"namespace": "shop.x", "status": "match"}]})
    assert mismatch["status"] == "failed" and mismatch["mismatches"] == ["shop.orders"]
    crashed = summarise_run(run_id="r3", started_at=None, profile=None, decision={}, restored=[],
                            validation_report=None)
    assert crashed["status"] == "failed" and "did not reach validation" in crashed["failure"]
    dry = summarise_run(run_id="r4", started_at=None, profile=None, decision={"dry_run": True}, restored=[],
                        validation_report=None)
    assert dry["status"] == "dry_run"


def test_history_appends_and_replaces_a_retried_run(tmp_path):
    path = tmp_path / "h" / "history.jsonl"
    append_history(path, {"run_id": "a", "status": "failed"})
    append_history(path, {"run_id": "b", "status": "success"})
    entries = append_history(path, {"run_id": "a", "status": "success"})
    assert [(e["run_id"], e["status"]) for e in entries] == [("b", "success"), ("a", "success")]


def test_trend_table():
    entries = [
        {"run_id": "r1", "status": "success", "documents": 100, "bytes": 10**6, "docs_per_second": 100.0},
        {"run_id": "r2", "status": "failed", "failure": "x", "mismatches": ["shop.orders"]},
        {"run_id": "r3", "status": "success", "documents": 100, "bytes": 10**6, "docs_per_second": 150.0},
    ]
    text = render_trend(entries)
    assert "| r2 |" in text and "shop.orders" in text
    assert "150 docs/s (+50% against the one before)" in text and "3 rehearsal(s) shown, 1 failed." in text


def test_rehearsal_params_force_a_prefix_and_scratch_target():
    values = {name: p.value for name, p in rehearsal_params().items()}
    parsed = MigrationParams.parse({**values, "rehearsal_target_conn_id": "scratch_cluster"})
    assert parsed.rehearsal and parsed.target_db_prefix == "rehearsal__"
    assert parsed.target_conn_id == "scratch_cluster" and parsed.drop_target
    for bad in ("", "x", "has space", "a" * 30):
        with pytest.raises(ConfigurationError, match="rehearsal_db_prefix"):
            MigrationParams.parse({**values, "rehearsal_db_prefix": bad})
    assert not MigrationParams.parse({k: v for k, v in values.items() if not k.startswith(("rehearsal", "keep"))}).rehearsal


def test_rehearsal_dag_shape(monkeypatch):
    monkeypatch.setenv("MIGRATION_REHEARSAL_SCHEDULE", "0 3 * * 6")
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder="dags")
    assert not bag.import_errors
    main, rehearsal = bag.dags["mongo_to_atlas"], bag.dags["mongo_to_atlas_rehearsal"]
    assert "0 3 * * 6" in repr(rehearsal.timetable)
    assert type(main.timetable).__name__ == "NullTimetable"  # the real migration is never scheduled
    # The same flow: every task of the migration exists in the rehearsal, plus its own three.
    assert {t.task_id for t in rehearsal.tasks} - {t.task_id for t in main.tasks} == {
        "check_scratch", "record_rehearsal", "cleanup_scratch"}
    assert rehearsal.get_task("cleanup_scratch").is_teardown and rehearsal.get_task("check_scratch").is_setup


def test_scratch_databases_are_ours_only_when_marked():
    from atlas_migration.rehearsal import databases_to_drop, scratch_conflicts

    existing = {"app_prod", "app_shop", "app_old"}
    marked = {"app_shop", "app_gone"}
    # The clean-up drops what a rehearsal recorded creating, never a database by its prefix alone.
    assert databases_to_drop(existing, marked, "app") == ["app_shop"]
    assert databases_to_drop(existing, marked, "") == []
    # A rehearsal refuses to write into a database of that name that it did not create.
    assert scratch_conflicts(["app_prod", "app_shop", "app_new"], existing, marked) == ["app_prod"]
    assert scratch_conflicts(["app_shop", "app_new"], existing, marked) == []


def test_scratch_claim_and_cleanup_against_a_server(target, monkeypatch):
    from atlas_migration import tasks
    from devtools.airflow_env import conn_env_name, mongo_connection_json

    monkeypatch.setenv(conn_env_name("scratch"), mongo_connection_json(target.uri))
    values = {name: p.value for name, p in rehearsal_params().items()}
    params = {**values, "rehearsal_db_prefix": "app", "rehearsal_target_conn_id": "scratch"}
    p = MigrationParams.parse(params)
    with target.client() as dst:
        dst.app_prod.accounts.insert_one({"_id": 1})
        with pytest.raises(ConfigurationError, match="app_prod .*not created by a rehearsal. Nothing was written"):
            tasks.claim_scratch(p, ["app_prod", "app_shop"], "run-1")
        assert "app_shop" not in dst.list_database_names()
        assert dst["__atlas_migration"].rehearsal_scratch.count_documents({}) == 0
        tasks.claim_scratch(p, ["app_shop"], "run-1")
        dst.app_shop.orders.insert_one({"_id": 1})
        assert tasks.check_scratch(params) == ["app_shop"]
        assert tasks.cleanup_scratch(params) == ["app_shop"]
        assert {"app_prod", "app_shop"} & set(dst.list_database_names()) == {"app_prod"}
        assert dst["__atlas_migration"].rehearsal_scratch.count_documents({}) == 0
