"""devtools.sharded_cluster: the pure parts (BSON order, chunk routing, the merge rule), then the router in front
of two real SecantusDB replica sets (each behind its own ReplicaSetProxy), checked on the shards directly."""

from __future__ import annotations

import math
import time
from collections import deque
from types import SimpleNamespace

import pymongo
import pytest
from bson import Decimal128, Int64, ObjectId, Timestamp
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.raw_bson import RawBSONDocument
from pymongo.errors import OperationFailure, WriteError
from pymongo.write_concern import WriteConcern

from devtools.mongo_servers import start_server
from devtools.replica_set_proxy import ReplicaSetProxy
from devtools.sharded_cluster import (
    ChangeStreamCursor,
    ShardedCluster,
    ShardedCollection,
    _id_predicate,
    bson_key,
    decode_router_token,
)

SPLIT = 1_000
FENCE_APP = "cutover-fence"

# ---------------------------------------------------------------- pure


def test_bson_key_orders_types_and_numbers_as_mongodb_does() -> None:
    values = [MaxKey(), ObjectId("0" * 24), "b", "a", 2.5, Int64(2), 3, Decimal128("1.5"), None, MinKey(),
              {"a": 1}, [1], b"\x01", True]
    ordered = sorted(values, key=bson_key)
    assert ordered[:2] == [MinKey(), None]
    assert ordered[2:6] == [Decimal128("1.5"), Int64(2), 2.5, 3]
    assert ordered[6:8] == ["a", "b"]
    assert [type(v) for v in ordered[8:]] == [dict, list, bytes, ObjectId, bool, MaxKey]


def test_chunks_route_by_id_range() -> None:
    coll = ShardedCollection("app.orders", [100, 200], [0, 1, 0])
    assert [coll.owner(v) for v in (-5, 99, 100, 199.5, 200, 10**9, "text")] == [0, 0, 1, 1, 0, 0, 0]
    assert coll.shards_for_range(0, 50) == {0}
    assert coll.shards_for_range(150, None) == {0, 1}
    assert coll.shards_for_range(120, 180) == {1}
    assert _id_predicate({"_id": 5}) == ("eq", [5])
    assert _id_predicate({"_id": {"$in": [1, 2]}}) == ("eq", [1, 2])
    assert _id_predicate({"$and": [{"x": 1}, {"_id": {"$gte": 3, "$lt": 9}}]}) == ("range", (3, 9))
    assert _id_predicate({"x": 1}) is None


def _stream(index: int, hw: Timestamp | None, events: list[Timestamp]):
    buffer = deque(RawBSONDocument(_encode({"_id": {"_data": f"{index}{t.inc}"}, "clusterTime": t}))
                   for t in events)
    return SimpleNamespace(shard=SimpleNamespace(index=index, id=f"shard{index}"), hw=hw, buffer=buffer, id=1)


def _encode(doc):
    import bson

    return bson.encode(doc)


def test_an_event_waits_until_every_other_shard_has_passed_its_cluster_time() -> None:
    early, later = Timestamp(100, 1), Timestamp(100, 5)
    behind = _stream(0, Timestamp(100, 3), [])
    ahead = _stream(1, Timestamp(100, 5), [later])
    merge = ChangeStreamCursor("app.orders", [behind, ahead])
    assert merge._candidate() is None  # shard0 may still write between (100, 3) and (100, 5)
    behind.hw = Timestamp(100, 5)  # the same time: shard0 sorts first, so it could still add an event there
    assert merge._candidate() is None
    behind.hw = Timestamp(100, 6)
    assert merge._candidate()[0] is ahead
    behind.buffer.append(RawBSONDocument(_encode({"_id": {"_data": "x"}, "clusterTime": early})))
    assert merge._candidate()[0] is behind  # the earlier event first


# ---------------------------------------------------------------- two real shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    servers, proxies = [], []
    try:
        for i in range(2):
            server = start_server(tmp_path_factory.mktemp(f"shard{i}"), extra_args=["--noop-heartbeat-seconds", "1"])
            servers.append(server)
            proxies.append(ReplicaSetProxy(server.port, bypass_app_names={FENCE_APP}).start())
        yield proxies
    finally:
        for proxy in proxies:
            proxy.stop()
        for server in servers:
            server.destroy()


@pytest.fixture(scope="module")
def cluster(shards):
    with ShardedCluster([p.host for p in shards], sharded={"app.orders": {"key": {"_id": 1}, "splits": [SPLIT]}}) \
            as router:
        yield router


@pytest.fixture
def router(cluster, shards):
    with pymongo.MongoClient(f"mongodb://{cluster.host}/") as client:
        yield client
        client.app.orders.delete_many({})
        client.app.notes.drop()


def shard_client(proxy):
    return pymongo.MongoClient(f"mongodb://{proxy.host}/?directConnection=true")


def test_the_router_presents_a_mongos_with_two_shards(router, shards) -> None:
    hello = router.admin.command("hello")
    assert hello["msg"] == "isdbgrid" and "setName" not in hello
    listed = router.admin.command("listShards")["shards"]
    assert [s["_id"] for s in listed] == ["shard0", "shard1"]
    assert [s["host"] for s in listed] == [f"secantus/{p.host}" for p in shards]
    # The hosts are reachable as replica sets, as a client of listShards uses them.
    with pymongo.MongoClient(f"mongodb://{shards[1].host}/?replicaSet=secantus") as direct:
        assert direct.admin.command("ping")["ok"] == 1
    keys = list(router.config.collections.find({"dropped": {"$ne": True}}, projection={"_id": 1, "key": 1}))
    assert keys == [{"_id": "app.orders", "key": {"_id": 1}}]
    chunks = list(router.config.chunks.find({}, projection={"_id": 0, "min": 1, "max": 1, "shard": 1}))
    assert [(c["min"]["_id"], c["max"]["_id"], c["shard"]) for c in chunks] == \
        [(MinKey(), SPLIT, "shard0"), (SPLIT, MaxKey(), "shard1")]
    assert router.admin.command("balancerStatus")["mode"] == "full"


def test_documents_land_on_the_shard_that_owns_their_chunk(router, shards) -> None:
    router.app.orders.insert_many([{"_id": i, "v": i % 7} for i in range(0, 2_000, 3)])
    router.app.orders.insert_many([{"_id": i} for i in range(1, 2_000, 3)], ordered=False)
    router.app.notes.insert_one({"_id": "n1"})
    with shard_client(shards[0]) as s0, shard_client(shards[1]) as s1:
        on0 = sorted(d["_id"] for d in s0.app.orders.find())
        on1 = sorted(d["_id"] for d in s1.app.orders.find())
        assert on0 and on1 and max(on0) < SPLIT <= min(on1)
        assert len(on0) + len(on1) == len(range(0, 2_000, 3)) + len(range(1, 2_000, 3))
        # An unsharded collection lives whole on its database's primary shard.
        assert s0.app.notes.count_documents({}) == 1 and "notes" not in s1.app.list_collection_names()
    # A duplicate key in an ordered insert stops there; the index is the client's.
    with pytest.raises(pymongo.errors.BulkWriteError) as failed:
        router.app.orders.insert_many([{"_id": 5_000}, {"_id": 3}, {"_id": 5_001}])
    assert failed.value.details["nInserted"] == 1 and failed.value.details["writeErrors"][0]["index"] == 1
    assert router.app.orders.find_one({"_id": 5_001}) is None


def test_finds_merge_in_id_order_across_shards(router) -> None:
    ids = list(range(0, 2_000, 7)) + [-1.5, Int64(999), 1_000.5]
    router.app.orders.insert_many([{"_id": i} for i in ids], ordered=False)
    expected = sorted(ids, key=bson_key)
    assert [d["_id"] for d in router.app.orders.find(sort=[("_id", 1)], batch_size=9)] == expected
    assert [d["_id"] for d in router.app.orders.find(sort=[("_id", -1)], batch_size=50)] == expected[::-1]
    assert [d["_id"] for d in router.app.orders.find(sort=[("_id", 1)]).skip(5).limit(10)] == expected[5:15]
    ranged = list(router.app.orders.find({"_id": {"$gte": 990, "$lt": 1_010}}, sort=[("_id", 1)]))
    assert [d["_id"] for d in ranged] == [i for i in expected if 990 <= i < 1_010]
    assert router.app.orders.find_one({"_id": 1_001}) == {"_id": 1_001}
    assert sorted(d["_id"] for d in router.app.orders.find()) == sorted(expected)
    with pytest.raises(OperationFailure, match="not imitated"):
        list(router.app.orders.find(sort=[("v", 1)]))


def test_counts_and_stats_sum_over_the_shards(router, shards) -> None:
    router.app.orders.insert_many([{"_id": i, "even": i % 2 == 0} for i in range(1_990, 2_010)])
    router.app.orders.insert_many([{"_id": i, "even": i % 2 == 0} for i in range(0, 30)])
    assert router.app.orders.estimated_document_count() == 50
    assert router.app.orders.count_documents({}) == 50
    assert router.app.orders.count_documents({"even": True}) == 25
    assert router.app.orders.count_documents({"_id": {"$gte": 1_000}}) == 20
    stats = router.app.command("collStats", "orders")
    assert stats["sharded"] is True and stats["count"] == 50 and set(stats["shards"]) == {"shard0", "shard1"}
    sample = [d["_id"] for d in router.app.orders.aggregate([{"$sample": {"size": 40}}, {"$project": {"_id": 1}},
                                                             {"$sort": {"_id": 1}}])]
    assert len(sample) == 40 and sample == sorted(sample) and set(sample) <= set(range(30)) | set(range(1_990, 2_010))
    names = router.list_database_names()
    assert "app" in names and "local" not in names


def test_updates_and_deletes_are_routed_by_id_or_broadcast(router, shards) -> None:
    orders = router.app.orders
    orders.insert_many([{"_id": i, "n": 0} for i in (1, 2, 1_001, 1_002)])
    assert orders.update_one({"_id": 1_001}, {"$inc": {"n": 1}}).modified_count == 1
    assert orders.update_many({}, {"$inc": {"n": 10}}).modified_count == 4
    assert orders.update_one({"n": 11}, {"$set": {"picked": True}}).modified_count == 1  # without the shard key
    with pytest.raises(WriteError) as refused:
        orders.update_one({"n": 999}, {"$set": {"x": 1}}, upsert=True)
    assert refused.value.code == 61
    assert orders.delete_one({"n": 10}).deleted_count == 1
    assert orders.delete_many({"_id": {"$gte": 1_000}}).deleted_count >= 1
    with shard_client(shards[0]) as s0, shard_client(shards[1]) as s1:
        assert s1.app.orders.count_documents({}) == 0
        assert s0.app.orders.count_documents({}) == router.app.orders.count_documents({})
    assert orders.find_one_and_update({"_id": 2}, {"$set": {"f": 1}}, return_document=True)["f"] == 1
    # Without the shard key: one matching document is found on some shard, then changed there by _id.
    assert orders.find_one_and_update({"f": 1}, {"$set": {"g": 1}}, return_document=True)["_id"] == 2
    assert orders.find_one_and_update({"f": 99}, {"$set": {"g": 1}}) is None
    # An unacknowledged insert (moreToCome: no reply) still lands on its shard.
    orders.with_options(write_concern=WriteConcern(w=0)).insert_one({"_id": 1_777})
    deadline = time.monotonic() + 10
    while orders.find_one({"_id": 1_777}) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    with shard_client(shards[1]) as s1:
        assert s1.app.orders.find_one({"_id": 1_777}) == {"_id": 1_777}


def test_write_blocking_blocks_both_shards(router, cluster, shards) -> None:
    router.admin.command("setUserWriteBlockMode", 1, **{"global": True})
    try:
        for _id in (5, 1_005):
            with pytest.raises(WriteError) as blocked:
                router.app.orders.insert_one({"_id": _id})
            assert blocked.value.code == 371
        for proxy in shards:  # on each shard itself too
            assert proxy.user_write_block_mode == 2
        # A client holding the bypass (here: its application name) still writes through the router.
        with pymongo.MongoClient(f"mongodb://{cluster.host}/?appname={FENCE_APP}") as fence:
            fence.app.orders.insert_many([{"_id": 6}, {"_id": 1_006}])
        note = router.admin.command("appendOplogNote", data={"x": 1})
        assert note["ok"] == 1 and note["operationTime"] > Timestamp(0, 0)
    finally:
        router.admin.command("setUserWriteBlockMode", 1, **{"global": False})
    assert [proxy.user_write_block_mode for proxy in shards] == [1, 1]
    router.app.orders.insert_one({"_id": 7})
    assert router.app.orders.count_documents({}) == 3


def _read(stream, count: int, timeout: float = 30.0) -> list:
    events, deadline = [], time.monotonic() + timeout
    while len(events) < count and time.monotonic() < deadline:
        event = stream.try_next()
        if event is not None:
            events.append(event)
    return events


def test_the_merged_change_stream_orders_both_shards_by_cluster_time(router) -> None:
    orders = router.app.orders
    with orders.watch(max_await_time_ms=500) as stream:
        for i in range(10):
            orders.insert_one({"_id": i})
            orders.insert_one({"_id": SPLIT + i})
        orders.update_one({"_id": 3}, {"$set": {"u": 1}})
        orders.update_one({"_id": SPLIT + 3}, {"$set": {"u": 1}})
        orders.delete_one({"_id": 4})
        orders.delete_one({"_id": SPLIT + 4})
        events = _read(stream, 24)
    seen = [(e["operationType"], e["documentKey"]["_id"]) for e in events]
    # The shards' clocks are not gossiped (see the module docstring), so two shards' writes of one second
    # interleave by their own Timestamps: the merged order is clusterTime order, each shard's in write order.
    times = [(e["clusterTime"], e["documentKey"]["_id"] >= SPLIT) for e in events]
    assert times == sorted(times)
    for shard_keys in (range(10), range(SPLIT, SPLIT + 10)):
        base = shard_keys[0]
        assert [op for op in seen if op[1] in shard_keys] == \
            [("insert", k) for k in shard_keys] + [("update", base + 3), ("delete", base + 4)]
    assert all(decode_router_token(e["_id"]) for e in events)


def _after_the_current_second() -> None:
    """Sleep into the next wall-clock second, past the Timestamps of every earlier write on both shards.

    The shards' clocks are not gossiped (see the module docstring): within one second each shard counts its
    own increments, so an earlier test's write on one shard can carry a later Timestamp than this test's first
    write on the other. A real mongos would have advanced the second shard's clock past it.
    """
    now = time.time()
    time.sleep(math.floor(now) + 1.05 - now)


def test_a_router_token_resumes_the_merged_stream_exactly(router) -> None:
    orders = router.app.orders
    _after_the_current_second()  # so `start_at_operation_time` below sees only this test's writes
    with router.watch(max_await_time_ms=500) as stream:  # the whole cluster
        for i in range(6):
            orders.insert_one({"_id": 100 + i})
            orders.insert_one({"_id": SPLIT + 100 + i})
        first = _read(stream, 12)
    keys = [e["documentKey"]["_id"] for e in first]
    assert sorted(keys) == sorted([100 + i for i in range(6)] + [SPLIT + 100 + i for i in range(6)])
    for cut in (0, 4, 7, 11):
        with router.watch(resume_after=first[cut]["_id"], max_await_time_ms=300) as again:
            rest = _read(again, 12 - cut - 1, timeout=10)
            assert again.try_next() is None  # nothing repeated after the expected tail
        assert [e["documentKey"]["_id"] for e in rest] == keys[cut + 1:]
    with router.watch(start_after=first[5]["_id"], max_await_time_ms=300) as again:
        assert [e["documentKey"]["_id"] for e in _read(again, 6, timeout=10)] == keys[6:]
    # A post-batch token also resumes: nothing from before it, everything after it.
    with router.watch(start_at_operation_time=first[0]["clusterTime"], max_await_time_ms=300) as at:
        assert [e["documentKey"]["_id"] for e in _read(at, 12, timeout=10)] == keys
        token = at.resume_token
    orders.insert_one({"_id": 7})
    with router.watch(resume_after=token, max_await_time_ms=300) as after:
        assert [e["documentKey"]["_id"] for e in _read(after, 1)] == [7]


def test_an_idle_shard_does_not_stall_the_merged_stream(router) -> None:
    orders = router.app.orders
    with orders.watch(max_await_time_ms=500) as stream:
        start = time.monotonic()
        orders.insert_one({"_id": SPLIT + 500})  # shard1 only: shard0 stays idle
        events = _read(stream, 1, timeout=15)
        waited = time.monotonic() - start
    assert [e["documentKey"]["_id"] for e in events] == [SPLIT + 500]
    assert waited < 8, waited  # shard0's periodic no-op (1 s here) advanced its high-water mark


def test_explain_of_a_find_reports_each_targeted_shards_plan(router, cluster) -> None:
    from atlas_migration.engines.copy_order import id_range_explain_command, winning_plan_stages

    whole = router.app.command(id_range_explain_command("orders", MinKey(), MaxKey()))
    plan = whole["queryPlanner"]["winningPlan"]
    assert plan["stage"] == "SHARD_MERGE_SORT" and [s["shardName"] for s in plan["shards"]] == ["shard0", "shard1"]
    assert "COLLSCAN" in winning_plan_stages(whole)  # the test server scans for an _id range
    one = router.app.command(id_range_explain_command("orders", 1, 2))["queryPlanner"]["winningPlan"]
    assert one["stage"] == "SINGLE_SHARD" and [s["shardName"] for s in one["shards"]] == ["shard0"]
    with pytest.raises(OperationFailure, match="not imitated"):
        router.app.command({"explain": {"count": "orders"}})
    cluster.refusals.clear()


def test_local_and_unknown_commands_are_refused(router, cluster) -> None:
    with pytest.raises(OperationFailure) as local:
        router.local["oplog.rs"].find_one()
    assert local.value.code == 20
    with pytest.raises(OperationFailure) as unknown:
        router.app.command("dbHash")
    assert unknown.value.code == 59
    assert any(r.startswith("dbHash: no such command") for r in cluster.refusals)


def test_a_view_over_a_sharded_collection_reads_every_shard(router) -> None:
    router.app.orders.insert_many([{"_id": i, "big": i % 2 == 0} for i in range(990, 1_010)])
    router.app.create_collection("evens", viewOn="orders", pipeline=[{"$match": {"big": True}}])
    try:
        expected = [i for i in range(990, 1_010) if i % 2 == 0]
        assert [d["_id"] for d in router.app.evens.find(sort=[("_id", 1)])] == expected
        assert [d["_id"] for d in router.app.evens.find({"_id": {"$gt": 1_000}}, sort=[("_id", -1)]).limit(3)] == \
            [1_008, 1_006, 1_004]
        assert router.app.evens.count_documents({}) == 10
        assert router.app.command("count", "evens")["n"] == 10
    finally:
        router.app.evens.drop()


def test_shard_collection_by_command_routes_new_chunks(router, shards) -> None:
    router.admin.command("enableSharding", "other", primaryShard="shard1")
    router.admin.command("shardCollection", "other.items", key={"_id": 1}, splits=["m"])
    try:
        router.other.items.insert_many([{"_id": name} for name in ("apple", "kiwi", "melon", "zucchini")])
        router.other.plain.insert_one({"_id": 1})
        with shard_client(shards[0]) as s0, shard_client(shards[1]) as s1:
            assert sorted(d["_id"] for d in s0.other.items.find()) == ["apple", "kiwi"]
            assert sorted(d["_id"] for d in s1.other.items.find()) == ["melon", "zucchini"]
            assert s1.other.plain.count_documents({}) == 1 and "plain" not in s0.other.list_collection_names()
        with pytest.raises(OperationFailure) as refused:
            router.admin.command("shardCollection", "other.hashed", key={"_id": "hashed"})
        assert "not imitated" in str(refused.value)
    finally:
        router.drop_database("other")
    assert "other.items" not in [c["_id"] for c in router.config.collections.find()]


def test_inspection_through_the_router_measures_each_shard_and_the_bounded_window_decides(shards, tmp_path):
    """What the product reads through the stand-in: listShards names both shards as replica sets, inspection
    measures each one's oplog, and the shard whose oplog has dropped entries bounds the cluster's window."""
    from atlas_migration.inspection import inspect_source

    small = start_server(tmp_path / "small", oplog_max_entries=20)
    proxy = ReplicaSetProxy(small.port).start()
    try:
        with pymongo.MongoClient(f"mongodb://{proxy.host}/?directConnection=true") as direct:
            direct.fill.x.insert_many([{"_id": i} for i in range(1_200)])  # trimmed every 1,000 writes
        with ShardedCluster([shards[0].host, proxy.host]) as two, \
                pymongo.MongoClient(f"mongodb://{two.host}/") as client:
            profile = inspect_source(client, conn_id="src", hosts=[two.host],
                                     shard_connect=lambda name, hosts: pymongo.MongoClient(hosts, replicaSet=name))
    finally:
        proxy.stop()
        small.destroy()
    assert profile.topology == "sharded" and profile.shards == ["shard0", "shard1"]
    windows = {s.name: s for s in profile.shard_oplogs}
    assert windows["shard0"].since_initiation and not windows["shard1"].since_initiation
    assert windows["shard0"].window_hours > windows["shard1"].window_hours >= 0  # the older shard spans more
    assert profile.oplog_window_hours == windows["shard1"].window_hours
    assert any("the smallest of 2 shard oplog windows, shard shard1 (not counting shard0" in n for n in profile.notes)


def test_the_cluster_has_no_users_and_refuses_user_management(router) -> None:
    assert router.admin.command("usersInfo", [{"user": "mms-automation", "db": "admin"}])["users"] == []
    with pytest.raises(OperationFailure) as refused:
        router.admin.command("createUser", "u", pwd="p", roles=[])
    assert refused.value.code == 59
