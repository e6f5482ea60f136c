"""A loopback mongos stand-in that ROUTES requests to several shards, each a replica set (SecantusDB).

``devtools.mongos_proxy`` relays everything to one shard. This router terminates client connections itself
(OP_MSG framing from ``devtools.wire_proxy``), keeps the sharding metadata a config server would keep, and
talks to the shards with pymongo clients, one per shard and client application name. Each shard is given
by the address clients use to reach it as a replica set: normally a ``devtools.replica_set_proxy``
``ReplicaSetProxy`` in front of a SecantusDB server, so that ``setUserWriteBlockMode`` and
``appendOplogNote`` exist on every shard, as they do on a real shard.

What it imitates (as MongoDB documents mongos):

Handshake and topology
    ``hello``/``isMaster`` (OP_MSG and the legacy OP_QUERY form) answer as a mongos: the first shard's reply
    without the replica-set fields, ``msg: "isdbgrid"`` (``devtools.mongos_proxy.mongos_hello``), plus
    ``operationTime``. ``listShards`` lists every shard as ``{_id, host: "<setName>/<members>", state: 1}``
    with the members the shard's own ``hello`` lists, so a client can reach each shard as a replica set
    (inspection measures each shard's oplog window there). ``balancerStatus``/``balancerStop``/
    ``balancerStart`` as ``MongosProxy`` answers them (the balancer never moves a chunk here).

Sharding metadata (what config servers hold)
    Databases with a primary shard (given, or the first shard); unsharded collections live whole on their
    database's primary shard. Sharded collections have a RANGE shard key on ``_id`` only (``{_id: 1}``),
    split into chunks at given split points, each chunk owned by one shard: ``ShardedCluster(shards,
    sharded={"app.orders": {"key": {"_id": 1}, "splits": [5000], "owners": [0, 1]}})`` (owners default
    to round robin), or the ``enableSharding`` / ``shardCollection`` commands (key ``{_id: 1}`` only;
    ``splits``/``owners`` as the stand-in's extension). A sharded collection is created on every shard,
    as shardCollection creates it on the primary shard and the chunk owners. Reads of ``config.shards``,
    ``config.databases``, ``config.collections`` and ``config.chunks`` are answered from this metadata
    (filters: top-level equality, ``$eq``/``$ne``/``$in``/``$nin``/``$exists``; other operators are refused).
    ``drop``/``dropDatabase`` remove the metadata of what they drop, as on a real cluster.

Writes
    ``insert`` is split by chunk (ordered: consecutive runs per shard, stopping at the first error;
    unordered: one batch per shard), write error indexes mapped back to the client's. ``update``/``delete``
    statements with an ``_id`` equality go to the owning shard; ``multi: true`` updates and ``limit: 0``
    deletes go to every shard the ``_id`` predicate may touch (all without one), counts summed. A single
    update/delete without an ``_id`` equality follows MongoDB 7.1+ (the version the shards present): the
    router finds one matching document (broadcast ``find`` ``limit: 1``) and then updates/deletes that
    document by ``_id`` on its shard (mongos's two-phase write without shard key; here not guarded
    against a concurrent change between the two phases). An upsert needs the shard key in its filter:
    refused otherwise with ShardKeyNotFound (61) "Failed to target upsert by query :: could not extract exact
    shard key", mongos's error (its ``CollectionRoutingInfoTargeter``). ``findAndModify`` on a sharded
    collection: targeted by ``_id`` equality, otherwise the same two-phase path (no ``sort``).
    ``setUserWriteBlockMode`` and ``appendOplogNote`` are run on every shard (the reply carries the latest
    ``operationTime``). Commands on unsharded collections are forwarded whole to the primary shard.
    The client's handshake application name is used on the router's shard connections (a real mongos runs
    shard requests on behalf of the client's user; here the name stands in for the user, which is how the
    shards' ``ReplicaSetProxy`` grants the write-blocking bypass).

Reads
    ``find`` goes to the shards the ``_id`` predicate may touch (equality, ``$in``, ranges, also inside a
    top-level ``$and``), every chunk owner otherwise; results merged by ``_id`` (ascending or descending,
    in BSON order) when the sort is on ``_id``, concatenated shard by shard without a sort (mongos gives no
    order then either); any other sort is refused (code 2, "not imitated"). ``limit``/``skip`` are applied
    by the router (shards get ``limit + skip``), ``batchSize``/``singleBatch`` honoured; cursors are the
    router's own (``getMore``/``killCursors``). ``count`` and ``estimated_document_count`` sum per shard
    (``skip``/``limit`` refused). ``aggregate`` on a sharded collection supports exactly the shapes the
    product sends: ``count_documents`` (``$match``, ``$group: {_id: <const>, n: {$sum: 1}}``) and
    ``$count`` summed; ``$sample`` (optionally after ``$match``; each shard samples ``size``, the router picks
    ``size`` at random from their union), followed by ``$project``/``$sort`` on ``_id``; and pipelines of
    ``$match``/``$project``/``$addFields``/``$set``/``$unset`` with an optional trailing ``$sort`` on
    ``_id``, ``$skip`` and ``$limit``. Others are refused. ``collStats`` sums ``count``/``size``/``storageSize``/
    ``totalIndexSize`` with ``sharded: true`` and per-shard ``shards``. A view lives on its database's primary
    shard; reads of a view over a sharded collection (``find``, ``count``, ``aggregate``) are resolved by the
    router into an aggregate on the sharded collection (the view's pipeline first), as mongos resolves them,
    within the pipeline shapes above. ``listDatabases`` merges the shards'
    lists (``local`` excluded, sizes summed; ``admin``/``config`` appear only as the shards have them, where a
    real mongos lists the config servers' ones); ``listCollections`` and ``listIndexes`` come from the
    database's primary shard; ``create``/``createIndexes``/``dropIndexes``/``collMod``/``drop`` go to
    the primary shard, or to every shard for a sharded collection (reply with ``raw`` per shard).

Change streams (``aggregate`` with ``$changeStream`` on a collection, a database or the cluster)
    One stream per shard (every shard, whatever the namespace, as mongos opens them), merged the way mongos
    merges: events ordered by clusterTime (ties between shards by shard order, where mongos compares the
    rest of the resume token's sort key), and an event is returned only once every other shard's stream
    has passed its clusterTime: each shard's ``postBatchResumeToken`` is its high-water mark. An idle
    shard advances its mark only by its periodic no-op writes (mongod's ``periodicNoopIntervalSecs``, 10 s
    by default; SERVER-80427: "in the worst case when one of the shards doesn't receive any writes, the
    latency will be around that"): start shard servers with ``--noop-heartbeat-seconds N`` (SecantusDB's
    equivalent; checked with 0.7.0b3: an idle change stream's ``postBatchResumeToken`` advances with each
    heartbeat, and without them it stays put). Without
    heartbeats an idle shard stalls the merged stream, as it would on a cluster without them. A getMore
    waits up to ``maxTimeMS`` (1 s by default) for an event, then answers an empty batch.
    ``postBatchResumeToken`` on every batch. ``startAtOperationTime`` is passed to every shard.

    Router resume tokens: ``{_data: "72747231" + hex(BSON({t: Timestamp, p: {<shardId>: point}}))}``, where
    ``t`` is the event's clusterTime (the high-water time for a ``postBatchResumeToken``) and ``point`` is
    where that shard's stream resumes: ``{token: <the shard's own resume token>}`` or ``{at: Timestamp}``
    (its ``startAtOperationTime``). A shard whose buffered events have all been returned resumes from its
    latest ``postBatchResumeToken``; one with events still buffered, after its last returned event. So
    ``resumeAfter``/``startAfter`` with a router token resume the merged stream exactly. A real mongos token
    is the ``_data`` KeyString of (clusterTime, version, txnOpIndex, UUID, documentKey ...), the same on
    every shard; a router token is not one, does not sort like one, and only this router understands it.

Cluster time
    The shards are separate servers on one machine clock; their Timestamps are (wall seconds, counter).
    The router answers ``operationTime`` and ``$clusterTime`` (a zero signature) with the greatest cluster
    time it has seen in any shard reply.

What it does NOT imitate:
- authentication and authorization: it serves unauthenticated clients only (``saslStart``,
  ``authenticate`` ... are refused); the cluster has no users (``usersInfo`` answers none; ``createUser``
  and the other user and role commands are refused as unknown); TLS; OP_COMPRESSED (compression is never
  offered); the streaming ``hello`` protocol (no ``topologyVersion``, so drivers poll); exhaust cursors
  (``exhaustAllowed`` is ignored: no reply sets ``moreToCome``);
- transactions (``startTransaction`` refused); retryable writes are executed once (``txnNumber`` dropped);
  sessions (``lsid`` is not passed on; cursors are not bound to sessions); causal consistency
  (``afterClusterTime`` is dropped, since the shards' clocks are not gossiped);
- cluster-time gossip: a real mongos advances a shard's logical clock to the cluster time it sends, so no
  shard writes below a cluster time a client has seen; here the shards' Timestamps are independent within
  a second, so a ``startAtOperationTime`` taken from one shard's time may miss a write made in the same
  second on another shard;
- shard keys other than ``{_id: 1}`` (hashed, compound), zones, chunk migrations, splits and the balancer
  actually moving anything, jumbo chunks, resharding, ``movePrimary``; config servers as servers
  (the metadata lives in the router's memory); more than one router;
- sorts other than on ``_id`` for sharded reads, ``$sortKey`` merging of arbitrary pipelines, ``distinct``,
  ``mapReduce``, ``$lookup``/``$group``/``$out``/``$merge`` on sharded collections, ``renameCollection`` of a
  sharded collection, ``dbStats``, ``$collStats``, ``$indexStats``, ``explain`` of anything but ``find``
  (a ``find``'s is each targeted shard's plan under ``winningPlan.shards``, as mongos reports it), tailable
  cursors on sharded collections, collation-aware targeting;
- change-stream details: the config server's stream that a real mongos also merges (to learn of new
  shards; its no-op writer runs every second); DDL events (``drop``, ``createIndexes`` ...) of a sharded
  collection come once per shard (mongos deduplicates them and emits one ``invalidate``), and a shard
  stream closed by an invalidate holds the merged stream back; ``startAfter`` an invalidate, the
  ``$changeStreamSplitLargeEvent`` fragments' ordering across shards, resume tokens as real KeyStrings
  (see above), ``showMigrationEvents``;
- cursor timeouts: router cursors live until exhausted or killed (mongos kills idle ones after 10 minutes);
- read preferences (every read goes to each shard's primary), write concern beyond passing it on,
  ``maxTimeMS`` on anything but change-stream ``getMore``s, per-command privilege checks; commands on
  ``local`` are refused with IllegalOperation (20) (a client reads a shard's oplog on the shard itself;
  the exact error of a current mongos there was not checked; old ones answered code 13644 "can't use local
  database through mongos"); commands on ``config`` other than the reads above are refused;
- mongos's own ``buildInfo``/``getParameter``/``connectionStatus``/``serverStatus``/``hostInfo``/
  ``getCmdLineOpts``: they are the first shard's replies (a mongos answers them itself).

Requests refused as not imitated (code 59 CommandNotFound, or "not imitated" in the message) are recorded
in ``ShardedCluster.refusals``, so a test can show that the code under test sent none.

Use::

    with ShardedCluster([shard0_proxy.host, shard1_proxy.host],
                        sharded={"app.orders": {"key": {"_id": 1}, "splits": [5000]}}) as cluster:
        MongoClient(f"mongodb://{cluster.host}/")
"""

from __future__ import annotations

import datetime
import decimal
import itertools
import logging
import random
import socket
import struct
import threading
import time
import uuid
from bisect import bisect_right
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import bson
from bson import Int64, ObjectId, Timestamp
from bson.binary import Binary
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.datetime_ms import DatetimeMS
from bson.decimal128 import Decimal128
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.raw_bson import RawBSONDocument
from bson.regex import Regex

from devtools.mongos_proxy import mongos_hello
from devtools.wire_proxy import (
    HELLO_COMMANDS,
    MORE_TO_COME,
    OP_COMPRESSED,
    OP_MSG,
    OP_QUERY,
    Message,
    OpMsg,
    OpQuery,
    ProtocolError,
    WireProxy,
    command_name,
    op_reply,
    read_message,
)

log = logging.getLogger("devtools.sharded_cluster")

RAW = CodecOptions(document_class=RawBSONDocument)
DECODE = CodecOptions(datetime_conversion=DatetimeConversion.DATETIME_AUTO, tz_aware=True)
TOKEN_PREFIX = "72747231"  # "rtr1"
MAX_BATCH_BYTES = 16 * 1024 * 1024
DEFAULT_FIRST_BATCH = 101
STRIP = ("$db", "lsid", "$clusterTime", "txnNumber", "autocommit", "$readPreference", "apiVersion", "apiStrict",
         "apiDeprecationErrors", "$audit", "startTransaction")
ADMIN_PASSTHROUGH = {"buildinfo", "getparameter", "connectionstatus", "serverstatus", "hostinfo", "getcmdlineopts",
                     "whatsmyuri", "getlog", "features"}
SHARD_KEY_NOT_FOUND, ILLEGAL_OPERATION, BAD_VALUE, COMMAND_NOT_FOUND = 61, 20, 2, 59
CURSOR_NOT_FOUND, NAMESPACE_EXISTS, NAMESPACE_NOT_FOUND = 43, 48, 26
STREAMING_STAGES = {"$match", "$project", "$addFields", "$set", "$unset"}


class CommandError(Exception):
    """A command refused by the router; ``reply`` is the error document."""

    def __init__(self, code: int, code_name: str, errmsg: str) -> None:
        super().__init__(errmsg)
        self.reply = {"ok": 0.0, "errmsg": errmsg, "code": code, "codeName": code_name}


class ShardReplyError(Exception):
    """A shard answered ``ok: 0``; the router passes its reply on."""

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(reply.get("errmsg"))
        self.reply = reply


def not_imitated(what: str) -> CommandError:
    return CommandError(BAD_VALUE, "BadValue", f"{what} is not imitated by the sharded_cluster stand-in")


# ---------------------------------------------------------------- BSON order


def _type_rank(value: Any) -> int:
    if isinstance(value, MinKey):
        return 1
    if value is None:
        return 2
    if isinstance(value, bool):
        return 9
    if isinstance(value, (int, float, Decimal128)):
        return 3
    if isinstance(value, str):
        return 4
    if isinstance(value, (dict, RawBSONDocument)):
        return 5
    if isinstance(value, (list, tuple)):
        return 6
    if isinstance(value, (bytes, uuid.UUID)):
        return 7
    if isinstance(value, ObjectId):
        return 8
    if isinstance(value, (datetime.datetime, DatetimeMS)):
        return 10
    if isinstance(value, Timestamp):
        return 11
    if isinstance(value, Regex):
        return 12
    if isinstance(value, MaxKey):
        return 13
    return 14


def bson_key(value: Any) -> tuple:
    """A Python sort key giving MongoDB's comparison order (simple collation) for the common BSON types."""
    rank = _type_rank(value)
    if rank == 3:
        number = value.to_decimal() if isinstance(value, Decimal128) else decimal.Decimal(value)
        return (3, 0, 0) if number.is_nan() else (3, 1, number)
    if rank == 4:
        return (4, value.encode())
    if rank == 5:
        return (5, tuple((_type_rank(v), k.encode(), bson_key(v)) for k, v in value.items()))
    if rank == 6:
        return (6, tuple(bson_key(v) for v in value))
    if rank == 7:
        data = value.bytes if isinstance(value, uuid.UUID) else bytes(value)
        subtype = 4 if isinstance(value, uuid.UUID) else getattr(value, "subtype", 0)
        return (7, len(data), subtype, data)
    if rank == 8:
        return (8, value.binary)
    if rank == 9:
        return (9, value)
    if rank == 10:
        if isinstance(value, DatetimeMS):
            return (10, int(value))
        aware = value if value.tzinfo else value.replace(tzinfo=datetime.UTC)
        return (10, int(aware.timestamp() * 1000))
    if rank == 11:
        return (11, value.time, value.inc)
    if rank == 12:
        return (12, value.pattern, value.flags)
    return (rank,)


# ---------------------------------------------------------------- metadata


@dataclass
class ShardedCollection:
    namespace: str
    splits: list[Any]  # chunk i covers [splits[i-1], splits[i]) in BSON order; MinKey/MaxKey at the ends
    owners: list[int]  # shard index per chunk
    uuid: Binary = field(default_factory=lambda: Binary.from_uuid(uuid.uuid4()))
    epoch: ObjectId = field(default_factory=ObjectId)

    def __post_init__(self) -> None:
        self._keys = [bson_key(s) for s in self.splits]

    def owner(self, value: Any) -> int:
        return self.owners[bisect_right(self._keys, bson_key(value))]

    def shards_for_range(self, low: Any, high: Any) -> set[int]:
        """Owners of the chunks overlapping [low, high] (inclusive; None: unbounded)."""
        first = 0 if low is None else bisect_right(self._keys, bson_key(low))
        last = len(self.owners) - 1 if high is None else bisect_right(self._keys, bson_key(high))
        return {self.owners[i] for i in range(first, last + 1)}

    def chunk_bounds(self) -> list[tuple[Any, Any, int]]:
        bounds = [MinKey(), *self.splits, MaxKey()]
        return [(bounds[i], bounds[i + 1], self.owners[i]) for i in range(len(self.owners))]


def _id_predicate(query: Any) -> tuple[str, Any] | None:
    """("eq", [values]) or ("range", (low, high)) for the ``_id`` part of a filter, None when unconstrained."""
    if not isinstance(query, (dict, RawBSONDocument)):
        return None
    if "_id" in query:
        value = query["_id"]
        if isinstance(value, (dict, RawBSONDocument)) and any(str(k).startswith("$") for k in value):
            ops = dict(value.items())
            if "$eq" in ops:
                return "eq", [ops["$eq"]]
            if "$in" in ops and not any(isinstance(v, Regex) for v in ops["$in"]):
                return "eq", list(ops["$in"])
            low = ops.get("$gte", ops.get("$gt"))
            high = ops.get("$lte", ops.get("$lt"))
            if low is not None or high is not None:
                return "range", (low, high)
            return None
        if not isinstance(value, Regex):
            return "eq", [value]
    for clause in query.get("$and") or []:
        found = _id_predicate(clause)
        if found is not None:
            return found
    return None


def _single_id(query: Any) -> tuple[bool, Any]:
    found = _id_predicate(query)
    if found and found[0] == "eq" and len(found[1]) == 1:
        return True, found[1][0]
    return False, None


def _matches(doc: dict[str, Any], query: dict[str, Any]) -> bool:
    """The tiny matcher of the config.* reads: top-level equality, $eq/$ne/$in/$nin/$exists."""
    for name, cond in query.items():
        present, value = name in doc, doc.get(name)
        if isinstance(cond, dict) and cond and all(str(k).startswith("$") for k in cond):
            for op, arg in cond.items():
                if op == "$eq":
                    ok = present and value == arg
                elif op == "$ne":
                    ok = not (present and value == arg)
                elif op == "$in":
                    ok = present and value in arg
                elif op == "$nin":
                    ok = not (present and value in arg)
                elif op == "$exists":
                    ok = present == bool(arg)
                else:
                    raise not_imitated(f"operator {op} in a config.* read")
                if not ok:
                    return False
        elif not (present and value == cond):
            return False
    return True


def _project(doc: dict[str, Any], projection: Any) -> dict[str, Any]:
    if not projection:
        return doc
    spec = dict(projection)
    keep_id = spec.pop("_id", 1)
    if any(spec.values()):
        out = {k: v for k, v in doc.items() if k in spec and spec[k]}
    else:
        out = {k: v for k, v in doc.items() if k not in spec}
    if keep_id and "_id" in doc:
        out = {"_id": doc["_id"], **{k: v for k, v in out.items() if k != "_id"}}
    else:
        out.pop("_id", None)
    return out


# ---------------------------------------------------------------- shards


class Shard:
    """One shard: a replica set reached at ``address`` (host:port); pymongo clients per application name."""

    def __init__(self, index: int, address: str, shard_id: str | None = None) -> None:
        import pymongo

        self.index = index
        self.address = address
        self._pymongo = pymongo
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        hello = self.client(None).admin.command("hello")
        self.hello = hello
        self.set_name = str(hello.get("setName") or f"shard{index}")
        self.members = [str(h) for h in hello.get("hosts") or [address]]
        self.id = shard_id or f"shard{index}"

    @property
    def host(self) -> str:
        return f"{self.set_name}/{','.join(self.members)}"

    def client(self, app: str | None):
        key = app or ""
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._pymongo.MongoClient(
                    f"mongodb://{self.address}/", directConnection=True, appname=app or "sharded-cluster-router",
                    retryWrites=False, retryReads=False, serverSelectionTimeoutMS=10_000)
                self._clients[key] = client
            return client

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


def _as_dict(doc: Any) -> dict[str, Any]:
    return dict(doc.items()) if doc is not None else {}


# ---------------------------------------------------------------- cursors


class ShardStream:
    """One shard's cursor as the router reads it: a buffer refilled with getMore."""

    def __init__(self, cluster: ShardedCluster, shard: Shard, db: str, reply: dict[str, Any], app: str | None):
        cursor = _as_dict(reply["cursor"])
        self.cluster, self.shard, self.db, self.app = cluster, shard, db, app
        self.id = int(cursor.get("id") or 0)
        self.collection = str(cursor.get("ns", f"{db}.x")).split(".", 1)[1]
        self.buffer: deque[RawBSONDocument] = deque(cursor.get("firstBatch") or [])
        self.pbrt = cursor.get("postBatchResumeToken")

    def more(self, batch_size: int | None = None, max_time_ms: int | None = None) -> None:
        body: dict[str, Any] = {"getMore": Int64(self.id), "collection": self.collection}
        if batch_size:
            body["batchSize"] = batch_size
        if max_time_ms is not None:
            body["maxTimeMS"] = max(1, int(max_time_ms))
        reply = self.cluster.run(self.shard, self.db, body, self.app)
        cursor = _as_dict(reply["cursor"])
        self.id = int(cursor.get("id") or 0)
        self.buffer.extend(cursor.get("nextBatch") or [])
        if cursor.get("postBatchResumeToken") is not None:
            self.pbrt = cursor["postBatchResumeToken"]

    def head(self) -> RawBSONDocument | None:
        while not self.buffer and self.id:
            self.more()
        return self.buffer[0] if self.buffer else None

    def kill(self) -> None:
        if self.id:
            try:
                self.cluster.run(self.shard, self.db, {"killCursors": self.collection, "cursors": [Int64(self.id)]},
                                 self.app)
            except Exception:  # noqa: BLE001 - best effort, as mongos's cleanup is
                pass
            self.id = 0


class RouterCursor:
    ns: str

    def next_batch(self, batch_size: int | None, max_time_ms: int | None, first: bool) -> tuple[list, bool]:
        raise NotImplementedError

    def extra(self) -> dict[str, Any]:
        return {}

    def kill(self) -> None:
        pass


class ListCursor(RouterCursor):
    def __init__(self, ns: str, docs: Iterable[Any]) -> None:
        self.ns, self.docs = ns, deque(docs)

    def next_batch(self, batch_size, max_time_ms, first):
        limit = batch_size if batch_size else (DEFAULT_FIRST_BATCH if first else None)
        out, size = [], 0
        while self.docs and (limit is None or len(out) < limit):
            length = len(bson.encode(self.docs[0]))
            if out and size + length > MAX_BATCH_BYTES:
                break
            out.append(self.docs.popleft())
            size += length
        return out, not self.docs


class MergeCursor(RouterCursor):
    """Shard cursors merged by ``_id`` (direction 1/-1) or concatenated (direction 0); skip/limit applied."""

    def __init__(self, ns: str, streams: list[ShardStream], direction: int, skip: int = 0, limit: int = 0) -> None:
        self.ns, self.streams, self.direction = ns, streams, direction
        self.skip, self.limit, self.returned = skip, limit, 0
        self.pending: deque = deque()

    def _pop(self) -> Any | None:
        if self.pending:
            return self.pending.popleft()
        if self.direction == 0:
            for stream in self.streams:
                if stream.head() is not None:
                    return stream.buffer.popleft()
            return None
        best, best_key = None, None
        for stream in self.streams:
            doc = stream.head()
            if doc is None:
                continue
            key = bson_key(doc.get("_id", MinKey()))
            if best is None or (key < best_key if self.direction > 0 else key > best_key):
                best, best_key = stream, key
        return best.buffer.popleft() if best is not None else None

    def _next(self) -> Any | None:
        while self.skip:
            self.skip -= 1
            if self._pop() is None:
                return None
        if self.limit and self.returned >= self.limit:
            return None
        doc = self._pop()
        if doc is not None:
            self.returned += 1
        return doc

    def next_batch(self, batch_size, max_time_ms, first):
        limit = batch_size if batch_size else (DEFAULT_FIRST_BATCH if first else None)
        out, size = [], 0
        while limit is None or len(out) < limit:
            doc = self._next()
            if doc is None:
                break
            if out and size + len(doc.raw) > MAX_BATCH_BYTES:
                self.pending.appendleft(doc)
                self.returned -= 1
                break
            out.append(doc)
            size += len(doc.raw)
        done = not self.pending and ((self.limit and self.returned >= self.limit)
                                     or all(not s.buffer and not s.id for s in self.streams))
        if done:
            self.kill()
        return out, bool(done)

    def kill(self) -> None:
        for stream in self.streams:
            stream.kill()


# ---------------------------------------------------------------- change streams


def _token_time(token: Any, fallback: Timestamp | None = None) -> Timestamp | None:
    """The clusterTime inside a SecantusDB resume token (hex of a BSON document with ``t``)."""
    try:
        data = bytes.fromhex(str(token["_data"]))
        value = bson.decode(data).get("t")
        return value if isinstance(value, Timestamp) else fallback
    except Exception:  # noqa: BLE001 - not a token of that form
        return fallback


def encode_router_token(time_: Timestamp, points: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"_data": TOKEN_PREFIX + bson.encode({"t": time_, "p": points}).hex()}


def decode_router_token(token: Any) -> tuple[Timestamp, dict[str, dict[str, Any]]]:
    data = str(_as_dict(token).get("_data", "")) if isinstance(token, (dict, RawBSONDocument)) else ""
    if not data.startswith(TOKEN_PREFIX):
        raise CommandError(BAD_VALUE, "BadValue", f"resume token {token!r} was not issued by this router")
    doc = bson.decode(bytes.fromhex(data[len(TOKEN_PREFIX):]))
    return doc["t"], doc["p"]


class ShardChangeStream(ShardStream):
    def __init__(self, cluster, shard, db, reply, app, start_point: dict[str, Any]):
        super().__init__(cluster, shard, db, reply, app)
        self.resume_point = start_point  # where this shard resumes after the last event returned
        self.hw = _token_time(self.pbrt, None)

    def more(self, batch_size=None, max_time_ms=None) -> None:
        super().more(batch_size, max_time_ms)
        self.hw = _token_time(self.pbrt, self.hw)

    def point(self) -> dict[str, Any]:
        if not self.buffer and self.pbrt is not None:
            return {"token": self.pbrt}
        return self.resume_point


class ChangeStreamCursor(RouterCursor):
    """The merged change stream (see the module docstring)."""

    def __init__(self, ns: str, streams: list[ShardChangeStream]) -> None:
        self.ns, self.streams = ns, streams
        self.last_time: Timestamp | None = None

    def _token(self, time_: Timestamp | None) -> dict[str, Any]:
        return encode_router_token(time_ or Timestamp(0, 0), {s.shard.id: s.point() for s in self.streams})

    def _candidate(self) -> tuple[ShardChangeStream, Timestamp] | None:
        best, best_key = None, None
        for stream in self.streams:
            if stream.buffer:
                event = stream.buffer[0]
                key = (bson_key(event.get("clusterTime") or Timestamp(0, 0)), stream.shard.index)
                if best is None or key < best_key:
                    best, best_key = stream, key
        if best is None:
            return None
        when = best.buffer[0].get("clusterTime") or Timestamp(0, 0)
        for other in self.streams:
            if other is best or other.buffer:
                continue
            if other.hw is None or other.hw < when or (other.hw == when and other.shard.index < best.shard.index):
                return None
        return best, when

    def _blocking(self) -> list[ShardChangeStream]:
        """The shards to read from: every one without buffered events (their high-water marks decide)."""
        return [s for s in self.streams if not s.buffer and s.id]

    def next_batch(self, batch_size, max_time_ms, first):
        limit = batch_size if batch_size is not None else (DEFAULT_FIRST_BATCH if first else None)
        if limit == 0:
            return [], False
        deadline = time.monotonic() + (max_time_ms if max_time_ms is not None else 1000) / 1000.0
        out: list[dict[str, Any]] = []
        size = 0
        while True:
            while limit is None or len(out) < limit:
                found = self._candidate()
                if found is None:
                    break
                stream, when = found
                event = stream.buffer.popleft()
                if out and size + len(event.raw) > MAX_BATCH_BYTES:
                    stream.buffer.appendleft(event)
                    break
                stream.resume_point = {"token": event["_id"]}
                self.last_time = when
                doc = _as_dict(event)
                doc["_id"] = self._token(when)
                out.append(doc)
                size += len(event.raw)
            remaining = deadline - time.monotonic()
            if out or remaining <= 0 or first:
                break
            waiting = self._blocking() or [s for s in self.streams if s.id]
            if not waiting:
                break
            for stream in waiting:
                wait_ms = max(1, int(min(remaining, 0.25) * 1000 / len(waiting)))
                stream.more(max_time_ms=wait_ms)
        return out, False

    def extra(self) -> dict[str, Any]:
        marks = [s.hw for s in self.streams if not s.buffer and s.hw is not None]
        when = self.last_time
        if marks and not any(s.buffer for s in self.streams):
            when = min(marks)
        return {"postBatchResumeToken": self._token(when)}

    def kill(self) -> None:
        for stream in self.streams:
            stream.kill()


# ---------------------------------------------------------------- the router


class ShardedCluster(WireProxy):
    """The router; ``start()``/``stop()`` or a ``with`` block. ``shards``: each shard's address (host:port of
    its ReplicaSetProxy or server). ``sharded``: namespace -> {key: {_id: 1}, splits: [...], owners: [...]};
    ``primaries``: database -> shard index."""

    thread_name = "sharded-cluster"

    def __init__(self, shards: list[str], *, sharded: dict[str, dict[str, Any]] | None = None,
                 primaries: dict[str, int] | None = None, port: int = 0, shard_ids: list[str] | None = None) -> None:
        super().__init__(0, port=port)
        self.shard_addresses = list(shards)
        self._shard_ids = shard_ids
        self.shards: list[Shard] = []
        self._sharded_config = dict(sharded or {})
        self.sharded: dict[str, ShardedCollection] = {}
        self.primaries: dict[str, int] = dict(primaries or {})
        self.cluster_time = Timestamp(0, 0)
        self.cursors: dict[int, RouterCursor] = {}
        self.balancer_mode, self.balancer_rounds = "full", 0
        self._meta_lock = threading.RLock()
        self.refusals: list[str] = []  # "command: errmsg" of every request refused as not imitated (tests read it)

    # -------------------------------------------------------- lifecycle

    def start(self):
        ids = self._shard_ids or [f"shard{i}" for i in range(len(self.shard_addresses))]
        self.shards = [Shard(i, address, ids[i]) for i, address in enumerate(self.shard_addresses)]
        for namespace, spec in self._sharded_config.items():
            self.shard_collection(namespace, spec.get("key", {"_id": 1}), spec.get("splits", []), spec.get("owners"))
        return super().start()

    def stop(self) -> None:
        super().stop()
        for cursor in list(self.cursors.values()):
            try:
                cursor.kill()
            except Exception:  # noqa: BLE001
                pass
        self.cursors.clear()
        for shard in self.shards:
            shard.close()

    def shard_collection(self, namespace: str, key: Any, splits: list[Any], owners: list[int] | None = None) -> None:
        if dict(key) != {"_id": 1}:
            raise not_imitated(f"shard key {dict(key)!r} (only {{_id: 1}})")
        splits = sorted(splits, key=bson_key)
        owners = list(owners) if owners is not None else [i % len(self.shards) for i in range(len(splits) + 1)]
        if len(owners) != len(splits) + 1 or any(not 0 <= o < len(self.shards) for o in owners):
            raise CommandError(BAD_VALUE, "BadValue", "owners must name one shard index per chunk")
        db, _, coll = namespace.partition(".")
        with self._meta_lock:
            self.primaries.setdefault(db, 0)
            self.sharded[namespace] = ShardedCollection(namespace, splits, owners)
        for shard in self.shards:  # the collection exists on every shard (primary and chunk owners)
            try:
                self.run(shard, db, {"create": coll}, None)
            except ShardReplyError as exc:
                if exc.reply.get("code") != NAMESPACE_EXISTS:
                    raise

    # -------------------------------------------------------- shard access

    def observe(self, reply: dict[str, Any]) -> None:
        times = [reply.get("operationTime"), _as_dict(reply.get("$clusterTime")).get("clusterTime")]
        with self._lock:
            for value in times:
                if isinstance(value, Timestamp) and value > self.cluster_time:
                    self.cluster_time = value

    def run(self, shard: Shard, db: str, body: dict[str, Any], app: str | None, check: bool = True) -> dict[str, Any]:
        """Run ``body`` on ``shard``; the reply as a dict (nested documents raw). ``check``: raise on ok 0."""
        from pymongo.errors import OperationFailure

        try:
            reply = _as_dict(shard.client(app)[db].command(bson.SON(body), codec_options=RAW))
        except OperationFailure as exc:
            reply = _as_dict(exc.details) if exc.details else {"ok": 0.0, "errmsg": str(exc), "code": exc.code}
            self.observe(reply)
            if check:
                raise ShardReplyError(reply) from None
            return reply
        self.observe(reply)
        return reply

    def primary(self, db: str) -> Shard:
        with self._meta_lock:
            return self.shards[self.primaries.get(db, 0)]

    def sharded_collection(self, db: str, coll: Any) -> ShardedCollection | None:
        with self._meta_lock:
            return self.sharded.get(f"{db}.{coll}") if isinstance(coll, str) else None

    def register(self, cursor: RouterCursor) -> int:
        cursor_id = random.getrandbits(62) | 1
        with self._lock:
            self.cursors[cursor_id] = cursor
        return cursor_id

    def cursor_reply(self, cursor: RouterCursor, batch_size, max_time_ms, first: bool,
                     cursor_id: int | None = None) -> dict[str, Any]:
        docs, done = cursor.next_batch(batch_size, max_time_ms, first)
        if done:
            if cursor_id is not None:
                with self._lock:
                    self.cursors.pop(cursor_id, None)
            out_id = 0
        else:
            out_id = cursor_id if cursor_id is not None else self.register(cursor)
        body = {"firstBatch" if first else "nextBatch": docs, "id": Int64(out_id), "ns": cursor.ns, **cursor.extra()}
        return {"cursor": body, "ok": 1.0}

    # -------------------------------------------------------- connections

    def _serve(self, raw_client: socket.socket, number: int) -> None:
        info: dict[str, Any] = {}
        try:
            raw_client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while not self._stopping.is_set():
                request = read_message(raw_client)
                self.op_codes[request.op_code] += 1
                reply = self._answer(request, info)
                if reply is not None:
                    raw_client.sendall(reply.encode())
        except (ConnectionError, OSError, ProtocolError) as exc:
            if not self._stopping.is_set() and not isinstance(exc, ConnectionError):
                log.debug("connection closed: %s", exc)
        finally:
            self._shutdown(raw_client)
            self._untrack(raw_client)

    def _answer(self, request: Message, info: dict[str, Any]) -> Message | None:
        if request.op_code == OP_COMPRESSED:
            raise ProtocolError("OP_COMPRESSED received although compression was never negotiated")
        if request.op_code == OP_QUERY:
            query = OpQuery.parse(request.payload)
            spec = bson.decode(query.query, DECODE)
            command = spec.get("$query", spec) if isinstance(spec.get("$query"), dict) else spec
            if query.collection.endswith(".$cmd") and command_name(command).lower() in HELLO_COMMANDS:
                document = self.command(dict(command), query.collection.split(".", 1)[0], info)
            else:
                document = {"ok": 0.0, "errmsg": "OP_QUERY is only supported for the handshake", "code": 352,
                            "codeName": "UnsupportedOpQueryCommand"}
            return Message(self.next_id(), request.request_id, 1, op_reply(0, 0, 0, [bson.encode(document)]))
        if request.op_code != OP_MSG:
            raise ProtocolError(f"opCode {request.op_code}")
        msg = OpMsg.parse(request.payload)
        body = bson.decode(msg.body, DECODE)
        for name, docs in msg.documents().items():
            body[name] = [RawBSONDocument(d) for d in docs]
        document = self.command(body, str(body.get("$db", "admin")), info)
        if struct.unpack_from("<I", request.payload)[0] & MORE_TO_COME:
            return None
        payload = OpMsg(0, bson.encode(document), []).encode()
        return Message(self.next_id(), request.request_id, OP_MSG, payload)

    def command(self, body: dict[str, Any], db: str, info: dict[str, Any]) -> dict[str, Any]:
        name = command_name(body)
        try:
            reply = self.dispatch(name, body, db, info)
        except (CommandError, ShardReplyError) as exc:
            reply = dict(exc.reply)
            if isinstance(exc, CommandError) and (reply.get("code") == COMMAND_NOT_FOUND
                                                  or "not imitated" in str(reply.get("errmsg"))):
                with self._lock:
                    self.refusals.append(f"{name}: {reply.get('errmsg')}")
        except Exception as exc:  # noqa: BLE001 - the client gets the failure as a command error
            log.exception("router failure on %s", name)
            reply = {"ok": 0.0, "errmsg": f"sharded_cluster stand-in failure: {exc!r}", "code": 1,
                     "codeName": "InternalError"}
        for key in ("operationTime", "$clusterTime"):
            reply.pop(key, None)
        with self._lock:
            now = self.cluster_time
        reply["operationTime"] = now
        reply["$clusterTime"] = {"clusterTime": now, "signature": {"hash": Binary(b"\x00" * 20), "keyId": Int64(0)}}
        return reply

    # -------------------------------------------------------- dispatch

    def dispatch(self, name: str, body: dict[str, Any], db: str, info: dict[str, Any]) -> dict[str, Any]:
        lower = name.lower()
        app = info.get("app")
        if lower in HELLO_COMMANDS:
            client = body.get("client")
            if isinstance(client, dict):
                info["app"] = (client.get("application") or {}).get("name")
            hello = dict(self.shards[0].hello)
            hello.update(self.run(self.shards[0], "admin", {"hello": 1}, None))
            hello.pop("compression", None)
            out = mongos_hello(hello)
            if lower != "hello":
                out.pop("isWritablePrimary", None)
                out["ismaster"] = True
            return out
        if db == "local":
            raise CommandError(ILLEGAL_OPERATION, "IllegalOperation", "Can't use 'local' database through mongos")
        if body.get("startTransaction") or body.get("autocommit") is False:
            raise not_imitated("a multi-document transaction")
        if lower in ("saslstart", "saslcontinue", "authenticate", "logout"):
            raise not_imitated(f"authentication ({name})")
        if db == "config" and lower not in ("find", "getmore", "killcursors"):
            raise not_imitated(f"{name} on the config database")
        handler = getattr(self, f"cmd_{lower}", None)
        if handler is not None:
            return handler(body, db, app)
        if lower in ADMIN_PASSTHROUGH:
            return self.run(self.shards[0], db, self._clean(body), app, check=False)
        raise CommandError(COMMAND_NOT_FOUND, "CommandNotFound",
                           f"no such command: '{name}' (not imitated by the sharded_cluster stand-in)")

    @staticmethod
    def _clean(body: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in body.items() if k not in STRIP}
        concern = out.get("readConcern")
        if isinstance(concern, dict) and "afterClusterTime" in concern:
            out["readConcern"] = {k: v for k, v in concern.items() if k != "afterClusterTime"}
        return out

    def _forward_primary(self, body: dict[str, Any], db: str, app: str | None) -> dict[str, Any]:
        """A command for an unsharded namespace: whole to the primary shard, its cursor adopted."""
        shard = self.primary(db)
        reply = self.run(shard, db, self._clean(body), app, check=False)
        return self._adopt(shard, db, reply, app)

    def _adopt(self, shard: Shard, db: str, reply: dict[str, Any], app: str | None) -> dict[str, Any]:
        cursor = reply.get("cursor")
        if reply.get("ok") and cursor is not None and int(_as_dict(cursor).get("id") or 0):
            stream = ShardStream(self, shard, db, reply, app)
            ns = str(_as_dict(cursor).get("ns"))
            first = list(stream.buffer)
            stream.buffer.clear()
            router = MergeCursor(ns, [stream], 0)
            cursor_id = self.register(router)
            extra = {k: v for k, v in _as_dict(cursor).items() if k not in ("firstBatch", "id", "ns")}
            reply = {**reply, "cursor": {"firstBatch": first, "id": Int64(cursor_id), "ns": ns, **extra}}
        return reply

    # -------------------------------------------------------- simple commands

    def cmd_ping(self, body, db, app):
        return {"ok": 1.0}

    def cmd_endsessions(self, body, db, app):
        return {"ok": 1.0}

    cmd_killsessions = cmd_refreshsessions = cmd_endsessions

    def cmd_usersinfo(self, body, db, app):
        # A cluster's users live on its config servers; this one has none (user management is not imitated).
        return {"users": [], "ok": 1.0}

    def cmd_listshards(self, body, db, app):
        self._admin_only("listShards", db)
        return {"shards": [{"_id": s.id, "host": s.host, "state": 1} for s in self.shards], "ok": 1.0}

    def cmd_balancerstatus(self, body, db, app):
        self._admin_only("balancerStatus", db)
        with self._lock:
            if self.balancer_mode == "full":
                self.balancer_rounds += 1
            return {"mode": self.balancer_mode, "inBalancerRound": False,
                    "numBalancerRounds": Int64(self.balancer_rounds), "ok": 1.0}

    def cmd_balancerstop(self, body, db, app):
        self._admin_only("balancerStop", db)
        self.balancer_mode = "off"
        return {"ok": 1.0}

    def cmd_balancerstart(self, body, db, app):
        self._admin_only("balancerStart", db)
        self.balancer_mode = "full"
        return {"ok": 1.0}

    @staticmethod
    def _admin_only(name: str, db: str) -> None:
        if db != "admin":
            raise CommandError(13, "Unauthorized", f"{name} may only be run against the admin database.")

    def cmd_enablesharding(self, body, db, app):
        self._admin_only("enableSharding", db)
        name = str(body["enableSharding"])
        wanted = body.get("primaryShard")
        index = 0
        if wanted is not None:
            found = [s.index for s in self.shards if s.id == str(wanted)]
            if not found:
                raise CommandError(70, "ShardNotFound", f"Shard {wanted} not found")
            index = found[0]
        with self._meta_lock:
            self.primaries.setdefault(name, index)
        return {"ok": 1.0}

    def cmd_shardcollection(self, body, db, app):
        self._admin_only("shardCollection", db)
        namespace = str(body["shardCollection"])
        if namespace in self.sharded:
            raise CommandError(ILLEGAL_OPERATION, "AlreadyInitialized", f"sharding already enabled for {namespace}")
        self.shard_collection(namespace, body.get("key", {}), list(body.get("splits") or []), body.get("owners"))
        return {"collectionsharded": namespace, "ok": 1.0}

    def cmd_setuserwriteblockmode(self, body, db, app):
        replies = [self.run(s, db, self._clean(body), app, check=False) for s in self.shards]
        for reply in replies:
            if not reply.get("ok"):
                return reply
        return {"ok": 1.0}

    def cmd_appendoplognote(self, body, db, app):
        replies = [self.run(s, db, self._clean(body), app, check=False) for s in self.shards]
        for reply in replies:
            if not reply.get("ok"):
                return reply
        return {"ok": 1.0}

    # -------------------------------------------------------- databases and collections

    def cmd_listdatabases(self, body, db, app):
        if body.get("filter"):
            raise not_imitated("listDatabases with a filter")
        merged: dict[str, dict[str, Any]] = {}
        for shard in self.shards:
            reply = self.run(shard, "admin", {"listDatabases": 1}, app)
            for entry in reply.get("databases") or []:
                entry = _as_dict(entry)
                if entry["name"] == "local":
                    continue
                have = merged.setdefault(entry["name"], {"name": entry["name"], "sizeOnDisk": 0, "empty": True,
                                                         "shards": {}})
                have["sizeOnDisk"] += int(entry.get("sizeOnDisk") or 0)
                have["empty"] = have["empty"] and bool(entry.get("empty"))
                have["shards"][shard.id] = int(entry.get("sizeOnDisk") or 0)
        names = sorted(merged)
        if body.get("nameOnly"):
            return {"databases": [{"name": n} for n in names], "ok": 1.0}
        databases = [{**merged[n], "sizeOnDisk": Int64(merged[n]["sizeOnDisk"])} for n in names]
        return {"databases": databases, "totalSize": Int64(sum(d["sizeOnDisk"] for d in databases)), "ok": 1.0}

    def cmd_listcollections(self, body, db, app):
        return self._forward_primary(body, db, app)

    def cmd_listindexes(self, body, db, app):
        return self._forward_primary(body, db, app)

    def _ddl(self, body, db, app, coll):
        sharded = self.sharded_collection(db, coll)
        if sharded is None:
            return self.run(self.primary(db), db, self._clean(body), app, check=False)
        raw, first_error = {}, None
        for shard in self.shards:
            reply = self.run(shard, db, self._clean(body), app, check=False)
            raw[shard.host] = {k: v for k, v in reply.items() if k not in ("operationTime", "$clusterTime")}
            if not reply.get("ok") and first_error is None:
                first_error = reply
        if first_error is not None:
            return {**first_error, "raw": raw}
        return {"raw": raw, "ok": 1.0}

    def cmd_create(self, body, db, app):
        return self._ddl(body, db, app, body["create"])

    def cmd_createindexes(self, body, db, app):
        return self._ddl(body, db, app, body["createIndexes"])

    def cmd_dropindexes(self, body, db, app):
        return self._ddl(body, db, app, body["dropIndexes"])

    cmd_deleteindexes = cmd_dropindexes

    def cmd_collmod(self, body, db, app):
        return self._ddl(body, db, app, body["collMod"])

    def cmd_drop(self, body, db, app):
        namespace = f"{db}.{body['drop']}"
        if self.sharded_collection(db, body["drop"]) is None:
            return self.run(self.primary(db), db, self._clean(body), app, check=False)
        reply = self._ddl(body, db, app, body["drop"])
        if reply.get("ok"):
            with self._meta_lock:
                self.sharded.pop(namespace, None)
        return reply

    def cmd_dropdatabase(self, body, db, app):
        for shard in self.shards:
            reply = self.run(shard, db, self._clean(body), app, check=False)
            if not reply.get("ok"):
                return reply
        with self._meta_lock:
            for namespace in [n for n in self.sharded if n.split(".", 1)[0] == db]:
                del self.sharded[namespace]
            self.primaries.pop(db, None)
        return {"dropped": db, "ok": 1.0}

    def cmd_renamecollection(self, body, db, app):
        source = str(body["renameCollection"])
        if source in self.sharded or str(body.get("to")) in self.sharded:
            raise not_imitated("renameCollection of a sharded collection")
        return self.run(self.primary(source.split(".", 1)[0]), db, self._clean(body), app, check=False)

    def cmd_collstats(self, body, db, app):
        coll = body["collStats"]
        sharded = self.sharded_collection(db, coll)
        if sharded is None:
            return self.run(self.primary(db), db, self._clean(body), app, check=False)
        totals = {"count": 0, "size": 0, "storageSize": 0, "totalIndexSize": 0}
        shards, nindexes = {}, 0
        for shard in self.shards:
            reply = self.run(shard, db, self._clean(body), app)
            shards[shard.id] = {k: v for k, v in reply.items() if k not in ("operationTime", "$clusterTime")}
            for key in totals:
                totals[key] += int(reply.get(key) or 0)
            nindexes = max(nindexes, int(reply.get("nindexes") or 0))
        avg = totals["size"] // totals["count"] if totals["count"] else 0
        return {"sharded": True, "ns": f"{db}.{coll}", **totals, "avgObjSize": avg, "nindexes": nindexes,
                "nchunks": len(sharded.owners), "shards": shards, "ok": 1.0}

    # -------------------------------------------------------- reads

    def _targets(self, sharded: ShardedCollection, query: Any) -> list[Shard]:
        predicate = _id_predicate(query)
        if predicate is None:
            indexes = set(sharded.owners)
        elif predicate[0] == "eq":
            indexes = {sharded.owner(v) for v in predicate[1]}
        else:
            indexes = sharded.shards_for_range(*predicate[1])
        return [self.shards[i] for i in sorted(indexes)]

    def cmd_explain(self, body, db, app):
        """``explain`` of a ``find``, as mongos answers it: each targeted shard's plan under ``shards``.

        mongos runs the explained command's explain on every shard it would send the command to and reports
        ``queryPlanner.winningPlan`` as ``{stage: SINGLE_SHARD | SHARD_MERGE | SHARD_MERGE_SORT, shards: [{shardName,
        connectionString, serverInfo, winningPlan, rejectedPlans, ...}]}``. Only ``find`` is imitated.
        """
        explained = _as_dict(body.get("explain"))
        if not explained or next(iter(explained)) != "find":
            raise not_imitated(f"explain of {next(iter(explained), None)!r}")
        coll = explained["find"]
        sharded = self.sharded_collection(db, coll)
        shards = [self.primary(db)] if sharded is None else self._targets(sharded, explained.get("filter") or {})
        shard_body = {"explain": self._clean(explained), "verbosity": body.get("verbosity") or "allPlansExecution"}
        plans = []
        for shard in shards:
            planner = _as_dict(self.run(shard, db, shard_body, app).get("queryPlanner"))
            plans.append({"shardName": shard.id, "connectionString": shard.host, **planner})
        stage = "SINGLE_SHARD" if len(shards) == 1 else (
            "SHARD_MERGE_SORT" if explained.get("sort") else "SHARD_MERGE")
        return {"queryPlanner": {"mongosPlannerVersion": 1, "winningPlan": {"stage": stage, "shards": plans}},
                "ok": 1.0}

    def cmd_find(self, body, db, app):
        coll = body["find"]
        if db == "config":
            return self._config_find(body, coll)
        sharded = self.sharded_collection(db, coll)
        if sharded is None:
            view = self._view_on_sharded(db, coll, app)
            if view is None:
                return self._forward_primary(body, db, app)
            return self._find_on_view(body, db, app, *view)
        if body.get("tailable"):
            raise not_imitated("a tailable cursor on a sharded collection")
        sort = dict(body.get("sort") or {})
        if sort and (list(sort) != ["_id"] or sort["_id"] not in (1, -1)):
            raise not_imitated(f"sort {sort!r} on a sharded collection (only {{_id: 1}} or {{_id: -1}})")
        direction = int(sort.get("_id", 0))
        skip, limit = int(body.get("skip") or 0), abs(int(body.get("limit") or 0))
        shard_body = {k: v for k, v in self._clean(body).items() if k not in ("skip", "limit", "singleBatch")}
        if limit:
            shard_body["limit"] = limit + skip
        streams = [ShardStream(self, shard, db, self.run(shard, db, shard_body, app), app)
                   for shard in self._targets(sharded, body.get("filter") or {})]
        cursor = MergeCursor(f"{db}.{coll}", streams, direction, skip, limit)
        reply = self.cursor_reply(cursor, body.get("batchSize"), None, True)
        if body.get("singleBatch") and reply["cursor"]["id"]:
            self._kill(int(reply["cursor"]["id"]))
            reply["cursor"]["id"] = Int64(0)
        return reply

    def _config_find(self, body, coll):
        docs = self._config_docs(coll)
        docs = [d for d in docs if _matches(d, dict(body.get("filter") or {}))]
        docs = [_project(d, body.get("projection")) for d in docs]
        limit = abs(int(body.get("limit") or 0))
        if limit:
            docs = docs[:limit]
        return self.cursor_reply(ListCursor(f"config.{coll}", docs), body.get("batchSize"), None, True)

    def _config_docs(self, coll: str) -> list[dict[str, Any]]:
        with self._meta_lock:
            if coll == "shards":
                return [{"_id": s.id, "host": s.host, "state": 1} for s in self.shards]
            if coll == "databases":
                return [{"_id": name, "primary": self.shards[index].id, "partitioned": True,
                         "version": {"uuid": Binary.from_uuid(uuid.uuid5(uuid.NAMESPACE_DNS, name)), "lastMod": 1}}
                        for name, index in sorted(self.primaries.items())]
            if coll == "collections":
                return [{"_id": ns, "lastmodEpoch": c.epoch, "lastmod": datetime.datetime.now(datetime.UTC),
                         "uuid": c.uuid, "key": {"_id": 1}, "unique": False, "noBalance": False}
                        for ns, c in sorted(self.sharded.items())]
            if coll == "chunks":
                return [{"_id": ObjectId(), "uuid": c.uuid, "min": {"_id": lo}, "max": {"_id": hi},
                         "shard": self.shards[owner].id, "lastmod": Timestamp(1, i)}
                        for c in self.sharded.values() for i, (lo, hi, owner) in enumerate(c.chunk_bounds())]
        raise not_imitated(f"reading config.{coll}")

    def cmd_getmore(self, body, db, app):
        cursor_id = int(body["getMore"])
        with self._lock:
            cursor = self.cursors.get(cursor_id)
        if cursor is None:
            raise CommandError(CURSOR_NOT_FOUND, "CursorNotFound", f"cursor id {cursor_id} not found")
        if f"{db}.{body.get('collection')}" != cursor.ns:
            raise CommandError(13, "Unauthorized", f"Requested getMore on namespace '{db}.{body.get('collection')}',"
                               f" but cursor belongs to a different namespace {cursor.ns}")
        try:
            return self.cursor_reply(cursor, body.get("batchSize"), body.get("maxTimeMS"), False, cursor_id)
        except ShardReplyError:
            self._kill(cursor_id)
            raise

    def _kill(self, cursor_id: int) -> bool:
        with self._lock:
            cursor = self.cursors.pop(cursor_id, None)
        if cursor is None:
            return False
        cursor.kill()
        return True

    def cmd_killcursors(self, body, db, app):
        killed, missing = [], []
        for cursor_id in body.get("cursors") or []:
            (killed if self._kill(int(cursor_id)) else missing).append(Int64(cursor_id))
        return {"cursorsKilled": killed, "cursorsNotFound": missing, "cursorsAlive": [], "cursorsUnknown": [],
                "ok": 1.0}

    def cmd_count(self, body, db, app):
        sharded = self.sharded_collection(db, body["count"])
        if sharded is None:
            view = self._view_on_sharded(db, body["count"], app)
            if view is None:
                return self.run(self.primary(db), db, self._clean(body), app, check=False)
            if body.get("skip") or body.get("limit"):
                raise not_imitated("count with skip or limit on a view of a sharded collection")
            sharded, resolved = view
            pipeline = resolved + ([{"$match": body["query"]}] if body.get("query") else []) + [{"$count": "n"}]
            total = 0
            for shard in self._targets(sharded, {}):
                reply = self.run(shard, db, {"aggregate": sharded.namespace.split(".", 1)[1], "pipeline": pipeline,
                                             "cursor": {}}, app)
                stream = ShardStream(self, shard, db, reply, app)
                while stream.head() is not None:
                    total += int(stream.buffer.popleft()["n"])
            return {"n": total, "ok": 1.0}
        if body.get("skip") or body.get("limit"):
            raise not_imitated("count with skip or limit on a sharded collection")
        total = sum(int(self.run(s, db, self._clean(body), app).get("n") or 0)
                    for s in self._targets(sharded, body.get("query") or {}))
        return {"n": total, "ok": 1.0}

    def cmd_aggregate(self, body, db, app):
        pipeline = list(body.get("pipeline") or [])
        if pipeline and "$changeStream" in pipeline[0]:
            return self._change_stream(body, db, app, pipeline)
        coll = body["aggregate"]
        sharded = self.sharded_collection(db, coll)
        if sharded is None:
            if not isinstance(coll, str):
                raise not_imitated("a database-level aggregate other than $changeStream")
            view = self._view_on_sharded(db, coll, app)
            if view is None:
                return self._forward_primary(body, db, app)
            sharded, resolved = view
            return self._sharded_aggregate(body, db, app, sharded, resolved + pipeline)
        return self._sharded_aggregate(body, db, app, sharded, pipeline)

    def _view_on_sharded(self, db: str, coll: Any, app: str | None) -> tuple[ShardedCollection, list] | None:
        """(the sharded collection, the resolved view pipeline) when ``db.coll`` is a view over a sharded
        collection (through other views too), as mongos resolves it; None otherwise."""
        if not isinstance(coll, str):
            return None
        with self._meta_lock:
            if not any(n.split(".", 1)[0] == db for n in self.sharded):
                return None
        pipeline: list[dict[str, Any]] = []
        name = coll
        for _ in range(20):  # mongod's view depth limit
            reply = self.run(self.primary(db), db, {"listCollections": 1, "filter": {"name": name}}, app)
            batch = _as_dict(reply["cursor"]).get("firstBatch") or []
            if not batch:
                return None
            info = _as_dict(batch[0])
            if info.get("type") != "view":
                sharded = self.sharded_collection(db, name)
                return (sharded, pipeline) if sharded is not None and name != coll else None
            options = _as_dict(info.get("options"))
            stages = [bson.decode(stage.raw, DECODE) for stage in options.get("pipeline") or []]
            pipeline = stages + pipeline
            name = str(options["viewOn"])
        return None

    def _find_on_view(self, body, db, app, sharded, resolved):
        """A find on a view over a sharded collection, run as the aggregate mongos turns it into."""
        sort = dict(body.get("sort") or {})
        pipeline = list(resolved)
        if body.get("filter"):
            pipeline.append({"$match": body["filter"]})
        if body.get("projection"):
            pipeline.append({"$project": body["projection"]})
        if sort:
            pipeline.append({"$sort": sort})
        if body.get("skip"):
            pipeline.append({"$skip": int(body["skip"])})
        if body.get("limit"):
            pipeline.append({"$limit": abs(int(body["limit"]))})
        aggregate = {"aggregate": body["find"], "pipeline": pipeline, "cursor": {}}
        if body.get("batchSize") is not None:
            aggregate["cursor"] = {"batchSize": body["batchSize"]}
        return self._sharded_aggregate(aggregate, db, app, sharded, pipeline)

    def _sharded_aggregate(self, body, db, app, sharded, pipeline):
        coll = body["aggregate"]
        ns = f"{db}.{coll}"
        stages = [next(iter(s)) for s in pipeline]
        match = dict(pipeline[0]["$match"]) if stages[:1] == ["$match"] else {}
        targets = self._targets(sharded, match)
        shard_body = {k: v for k, v in self._clean(body).items() if k != "cursor"}
        shard_body["aggregate"] = sharded.namespace.split(".", 1)[1]
        batch_size = (body.get("cursor") or {}).get("batchSize")

        def run_all(shard_pipeline) -> list[ShardStream]:
            return [ShardStream(self, s, db, self.run(s, db, {**shard_body, "pipeline": shard_pipeline,
                                                                  "cursor": {}}, app), app) for s in targets]

        def drain(streams) -> list[Any]:
            out = []
            for stream in streams:
                while stream.head() is not None:
                    out.append(stream.buffer.popleft())
            return out

        last = pipeline[-1] if pipeline else {}
        before = stages[:-1]
        group = last.get("$group")
        if group is not None and set(before) <= {"$match"} and len(group) == 2:
            (field_name, spec), = [(k, v) for k, v in group.items() if k != "_id"]
            if dict(spec) == {"$sum": 1} and not isinstance(group["_id"], (dict, str)):
                total = sum(int(doc[field_name]) for doc in drain(run_all(pipeline)))
                docs = [{"_id": group["_id"], field_name: total}] if total else []
                return self.cursor_reply(ListCursor(ns, docs), batch_size, None, True)
        if "$count" in last and set(before) <= {"$match"}:
            name = last["$count"]
            total = sum(int(doc[name]) for doc in drain(run_all(pipeline)))
            return self.cursor_reply(ListCursor(ns, [{name: total}] if total else []), batch_size, None, True)
        if "$sample" in stages:
            at = stages.index("$sample")
            rest = stages[at + 1:]
            if set(stages[:at]) <= {"$match"} and set(rest) <= {"$project", "$sort"} and all(
                    dict(s["$sort"]) in ({"_id": 1}, {"_id": -1}) for s in pipeline[at + 1:] if "$sort" in s):
                size = int(pipeline[at]["$sample"]["size"])
                sampled = drain(run_all(pipeline[:at + 1] + [s for s in pipeline[at + 1:] if "$project" in s]))
                chosen = random.sample(sampled, min(size, len(sampled)))
                for stage in pipeline[at + 1:]:
                    if "$sort" in stage:
                        chosen.sort(key=lambda d: bson_key(d.get("_id", MinKey())), reverse=stage["$sort"]["_id"] < 0)
                return self.cursor_reply(ListCursor(ns, chosen), batch_size, None, True)
        limit = skip = 0
        if stages and stages[-1] == "$limit":
            limit, pipeline, stages = int(pipeline[-1]["$limit"]), pipeline[:-1], stages[:-1]
        if stages and stages[-1] == "$skip":
            skip, pipeline, stages = int(pipeline[-1]["$skip"]), pipeline[:-1], stages[:-1]
        direction = 0
        if stages and stages[-1] == "$sort":
            sort = dict(pipeline[-1]["$sort"])
            if sort not in ({"_id": 1}, {"_id": -1}):
                raise not_imitated(f"$sort {sort!r} on a sharded collection")
            direction = sort["_id"]
            stages = stages[:-1]
        if set(stages) <= STREAMING_STAGES:
            shard_pipeline = pipeline + ([{"$limit": limit + skip}] if limit else [])
            cursor = MergeCursor(ns, run_all(shard_pipeline), direction, skip, limit)
            return self.cursor_reply(cursor, batch_size, None, True)
        raise not_imitated(f"the pipeline {stages} on a sharded collection")

    # -------------------------------------------------------- change streams

    def _change_stream(self, body, db, app, pipeline):
        spec = dict(pipeline[0]["$changeStream"])
        token = spec.pop("resumeAfter", None) or spec.pop("startAfter", None)
        spec.pop("resumeAfter", None)
        spec.pop("startAfter", None)
        points: dict[str, dict[str, Any]] = {}
        if token is not None:
            _, points = decode_router_token(token)
            if set(points) != {s.id for s in self.shards}:
                raise CommandError(BAD_VALUE, "BadValue", "the resume token names other shards than this cluster's")
        elif spec.get("startAtOperationTime") is not None:
            points = {s.id: {"at": spec["startAtOperationTime"]} for s in self.shards}
        spec.pop("startAtOperationTime", None)
        coll = body["aggregate"]
        ns = f"{db}.{coll}" if isinstance(coll, str) else f"{db}.$cmd.aggregate"
        base = {k: v for k, v in self._clean(body).items() if k not in ("cursor", "pipeline", "maxTimeMS")}
        streams: list[ShardChangeStream] = []
        try:
            for shard in self.shards:
                shard_spec = dict(spec)
                point = points.get(shard.id)
                if point is not None:
                    if "token" in point:
                        shard_spec["resumeAfter"] = point["token"]
                    else:
                        shard_spec["startAtOperationTime"] = point["at"]
                shard_pipeline = [{"$changeStream": shard_spec}, *pipeline[1:]]
                reply = self.run(shard, db, {**base, "pipeline": shard_pipeline, "cursor": {}}, app)
                stream = ShardChangeStream(self, shard, db, reply, app, point or {})
                if not point:  # opened at "now": the shard resumes from its first high-water mark
                    stream.resume_point = {"token": stream.pbrt} if stream.pbrt is not None else {}
                streams.append(stream)
        except Exception:
            for stream in streams:
                stream.kill()
            raise
        cursor = ChangeStreamCursor(ns, streams)
        batch_size = (body.get("cursor") or {}).get("batchSize")
        return self.cursor_reply(cursor, batch_size, None, True)

    # -------------------------------------------------------- writes

    def _shard_write(self, shard: Shard, db: str, body: dict[str, Any], key: str, statements: list[Any],
                     app: str | None) -> dict[str, Any]:
        return self.run(shard, db, {**self._clean(body), key: statements}, app, check=False)

    def cmd_insert(self, body, db, app):
        coll = body["insert"]
        sharded = self.sharded_collection(db, coll)
        if sharded is None:
            return self.run(self.primary(db), db, self._clean(body), app, check=False)
        docs = list(body.get("documents") or [])
        ordered = body.get("ordered", True)
        owners = []
        for doc in docs:
            if "_id" not in doc:
                raise CommandError(SHARD_KEY_NOT_FOUND, "ShardKeyNotFound",
                                   "Document for insert is missing the shard key field _id")
            owners.append(sharded.owner(doc["_id"]))
        if ordered:
            groups = [(owner, [i for i, _ in run]) for owner, run in
                      itertools.groupby(enumerate(owners), key=lambda pair: pair[1])]
        else:
            groups = [(owner, [i for i, o in enumerate(owners) if o == owner]) for owner in sorted(set(owners))]
        total, errors, concern_error = 0, [], None
        for owner, indexes in groups:
            reply = self._shard_write(self.shards[owner], db, body, "documents", [docs[i] for i in indexes], app)
            if not reply.get("ok"):
                return reply
            total += int(reply.get("n") or 0)
            for error in reply.get("writeErrors") or []:
                error = _as_dict(error)
                error["index"] = indexes[int(error["index"])]
                errors.append(error)
            concern_error = concern_error or reply.get("writeConcernError")
            if ordered and errors:
                break
        return self._write_reply({"n": total}, errors, concern_error)

    @staticmethod
    def _write_reply(counts, errors, concern_error):
        out = dict(counts)
        if errors:
            out["writeErrors"] = sorted(errors, key=lambda e: e["index"])
        if concern_error is not None:
            out["writeConcernError"] = concern_error
        out["ok"] = 1.0
        return out

    def _find_one_id(self, db, coll, sharded, query, collation, app) -> tuple[Shard, Any] | None:
        """Phase one of a write without shard key: one matching document's shard and ``_id``."""
        for shard in self._targets(sharded, query):
            find = {"find": coll, "filter": query, "projection": {"_id": 1}, "limit": 1, "singleBatch": True}
            if collation:
                find["collation"] = collation
            batch = _as_dict(self.run(shard, db, find, app)["cursor"]).get("firstBatch") or []
            if batch:
                return shard, batch[0]["_id"]
        return None

    def _statement_targets(self, db, coll, sharded, query, multi, upsert, collation, app, kind):
        """[(shard, query)] for one update/delete statement."""
        single, value = _single_id(query)
        if single:
            return [(self.shards[sharded.owner(value)], query)]
        if upsert:
            raise CommandError(SHARD_KEY_NOT_FOUND, "ShardKeyNotFound",
                               "Failed to target upsert by query :: could not extract exact shard key")
        if multi:
            return [(shard, query) for shard in self._targets(sharded, query)]
        found = self._find_one_id(db, coll, sharded, query, collation, app)
        if found is None:
            return []
        shard, _id = found
        return [(shard, {"$and": [query, {"_id": _id}]})]

    def _crud(self, body, db, app, key: str, kind: str):
        coll = body[kind]
        sharded = self.sharded_collection(db, coll)
        if sharded is None:
            return self.run(self.primary(db), db, self._clean(body), app, check=False)
        ordered = body.get("ordered", True)
        counts = {"n": 0, "nModified": 0} if kind == "update" else {"n": 0}
        upserted, errors, concern_error = [], [], None
        for index, statement in enumerate(body.get(key) or []):
            statement = _as_dict(statement)
            query = _as_dict(statement.get("q"))
            multi = bool(statement.get("multi")) if kind == "update" else statement.get("limit", 0) == 0
            try:
                targets = self._statement_targets(db, coll, sharded, query, multi, bool(statement.get("upsert")),
                                                  statement.get("collation"), app, kind)
            except CommandError as exc:
                errors.append({"index": index, "code": exc.reply["code"], "errmsg": exc.reply["errmsg"]})
                if ordered:
                    break
                continue
            failed = False
            for shard, shard_query in targets:
                reply = self._shard_write(shard, db, body, key, [{**statement, "q": shard_query}], app)
                if not reply.get("ok"):
                    return reply
                for name in counts:
                    counts[name] += int(reply.get(name) or 0)
                for entry in reply.get("upserted") or []:
                    upserted.append({**_as_dict(entry), "index": index})
                for error in reply.get("writeErrors") or []:
                    errors.append({**_as_dict(error), "index": index})
                    failed = True
                concern_error = concern_error or reply.get("writeConcernError")
            if failed and ordered:
                break
        if upserted:
            counts["upserted"] = upserted
        return self._write_reply(counts, errors, concern_error)

    def cmd_update(self, body, db, app):
        return self._crud(body, db, app, "updates", "update")

    def cmd_delete(self, body, db, app):
        return self._crud(body, db, app, "deletes", "delete")

    def cmd_findandmodify(self, body, db, app):
        name = next(iter(body))
        coll = body[name]
        sharded = self.sharded_collection(db, coll)
        if sharded is None:
            return self.run(self.primary(db), db, self._clean(body), app, check=False)
        query = dict(body.get("query") or {})
        single, value = _single_id(query)
        if single:
            return self.run(self.shards[sharded.owner(value)], db, self._clean(body), app, check=False)
        if body.get("upsert"):
            raise CommandError(SHARD_KEY_NOT_FOUND, "ShardKeyNotFound",
                               "Query for sharded findAndModify with upsert: true must contain the shard key")
        if body.get("sort"):
            raise not_imitated("findAndModify with a sort and without the shard key")
        found = self._find_one_id(db, coll, sharded, query, body.get("collation"), app)
        if found is None:
            return {"lastErrorObject": {"n": 0, "updatedExisting": False}, "value": None, "ok": 1.0}
        shard, _id = found
        return self.run(shard, db, {**self._clean(body), "query": {"$and": [query, {"_id": _id}]}}, app, check=False)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from devtools.wire_proxy import serve_forever

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--shard", action="append", required=True, help="host:port of a shard (repeat)")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    serve_forever(ShardedCluster(args.shard, port=args.port))


if __name__ == "__main__":
    main()
