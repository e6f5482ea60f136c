"""The live verifier: ``first_difference`` without servers, then compare/recheck against real server processes.

Sizes stay small: the test server answers ``_id`` ranges with a collection scan (see FIELD-NOTES).
"""

from __future__ import annotations

import logging

import pytest
from bson import SON, Decimal128, Int64, ObjectId, encode
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import monitoring

from atlas_migration.engines.live import Partition, id_to_json, partitions_from_boundaries
from atlas_migration.engines.verifier import (
    MISMATCH_COLLECTION,
    RECHECK_COLLECTION,
    Difference,
    LiveVerifier,
    MalformedBSON,
    compare_documents,
    first_difference,
    raw_id_key,
)
from atlas_migration.errors import ConfigurationError

STATE_DB = "__atlas_migration_test"
RAW = CodecOptions(document_class=RawBSONDocument)
PREFIX = "t_"


# ------------------------------------------------------------------------------------- pure functions
def doc(*pairs) -> bytes:
    return encode(SON(list(pairs)))


def test_first_difference_equal_documents_is_none():
    assert first_difference(doc(("_id", 1), ("a", {"b": [1, 2]})), doc(("_id", 1), ("a", {"b": [1, 2]}))) is None


def test_first_difference_descends_into_subdocuments_and_arrays():
    src = doc(("_id", 1), ("a", SON([("b", 1), ("c", SON([("d", "x")]))])), ("items", [{"sku": "p"}, {"sku": "q"}]))
    assert first_difference(src, doc(("_id", 1), ("a", SON([("b", 1), ("c", SON([("d", "y")]))])),
                                     ("items", [{"sku": "p"}, {"sku": "q"}]))) == Difference("a.c.d", "value")
    assert first_difference(src, doc(("_id", 1), ("a", SON([("b", 1), ("c", SON([("d", "x")]))])),
                                     ("items", [{"sku": "p"}, {"sku": "Q"}]))) == Difference("items.1.sku", "value")
    # An array element only one side has.
    assert first_difference(src, doc(("_id", 1), ("a", SON([("b", 1), ("c", SON([("d", "x")]))])),
                                     ("items", [{"sku": "p"}]))) == Difference("items.1", "only_on_source")


def test_first_difference_reports_type_differences_even_for_equal_numbers():
    assert first_difference(doc(("_id", 1), ("n", 1)), doc(("_id", 1), ("n", 1.0))) == Difference("n", "type")
    assert first_difference(doc(("_id", 1), ("n", Int64(1))), doc(("_id", 1), ("n", 1))) == Difference("n", "type")
    assert first_difference(doc(("_id", 1), ("n", Decimal128("1.0"))),
                            doc(("_id", 1), ("n", Decimal128("1.00")))) == Difference("n", "value")
    assert first_difference(doc(("_id", 1), ("a", {"x": 1})), doc(("_id", 1), ("a", [1]))) == Difference("a", "type")


def test_first_difference_missing_fields_on_either_side():
    assert first_difference(doc(("_id", 1), ("a", 1), ("b", 2)), doc(("_id", 1), ("a", 1))) == \
        Difference("b", "only_on_source")
    assert first_difference(doc(("_id", 1), ("a", 1)), doc(("_id", 1), ("a", 1), ("z", {"y": 1}))) == \
        Difference("z", "only_on_target")
    assert first_difference(doc(("_id", 1), ("a", {"x": 1})), doc(("_id", 1), ("a", {"x": 1, "y": 2}))) == \
        Difference("a.y", "only_on_target")


def test_first_difference_field_order_is_a_difference_reported_after_value_differences():
    # Same fields and values in another order: BSON equality is byte equality, so this is a mismatch,
    # reported at the first position whose field names disagree (source side), with reason field_order.
    assert first_difference(doc(("_id", 1), ("a", 1), ("b", 2)), doc(("_id", 1), ("b", 2), ("a", 1))) == \
        Difference("a", "field_order")
    assert first_difference(doc(("_id", 1), ("s", SON([("x", 1), ("y", 2)]))),
                            doc(("_id", 1), ("s", SON([("y", 2), ("x", 1)])))) == Difference("s.x", "field_order")
    # A value difference wins over an order difference: it is what changes what an application reads.
    assert first_difference(doc(("_id", 1), ("a", 1), ("b", 2)), doc(("_id", 1), ("b", 3), ("a", 1))) == \
        Difference("b", "value")


def test_first_difference_refuses_malformed_bson():
    with pytest.raises(MalformedBSON):
        first_difference(b"\x05\x00\x00\x00\x00", b"\x10\x00\x00\x00\x00")


def test_compare_documents_names_the_missing_side_and_sizes_only():
    a = doc(("_id", 7), ("name", "personal"))
    assert compare_documents("d", "c", 7, a, a) is None
    assert compare_documents("d", "c", 7, None, None) is None
    gone = compare_documents("d", "c", 7, a, None)
    assert (gone.missing, gone.field, gone.reason, gone.source_bytes, gone.target_bytes) == \
        ("target", None, "document_missing", len(a), None)
    assert compare_documents("d", "c", 7, None, a).missing == "source"
    changed = compare_documents("d", "c", 7, a, doc(("_id", 7), ("name", "other")))
    assert (changed.missing, changed.field, changed.reason) == (None, "name", "value")


def test_raw_id_key_tells_int_from_double_ids():
    assert raw_id_key(doc(("a", 1), ("_id", 5))) == raw_id_key(doc(("_id", 5)))
    assert raw_id_key(doc(("_id", 5))) != raw_id_key(doc(("_id", 5.0)))


# ------------------------------------------------------------------------------------------ with servers
def seed(src, tgt, n: int = 40) -> list[Partition]:
    """``n`` documents in db.items (two partitions) plus a capped collection, copied byte for byte."""
    docs = [SON([("_id", i), ("name", f"n{i}"), ("nested", SON([("a", i), ("tags", ["x", i])]))]) for i in range(n)]
    src["db"]["items"].insert_many(docs)
    tgt[f"{PREFIX}db"]["items"].insert_many(docs)
    for client, name in ((src, "db"), (tgt, f"{PREFIX}db")):
        client[name].create_collection("log", capped=True, size=1 << 20)
        client[name]["log"].insert_many([{"_id": ObjectId(f"{i:024x}"), "line": i} for i in range(5)])
    return (partitions_from_boundaries("db", "items", f"{PREFIX}db", [n // 2], n)
            + partitions_from_boundaries("db", "log", f"{PREFIX}db", [], 5, capped=True))


def make(src, tgt, **kwargs) -> LiveVerifier:
    return LiveVerifier(src, tgt, sync_id=kwargs.pop("sync_id", "v1"), state_db=STATE_DB,
                        target_db_prefix=PREFIX, **kwargs)


@pytest.fixture
def clients(source, target):
    with source.client() as src, target.client() as tgt:
        yield src, tgt


def test_identical_data_is_clean(clients):
    src, tgt = clients
    partitions = seed(src, tgt)
    verifier = make(src, tgt, batch_size=8)
    assert verifier.register_partitions(partitions) == 3
    assert verifier.summary()["partitions"] == {"compared": 0, "total": 3}
    results = [verifier.compare_partition(p) for p in partitions]
    assert [r["mismatches"] for r in results] == [0, 0, 0]
    assert sum(r["documents"] for r in results) == 45 == sum(r["target_documents"] for r in results)
    summary = verifier.summary()
    assert summary["clean"] is True
    assert summary["partitions"] == {"compared": 3, "total": 3}
    assert summary["documents_compared"] == 45
    assert summary["mismatches"] == {"open": 0, "resolved": 0, "first": []}
    assert summary["compare_docs_per_second"] > 0
    assert verifier.recheck().clean
    # A compared partition is not compared again.
    assert verifier.compare_partition(partitions[0])["already_done"] is True


def test_changed_target_document_stays_open_until_repaired(clients, caplog):
    src, tgt = clients
    partitions = seed(src, tgt)
    verifier = make(src, tgt)
    tgt[f"{PREFIX}db"]["items"].update_one({"_id": 25}, {"$set": {"nested.tags.1": 999}})
    with caplog.at_level(logging.WARNING):
        results = [verifier.compare_partition(p) for p in partitions]
    assert [r["mismatches"] for r in results] == [0, 1, 0]
    assert "_id 25: field 'nested.tags.1' differs (value)" in caplog.text
    [open_one] = verifier.open_mismatches()
    assert (open_one["ns"], open_one["_id"], open_one["field"], open_one["missing"]) == \
        ("db.items", 25, "nested.tags.1", None)
    # No document content is stored: only where it differs, and sizes.
    stored = tgt[STATE_DB][MISMATCH_COLLECTION].find_one({"sync_id": "v1"})
    assert set(stored) == {"_id", "sync_id", "ns", "id", "field", "missing", "reason", "source_bytes", "target_bytes",
                           "found_by", "last_seen_at", "resolved", "resolved_at", "resolution", "first_seen_at", "seen"}

    for _ in range(2):  # stays open across generations while the target is wrong
        result = verifier.recheck()
        assert (result.clean, result.compared, result.mismatches, result.pending) == (False, 1, 1, 1)
    # Repaired (as a replayed event would): the next recheck resolves it and keeps it as history.
    tgt[f"{PREFIX}db"]["items"].replace_one({"_id": 25}, src["db"]["items"].find_one({"_id": 25}))
    result = verifier.recheck()
    assert (result.clean, result.compared, result.mismatches, result.pending, result.open_mismatches) == \
        (True, 1, 0, 0, 0)
    history = tgt[STATE_DB][MISMATCH_COLLECTION].find_one({"sync_id": "v1"})
    assert (history["resolved"], history["resolution"], history["seen"]) == (True, "equal", 3)
    assert verifier.summary()["mismatches"]["resolved"] == 1


def test_document_missing_on_either_side(clients):
    src, tgt = clients
    partitions = seed(src, tgt)
    tgt[f"{PREFIX}db"]["items"].delete_one({"_id": 3})
    tgt[f"{PREFIX}db"]["items"].insert_one({"_id": 1000, "extra": True})  # beyond the last source _id
    tgt[f"{PREFIX}db"]["log"].insert_one({"_id": ObjectId(), "line": 99})  # capped, whole collection
    verifier = make(src, tgt, batch_size=6)
    for p in partitions:
        verifier.compare_partition(p)
    found = {(m["ns"], str(m["_id"]), m["missing"], m["reason"]) for m in verifier.open_mismatches()}
    assert {(ns, missing) for ns, _, missing, _ in found} == {("db.items", "target"), ("db.items", "source"),
                                                              ("db.log", "source")}
    assert ("db.items", "3", "target", "document_missing") in found
    assert ("db.items", "1000", "source", "document_missing") in found
    # The change stream later says the extra target document was deleted, and the target repaired.
    tgt[f"{PREFIX}db"]["items"].delete_one({"_id": 1000})
    tgt[f"{PREFIX}db"]["log"].delete_many({"line": 99})
    tgt[f"{PREFIX}db"]["items"].insert_one(RawBSONDocument(
        src["db"].get_collection("items", codec_options=RAW).find_one({"_id": 3}).raw))
    assert verifier.note_changed([("db", "items", 1000)]) == 1
    result = verifier.recheck()
    assert result.clean, result


def test_killed_compare_resumes_from_its_checkpoint_without_re_reporting(clients):
    src, tgt = clients
    seed(src, tgt, n=30)
    partition = partitions_from_boundaries("db", "items", f"{PREFIX}db", [], 30)[0]
    tgt[f"{PREFIX}db"]["items"].update_one({"_id": 2}, {"$set": {"name": "x"}})  # in the first batch
    verifier = make(src, tgt, batch_size=5, parallel=False)
    compared: list[int] = []

    def kill_after_third_source_batch(stage: str, n: int) -> None:
        if stage == "verify_source":
            compared.append(n)
            if n == 3:
                raise RuntimeError("killed")

    verifier.fault_hook = kill_after_third_source_batch
    with pytest.raises(RuntimeError, match="killed"):
        verifier.compare_partition(partition)
    again = make(src, tgt, batch_size=5, parallel=False)  # a new task: nothing kept in memory
    again_batches: list[int] = []
    again.fault_hook = lambda stage, n: again_batches.append(n) if stage == "verify_source" else None
    result = again.compare_partition(partition)
    # Batch 3 was compared but not checkpointed: it is compared again, batches 1-2 are not.
    assert result["resumed_from"]["source"] == 9
    assert len(again_batches) == 4  # _id 10..29 in batches of 5
    assert result["documents"] == 30 and result["mismatches"] == 1
    [mismatch] = tgt[STATE_DB][MISMATCH_COLLECTION].find({"sync_id": "v1"})
    assert (mismatch["field"], mismatch["seen"]) == ("name", 1)


def test_recheck_keeps_an_entry_touched_after_its_read(clients):
    src, tgt = clients
    seed(src, tgt, n=10)
    verifier = make(src, tgt)
    assert verifier.note_changed([("db", "items", 4), ("db", "items", 4), ("db", "items", 5)]) == 2
    assert verifier.note_changed([("db", "items", 5)]) == 1  # idempotent per _id
    assert tgt[STATE_DB][RECHECK_COLLECTION].count_documents({"sync_id": "v1"}) == 2

    def retouched_meanwhile(stage: str, n: int) -> None:
        if stage == "recheck":  # the change stream touches _id 4 after the recheck read it
            verifier.fault_hook = None
            verifier.note_changed([("db", "items", 4)])

    verifier.fault_hook = retouched_meanwhile
    result = verifier.recheck()
    # _id 5 left the queue; _id 4 was re-read in the same generation once touched, then left too.
    assert (result.compared, result.pending, result.clean) == (3, 0, True)

    verifier.note_changed([("db", "items", 4)])
    verifier.fault_hook = lambda stage, n: (_ for _ in ()).throw(RuntimeError("killed")) if stage == "recheck" \
        else None
    with pytest.raises(RuntimeError):
        verifier.recheck()
    verifier.fault_hook = None
    assert tgt[STATE_DB][RECHECK_COLLECTION].count_documents({"sync_id": "v1"}) == 1  # a killed recheck loses none
    assert verifier.recheck().clean


def test_rename_moves_queued_rechecks(clients):
    src, tgt = clients
    seed(src, tgt, n=10)
    verifier = make(src, tgt)
    tgt[f"{PREFIX}db"]["items"].update_one({"_id": 1}, {"$set": {"name": "wrong"}})
    verifier.note_changed([("db", "items", 1), ("db", "items", 2)])
    assert verifier.recheck().open_mismatches == 1
    # db.items renamed to db.renamed on both sides (the engine replays the rename on the target).
    src.admin.command("renameCollection", "db.items", to="db.renamed")
    tgt.admin.command("renameCollection", f"{PREFIX}db.items", to=f"{PREFIX}db.renamed")
    assert verifier.rename_namespace("db", "items", "db", "renamed") == 1
    queued = list(tgt[STATE_DB][RECHECK_COLLECTION].find({"sync_id": "v1"}))
    assert [(q["ns"], q["id"]) for q in queued] == [("db.renamed", 1)]
    result = verifier.recheck()
    assert (result.mismatches, result.open_mismatches) == (1, 1)
    assert verifier.open_mismatches()[0]["ns"] == "db.renamed"


class _Commands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict]] = []

    def started(self, event) -> None:
        self.seen.append((event.command_name, dict(event.command)))

    def succeeded(self, event) -> None:
        pass

    def failed(self, event) -> None:
        pass


def test_memory_is_bounded_by_the_batch_because_every_read_is_a_batch_sized_cursor_or_in_list(source, target):
    """Why the memory is bounded: both passes read with cursors whose every reply is at most ``batch_size``
    documents, and look up the other side with ``$in`` lists of at most ``batch_size`` ``_id``\\ s; the verifier
    holds one batch and its counterparts at a time, never a collection-sized set."""
    batch = 7
    src_events, tgt_events = _Commands(), _Commands()
    with source.client(event_listeners=[src_events]) as src, target.client(event_listeners=[tgt_events]) as tgt:
        partitions = seed(src, tgt, n=100)
        tgt[f"{PREFIX}db"]["items"].update_one({"_id": 50}, {"$set": {"name": "x"}})
        verifier = make(src, tgt, batch_size=batch)
        src_events.seen.clear()
        tgt_events.seen.clear()
        for p in partitions:
            verifier.compare_partition(p)
        verifier.note_changed([("db", "items", i) for i in range(100)])
        verifier.recheck()
    assert verifier.max_documents_held <= 2 * batch
    data_reads = [(side, cmd) for side, events in (("source", src_events), ("target", tgt_events))
                  for name, cmd in events.seen if name in ("find", "getMore")
                  and not str(cmd.get("find", cmd.get("collection", ""))).startswith("verifier_")
                  and cmd.get("$db") != STATE_DB]
    assert data_reads
    for side, cmd in data_reads:
        assert 0 < cmd.get("batchSize", 0) <= batch, (side, cmd)
        ids = (cmd.get("filter") or {}).get("_id")
        if isinstance(ids, dict) and "$in" in ids:
            assert len(ids["$in"]) <= batch
    # Source reads: primary with read concern majority, whatever the connection says.
    source_finds = [cmd for side, cmd in data_reads if side == "source" and "find" in cmd]
    assert source_finds and all(cmd.get("readConcern") == {"level": "majority"} for cmd in source_finds)


def test_bad_arguments_are_refused_before_anything_is_written(clients):
    src, tgt = clients
    with pytest.raises(ConfigurationError):
        LiveVerifier(src, tgt, sync_id="", state_db=STATE_DB)
    with pytest.raises(ConfigurationError):
        LiveVerifier(src, tgt, sync_id="x", state_db="admin")
    partitions = seed(src, tgt, n=10)
    verifier = make(src, tgt)
    verifier.compare_partition(partitions[0])
    moved = Partition(**{**partitions[0].to_dict(), "upper": id_to_json(3)})
    with pytest.raises(ConfigurationError, match="differs"):
        verifier.compare_partition(moved)
