"""mongosync: the hook, filters and commit decisions, the trigger, and the local mongosync server.

Pure tests cover the pattern-to-filter conversion (including a brute-force check that the filters select
exactly what ``NamespaceFilter`` selects), commit decisions and the trigger's serialisation. Contract tests
run ``devtools.mongosync_server`` in-thread between the real ``source`` and ``target`` servers: the data
really moves (the live-sync engine), so every test ends by comparing the two deployments or by checking
the refusal mongosync gives, with its error name, through the hook.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from airflow.sdk.exceptions import TaskDeferred
from pymongo.uri_parser import parse_uri

from atlas_migration.engines.live import LiveSync
from atlas_migration.errors import ConfigurationError, MigrationError
from atlas_migration.mongosync import (
    COMMITTED,
    DEFAULT_BASE_URL,
    PAUSED,
    RUNNING,
    MongosyncError,
    MongosyncHook,
    MongosyncProgress,
    RetryPolicy,
    commit_decision,
    namespace_filters,
)
from atlas_migration.namespaces import NamespaceFilter
from atlas_migration.triggers_mongosync import (
    CLASSPATH,
    FAIL,
    MET,
    WAIT,
    MongosyncProgressTrigger,
    MongosyncWaitOperator,
    evaluate,
)
from devtools.mongosync_server import (
    ERR_COMMIT_NOT_READY,
    ERR_INVALID_REQUEST,
    ERR_INVALID_STATE,
    ERR_NOT_REVERSIBLE,
    MongosyncServer,
    Settings,
    filter_matches,
    parse_start,
    version_problem,
)
from tests.helpers import assert_namespaces_identical

ROOT = Path(__file__).resolve().parent.parent
FAST_RETRY = RetryPolicy(max_retries=3, backoff_base=0.01, backoff_max=0.02)
# Small partitions and short rounds: several partitions per collection (pause/resume lands between
# them) and a change-stream round short enough that pause and commit take effect at once.
FAST = {"partition_docs": 150, "batch_size": 100, "round_seconds": 0.2, "max_await_ms": 100,
        "lag_probe_seconds": 1.0}


def progress_of(state: str = RUNNING, *, can_commit: bool = True, lag: float | None = 2, info: str | None = None,
                can_write: bool = False) -> MongosyncProgress:
    info = info or ("commit completed" if state == COMMITTED else "change event application")
    return MongosyncProgress.from_reply({"success": True, "progress": {
        "state": state, "canCommit": can_commit, "canWrite": can_write, "info": info, "lagTimeSeconds": lag,
        "collectionCopy": {"estimatedTotalBytes": 100, "estimatedCopiedBytes": 100}}})


# --------------------------------------------------------------------------------------------------
# Pure: patterns -> filters
# --------------------------------------------------------------------------------------------------

INTERNAL_EXCLUDE = {"databaseRegex": {"pattern": "^__atlas_migration", "options": ""}}


def test_filters_for_common_patterns() -> None:
    filters = namespace_filters(["sales.orders", "sales.customers", "hr.*", "logs.app_*"], ["hr.tmp"])
    assert filters.include_namespaces == [
        {"database": "sales", "collections": ["orders", "customers"]},
        {"database": "hr"},
        {"database": "logs", "collectionsRegex": {"pattern": "^app_.*$", "options": "s"}},
    ]
    assert filters.exclude_namespaces == [{"database": "hr", "collections": ["tmp"]}, INTERNAL_EXCLUDE]
    assert filters.start_fields() == {"includeNamespaces": filters.include_namespaces,
                                      "excludeNamespaces": filters.exclude_namespaces}


def test_filters_for_everything_and_escapes() -> None:
    for include in (None, [], ["*"], ["*.*"], ["sales.orders", "*"]):
        assert namespace_filters(include).include_namespaces == [], include
    # "*.orders" also matches "db.archive.orders" (a star spans dots), hence the regex alternative.
    star_db = namespace_filters(["*.orders"]).include_namespaces
    assert star_db == [{"databaseRegex": {"pattern": "^.*$", "options": "s"},
                        "collectionsRegex": {"pattern": "(?:^orders$)|(?:^.*\\.orders$)", "options": "s"}}]
    # \* is a literal star; regex metacharacters of names are escaped.
    literal = namespace_filters([r"db.a\*b", "db.x+y*"]).include_namespaces
    assert literal == [{"database": "db", "collectionsRegex": {
        "pattern": "(?:^a\\*b$)|(?:^x\\+y.*$)", "options": "s"}}]


def test_filters_select_exactly_what_namespace_filter_selects() -> None:
    """Every pattern over a small alphabet, random include/exclude pairs, every namespace over it."""
    patterns = sorted({"".join(t) for n in range(3, 6) for t in itertools.product("ab.*", repeat=n)
                       if "." in "".join(t) and all("".join(t).partition("."))})
    namespaces = [(db, coll) for db in ("a", "b", "ab", "ba", "aab")
                  for coll in ("a", "b", "ab", "a.b", "b.a", "a.a.b", "ba.b", "system.a")]
    rng = random.Random(7)
    checked = 0
    for _ in range(1500):
        include, exclude = rng.sample(patterns, rng.randint(0, 2)), rng.sample(patterns, rng.randint(0, 1))
        try:
            filters = namespace_filters(include, exclude)
        except ConfigurationError:
            continue  # refusals are tested on their own
        reference = NamespaceFilter.from_patterns(include, exclude)
        for db, coll in namespaces:
            selected = (not coll.startswith("system.")
                        and (not filters.include_namespaces
                             or any(filter_matches(f, db, coll) for f in filters.include_namespaces))
                        and not any(filter_matches(f, db, coll) for f in filters.exclude_namespaces))
            assert selected == reference.matches(db, coll), (include, exclude, db, coll, filters)
            checked += 1
    assert checked > 10_000


def test_filters_refuse_what_mongosync_cannot_express() -> None:
    for include in (["admin.*"], ["local.oplog.rs"], ["config.system.sessions"], ["sales.system.views"],
                    ["__atlas_migration_state.x"]):
        with pytest.raises(ConfigurationError, match="cannot be expressed for mongosync"):
            namespace_filters(include)
    for exclude in (["*"], ["*.*"]):
        with pytest.raises(ConfigurationError, match="excludes every namespace"):
            namespace_filters(None, exclude)
    with pytest.raises(ConfigurationError, match="<database>.<collection>"):
        namespace_filters(["nodot"])
    # Excluding something never migrated anyway is harmless and left out of the filter.
    assert namespace_filters(None, ["admin.*"]).exclude_namespaces == [INTERNAL_EXCLUDE]


def test_converted_filters_pass_the_servers_validation() -> None:
    filters = namespace_filters(["sales.*", "*.orders", "hr.emp*"], ["sales.tmp*"])
    options = parse_start({"source": "cluster0", "destination": "cluster1", **filters.start_fields()})
    assert list(options.include) == filters.include_namespaces
    assert list(options.exclude) == filters.exclude_namespaces


# --------------------------------------------------------------------------------------------------
# Pure: commit decisions, trigger conditions, serialisation, hook configuration
# --------------------------------------------------------------------------------------------------


def test_commit_decision() -> None:
    assert commit_decision(progress_of(lag=3), 5).commit
    too_far = commit_decision(progress_of(lag=12), 5)
    assert not too_far.commit and "12 s is above the 5 s threshold" in too_far.reason
    copying = commit_decision(progress_of(can_commit=False, lag=None, info="collection copy"), 5)
    assert not copying.commit and "initial collection copy" in copying.reason
    lagging = commit_decision(progress_of(can_commit=False, lag=45), 60)
    assert not lagging.commit and "above mongosync's 30 s limit" in lagging.reason
    paused = commit_decision(progress_of(PAUSED, can_commit=False), 5)
    assert not paused.commit and "only allowed while RUNNING" in paused.reason
    done = commit_decision(progress_of(COMMITTED, can_commit=False, lag=0), 5)
    assert not done.commit and done.already_committed
    assert commit_decision({"progress": {"state": "RUNNING", "canCommit": True, "lagTimeSeconds": 0}}, 0).commit
    with pytest.raises(ConfigurationError):
        commit_decision(progress_of(), -1)


def test_trigger_conditions() -> None:
    assert evaluate(progress_of(lag=1), "can_commit", 5)[0] == MET
    assert evaluate(progress_of(lag=9), "can_commit", 5)[0] == WAIT
    assert evaluate(progress_of(COMMITTED, can_commit=False, lag=0, can_write=True), "can_commit", 5)[0] == MET
    assert evaluate(progress_of("IDLE", can_commit=False, lag=None), "can_commit", 5)[0] == FAIL
    assert evaluate(progress_of(lag=0), "committed", 5)[0] == WAIT
    assert evaluate(progress_of(COMMITTED, can_commit=False, lag=0, can_write=True), "committed", 5)[0] == MET
    with pytest.raises(ConfigurationError):
        evaluate(progress_of(), "soon", 5)


def test_trigger_serialize_round_trip() -> None:
    trigger = MongosyncProgressTrigger("mongosync-host:27182", until="committed", max_lag_seconds=3,
                                       poll_interval=2, timeout_seconds=60)
    classpath, kwargs = trigger.serialize()
    assert classpath == CLASSPATH == f"{MongosyncProgressTrigger.__module__}.{MongosyncProgressTrigger.__name__}"
    assert kwargs["base_url"] == "http://mongosync-host:27182/api/v1"
    assert json.loads(json.dumps(kwargs)) == kwargs  # plain JSON, as the triggerer stores it
    assert MongosyncProgressTrigger(**kwargs).serialize() == (classpath, kwargs)
    with pytest.raises(ConfigurationError, match="must not carry credentials"):
        MongosyncProgressTrigger("http://admin:s3cret@mongosync-host:27182")
    with pytest.raises(ConfigurationError):
        MongosyncProgressTrigger("http://h:1", until="whenever")


def test_hook_configuration(monkeypatch) -> None:
    assert MongosyncHook(None).base_url == DEFAULT_BASE_URL
    assert MongosyncHook(base_url="http://10.0.0.5:9000").base_url == "http://10.0.0.5:9000/api/v1"
    monkeypatch.setenv("AIRFLOW_CONN_MONGOSYNC_A", json.dumps(
        {"conn_type": "mongosync", "host": "sync.internal", "port": 27999, "schema": "https"}))
    assert MongosyncHook("mongosync_a").base_url == "https://sync.internal:27999/api/v1"
    monkeypatch.setenv("AIRFLOW_CONN_MONGOSYNC_B", json.dumps(
        {"conn_type": "http", "host": "https://proxy.internal/mongosync", "port": 8443}))
    assert MongosyncHook("mongosync_b").base_url == "https://proxy.internal:8443/mongosync/api/v1"
    monkeypatch.setenv("AIRFLOW_CONN_MONGOSYNC_C", json.dumps({"conn_type": "mongo", "host": "x"}))
    with pytest.raises(ConfigurationError, match="needs 'mongosync'"):
        _ = MongosyncHook("mongosync_c").base_url
    with pytest.raises(ConfigurationError, match="is not defined"):
        _ = MongosyncHook("mongosync_missing").base_url
    body = MongosyncHook.start_body(reversible=True, verification_enabled=False, build_indexes="beforeDataCopy")
    assert body == {"source": "cluster0", "destination": "cluster1", "buildIndexes": "beforeDataCopy",
                    "reversible": True, "enableUserWriteBlocking": "sourceAndDestination",
                    "verification": {"enabled": False}}
    with pytest.raises(ConfigurationError, match="buildIndexes"):
        MongosyncHook.start_body(build_indexes="sometimes")


def test_supported_versions() -> None:
    assert version_problem("8.2.11", "source") is None and version_problem("7.0.18", "source") is None
    assert "7.0.18 or later" in version_problem("7.0.17", "source")
    assert "4.4.29+" in version_problem("4.2.24", "source")
    assert version_problem("6.0.0", "destination") is None
    assert "6.0 or later" in version_problem("5.0.31", "destination")


# --------------------------------------------------------------------------------------------------
# Contract: the hook and the trigger against the local mongosync, with real data movement
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def server(source, target) -> Iterator[MongosyncServer]:
    with MongosyncServer(source.uri, target.uri, settings=Settings(**FAST)) as srv:
        srv.wait_for_state("IDLE", timeout=30)
        yield srv


def hook_for(server: MongosyncServer) -> MongosyncHook:
    hook = MongosyncHook(None, base_url=server.api_url, timeout=10, retry=FAST_RETRY)
    hook.sleep = lambda _s: None
    return hook


def seed(source, docs: int = 400) -> list[tuple[str, str]]:
    """shop.orders (secondary + unique index), shop.customers, shop.skip (excluded), other.audit (not included)."""
    with source.client() as client:
        shop = client.shop
        shop.orders.insert_many([{"_id": i, "sku": f"sku-{i % 37}", "ref": f"r{i}", "qty": i % 9} for i in range(docs)])
        shop.orders.create_index("sku")
        shop.orders.create_index("ref", unique=True)
        shop.customers.insert_many([{"name": f"c{i}", "tier": i % 3} for i in range(docs // 2)])
        shop.skip.insert_one({"x": 1})
        client.other.audit.insert_one({"y": 1})
    return [("shop", "customers"), ("shop", "orders")]


class Writer:
    """Inserts, updates and deletes on shop.orders from a thread until stopped (the application)."""

    def __init__(self, source) -> None:
        self.client = source.client()
        self.stop_event = threading.Event()
        self.writes = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        orders = self.client.shop.orders
        i = 100_000
        while not self.stop_event.is_set():
            orders.insert_one({"_id": i, "sku": "new", "ref": f"w{i}", "qty": 1})
            orders.update_one({"_id": i - 100_000}, {"$inc": {"qty": 100}})
            if i % 5 == 0:
                orders.delete_one({"_id": i - 100_000 + 1})
            i += 1
            self.writes += 1
            time.sleep(0.005)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.client.close()


async def first_event(trigger: MongosyncProgressTrigger, timeout: float) -> dict:
    events = trigger.run()
    try:
        event = await asyncio.wait_for(anext(events), timeout)
    finally:
        await events.aclose()
    return event.payload


def wait_event(server: MongosyncServer, until: str, timeout: float = 60, **kwargs) -> dict:
    trigger = MongosyncProgressTrigger(server.api_url, until=until, poll_interval=0.1, timeout_seconds=timeout,
                                       **kwargs)
    return asyncio.run(first_event(trigger, timeout + 10))


CONTRACT_PROGRESS_FIELDS = {"state", "canCommit", "canWrite", "info", "lagTimeSeconds", "lag", "collectionCopy",
                            "directionMapping", "source", "destination", "verification", "warnings"}


def test_sync_with_a_writer_then_commit(server, source, target) -> None:
    namespaces = seed(source)
    hook = hook_for(server)
    filters = namespace_filters(["shop.*"], ["shop.skip"])
    with Writer(source) as writer:
        hook.start(include_namespaces=filters.include_namespaces, exclude_namespaces=filters.exclude_namespaces)
        raw = requests.get(server.api_url + "/progress", timeout=5).json()
        assert raw["success"] is True and CONTRACT_PROGRESS_FIELDS <= set(raw["progress"])
        assert raw["progress"]["state"] == RUNNING and raw["progress"]["canWrite"] is False
        hosts = ",".join(f"{h}:{p}" for h, p in parse_uri(source.uri)["nodelist"])
        assert raw["progress"]["directionMapping"]["Source"] == f"cluster0: {hosts}"

        ready = wait_event(server, "can_commit", max_lag_seconds=5)
        assert ready["status"] == "success", ready
        assert ready["progress"]["canCommit"] and ready["progress"]["info"] == "change event application"
        time.sleep(0.5)  # writes keep flowing through change event application
        writer.stop()
    assert writer.writes > 50
    decision = commit_decision(hook.progress(), max_lag_seconds=5)
    assert decision.commit, decision.reason
    hook.commit()
    assert hook.progress().state in ("COMMITTING", COMMITTED)
    done = wait_event(server, "committed")
    assert done["status"] == "success" and done["progress"]["canWrite"] is True
    final = hook.progress()
    assert (final.state, final.info, final.lag_time_seconds) == (COMMITTED, "commit completed", 0)
    assert final.estimated_copied_bytes and final.estimated_copied_bytes >= final.estimated_total_bytes * 0.9
    assert final.raw["verification"]["destination"]["phase"] == "completed"

    with source.client() as src, target.client() as dst:
        assert assert_namespaces_identical(src, dst, namespaces) > 400
        assert "skip" not in dst.shop.list_collection_names()
        assert "other" not in dst.list_database_names()
    with pytest.raises(MongosyncError) as refused:
        hook.commit()
    assert refused.value.error == ERR_INVALID_STATE and "COMMITTED" in refused.value.error_description


class UnhurriedLiveSync(LiveSync):
    """The real engine, resting after each partition so that a pause lands in the middle of the copy."""

    def copy_partition(self, partition):
        result = super().copy_partition(partition)
        time.sleep(0.15)
        return result


def test_pause_and_resume_from_checkpoints(source, target) -> None:
    namespaces = seed(source, docs=900)  # about a dozen partitions of 150 documents
    with MongosyncServer(source.uri, target.uri, settings=Settings(**FAST), engine_factory=UnhurriedLiveSync) as server, \
            Writer(source) as writer:
        server.wait_for_state("IDLE", timeout=30)
        hook = hook_for(server)
        hook.start()
        deadline = time.monotonic() + 20
        while server.state()["partitions"]["copied"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        hook.pause()
        assert hook.progress().state == PAUSED
        snapshot = server.state()
        assert 2 <= snapshot["partitions"]["copied"] < snapshot["partitions"]["total"], snapshot
        with target.client() as dst:
            before, writes = dst.shop.orders.count_documents({}), writer.writes
            time.sleep(0.6)  # the writer keeps writing to the source; a paused sync moves nothing
            after = dst.shop.orders.count_documents({})
        assert before == after and writer.writes > writes
        with pytest.raises(MongosyncError) as again:
            hook.pause()
        assert again.value.error == ERR_INVALID_STATE
        hook.resume()
        assert hook.progress().state == RUNNING
        with pytest.raises(MongosyncError) as resumed:
            hook.resume()
        assert resumed.value.error == ERR_INVALID_STATE and "PAUSED" in resumed.value.error_description
        assert wait_event(server, "can_commit", max_lag_seconds=5)["status"] == "success"
        resumed = server.state()
        # The resumed engine found the partitions copied before the pause done (its checkpoints) and kept them.
        assert resumed["partitions"]["skippedAsCopied"] >= snapshot["partitions"]["copied"]
        assert resumed["copiedDocuments"] >= 1350
        hook.pause()  # a pause in change event application resumes from the saved resume token
        time.sleep(0.3)
        hook.resume()
        assert wait_event(server, "can_commit", max_lag_seconds=5)["status"] == "success"
        writer.stop()
        hook.commit()
        assert wait_event(server, "committed")["status"] == "success"
    with source.client() as src, target.client() as dst:
        assert assert_namespaces_identical(src, dst, [*namespaces, ("shop", "skip"), ("other", "audit")]) > 1300


def test_commit_refused_while_lagging_and_the_operator_defers(server, source, target, monkeypatch) -> None:
    seed(source, docs=100)
    hook = hook_for(server)
    hook.start()
    assert wait_event(server, "can_commit", max_lag_seconds=5)["status"] == "success"
    knob = requests.post(server.url + "/__test__/lag", json={"seconds": 45}, timeout=5)
    assert knob.json() == {"forced_lag_seconds": 45}
    lagging = hook.progress()
    assert (lagging.can_commit, lagging.lag_time_seconds) == (False, 45)
    assert lagging.raw["lag"] == {"overallLagSeconds": 45, "crudLagSeconds": 45, "ddlLagSeconds": 45}
    with pytest.raises(MongosyncError) as refused:
        hook.commit()
    assert refused.value.error == ERR_COMMIT_NOT_READY
    assert "canCommit is false" in refused.value.error_description and "45" in refused.value.error_description
    assert "CommitNotReady" in str(refused.value)

    monkeypatch.setenv("AIRFLOW_CONN_MONGOSYNC_LOCAL", json.dumps(
        {"conn_type": "mongosync", "host": "127.0.0.1", "port": server.port, "schema": "http"}))
    operator = MongosyncWaitOperator(task_id="wait_for_commit", mongosync_conn_id="mongosync_local",
                                     max_lag_seconds=5, poll_interval=0.1, wait_timeout_seconds=30)
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute({})
    classpath, kwargs = deferred.value.trigger.serialize()
    assert classpath == CLASSPATH and kwargs["base_url"] == server.api_url and kwargs["until"] == "can_commit"
    timed_out = asyncio.run(first_event(MongosyncProgressTrigger(**{**kwargs, "timeout_seconds": 0.3}), 10))
    assert timed_out["status"] == "timeout"
    with pytest.raises(MigrationError, match="not reached"):
        operator.execute_complete({}, timed_out)

    server.force_lag(None)
    event = asyncio.run(first_event(deferred.value.trigger, 30))
    assert event["status"] == "success" and operator.execute_complete({}, event)["canCommit"] is True
    assert operator.execute({})["canCommit"] is True  # already met: no deferral
    hook.commit()
    assert wait_event(server, "committed")["status"] == "success"


def test_refusals_in_the_wrong_state(source, target) -> None:
    settings = Settings(**FAST, initializing_seconds=1.0)
    with MongosyncServer(source.uri, target.uri, settings=settings) as server:
        hook = hook_for(server)
        assert hook.progress().state == "INITIALIZING"
        with pytest.raises(MongosyncError) as early:
            hook.start()
        assert early.value.error == ERR_INVALID_STATE and "INITIALIZING" in early.value.error_description
        server.wait_for_state("IDLE", timeout=30)
        idle = hook.progress()
        assert (idle.state, idle.can_commit, idle.can_write, idle.info) == ("IDLE", False, False, None)
        for call, allowed in ((hook.pause, "RUNNING"), (hook.resume, "PAUSED"), (hook.commit, "RUNNING"),
                              (hook.reverse, "COMMITTED")):
            with pytest.raises(MongosyncError) as refused:
                call()
            assert refused.value.error == ERR_INVALID_STATE, call
            assert f"only allowed in the {allowed} state" in refused.value.error_description
        hook.start()
        with pytest.raises(MongosyncError) as twice:
            hook.start()
        assert twice.value.error == ERR_INVALID_STATE and "RUNNING" in twice.value.error_description
        assert [r["error"] for r in server.requests("/start")] == [ERR_INVALID_STATE, None, ERR_INVALID_STATE]


def test_a_standalone_cluster_is_refused(standalone, target) -> None:
    with MongosyncServer(standalone.uri, target.uri, settings=Settings(**FAST)) as server:
        hook = hook_for(server)
        deadline = time.monotonic() + 20
        while server.state()["fatal"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(MongosyncError) as refused:
            hook.progress()
        assert refused.value.error == "UnsupportedClusterType" and "standalone" in refused.value.error_description
        with pytest.raises(MongosyncError) as no_start:
            hook.start()
        assert no_start.value.error == "UnsupportedClusterType"


def test_bad_bodies_are_refused_with_a_description(server) -> None:
    hook = hook_for(server)
    cases = [
        ({"source": "cluster0", "destination": "cluster1", "includeNamespace": []}, "unknown /start parameter"),
        ({"destination": "cluster1"}, "source and destination are required"),
        ({"source": "cluster0", "destination": "cluster0"}, "one each"),
        ({"source": "cluster0", "destination": "cluster1", "buildIndexes": "sometimes"}, "buildIndexes must be"),
        ({"source": "cluster0", "destination": "cluster1", "reversible": True,
          "enableUserWriteBlocking": "sourceAndDestination", "buildIndexes": "never"}, "buildIndexes is \"never\""),
        ({"source": "cluster0", "destination": "cluster1", "reversible": True}, "enableUserWriteBlocking"),
        ({"source": "cluster0", "destination": "cluster1",
          "includeNamespaces": [{"database": "a", "databaseRegex": {"pattern": "b"}}]}, "exactly one of"),
        ({"source": "cluster0", "destination": "cluster1",
          "includeNamespaces": [{"database": "a", "collectionsRegex": {"pattern": "(", "options": ""}}]},
         "not a valid regular expression"),
        ({"source": "cluster0", "destination": "cluster1", "excludeNamespaces": [{"database": "admin"}]},
         "does not sync system databases"),
        ({"source": "cluster0", "destination": "cluster1", "verification": {"enabled": "yes"}}, "verification must"),
    ]
    for body, message in cases:
        response = requests.post(server.api_url + "/start", json=body, timeout=5)
        payload = response.json()
        assert (response.status_code, payload["success"], payload["error"]) == (400, False, ERR_INVALID_REQUEST), body
        assert message in payload["errorDescription"], (body, payload)
    with pytest.raises(MongosyncError) as via_hook:
        hook.start(reversible=True, build_indexes="never")
    assert via_hook.value.error == ERR_INVALID_REQUEST and via_hook.value.error_description in str(via_hook.value)
    assert "buildIndexes is \"never\"" in via_hook.value.error_description
    assert requests.post(server.api_url + "/pause", data=b"", timeout=5).json()["errorDescription"].startswith(
        "the request body must be a JSON object")
    assert requests.post(server.api_url + "/pause", json={"now": True}, timeout=5).json()["error"] == ERR_INVALID_REQUEST
    missing = requests.post(server.api_url + "/stop", json={}, timeout=5)
    assert (missing.status_code, missing.json()["error"]) == (404, "NotFound")
    wrong = requests.get(server.api_url + "/start", timeout=5)
    assert (wrong.status_code, wrong.json()["error"]) == (405, "MethodNotAllowed")
    assert hook.progress().state == "IDLE"  # nothing above changed the state


def test_reverse_needs_a_reversible_start(server, source, target) -> None:
    seed(source, docs=100)
    hook = hook_for(server)
    hook.start()
    assert wait_event(server, "can_commit", max_lag_seconds=5)["status"] == "success"
    hook.commit()
    assert wait_event(server, "committed")["status"] == "success"
    with pytest.raises(MongosyncError) as refused:
        hook.reverse()
    assert refused.value.error == ERR_NOT_REVERSIBLE and "reversible" in refused.value.error_description
    assert hook.progress().state == COMMITTED


def test_reversible_sync_runs_back(server, source, target) -> None:
    namespaces = seed(source, docs=200)
    hook = hook_for(server)
    hook.start(reversible=True)
    assert wait_event(server, "can_commit", max_lag_seconds=5)["status"] == "success"
    hook.commit()
    assert wait_event(server, "committed")["status"] == "success"
    with target.client() as dst:  # the application now writes to the destination
        dst.shop.orders.insert_one({"_id": -1, "sku": "after-commit", "ref": "ac", "qty": 1})
    hook.reverse()
    reversed_progress = hook.progress()
    assert reversed_progress.state in ("REVERSING", RUNNING)
    assert reversed_progress.raw["directionMapping"]["Source"].startswith("cluster1: ")
    assert wait_event(server, "can_commit", max_lag_seconds=5)["status"] == "success"
    with target.client() as dst:
        dst.shop.customers.delete_many({"tier": 0})
    hook.commit()
    assert wait_event(server, "committed")["status"] == "success"
    with source.client() as src, target.client() as dst:
        assert assert_namespaces_identical(dst, src, namespaces) > 200
        assert src.shop.orders.find_one({"_id": -1})["sku"] == "after-commit"


def test_a_failed_sync_is_reported_everywhere(server, source, target) -> None:
    seed(source, docs=100)
    hook = hook_for(server)
    hook.start()
    assert wait_event(server, "can_commit", max_lag_seconds=5)["status"] == "success"
    requests.post(server.url + "/__test__/fail", timeout=5,
                  json={"error": "SyncFailed", "errorDescription": "the destination ran out of disk space"})
    deadline = time.monotonic() + 10
    while server.state()["fatal"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(MongosyncError) as failed:
        hook.progress()
    assert (failed.value.error, failed.value.error_description) == ("SyncFailed",
                                                                    "the destination ran out of disk space")
    event = wait_event(server, "can_commit", timeout=5)
    assert (event["status"], event["error"]) == ("error", "SyncFailed")
    with pytest.raises(MongosyncError) as no_pause:
        hook.pause()
    assert no_pause.value.error == "SyncFailed" and "ran out of disk" in no_pause.value.error_description


def test_hook_retries_progress_only_when_mongosync_did_not_answer(server) -> None:
    hook = hook_for(server)
    server.add_fault("/progress", count=2, status=503, raw="<html>bad gateway</html>")
    assert hook.progress().state == "IDLE"  # two proxy errors, then mongosync's reply
    server.add_fault("/progress", count=1, status=500, error="InternalError", errorDescription="boom")
    with pytest.raises(MongosyncError) as answered:
        hook.progress()  # mongosync's own error reply is final: no retry
    assert answered.value.error == "InternalError" and [r["status"] for r in server.requests("/progress")][-1] == 500
    server.add_fault("/pause", count=1, status=503, raw="unavailable")
    with pytest.raises(MongosyncError, match="not mongosync's"):
        hook.pause()  # a POST is not repeated


def test_server_runs_as_a_process(source, target) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the module finds include/ itself
    process = subprocess.Popen(
        [sys.executable, "-m", "devtools.mongosync_server", "--port", "0", "--cluster0", source.uri,
         "--cluster1", target.uri], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        line = process.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:"), line
        hook = MongosyncHook(None, base_url=line.split()[-1], retry=FAST_RETRY)
        deadline = time.monotonic() + 30
        while hook.progress().state != "IDLE" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert hook.progress().state == "IDLE"
    finally:
        process.terminate()
        process.wait(10)
    assert process.returncode == 0
