"""The live-pull engine against real server processes: copy while writing, replay, resume, DDL, lost history.

Every end-to-end test ends with ``assert_namespaces_identical`` (raw BSON bytes, indexes, options), so a lost,
duplicated or stale document fails it. Sizes stay small: the test server answers ``_id`` ranges with a
collection scan (see FIELD-NOTES), which real mongod does not.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import threading
import time
from collections import Counter

import pytest
from bson import Decimal128, Int64, MaxKey, MinKey, ObjectId, Timestamp, encode
from bson.binary import Binary
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import ASCENDING
from pymongo.errors import DuplicateKeyError, OperationFailure

from atlas_migration.engines.live import (
    STATE_COLLECTION,
    HistoryLost,
    LiveSync,
    Partition,
    StartPoint,
    UnsafeDDL,
    check_oplog_window,
    choose_boundaries,
    id_from_json,
    id_range_filter,
    id_to_json,
    partitions_from_boundaries,
)
from atlas_migration.errors import ConfigurationError, ImpossibleStrategy, MigrationError, TargetNotEmpty
from atlas_migration.fence import LateWrites, take_fence
from atlas_migration.namespaces import NamespaceFilter
from devtools.mongo_servers import start_server
from tests.helpers import assert_namespaces_identical, raw_documents, user_namespaces

STATE_DB = "__atlas_migration_test"
RAW = CodecOptions(document_class=RawBSONDocument)


def make_sync(source_client, target_client, include: list[str], **kwargs) -> LiveSync:
    sync = LiveSync(source_client, target_client, sync_id=kwargs.pop("sync_id", "test-sync"),
                    namespaces=NamespaceFilter.from_patterns(include, None), state_db=STATE_DB, **kwargs)
    sync.max_await_ms = 200  # short getMore waits keep the tests quick
    return sync


def initial_copy(sync: LiveSync, drop: bool = False) -> list[Partition]:
    sync.start()
    partitions = sync.plan_partitions()
    sync.prepare_targets(drop=drop)
    for partition in partitions:
        # Through XCom and back, as the DAG passes them.
        sync.copy_partition(Partition.from_dict(json.loads(json.dumps(partition.to_dict()))))
    sync.finish_initial_copy()
    return partitions


def fence_now(source_client):
    """The operator's statement "writes have stopped" (no write blocking on the test server)."""
    return take_fence(source_client, block=False)


def state_doc(target_client, sync_id: str = "test-sync") -> dict:
    return target_client[STATE_DB][STATE_COLLECTION].find_one({"_id": sync_id})


def mixed_ids() -> list:
    """_id values of every type class an _id can hold, several per class, in no particular order."""
    ids: list = [MinKey(), MaxKey(), None, float("nan"), float("-inf"), float("inf"), -0.5, 0, 7, Int64(2**40),
                 Decimal128("3.25"), Decimal128("-1E+10"), True, False, Timestamp(100, 1), Timestamp(100, 2)]
    ids += [f"s{i:03d}" for i in range(30)]
    ids += [{"k": i, "a": "x"} for i in range(10)]
    ids += [Binary(bytes([i]) * 4, 0) for i in range(8)] + [Binary(bytes(16), 4)]
    ids += [ObjectId(f"{i:024x}") for i in range(1, 25)]
    ids += [dt.datetime(2000 + i, 1, 1) for i in range(12)]
    ids += list(range(100, 140)) + [i + 0.5 for i in range(20)]
    return ids


# ---------------------------------------------------------------------------------------------- pure
def test_choose_boundaries_splits_evenly_and_skips_repeats():
    assert choose_boundaries(list(range(100)), 4) == [25, 50, 75]
    assert choose_boundaries([1, 1, 1, 1, 2, 2, 2, 2], 4) == [1, 2]  # a sample may repeat documents
    assert choose_boundaries([5], 3) == [5]
    assert choose_boundaries([], 3) == [] and choose_boundaries([1, 2], 1) == []
    # null and MinKey cannot start a partition (None means "from the first document"): skipped.
    assert choose_boundaries([MinKey(), None, None, 4, 5, 6], 3) == [5]


def test_partitions_are_contiguous_and_json_safe():
    bounds = [float("nan"), 3, "m", ObjectId("0" * 23 + "1"), dt.datetime(2020, 1, 1)]
    parts = partitions_from_boundaries("db", "c", "pre_db", bounds, 600)
    assert [p.index for p in parts] == list(range(6))
    assert parts[0].lower is None and parts[-1].upper is None
    for left, right in zip(parts, parts[1:], strict=False):
        assert left.upper == right.lower
    for part in parts:
        assert Partition.from_dict(json.loads(json.dumps(part.to_dict()))) == part
        assert part.documents_estimate == 100 and part.target_db == "pre_db"


def test_id_json_round_trip_keeps_bson_values():
    values = [MinKey(), MaxKey(), None, float("nan"), -0.0, Int64(2**40), Decimal128("NaN"), "x", True,
              ObjectId(), dt.datetime(2021, 5, 6, 7, 8, 9, 123000), Binary(b"0123456789abcdef", 4), b"raw",
              Timestamp(5, 6), {"b": 1, "a": [1, "x"]}]
    for value in values:
        back = id_from_json(json.loads(json.dumps(id_to_json(value))))
        assert encode({"v": back}) == encode({"v": value}), value


def test_id_range_filter_brackets_types_and_keeps_nan():
    assert id_range_filter(None, None) == {}
    assert id_range_filter(3, 9) == {"_id": {"$gte": 3, "$lt": 9}}
    assert id_range_filter(3, 9, lower_inclusive=False) == {"_id": {"$gt": 3, "$lt": 9}}
    # A number lower bound and a string upper bound: numbers >= 3, then strings < "m".
    assert id_range_filter(3, "m") == {"$or": [{"_id": {"$gte": 3}}, {"_id": {"$lt": "m"}}]}
    # The first partition ends inside the numbers: every class below, numbers below 3, and NaN.
    first = id_range_filter(None, 3)["$or"]
    assert first[0] == {"_id": {"$type": ["minKey", "undefined", "null"]}}
    assert first[1] == {"_id": {"$lt": 3}} and "$in" in first[2]["_id"]
    # Resuming after a NaN _id: every non-NaN number is still ahead.
    assert id_range_filter(float("nan"), 5, lower_inclusive=False) == {"_id": {"$gte": float("-inf"), "$lt": 5}}
    assert id_range_filter(None, MinKey()) == {"_id": {"$in": []}}


def test_oplog_window_check():
    ok, message = check_oplog_window(24.0, 2 * 3600)
    assert ok and "covers" in message
    ok, message = check_oplog_window(3.0, 2 * 3600)
    assert ok and message.startswith("warning") and "enlarg" in message
    ok, message = check_oplog_window(1.5, 2 * 3600)
    assert not ok and "replSetResizeOplog" in message and "HistoryLost" in message
    ok, message = check_oplog_window(None, 60)
    assert not ok and "unknown" in message
    assert not check_oplog_window(0.0, 60)[0]
    # A span of seconds on an oplog that has dropped nothing since its set was initiated is its age, not its
    # window: it passes with a warning that names what then bounds it. The same span on an oplog that has
    # dropped entries is a window of seconds, and is refused.
    ok, message = check_oplog_window(0.0, 60, since_initiation=True)
    assert ok and message.startswith("warning") and "dropped nothing" in message and "history lost" in message
    assert not check_oplog_window(2 / 3600, 2 * 3600)[0]
    assert check_oplog_window(24.0, 2 * 3600, since_initiation=True) == check_oplog_window(24.0, 2 * 3600)


# ------------------------------------------------------------------------------------------- planning
def test_partitions_over_mixed_id_types_cover_every_document_once(source, target):
    ids = mixed_ids()
    with source.client() as src, target.client() as dst:
        coll = src.mixed.docs
        coll.insert_many([{"_id": value, "n": i} for i, value in enumerate(ids)])
        sync = make_sync(src, dst, ["mixed.*"], partition_docs=15, batch_size=7, copy_order="id_range")
        planned = initial_copy(sync)
        assert len(planned) > 5
        raw = src.mixed.get_collection("docs", codec_options=RAW)

        def covered(parts: list[Partition]) -> Counter:
            seen: Counter = Counter()
            for part in parts:
                lower = None if part.lower is None else id_from_json(part.lower)
                upper = None if part.upper is None else id_from_json(part.upper)
                for doc in raw.find(id_range_filter(lower, upper), projection={"_id": 1}):
                    seen[doc.raw] += 1
            return seen

        expected = Counter(doc.raw for doc in raw.find({}, projection={"_id": 1}))
        assert sum(expected.values()) == len(ids)
        assert covered(planned) == expected
        # Hand-picked bounds at every awkward place: NaN, type-class edges, single-valued classes.
        awkward = [float("nan"), -0.5, 7, "s010", {"k": 3, "a": "x"}, Binary(bytes(16), 4),
                   ObjectId(f"{12:024x}"), False, True, dt.datetime(2005, 1, 1), Timestamp(100, 2), MaxKey()]
        assert covered(partitions_from_boundaries("mixed", "docs", "mixed", awkward, len(ids))) == expected
        assert_namespaces_identical(src, dst, [("mixed", "docs")])


# ---------------------------------------------------------------------------------------- end to end
class Writer(threading.Thread):
    """Random inserts, updates, replaces, deletes, unique-key moves and transactions until stopped."""

    def __init__(self, uri: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.uri, self.rng = uri, random.Random(seed)
        self.ops = 0
        self.transactions = 0
        self.transactions_supported = True
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        import pymongo

        try:
            with pymongo.MongoClient(self.uri) as client:
                self._loop(client)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def _loop(self, client) -> None:
        a, b = client.shop.a, client.shop.b
        rng = self.rng
        while not self.halt.is_set():
            key = rng.randrange(400)
            pick = rng.random()
            try:
                if pick < 0.25:
                    a.update_one({"_id": key}, {"$inc": {"n": 1}, "$set": {"pad": "p" * rng.randrange(80)}})
                elif pick < 0.40:
                    a.replace_one({"_id": key}, {"_id": key, "u": key, "n": -1, "r": rng.random()}, upsert=True)
                elif pick < 0.52:
                    a.delete_one({"_id": key})
                elif pick < 0.62:
                    # Hand a unique value to a new document: the copy can hold both versions for a while.
                    old = a.find_one_and_delete({"_id": key})
                    if old is not None:
                        a.insert_one({"_id": 1000 + self.ops, "u": old["u"], "moved": True})
                elif pick < 0.80:
                    b.insert_one({"_id": ObjectId(), "k": key, "when": dt.datetime(2024, 1, 1)})
                    b.delete_many({"k": rng.randrange(400)})
                elif self.transactions_supported:
                    with client.start_session() as session, session.start_transaction():
                        a.update_one({"_id": key}, {"$set": {"txn": self.ops}}, session=session)
                        a.delete_one({"_id": (key + 1) % 400}, session=session)
                        b.insert_one({"_id": ObjectId(), "txn": self.ops}, session=session)
                    self.transactions += 1
            except DuplicateKeyError:
                pass  # a unique value already taken: the source refused it, so does nothing here
            except OperationFailure as exc:
                if exc.code in (20, 263):  # transactions unsupported on this server: keep writing without
                    self.transactions_supported = False
                elif not exc.has_error_label("TransientTransactionError"):
                    raise
            self.ops += 1
            time.sleep(0.001)


def seed_shop(src) -> None:
    src.shop.a.insert_many([{"_id": i, "u": i, "n": 0, "pad": "x" * (i % 50)} for i in range(400)])
    src.shop.a.create_index([("u", ASCENDING)], unique=True, name="u_unique")
    src.shop.a.create_index([("n", ASCENDING), ("pad", ASCENDING)], name="n_pad")
    src.shop.b.insert_many([{"_id": ObjectId(), "k": i % 400, "v": Decimal128("1.10")} for i in range(300)])
    src.shop.command("create", "big_a", viewOn="a", pipeline=[{"$match": {"n": {"$gt": 0}}}])
    src.shop.create_collection("log", capped=True, size=1 << 20)
    src.shop.log.insert_many([{"_id": i, "line": f"entry {i}"} for i in range(50)])


@pytest.mark.parametrize("copy_order", ["id_range", "natural"])
def test_live_pull_under_concurrent_writes_converges_exactly(source, target, copy_order):
    with source.client() as src, target.client() as dst:
        seed_shop(src)
        writer = Writer(source.uri, seed=7)
        writer.start()
        try:
            time.sleep(0.2)
            sync = make_sync(src, dst, ["shop.*"], partition_docs=120, batch_size=40, copy_order=copy_order)
            point = sync.start()
            at_start = writer.ops
            partitions = sync.plan_partitions()
            assert {p.collection for p in partitions} == {"a", "b", "log"}
            of_a = [p for p in partitions if p.collection == "a"]
            if copy_order == "natural":  # one scan of the whole collection, in record order
                assert [(p.natural, p.lower, p.upper) for p in of_a] == [(True, None, None)]
            else:
                assert len(of_a) >= 3 and not any(p.natural for p in of_a)
            assert [p.capped for p in partitions if p.collection == "log"] == [True]
            sync.prepare_targets()
            for partition in partitions:
                sync.copy_partition(partition)
                time.sleep(0.05)  # let writes land between partitions
            sync.finish_initial_copy()
            after_copy = writer.ops
            caught = sync.catch_up(max_seconds=15, until_lag_below=1)
            assert caught.events_applied > 0 and caught.stopped_because in ("lag_ok", "max_seconds")
            time.sleep(0.3)
        finally:
            writer.halt.set()
            writer.join(10)
        assert writer.error is None, writer.error
        assert at_start > 0 and after_copy > at_start and writer.ops > after_copy  # writes in every phase
        final = sync.cutover(fence_now(src), grace_seconds=1.0, timeout=60)
        assert final.stopped_because == "fence" and final.fence["how"] == "operator_statement"
        assert state_doc(dst)["status"] == "complete"
        assert StartPoint.from_dict(json.loads(state_doc(dst)["start"])) == point
        compared = assert_namespaces_identical(src, dst, user_namespaces(src))
        assert compared > 600
        assert writer.transactions > 0 or not writer.transactions_supported
        if writer.transactions:
            assert dst.shop.b.count_documents({"txn": {"$exists": True}}) == src.shop.b.count_documents(
                {"txn": {"$exists": True}}) > 0
        with pytest.raises(ConfigurationError, match="cut over"):
            sync.catch_up(max_seconds=1)


def test_writes_after_the_fence_fail_the_cutover_with_their_count(source, target):
    with source.client() as src, target.client() as dst:
        src.busy.c.insert_many([{"_id": i} for i in range(10)])
        src.busy.quiet.insert_one({"_id": 1})
        sync = make_sync(src, dst, ["busy.*"])
        initial_copy(sync)
        halt = threading.Event()
        written = Counter()

        def keep_writing() -> None:
            n = 0
            while not halt.is_set():
                src.busy.c.update_one({"_id": n % 10}, {"$inc": {"n": 1}})
                written["c"] += 1
                n += 1
                time.sleep(0.05)

        thread = threading.Thread(target=keep_writing, daemon=True)
        thread.start()
        try:
            time.sleep(0.5)
            fence = fence_now(src)  # the operator says writes stopped; they have not
            with pytest.raises(LateWrites, match=r"busy\.c \(\d+\)") as failure:
                sync.cutover(fence, grace_seconds=1.5, timeout=30)
        finally:
            halt.set()
            thread.join(5)
        assert set(failure.value.late) == {"busy.c"} and failure.value.late["busy.c"] >= 5
        doc = state_doc(dst)
        assert doc["status"] != "complete" and doc["fence"]["late_writes"] == failure.value.late
        # The late writes were applied (the sync keeps running): once writes really stop, a new statement
        # and fence cut over cleanly.
        final = sync.cutover(fence_now(src), grace_seconds=0.5, timeout=30)
        assert final.late_writes == {} and state_doc(dst)["status"] == "complete"
        assert_namespaces_identical(src, dst, [("busy", "c"), ("busy", "quiet")])


def test_drain_to_a_commit_point_applies_nothing_after_it(source, target):
    with source.client() as src, target.client() as dst:
        src.cp.c.insert_many([{"_id": i} for i in range(5)])
        sync = make_sync(src, dst, ["cp.*"])
        initial_copy(sync)
        src.cp.c.insert_one({"_id": "before"})
        point = fence_now(src)
        src.cp.c.insert_one({"_id": "after"})
        sync.drain_to(point.op_time, timeout=30)
        assert dst.cp.c.find_one({"_id": "before"}) is not None
        assert dst.cp.c.find_one({"_id": "after"}) is None


@pytest.mark.parametrize("update_apply", ["lookup", "delta"])
def test_an_update_whose_lookup_finds_nothing_is_rechecked_at_cutover(source, target, update_apply):
    """In "delta" mode the update sets ``m.1`` where ``m`` is a document: a numeric field name, which the
    stream lists in ``disambiguatedPaths``, so it is not replayed from its description but looked up."""
    with source.client() as src, target.client() as dst:
        src.nl.a.insert_many([{"_id": i, "v": 1, "m": {"1": 0}} for i in range(20)])
        sync = make_sync(src, dst, ["nl.*"], update_apply=update_apply)
        initial_copy(sync)
        # Deterministically: by the time catch-up looks the update up, the collection has been renamed, so
        # the lookup returns null although no delete follows. Skipping it would leave v=1 on the target.
        src.nl.a.update_one({"_id": 7}, {"$set": {"v": 2, "w": "x", "m.1": 5}})
        src.nl.a.rename("b")
        sync.catch_up()
        assert dst.nl.b.find_one({"_id": 7})["v"] == 1  # the update could not be applied from the stream
        assert sync.pending_rechecks() == 1
        final = sync.cutover(fence_now(src), grace_seconds=0.5, timeout=30)
        assert final.rechecked == 1 and sync.pending_rechecks() == 0
        assert dst.nl.b.find_one({"_id": 7}) == {"_id": 7, "v": 2, "m": {"1": 5}, "w": "x"}
        assert_namespaces_identical(src, dst, user_namespaces(src))


def test_a_unique_index_on_a_pre_existing_target_fails_the_copy_naming_it(source, target):
    with source.client() as src, target.client() as dst:
        src.uq.people.insert_many([{"_id": 1, "email": "a@x"}, {"_id": 2, "email": "a@x"}, {"_id": 3, "email": "b@x"}])
        dst.uq.people.create_index("email", unique=True)  # pre-created in Atlas, empty
        sync = make_sync(src, dst, ["uq.*"])
        sync.start()
        (partition,) = sync.plan_partitions()
        sync.prepare_targets()
        with pytest.raises(MigrationError, match=r"_id 2 of uq\.people violates the target's unique index email_1"):
            sync.copy_partition(partition)
        assert sync._state.find_one({"_id": sync._partition_key(partition.id)})["done"] is False


def test_killed_copy_resumes_from_its_checkpoint_without_duplicates(source, target):
    with source.client() as src, target.client() as dst:
        src.big.items.insert_many([{"_id": i, "v": Decimal128(f"{i}.5")} for i in range(1000)])
        sync = make_sync(src, dst, ["big.*"], batch_size=100, partition_docs=10_000)
        sync.start()
        (partition,) = sync.plan_partitions()
        sync.prepare_targets()

        def crash(stage: str, batch: int) -> None:
            if stage == "copy" and batch == 4:
                raise RuntimeError("killed")

        sync.fault_hook = crash
        with pytest.raises(RuntimeError, match="killed"):
            sync.copy_partition(partition)
        # Batch 4 reached the target, its checkpoint did not: the next attempt re-reads it. Batches inserted
        # concurrently behind it (insert_workers) may be there too, never checkpointed.
        assert 400 <= dst.big.items.count_documents({}) <= 400 + 100 * (sync.insert_workers - 1)
        saved = dst[STATE_DB][STATE_COLLECTION].find_one({"kind": "partition"})
        assert json.loads(saved["last_id"]) == 299 and saved["documents"] == 300 and not saved["done"]

        fresh = make_sync(src, dst, ["big.*"], batch_size=100, partition_docs=10_000)  # a new task process
        result = fresh.copy_partition(partition)
        assert result.resumed_from == 299 and result.documents == 1000 and not result.already_done
        again = fresh.copy_partition(partition)
        assert again.already_done and again.documents == 1000
        fresh.finish_initial_copy()
        assert_namespaces_identical(src, dst, [("big", "items")])


def test_concurrent_inserts_checkpoint_in_read_order_and_a_failed_batch_holds_the_checkpoint(source, target):
    """Batch 3 of 10 fails (a unique index on the target refuses it) while later batches insert concurrently:
    the checkpoint stays at batch 2's last _id, whatever finished after it, and the retry completes exactly."""
    with source.client() as src, target.client() as dst:
        src.conc.items.insert_many([{"_id": i, "u": 250 if i == 251 else i} for i in range(1000)])
        sync = make_sync(src, dst, ["conc.*"], batch_size=100, partition_docs=10_000, insert_workers=4)
        sync.start()
        (partition,) = sync.plan_partitions()
        sync.prepare_targets()
        dst.conc.items.create_index("u", unique=True)  # refuses _id 251 (u 250, like _id 250)
        with pytest.raises(MigrationError, match="unique index"):
            sync.copy_partition(partition)
        saved = dst[STATE_DB][STATE_COLLECTION].find_one({"kind": "partition"})
        assert json.loads(saved["last_id"]) == 199 and saved["documents"] == 200 and not saved["done"]
        assert dst.conc.items.count_documents({"_id": {"$lt": 200}}) == 200

        dst.conc.items.drop_index("u_1")
        result = make_sync(src, dst, ["conc.*"], batch_size=100, partition_docs=10_000).copy_partition(partition)
        assert result.resumed_from == 199 and result.documents == 1000
        assert raw_documents(src, "conc", "items") == raw_documents(dst, "conc", "items")


@pytest.mark.parametrize(("capped", "expected"), [(False, 4), (True, 1)])
def test_a_partition_inserts_up_to_insert_workers_batches_at_once_and_a_capped_one_in_order(
        source, target, monkeypatch, capped, expected):
    from atlas_migration.engines import live

    running, most = [0], [0]
    lock = threading.Lock()
    real_insert = live._insert_tolerating_duplicates

    def slow_insert(collection, batch, *, ordered):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.05)
            return real_insert(collection, batch, ordered=ordered)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(live, "_insert_tolerating_duplicates", slow_insert)
    with source.client() as src, target.client() as dst:
        if capped:
            src.workers.create_collection("items", capped=True, size=1 << 20)
        src.workers.items.insert_many([{"_id": i, "n": i} for i in range(600)])
        sync = make_sync(src, dst, ["workers.*"], batch_size=50, partition_docs=10_000, insert_workers=4)
        initial_copy(sync)
        assert most[0] == expected
        assert raw_documents(src, "workers", "items") == raw_documents(dst, "workers", "items")
        if capped:  # natural (insertion) order kept on the target
            order = [d["_id"] for d in dst.workers.items.find({}, sort=[("$natural", 1)])]
            assert order == list(range(600))


def test_insert_workers_must_be_a_positive_whole_number(source, target):
    with source.client() as src, target.client() as dst:
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ConfigurationError, match="insert_workers"):
                make_sync(src, dst, ["x.*"], insert_workers=bad)


COPY_IN_CHILD = """
import json, sys, time
import pymongo
from atlas_migration.engines.live import LiveSync, Partition
from atlas_migration.namespaces import NamespaceFilter

source, target = pymongo.MongoClient(sys.argv[1]), pymongo.MongoClient(sys.argv[2])
sync = LiveSync(source, target, sync_id="test-sync", namespaces=NamespaceFilter.from_patterns(["kill.*"], None),
                state_db=sys.argv[4], batch_size=20)
sync.fault_hook = lambda stage, batch: time.sleep(0.01)  # slow enough to be killed half-way
sync.copy_partition(Partition.from_dict(json.loads(sys.argv[3])))
"""


def test_copy_killed_with_sigkill_resumes_where_it_stopped(source, target, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    with source.client() as src, target.client() as dst:
        src.kill.items.insert_many([{"_id": i, "pad": "z" * 200} for i in range(2_000)])
        sync = make_sync(src, dst, ["kill.*"], batch_size=20)
        sync.start()
        (partition,) = sync.plan_partitions()
        sync.prepare_targets()
        script = tmp_path / "copy_child.py"
        script.write_text(COPY_IN_CHILD)
        root = Path(__file__).resolve().parents[2]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "include"), str(root)])}
        child = subprocess.Popen([sys.executable, str(script), source.uri, target.uri,
                                  json.dumps(partition.to_dict()), STATE_DB], env=env)
        state = dst[STATE_DB][STATE_COLLECTION]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            if (state.find_one({"kind": "partition"}) or {}).get("documents", 0) >= 400:
                break
            time.sleep(0.02)
        child.kill()  # SIGKILL: no cleanup, no final checkpoint
        assert child.wait(10) == -9, "the child finished or failed before it could be killed"
        killed_at = state.find_one({"kind": "partition"})
        assert not killed_at["done"] and 400 <= killed_at["documents"] < 2_000

        result = make_sync(src, dst, ["kill.*"], batch_size=20).copy_partition(partition)
        assert result.resumed_from == killed_at["documents"] - 1  # the last _id its checkpoint vouched for
        assert result.documents == 2_000
        sync.finish_initial_copy()
        assert_namespaces_identical(src, dst, [("kill", "items")])


def test_killed_catch_up_resumes_from_the_saved_token(source, target):
    with source.client() as src, target.client() as dst:
        src.app.c.insert_many([{"_id": i, "v": 0} for i in range(30)])
        sync = make_sync(src, dst, ["app.*"], batch_size=5)
        initial_copy(sync)
        for i in range(30):
            src.app.c.update_one({"_id": i}, {"$set": {"v": i + 1}})
        src.app.c.delete_many({"_id": {"$in": [3, 4, 5]}})
        src.app.c.insert_many([{"_id": 100 + i} for i in range(7)])  # 40 events in all

        def crash(stage: str, flush: int) -> None:
            if stage == "catch_up" and flush == 3:
                raise RuntimeError("killed")

        sync.fault_hook = crash
        before = state_doc(dst)["resume_token"]
        with pytest.raises(RuntimeError, match="killed"):
            sync.catch_up()
        crashed = state_doc(dst)
        # Two batches saved; the third was applied but its position was not saved.
        assert 10 <= crashed["events_applied"] < 40 and crashed["resume_token"] != before

        fresh = make_sync(src, dst, ["app.*"], batch_size=5)  # a new task process
        result = fresh.catch_up()
        assert result.stopped_because == "lag_ok"
        assert result.events_applied == 40 - crashed["events_applied"]  # resumed exactly after the saved token
        assert state_doc(dst)["events_applied"] == 40
        assert_namespaces_identical(src, dst, [("app", "c")])
        lag = fresh.lag()
        assert lag.last_applied_cluster_time is not None and lag.lag_seconds is not None and lag.lag_seconds <= 2
        assert lag.pending_estimate is None or lag.pending_estimate <= 5  # nothing written since


def test_replaying_the_same_events_twice_converges(source, target):
    with source.client() as src, target.client() as dst:
        c = src.replay.c
        c.insert_many([{"_id": i, "v": "orig"} for i in range(10)])
        sync = make_sync(src, dst, ["replay.*"])
        point = sync.start()
        # Before the copy: the copy sees only the outcome, catch_up replays every step.
        c.insert_one({"_id": "gone", "v": 1})
        c.update_one({"_id": "gone"}, {"$set": {"v": 2}})  # looked up after its delete: null, skipped
        c.delete_one({"_id": "gone"})                        # a delete of a document never copied
        c.insert_one({"_id": "kept"})
        c.update_one({"_id": "kept"}, {"$set": {"v": 3}})    # a replayed insert of a copied document
        c.delete_one({"_id": 0})
        c.insert_one({"_id": 0, "v": "reborn"})
        c.replace_one({"_id": 1}, {"v": "replaced"})
        sync.plan_partitions()
        sync.prepare_targets()
        for partition in sync.plan_partitions():
            sync.copy_partition(partition)
        sync.finish_initial_copy()
        c.update_many({}, {"$set": {"after": True}})
        c.delete_one({"_id": 2})
        first = sync.catch_up()
        assert first.events_applied >= 20
        assert_namespaces_identical(src, dst, [("replay", "c")])
        # Rewind to the start point and replay everything again over the converged target.
        dst[STATE_DB][STATE_COLLECTION].update_one(
            {"_id": "test-sync"}, {"$set": {"resume_token": point.resume_token}})
        second = sync.catch_up()
        assert second.events_applied == first.events_applied
        assert_namespaces_identical(src, dst, [("replay", "c")])


def test_ddl_events_are_applied(source, target):
    with source.client() as src, target.client() as dst:
        src.ddl.keep.insert_many([{"_id": i, "a": i, "b": -i} for i in range(20)])
        src.ddl.keep.create_index("b", name="b_1")
        src.ddl.old.insert_many([{"_id": i} for i in range(5)])
        src.ddl.doomed.insert_one({"_id": 1})
        sync = make_sync(src, dst, ["ddl.*"])
        initial_copy(sync)
        assert "b_1" in dst.ddl.keep.index_information()

        src.ddl.create_collection("fresh", validator={"x": {"$type": "int"}})
        src.ddl.fresh.insert_many([{"_id": i, "x": i} for i in range(5)])
        src.ddl.fresh.create_index("x", unique=True, name="x_unique")
        src.ddl.keep.create_index([("a", ASCENDING), ("b", -1)], name="a_b")
        src.ddl.keep.drop_index("b_1")
        src.ddl.command("collMod", "keep", validator={"a": {"$gte": 0}})
        src.ddl.old.rename("renamed")
        src.ddl.renamed.insert_one({"_id": 99})
        src.ddl.doomed.drop()
        src.ddl.command("create", "fresh_view", viewOn="fresh", pipeline=[{"$project": {"x": 1}}])

        result = sync.catch_up()
        assert result.events_applied >= 10
        indexes = dst.ddl.keep.index_information()
        assert "a_b" in indexes and "b_1" not in indexes
        names = set(dst.ddl.list_collection_names())
        assert {"fresh", "renamed", "fresh_view"} <= names and not {"old", "doomed"} & names
        # Not unique yet: unique indexes are built at cutover. (mongod's event carries the full spec, so the
        # index is absent until then; SecantusDB's event lacks the options, so it exists without them.)
        assert not dst.ddl.fresh.index_information().get("x_unique", {}).get("unique")

        sync.cutover(fence_now(src), grace_seconds=0.5, timeout=30)
        assert dst.ddl.fresh.index_information()["x_unique"]["unique"] is True
        assert_namespaces_identical(src, dst, user_namespaces(src))
        assert {n for n in user_namespaces(dst) if n[0] == "ddl"} == set(user_namespaces(src))


def test_rename_during_the_initial_copy_is_refused(source, target):
    with source.client() as src, target.client() as dst:
        src.mv.a.insert_many([{"_id": i} for i in range(10)])
        sync = make_sync(src, dst, ["mv.*"])
        sync.start()
        partitions = sync.plan_partitions()
        sync.prepare_targets()
        src.mv.a.rename("b")  # after planning, before the copy reads it
        for partition in partitions:
            sync.copy_partition(partition)
        sync.finish_initial_copy()
        with pytest.raises(UnsafeDDL, match="during the initial copy"):
            sync.catch_up()


def test_start_is_idempotent_and_guards_its_preconditions(source, target, standalone):
    with source.client() as src, target.client() as dst, standalone.client() as alone:
        src.g.c.insert_one({"_id": 1})
        dst.g.c.insert_one({"_id": "already here"})
        sync = make_sync(src, dst, ["g.*"])
        with pytest.raises(ConfigurationError, match="start"):
            sync.plan_partitions()
        first = sync.start()
        assert make_sync(src, dst, ["g.*"]).start() == first
        with pytest.raises(ConfigurationError, match="same namespaces"):
            make_sync(src, dst, ["other.*"]).start()
        sync.plan_partitions()
        with pytest.raises(ConfigurationError, match="finish_initial_copy"):
            sync.catch_up()
        with pytest.raises(TargetNotEmpty, match="drop_target"):
            sync.prepare_targets()
        assert raw_documents(dst, "g", "c") == [encode({"_id": "already here"})]  # nothing was written
        sync.prepare_targets(drop=True)
        assert dst.g.c.count_documents({}) == 0
        with pytest.raises(ImpossibleStrategy, match="standalone"):
            make_sync(alone, dst, ["g.*"], sync_id="standalone").start()


def test_time_series_collections_are_refused(source, target):
    with source.client() as src, target.client() as dst:
        src.ts.create_collection("metrics", timeseries={"timeField": "t"})
        sync = make_sync(src, dst, ["ts.*"])
        sync.start()
        with pytest.raises(ImpossibleStrategy, match="time-series"):
            sync.plan_partitions()


def test_trimmed_oplog_raises_history_lost(tmp_path, target):
    server = start_server(tmp_path / "tiny-oplog", oplog_max_entries=50)
    try:
        import pymongo

        with pymongo.MongoClient(server.uri) as src, target.client() as dst:
            src.hist.c.insert_many([{"_id": i} for i in range(20)])
            sync = make_sync(src, dst, ["hist.*"])
            initial_copy(sync)
            window = sync.oplog_window_hours()
            assert window is not None and window >= 0
            # Far more writes than the oplog keeps (this server trims it every 1,000 oplog writes).
            src.hist.c.insert_many([{"_id": 100 + i} for i in range(1_200)])
            with pytest.raises(HistoryLost, match="drop_target=true") as caught:
                sync.catch_up(max_seconds=30)
            assert "oplog" in str(caught.value)
            assert state_doc(dst)["status"] == "history_lost"
            with pytest.raises(HistoryLost):  # remembered: no later call silently continues
                sync.lag()
            assert sync.estimate_copy_seconds(10.0) == 2.0  # the plan's 20 documents at 10 docs/s
    finally:
        server.destroy()


def test_a_target_document_changed_behind_the_engines_back_is_reported_and_repaired_at_cutover(source, target):
    from atlas_migration.engines.verifier import LiveVerifier

    with source.client() as src, target.client() as dst:
        src.vf.c.insert_many([{"_id": i, "v": i, "doc": {"a": 1, "b": [1, 2]}} for i in range(50)])
        sync = make_sync(src, dst, ["vf.*"])
        verifier = LiveVerifier(src, dst, sync_id=sync.sync_id, state_db=STATE_DB)
        sync.changed_listener, sync.rename_listener = verifier.note_changed, verifier.rename_namespace
        partitions = initial_copy(sync)
        dst.vf.c.update_one({"_id": 7}, {"$set": {"doc.b.1": 3}})  # behind the engine's back
        src.vf.c.update_one({"_id": 8}, {"$set": {"v": -8}})  # a real change, replayed
        sync.catch_up()
        for partition in partitions:
            verifier.compare_partition(partition)
        (mismatch,) = verifier.open_mismatches()
        assert mismatch["ns"] == "vf.c" and mismatch["_id"] == 7 and mismatch["field"] == "doc.b.1"
        assert verifier.recheck().clean is False  # still different: it would block the cutover
        final = sync.cutover(fence_now(src), grace_seconds=0.5, timeout=30, verifier=verifier)
        assert final.rechecked >= 1 and verifier.summary()["clean"]
        assert verifier.summary()["mismatches"]["resolved"] == 1
        assert_namespaces_identical(src, dst, [("vf", "c")])


def _huge_event_document() -> dict:
    # mongod refuses a change event over 16 MiB + 16 KiB. A large document with a large _id gets there: the
    # event carries the _id again in documentKey and (hex-encoded, so twice as long) in its resume token,
    # about 180 KB besides the document here. Yet the document with one token stays under 16 MiB, so the
    # split stage can make fragments of it (fullDocument in one, documentKey in another).
    return {"_id": "k" * 60_000, "payload": "p" * 16_575_000}


@pytest.mark.parametrize("server_version, outcome", [(None, "split"), ("6.0.5", "refused")])
def test_change_events_over_16_mib(source, target, server_version, outcome):
    from atlas_migration.engines.live import EventTooLarge
    from devtools.replica_set_proxy import ReplicaSetProxy
    from tests.helpers import IGNORED_INDEX_FIELDS  # noqa: F401 - same helpers module as the assertions

    if source.local is None:
        pytest.skip("needs the local test server behind the proxy (a genuine mongod has the split stage)")
    with ReplicaSetProxy(source.local.port, server_version=server_version) as proxy, \
            source.client() as direct, target.client() as dst:
        import pymongo

        with pymongo.MongoClient(f"mongodb://{proxy.host}/?directConnection=true") as src:
            src.big.docs.insert_one({"_id": 1, "small": True})
            sync = make_sync(src, dst, ["big.*"])
            initial_copy(sync)
            direct.big.docs.insert_one(_huge_event_document())
            direct.big.docs.insert_one({"_id": 2, "after": True})
            if outcome == "refused":
                with pytest.raises(EventTooLarge, match="no \\$changeStreamSplitLargeEvent stage.*exclude the "
                                                        "collection"):
                    sync.catch_up()
                assert dst.big.docs.find_one({"_id": 2}) is None  # nothing after the event was applied
            else:
                assert state_doc(dst)["split_events"] is True
                sync.catch_up()
                assert_namespaces_identical(direct, dst, [("big", "docs")])


def test_index_builds_run_across_collections_in_parallel_one_per_collection(source, target, monkeypatch):
    """After the copy, collections build their secondary indexes concurrently (up to index_build_workers),
    each collection's indexes in ONE createIndexes; every index arrives."""
    import atlas_migration.engines.live as live_module

    real_create = live_module._create_indexes
    running: list[str] = []
    seen: dict[str, int] = {}
    peak = [0]
    lock = threading.Lock()

    def slow_create(database, coll, meta):
        with lock:
            assert coll not in running, f"two builds at once on {coll}"
            running.append(coll)
            seen[coll] = seen.get(coll, 0) + 1
            peak[0] = max(peak[0], len(running))
        try:
            time.sleep(0.3)  # long enough for the pool to start the other builds meanwhile
            return real_create(database, coll, meta)
        finally:
            with lock:
                running.remove(coll)

    monkeypatch.setattr(live_module, "_create_indexes", slow_create)
    with source.client() as src, target.client() as dst:
        names = [f"c{i}" for i in range(5)]
        for name in names:
            src.idx[name].insert_many([{"_id": i, "a": i, "b": -i} for i in range(20)])
            src.idx[name].create_index("a", name="a_1")
            src.idx[name].create_index([("b", 1), ("a", 1)], name="b_a")
        src.idx.plain.insert_one({"_id": 1})  # no secondary index: no build
        sync = make_sync(src, dst, ["idx.*"])
        sync.index_build_workers = 3
        initial_copy(sync)
        assert seen == dict.fromkeys(names, 1)
        assert peak[0] == 3
        for name in names:
            assert set(dst.idx[name].index_information()) == {"_id_", "a_1", "b_a"}
        assert state_doc(dst)["index_seconds"] > 0
