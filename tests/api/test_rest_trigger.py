"""``mongo_to_atlas`` run for real through the REST API: api-server, scheduler and dag-processor.

The components start once for the module (``devtools.airflow_services``) with the test servers as
``AIRFLOW_CONN_*`` connections; each test runs ``scripts/trigger_migration.py`` as a person would, in a
subprocess, and checks its exit code and output, the target and the reports. Starting the components
takes about 25 s and a run of the small dataset about 40 s; every process is stopped in the finalizer.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.airflow_env import REPO, AirflowHome, conn_env_name, mongo_connection_json
from devtools.airflow_services import AirflowServices
from devtools.sample_data import seed_sample_dataset
from tests.helpers import assert_namespaces_identical, user_namespaces

pytestmark = pytest.mark.integration
DAG_ID = "mongo_to_atlas"
CLI = REPO / "scripts" / "trigger_migration.py"


@pytest.fixture(scope="module")
def services(tmp_path_factory, standalone_server, target_server) -> Iterator[AirflowServices]:
    env = {conn_env_name("mongo_source"): mongo_connection_json(standalone_server.uri),
           conn_env_name("atlas_target"): mongo_connection_json(target_server.uri)}
    services = AirflowServices(AirflowHome(tmp_path_factory.mktemp("airflow-api-home")), env=env)
    try:
        services.start()  # stops what it started if it fails
        services.wait_for_dag(DAG_ID)
        yield services
    finally:
        survivors = services.stop()
    assert not survivors, f"processes outlived AirflowServices.stop(): {survivors}"


def run_cli(services: AirflowServices, conf: dict, *, password: str | None = None,
            via_env: bool = False) -> subprocess.CompletedProcess:
    """The CLI against the real api-server; the password from the services' file, or ``AIRFLOW_PASSWORD``."""
    argv = [sys.executable, str(CLI), "--api", services.base_url, "--username", services.username,
            "--conf", json.dumps(conf), "--timeout", "600", "--poll-interval", "1"]
    env = {k: v for k, v in os.environ.items() if k != "AIRFLOW_PASSWORD"}
    if via_env:
        env["AIRFLOW_PASSWORD"] = password if password is not None else services.password
    else:
        argv += ["--password-file", str(services.password_file)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env, stdin=subprocess.DEVNULL)


def output_of(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def assert_no_secrets(services: AirflowServices, output: str, *extra: str) -> None:
    for secret in (services.password, *extra):
        assert secret not in output, "a password was printed"
    # Airflow's bearer tokens are JWTs: base64url of '{"' starts every one of them with 'eyJ'.
    assert "eyJ" not in output, "a token was printed"


def dag_run_count(services: AirflowServices) -> int:
    with services.session() as api:
        response = api.get(f"{services.base_url}/api/v2/dags/{DAG_ID}/dagRuns", params={"limit": 1}, timeout=30)
        response.raise_for_status()
        return response.json()["total_entries"]


def test_migration_triggered_through_the_api_succeeds(services, standalone, target):
    with standalone.client() as src:
        seed_sample_dataset(src, scale=0.01)
    with services.session() as api:  # paused, as a new DAG is: the CLI must unpause it
        api.patch(f"{services.base_url}/api/v2/dags/{DAG_ID}", json={"is_paused": True}, timeout=30).raise_for_status()

    result = run_cli(services, {"strategy": "mongorestore"})
    output = output_of(result)
    assert result.returncode == 0, output + "\n" + services.logs_tail()
    assert f"unpaused {DAG_ID}" in output
    assert re.search(r"\] inspect_source: success", output) and re.search(r"\] mongorestore\.copy\.restore\[\d\]", output)
    assert "final state: success" in output
    assert "verdict: PASS over 10 namespaces" in output
    reports = dict(re.findall(r"^report \((\w+)\): (.+)$", output, re.MULTILINE))
    assert set(reports) == {"json", "markdown"}, output
    report = json.loads(Path(reports["json"]).read_text())
    assert report["verdict"] == "PASS" and len(report["namespaces"]) == 10
    assert Path(reports["markdown"]).is_file()
    with standalone.client() as src, target.client() as dst:
        namespaces = user_namespaces(src)
        assert user_namespaces(dst) == namespaces
        assert assert_namespaces_identical(src, dst, namespaces) == 1_000
    assert_no_secrets(services, output)


@pytest.mark.parametrize(("conf", "detail"), [
    ({"strategy": "sideways"}, "Invalid input for param strategy: 'sideways' is not one of"),
    ({"restore_workers": 0}, "Invalid input for param restore_workers: 0 is less than the minimum of 1"),
])
def test_invalid_param_is_refused_by_the_api(services, conf, detail):
    runs_before = dag_run_count(services)
    result = run_cli(services, conf, via_env=True)
    output = output_of(result)
    assert result.returncode == 2, output
    assert f"API error: triggering {DAG_ID}: HTTP 400: {detail}" in output
    assert "triggered" not in output and "final state" not in output
    assert dag_run_count(services) == runs_before  # refused when the run is created: no run exists
    assert_no_secrets(services, output)


def test_wrong_password_is_an_api_error(services):
    wrong = "Not-The-Passw0rd"
    result = run_cli(services, {}, password=wrong, via_env=True)
    output = output_of(result)
    assert result.returncode == 2, output
    assert "authentication (POST /auth/token): HTTP 401" in output
    assert_no_secrets(services, output, wrong)


def test_failed_run_exits_1_with_the_reason(services, standalone, target):
    with standalone.client() as src:
        src.shop.orders.insert_one({"_id": 1})
    # A live migration needs an oplog; the standalone source has none: `route` fails before writing.
    result = run_cli(services, {"strategy": "live_pull"})
    output = output_of(result)
    assert result.returncode == 1, output
    assert "final state: failed" in output
    assert "route failed:" in output
    assert "strategy 'live_pull' cannot migrate source 'mongo_source'" in output
    assert "report: none" in output
    with target.client() as dst:
        assert user_namespaces(dst) == []
    assert_no_secrets(services, output)
