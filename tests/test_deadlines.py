"""Which runs get which deadline alert, and the line a missed one writes (no Airflow components needed)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from atlas_migration.deadlines import (
    PUSH_WINDOW_HOURS,
    PUSH_WINDOW_WARNING_HOURS,
    RunParamHours,
    alert_deadline_missed,
    deadline_after,
    hours_from_conf,
    migration_deadlines,
)

QUEUED = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(("conf", "hours"), [
    ({"max_run_hours": 6}, 6.0), ({"max_run_hours": 0.5}, 0.5), ({"max_run_hours": 0}, None), ({}, None),
    (None, None), ({"max_run_hours": True}, None), ({"max_run_hours": "6"}, None), ({"max_run_hours": -1}, None),
])
def test_max_run_hours_is_taken_only_as_a_positive_number(conf, hours):
    assert hours_from_conf(conf, "max_run_hours") == hours


def test_the_run_param_sets_the_deadline_and_zero_sets_none():
    assert deadline_after(QUEUED, {"max_run_hours": 6}, param="max_run_hours") == QUEUED + timedelta(hours=6)
    assert deadline_after(QUEUED, {"max_run_hours": 0}, param="max_run_hours") is None
    assert deadline_after(None, {"max_run_hours": 6}, param="max_run_hours") is None  # never queued


def test_the_push_window_alert_is_only_for_runs_that_may_push():
    warn = PUSH_WINDOW_HOURS - PUSH_WINDOW_WARNING_HOURS
    for conf in ({}, {"strategy": "auto"}, {"strategy": "live_push"}):
        assert deadline_after(QUEUED, conf, hours=warn, strategies=("live_push", "auto")) == QUEUED + timedelta(hours=96)
    for strategy in ("mongorestore", "live_pull", "compose", "aws_replica_set", "file_import"):
        assert deadline_after(QUEUED, {"strategy": strategy}, hours=warn, strategies=("live_push", "auto")) is None


def test_the_dags_carry_both_alerts_and_the_reference_survives_serialization():
    alerts = {alert.name: alert for alert in migration_deadlines(["/venv/bin/airflow", "scheduler"])}
    assert set(alerts) == {"max_run_hours", "live_push_cutover_window"}
    for alert in alerts.values():
        reference = alert.reference
        assert isinstance(reference, RunParamHours)
        assert RunParamHours.deserialize_reference(reference.serialize_reference()) == reference
        assert alert.callback.path == "atlas_migration.deadlines.alert_deadline_missed"
    assert alerts["max_run_hours"].reference.param == "max_run_hours"
    assert alerts["live_push_cutover_window"].reference.hours == 96


def test_a_missed_deadline_names_the_run_and_what_to_do():
    context = {"dag_run": {"dag_id": "mongo_to_atlas", "dag_run_id": "manual__1", "state": "running"},
               "deadline": {"deadline_time": "2026-11-30T15:00:00+00:00"}}
    line = asyncio.run(alert_deadline_missed(message="the run has reached its max_run_hours", context=context))
    assert line == ("Deadline alert for mongo_to_atlas run manual__1 (deadline 2026-11-30T15:00:00+00:00, state "
                    "running): the run has reached its max_run_hours")


def test_airflow_dags_test_gets_no_alerts():
    # Airflow 3.3's dag.test() crashes at the end of a successful run of a DAG with alerts (module docstring).
    assert migration_deadlines(["/venv/bin/airflow", "dags", "test", "mongo_to_atlas"]) == []
    assert migration_deadlines(["/venv/lib/python3.11/site-packages/airflow/__main__.py", "dags", "test"]) == []
    assert len(migration_deadlines(["/venv/bin/airflow", "dag-processor"])) == 2
    assert len(migration_deadlines(["/venv/bin/airflow", "dags", "list"])) == 2
