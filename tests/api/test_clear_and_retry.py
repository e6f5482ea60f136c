"""After a crash mid-copy, "clear and retry the failed task within the same run" resumes the live pull from
its checkpoints: through a real api-server, scheduler and dag-processor, not only through engine calls.

The source sits behind a replica-set proxy (write blocking for the automatic cutover) that slows the copy's
reads, so the test can take the source away mid-copy: the copy task fails after its retries, the run fails,
the source comes back, and clearing the failed task (with its downstream tasks) through the REST API lets the
same run resume from the checkpoint and finish with a passing validation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from devtools.airflow_env import AirflowHome, conn_env_name, mongo_connection_json
from devtools.airflow_services import AirflowServices
from devtools.replica_set_proxy import ReplicaSetProxy
from tests.helpers import assert_namespaces_identical

pytestmark = pytest.mark.integration
DAG_ID = "mongo_to_atlas"
DOCS = 900


class SlowCopyProxy(ReplicaSetProxy):
    """Delays every ``find`` / ``getMore`` on ``shop.items`` so that the initial copy takes seconds."""

    def __init__(self, backend_port: int, delay: float, **kwargs) -> None:
        super().__init__(backend_port, **kwargs)
        self.delay = delay

    def handle_request(self, conn, request):
        import bson

        from devtools.wire_proxy import OP_MSG, OpMsg

        if self.delay and request.op_code == OP_MSG:
            body = bson.decode(OpMsg.parse(request.payload).body)
            if body.get("find") == "items" or (body.get("getMore") and body.get("collection") == "items"):
                time.sleep(self.delay)
        return super().handle_request(conn, request)


@pytest.fixture
def slow_source(source) -> Iterator[tuple[SlowCopyProxy, str]]:
    if source.local is None:
        pytest.skip("needs the local test server behind the proxy")
    proxy = SlowCopyProxy(source.local.port, delay=0.15).start()
    try:
        yield proxy, f"mongodb://{proxy.host}/?directConnection=true"
    finally:
        proxy.stop()


def _wait(what: str, check, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_clear_and_retry_resumes_a_killed_live_pull_copy(tmp_path_factory, source, target, slow_source):
    proxy, source_uri = slow_source
    with source.client() as src:
        src.shop.items.insert_many([{"_id": i, "v": "x" * 50} for i in range(DOCS)])
    env = {conn_env_name("mongo_source"): mongo_connection_json(source_uri),
           conn_env_name("atlas_target"): mongo_connection_json(target.uri),
           "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "1", "MIGRATION_POKE_INTERVAL_SECONDS": "1"}
    services = AirflowServices(AirflowHome(tmp_path_factory.mktemp("airflow-clear-home")), env=env)
    back: SlowCopyProxy | None = None
    try:
        services.start()
        services.wait_for_dag(DAG_ID)
        api, base = services.session(), f"{services.base_url}/api/v2/dags/{DAG_ID}"
        api.patch(base, json={"is_paused": False}, timeout=30).raise_for_status()
        conf = {"strategy": "live_pull", "pull_engine": "native", "cutover": "auto", "batch_size": 10,
                "partition_docs": 1_000, "quiet_period_seconds": 1, "validation_mode": "full"}
        created = api.post(f"{base}/dagRuns", json={"logical_date": None, "conf": conf}, timeout=30)
        created.raise_for_status()
        run = quote(created.json()["dag_run_id"], safe="")

        def run_state() -> str:
            return api.get(f"{base}/dagRuns/{run}", timeout=30).json()["state"]

        with target.client() as dst:
            state = dst["__atlas_migration"].live_sync

            def copied() -> int:
                doc = state.find_one({"kind": "partition"}) or {}
                return 0 if doc.get("done") else doc.get("documents", 0)

            # The source goes away mid-copy (as if killed): the copy fails after its retries, so does the run.
            _wait("the copy to be under way", lambda: copied() >= 100 or run_state() == "failed", 240)
            proxy.stop()
            _wait("the run to fail", lambda: run_state() == "failed", 240, interval=2)
            checkpoint = copied()
            assert 100 <= checkpoint < DOCS, checkpoint
            task = api.get(f"{base}/dagRuns/{run}/taskInstances/live_pull.copy/0", timeout=30).json()
            assert task["state"] == "failed" and task["try_number"] == 4, task  # its retries were used up

        # The source is back; clear the failed task (and what follows it) within the same run.
        back = SlowCopyProxy(source.local.port, delay=0, port=proxy.port).start()
        cleared = api.post(f"{base}/clearTaskInstances", timeout=30, json={
            "dry_run": False, "dag_run_id": created.json()["dag_run_id"], "task_ids": ["live_pull.copy"],
            "only_failed": True, "include_downstream": True, "reset_dag_runs": True})
        cleared.raise_for_status()
        _wait("the cleared run to finish", lambda: run_state() in ("success", "failed"), 420, interval=2)
        assert run_state() == "success", services.logs_tail()
        xcom = api.get(f"{base}/dagRuns/{run}/taskInstances/live_pull.copy/xcomEntries/return_value",
                       params={"map_index": 0}, timeout=30).json()
        value = xcom["value"] if isinstance(xcom["value"], list) else json.loads(xcom["value"])
        [result] = value  # one partition per mapped copy task (batches only beyond max_map_length)
        assert result["resumed_from"] is not None, result  # resumed after the checkpoint, not from scratch
    finally:
        survivors = services.stop()
        if back is not None:
            back.stop()
    assert not survivors, f"processes outlived AirflowServices.stop(): {survivors}"
    with source.client() as src, target.client() as dst:
        assert_namespaces_identical(src, dst, [("shop", "items")])
