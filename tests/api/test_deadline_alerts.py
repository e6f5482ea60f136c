"""Deadline alerts for real: a scheduler records a run's deadlines and a triggerer runs the missed one's callback.

``max_run_hours`` is read from the run's conf by the custom reference that ``plugins/migration_deadlines.py``
registers; a run still going past it gets a warning from the triggerer, kept as the callback's output. The
pure parts (which runs get which deadline) are in ``tests/test_deadlines.py``.
"""

from __future__ import annotations

import sqlite3
import time

import pytest

from devtools.airflow_env import AirflowHome, conn_env_name, mongo_connection_json
from devtools.airflow_services import AirflowServices

pytestmark = pytest.mark.integration
DAG_ID = "mongo_to_atlas"


def deadlines_of(services: AirflowServices, run_id: str) -> list[tuple]:
    """(deadline time, missed, callback state, callback output) per deadline of the run, from the metadata DB."""
    with sqlite3.connect(services.home.path / "airflow.db") as db:
        return db.execute(
            "SELECT d.deadline_time, d.missed, c.state, c.output FROM deadline d JOIN dag_run r ON r.id = d.dagrun_id "
            "LEFT JOIN callback c ON c.id = d.callback_id WHERE r.run_id = ?", (run_id,)).fetchall()


def test_a_run_past_its_max_run_hours_raises_a_deadline_alert(tmp_path_factory, standalone, target):
    with standalone.client() as src:
        src.shop.orders.insert_many([{"_id": i} for i in range(10)])
    env = {conn_env_name("mongo_source"): mongo_connection_json(standalone.uri),
           conn_env_name("atlas_target"): mongo_connection_json(target.uri)}
    services = AirflowServices(AirflowHome(tmp_path_factory.mktemp("airflow-deadline-home")), env=env, triggerer=True)
    try:
        services.start()
        services.wait_for_dag(DAG_ID)
        # 0.0003 h is about a second: the dry run (inspect, route) outlasts it.
        conf = {"strategy": "mongorestore", "dry_run": True, "max_run_hours": 0.0003}
        with services.session() as api:
            api.patch(f"{services.base_url}/api/v2/dags/{DAG_ID}", json={"is_paused": False},
                      timeout=30).raise_for_status()
            created = api.post(f"{services.base_url}/api/v2/dags/{DAG_ID}/dagRuns",
                               json={"logical_date": None, "conf": conf}, timeout=30)
            created.raise_for_status()
            run_id = created.json()["dag_run_id"]
            state, rows, until = None, [], time.monotonic() + 300
            while time.monotonic() < until:
                services.check_running()
                rows = deadlines_of(services, run_id)
                state = api.get(f"{services.base_url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", timeout=30).json()["state"]
                if rows and all(r[2] in ("success", "failed") for r in rows) and state in ("success", "failed"):
                    break
                time.sleep(1)
    finally:
        survivors = services.stop()
    log = services.logs_tail()
    triggerer_log = (services.log_dir / "triggerer.log").read_text()
    assert state == "success", log
    # Only the max_run_hours deadline: a forced mongorestore run gets no live-push window alert.
    assert len(rows) == 1, rows
    _, missed, callback_state, output = rows[0]
    assert missed == 1 and callback_state == "success", (rows, log)
    assert f"Deadline alert for {DAG_ID} run {run_id}" in output and "max_run_hours" in output
    assert f"Deadline alert for {DAG_ID} run {run_id}" in triggerer_log  # the triggerer's own warning
    assert not survivors, f"processes outlived AirflowServices.stop(): {survivors}"
