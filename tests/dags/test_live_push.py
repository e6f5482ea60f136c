"""The ``live_push`` group of the real ``mongo_to_atlas`` DAG, run with ``airflow dags test``.

The Atlas Admin API / Cloud Manager stand-in runs as a subprocess (``python -m devtools.atlas_api_server``)
with a scenario that maps the Cloud Manager deployment to the local replica-set source server and the Atlas
cluster to the target server; at cutover it copies the source into the target (its approximation of the
push, see that module), so the DAG's own validate step checks real data. Its simulated clock runs 20x, so a
migration is ready for cutover about six seconds after it starts.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests

from devtools.airflow_env import REPO, AirflowHome, conn_env_name, mongo_connection_json
from devtools.airflow_services import AirflowServices
from devtools.sample_data import seed_sample_dataset
from tests.dags.hitl import hitl_api, hitl_url, preset_old_variable, running_task_state  # noqa: F401 - fixture
from tests.helpers import assert_namespaces_identical, user_namespaces, write_blocking_source

pytestmark = pytest.mark.integration
DAG_ID = "mongo_to_atlas"
ATLAS_PUBLIC, ATLAS_PRIVATE = "atlas-pub-7Q", "atlas-PRIV-k3y-9x!secret"
CM_PUBLIC, CM_PRIVATE = "cm-pub-42", "cm-PRIV-k3y-7y!secret"
ATLAS_ORG, ATLAS_PROJECT = "6507f1f77bcf86cd79943901", "6507f1f77bcf86cd79943902"
CM_ORG, CM_PROJECT = "6507f1f77bcf86cd79943903", "6507f1f77bcf86cd79943904"
MIGRATION_HOST = "migration-host-0.example.net"


@dataclass
class StandIn:
    """The stand-in process and its admin endpoints."""

    process: subprocess.Popen
    url: str

    def get(self, what: str):
        return requests.get(f"{self.url}/__test__/{what}", timeout=5).json()

    def fault(self, **fault) -> None:
        requests.post(f"{self.url}/__test__/faults", json=fault, timeout=5).raise_for_status()

    def calls(self, method: str, path_end: str) -> list[int]:
        return [r["status"] for r in self.get("requests") if r["method"] == method and r["path"].endswith(path_end)]

    def assert_cleaned_up(self) -> None:
        state = self.get("state")
        assert state["link_tokens"], "expected a link-token to have been created"
        assert all(t["revoked"] for t in state["link_tokens"]), "link-tokens left behind"
        assert state["migration_links"] == {}, "Cloud Manager migration link left behind"


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory) -> AirflowHome:
    home = AirflowHome(tmp_path_factory.mktemp("airflow-home-live-push"))
    home.migrate()
    return home


def scenario(source_uri: str, target_uri: str, source_version: str, **changes) -> dict:
    return {
        "api_keys": {ATLAS_PUBLIC: ATLAS_PRIVATE}, "cloud_manager_api_keys": {CM_PUBLIC: CM_PRIVATE},
        "atlas_org_id": ATLAS_ORG, "atlas_project_id": ATLAS_PROJECT, "cloud_manager_org_id": CM_ORG,
        "source_projects": [{"name": "on-prem", "project_id": CM_PROJECT, "migration_hosts": [MIGRATION_HOST],
                             "deployments": [{"name": "rs0", "mongodb_version": source_version,
                                              "local_uri": source_uri}]}],
        "clusters": [{"name": "Cluster0", "mongodb_version": "8.0.4", "local_uri": target_uri}],
        # Simulated seconds run 20x: linked and validated within a poke, ready about 6 s after the start.
        "speed": 20, "link_sync_seconds": 10, "validation_seconds": 10, "migration_new_seconds": 60,
        "migration_initial_lag_seconds": 600, "migration_lag_decay_per_second": 10,
        "migration_cutover_seconds": 20, **changes,
    }


@pytest.fixture
def stand_in_factory(tmp_path) -> Iterator:
    started: list[subprocess.Popen] = []

    def start(spec: dict) -> StandIn:
        spec_file = tmp_path / "scenario.json"
        spec_file.write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "include"), str(REPO)])}
        process = subprocess.Popen(
            [sys.executable, "-m", "devtools.atlas_api_server", "--port", "0", "--scenario", str(spec_file),
             "--state-file", str(tmp_path / "atlas-state.json")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        started.append(process)
        line = process.stdout.readline()
        assert line.startswith("listening on "), f"stand-in did not start: {line}{process.stdout.read()}"
        return StandIn(process, line.split()[-1])

    yield start
    for process in started:  # only the processes this fixture started, by their handle
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def env_for(stand_in: StandIn, source_uri: str, target_uri: str, *, atlas_private: str = ATLAS_PRIVATE) -> dict:
    atlas = {"conn_type": "mongodb_atlas", "host": stand_in.url, "login": ATLAS_PUBLIC, "password": atlas_private,
             "extra": {"org_id": ATLAS_ORG, "project_id": ATLAS_PROJECT}}
    cloud_manager = {"conn_type": "mongodb_cloud_manager", "host": stand_in.url, "login": CM_PUBLIC,
                     "password": CM_PRIVATE, "extra": {"org_id": CM_ORG}}
    return {conn_env_name("mongo_source"): mongo_connection_json(source_uri),
            conn_env_name("atlas_target"): mongo_connection_json(target_uri),
            conn_env_name("atlas_api"): json.dumps(atlas),
            conn_env_name("cloud_manager_api"): json.dumps(cloud_manager),
            "MIGRATION_POKE_INTERVAL_SECONDS": "1"}


@pytest.fixture
def fenced_source_uri(source):
    """The source as the run's connection reaches it: where setUserWriteBlockMode works (the cutover fence
    blocks user writes on it), through ``devtools.replica_set_proxy`` in front of the test server."""
    with write_blocking_source(source) as uri:
        yield uri


def conf(**changes) -> dict:
    return {"strategy": "live_push", "source_managed_by": "cloud_manager", "source_project_id": CM_PROJECT,
            "source_cluster_name": "rs0", "target_cluster_name": "Cluster0", "migration_host": MIGRATION_HOST,
            "access_list_ips": ["10.20.0.0/24"], "cutover": "auto", "poll_interval_seconds": 1,
            "link_timeout_seconds": 60, "validation_timeout_seconds": 60, "sync_timeout_seconds": 120,
            "completion_timeout_seconds": 120,
            # the "Cutover" section the live strategies share
            "quiet_period_seconds": 1, "cutover_timeout_seconds": 60, "approval_timeout_seconds": 120, **changes}


def source_version(source) -> str:
    with source.client() as client:
        return client.server_info()["version"]


def failure_text(run) -> str:
    return f"state={run.state}\n{run.output[-8000:]}"


def assert_no_secrets(home: AirflowHome, run_output: str, secrets: list[str]) -> None:
    places = {"dags test output": run_output}
    for path in home.path.rglob("*.log"):
        places[str(path)] = path.read_text(errors="replace")
    with sqlite3.connect(home.path / "airflow.db") as db:
        rows = db.execute("SELECT task_id, value FROM xcom WHERE dag_id = ?", (DAG_ID,)).fetchall()
    assert rows, "expected XCom rows from the run"
    places["xcom"] = "\n".join(str(value) for _, value in rows)
    for where, text in places.items():
        for secret in secrets:
            assert secret not in text, f"secret leaked into {where}"


def test_auto_routes_to_push_defers_and_migrates_everything(airflow_home, stand_in_factory, source, fenced_source_uri, target):
    """Happy path: routing picks push, the watch defers to the trigger, a 429 is retried, the stand-in copies
    the data at cutover, validate passes, clean-up removes the link; no key or token in logs or XCom."""
    with source.client() as src:
        seed_sample_dataset(src, scale=0.02)
    stand_in = stand_in_factory(scenario(source.uri, target.uri, source_version(source)))
    stand_in.fault(status=429, count=2, method="GET", path_regex="availableProjects$", retry_after=1)

    run = airflow_home.dags_test(DAG_ID, conf(strategy="auto"), env=env_for(stand_in, fenced_source_uri, target.uri))

    assert run.succeeded, failure_text(run)
    assert "strategy: live_push (chosen automatically; rule 'cloud_manager')" in run.output
    assert "Live push pre-flight passed" in run.output
    assert "HTTP 429 (rate limited); retrying in 1.0 s" in run.output
    # wait_for_sync went through the deferred state: it handed over to the trigger, which dags test runs in line.
    assert "deferring to LiveMigrationTrigger until it is ready for cutover" in run.output
    assert "[DAG TEST] running trigger in line" in run.output
    assert "is ready for cutover" in run.output and "is COMPLETE" in run.output
    assert "no application write on the source after the fence for 1 s" in run.output
    state = stand_in.get("state")
    (migration,) = state["migrations"].values()
    assert migration["copy_status"] == "done", migration
    assert stand_in.calls("PUT", "/cutover") == [202]
    assert "user writes are now BLOCKED on the source" in run.output  # the fence, before Atlas cuts over
    stand_in.assert_cleaned_up()
    assert state["link_tokens"][0]["access_list_ips"] == ["10.20.0.0/24"]
    with source.client() as src, target.client() as dst:
        namespaces = user_namespaces(src)
        assert user_namespaces(dst) == namespaces
        assert_namespaces_identical(src, dst, namespaces)
    report = json.loads(next((airflow_home.path / "migration-work" / DAG_ID).glob("*/report/validation.json"))
                        .read_text())
    assert report["verdict"] == "PASS" and report["strategy"] == "live_push"
    tokens = [t["token"] for t in state["link_tokens"]]
    assert_no_secrets(airflow_home, run.output, [ATLAS_PRIVATE, CM_PRIVATE, *tokens])


APPROVE_TASK = "live_push.approve_cutover"


def answer_when_asked(home: AirflowHome, api: AirflowServices, stand_in: StandIn, seen: dict, *,
                      answer: str = "Approve", before_answer=None) -> None:
    """Run beside ``dags test``: preset the old approval Variable as soon as the run exists (it must change
    nothing), wait until the approval task is in ``awaiting_input`` and stays there, read its HITL detail,
    then answer through the REST API as the api-server's user."""
    deadline = time.monotonic() + 240
    preset = False
    while time.monotonic() < deadline:
        time.sleep(1)
        found = running_task_state(home, APPROVE_TASK)
        if not found:
            continue
        run_id, state = found
        if not preset:
            seen["old_variable_set"] = preset_old_variable(home, run_id)
            preset = True
        if state != "awaiting_input":
            continue
        time.sleep(4)  # with the old Variable set all along: still waiting
        seen["state_before_answer"] = running_task_state(home, APPROVE_TASK)
        seen["cutover_calls_before_approval"] = stand_in.calls("PUT", "/cutover")
        with api.session() as session:
            detail = session.get(hitl_url(api, run_id, APPROVE_TASK), timeout=30)
            seen["detail"] = detail.json() if detail.status_code == 200 else detail.text
            if before_answer:
                before_answer()
            response = session.patch(hitl_url(api, run_id, APPROVE_TASK), json={"chosen_options": [answer]}, timeout=30)
            seen["patch"] = (response.status_code, response.json())
        return


def test_manual_cutover_waits_for_an_approval_in_required_actions(airflow_home, hitl_api, stand_in_factory, source,  # noqa: F811
                                                                  fenced_source_uri, target):
    """cutover=manual: approve_cutover parks in awaiting_input (a preset Variable of the old approval changes
    nothing) with the evidence in its body; an answer through the HITL REST API resumes it; the report names
    the approver. Atlas's first cutover answer is a refusal (400 not ready): 'wait', not a failure."""
    with source.client() as src:
        src.shop.orders.insert_many([{"_id": i, "v": i * 2} for i in range(300)])
    stand_in = stand_in_factory(scenario(source.uri, target.uri, source_version(source)))
    stand_in.fault(status=400, count=1, method="PUT", path_regex="/cutover$",
                   error_code="LIVE_MIGRATION_NOT_READY_FOR_CUTOVER", detail="Not ready for cutover.")
    seen: dict = {}
    approver = threading.Thread(target=answer_when_asked, args=(airflow_home, hitl_api, stand_in, seen), daemon=True)
    approver.start()

    run = airflow_home.dags_test(DAG_ID, conf(cutover="manual"), env=env_for(stand_in, fenced_source_uri, target.uri))
    approver.join(timeout=30)

    assert run.succeeded, failure_text(run)
    assert seen.get("old_variable_set") == 0, seen
    assert seen["state_before_answer"][1] == "awaiting_input", seen
    assert seen["cutover_calls_before_approval"] == [], "cut over before the operator approved"
    assert "Waiting for Human-in-the-loop input for tasks: ['live_push.approve_cutover']" in run.output
    detail = seen["detail"]
    assert detail["subject"].startswith("Approve the cutover of live migration ") and detail["options"] == [
        "Approve", "Reject"], detail
    for shown in ("| Migration status | status WORKING, readyForCutover true, lag ", "| Lag | ",
                  "| Ready for cutover since | ", "| Cutover window | cutover window: 119 h ",
                  "| Source writes at cutover | BLOCKED by the run", "**Times out:** after 2 min 00 s",
                  "bounded by the approval timeout (approval_timeout_seconds = 120 s)"):
        assert shown in detail["body"], detail["body"]
    status, answered = seen["patch"]
    assert status == 200 and answered["responded_by"]["name"] == "admin", seen["patch"]
    assert "the cutover was approved by admin (user id admin) at " in run.output
    assert "Atlas refused the cutover" in run.output
    assert stand_in.calls("PUT", "/cutover") == [400, 202]
    stand_in.assert_cleaned_up()
    with target.client() as dst:
        assert dst.shop.orders.count_documents({}) == 300
    reports = sorted((airflow_home.path / "migration-work" / DAG_ID).glob("*/report/validation.json"),
                     key=lambda path: path.stat().st_mtime)
    notes = json.loads(reports[-1].read_text())["notes"]
    assert any(note.startswith("The cutover was approved by admin at ") for note in notes), notes
    tokens = [t["token"] for t in stand_in.get("state")["link_tokens"]]
    for secret in (ATLAS_PRIVATE, CM_PRIVATE, *tokens):
        assert secret not in json.dumps(detail), "secret leaked into the approval's HITL detail"
    assert_no_secrets(airflow_home, run.output, [ATLAS_PRIVATE, CM_PRIVATE, *tokens])


@pytest.mark.parametrize("changes, expected", [
    ({"validation_outcome": "FAILED", "validation_error_message": "Source rs0 oplog is too small (scenario)."},
     "Atlas refused the live migration request: Source rs0 oplog is too small (scenario)."),
    ({"migration_outcome": "FAILED", "migration_fail_after_seconds": 80},
     "FAILED (status FAILED"),
])
def test_failures_end_the_run_and_clean_up(airflow_home, stand_in_factory, source, fenced_source_uri, target, changes, expected):
    with source.client() as src:
        src.shop.orders.insert_one({"_id": 1})
    stand_in = stand_in_factory(scenario(source.uri, target.uri, source_version(source), **changes))

    run = airflow_home.dags_test(DAG_ID, conf(), env=env_for(stand_in, fenced_source_uri, target.uri))

    assert run.state == "failed", failure_text(run)
    assert expected in run.output, failure_text(run)
    stand_in.assert_cleaned_up()  # the teardown ran although the migration failed
    assert stand_in.calls("PUT", "/cutover") == []
    with target.client() as dst:
        assert user_namespaces(dst) == []


def test_an_approval_after_the_window_ran_out_is_refused_by_the_cutover(airflow_home, hitl_api, stand_in_factory,  # noqa: F811
                                                                         source, fenced_source_uri, target):
    """The window runs out while the approval waits (the stand-in's clock jumps past the 120 hours): nothing
    watches a parked task, so the cutover re-reads the migration after the approval and refuses it, naming
    EXPIRED; no cutover is requested and the clean-up runs. (The response timeout that would have failed the
    wait before the window's end is enforced by the scheduler's awaiting_input sweep, which ``dags test``
    lacks: its bound is unit-tested, tests/strategies/test_live_push.py and tests/test_approval.py.)"""
    with source.client() as src:
        src.shop.orders.insert_one({"_id": 1})
    stand_in = stand_in_factory(scenario(source.uri, target.uri, source_version(source)))
    seen: dict = {}

    def window_runs_out() -> None:
        requests.post(f"{stand_in.url}/__test__/clock", json={"advance_seconds": 121 * 3600}, timeout=5)

    approver = threading.Thread(target=answer_when_asked, args=(airflow_home, hitl_api, stand_in, seen),
                                kwargs={"before_answer": window_runs_out}, daemon=True)
    approver.start()

    run = airflow_home.dags_test(DAG_ID, conf(cutover="manual"), env=env_for(stand_in, fenced_source_uri, target.uri))
    approver.join(timeout=30)

    assert run.state == "failed", failure_text(run)
    assert seen["patch"][0] == 200, seen
    assert "the cutover was approved by admin" in run.output
    assert "EXPIRED: the 120-hour cutover window passed without a cutover" in run.output
    stand_in.assert_cleaned_up()
    assert stand_in.calls("PUT", "/cutover") == []


def test_bad_credentials_fail_the_preflight_before_any_change(airflow_home, stand_in_factory, source, fenced_source_uri, target):
    with source.client() as src:
        src.shop.orders.insert_one({"_id": 1})
    stand_in = stand_in_factory(scenario(source.uri, target.uri, source_version(source)))
    wrong = "Wr0ng-private-KEY-secret"

    run = airflow_home.dags_test(DAG_ID, conf(), env=env_for(stand_in, fenced_source_uri, target.uri, atlas_private=wrong))

    assert run.state == "failed", failure_text(run)
    assert "live push pre-flight could not read Atlas / Cloud Manager" in run.output
    assert "HTTP 401 UNAUTHORIZED" in run.output and "check the connection's API key pair" in run.output
    assert "Nothing was changed." in run.output
    state = stand_in.get("state")
    assert state["link_tokens"] == [] and state["migrations"] == {} and state["validations"] == {}
    assert wrong not in run.output


def start_outage_once_started(stand_in: StandIn, seconds: float, seen: dict) -> None:
    """As soon as the migration exists (wait_for_sync is about to watch it): every API call fails for
    ``seconds`` (503), while the migration goes on in the stand-in."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if stand_in.get("state")["migrations"]:
            requests.post(f"{stand_in.url}/__test__/outage", json={"seconds": seconds}, timeout=5).raise_for_status()
            seen["outage_started"] = time.monotonic()
            return
        time.sleep(0.2)


def run_variables(home: AirflowHome, prefix: str) -> dict[str, str]:
    """The module's run Variables with ``prefix``, read through the CLI (values are stored encrypted)."""
    with sqlite3.connect(home.path / "airflow.db") as db:
        keys = [k for (k,) in db.execute("SELECT key FROM variable WHERE key LIKE ?", (f"{prefix}__{DAG_ID}__%",))]
    return {key: home.airflow("variables", "get", key).stdout.strip() for key in keys}


def task_states(home: AirflowHome, run_id_like: str = "%") -> dict[str, str]:
    with sqlite3.connect(home.path / "airflow.db") as db:
        rows = db.execute("SELECT ti.task_id, ti.state FROM task_instance ti JOIN dag_run dr ON dr.dag_id = ti.dag_id "
                          "AND dr.run_id = ti.run_id WHERE ti.dag_id = ? AND dr.run_id LIKE ? "
                          "ORDER BY dr.id", (DAG_ID, run_id_like)).fetchall()
    return dict(rows)  # the module's last run wins


def test_a_30_second_api_outage_during_wait_for_sync_does_not_end_the_migration(airflow_home, stand_in_factory, fenced_source_uri,
                                                                               source, target):
    """Issue 11.7: every Atlas / Cloud Manager call fails (503) for 30 s while wait_for_sync watches; the
    trigger rides it out (the hook alone gives up after a few seconds), the link stays, one migration only,
    and the run completes."""
    with source.client() as src:
        src.shop.orders.insert_many([{"_id": i, "v": i} for i in range(200)])
    stand_in = stand_in_factory(scenario(source.uri, target.uri, source_version(source)))
    seen: dict = {}
    outage = threading.Thread(target=start_outage_once_started, args=(stand_in, 30, seen), daemon=True)
    outage.start()

    run = airflow_home.dags_test(DAG_ID, conf(api_outage_tolerance_seconds=120),
                                 env=env_for(stand_in, fenced_source_uri, target.uri))
    outage.join(timeout=5)

    assert run.succeeded, failure_text(run)
    assert "outage_started" in seen, "the outage never started"
    log = [r for r in stand_in.get("requests") if r.get("outage")]
    assert log and all(r["status"] == 503 for r in log), "no call met the outage"
    assert any("/liveMigrations/" in r["path"] for r in log), "wait_for_sync never polled during the outage"
    assert "the Atlas API failed: " in run.output and "the API has been failing for" in run.output
    assert "the Atlas API answers again after" in run.output
    calls = stand_in.get("requests")
    creates = [r for r in calls if r["method"] == "POST" and r["path"].endswith("/liveMigrations")
               and r["status"] == 201]
    assert len(creates) == 1, "a second live migration was created"
    order = [(r["method"], r["path"].rsplit("/", 1)[-1]) for r in calls if r["status"] < 400]
    assert order.index(("PUT", "cutover")) < order.index(("DELETE", "migrationLink")), \
        "the link was removed before the cutover"
    stand_in.assert_cleaned_up()  # COMPLETE: now the link goes
    (migration_id,) = stand_in.get("state")["migrations"]
    records = [json.loads(v) for v in run_variables(airflow_home, "atlas_migration_live_push").values()]
    assert {"state": "created", "migration_id": migration_id}.items() <= records[-1].items()
    with target.client() as dst:
        assert dst.shop.orders.count_documents({}) == 200


@pytest.mark.parametrize("on_failure", ["keep_migration"])  # "abandon" works too; tests/strategies/test_live_push.py has it
def test_an_upstream_failure_keeps_the_running_migration_unless_abandoned(airflow_home, hitl_api, stand_in_factory, source,  # noqa: F811
                                                                          fenced_source_uri, target, on_failure):
    """The operator rejects the cutover (a task of the run fails) while the migration is WORKING: the
    teardown keeps the link and says how to go on (and does not fail itself); with on_failure=abandon it
    removes the link and the link-tokens (measured passing as a DAG run too; the cheaper
    ``test_cleanup_keeps_the_link_of_a_running_migration_unless_abandoned`` covers it in the suite)."""
    with source.client() as src:
        src.shop.orders.insert_one({"_id": 1})
    stand_in = stand_in_factory(scenario(source.uri, target.uri, source_version(source)))
    seen: dict = {}
    rejecter = threading.Thread(target=answer_when_asked, args=(airflow_home, hitl_api, stand_in, seen),
                                kwargs={"answer": "Reject"}, daemon=True)
    rejecter.start()

    run = airflow_home.dags_test(DAG_ID, conf(cutover="manual", on_failure=on_failure),
                                 env=env_for(stand_in, fenced_source_uri, target.uri))
    rejecter.join(timeout=30)

    assert run.state == "failed", failure_text(run)
    assert "the cutover was REJECTED by admin at " in run.output
    state = stand_in.get("state")
    (migration,) = state["migrations"].values()
    assert migration["cutover_at"] is None and stand_in.calls("PUT", "/cutover") == []
    states = task_states(airflow_home)
    assert states["live_push.cleanup"] == "success", states
    if on_failure == "keep_migration":
        assert state["migration_links"], "the link of a running migration was removed"
        assert not any(t["revoked"] for t in state["link_tokens"]), "the link-tokens were revoked"
        assert f"live migration {migration['id']} is still WORKING in Atlas" in run.output
        assert "to abandon the migration instead: airflow variables set 'atlas_migration_abandon__" in run.output
    else:
        stand_in.assert_cleaned_up()
        assert "an operator abandoned live migration" in run.output and "param on_failure=abandon" in run.output
