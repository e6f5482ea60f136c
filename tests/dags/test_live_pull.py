"""The live_pull strategy through the real DAG: a writer keeps changing the source during the migration,
and after cutover the target equals the source exactly (raw BSON, counts, indexes)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import threading
import time

import pytest
import requests

from devtools.airflow_env import REPO, conn_env_name
from devtools.mongo_servers import free_port
from tests.dags.hitl import answer, hitl_api, preset_old_variable, running_task_state, wait_for_input  # noqa: F401
from tests.dags.test_mongo_to_atlas import airflow_home, conns, failure_text, reports_of  # noqa: F401 - shared fixture
from tests.helpers import assert_namespaces_identical, user_namespaces, write_blocking_source

pytestmark = pytest.mark.integration
DAG_ID = "mongo_to_atlas"
FAST_POKES = {"MIGRATION_POKE_INTERVAL_SECONDS": "2"}


USER_WRITES_BLOCKED = 371  # mongod's UserWritesBlocked


class Writer(threading.Thread):
    """The application: inserts, updates and deletes on the source until it is "moved" (``stop``) or its
    writes are refused because the source blocks user writes, which is when a real application would be
    repointed. Counts what the source acknowledged and what it refused."""

    def __init__(self, uri: str, pause: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.pause = pause  # between operations: a writer that never stops must not outrun catch-up here
        self.stop_event = threading.Event()
        self.counts = {"insert": 0, "update": 0, "delete": 0}
        self.refused = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        import pymongo
        from pymongo.errors import OperationFailure

        rng = random.Random(3)
        try:
            with pymongo.MongoClient(self.uri) as client:
                coll = client.shop.orders
                next_id = 10_000
                while not self.stop_event.is_set():
                    op = rng.random()
                    try:
                        if op < 0.5:
                            coll.insert_one({"_id": next_id, "total": rng.randint(1, 100), "tags": ["live"]})
                            next_id += 1
                            self.counts["insert"] += 1
                        elif op < 0.8:
                            coll.update_one({"_id": rng.randint(0, next_id)},
                                            {"$inc": {"total": 1}, "$set": {"seen": True}})
                            self.counts["update"] += 1
                        else:
                            coll.delete_one({"_id": rng.randint(0, next_id)})
                            self.counts["delete"] += 1
                    except OperationFailure as exc:
                        if exc.code != USER_WRITES_BLOCKED:
                            raise
                        self.refused += 1
                        return  # the source refuses writes: the application moves to Atlas
                    time.sleep(self.pause)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def stop(self) -> dict[str, int]:
        self.stop_event.set()
        self.join(timeout=30)
        assert self.error is None, self.error
        return self.counts


def seed(client) -> None:
    client.shop.orders.insert_many([{"_id": i, "total": i % 97, "lines": [{"sku": i % 13}]} for i in range(3_000)])
    client.shop.orders.create_index([("total", 1), ("_id", -1)])
    client.shop.customers.insert_many([{"_id": f"c{i}", "email": f"c{i}@x.org"} for i in range(500)])
    client.shop.customers.create_index("email", unique=True)
    client.shop.create_collection("recent", viewOn="orders", pipeline=[{"$match": {"total": {"$gt": 50}}}])


def stop_writer_later(writer: Writer, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, writer.stop_event.set)
    timer.start()
    return timer


def test_native_pull_with_write_blocking_keeps_every_acknowledged_write(airflow_home, source, target):  # noqa: F811
    with source.client() as src:
        seed(src)
    with write_blocking_source(source) as source_uri:
        writer = Writer(source_uri, pause=0.05)
        writer.start()
        # The writer never stops by itself: it writes through the copy and the catch-up until the automatic
        # cutover blocks user writes on the source; every write acknowledged before that must be on the target.
        conf = {"strategy": "live_pull", "pull_engine": "native", "cutover": "auto", "source_write_block": "require",
                "quiet_period_seconds": 2, "partition_docs": 1_000, "validation_mode": "full",
                "cutover_timeout_seconds": 300}
        run = airflow_home.dags_test(DAG_ID, conf, env={**conns(source_uri, target.uri), **FAST_POKES})
        counts = writer.stop()
    assert run.succeeded, failure_text(run)
    assert all(counts.values()) and writer.refused == 1, (counts, writer.refused)
    assert "change stream resume point recorded" in run.output and "cutover complete" in run.output
    assert "user writes are now BLOCKED on the source" in run.output
    notes = reports_of(airflow_home, run.output)["notes"]
    assert any("Writes were BLOCKED on the source" in n for n in notes), notes
    assert "Late writes after the fence: none" in notes, notes
    assert any(n.startswith("Verifier: ") and "open: 0 (clean)" in n for n in notes), notes
    with source.client() as src, target.client() as dst:
        namespaces = user_namespaces(src)
        assert namespaces == [("shop", "customers"), ("shop", "orders"), ("shop", "recent")]
        assert [ns for ns in user_namespaces(dst) if not ns[0].startswith("__")] == namespaces
        assert_namespaces_identical(src, dst, namespaces)


NATIVE_APPROVAL_TASK = "live_pull.await_cutover_approval"
MONGOSYNC_APPROVAL_TASK = "live_pull.await_mongosync_approval"


def start_run(home, conf: dict, env: dict) -> tuple[threading.Thread, dict]:
    """``airflow dags test`` in a thread (it blocks while the approval waits); its result lands in the dict."""
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(run=home.dags_test(DAG_ID, conf, env=env)), daemon=True)
    runner.start()
    return runner, outcome


def test_manual_cutover_waits_for_the_operator(airflow_home, hitl_api, source, target):  # noqa: F811
    """cutover=manual: await_cutover_approval parks in awaiting_input with the evidence in its body (a preset
    Variable of the old approval changes nothing); the operator stops the writers and approves through the
    REST API; the cutover catches up again, fences, and the report names the approver."""
    with source.client() as src:
        seed(src)
    writer = Writer(source.uri)
    writer.start()
    env = {**conns(source.uri, target.uri), **FAST_POKES}
    conf = {"strategy": "live_pull", "pull_engine": "native", "cutover": "manual", "quiet_period_seconds": 2,
            "source_write_block": "off", "approval_timeout_seconds": 3600}
    runner, outcome = start_run(airflow_home, conf, env)
    run_id = wait_for_input(airflow_home, NATIVE_APPROVAL_TASK, alive=runner.is_alive)
    assert run_id, failure_text(outcome.get("run"))
    assert preset_old_variable(airflow_home, run_id) == 0
    time.sleep(4)  # writes keep coming, the old Variable says "approved": still waiting
    assert running_task_state(airflow_home, NATIVE_APPROVAL_TASK) == (run_id, "awaiting_input")
    writer.stop()
    status, answered, detail = answer(hitl_api, run_id, NATIVE_APPROVAL_TASK)
    runner.join(timeout=600)
    run = outcome["run"]
    assert run.succeeded, failure_text(run)
    assert status == 200 and answered["responded_by"]["name"] == "admin", (status, answered)
    assert detail["subject"] == "Approve the live-pull cutover" and detail["options"] == ["Approve", "Reject"], detail
    for shown in ("| Lag | ", "| Verifier | ", "| Oplog span now | ", "| Source writes at cutover | ",
                  "your approval is the statement that application writes have STOPPED",
                  "**Times out:** after 1 h 00 min"):
        assert shown in detail["body"], detail["body"]
    assert f"Waiting for Human-in-the-loop input for tasks: ['{NATIVE_APPROVAL_TASK}']" in run.output
    assert "cutover: caught up before the fence" in run.output
    notes = reports_of(airflow_home, run.output)["notes"]
    assert any(n.startswith("The live-pull cutover was approved by admin") for n in notes), notes
    with source.client() as src, target.client() as dst:
        assert_namespaces_identical(src, dst, user_namespaces(src))


def test_writes_after_the_operators_statement_fail_the_cutover(airflow_home, hitl_api, source, target):  # noqa: F811
    with source.client() as src:
        seed(src)
    writer = Writer(source.uri, pause=0.05)
    writer.start()
    env = {**conns(source.uri, target.uri), **FAST_POKES}
    conf = {"strategy": "live_pull", "pull_engine": "native", "cutover": "manual", "quiet_period_seconds": 2,
            "source_write_block": "off", "partition_docs": 1_000}
    runner, outcome = start_run(airflow_home, conf, env)
    run_id = wait_for_input(airflow_home, NATIVE_APPROVAL_TASK, alive=runner.is_alive)
    assert run_id, failure_text(outcome.get("run"))
    # The operator states that writes stopped (approves), but the application keeps writing.
    status, _, _ = answer(hitl_api, run_id, NATIVE_APPROVAL_TASK)
    assert status == 200
    runner.join(timeout=600)
    counts = writer.stop()
    run = outcome["run"]
    assert not run.succeeded, failure_text(run)
    match = re.search(r"LateWrites: .*?(\d+) application write\(s\) reached the source after the cutover fence", run.output)
    assert match and int(match.group(1)) > 0, failure_text(run)
    assert "shop.orders (" in run.output and sum(counts.values()) > 0
    # Failed once, not retried: a retry cannot make writes stop.
    assert run.output.count("reached the source after the cutover fence") <= 2, failure_text(run)


@pytest.fixture
def mongosync_api(source, target):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.mongosync_server", "--port", str(port), "--cluster0", source.uri,
         "--cluster1", target.uri], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    line = proc.stdout.readline()
    assert "listening on" in line, line
    yield port
    proc.terminate()
    proc.wait(timeout=30)


def mongosync_env(source, target, port: int) -> dict[str, str]:
    return {**conns(source.uri, target.uri), **FAST_POKES,
            conn_env_name("mongosync_api"): json.dumps({"conn_type": "mongosync", "host": "127.0.0.1",
                                                         "port": port, "schema": "http"})}


def run_mongosync_dag_with_approval(airflow_home, api, env: dict[str, str], writer: Writer, *,  # noqa: F811
                                    stop_writer_first: bool):
    """Run the DAG (mongosync engine, manual cutover, no source write blocking: SecantusDB cannot block);
    once it asks for the commit's approval (mongosync can commit), stop the writer (or not) and approve
    through the REST API. Returns the run and the approval task's HITL detail."""
    conf = {"strategy": "live_pull", "pull_engine": "mongosync", "cutover": "manual", "source_write_block": "off",
            "max_cutover_lag_seconds": 5, "quiet_period_seconds": 3, "approval_timeout_seconds": 240}
    runner, outcome = start_run(airflow_home, conf, env)
    run_id = wait_for_input(airflow_home, MONGOSYNC_APPROVAL_TASK, alive=runner.is_alive)
    assert run_id, failure_text(outcome.get("run"))
    if stop_writer_first:
        writer.stop()
    status, _, detail = answer(api, run_id, MONGOSYNC_APPROVAL_TASK)
    assert status == 200
    runner.join(timeout=600)
    return outcome["run"], detail


def test_mongosync_engine_through_the_dag(airflow_home, hitl_api, source, target, mongosync_api):  # noqa: F811
    """Without source write blocking the commit waits for the operator; the writer stops before the approval,
    so the fence sees no late write, /commit is sent, and after COMMITTED the source equals the target."""
    with source.client() as src:
        seed(src)
    writer = Writer(source.uri)
    writer.start()
    env = mongosync_env(source, target, mongosync_api)
    run, detail = run_mongosync_dag_with_approval(airflow_home, hitl_api, env, writer, stop_writer_first=True)
    writer.stop()
    assert run.succeeded, failure_text(run)
    assert detail["subject"] == "Approve the mongosync commit" and "canCommit true" in detail["body"], detail
    assert "placing the fence and watching the source" in run.output
    assert "after COMMITTED: no application write reached the source after the fence" in run.output
    with source.client() as src, target.client() as dst:
        assert_namespaces_identical(src, dst, user_namespaces(src))


def test_mongosync_commit_refused_while_the_writer_keeps_writing(airflow_home, hitl_api, source, target,  # noqa: F811
                                                                 mongosync_api):
    """The operator approves, but the application still writes: the fence sees late writes, /commit is not
    sent (mongosync keeps syncing, nothing is lost), and the run fails with the count and namespace."""
    with source.client() as src:
        seed(src)
    writer = Writer(source.uri)
    writer.start()
    env = mongosync_env(source, target, mongosync_api)
    try:
        run, _ = run_mongosync_dag_with_approval(airflow_home, hitl_api, env, writer, stop_writer_first=False)
    finally:
        writer.stop()
    assert not run.succeeded and run.state == "failed", failure_text(run)
    refused = re.search(r"mongosync commit refused: (\d+) application write\(s\) reached the source after the "
                        r"cutover fence .*?: shop\.orders \((\d+)\)", run.output)
    assert refused and int(refused.group(1)) == int(refused.group(2)) > 0, failure_text(run)
    progress = requests.get(f"http://127.0.0.1:{mongosync_api}/api/v1/progress", timeout=5).json()["progress"]
    assert progress["state"] == "RUNNING"  # never committed


def test_mongosync_with_source_write_blocking_keeps_every_acknowledged_write(airflow_home, source,  # noqa: F811
                                                                             target):
    """mongosync 1.22 started with --enableUserWriteBlocking sourceAndDestination blocks the source at /commit
    (through the proxy that implements setUserWriteBlockMode); cutover=auto; the writer writes until refused."""
    with source.client() as src:
        seed(src)
    with write_blocking_source(source) as source_uri:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "devtools.mongosync_server", "--port", str(port), "--cluster0", source_uri,
             "--cluster1", target.uri, "--version", "1.22", "--enableUserWriteBlocking", "sourceAndDestination"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            line = proc.stdout.readline()
            assert "listening on" in line, line
            writer = Writer(source_uri, pause=0.05)
            writer.start()
            env = {**conns(source_uri, target.uri), **FAST_POKES,
                   conn_env_name("mongosync_api"): json.dumps({
                       "conn_type": "mongosync", "host": "127.0.0.1", "port": port, "schema": "http",
                       "extra": {"version": "1.22", "write_blocking": "sourceAndDestination"}})}
            conf = {"strategy": "live_pull", "pull_engine": "mongosync", "cutover": "auto",
                    "source_write_block": "require", "max_cutover_lag_seconds": 5, "quiet_period_seconds": 2}
            run = airflow_home.dags_test(DAG_ID, conf, env=env)
            counts = writer.stop()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    assert run.succeeded, failure_text(run)
    assert all(counts.values()) and writer.refused == 1, (counts, writer.refused)
    with source.client() as src, target.client() as dst:
        assert_namespaces_identical(src, dst, user_namespaces(src))

