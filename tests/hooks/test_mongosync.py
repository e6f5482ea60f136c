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
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from airflow.sdk.exceptions import TaskDeferred
from pymongo.uri_parser import parse_uri

from atlas_migration.engines.live import LiveSync
from atlas_migration.engines.mongosync import (
    CutoverRefused,
    MongosyncVersion,
    check_after_commit,
    commit_decision,
    commit_with_fence,
    decide_start,
    infer_version,
    late_write_selector,
    namespace_filters,
    plan_write_blocking,
    resolve_version,
)
from atlas_migration.errors import ConfigurationError, MigrationError
from atlas_migration.fence import LateWrites
from atlas_migration.hooks.mongosync import (
    COMMITTED,
    DEFAULT_BASE_URL,
    PAUSED,
    RUNNING,
    MongosyncError,
    MongosyncHook,
    MongosyncProgress,
    RetryPolicy,
)
from atlas_migration.namespaces import NamespaceFilter
from atlas_migration.triggers.mongosync import (
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
    ERR_WRITE_BLOCKING_UNSUPPORTED,
    VERSIONS,
    MongosyncServer,
    Refusal,
    Settings,
    filter_matches,
    parse_start,
    version_problem,
)
from tests.helpers import assert_namespaces_identical

ROOT = Path(__file__).resolve().parents[2]
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
    # 1.19 dropped 4.4 sources and 6.0 destinations (every release imitated here is 1.19+).
    assert "supports sources from 5.0" in version_problem("4.4.29", "source", "1.19")
    assert version_problem("7.0.0", "destination") is None
    assert "7.0 or later" in version_problem("6.0.20", "destination", "1.22")


# --------------------------------------------------------------------------------------------------
# Pure: versions, write blocking, progress across versions
# --------------------------------------------------------------------------------------------------

PROGRESS_1_18 = {"state": RUNNING, "canCommit": True, "canWrite": False, "info": "change event application",
                 "lagTimeSeconds": 4, "collectionCopy": {"estimatedTotalBytes": 10, "estimatedCopiedBytes": 10}}
PROGRESS_1_19 = {**PROGRESS_1_18, "estimatedOplogTimeRemaining": "5h0m0s", "warnings": ["oplog is small"]}
PROGRESS_1_21 = {**PROGRESS_1_19, "lagTimeSeconds": 40,
                 "lag": {"overallLagSeconds": 3, "crudLagSeconds": 3, "ddlLagSeconds": 1}}
PROGRESS_1_22 = {**PROGRESS_1_21, "ceaStage": "applying new events"}


def test_progress_parsing_across_versions() -> None:
    old, v19, v21, v22 = (MongosyncProgress.from_reply({"success": True, "progress": body})
                          for body in (PROGRESS_1_18, PROGRESS_1_19, PROGRESS_1_21, PROGRESS_1_22))
    assert (old.lag_time_seconds, old.warnings, old.estimated_oplog_time_remaining) == (4.0, (), None)
    assert (v19.lag_time_seconds, v19.warnings, v19.estimated_oplog_time_remaining) == (4.0, ("oplog is small",),
                                                                                       "5h0m0s")
    # 1.21+: lag.overallLagSeconds wins over the deprecated lagTimeSeconds.
    assert v21.lag_time_seconds == 3.0 and commit_decision(v21, 5).commit
    assert v22.cea_stage == "applying new events" and v21.cea_stage is None
    assert MongosyncProgress.from_reply({"progress": {"state": RUNNING, "lag": {"overallLagSeconds": None},
                                                      "lagTimeSeconds": 7}}).lag_time_seconds == 7.0
    no_lag = commit_decision({"progress": {"state": RUNNING, "canCommit": True}}, 5)
    assert not no_lag.commit and "no lag" in no_lag.reason
    assert v19.summary()["warnings"] == ["oplog is small"]


def test_version_inference_and_declaration() -> None:
    assert infer_version(PROGRESS_1_18) == MongosyncVersion(None, (1, 18), "inferred from /progress")
    assert (infer_version(PROGRESS_1_19).low, infer_version(PROGRESS_1_19).high) == ((1, 19), (1, 20))
    assert infer_version({**PROGRESS_1_19, "state": "INITIALIZING"}).low == (1, 20)
    assert infer_version(PROGRESS_1_21).low == (1, 21) and infer_version({"progress": PROGRESS_1_22}).low == (1, 22)
    assert infer_version(PROGRESS_1_19).at_least((1, 20)) is None  # 1.19 and 1.20 look alike
    assert resolve_version("1.20", PROGRESS_1_19).at_least((1, 20)) is True
    assert resolve_version("1.19.3", PROGRESS_1_19).at_least((1, 20)) is False
    with pytest.raises(ConfigurationError, match="declares version 1.19"):
        resolve_version("1.19", PROGRESS_1_21)  # the reply has 1.21's lag object
    with pytest.raises(ConfigurationError, match="must be a string"):
        resolve_version(1.2, PROGRESS_1_21)


def exact(version: str) -> MongosyncVersion:
    return resolve_version(version, {"state": "IDLE"} if version < "1.19" else PROGRESS_1_19
                           if version < "1.21" else PROGRESS_1_22)


def test_write_blocking_follows_the_version() -> None:
    def plan(version: MongosyncVersion | str, block: bool, mode: str = "auto", startup: str | None = None):
        version = exact(version) if isinstance(version, str) else version
        return plan_write_blocking(version, block=block, block_reason="why", mode=mode, startup=startup)

    # Up to 1.19 the /start field asks for dual blocking: strings from 1.12, true before (and when unknown).
    assert (plan("1.19", True).start_field, plan("1.19", True).source_blocked) == ("sourceAndDestination", True)
    assert plan("1.11", True).start_field is True
    assert plan(infer_version(PROGRESS_1_18), True).start_field is True
    assert (plan("1.19", False).start_field, plan("1.19", False).source_blocked) == (None, False)
    with pytest.raises(ConfigurationError, match="startup option from 1.20"):
        plan("1.19", True, startup="sourceAndDestination")
    # From 1.20 the field is never sent; the declared startup configuration decides.
    for version in ("1.20", "1.22"):
        declared = plan(version, True, "require", "sourceAndDestination")
        assert (declared.start_field, declared.source_blocked) == (None, True)
        with pytest.raises(ConfigurationError, match="source_write_block=require.*startup configuration"):
            plan(version, True, "require")
        fallback = plan(version, True, "auto", "destinationOnly")
        assert (fallback.start_field, fallback.source_blocked) == (None, False)
        with pytest.raises(ConfigurationError, match="blocks writes on the source at /commit"):
            plan(version, False, "off", "sourceAndDestination")
    # 1.19 or 1.20 cannot be told apart from /progress: only a declared release may enable blocking.
    with pytest.raises(ConfigurationError, match="declare the release"):
        plan(infer_version(PROGRESS_1_19), True)
    assert plan(infer_version(PROGRESS_1_19), False).start_field is None
    with pytest.raises(ConfigurationError, match="write_blocking extra"):
        plan("1.22", True, startup="both")

    # The /start body: the field only where the release takes it.
    body = MongosyncHook.start_body(reversible=False, write_blocking_in_start=False)
    assert "enableUserWriteBlocking" not in body
    assert "enableUserWriteBlocking" not in MongosyncHook.start_body(reversible=True, write_blocking_in_start=False)
    with pytest.raises(ConfigurationError, match="removed from /start in mongosync 1.20"):
        MongosyncHook.start_body(enable_user_write_blocking="sourceAndDestination", write_blocking_in_start=False)


def test_the_stand_in_takes_the_fields_of_its_version() -> None:
    body = {"source": "cluster0", "destination": "cluster1", "enableUserWriteBlocking": "sourceAndDestination"}
    assert parse_start(body, "1.19").write_blocking == "sourceAndDestination"
    assert parse_start({**body, "enableUserWriteBlocking": True}, "1.19").write_blocking == "sourceAndDestination"
    for version in ("1.20", "1.21", "1.22"):
        with pytest.raises(Refusal, match="removed in 1.20") as refused:
            parse_start(body, version)
        assert refused.value.error == ERR_INVALID_REQUEST
    plain = {"source": "cluster0", "destination": "cluster1"}
    assert parse_start(plain, "1.22").write_blocking == "destinationOnly"
    assert parse_start(plain, "1.20", "sourceAndDestination").write_blocking == "sourceAndDestination"
    assert parse_start({**plain, "skipDiskSpaceCheck": True}, "1.22")
    with pytest.raises(Refusal, match="unknown /start parameter.*skipDiskSpaceCheck"):
        parse_start({**plain, "skipDiskSpaceCheck": True}, "1.21")
    with pytest.raises(Refusal, match="startup configuration"):
        parse_start({**plain, "reversible": True}, "1.22")


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

    def wait_for_writes(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.writes < count and time.monotonic() < deadline:
            time.sleep(0.01)

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
        # Writes keep flowing through change event application: wait for 30 more (a count, not a sleep, so a
        # slow machine proves the same thing).
        at_ready = writer.writes
        writer.wait_for_writes(at_ready + 30, timeout=60)
        writer.stop()
    assert writer.writes >= at_ready + 30
    # As the DAG does (wait_can_commit): the last writes may have put the lag above the threshold again.
    assert wait_event(server, "can_commit", max_lag_seconds=5)["status"] == "success"
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
            # The writer keeps writing to the source (at least a few writes, however slow the server is);
            # a paused sync moves nothing.
            time.sleep(0.6)
            wait_until = time.monotonic() + 30
            while writer.writes < writes + 5 and time.monotonic() < wait_until:
                time.sleep(0.1)
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
        ({"source": "cluster0", "destination": "cluster1", "reversible": True, "buildIndexes": "never"},
         "buildIndexes is \"never\""),
        ({"source": "cluster0", "destination": "cluster1", "reversible": True}, "enableUserWriteBlocking"),
        ({"source": "cluster0", "destination": "cluster1", "enableUserWriteBlocking": "sourceAndDestination"},
         "removed in 1.20"),
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
        hook.start(reversible=True, build_indexes="never", write_blocking_in_start=False)
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


def test_dual_write_blocking_against_a_source_that_cannot_block_is_refused(source, target) -> None:
    """SecantusDB has no setUserWriteBlockMode: dual write blocking (needed by a reversible sync, and by a
    commit that blocks the source) is refused at /start, through the /start field (1.19) and through the
    startup configuration (1.20+), before anything is copied."""
    seed(source, docs=20)
    for version, write_blocking, extra in (("1.19", None, {"enableUserWriteBlocking": "sourceAndDestination"}),
                                           ("1.22", "sourceAndDestination", {})):
        with MongosyncServer(source.uri, target.uri, settings=Settings(**FAST), version=version,
                             write_blocking=write_blocking) as srv:
            srv.wait_for_state("IDLE", timeout=30)
            hook = hook_for(srv)
            for body in ({**extra}, {**extra, "reversible": True}):
                with pytest.raises(MongosyncError) as refused:
                    hook._call("POST", "/start", {"source": "cluster0", "destination": "cluster1", **body})
                assert refused.value.error == ERR_WRITE_BLOCKING_UNSUPPORTED
                assert "no setUserWriteBlockMode command" in refused.value.error_description
            assert hook.progress().state == "IDLE" and srv.state()["workerAlive"] is False
    with target.client() as dst:
        assert "shop" not in dst.list_database_names()


def test_progress_fields_follow_the_version(source, target) -> None:
    for version in VERSIONS:
        with MongosyncServer(source.uri, target.uri, settings=Settings(**FAST), version=version) as srv:
            srv.wait_for_state("IDLE", timeout=30)
            body = requests.get(srv.api_url + "/progress", timeout=5).json()["progress"]
            low = infer_version(body).low
            assert ("warnings" in body, "lag" in body, "ceaStage" in body) == (True, version >= "1.21",
                                                                               version >= "1.22"), version
            assert low == (1, {"1.19": 19, "1.20": 19, "1.21": 21, "1.22": 22}[version]), (version, low)
            assert resolve_version(version, body).at_least((1, 20)) is (version >= "1.20")
    with pytest.raises(ValueError, match="startup options from mongosync 1.20"):
        MongosyncServer(source.uri, target.uri, version="1.19", write_blocking="sourceAndDestination")


class TimedWriter(Writer):
    """The application: inserts into shop.orders and records each acknowledged write's op time."""

    def __init__(self, source) -> None:
        super().__init__(source)
        self.acked: list[tuple[int, object]] = []

    def _run(self) -> None:
        orders = self.client.shop.orders
        i = 200_000
        with self.client.start_session(causal_consistency=False) as session:
            while not self.stop_event.is_set():
                orders.insert_one({"_id": i, "sku": "late", "ref": f"t{i}", "qty": 1}, session=session)
                self.acked.append((i, session.operation_time))
                i += 1
                time.sleep(0.01)


def test_commit_stops_at_the_commit_point(server, source, target) -> None:
    """Without source write blocking, mongosync applies nothing after its commit point: a write the source
    acknowledges after /commit is NOT on the destination (the old stand-in drained until writes stopped and
    copied it). Verification is off: it would flag the difference that the real verifier does not."""
    seed(source, docs=100)
    hook = hook_for(server)
    hook.start(verification_enabled=False)
    assert wait_event(server, "can_commit", max_lag_seconds=5)["status"] == "success"
    with TimedWriter(source) as writer:
        # Writes acknowledged before /commit are before the commit point: wait for a few of them rather than
        # for a fixed time, which a loaded machine may spend on two writes (CI saw 2).
        deadline = time.monotonic() + 30
        while len(writer.acked) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        hook.commit()
        time.sleep(1.0)  # the application has not stopped: these writes come after the commit point
        assert wait_event(server, "committed")["status"] == "success"
        # The stand-in places its commit point when its current catch-up batch ends, so keep writing after
        # COMMITTED: these writes, too, come after the commit point and must not reach the destination.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            point = server.state()["commitPoint"]
            if point and sum(1 for _, ts in writer.acked if (ts.time, ts.inc) > tuple(point)) > 5:
                break
            time.sleep(0.2)
    point = server.state()["commitPoint"]
    assert point and server.state()["sourceWriteBlocked"] is False
    from bson import Timestamp

    commit_ts = Timestamp(*point)
    before = [i for i, ts in writer.acked if ts <= commit_ts]
    after = [i for i, ts in writer.acked if ts > commit_ts]
    assert len(before) > 5 and len(after) > 5, (len(before), len(after))
    with target.client() as dst:
        present = {d["_id"] for d in dst.shop.orders.find({"_id": {"$in": before + after}}, {"_id": 1})}
    assert set(before) <= present  # everything up to the commit point
    assert not present & set(after)  # nothing after it: lost, as with the real mongosync


class FakeHook:
    """The two calls commit_with_fence makes, recorded (the decisions, not HTTP, are under test here)."""

    def __init__(self, state: str = RUNNING) -> None:
        self.state = state
        self.commits = 0

    def progress(self) -> MongosyncProgress:
        return progress_of(self.state, can_commit=self.state == RUNNING, lag=1)

    def commit(self) -> None:
        self.commits += 1


def write_after_fence(kept: list, write: Callable[[], object]) -> Callable[[object], None]:
    """A ``keep`` callback that records each fence and, the first time, makes an application write: the write
    lands after the fence whatever the machine's load (a timer could fire before the fence is taken)."""
    pending = [write]

    def keep(fence: object) -> None:
        kept.append(fence)
        if pending:
            pending.pop()()

    return keep


def test_commit_decisions_behind_the_fence(source) -> None:
    selected = late_write_selector(NamespaceFilter.from_patterns(["shop.*"], []))
    kept: list = []
    with source.client() as client:
        client.shop.orders.insert_one({"_id": 1})
        # Without source write blocking and no write after the fence: /commit is sent.
        hook = FakeHook()
        result = commit_with_fence(hook, client, source_blocked=False, max_lag_seconds=5, quiet_seconds=1,
                                   selected=selected, keep=kept.append)
        assert hook.commits == 1 and result["fence"]["blocked"] is False and result["fence"]["late_writes"] == {}
        assert result["fence"]["how"] == "operator_statement" and kept[-1].op_time == result["fence"]["op_time"]
        # A write after the fence: refused, /commit NOT sent, the count and namespace in the error.
        # The application writes right after the fence is stored (keep runs then), however slow the machine.
        hook = FakeHook()
        with pytest.raises(CutoverRefused) as refused:
            commit_with_fence(hook, client, source_blocked=False, max_lag_seconds=5, quiet_seconds=1.5,
                              selected=selected,
                              keep=write_after_fence(kept, lambda: client.shop.orders.insert_many([{"_id": 2},
                                                                                                  {"_id": 3}])))
        assert isinstance(refused.value, LateWrites) and refused.value.late == {"shop.orders": 2}
        assert "2 application write(s)" in str(refused.value) and hook.commits == 0
        assert kept[-1].late_writes == {"shop.orders": 2}
        # A write elsewhere (not migrated) is not a late write.
        hook = FakeHook()
        commit_with_fence(hook, client, source_blocked=False, max_lag_seconds=5, quiet_seconds=1,
                          selected=selected, keep=write_after_fence(kept, lambda: client.other.audit.insert_one({"y": 2})))
        assert hook.commits == 1
        # With source write blocking mongosync blocks the source itself: commit at once, fence after it.
        hook = FakeHook()
        result = commit_with_fence(hook, client, source_blocked=True, max_lag_seconds=5, quiet_seconds=60,
                                   selected=selected, keep=kept.append)
        assert hook.commits == 1 and result["fence"]["blocked"] is True and result["fence"]["how"] == "write_block"
        # A retried task after the commit: nothing sent again.
        hook = FakeHook(COMMITTED)
        assert commit_with_fence(hook, client, source_blocked=False, max_lag_seconds=5, quiet_seconds=1,
                                 selected=selected, keep=kept.append)["committed"] is True and hook.commits == 0
        # After COMMITTED: a write after the fence may be lost, and says so.
        fence = kept[-1]
        client.shop.orders.insert_one({"_id": 4})
        with pytest.raises(CutoverRefused, match=r"1 application write.*shop\.orders \(1\).*MAY BE MISSING from Atlas"):
            check_after_commit(client, fence, selected=selected, seconds=1)


def test_cutover_auto_without_source_write_blocking_is_refused_before_start(source) -> None:
    hook = FakeHook()
    hook.extras = {"version": "1.22"}
    with source.client() as client:
        idle = MongosyncProgress.from_reply({"progress": {**PROGRESS_1_22, "state": "IDLE"}})
        with pytest.raises(ConfigurationError, match="cutover=auto needs source write blocking"):
            decide_start(hook, idle, client, mode="off", cutover="auto")
        manual = decide_start(hook, idle, client, mode="off", cutover="manual")
        assert manual.plan.source_blocked is False and manual.write_blocking_in_start is False
        with pytest.raises(ConfigurationError, match="source_write_block=require"):
            decide_start(hook, idle, client, mode="require", cutover="manual")  # 1.22, nothing declared
        hook.extras = {"version": "1.19"}
        old = MongosyncProgress.from_reply({"progress": {**PROGRESS_1_19, "state": "IDLE"}})
        planned = decide_start(hook, old, client, mode="auto", cutover="auto")
        # SecantusDB reports 8.2 and no auth, so the support check says yes; its missing command is caught
        # by mongosync's /start (see the refusal test above).
        assert planned.plan.start_field == "sourceAndDestination" and planned.write_blocking_in_start


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
