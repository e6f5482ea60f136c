"""devtools.replica_set_proxy: the pure decisions, then the proxy in front of the session's SecantusDB source
(write blocking, appendOplogNote, large change events, an older presented server, the replicaSet= handshake)."""

from __future__ import annotations

import subprocess
import sys
import time

import bson
import pymongo
import pytest
from bson.raw_bson import RawBSONDocument
from pymongo.errors import BulkWriteError, OperationFailure, WriteError

from devtools.replica_set_proxy import (
    BSON_MAX_INTERNAL_SIZE,
    BSON_MAX_USER_SIZE,
    ReplicaSetProxy,
    blocked_bulk_write_reply,
    blocked_crud_reply,
    has_split_stage,
    is_exempt,
    oversized_event,
    parse_version,
    wire_version,
    written_namespaces,
)

FENCE_APP = "cutover-fence"

# ---------------------------------------------------------------- pure


def test_written_namespaces_names_what_each_write_command_touches() -> None:
    assert written_namespaces({"insert": "c", "$db": "d"}) == ("crud", ["d.c"])
    assert written_namespaces({"findAndModify": "c", "$db": "d"}) == ("findAndModify", ["d.c"])
    assert written_namespaces({"createIndexes": "c", "indexes": [], "$db": "d"}) == ("command", ["d.c"])
    assert written_namespaces({"dropDatabase": 1, "$db": "d"}) == ("command", ["d"])
    assert written_namespaces({"renameCollection": "d.a", "to": "e.b", "$db": "admin"}) == ("command", ["d.a", "e.b"])
    assert written_namespaces({"aggregate": "c", "pipeline": [{"$match": {}}, {"$out": {"db": "o", "coll": "x"}}],
                               "$db": "d"}) == ("command", ["o.x"])
    assert written_namespaces({"aggregate": "c", "pipeline": [{"$merge": {"into": "m"}}], "$db": "d"}) == \
        ("command", ["d.m"])
    assert written_namespaces({"bulkWrite": 1, "nsInfo": [{"ns": "d.c"}], "$db": "admin"}) == ("bulkWrite", ["d.c"])
    for read in ({"find": "c", "$db": "d"}, {"aggregate": "c", "pipeline": [{"$match": {}}], "$db": "d"},
                 {"mapReduce": "c", "out": {"inline": 1}, "$db": "d"}, {"listCollections": 1, "$db": "d"}):
        assert written_namespaces(read) is None


def test_internal_databases_and_profile_are_exempt() -> None:
    assert is_exempt("admin.x") and is_exempt("config.y") and is_exempt("local.z") and is_exempt("admin")
    assert is_exempt("shop.system.profile") and is_exempt("shop.system.resharding.abc")
    assert not is_exempt("shop.orders") and not is_exempt("shop") and not is_exempt("administration.x")


def test_blocked_replies_stop_at_the_first_write_when_ordered() -> None:
    ordered = blocked_crud_reply("update", [False, True, True], ordered=True)
    assert ordered == {"n": 0, "nModified": 0, "ok": 1.0,
                       "writeErrors": [{"index": 1, "code": 371, "errmsg": "User writes blocked"}]}
    unordered = blocked_crud_reply("insert", [True, True], ordered=False)
    assert [e["index"] for e in unordered["writeErrors"]] == [0, 1] and "nModified" not in unordered
    assert blocked_crud_reply("delete", [False, False], ordered=True) is None  # nothing would be written
    bulk = blocked_bulk_write_reply([{"insert": 0}, {"insert": 1}, {"delete": 1}], ["admin.x", "d.c"], ordered=False)
    assert [e["idx"] for e in bulk["cursor"]["firstBatch"]] == [1, 2] and bulk["nErrors"] == 2


def test_versions_split_stage_and_size_limits() -> None:
    assert parse_version("6.0.5") == (6, 0, 5) and wire_version((6, 0, 5)) == 17 and wire_version((8, 2, 1)) == 27
    assert not has_split_stage((6, 0, 5)) and has_split_stage((6, 0, 9)) and not has_split_stage((6, 2, 0))
    assert has_split_stage((7, 0, 0))
    with pytest.raises(ValueError):
        parse_version("latest")

    def event(size: int) -> RawBSONDocument:
        filler = size - len(bson.encode({"_id": 1, "x": ""}))
        doc = RawBSONDocument(bson.encode({"_id": 1, "x": "a" * filler}))
        assert len(doc.raw) == size
        return doc

    at_internal, over_user = event(BSON_MAX_INTERNAL_SIZE), event(BSON_MAX_USER_SIZE + 1)
    assert oversized_event([over_user, at_internal], split=False) is None  # mongod serializes up to 16 MiB + 16 KiB
    assert oversized_event([event(BSON_MAX_INTERNAL_SIZE + 1)], split=False)[0] == BSON_MAX_INTERNAL_SIZE + 1
    assert oversized_event([over_user], split=True)[0] == BSON_MAX_USER_SIZE + 1  # fragments: at most 16 MiB


# ---------------------------------------------------------------- against SecantusDB


@pytest.fixture(scope="module")
def set_name(source_server) -> str:
    with source_server.client() as client:
        return client.admin.command("hello")["setName"]


@pytest.fixture(scope="module")
def proxy(source_server):
    with ReplicaSetProxy(source_server.local.port, bypass_app_names={FENCE_APP},
                         privileged_app_names={FENCE_APP}) as proxy:
        yield proxy


def _client(proxy: ReplicaSetProxy, set_name: str, app: str = "writer") -> pymongo.MongoClient:
    return pymongo.MongoClient(f"mongodb://{proxy.host}/?replicaSet={set_name}", appname=app,
                               serverSelectionTimeoutMS=10_000)


def test_hello_names_the_proxy_so_replica_set_discovery_stays_on_it(proxy, set_name, source) -> None:
    from pymongo.topology_description import TOPOLOGY_TYPE

    with _client(proxy, set_name) as client:
        hello = client.admin.command("hello")
        assert hello["hosts"] == [proxy.host] and hello["primary"] == proxy.host and hello["me"] == proxy.host
        assert hello["setName"] == set_name and "compression" not in hello
        client.shop.items.insert_one({"_id": 1})
        assert client.topology_description.topology_type == TOPOLOGY_TYPE.ReplicaSetWithPrimary
        assert [f"{h}:{p}" for h, p in client.topology_description.server_descriptions()] == [proxy.host]
        assert client.shop.items.find_one() == {"_id": 1}


def test_write_blocking_refuses_user_writes_with_mongods_error(proxy, set_name, source) -> None:
    with _client(proxy, set_name) as writer, _client(proxy, set_name, FENCE_APP) as fence:
        items = writer.shop.items
        items.insert_many([{"_id": i, "v": i} for i in range(3)])
        with pytest.raises(OperationFailure) as unprivileged:
            writer.admin.command("setUserWriteBlockMode", 1, **{"global": True})
        assert unprivileged.value.code == 13
        assert fence.admin.command("serverStatus")["repl"]["userWriteBlockMode"] == 1
        fence.admin.command("setUserWriteBlockMode", 1, **{"global": True})
        try:
            assert writer.admin.command("serverStatus")["repl"]["userWriteBlockMode"] == 2
            for write in (lambda: items.insert_one({"_id": 10}), lambda: items.update_one({"_id": 1}, {"$set": {"v": 0}}),
                          lambda: items.delete_one({"_id": 2}), lambda: items.update_one({"_id": 99}, {"$set": {"v": 1}},
                                                                                       upsert=True)):
                with pytest.raises(WriteError) as refused:
                    write()
                assert refused.value.code == 371
            with pytest.raises(BulkWriteError) as batch:  # OP_MSG document sequence, unordered
                items.insert_many([{"_id": 20}, {"_id": 21}], ordered=False)
            assert [(e["index"], e["code"]) for e in batch.value.details["writeErrors"]] == [(0, 371), (1, 371)]
            for command in (lambda: items.create_index("v"), lambda: writer.shop.create_collection("new"),
                            lambda: items.drop(), lambda: items.find_one_and_update({"_id": 0}, {"$set": {"v": 5}}),
                            lambda: list(items.aggregate([{"$out": "copy"}]))):
                with pytest.raises(OperationFailure) as refused:
                    command()
                assert (refused.value.code, refused.value.details["codeName"]) == (371, "UserWritesBlocked")
                assert refused.value.details["errmsg"] == "User writes blocked"
            with writer.start_session() as session, pytest.raises(OperationFailure) as in_txn:
                with session.start_transaction():
                    items.find_one({"_id": 0}, session=session)
                    items.insert_one({"_id": 30}, session=session)
            assert in_txn.value.code == 371
            # Writes that write nothing, reads, the internal databases and the bypass application go through.
            assert items.update_one({"_id": 99}, {"$set": {"v": 1}}).matched_count == 0
            assert items.delete_many({"v": {"$gt": 100}}).deleted_count == 0
            assert sorted(d["_id"] for d in items.find()) == [0, 1, 2] and items.count_documents({}) == 3
            writer.admin.scratch.insert_one({"_id": "ok"})
            fence.shop.items.insert_one({"_id": 40})
            fence.shop.items.create_index("v")
        finally:
            fence.admin.command("setUserWriteBlockMode", 1, **{"global": False})
        assert writer.admin.command("serverStatus")["repl"]["userWriteBlockMode"] == 1
        items.insert_one({"_id": 50})
        assert sorted(d["_id"] for d in items.find()) == [0, 1, 2, 40, 50]
        writer.admin.scratch.drop()
        with pytest.raises(OperationFailure) as wrong_db:
            fence.shop.command("setUserWriteBlockMode", 1, **{"global": True})
        assert wrong_db.value.code == 13 and "admin database" in str(wrong_db.value)
        with pytest.raises(OperationFailure) as missing:
            fence.admin.command("setUserWriteBlockMode", 1)
        assert missing.value.code == 40414


def test_append_oplog_note_is_a_fresh_point_invisible_to_user_streams(proxy, set_name, source) -> None:
    with _client(proxy, set_name) as writer, _client(proxy, set_name, FENCE_APP) as fence:
        with writer.watch(max_await_time_ms=200) as stream:  # cluster-wide, as the live engine reads
            first = writer.shop.items.insert_one({"_id": 1})
            assert stream.try_next()["documentKey"] == {"_id": 1}
            write_time = writer.admin.command("ping")["operationTime"]
            note = fence.admin.command("appendOplogNote", 1, data={"msg": "cutover fence"})
            assert note["ok"] == 1 and note["operationTime"] > write_time and "$clusterTime" in note
            before = stream.resume_token
            deadline = time.monotonic() + 5
            while stream.resume_token == before and time.monotonic() < deadline:
                assert stream.try_next() is None  # the note is no user event
            assert stream.resume_token != before  # ... but the postBatchResumeToken moved past it
            token = stream.resume_token
        writer.shop.items.insert_one({"_id": 2})
        with writer.watch(resume_after=token, max_await_time_ms=200) as resumed:
            event = resumed.try_next()
            while event is None:
                event = resumed.try_next()
            assert event["documentKey"] == {"_id": 2}  # nothing between the note and the next user write
        assert first.acknowledged
        with pytest.raises(OperationFailure) as no_data:
            fence.admin.command("appendOplogNote", 1)
        assert (no_data.value.code, no_data.value.details["codeName"]) == (4, "NoSuchKey")
        with pytest.raises(OperationFailure) as elsewhere:
            fence.shop.command("appendOplogNote", 1, data={})
        assert elsewhere.value.code == 13


def _next(stream):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        event = stream.try_next()
        if event is not None:
            return event
    raise AssertionError("no change event within 20 s")


def test_large_events_are_refused_without_the_split_stage_and_split_with_it(proxy, set_name, source) -> None:
    with ReplicaSetProxy(source.local.port, server_version="6.0.5") as old, _client(old, set_name) as on_old, \
            _client(proxy, set_name) as client:
        assert on_old.admin.command("buildInfo")["version"] == "6.0.5"
        assert on_old.admin.command("hello")["maxWireVersion"] == 17
        with pytest.raises(OperationFailure) as no_stage:
            on_old.shop.big.watch([{"$changeStreamSplitLargeEvent": {}}])
        assert no_stage.value.code == 40324

        big = client.shop.big
        big.insert_one({"_id": 0, "a": "x" * (6 << 20)})
        kwargs = {"full_document": "updateLookup", "max_await_time_ms": 200}
        with big.watch(**kwargs) as plain, big.watch([{"$changeStreamSplitLargeEvent": {}}], **kwargs) as split, \
                on_old.shop.big.watch(**kwargs) as plain_old:
            big.update_one({"_id": 0}, {"$set": {"b": "y" * (6 << 20)}})  # event: 12 MiB document + 6 MiB change
            for stream in (plain, plain_old):
                with pytest.raises(OperationFailure) as too_large:
                    _next(stream)
                assert (too_large.value.code, too_large.value.details["codeName"]) == (10334, "BSONObjectTooLarge")
                assert "Executor error during getMore :: caused by :: BSONObj size: " in str(too_large.value)
                assert "Size must be between 0 and 16793600(16MB) First element: _id: { _data: " in str(too_large.value)
            fragments = [_next(split), _next(split)]
            assert [f["splitEvent"] for f in fragments] == [{"fragment": 1, "of": 2}, {"fragment": 2, "of": 2}]
            assert all(len(bson.encode(f)) <= 16 << 20 for f in fragments)
            assert fragments[0]["_id"] != fragments[1]["_id"]  # each fragment has its own resume token
            assert {"fullDocument", "updateDescription"} <= set(fragments[0]) | set(fragments[1])
            big.insert_one({"_id": 1})
            assert _next(split)["documentKey"] == {"_id": 1}
        # Resuming from the first fragment gives the second, from the last one the next event (as on mongod).
        pipeline = [{"$changeStreamSplitLargeEvent": {}}]
        with big.watch(pipeline, resume_after=fragments[0]["_id"], **kwargs) as resumed:
            again = _next(resumed)
            assert again["splitEvent"] == {"fragment": 2, "of": 2} and again["_id"] == fragments[1]["_id"]
        with big.watch(pipeline, resume_after=fragments[1]["_id"], **kwargs) as resumed:
            assert _next(resumed)["documentKey"] == {"_id": 1}


def test_command_line_prints_its_address_and_serves(source_server, set_name) -> None:
    argv = [sys.executable, "-m", "devtools.replica_set_proxy", "--backend-port", str(source_server.local.port),
            "--bypass-app-name", FENCE_APP]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on 127.0.0.1:")
        host = line.removeprefix("listening on ")
        with pymongo.MongoClient(f"mongodb://{host}/?replicaSet={set_name}", serverSelectionTimeoutMS=10_000) as c:
            assert c.admin.command("hello")["me"] == host
            assert c.admin.command("serverStatus")["repl"]["userWriteBlockMode"] == 1
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
