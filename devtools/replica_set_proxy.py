"""A loopback wire proxy in front of a replica set, adding the mongod commands a migration's cutover fence needs.

SecantusDB (the test server) lacks ``setUserWriteBlockMode`` and ``appendOplogNote``, ignores
``$_requestResumeToken`` and delivers change events that mongod refuses. Clients reach this proxy instead of
the server (its address is the replica set's only member as far as they can tell) and the proxy adds, as
MongoDB documents them:

``hello`` / ``isMaster`` (legacy OP_QUERY handshake too)
    ``hosts``, ``primary`` and ``me`` name the proxy (``passives``/``arbiters`` dropped), so a driver using
    ``replicaSet=<setName>`` discovery keeps talking to the proxy. ``compression`` is stripped both ways,
    so OP_COMPRESSED never appears. ``client.application.name`` of the handshake is remembered per
    connection (see the bypass below).

``setUserWriteBlockMode: 1, global: <bool>`` (new in 6.0; https://www.mongodb.com/docs/manual/reference/command/setUserWriteBlockMode/)
    Admin database only (elsewhere: code 13 "... may only be run against the admin database."); ``global``
    is required and boolean (IDL errors 40414 / TypeMismatch 14 as mongod's parser gives them); with a
    presented server version before 6.0 the command does not exist (CommandNotFound, 59). While enabled,
    every user write is refused with mongod's error: code 371, codeName ``UserWritesBlocked``, errmsg
    "User writes blocked" (mongod's ``GlobalUserWriteBlockState::checkUserWritesAllowed``). Like mongod,
    which checks in its op observer for every document actually written, the refusal is per statement:
    ``insert``/``update``/``delete`` answer ``ok: 1`` with ``writeErrors`` (the first statement that would
    write when ordered, each such statement when unordered); an update or delete whose filter matches no
    document (and is not an upsert) would write nothing, so it is not refused (the proxy asks the backend
    with a ``find`` ``limit: 1`` on the client's own connection), nor is a ``findAndModify`` that matches
    nothing. Refused as a command error: ``findAndModify`` that would write, ``create``, ``drop``,
    ``dropDatabase``, ``createIndexes``, ``dropIndexes``/``deleteIndexes``, ``collMod``,
    ``renameCollection`` (either namespace), ``convertToCapped``, ``cloneCollectionAsCapped``,
    ``emptycapped``, ``aggregate`` with ``$out``/``$merge`` into a user namespace, ``mapReduce`` to a
    collection, and ``bulkWrite`` (per-op errors in its cursor, ``nErrors``). Statements may come inline or
    in OP_MSG document sequences. Inside a multi-document transaction a refused write fails the command
    (top-level error, as write errors do in transactions); the proxy aborts the backend transaction and
    answers later commands of that transaction with NoSuchTransaction (251, TransientTransactionError).
    Reads are untouched. Exempt, as in mongod: the internal databases ``admin``, ``config`` and
    ``local``, ``<db>.system.profile`` and ``<db>.system.resharding.*``; and clients holding the
    ``bypassWriteBlockingMode`` privilege (the built-in ``restore`` role has it; SERVER-63174).
    IMITATION: a proxy cannot see a client's roles cheaply, so "holds bypassWriteBlockingMode" is
    represented by the handshake's application name being in ``bypass_app_names`` (``appname=`` in the
    URI). Likewise the ``setUserWriteBlockMode`` privilege (and ``appendOplogNote``'s): when
    ``privileged_app_names`` is given, other clients get Unauthorized (13); when it is None, any client may.
    ``connectionStatus`` with ``showPrivileges``: for an authenticated client allowed to run these commands,
    the privilege ``{resource: {cluster: true}, actions: [appendOplogNote, setUserWriteBlockMode]}`` is added
    to ``authenticatedUserPrivileges``, as mongod lists a user's privileges (SecantusDB lists none, even for
    root), so a pre-flight can check them.
    Reading the mode: mongod reports it in ``serverStatus`` as ``repl.userWriteBlockMode`` (1 disabled,
    2 enabled; 0 unknown), as mongod's own tests read it (jstests/noPassthrough/libs/user_write_blocking.js);
    the proxy adds that field to the backend's ``serverStatus`` reply.

``appendOplogNote: 1, data: {...}`` (https://www.mongodb.com/docs/manual/reference/command/appendOplogNote/)
    Admin only; ``data`` required and a document (NoSuchKey 4 / TypeMismatch 14, as mongod's
    ``bsonExtractTypedField`` reports). mongod writes a no-op (``op: "n"``) oplog entry and returns ``ok``
    with ``operationTime``/``$clusterTime`` (the docs: it advances the change-stream high-water mark).
    SecantusDB cannot write a no-op entry, so the proxy performs the nearest real write: an upsert of one
    document ``{_id: "appendOplogNote"}`` in ``admin.proxyOplogNotes`` (``data``, a counter, the time), on
    the client's own backend connection (so with its authentication). Its ``operationTime`` is a fresh
    oplog point after every earlier write. Checked with SecantusDB 0.7.0b3: a write to an admin collection
    DOES appear in its cluster-wide change streams (mongod's never show admin/config/local), and a stream
    that filters those databases out sees no event for it while its ``postBatchResumeToken`` advances past
    it. The proxy also makes cluster-wide streams (``allChangesForCluster``) behave like mongod's by adding
    ``{$match: {"ns.db": {$nin: ["admin", "config", "local"]}}}`` right after ``$changeStream``.

Large change events (https://www.mongodb.com/docs/manual/reference/operator/aggregation/changeStreamSplitLargeEvent/)
    For change-stream cursors (``aggregate`` with ``$changeStream`` and their ``getMore``s) without
    ``$changeStreamSplitLargeEvent`` as the last stage, a batch holding an event whose BSON exceeds
    mongod's limit fails the command with code 10334 ``BSONObjectTooLarge`` and mongod's message ("PlanExecutor
    error during aggregation :: caused by :: BSONObj size: N (0xHEX) is invalid. Size must be between 0 and
    16793600(16MB) First element: _id: ..."; "Executor error during getMore :: ..." for getMore), and the
    cursor is killed, as mongod kills it. The limit is mongod's: it serializes events with the default size
    trait, BSONObjMaxInternalSize = 16 MiB + 16 KiB = 16793600 bytes (``PlanExecutorPipeline::_trySerializeToBson``),
    so an event between 16 MiB and that still arrives whole, on mongod as here. With the stage present:
    SecantusDB does split (fragments carry ``splitEvent: {fragment: n, of: m}``), but every fragment carries
    the whole event's resume token, where mongod gives each fragment its own (resuming from fragment k gives
    fragment k+1; from the last, the next event). The proxy therefore gives fragments 1..m-1 tokens of its
    own (the event's ``_data`` plus a marker), sets ``postBatchResumeToken`` to the last fragment's token
    when a batch ends inside an event, and translates such a token in ``resumeAfter``/``startAfter`` into
    the point just before the event plus dropping the fragments already delivered. SecantusDB also returns
    one over-size "1 of 1" fragment for some events mongod does split (a document near 16 MiB plus its
    documentKey and token): the proxy splits those as mongod does (``split_event``: top-level fields packed
    in order into fragments of at most 16 MiB, each with the event's ``_id`` and ``splitEvent``). Where mongod
    cannot split an event into fragments of at most 16 MiB (one top-level field too big) it fails with code 7182500
    ("Splitting change event failed: fragment size ... is greater than maximum allowed fragment size
    16777216") and SecantusDB instead returns an over-size "1 of 1" fragment: the proxy refuses such a
    fragment with mongod's error. ``server_version`` (e.g. ``"6.0.5"``) makes the proxy present an older
    server: ``buildInfo`` ``version``/``versionArray``, ``serverStatus`` ``version``, ``hello``
    ``maxWireVersion`` and the FCV of ``getParameter`` are rewritten, and before 6.0.9 (and in 6.1-6.3)
    the split stage does not exist: a pipeline with it fails with 40324 "Unrecognized pipeline stage name".

Record-position resume of natural-order scans (``find`` with ``$_requestResumeToken``, mongod 4.4+)
    mongod's rules (``query_request_helper.cpp``, ``validateFindCommandRequest``), all code 2 ``BadValue``:
    ``$_requestResumeToken: true`` needs ``hint: {$natural: 1}`` ("hint must be {$natural:1} if
    'requestResumeToken' is enabled") and no sort but ``{$natural: 1}`` ("sort must be unset or {$natural:1}
    if 'requestResumeToken' is enabled"); ``$_resumeAfter`` needs ``$_requestResumeToken: true``
    ("'requestResumeToken' must be true if 'resumeAfter' is specified") and must be exactly
    ``{$recordId: <NumberLong, ObjectId or null>}`` ("Malformed resume token: the '_resumeAfter' object must
    contain exactly one field named '$recordId', of type NumberLong, jstOID or jstNULL."). Each reply, the
    ``find``'s first batch and every ``getMore`` of its cursor, carries ``cursor.postBatchResumeToken:
    {$recordId: NumberLong(id of the last record read)}`` (after the batch, as mongod's
    ``CursorResponseBuilder`` places it). It is ``{$recordId: null}`` before any record was read (a
    ``batchSize: 0`` first batch) and once the scan has reached the end of the collection: mongod's
    ``CollectionScan::doWork`` resets its last-seen record at EOF (current source,
    ``src/mongo/db/exec/classic/collection_scan.cpp``; older releases kept the last record's id there). A
    batch cut by ``batchSize`` or by the ``limit`` has not seen the end and names its last record.
    ``$_resumeAfter: {$recordId: X}`` continues with the record after X (the filter applies after it, X
    itself need not match). If X no longer exists mongod fails with code 211 ``KeyNotFound`` "Executor error
    during find command :: caused by :: Failed to resume collection scan: the recordId from which we are
    attempting to resume no longer exists in the collection: RecordId(X)" (for null: "... :: Failed to resume
    collection scan: cannot resume from null recordId"). ``$_startAt`` (8.1+) is not added.
    SecantusDB ignores ``$_requestResumeToken`` (no token), and the ``$recordId`` that ``showRecordId`` adds
    is only the ordinal of the document in that query's results (1, 2, ... counted after ``skip`` and the
    filter, renumbered when an earlier document is deleted): no identity. Its natural order is insertion
    order; updates (growing a document, replacing it) keep its place; a document deleted and inserted again
    goes to the end. So the proxy keeps record ids of its own, per collection: a document (by its ``_id``'s
    exact bytes) gets one the first time a scan returns it, ascending in natural order, and keeps it in later
    scans; the documents reach the client as the backend's exact bytes (with ``showRecordId``, the proxy's id
    replaces SecantusDB's ``$recordId``, still the last field). For ``$_resumeAfter`` the proxy reads through
    the scan (``_id`` only, on the client's connection and session) counting the documents before X (with a
    filter: those matching "filter or X"); X not there: mongod's KeyNotFound. It then sends the client's find
    with that ``skip`` and one more in ``batchSize``/``limit``, checks that X is the first document (a
    concurrent delete before X moved it: look again, up to 3 times) and drops it, so the client's batches
    keep their sizes (no ``batchSize``: mongod's 101 for the first batch). Cursors are tracked by id until
    they end or ``killCursors`` names them, so their ``getMore`` replies get tokens too.
    IMITATION: mongod seeks to the record id; the proxy reads through the records before it. Record ids are
    node-local in mongod; here they are the proxy's (in its memory): another proxy, or this one restarted,
    does not know a token and answers KeyNotFound, as a node that never held the record would. A document
    deleted and inserted again with the same ``_id`` keeps its old id until a scan returns it out of order
    (then it gets a new one), so resuming after its old token continues after its new place instead of
    failing. A document returned without ``_id`` (projection) gets a new id on every scan and cannot be
    resumed after. Ids given by a filtered scan are replaced when a later scan finds unseen documents before
    them (resuming after such an old token then fails with KeyNotFound). With a filter the token names the
    last document returned, where mongod's names the last record examined. mongod seeks lazily, with the
    first document it fetches, so its KeyNotFound for ``batchSize: 0`` comes with the first ``getMore``;
    here with the ``find``.

What it does NOT imitate:
- roles and privileges (application names stand in for them, see above); the write-block mode lives in
  the proxy's memory (mongod persists it, and it survives restarts there) and applies only to clients of
  this proxy: a client connected to the backend directly is not blocked;
- mongod's finer op-observer cases: an update that matches but changes nothing (no oplog entry) is
  refused here; DDL that would be a no-op (dropping a missing collection, creating an existing index) is
  refused here; the no-match check of an update/delete is a separate read just before, not atomic with
  it; in a transaction every write statement is refused (no no-match check); a ``bulkWrite`` mixing
  internal and user namespaces is refused whole; ``applyOps``/``importCollection`` are forwarded;
- the refusal replies the proxy writes itself carry no ``$clusterTime``/``operationTime``;
- the oplog entry of ``appendOplogNote`` is an update of ``admin.proxyOplogNotes``, not a no-op entry
  (readers of raw ``local.oplog.rs`` see that; change-stream readers see what they would on mongod);
- ``$changeStream`` on the admin database (refused by mongod) and other topology details of a real
  replica set (secondaries, elections, ``setVersion`` changes);
- ``userWriteBlockReason`` (newer servers), write blocking's effect on index builds already running;
- fragment layout: mongod orders a fragment's fields ``_id``, ``splitEvent``, then by size; SecantusDB's
  order is kept. Fragment tokens live in the proxy's memory (another proxy, or the server directly, does
  not know them), and one minted before the stream has any start point (opened at "now", the large event
  in its very first batch) resumes after the whole event.

Use::

    with ReplicaSetProxy(backend_port, bypass_app_names={"migration-fence"}) as proxy:
        MongoClient(f"mongodb://{proxy.host}/?replicaSet=secantus")

or ``python -m devtools.replica_set_proxy --backend-port P [--port Q] [--bypass-app-name NAME] ...``
(prints ``listening on host:port``). The wire format and relay are ``devtools.wire_proxy``.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import re
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import bson
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument

from devtools.wire_proxy import (
    CHECKSUM_PRESENT,
    HELLO_COMMANDS,
    MORE_TO_COME,
    OP_MSG,
    OP_QUERY,
    Connection,
    Decision,
    Message,
    OpMsg,
    OpQuery,
    ProtocolError,
    WireProxy,
    command_name,
    op_msg_answer,
    read_message,
    rewrite_reply_documents,
    serve_forever,
)

log = logging.getLogger("devtools.replica_set_proxy")

USER_WRITES_BLOCKED = 371
USER_WRITES_BLOCKED_MSG = "User writes blocked"
BSON_OBJECT_TOO_LARGE = 10334
SPLIT_FAILED = 7182500
NO_SUCH_TRANSACTION = 251
BSON_MAX_USER_SIZE = 16 * 1024 * 1024  # BSONObjMaxUserSize: documents, and split fragments
BSON_MAX_INTERNAL_SIZE = BSON_MAX_USER_SIZE + 16 * 1024  # BSONObjMaxInternalSize: what mongod serializes
INTERNAL_DBS = frozenset({"admin", "config", "local"})
SPLIT_STAGE = "$changeStreamSplitLargeEvent"
NOTE_COLLECTION = "proxyOplogNotes"
MODE_DISABLED, MODE_ENABLED = 1, 2  # serverStatus repl.userWriteBlockMode (0 would be "unknown")
# maxWireVersion by release (https://www.mongodb.com/docs/manual/reference/command/hello/ and the drivers' tables)
WIRE_VERSIONS = {(5, 0): 13, (6, 0): 17, (7, 0): 21, (7, 1): 22, (7, 2): 23, (7, 3): 24, (8, 0): 25, (8, 1): 26,
                 (8, 2): 27}
RAW = CodecOptions(document_class=RawBSONDocument)
# Commands that create, change or drop a collection named by their value, in the command's database.
COLLECTION_DDL = {"create", "drop", "createIndexes", "dropIndexes", "deleteIndexes", "collMod", "convertToCapped",
                  "emptycapped"}
CRUD = {"insert": "documents", "update": "updates", "delete": "deletes"}
BAD_VALUE, KEY_NOT_FOUND = 2, 211
REQUEST_TOKEN, RESUME_AFTER = "$_requestResumeToken", "$_resumeAfter"
DEFAULT_FIRST_BATCH = 101  # mongod's first batch when the client gives no batchSize
RESUME_ATTEMPTS = 3  # a concurrent delete before the resume record moves it: find it again this often


# ---------------------------------------------------------------- pure decisions


def parse_version(text: str) -> tuple[int, int, int]:
    match = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        raise ValueError(f"server_version {text!r} is not a MongoDB version like 6.0.5")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def has_split_stage(version: tuple[int, int, int]) -> bool:
    """$changeStreamSplitLargeEvent: new in 7.0 and 6.0.9 (the docs); the 6.1-6.3 rapid releases lack it."""
    return version >= (7, 0, 0) or (6, 0, 9) <= version < (6, 1, 0)


def wire_version(version: tuple[int, int, int]) -> int:
    known = [wire for release, wire in WIRE_VERSIONS.items() if release <= version[:2]]
    if not known:
        raise ValueError(f"server_version {version} is older than this proxy presents (5.0)")
    return max(known)


def is_exempt(namespace: str) -> bool:
    """mongod's exemptions from user write blocking: internal databases, system.profile, resharding temps."""
    db, _, coll = namespace.partition(".")
    return db in INTERNAL_DBS or coll == "system.profile" or coll.startswith("system.resharding.")


def in_transaction(body: dict[str, Any]) -> bool:
    return "txnNumber" in body and body.get("autocommit") is False


def _target(db: str, spec: Any) -> str | None:
    """The namespace of an $out/$merge/mapReduce-out spec."""
    if isinstance(spec, str):
        return f"{db}.{spec}"
    if isinstance(spec, dict):
        if "into" in spec:
            return _target(db, spec["into"])
        if "coll" in spec:
            return f"{spec.get('db', db)}.{spec['coll']}"
        for mode in ("replace", "merge", "reduce"):
            if mode in spec:
                return f"{spec.get('db', db)}.{spec[mode]}"
    return None


def written_namespaces(body: dict[str, Any]) -> tuple[str, list[str]] | None:
    """(kind, namespaces) of a command that writes, or None for one that does not (reads, admin commands).

    kind: "crud" (insert/update/delete), "findAndModify", "bulkWrite" or "command" (DDL, $out/$merge ...).
    A database-wide write (dropDatabase) is named by the database alone.
    """
    name = command_name(body)
    db = str(body.get("$db", ""))
    value = body.get(name)
    if name in CRUD:
        return "crud", [f"{db}.{value}"]
    if name.lower() == "findandmodify":
        return "findAndModify", [f"{db}.{value}"]
    if name in COLLECTION_DDL:
        return "command", [f"{db}.{value}"]
    if name == "cloneCollectionAsCapped":
        return "command", [f"{db}.{body.get('toCollection')}"]
    if name == "dropDatabase":
        return "command", [db]
    if name == "renameCollection":
        return "command", [str(value), str(body.get("to"))]
    if name == "aggregate":
        targets = [_target(db, stage.get("$out", stage.get("$merge"))) for stage in body.get("pipeline") or []
                   if isinstance(stage, dict) and ("$out" in stage or "$merge" in stage)]
        return ("command", [t for t in targets if t]) if targets else None
    if name.lower() == "mapreduce":
        out = body.get("out")
        if isinstance(out, dict) and "inline" in out:
            return None
        target = _target(db, out)
        return ("command", [target]) if target else None
    if name == "bulkWrite":
        return "bulkWrite", [str(info.get("ns")) for info in body.get("nsInfo") or []]
    return None


def blocked_error() -> dict[str, Any]:
    return {"ok": 0.0, "errmsg": USER_WRITES_BLOCKED_MSG, "code": USER_WRITES_BLOCKED,
            "codeName": "UserWritesBlocked"}


def blocked_crud_reply(command: str, would_write: list[bool], ordered: bool) -> dict[str, Any] | None:
    """mongod's reply to insert/update/delete while writes are blocked; None when no statement writes.

    ``would_write[i]``: statement i would write a document (an insert always does; an update or delete
    when its filter matches or it upserts). mongod refuses each write where it happens, so an ordered
    batch stops at the first such statement and an unordered one reports each of them.
    """
    indexes = [i for i, writes in enumerate(would_write) if writes]
    if not indexes:
        return None
    if ordered:
        indexes = indexes[:1]
    reply: dict[str, Any] = {"n": 0}
    if command == "update":
        reply["nModified"] = 0
    reply["writeErrors"] = [{"index": i, "code": USER_WRITES_BLOCKED, "errmsg": USER_WRITES_BLOCKED_MSG}
                            for i in indexes]
    reply["ok"] = 1.0
    return reply


def blocked_bulk_write_reply(ops: list[dict[str, Any]], namespaces: list[str], ordered: bool) -> dict[str, Any]:
    """The bulkWrite command's reply: one error entry per op on a user namespace (the first when ordered)."""
    batch = []
    for index, op in enumerate(ops):
        kind = next(iter(op), "")
        target = op.get(kind)
        if isinstance(target, int) and 0 <= target < len(namespaces) and is_exempt(namespaces[target]):
            continue
        batch.append({"ok": 0.0, "idx": index, "code": USER_WRITES_BLOCKED, "codeName": "UserWritesBlocked",
                      "errmsg": USER_WRITES_BLOCKED_MSG, "n": 0})
        if ordered:
            break
    return {"cursor": {"id": bson.Int64(0), "firstBatch": batch, "ns": "admin.$cmd.bulkWrite"},
            "nErrors": len(batch), "nInserted": 0, "nMatched": 0, "nModified": 0, "nUpserted": 0, "nDeleted": 0,
            "ok": 1.0}


def _first_element(raw: bytes) -> str:
    """mongod's rendering of an event's first element, e.g. ``_id: { _data: "8263..." }``."""
    doc = bson.decode(raw)
    key, value = next(iter(doc.items()), ("", None))
    if isinstance(value, dict):
        inner = ", ".join(f'{k}: "{v}"' if isinstance(v, str) else f"{k}: {v}" for k, v in value.items())
        return f"{key}: {{ {inner} }}"
    return f"{key}: {value!r}"


def too_large_error(size: int, first_element: str, getmore: bool) -> dict[str, Any]:
    where = "Executor error during getMore" if getmore else "PlanExecutor error during aggregation"
    return {"ok": 0.0, "errmsg": f"{where} :: caused by :: BSONObj size: {size} (0x{size:X}) is invalid. Size must "
                                 f"be between 0 and {BSON_MAX_INTERNAL_SIZE}(16MB) First element: {first_element}",
            "code": BSON_OBJECT_TOO_LARGE, "codeName": "BSONObjectTooLarge"}


def split_failed_error(size: int, getmore: bool) -> dict[str, Any]:
    where = "Executor error during getMore" if getmore else "PlanExecutor error during aggregation"
    return {"ok": 0.0, "errmsg": f"{where} :: caused by :: Splitting change event failed: fragment size {size} is "
                                 f"greater than maximum allowed fragment size {BSON_MAX_USER_SIZE}",
            "code": SPLIT_FAILED, "codeName": f"Location{SPLIT_FAILED}"}


def oversized_event(events: Iterable[RawBSONDocument], split: bool) -> tuple[int, bytes] | None:
    """(size, raw) of the first event mongod would not deliver in a change-stream batch, or None."""
    limit = BSON_MAX_USER_SIZE if split else BSON_MAX_INTERNAL_SIZE
    for event in events:
        if len(event.raw) > limit:
            return len(event.raw), event.raw
    return None


def split_event(event: RawBSONDocument, limit: int = BSON_MAX_USER_SIZE) -> list[dict[str, Any]] | None:
    """mongod's ``$changeStreamSplitLargeEvent`` for one event: its top-level fields, in order, packed into as
    few fragments of at most ``limit`` bytes as fit, each fragment with the event's ``_id`` and
    ``splitEvent: {fragment, of}``. None when one field alone does not fit (mongod fails with 7182500)."""
    doc = bson.decode(event.raw, RAW)
    token = bson.decode(event.raw)["_id"]
    base = len(bson.encode({"_id": token, "splitEvent": {"fragment": 1, "of": 1}}))
    fragments: list[list[tuple[str, Any]]] = [[]]
    size = base
    for key, value in doc.items():
        if key in ("_id", "splitEvent"):
            continue
        field_size = len(bson.encode({key: value})) - 5  # the element alone, without the document's framing
        if base + field_size > limit:
            return None
        if size + field_size > limit and fragments[-1]:
            fragments.append([])
            size = base
        fragments[-1].append((key, value))
        size += field_size
    count = len(fragments)
    return [{"_id": token, "splitEvent": {"fragment": i + 1, "of": count}, **dict(fields)}
            for i, fields in enumerate(fragments)]


def split_oversized_fragments(body: RawBSONDocument, batch_key: str) -> RawBSONDocument | None:
    """SecantusDB answers a split stream with one over-size "1 of 1" fragment where mongod splits the event
    into several: split those as mongod does. Returns the new reply body, or None when nothing changed (or
    an event cannot be split: the size check then refuses it with mongod's error)."""
    result = body["cursor"]
    events = result.get(batch_key) or []
    if not any(len(e.raw) > BSON_MAX_USER_SIZE and (e.get("splitEvent") or {}).get("of", 1) == 1 for e in events):
        return None
    batch: list[Any] = []
    for event in events:
        if len(event.raw) > BSON_MAX_USER_SIZE and (event.get("splitEvent") or {}).get("of", 1) == 1:
            pieces = split_event(event)
            if pieces is None:
                return None
            batch.extend(pieces)
        else:
            batch.append(event)
    out = bson.decode(body.raw, RAW)
    out = {k: v for k, v in out.items()}
    cursor = {k: v for k, v in out["cursor"].items()}
    cursor[batch_key] = batch
    out["cursor"] = cursor
    return RawBSONDocument(bson.encode(out), RAW)


def command_error(code: int, code_name: str, errmsg: str) -> dict[str, Any]:
    return {"ok": 0.0, "errmsg": errmsg, "code": code, "codeName": code_name}


def admin_only(command: str) -> dict[str, Any]:
    return command_error(13, "Unauthorized", f"{command} may only be run against the admin database.")


def _bson_type(value: Any) -> str:
    names = {bool: "bool", int: "int", float: "double", str: "string", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------- natural-order resume tokens


def _document(elements: list[bytes]) -> bytes:
    body = b"".join(elements)
    return struct.pack("<i", len(body) + 5) + body + b"\x00"


def without_element(raw: bytes, name: str) -> bytes:
    """``raw`` without its top-level element ``name``: every other byte, and so the field order, unchanged."""
    from atlas_migration.engines.timeseries import iter_elements

    elements = list(iter_elements(raw))
    if all(element.name != name for element in elements):
        return raw
    return _document([element.renamed(element.name) for element in elements if element.name != name])


def id_key(raw: bytes) -> bytes | None:
    """The document ``{_id: <the document's _id>}`` as BSON bytes (the _id's exact bytes), or None without one."""
    from atlas_migration.engines.timeseries import iter_elements

    for element in iter_elements(raw):
        if element.name == "_id":
            return _document([element.renamed("_id")])
    return None


def natural_hint(value: Any) -> bool:
    """Whether a hint or sort is ``{$natural: 1}`` (mongod compares the BSON: one field, numerically 1)."""
    if not isinstance(value, dict) or list(value) != ["$natural"]:
        return False
    number = value["$natural"]
    return not isinstance(number, bool) and isinstance(number, (int, float)) and number == 1


def resume_token_error(body: dict[str, Any]) -> dict[str, Any] | None:
    """mongod's refusal of a find's ``$_requestResumeToken``/``$_resumeAfter`` (query_request_helper.cpp), or None."""
    resume_after = body.get(RESUME_AFTER)
    if body.get(REQUEST_TOKEN) is True:
        if not natural_hint(body.get("hint")):
            return command_error(BAD_VALUE, "BadValue", "hint must be {$natural:1} if 'requestResumeToken' is enabled")
        sort = body.get("sort")
        if sort and not natural_hint(sort):
            return command_error(BAD_VALUE, "BadValue",
                                 "sort must be unset or {$natural:1} if 'requestResumeToken' is enabled")
        if resume_after:
            record = resume_after.get("$recordId", ...) if isinstance(resume_after, dict) else ...
            if not isinstance(resume_after, dict) or len(resume_after) != 1 or \
                    not (record is None or isinstance(record, (bson.int64.Int64, bson.ObjectId))):
                return command_error(BAD_VALUE, "BadValue",
                                     "Malformed resume token: the '_resumeAfter' object must contain exactly one "
                                     "field named '$recordId', of type NumberLong, jstOID or jstNULL.")
    elif resume_after:
        return command_error(BAD_VALUE, "BadValue", "'requestResumeToken' must be true if 'resumeAfter' is specified")
    return None


def record_not_found(record: Any) -> dict[str, Any]:
    """mongod's KeyNotFound when ``$_resumeAfter`` names a record that does not exist (collection_scan.cpp),
    with the context find adds to an executor error."""
    if record is None:
        reason = "Failed to resume collection scan: cannot resume from null recordId"
    else:
        reason = ("Failed to resume collection scan: the recordId from which we are attempting to resume no longer "
                  f"exists in the collection: RecordId({record})")
    return command_error(KEY_NOT_FOUND, "KeyNotFound", f"Executor error during find command :: caused by :: {reason}")


# ---------------------------------------------------------------- the proxy


@dataclass
class _ChangeCursor:
    split: bool
    db: str
    collection: str  # for killCursors
    # $changeStream options that reopen the stream just before the next event not yet fully delivered
    # (None: not known yet, e.g. a stream opened at "now" before its first postBatchResumeToken).
    before: dict[str, Any] | None = None
    skip_until: tuple[str, int] | None = None  # (event token, fragment): drop what a resumed stream re-sends


@dataclass
class _RecordIds:
    """The proxy's record ids for one collection (SecantusDB's ``$recordId`` only numbers a query's results)."""

    last: int = 0  # the highest id given so far
    by_key: dict[bytes, int] | None = None  # {_id: ...} BSON -> record id
    by_id: dict[int, bytes] | None = None  # record id -> {_id: ...} BSON


@dataclass
class _NaturalCursor:
    """A natural-order find cursor whose replies get ``postBatchResumeToken`` (and lose ``$recordId``)."""

    namespace: str
    db: str
    collection: str
    show_record_id: bool  # the client asked for showRecordId: the proxy's record id replaces the backend's
    last: int = 0  # the record id of the last document this scan returned
    left: int | None = None  # documents the client's limit still allows (None: no limit)


FRAGMENT_MARK = "2f70726f78792f"  # "/proxy/" in hex: tokens the proxy gives to non-final fragments


class ReplicaSetProxy(WireProxy):
    """The proxy; ``start()``/``stop()`` or a ``with`` block. Thread-safe state shared by its connections."""

    thread_name = "replica-set-proxy"

    def __init__(self, backend_port: int, *, backend_host: str = "127.0.0.1", port: int = 0,
                 tls_cert: str | None = None, tls_key: str | None = None, backend_ca: str | None = None,
                 backend_tls: bool | None = None, bypass_app_names: Iterable[str] = (),
                 privileged_app_names: Iterable[str] | None = None, server_version: str | None = None) -> None:
        super().__init__(backend_port, backend_host=backend_host, port=port, tls_cert=tls_cert, tls_key=tls_key,
                         backend_ca=backend_ca, backend_tls=backend_tls)
        self.bypass_app_names = frozenset(bypass_app_names)
        self.privileged_app_names = None if privileged_app_names is None else frozenset(privileged_app_names)
        self.server_version = server_version
        self._version = parse_version(server_version) if server_version else None
        if self._version:
            wire_version(self._version)  # refuse versions it cannot present, now rather than at hello
        self._write_block = False
        self._change_cursors: dict[int, _ChangeCursor] = {}
        self._aborted_txns: set[tuple[bytes, int]] = set()
        self._fragment_tokens: dict[str, tuple[dict[str, Any] | None, str, int]] = {}
        self._natural_cursors: dict[int, _NaturalCursor] = {}
        self._record_ids: dict[str, _RecordIds] = {}
        self._state_lock = threading.Lock()

    @property
    def user_write_block_mode(self) -> int:
        """What serverStatus reports as repl.userWriteBlockMode: 1 disabled, 2 enabled."""
        return MODE_ENABLED if self._write_block else MODE_DISABLED

    def _has_split_stage(self) -> bool:
        return self._version is None or has_split_stage(self._version)

    # -------------------------------------------------------- dispatch

    def handle_request(self, conn: Connection, request: Message) -> Decision:
        if request.op_code == OP_QUERY:
            return self._handle_op_query(conn, request)
        if request.op_code != OP_MSG:
            return super().handle_request(conn, request)
        msg = OpMsg.parse(request.payload)
        body = bson.decode(msg.body)
        name = command_name(body)
        db = str(body.get("$db", ""))
        changed = False
        if msg.flags & CHECKSUM_PRESENT:
            changed = True  # re-encoding drops the checksum
        rewrite: Callable[[Message], Message] | None = None

        if name.lower() in HELLO_COMMANDS:
            self._remember_client(conn, body)
            if "compression" in body:
                body.pop("compression")
                changed = True
            rewrite = self._rewrite_hello
        elif name == "setUserWriteBlockMode":
            return op_msg_answer(request, self, self._set_user_write_block_mode(conn, body, db))
        elif name == "appendOplogNote":
            return op_msg_answer(request, self, self._append_oplog_note(conn, body, db))
        else:
            refusal = self._txn_refusal(body)
            if refusal is None and self._write_block and not self._bypass(conn):
                refusal = self._write_refusal(conn, body, msg)
            if refusal is not None:
                return op_msg_answer(request, self, refusal)
            if name == "aggregate" and self._is_change_stream(body):
                answer, changed_pipeline, rewrite = self._change_stream(conn, body, db)
                if answer is not None:
                    return op_msg_answer(request, self, answer)
                changed = changed or changed_pipeline
            elif name == "find" and (REQUEST_TOKEN in body or RESUME_AFTER in body):
                error = resume_token_error(body)
                if error is not None:
                    return op_msg_answer(request, self, error)
                if body.get(RESUME_AFTER):
                    return op_msg_answer(request, self, self._resume_find(conn, body, db))
                natural = self._natural_find(body, db)
                if natural is not None:
                    rewrite = self._natural_rewriter(natural, body.get("batchSize"), "firstBatch")
                changed = True
            elif name == "getMore":
                cursor = self._change_cursors.get(int(body["getMore"]))
                if cursor is not None:
                    rewrite = self._event_check(conn, cursor, int(body["getMore"]), getmore=True)
                natural_cursor = self._natural_cursors.get(int(body["getMore"]))
                if natural_cursor is not None:
                    rewrite = self._natural_rewriter(natural_cursor, body.get("batchSize"), "nextBatch",
                                                     int(body["getMore"]))
            elif name == "killCursors":
                with self._state_lock:
                    for cursor_id in body.get("cursors") or []:
                        self._change_cursors.pop(int(cursor_id), None)
                        self._natural_cursors.pop(int(cursor_id), None)
            elif name == "serverStatus":
                rewrite = self._rewriter(self._server_status)
            elif name == "connectionStatus" and body.get("showPrivileges"):
                rewrite = self._rewriter(lambda reply: self._connection_status(conn, reply))
            elif name == "buildInfo" or name.lower() == "buildinfo":
                rewrite = self._rewriter(self._build_info)
            elif name == "getParameter":
                rewrite = self._rewriter(self._get_parameter)
        if changed:
            msg.body = bson.encode(body)
            request = Message(request.request_id, 0, OP_MSG, msg.encode())
        return Decision(forward=request, expect_reply=not msg.flags & MORE_TO_COME, rewrite=rewrite)

    def _handle_op_query(self, conn: Connection, request: Message) -> Decision:
        query = OpQuery.parse(request.payload)
        spec = bson.decode(query.query)
        command = spec.get("$query", spec) if isinstance(spec.get("$query"), dict) else spec
        if query.collection.endswith(".$cmd") and command_name(command).lower() in HELLO_COMMANDS:
            self._remember_client(conn, command)
            if "compression" in command:
                command.pop("compression")
                query.query = bson.encode(spec)
                request = Message(request.request_id, 0, OP_QUERY, query.encode())
            return Decision(forward=request, rewrite=self._rewrite_hello)
        return Decision(forward=request)

    # -------------------------------------------------------- handshake and server identity

    def _remember_client(self, conn: Connection, body: dict[str, Any]) -> None:
        client = body.get("client")
        if isinstance(client, dict):
            app = (client.get("application") or {}).get("name")
            conn.info["app_name"] = app
            conn.info["bypass"] = app in self.bypass_app_names
            conn.info["privileged"] = self.privileged_app_names is None or app in self.privileged_app_names

    def _bypass(self, conn: Connection) -> bool:
        return bool(conn.info.get("bypass"))

    def _privileged(self, conn: Connection) -> bool:
        return self.privileged_app_names is None or bool(conn.info.get("privileged"))

    def _rewriter(self, change: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[Message], Message]:
        return lambda reply: rewrite_reply_documents(reply, change)

    def _rewrite_hello(self, reply: Message) -> Message:
        def change(hello: dict[str, Any]) -> dict[str, Any]:
            hello.pop("compression", None)
            if hello.get("setName"):
                hello["hosts"] = [self.host]
                for gone in ("passives", "arbiters"):
                    hello.pop(gone, None)
                if "primary" in hello:
                    hello["primary"] = self.host
                if "me" in hello:
                    hello["me"] = self.host
            if self._version and "maxWireVersion" in hello:
                hello["maxWireVersion"] = min(int(hello["maxWireVersion"]), wire_version(self._version))
            return hello

        return rewrite_reply_documents(reply, change)

    def _connection_status(self, conn: Connection, reply: dict[str, Any]) -> dict[str, Any]:
        """``connectionStatus`` with ``showPrivileges``: an authenticated client allowed to run the two commands
        this proxy implements holds their privileges on the cluster resource, so mongod lists them among the
        user's privileges (SecantusDB lists no privileges at all)."""
        info = reply.get("authInfo")
        if reply.get("ok") and isinstance(info, dict) and info.get("authenticatedUsers") and self._privileged(conn):
            privileges = list(info.get("authenticatedUserPrivileges") or [])
            privileges.append({"resource": {"cluster": True}, "actions": ["appendOplogNote", "setUserWriteBlockMode"]})
            info["authenticatedUserPrivileges"] = privileges
        return reply

    def _server_status(self, status: dict[str, Any]) -> dict[str, Any]:
        if status.get("ok"):
            if self._version is None or self._version >= (6, 0, 0):
                repl = status.get("repl")
                status["repl"] = {**(repl if isinstance(repl, dict) else {}),
                                  "userWriteBlockMode": self.user_write_block_mode}
            if self.server_version and "version" in status:
                status["version"] = self.server_version
        return status

    def _build_info(self, info: dict[str, Any]) -> dict[str, Any]:
        if self._version and info.get("ok"):
            info["version"] = self.server_version
            info["versionArray"] = [*self._version, 0]
        return info

    def _get_parameter(self, reply: dict[str, Any]) -> dict[str, Any]:
        fcv = reply.get("featureCompatibilityVersion")
        if self._version and isinstance(fcv, dict) and "version" in fcv:
            fcv["version"] = f"{self._version[0]}.{self._version[1]}"
        return reply

    # -------------------------------------------------------- setUserWriteBlockMode / appendOplogNote

    def _set_user_write_block_mode(self, conn: Connection, body: dict[str, Any], db: str) -> dict[str, Any]:
        name = "setUserWriteBlockMode"
        if self._version is not None and self._version < (6, 0, 0):
            return command_error(59, "CommandNotFound", f"no such command: '{name}'")
        if db != "admin":
            return admin_only(name)
        if not self._privileged(conn):
            return command_error(13, "Unauthorized", f"not authorized on admin to execute command {{ {name}: ... }}")
        if "global" not in body:
            return command_error(40414, "Location40414", f"BSON field '{name}.global' is missing but a required field")
        if not isinstance(body["global"], bool):
            return command_error(14, "TypeMismatch", f"BSON field '{name}.global' is the wrong type "
                                                     f"'{_bson_type(body['global'])}', expected type 'bool'")
        with self._state_lock:
            self._write_block = body["global"]
        log.info("user write blocking %s", "enabled" if body["global"] else "disabled")
        return self._ok_with_times(conn)

    def _append_oplog_note(self, conn: Connection, body: dict[str, Any], db: str) -> dict[str, Any]:
        if db != "admin":
            return admin_only("appendOplogNote")
        if not self._privileged(conn):
            return command_error(13, "Unauthorized", "not authorized on admin to execute command { appendOplogNote: ... }")
        if "data" not in body:
            return command_error(4, "NoSuchKey", 'Missing expected field "data"')
        if not isinstance(body["data"], dict):
            return command_error(14, "TypeMismatch",
                                 f'"data" had the wrong type. Expected object, found {_bson_type(body["data"])}')
        update = {"q": {"_id": "appendOplogNote"}, "upsert": True,
                  "u": {"$set": {"data": body["data"], "wall": datetime.datetime.now(datetime.UTC)},
                        "$inc": {"notes": 1}}}
        reply = conn.backend_command("admin", {"update": NOTE_COLLECTION, "updates": [update], "ordered": True})
        if not reply.get("ok"):
            return reply
        if reply.get("writeErrors"):
            error = reply["writeErrors"][0]
            return command_error(int(error.get("code", 8)), str(error.get("codeName", "UnknownError")),
                                 str(error.get("errmsg", "appendOplogNote failed")))
        return {"ok": 1.0, **{k: reply[k] for k in ("$clusterTime", "operationTime") if k in reply}}

    def _ok_with_times(self, conn: Connection) -> dict[str, Any]:
        """``{ok: 1}`` with the backend's current $clusterTime / operationTime, as mongod's replies carry."""
        reply = conn.backend_command("admin", {"ping": 1})
        return {"ok": 1.0, **{k: reply[k] for k in ("$clusterTime", "operationTime") if k in reply}}

    # -------------------------------------------------------- write blocking

    def _write_refusal(self, conn: Connection, body: dict[str, Any], msg: OpMsg) -> dict[str, Any] | None:
        """The proxy's answer to a write that blocking refuses, or None to forward the command."""
        written = written_namespaces(body)
        if written is None:
            return None
        kind, namespaces = written
        user = [ns for ns in namespaces if not is_exempt(ns)]
        if not user:
            return None
        txn = in_transaction(body)
        name = command_name(body)
        if kind == "crud":
            field = CRUD[name]
            statements = body.get(field)
            if statements is None:
                statements = [bson.decode(raw) for raw in msg.documents().get(field, [])]
            if name == "insert" or txn:
                would_write = [True] * len(statements)
            else:
                would_write = [self._statement_writes(conn, body, name, s) for s in statements]
            if txn and would_write:
                return self._refuse_in_transaction(conn, body)
            return blocked_crud_reply(name, would_write, bool(body.get("ordered", True)))
        if kind == "findAndModify":
            if not txn and not body.get("upsert") and not self._matches(conn, body, body.get("query") or {},
                                                                        body.get("collation"), body.get("hint")):
                return None
            return self._refuse_in_transaction(conn, body) if txn else blocked_error()
        if kind == "bulkWrite":
            ops = body.get("ops")
            if ops is None:
                ops = [bson.decode(raw) for raw in msg.documents().get("ops", [])]
            return blocked_bulk_write_reply(ops, namespaces, bool(body.get("ordered", True)))
        return self._refuse_in_transaction(conn, body) if txn else blocked_error()

    def _statement_writes(self, conn: Connection, body: dict[str, Any], name: str, statement: dict[str, Any]) -> bool:
        if name == "update" and statement.get("upsert"):
            return True
        return self._matches(conn, body, statement.get("q") or {}, statement.get("collation"), statement.get("hint"))

    def _matches(self, conn: Connection, body: dict[str, Any], query: dict[str, Any], collation: Any,
                 hint: Any) -> bool:
        """Whether ``query`` matches a document now (a failed check counts as a match: refuse, not let through)."""
        find: dict[str, Any] = {"find": body[command_name(body)], "filter": query, "limit": 1, "singleBatch": True,
                                "projection": {"_id": 1}}
        if collation:
            find["collation"] = collation
        if hint:
            find["hint"] = hint
        try:
            reply = conn.backend_command(str(body["$db"]), find)
        except ProtocolError:
            return True
        if not reply.get("ok"):
            return True
        return bool(reply["cursor"]["firstBatch"])

    @staticmethod
    def _txn_key(body: dict[str, Any]) -> tuple[bytes, int] | None:
        lsid = body.get("lsid")
        if not isinstance(lsid, dict) or "txnNumber" not in body:
            return None
        return bson.encode({"id": lsid.get("id")}), int(body["txnNumber"])

    def _refuse_in_transaction(self, conn: Connection, body: dict[str, Any]) -> dict[str, Any]:
        """A write error inside a transaction fails the command and aborts the transaction (as on mongod)."""
        key = self._txn_key(body)
        if key is not None:
            with self._state_lock:
                self._aborted_txns.add(key)
            if not body.get("startTransaction"):  # the backend has a transaction open: abort it there too
                abort = {"abortTransaction": 1, "lsid": body["lsid"], "txnNumber": body["txnNumber"],
                         "autocommit": False}
                try:
                    conn.backend_command("admin", abort)
                except ProtocolError:
                    pass
        return blocked_error()

    def _txn_refusal(self, body: dict[str, Any]) -> dict[str, Any] | None:
        key = self._txn_key(body)
        if key is None or key not in self._aborted_txns or command_name(body) == "abortTransaction":
            return None
        error = command_error(NO_SUCH_TRANSACTION, "NoSuchTransaction",
                              f"Transaction with {{ txnNumber: {body['txnNumber']} }} has been aborted.")
        error["errorLabels"] = ["TransientTransactionError"]
        return error

    # -------------------------------------------------------- change streams

    @staticmethod
    def _is_change_stream(body: dict[str, Any]) -> bool:
        pipeline = body.get("pipeline")
        return bool(pipeline) and isinstance(pipeline[0], dict) and "$changeStream" in pipeline[0]

    def _change_stream(self, conn: Connection, body: dict[str, Any], db: str
                       ) -> tuple[dict[str, Any] | None, bool, Callable[[Message], Message] | None]:
        """(answer, pipeline changed, reply check) for an aggregate opening a change stream."""
        pipeline = body["pipeline"]
        split = isinstance(pipeline[-1], dict) and SPLIT_STAGE in pipeline[-1]
        if split and not self._has_split_stage():
            return command_error(40324, "Location40324", f"Unrecognized pipeline stage name: '{SPLIT_STAGE}'"), \
                False, None
        changed = False
        spec = pipeline[0]["$changeStream"] = dict(pipeline[0]["$changeStream"] or {})
        cursor = _ChangeCursor(split, db, body["aggregate"] if isinstance(body["aggregate"], str) else "$cmd.aggregate")
        for key in ("resumeAfter", "startAfter"):
            token = spec.get(key)
            known = self._fragment_tokens.get(token.get("_data")) if isinstance(token, dict) else None
            if known is not None:
                # A fragment's own token (SecantusDB gives all fragments the event's token): reopen just
                # before the event and drop what precedes the fragment after this one, as mongod resumes.
                before, event_token, fragment = known
                del spec[key]
                spec.update(before or {key: {"_data": event_token}})
                cursor.skip_until = (event_token, fragment) if before else None
                changed = True
        starts = {k: spec[k] for k in ("resumeAfter", "startAfter", "startAtOperationTime") if k in spec}
        cursor.before = starts or None
        if spec.get("allChangesForCluster"):
            # mongod's cluster-wide streams never show the internal databases; SecantusDB's do.
            pipeline.insert(1, {"$match": {"ns.db": {"$nin": sorted(INTERNAL_DBS)}}})
            changed = True
        return None, changed, self._event_check(conn, cursor, None, getmore=False)

    def _event_check(self, conn: Connection, cursor: _ChangeCursor, cursor_id: int | None,
                     getmore: bool) -> Callable[[Message], Message]:
        def check(reply: Message) -> Message:
            if reply.op_code != OP_MSG:
                return reply
            body = bson.decode(OpMsg.parse(reply.payload).body, RAW)
            if not body.get("ok") or "cursor" not in body:
                return reply
            if cursor.split:
                split_body = split_oversized_fragments(body, "nextBatch" if getmore else "firstBatch")
                if split_body is not None:
                    body = split_body
                    reply = Message(reply.request_id, reply.response_to, OP_MSG, OpMsg(0, body.raw, []).encode())
            result = body["cursor"]
            events = result.get("nextBatch" if getmore else "firstBatch") or []
            returned_id = int(result.get("id") or 0)
            bad = oversized_event(events, cursor.split)
            with self._state_lock:
                if returned_id and bad is None:
                    self._change_cursors[returned_id] = cursor
                else:
                    self._change_cursors.pop(returned_id or (cursor_id or 0), None)
            if bad is None:
                if not cursor.split:
                    return reply
                with self._state_lock:
                    body_bytes = self._retoken(cursor, body, "nextBatch" if getmore else "firstBatch")
                if body_bytes is None:
                    return reply
                return Message(reply.request_id, reply.response_to, OP_MSG, OpMsg(0, body_bytes, []).encode())
            size, raw = bad
            if returned_id:  # mongod's cursor dies with the error; do not leave the backend's open
                try:
                    conn.backend_command(cursor.db, {"killCursors": cursor.collection,
                                                     "cursors": [bson.Int64(returned_id)]})
                except ProtocolError:
                    pass
            error = split_failed_error(size, getmore) if cursor.split else too_large_error(size, _first_element(raw),
                                                                                          getmore)
            for key in ("$clusterTime", "operationTime"):
                if key in body:
                    error[key] = bson.decode(body.raw)[key]
            log.info("change-stream event of %d bytes refused (%s)", size, error["codeName"])
            payload = OpMsg(0, bson.encode(error), []).encode()
            return Message(reply.request_id, reply.response_to, OP_MSG, payload)

        return check


    def _retoken(self, cursor: _ChangeCursor, body: RawBSONDocument, batch_key: str) -> bytes | None:
        """Give each non-final fragment its own resume token (mongod does; SecantusDB repeats the event's).

        The last fragment keeps the event's token: resuming from it continues with the next event, as on
        mongod. Returns the re-encoded reply body, or None when nothing changed.
        """
        result = body["cursor"]
        batch, changed, last_token = [], False, None
        for event in result.get(batch_key) or []:
            data = event["_id"]["_data"]
            split = event.get("splitEvent")
            fragment = int(split["fragment"]) if split else 0
            if cursor.skip_until is not None:
                event_token, skip_to = cursor.skip_until
                if data != event_token or fragment <= skip_to:  # re-sent by the reopened stream: delivered before
                    if data == event_token and fragment == skip_to:
                        cursor.skip_until = None
                        last_token = {"_data": f"{data}{FRAGMENT_MARK}{fragment:04x}"}
                    changed = True
                    continue
                cursor.skip_until = None
            if split and fragment < int(split["of"]):
                token = f"{data}{FRAGMENT_MARK}{fragment:04x}"
                self._fragment_tokens[token] = (dict(cursor.before) if cursor.before else None, data, fragment)
                doc = bson.decode(event.raw)
                doc["_id"] = last_token = {"_data": token}
                batch.append(doc)
                changed = True
            else:
                batch.append(event)
                cursor.before, last_token = {"resumeAfter": bson.decode(event.raw)["_id"]}, None
        if last_token is None and "postBatchResumeToken" in result:  # the batch ends between events
            cursor.before = {"resumeAfter": bson.decode(result.raw)["postBatchResumeToken"]}
        if not changed:
            return None
        out = bson.decode(body.raw)
        out["cursor"][batch_key] = batch
        if last_token is not None:
            out["cursor"]["postBatchResumeToken"] = last_token  # the batch ends inside an event
        return bson.encode(out)

    # -------------------------------------------------------- natural-order resume tokens

    def _natural_find(self, body: dict[str, Any], db: str) -> _NaturalCursor | None:
        """Take the resume options out of the client's find (SecantusDB ignores them); the cursor state, or None
        when no token was requested (``$_requestResumeToken: false``)."""
        requested = body.pop(REQUEST_TOKEN, None) is True
        body.pop(RESUME_AFTER, None)
        if not requested:
            return None
        collection = str(body["find"])
        cursor = _NaturalCursor(f"{db}.{collection}", db, collection, show_record_id=bool(body.get("showRecordId")))
        limit = body.get("limit")
        if isinstance(limit, int) and limit > 0:
            cursor.left = int(limit)
        return cursor

    def _natural_rewriter(self, cursor: _NaturalCursor, batch_size: Any, batch_key: str,
                          cursor_id: int | None = None) -> Callable[[Message], Message]:
        def rewrite(reply: Message) -> Message:
            if reply.op_code != OP_MSG:
                return reply
            body = bson.decode(OpMsg.parse(reply.payload).body, RAW)
            if not body.get("ok") or "cursor" not in body:
                if cursor_id is not None:
                    with self._state_lock:
                        self._natural_cursors.pop(cursor_id, None)
                return reply
            out = self._natural_batch(cursor, body, batch_key, batch_size, cursor_id=cursor_id)
            return Message(reply.request_id, reply.response_to, OP_MSG, OpMsg(0, bson.encode(out), []).encode())

        return rewrite

    def _natural_batch(self, cursor: _NaturalCursor, body: RawBSONDocument, batch_key: str, batch_size: Any,
                       skip_first: bool = False, cursor_id: int | None = None) -> dict[str, Any]:
        """The client's reply: the backend's documents (their exact bytes; with ``showRecordId`` the proxy's
        record id as ``$recordId``), a record id given to each, ``postBatchResumeToken`` after the batch, and
        the cursor tracked while it lives (its getMores are rewritten too)."""
        result = body["cursor"]
        documents = list(result.get(batch_key) or [])
        if skip_first:
            documents = documents[1:]
        returned_id = int(result.get("id") or 0)
        with self._state_lock:
            ids = self._record_ids.setdefault(cursor.namespace, _RecordIds(0, {}, {}))
            assert ids.by_key is not None and ids.by_id is not None
            batch = []
            for document in documents:
                raw = bytes(document.raw)  # a memoryview for some (large) replies
                key = id_key(raw)
                record = ids.by_key.get(key) if key is not None else None
                if record is None or record <= cursor.last:
                    # Not seen before, or seen before a later document of this scan (deleted and inserted again
                    # with the same _id: a new record, at the end): a new record id, above every other.
                    if record is not None:
                        ids.by_id.pop(record, None)
                    ids.last += 1
                    record = ids.last
                    if key is not None:
                        ids.by_key[key] = record
                        ids.by_id[record] = key
                cursor.last = record
                if cursor.show_record_id:
                    # SecantusDB's $recordId only numbers the query's results: the proxy's record id replaces it,
                    # as the last field (where mongod adds it). Otherwise the document is the backend's bytes.
                    raw = without_element(raw, "$recordId")
                    raw = struct.pack("<i", len(raw) + 19) + raw[4:-1] + b"\x12$recordId\x00" + \
                        struct.pack("<q", record) + b"\x00"
                batch.append(RawBSONDocument(raw, RAW))
            if cursor.left is not None:
                cursor.left -= len(batch)
            # mongod's CollectionScan: the token names the last record read; at the end of the collection (and
            # before the first record) it is null. A batch cut by batchSize or the limit has not seen the end.
            full = isinstance(batch_size, int) and not isinstance(batch_size, bool) and len(documents) >= batch_size
            limited = cursor.left is not None and cursor.left <= 0
            ended = returned_id == 0 and not full and not limited
            token = {"$recordId": None if ended or not documents else bson.Int64(cursor.last)}
            if returned_id:
                self._natural_cursors[returned_id] = cursor
            elif cursor_id:
                self._natural_cursors.pop(cursor_id, None)
        out: dict[str, Any] = {}
        for key, value in body.items():
            if key != "cursor":
                out[key] = value
                continue
            fields: dict[str, Any] = {}
            for name, item in result.items():
                if name == batch_key:
                    fields[name] = batch
                    fields["postBatchResumeToken"] = token
                elif name != "postBatchResumeToken":
                    fields[name] = item
            out[key] = fields
        return out

    def _backend_raw(self, conn: Connection, db: str, body: dict[str, Any]) -> RawBSONDocument:
        """``Connection.backend_command`` with the reply kept as raw BSON (documents keep their exact bytes)."""
        assert conn.backend is not None
        payload = OpMsg(0, bson.encode({**body, "$db": db}), []).encode()
        conn.backend.sendall(Message(self.next_id(), 0, OP_MSG, payload).encode())
        reply = read_message(conn.backend)
        if reply.op_code != OP_MSG:
            raise ProtocolError(f"backend answered opCode {reply.op_code} to an OP_MSG")
        return bson.decode(OpMsg.parse(reply.payload).body, RAW)

    def _kill(self, conn: Connection, db: str, collection: str, cursor_id: int) -> None:
        if cursor_id:
            try:
                conn.backend_command(db, {"killCursors": collection, "cursors": [bson.Int64(cursor_id)]})
            except ProtocolError:
                pass

    def _records_before(self, conn: Connection, db: str, collection: str, query: dict[str, Any], key: bytes,
                        session: dict[str, Any]) -> int | None:
        """How many documents the natural-order scan with ``query`` returns before the one whose ``_id`` is
        ``key``'s (read through, ``_id`` only), or None when that document is not there."""
        reply = self._backend_raw(conn, db, {"find": collection, "filter": query, "hint": {"$natural": 1},
                                             "projection": {"_id": 1}, "batchSize": 10_000, **session})
        count = 0
        while True:
            if not reply.get("ok"):
                return None
            result = reply["cursor"]
            cursor_id = int(result.get("id") or 0)
            for document in result.get("firstBatch", result.get("nextBatch")) or []:
                if id_key(bytes(document.raw)) == key:
                    self._kill(conn, db, collection, cursor_id)
                    return count
                count += 1
            if not cursor_id:
                return None
            reply = self._backend_raw(conn, db, {"getMore": bson.Int64(cursor_id), "collection": collection,
                                                 "batchSize": 10_000, **session})

    def _resume_find(self, conn: Connection, body: dict[str, Any], db: str) -> dict[str, Any]:
        """find with ``$_resumeAfter``: SecantusDB cannot seek to a record, so the proxy finds where the record
        is in the scan now (reading through the documents before it), asks the backend to skip to it, checks
        that the record is the first document returned and drops it: the client's batch starts after it."""
        record = body[RESUME_AFTER].get("$recordId")
        cursor = self._natural_find(body, db)
        assert cursor is not None
        namespace, collection = cursor.namespace, cursor.collection
        with self._state_lock:
            key = (self._record_ids.get(namespace) or _RecordIds()).by_id or {}
            key_bytes = key.get(int(record)) if isinstance(record, bson.int64.Int64) else None
        if key_bytes is None:
            return record_not_found(record)
        session = {k: body[k] for k in ("lsid", "$clusterTime", "readConcern") if k in body}
        query = body.get("filter") or {}
        # With a filter the resume record may not match it: scan "filter or this record" and drop the record.
        scan_filter = {"$or": [query, RawBSONDocument(key_bytes, RAW)]} if query else {}
        batch_size = body.get("batchSize")
        wanted = DEFAULT_FIRST_BATCH if batch_size is None else int(batch_size)
        skip = int(body.get("skip") or 0)
        for _ in range(RESUME_ATTEMPTS):
            before = self._records_before(conn, db, collection, scan_filter, key_bytes, session)
            if before is None:
                break
            find = dict(body)
            find["filter"] = scan_filter
            find["skip"] = before + (1 + skip if skip else 0)
            find["batchSize"] = wanted + (0 if skip else 1)
            if cursor.left is not None and not skip:
                find["limit"] = cursor.left + 1
            reply = self._backend_raw(conn, db, find)
            if not reply.get("ok") or "cursor" not in reply:
                return bson.decode(reply.raw)
            first = (reply["cursor"].get("firstBatch") or [None])[0]
            if skip or (first is not None and id_key(bytes(first.raw)) == key_bytes):
                cursor.last = int(record)
                return self._natural_batch(cursor, reply, "firstBatch", wanted, skip_first=not skip)
            # The record moved (a document before it was deleted meanwhile) or is gone: look again.
            self._kill(conn, db, collection, int(reply["cursor"].get("id") or 0))
        with self._state_lock:
            ids = self._record_ids.get(namespace)
            if ids is not None and ids.by_id is not None and ids.by_key is not None:
                ids.by_id.pop(int(record), None)
                if ids.by_key.get(key_bytes) == int(record):
                    del ids.by_key[key_bytes]
        return record_not_found(record)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--backend-port", type=int, required=True)
    parser.add_argument("--backend-host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls-cert-file")
    parser.add_argument("--tls-key-file")
    parser.add_argument("--backend-ca-file", help="CA of the backend's TLS certificate (turns backend TLS on)")
    parser.add_argument("--bypass-app-name", action="append", default=[],
                        help="application name whose clients write while user writes are blocked (repeatable)")
    parser.add_argument("--privileged-app-name", action="append", default=None,
                        help="application name allowed setUserWriteBlockMode/appendOplogNote (repeatable; "
                             "default: every client)")
    parser.add_argument("--server-version", help="present this server version (e.g. 6.0.5) instead of the backend's")
    args = parser.parse_args(argv)
    serve_forever(ReplicaSetProxy(args.backend_port, backend_host=args.backend_host, port=args.port,
                                  tls_cert=args.tls_cert_file, tls_key=args.tls_key_file,
                                  backend_ca=args.backend_ca_file, bypass_app_names=args.bypass_app_name,
                                  privileged_app_names=args.privileged_app_name, server_version=args.server_version))


if __name__ == "__main__":
    main()
