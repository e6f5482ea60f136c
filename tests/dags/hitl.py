"""Answering a run's human-in-the-loop approval from a test, as an operator would through the REST API.

``airflow dags test`` parks an approval task in ``awaiting_input`` and waits until an answer recorded by an
api-server sharing its metadata database resumes it: ``hitl_api`` starts that api-server alone on the test
module's Airflow home; ``wait_for_input`` and ``answer`` do what the UI's Required Actions would.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from devtools.airflow_env import AirflowHome
from devtools.airflow_services import AirflowServices, api_server_only

DAG_ID = "mongo_to_atlas"
# The Variable that approved a cutover before approvals moved to HITL: setting it must change nothing.
OLD_APPROVAL_PREFIX = "atlas_migration_cutover"


@pytest.fixture(scope="module")
def hitl_api(airflow_home) -> Iterator[AirflowServices]:
    """An api-server alone on the module's Airflow home (same metadata DB as its ``dags test`` runs)."""
    with api_server_only(airflow_home) as services:
        yield services


def running_task_state(home: AirflowHome, task_id: str, dag_id: str = DAG_ID) -> tuple[str, str | None] | None:
    """(run id, state) of ``task_id`` in the running run of ``dag_id``, or None (the home is shared by a
    module's tests: only the running run counts)."""
    try:
        with sqlite3.connect(home.path / "airflow.db", timeout=5) as db:
            row = db.execute("SELECT dr.run_id, ti.state FROM dag_run dr LEFT JOIN task_instance ti "
                             "ON dr.dag_id = ti.dag_id AND dr.run_id = ti.run_id AND ti.task_id = ? "
                             "WHERE dr.dag_id = ? AND dr.state = 'running'", (task_id, dag_id)).fetchone()
    except sqlite3.OperationalError:
        return None  # the database is busy or not created yet
    return (row[0], row[1]) if row else None


def hitl_url(api: AirflowServices, run_id: str, task_id: str, dag_id: str = DAG_ID) -> str:
    return (f"{api.base_url}/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/"
            f"{task_id}/-1/hitlDetails")


def preset_old_variable(home: AirflowHome, run_id: str, dag_id: str = DAG_ID) -> int:
    """Set the pre-HITL approval Variable of the run to ``approved``; returns the CLI's exit code."""
    return home.airflow("variables", "set", f"{OLD_APPROVAL_PREFIX}__{dag_id}__{run_id}", "approved").returncode


def wait_for_input(home: AirflowHome, task_id: str, timeout: float = 300, alive=lambda: True) -> str | None:
    """The run id once ``task_id`` is in ``awaiting_input``, or None at ``timeout`` or when ``alive()`` turns
    false (the run ended before asking)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        found = running_task_state(home, task_id)
        if found and found[1] == "awaiting_input":
            return found[0]
        time.sleep(1)
    return None


def answer(api: AirflowServices, run_id: str, task_id: str, choice: str = "Approve") -> tuple[int, dict, dict]:
    """Read the task's HITL detail and answer it as the api-server's user: (status, response, detail)."""
    with api.session() as session:
        detail = session.get(hitl_url(api, run_id, task_id), timeout=30)
        response = session.patch(hitl_url(api, run_id, task_id), json={"chosen_options": [choice]}, timeout=30)
    return response.status_code, response.json(), detail.json() if detail.status_code == 200 else {"error": detail.text}
