"""mongo_to_atlas_rehearsal, run for real: scratch databases only, history and trend, teardown always."""

from __future__ import annotations

import json

import pytest

from devtools.sample_data import seed_sample_dataset
from tests.dags.test_mongo_to_atlas import airflow_home, conns, failure_text  # noqa: F401 - shared fixture
from tests.helpers import user_namespaces

pytestmark = pytest.mark.integration
DAG_ID = "mongo_to_atlas_rehearsal"


def history(home) -> list[dict]:
    path = home.path / "migration-work" / DAG_ID / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_rehearsal_never_touches_real_namespaces_and_records_a_trend(airflow_home, standalone, target):  # noqa: F811
    with standalone.client() as src:
        seed_sample_dataset(src, scale=0.01)
    with target.client() as dst:
        dst.shop.orders.insert_one({"_id": "real-target-document"})
        dst["rehearsal__leftover"].junk.insert_one({"_id": 1})  # from a crashed earlier rehearsal
        real_before = user_namespaces(dst)
    before = len(history(airflow_home))
    env = conns(standalone.uri, target.uri)
    for _ in range(2):
        run = airflow_home.dags_test(DAG_ID, {"validation_mode": "full"}, env=env)
        assert run.succeeded, failure_text(run)
    assert "dropped 4 scratch database(s)" in run.output or "dropped 3 scratch database(s)" in run.output
    with target.client() as dst:
        # The real namespace is untouched and every scratch database is gone again.
        assert list(dst.shop.orders.find()) == [{"_id": "real-target-document"}]
        assert user_namespaces(dst) == [ns for ns in real_before if not ns[0].startswith("rehearsal__")]
        assert not [d for d in dst.list_database_names() if d.startswith("rehearsal__")]
    entries = history(airflow_home)[before:]
    assert [e["status"] for e in entries] == ["success", "success"]
    for entry in entries:
        assert entry["documents"] == 1_000 and entry["namespaces"] == 9 and entry["mismatches"] == []
        assert entry["copy_seconds"] > 0 and entry["validate_seconds"] is not None and entry["docs_per_second"] > 0
    trend = (airflow_home.path / "migration-work" / DAG_ID / "trend.md").read_text()
    assert entries[-1]["run_id"] in trend and "against the one before" in trend


def test_failed_rehearsal_is_recorded_and_cleaned_up(airflow_home, standalone, target):  # noqa: F811
    with standalone.client() as src:
        src.shop.orders.insert_many([{"_id": i} for i in range(10)])
    with target.client() as dst:
        dst["rehearsal__shop"].orders.insert_one({"_id": "leftover"})
    run = airflow_home.dags_test(DAG_ID, {"strategy": "live_pull"}, env=conns(standalone.uri, target.uri))
    assert run.state == "failed", failure_text(run)
    entry = history(airflow_home)[-1]
    assert entry["status"] == "failed" and "did not reach validation" in entry["failure"]
    with target.client() as dst:
        assert not [d for d in dst.list_database_names() if d.startswith("rehearsal__")]


def test_bad_prefix_is_refused_before_writing(airflow_home, standalone, target):  # noqa: F811
    with standalone.client() as src:
        src.shop.orders.insert_one({"_id": 1})
    run = airflow_home.dags_test(DAG_ID, {"rehearsal_db_prefix": ""}, env=conns(standalone.uri, target.uri))
    # Refused by the param's schema when the run is created: no task ran at all.
    assert run.returncode != 0 and run.state is None
    assert "rehearsal_db_prefix" in run.output and "does not match" in run.output
    with target.client() as dst:
        assert user_namespaces(dst) == []
