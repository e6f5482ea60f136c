"""devtools.replica_set_proxy: mongod's record-position resume of natural-order scans ($_requestResumeToken,
postBatchResumeToken, $_resumeAfter), through the proxy in front of the session's SecantusDB source."""

from __future__ import annotations

from collections.abc import Iterator

import bson
import pymongo
import pytest
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo.errors import OperationFailure

from devtools.replica_set_proxy import (
    ReplicaSetProxy,
    id_key,
    natural_hint,
    resume_token_error,
    without_element,
)

RAW = CodecOptions(document_class=RawBSONDocument)
NATURAL = {"$natural": 1}
REQUEST, AFTER = "$_requestResumeToken", "$_resumeAfter"
DOCS = 23


# ---------------------------------------------------------------- pure


def test_without_element_keeps_every_other_byte_and_the_field_order() -> None:
    doc = {"_id": 1, "a": {"b": [1, "x"]}, "$recordId": bson.Int64(7), "z": bson.Regex("^a", "i"),
           "bin": bson.Binary(b"\x00\x01", 4), "d": bson.Decimal128("1.5")}
    raw = bson.encode(doc)
    expected = bson.encode({k: v for k, v in doc.items() if k != "$recordId"})
    assert without_element(raw, "$recordId") == expected
    assert without_element(expected, "$recordId") == expected
    assert id_key(raw) == bson.encode({"_id": 1})
    assert id_key(bson.encode({"a": 1})) is None


def test_resume_token_errors_are_mongods() -> None:
    find = {"find": "c", REQUEST: True}
    assert resume_token_error({**find, "hint": NATURAL}) is None
    assert resume_token_error({**find, "hint": {"$natural": 1.0}, "sort": NATURAL}) is None
    no_hint = resume_token_error(find)
    assert no_hint is not None and no_hint["code"] == 2 and \
        no_hint["errmsg"] == "hint must be {$natural:1} if 'requestResumeToken' is enabled"
    assert resume_token_error({**find, "hint": {"_id": 1}})["code"] == 2
    assert resume_token_error({**find, "hint": {"$natural": -1}})["code"] == 2
    assert "sort must be unset" in resume_token_error({**find, "hint": NATURAL, "sort": {"a": 1}})["errmsg"]
    malformed = resume_token_error({**find, "hint": NATURAL, AFTER: {"$recordId": 5}})  # int32, not NumberLong
    assert malformed["code"] == 2 and malformed["errmsg"].startswith("Malformed resume token")
    assert resume_token_error({**find, "hint": NATURAL, AFTER: {"$recordId": bson.Int64(5), "x": 1}})["code"] == 2
    assert resume_token_error({**find, "hint": NATURAL, AFTER: {"$recordId": None}}) is None
    without = resume_token_error({"find": "c", "hint": NATURAL, AFTER: {"$recordId": bson.Int64(5)}})
    assert without["errmsg"] == "'requestResumeToken' must be true if 'resumeAfter' is specified"
    assert natural_hint({"$natural": 1}) and not natural_hint({"$natural": True}) and not natural_hint("_id_")


# ---------------------------------------------------------------- through the proxy


@pytest.fixture(scope="module")
def proxy(source_server) -> Iterator[ReplicaSetProxy]:
    with ReplicaSetProxy(source_server.local.port) as proxy:
        yield proxy


@pytest.fixture
def client(proxy, source) -> Iterator[pymongo.MongoClient]:
    with source.client() as direct:
        set_name = direct.admin.command("hello")["setName"]
    with pymongo.MongoClient(f"mongodb://{proxy.host}/?replicaSet={set_name}",
                             serverSelectionTimeoutMS=10_000) as client:
        yield client


@pytest.fixture
def coll(client):
    coll = client.resumedb.things
    coll.insert_many([{"_id": i, "n": i, "pad": "x" * (i * 37 % 200), "sub": {"z": i, "a": [i, str(i)]}}
                      for i in range(DOCS)])
    return coll


def _find(db, session, **options):
    return db.command("find", "things", hint=NATURAL, session=session, codec_options=RAW,
                      **{REQUEST: True}, **options)


def _more(db, session, cursor_id: int, batch_size: int):
    return db.command("getMore", bson.Int64(cursor_id), collection="things", batchSize=batch_size, session=session,
                      codec_options=RAW)


def _scan(db, session, batch_size: int, **options) -> list[tuple[list[bytes], dict]]:
    """Every batch of a resumable scan: (documents' raw bytes, postBatchResumeToken)."""
    reply = _find(db, session, batchSize=batch_size, **options)["cursor"]
    batches = [([d.raw for d in reply["firstBatch"]], bson.decode(reply["postBatchResumeToken"].raw))]
    cursor_id = reply["id"]
    while cursor_id:
        reply = _more(db, session, cursor_id, batch_size)["cursor"]
        batches.append(([d.raw for d in reply["nextBatch"]], bson.decode(reply["postBatchResumeToken"].raw)))
        cursor_id = reply["id"]
    return batches


def _plain(coll) -> list[bytes]:
    return [d.raw for d in coll.with_options(codec_options=RAW).find(hint=[("$natural", 1)])]


def test_tokens_on_find_and_getmore_increase_and_every_document_comes_once_byte_identical(client, coll) -> None:
    db = client.resumedb
    with client.start_session() as session:
        batches = _scan(db, session, batch_size=5)
    documents = [raw for batch, _ in batches for raw in batch]
    assert documents == _plain(coll)  # every document once, natural order, exact bytes
    assert all(b"$recordId" not in raw for raw in documents)
    tokens = [token["$recordId"] for batch, token in batches if batch]
    # Batches cut by batchSize name their last record; the batch that reaches the end says null, as mongod's
    # CollectionScan resets its last-seen record at EOF.
    assert all(isinstance(t, bson.Int64) for t in tokens[:-1]) and tokens[-1] is None
    assert tokens[:-1] == sorted(tokens[:-1]) and len(set(tokens[:-1])) == len(tokens) - 1
    assert [len(batch) for batch, _ in batches] == [5, 5, 5, 5, 3]
    # The same documents keep their record ids in a second scan.
    with client.start_session() as session:
        again = _scan(db, session, batch_size=5)
    assert [t for _, t in again] == [t for _, t in batches]


def test_empty_first_batch_and_exact_end_give_a_null_token(client, coll) -> None:
    db = client.resumedb
    with client.start_session() as session:
        reply = _find(db, session, batchSize=0)["cursor"]
        assert list(reply["firstBatch"]) == [] and bson.decode(reply["postBatchResumeToken"].raw) == \
            {"$recordId": None}
        full = _more(db, session, reply["id"], DOCS)["cursor"]
        assert len(full["nextBatch"]) == DOCS and full["id"] != 0  # cut by batchSize: the end not seen yet
        assert isinstance(bson.decode(full["postBatchResumeToken"].raw)["$recordId"], bson.Int64)
        end = _more(db, session, full["id"], DOCS)["cursor"]
        assert list(end["nextBatch"]) == [] and end["id"] == 0
        assert bson.decode(end["postBatchResumeToken"].raw) == {"$recordId": None}
    with client.start_session() as session:
        limited = _find(db, session, batchSize=10, limit=4)["cursor"]
        assert len(limited["firstBatch"]) == 4 and limited["id"] == 0
        assert isinstance(bson.decode(limited["postBatchResumeToken"].raw)["$recordId"], bson.Int64)


def test_resume_after_batch_k_returns_exactly_the_documents_after_it(client, coll) -> None:
    db = client.resumedb
    with client.start_session() as session:
        batches = _scan(db, session, batch_size=4)
    for k in (0, 2, 4):
        documents_after = [raw for batch, _ in batches[k + 1:] for raw in batch]
        with client.start_session() as session:
            resumed = _scan(db, session, batch_size=4, **{AFTER: batches[k][1]})
        assert [raw for batch, _ in resumed for raw in batch] == documents_after
        assert [len(batch) for batch, _ in resumed] == [len(batch) for batch, _ in batches[k + 1:]]  # honest sizes
        assert resumed[0][1] == batches[k + 1][1]  # the same record ids as the first scan
    # A natural sort is allowed with the token; any other sort is refused as mongod refuses it.
    with client.start_session() as session:
        sorted_scan = _scan(db, session, batch_size=4, sort=NATURAL, **{AFTER: batches[0][1]})
    assert [raw for batch, _ in sorted_scan for raw in batch] == [raw for batch, _ in batches[1:] for raw in batch]
    with pytest.raises(OperationFailure) as by_n:
        _find(db, None, sort={"n": 1})
    assert by_n.value.code == 2 and "sort must be unset or {$natural:1}" in by_n.value.details["errmsg"]
    # Default batch size: all that is left, in one batch.
    with client.start_session() as session:
        reply = _find(db, session, **{AFTER: batches[1][1]})["cursor"]
    assert [d.raw for d in reply["firstBatch"]] == [raw for batch, _ in batches[2:] for raw in batch]


def test_resume_after_updates_and_an_insert_at_the_end(client, coll) -> None:
    db = client.resumedb
    with client.start_session() as session:
        batches = _scan(db, session, batch_size=5)
    token = batches[1][1]  # after the 10th document
    coll.update_one({"_id": 3}, {"$set": {"pad": "y" * 5000, "added": True}})  # an earlier document grows
    coll.update_one({"_id": 9}, {"$unset": {"sub": 1}})  # the resume record itself changes
    coll.update_one({"_id": 15}, {"$set": {"n": -15, "big": "z" * 100_000}})  # a later one
    coll.replace_one({"_id": 20}, {"other": 20})
    coll.insert_one({"_id": "new", "n": 99})
    with client.start_session() as session:
        resumed = _scan(db, session, batch_size=5, **{AFTER: token})
    documents = [raw for batch, _ in resumed for raw in batch]
    assert documents == _plain(coll)[10:]
    assert [bson.decode(raw)["_id"] for raw in documents] == [*range(10, DOCS), "new"]
    assert bson.decode(documents[5])["big"] == "z" * 100_000


def test_resume_after_a_deleted_record_fails_with_key_not_found(client, coll) -> None:
    db = client.resumedb
    with client.start_session() as session:
        first = _find(db, session, batchSize=3)["cursor"]
        token = bson.decode(first["postBatchResumeToken"].raw)
        db.command("killCursors", "things", cursors=[first["id"]], session=session)
    coll.delete_one({"_id": 1})  # a record before the resume record: the scan still resumes after record 3
    with client.start_session() as session:
        resumed = _scan(db, session, batch_size=50, **{AFTER: token})
    assert [bson.decode(raw)["_id"] for batch, _ in resumed for raw in batch] == list(range(3, DOCS))
    coll.delete_one({"_id": 2})  # the resume record itself
    with client.start_session() as session, pytest.raises(OperationFailure) as failure:
        _find(db, session, batchSize=3, **{AFTER: token})
    assert failure.value.code == 211 and failure.value.details["codeName"] == "KeyNotFound"
    assert failure.value.details["errmsg"] == (
        "Executor error during find command :: caused by :: Failed to resume collection scan: the recordId from "
        f"which we are attempting to resume no longer exists in the collection: RecordId({token['$recordId']})")
    with pytest.raises(OperationFailure) as unknown:
        _find(db, None, **{AFTER: {"$recordId": bson.Int64(10**12)}})
    assert unknown.value.code == 211
    with pytest.raises(OperationFailure) as null:
        _find(db, None, **{AFTER: {"$recordId": None}})
    assert null.value.code == 211 and "cannot resume from null recordId" in null.value.details["errmsg"]


def test_request_resume_token_without_the_natural_hint_is_refused(client, coll) -> None:
    db = client.resumedb
    with pytest.raises(OperationFailure) as failure:
        db.command("find", "things", **{REQUEST: True})
    assert failure.value.code == 2 and failure.value.details["codeName"] == "BadValue"
    assert failure.value.details["errmsg"] == "hint must be {$natural:1} if 'requestResumeToken' is enabled"
    with pytest.raises(OperationFailure) as by_id:
        db.command("find", "things", hint={"_id": 1}, **{REQUEST: True})
    assert by_id.value.code == 2
    with pytest.raises(OperationFailure) as after_only:
        db.command("find", "things", hint=NATURAL, **{AFTER: {"$recordId": bson.Int64(1)}})
    assert after_only.value.code == 2
    with pytest.raises(OperationFailure) as malformed:  # an int32 record id
        db.command("find", "things", hint=NATURAL, **{REQUEST: True, AFTER: {"$recordId": 1}})
    assert malformed.value.code == 2 and malformed.value.details["errmsg"].startswith("Malformed resume token")
    # Without the option the find is the backend's own (no token).
    plain = db.command("find", "things", hint=NATURAL, batchSize=2)["cursor"]
    assert "postBatchResumeToken" not in plain and all("$recordId" not in d for d in plain["firstBatch"])


def test_filters_projections_kill_cursors_and_show_record_id(client, coll) -> None:
    db = client.resumedb
    with client.start_session() as session:
        batches = _scan(db, session, batch_size=3, filter={"n": {"$mod": [2, 0]}}, projection={"pad": 0})
        evens = [bson.decode(raw) for batch, _ in batches for raw in batch]
        assert [d["_id"] for d in evens] == list(range(0, DOCS, 2)) and all("pad" not in d for d in evens)
        assert all("$recordId" not in d for d in evens)
        # Resume a filtered scan after a record; then after an odd record (not matching the filter).
        resumed = _scan(db, session, batch_size=3, filter={"n": {"$mod": [2, 0]}}, **{AFTER: batches[0][1]})
        assert [bson.decode(raw)["_id"] for batch, _ in resumed for raw in batch] == list(range(6, DOCS, 2))
        everything = _scan(db, session, batch_size=7)
        odd_token = everything[0][1]  # after _id 6
        resumed = _scan(db, session, batch_size=7, filter={"n": {"$mod": [2, 1]}}, **{AFTER: odd_token})
        assert [bson.decode(raw)["_id"] for batch, _ in resumed for raw in batch] == list(range(7, DOCS, 2))
        # killCursors of a tracked cursor works, and its getMore then fails as the backend's does.
        reply = _find(db, session, batchSize=2)["cursor"]
        killed = db.command("killCursors", "things", cursors=[reply["id"]], session=session)
        assert killed["cursorsKilled"] == [reply["id"]]
        with pytest.raises(OperationFailure):
            _more(db, session, reply["id"], 2)
        # showRecordId: the proxy's record id, as the last field.
        shown = _find(db, session, batchSize=2, showRecordId=True)["cursor"]
        first = bson.decode(shown["firstBatch"][0].raw)
        assert list(first)[-1] == "$recordId" and first["$recordId"] == \
            bson.decode(_find(db, session, batchSize=1)["cursor"]["postBatchResumeToken"].raw)["$recordId"]
