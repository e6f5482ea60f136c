"""Live pull: copy a running MongoDB deployment into Atlas, then follow its change stream until cutover.

The order of operations is what makes the result exact:

1. ``start`` opens a change stream on the whole source deployment and stores its resume point in the
   state collection *before* anything is copied. Every write after that point is in the stream.
2. ``plan_partitions`` splits every selected collection into ``_id`` ranges; ``prepare_targets`` creates
   the target collections with their options; ``copy_partition`` copies one range as raw BSON batches
   (read ahead, ``insert_workers`` inserts at once), checkpointing the last copied ``_id`` in read order,
   once that batch and every earlier one are in, so a killed task resumes where it stopped.
3. ``finish_initial_copy`` builds the secondary indexes and creates the views.
4. ``catch_up`` replays the stream from the start point. The copy read each document at some moment
   after the start point, so replaying every event since then converges each document to the source's
   state: every event is applied keyed by ``_id`` (insert and replace become an upserting replace, delete
   deletes by ``_id``, and an update is replayed from its ``updateDescription`` as ``$set``/``$unset``
   where every path in it is exact, ``engines/update_description``; otherwise, or where the target refuses
   it, the document is read from the source and written as an upserting replace). Replaying a change on a
   document the copy read after it converges too: every later change of that document is replayed after
   it, and a change that reshaped a field (a type change, an array rewritten) writes that whole field
   again. An update of a document the target does not hold, or whose source document is gone, goes to
   the recheck set (below). ``update_apply="lookup"`` applies the stream's ``updateLookup`` document
   instead. A batch is applied in parallel lanes, every change of one document in the same lane and in
   stream order (``apply_lane``).
5. ``cutover`` (writes stopped by the operator) drains the stream until it is quiet, brings indexes and
   views in line with the source and marks the sync complete.

Unique secondary indexes are built at cutover, not with the others: while events replay, the target
briefly holds document versions from different moments (the copy reads documents at different times, and
a lookup returns the *current* document), so two documents can transiently share a unique key.
Once writes stop and the stream is drained the target equals the source, and the build cannot fail.

The state lives on the target in ``<state_db>.live_sync`` (majority writes), one document per sync and
one per partition; see ``STATE_COLLECTION`` below for the schema. Nothing here parses raw oplog entries:
everything comes through change streams, which is the interface MongoDB keeps stable across versions.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import closing
from dataclasses import asdict, dataclass, field
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import TYPE_CHECKING, Any

import bson
from bson import SON, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp, json_util
from bson.binary import Binary, UuidRepresentation
from bson.code import Code
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.datetime_ms import DatetimeMS
from bson.dbref import DBRef
from bson.json_util import RELAXED_JSON_OPTIONS
from bson.raw_bson import RawBSONDocument

from atlas_migration.engines.copy_order import (
    COPY_ORDERS,
    DEFAULT_COPY_ORDER,
    id_range_explain_command,
    natural_find_command,
    ranges_scan_the_collection,
    reusable_position,
)
from atlas_migration.engines.dump_layout import CollectionMetadata
from atlas_migration.engines.native import (
    DEFAULT_INSERT_BATCH_BYTES,
    _check_target_namespace,
    _collection_info,
    _create_collection,
    _create_indexes,
    index_specs_for_restore,
)
from atlas_migration.engines.read_ahead import ReadAhead
from atlas_migration.engines.update_description import update_from_description
from atlas_migration.errors import (
    ConfigurationError,
    ImpossibleStrategy,
    MigrationError,
    TargetNotEmpty,
)
from atlas_migration.fence import Fence
from atlas_migration.namespaces import SYSTEM_DATABASES, NamespaceFilter, is_never_migrated
from atlas_migration.progress import DEFAULT_INTERVAL_SECONDS, Progress

if TYPE_CHECKING:
    from pymongo import MongoClient
    from pymongo.collection import Collection
    from pymongo.database import Database

log = logging.getLogger(__name__)

STATE_COLLECTION = "live_sync"
RECHECK_COLLECTION = "live_recheck"
"""State collection schema (on the target, ``<state_db>.live_sync``):

sync document, ``_id: <sync_id>``::

    kind: "sync", sync_id, status: "copying" | "catching_up" | "complete" | "history_lost",
    config: {include, exclude, target_db_prefix},      # a later run with other settings is refused
    expanded_events: bool,                             # showExpandedEvents (6.0+): DDL in the stream
    split_events: bool,                                # $changeStreamSplitLargeEvent (6.0.9+/7.0+) in the pipeline
    update_apply: "delta" | "lookup" (absent: lookup), # how update events are replayed (LiveSync(update_apply))
    fence: {op_time, blocked, how, taken_at, late_writes} | null,   # the cutover fence (atlas_migration.fence)
    rechecks_applied: int,                             # recheck-set documents re-read from the source at cutover
    start: "<StartPoint JSON>",                         # never changed once written
    resume_token: <BSON token>,                        # where catch_up resumes (advanced per batch)
    last_applied_cluster_time: Timestamp, events_applied: int,
    planned, targets_prepared, copy_finished: bool, planned_cluster_time, copy_finished_cluster_time,
    history_lost: str | null, completed_at, created_at, updated_at

recheck documents (``<state_db>.live_recheck``), ``_id: {sync_id, db, coll, id: <the document's _id>}``::

    reason: "null_lookup" | "unmatched_update" | "verifier_mismatch", at: ISO time
        # null_lookup: an update whose lookup found no document of that _id on the source;
        # unmatched_update: an update replayed from its description matched no document on the target

partition document, ``_id: {sync_id, partition: "<db>.<coll>#<index>"}``::

    kind: "partition", sync_id, partition: "<Partition JSON>",
    last_id: "<relaxed Extended JSON of the last copied _id>" | null,
    documents, bytes: int (copied so far, each document once), inserted: int (new on the target),
    done: bool, updated_at
"""

# Decoding options for everything read here: dates outside datetime's range stay DatetimeMS and UUIDs stay
# Binary, so an ``_id`` decoded from an event or a document encodes back to the same BSON value.
# Legacy data may hold strings that are not valid UTF-8: decoding a document's top level (to read its _id)
# must not fail on them, since the document itself travels as raw bytes.
RAW_CODEC: CodecOptions = CodecOptions(
    document_class=RawBSONDocument,
    datetime_conversion=DatetimeConversion.DATETIME_AUTO,
    uuid_representation=UuidRepresentation.UNSPECIFIED,
    unicode_decode_error_handler="surrogateescape",
)
_ID_JSON_OPTIONS = RELAXED_JSON_OPTIONS.with_options(
    datetime_conversion=DatetimeConversion.DATETIME_AUTO, uuid_representation=UuidRepresentation.UNSPECIFIED
)

DEFAULT_MAX_AWAIT_MS = 1_000
# Concurrent ordered bulk writes catch-up applies a batch's DML in (``LiveSync(apply_lanes=...)``, ``apply_lane``).
DEFAULT_APPLY_LANES = 4
# Batches of the initial copy read ahead of the one being inserted (each at most batch_size documents and
# DEFAULT_INSERT_BATCH_BYTES): enough to keep the target busy, bounded so a slow target holds little memory.
COPY_READ_AHEAD_BATCHES = 2
# Concurrent inserts of one partition's copy (``LiveSync(insert_workers=...)``), as the restore's 4 threads.
DEFAULT_COPY_INSERT_WORKERS = 4
# How catch-up replays update events (``LiveSync(update_apply=...)``): "delta" from the event's
# updateDescription where that is exact (engines/update_description), reading the document from the source
# only where it is not; "lookup" asks the stream for every updated document (fullDocument: updateLookup).
UPDATE_APPLY_MODES = ("delta", "lookup")
DEFAULT_UPDATE_APPLY = "delta"
# Per-document "the target may be ahead" marks kept by a catch-up before the passed ones are dropped.
_AHEAD_MARKS_KEPT = 50_000
# Collections whose secondary indexes build at once after the copy: mongod's maxNumActiveUserIndexBuilds default.
DEFAULT_INDEX_BUILD_WORKERS = 3
# Server codes meaning the stream cannot continue from the saved point: ChangeStreamHistoryLost (286),
# ChangeStreamFatalError (280: resume token not found), InvalidResumeToken (260), CappedPositionLost (136).
HISTORY_LOST_CODES = frozenset({286, 280, 260, 136})
_DUPLICATE_KEY = 11000
_NAMESPACE_NOT_FOUND = 26
_INDEX_NOT_FOUND = 27
_NAMESPACE_EXISTS = 48
_BSON_OBJECT_TOO_LARGE = 10334
_INDEX_CONFLICT_CODES = frozenset({68, 85, 86})  # IndexAlreadyExists, IndexOptionsConflict, IndexKeySpecsConflict
# The copy must finish, and catch_up must start, well inside the oplog window: retries and slow partitions
# eat into it, and the write rate during the copy decides how fast the window shrinks.
OPLOG_WINDOW_SAFETY_FACTOR = 2.0
# Events about data placement in a sharded source: the documents themselves are unaffected.
_PLACEMENT_EVENTS = frozenset({
    "shardCollection", "reshardCollection", "refineCollectionShardKey", "migrateLastChunkFromShard",
    "newShardDetected", "reshardBegin", "reshardDoneCatchUp", "endOfTransaction",
})
_DML_EVENTS = frozenset({"insert", "replace", "update", "delete"})
_DDL_EVENTS = frozenset({"create", "createIndexes", "dropIndexes", "drop", "rename", "dropDatabase", "modify"})


class HistoryLost(MigrationError):
    """The source's oplog no longer holds the resume point: the target cannot be brought up to date."""


class UnsafeDDL(MigrationError):
    """A DDL event that cannot be replayed without risking a wrong target (e.g. a rename during the copy)."""


class EventTooLarge(MigrationError):
    """A change event over 16 MiB on a source without ``$changeStreamSplitLargeEvent``: no retry can help."""


# ------------------------------------------------------------------------------------------- small values
def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _ts_list(ts: Timestamp | None) -> list[int] | None:
    return None if ts is None else [ts.time, ts.inc]


def _ts_from(value: Any) -> Timestamp | None:
    if value is None or isinstance(value, Timestamp):
        return value
    return Timestamp(int(value[0]), int(value[1]))


def id_to_json(value: Any) -> Any:
    """An ``_id`` value as JSON-safe relaxed Extended JSON (``{"$oid": ...}``, plain numbers and strings)."""
    return json.loads(json_util.dumps(value, json_options=_ID_JSON_OPTIONS))


def id_from_json(value: Any) -> Any:
    """The BSON value of a relaxed Extended JSON ``_id`` (inverse of ``id_to_json``)."""
    return json_util.loads(json.dumps(value), json_options=_ID_JSON_OPTIONS)


def _server_message(exc: Exception) -> str:
    """The server's errmsg (replies decoded as raw BSON make ``str(exc)`` unreadable)."""
    details = getattr(exc, "details", None)
    message = details.get("errmsg") if isinstance(details, Mapping) else None
    return str(message or exc)[:300]


def _json_or_none(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _token_to_json(token: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if token is None:
        return None
    plain = token if not isinstance(token, RawBSONDocument) else json_util.loads(json_util.dumps(token))
    return json.loads(json_util.dumps(plain, json_options=_ID_JSON_OPTIONS))


def _token_from_json(token: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if token is None else json_util.loads(json.dumps(token), json_options=_ID_JSON_OPTIONS)


# ------------------------------------------------------------------------------------------- dataclasses
@dataclass
class StartPoint:
    """Where the change stream starts: stored before any copy, identical for every later call."""

    resume_token: dict[str, Any]  # JSON-safe (relaxed Extended JSON of the server's token document)
    cluster_time: list[int]  # [seconds, increment] of the source's cluster time at the start
    started_at: str  # ISO-8601 UTC

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StartPoint:
        return cls(dict(data["resume_token"]), list(data["cluster_time"]), str(data["started_at"]))


@dataclass
class Partition:
    """One ``_id`` range of one collection: ``[lower, upper)`` in BSON order, bounds in relaxed ExtJSON."""

    db: str
    collection: str
    target_db: str
    index: int
    lower: Any = None  # None = from the first document (MinKey)
    upper: Any = None  # None = to the last document (MaxKey)
    documents_estimate: int = 0
    capped: bool = False  # copied whole in natural (insertion) order, never split
    # Copied whole in natural (record) order: the source answers an _id range with a collection scan, so
    # one scan replaces N (see engines/copy_order.py). Checkpoints are record positions, not _ids.
    natural: bool = False

    @property
    def id(self) -> str:
        return f"{self.db}.{self.collection}#{self.index}"

    def same_plan(self, other: Partition) -> bool:
        """Whether ``other`` reads what this partition reads, in the same way (its stored plan's checkpoints apply)."""
        return (self.lower, self.upper, self.capped, self.natural) == (other.lower, other.upper, other.capped,
                                                                        other.natural)

    @property
    def namespace(self) -> str:
        return f"{self.db}.{self.collection}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Partition:
        return cls(
            db=data["db"], collection=data["collection"], target_db=data["target_db"], index=int(data["index"]),
            lower=data.get("lower"), upper=data.get("upper"),
            documents_estimate=int(data.get("documents_estimate") or 0), capped=bool(data.get("capped")),
            natural=bool(data.get("natural")),
        )


@dataclass
class PartitionResult:
    """What ``copy_partition`` did; documents/bytes are the partition's totals over every attempt."""

    partition: str
    documents: int
    bytes: int
    seconds: float
    resumed_from: Any = None  # the checkpoint (relaxed ExtJSON _id) this attempt started after, or None
    already_done: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 3)
        return out


@dataclass
class CatchUpResult:
    """How far ``catch_up``/``cutover`` got; JSON-safe through ``to_dict``."""

    events_applied: int
    last_applied_cluster_time: list[int] | None
    lag_seconds: float | None
    resume_token: dict[str, Any] | None
    stopped_because: str  # "lag_ok" | "max_seconds" | "quiet" | "until" | "fence" | "complete"
    late_writes: dict[str, int] = field(default_factory=dict)  # namespace -> writes after the cutover fence
    fence: dict[str, Any] | None = None  # the cutover fence (atlas_migration.fence.Fence.to_dict())
    rechecked: int = 0  # recheck-set documents re-read from the source at cutover

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LagInfo:
    """How far the target trails the source."""

    source_cluster_time: list[int] | None
    last_applied_cluster_time: list[int] | None
    lag_seconds: float | None
    pending_estimate: int | None  # oplog entries newer than the last applied event (all namespaces)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------ _id ranges across types
# MongoDB compares values of different BSON types by a fixed type order, but a range predicate such as
# {_id: {$gte: 5, $lt: "m"}} is "type-bracketed": $gte 5 matches numbers only and $lt "m" strings only.
# A range whose bounds have different types is therefore written as: the part of the lower bound's type
# class above the bound, every whole class in between (one $type clause), and the part of the upper
# bound's class below the bound. Classes in MongoDB's canonical order, as $type aliases:
_TYPE_CLASSES: tuple[tuple[str, ...], ...] = (
    ("minKey",),
    ("undefined",),
    ("null",),
    ("double", "int", "long", "decimal"),
    ("string", "symbol"),
    ("object",),
    ("array",),
    ("binData",),
    ("objectId",),
    ("bool",),
    ("date",),
    ("timestamp",),
    ("regex",),
    ("dbPointer",),
    ("javascript",),
    ("javascriptWithScope",),
    ("maxKey",),
)
_NUMBER_CLASS = 3
_SINGLE_VALUED_CLASSES = frozenset({0, 1, 2, len(_TYPE_CLASSES) - 1})  # MinKey, undefined, null, MaxKey
# NaN sorts below every other number but matches no $lt/$gte bound, so it is named explicitly.
_NAN_CLAUSE: dict[str, Any] = {"$in": [float("nan"), Decimal128("NaN")]}


def bson_type_class(value: Any) -> int:
    """Index of ``value``'s BSON type class in MongoDB's comparison order."""
    if isinstance(value, MinKey):
        return 0
    if value is None:
        return 2
    if isinstance(value, bool):  # before int: bool is an int subclass in Python
        return 9
    if isinstance(value, int | float | Decimal128 | Int64):
        return _NUMBER_CLASS
    if isinstance(value, Code):  # before str: Code is a str subclass
        return 15 if value.scope is not None else 14
    if isinstance(value, str):
        return 4
    if isinstance(value, DBRef):  # stored as an embedded document {$ref, $id}
        return 5
    if isinstance(value, Mapping):
        return 5
    if isinstance(value, list | tuple):
        return 6
    if isinstance(value, Binary | bytes | uuid.UUID):
        return 7
    if isinstance(value, ObjectId):
        return 8
    if isinstance(value, dt.datetime | DatetimeMS):
        return 10
    if isinstance(value, Timestamp):
        return 11
    if isinstance(value, Regex | re.Pattern):
        return 12
    if isinstance(value, MaxKey):
        return len(_TYPE_CLASSES) - 1
    raise ConfigurationError(f"cannot place an _id of type {type(value).__name__} in BSON order")


def _is_nan(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, Decimal128):
        return value.to_decimal().is_nan()
    if isinstance(value, Decimal):
        return value.is_nan()
    return False


def _whole_classes(first: int, last: int) -> list[dict[str, Any]]:
    aliases = [alias for cls in range(first, last + 1) for alias in _TYPE_CLASSES[cls]]
    return [{"$type": aliases}] if aliases else []


def _from_value(cls: int, value: Any, inclusive: bool) -> list[dict[str, Any]]:
    """Clauses for the values of ``cls`` at/above ``value``."""
    if cls in _SINGLE_VALUED_CLASSES:
        return _whole_classes(cls, cls) if inclusive else []
    if cls == _NUMBER_CLASS and _is_nan(value):
        return _whole_classes(cls, cls) if inclusive else [{"$gte": float("-inf")}]
    return [{"$gte" if inclusive else "$gt": value}]


def _below_value(cls: int, value: Any) -> list[dict[str, Any]]:
    """Clauses for the values of ``cls`` strictly below ``value``."""
    if cls in _SINGLE_VALUED_CLASSES or (cls == _NUMBER_CLASS and _is_nan(value)):
        return []
    clauses: list[dict[str, Any]] = [{"$lt": value}]
    if cls == _NUMBER_CLASS:
        clauses.append(_NAN_CLAUSE)
    return clauses


def _within_class(cls: int, lower: Any, inclusive: bool, upper: Any) -> list[dict[str, Any]]:
    """Clauses for values of ``cls`` in ``[lower, upper)`` (or ``(lower, upper)``)."""
    if cls in _SINGLE_VALUED_CLASSES:
        return []  # lower < upper is impossible inside a one-value class
    if cls == _NUMBER_CLASS and _is_nan(lower):
        if _is_nan(upper):
            return []
        return [{"$lt": upper}, _NAN_CLAUSE] if inclusive else [{"$gte": float("-inf"), "$lt": upper}]
    return [{"$gte" if inclusive else "$gt": lower, "$lt": upper}]


def id_range_filter(lower: Any = None, upper: Any = None, *, lower_inclusive: bool = True) -> dict[str, Any]:
    """A query filter for ``_id`` in ``[lower, upper)`` in BSON order, across type classes.

    ``lower``/``upper`` are BSON values (decoded, not ExtJSON); None means unbounded. With
    ``lower_inclusive=False`` the range is ``(lower, upper)``: how a copy resumes after its checkpoint.
    On mongod every clause is an ``_id`` index interval.
    """
    last = len(_TYPE_CLASSES) - 1
    low_cls = None if lower is None else bson_type_class(lower)
    high_cls = None if upper is None else bson_type_class(upper)
    if lower is None and upper is None:
        return {}
    clauses: list[dict[str, Any]]
    if low_cls is not None and low_cls == high_cls:
        clauses = _within_class(low_cls, lower, lower_inclusive, upper)
    else:
        clauses = [] if low_cls is None else _from_value(low_cls, lower, lower_inclusive)
        first_whole = 0 if low_cls is None else low_cls + 1
        last_whole = last if high_cls is None else high_cls - 1
        if first_whole <= last_whole:
            clauses += _whole_classes(first_whole, last_whole)
        if high_cls is not None:
            clauses += _below_value(high_cls, upper)
    if not clauses:
        return {"_id": {"$in": []}}  # an empty range: matches nothing
    if len(clauses) == 1:
        return {"_id": clauses[0]}
    return {"$or": [{"_id": clause} for clause in clauses]}


def choose_boundaries(sorted_ids: list[Any], parts: int) -> list[Any]:
    """Up to ``parts - 1`` distinct split points from ``_id`` values sorted in BSON order (a sample)."""
    if parts <= 1 or not sorted_ids:
        return []
    from bson import encode

    boundaries: list[Any] = []
    seen: set[bytes] = set()
    for i in range(1, parts):
        value = sorted_ids[min(len(sorted_ids) - 1, (i * len(sorted_ids)) // parts)]
        if value is None or isinstance(value, MinKey):
            continue  # nothing sorts below them but MinKey/undefined: a split there splits nothing
        key = encode({"v": value})  # $sample may repeat documents: keep each split point once
        if key not in seen:
            seen.add(key)
            boundaries.append(value)
    return boundaries


def partitions_from_boundaries(
    db: str, coll: str, target_db: str, boundaries: list[Any], documents: int, *, capped: bool = False
) -> list[Partition]:
    """Contiguous partitions ``[None, b1), [b1, b2), ..., [bn, None)`` with JSON-safe bounds."""
    if any(b is None for b in boundaries):
        raise ConfigurationError("a partition boundary cannot be null: None stands for an open end")
    edges = [None, *boundaries, None]
    estimate = max(1, documents // (len(edges) - 1)) if documents else 0
    return [
        Partition(
            db=db, collection=coll, target_db=target_db, index=i,
            lower=None if edges[i] is None else id_to_json(edges[i]),
            upper=None if edges[i + 1] is None else id_to_json(edges[i + 1]),
            documents_estimate=estimate, capped=capped,
        )
        for i in range(len(edges) - 1)
    ]


# ------------------------------------------------------------------------------------------- oplog window
def check_oplog_window(window_hours: float | None, estimated_copy_seconds: float, *,
                       since_initiation: bool = False) -> tuple[bool, str]:
    """Whether the source's oplog window leaves room for the initial copy: ``(ok, message)``.

    Refuses (False) when the window is unknown or shorter than the copy: the start point would leave the
    oplog before catch_up reads it. Warns (True, message says so) below ``OPLOG_WINDOW_SAFETY_FACTOR``.
    ``since_initiation``: the oplog's oldest entry is its replica set's initiation, so it has dropped nothing
    and its span is its age (a set started minutes ago has a span of minutes and a window of its whole
    capacity). Such a short span passes with a warning: what it will keep depends on its size and the write
    rate, and a start point that leaves it fails catch-up loudly (history lost), never silently.
    """
    copy_hours = max(0.0, estimated_copy_seconds) / 3600
    wanted = copy_hours * OPLOG_WINDOW_SAFETY_FACTOR
    if window_hours is None:
        return False, (
            "the source's oplog window is unknown or empty: a live pull needs an oplog that keeps every write "
            f"made during the initial copy (estimated {copy_hours:.1f}h). Check the source is a replica set "
            "and its oplog is readable"
        )
    if since_initiation and window_hours < wanted:
        return True, (
            f"warning: the source's oplog has dropped nothing since its replica set was initiated "
            f"{window_hours * 3600:,.0f} s ago, so that age is not its window; the window it keeps once full "
            f"depends on its size and the write rate during the copy (estimated {copy_hours:.1f}h). If the "
            "start point leaves it, catch-up fails with history lost and nothing is cut over"
        )
    if window_hours <= copy_hours:
        return False, (
            f"the source's oplog window ({window_hours:.1f}h) is shorter than the estimated initial copy "
            f"({copy_hours:.1f}h): writes made at the start of the copy would be gone before catch-up, which "
            f"would then fail with HistoryLost. Enlarge the oplog (replSetResizeOplog) to at least "
            f"{wanted:.1f}h of writes, or migrate with dump/restore during a downtime window"
        )
    if window_hours < wanted:
        return True, (
            f"warning: the source's oplog window ({window_hours:.1f}h) is less than "
            f"{OPLOG_WINDOW_SAFETY_FACTOR:g}x the estimated initial copy ({copy_hours:.1f}h): a slow or "
            f"retried copy may outlast it. Consider enlarging the oplog to {wanted:.1f}h or more"
        )
    return True, (
        f"the source's oplog window ({window_hours:.1f}h) covers the estimated initial copy "
        f"({copy_hours:.1f}h) {window_hours / max(copy_hours, 1e-9):.0f}x over"
        if copy_hours > 0 else f"the source's oplog window is {window_hours:.1f}h; the copy is negligible"
    )


# ------------------------------------------------------------------------------------------ target writes
def _is_id_duplicate(error: Mapping[str, Any]) -> bool:
    """A duplicate-key write error on the ``_id`` index (the document is already there), as opposed to one
    on a unique secondary index (another document holds the key: the document would be lost)."""
    if error.get("code") != _DUPLICATE_KEY:
        return False
    pattern = error.get("keyPattern")
    if isinstance(pattern, Mapping):
        return list(pattern.keys()) == ["_id"]
    # Servers before 4.4 name the index only in the message.
    return " index: _id_ " in str(error.get("errmsg") or "")


def _duplicate_key_message(collection: Collection, error: Mapping[str, Any], batch: list[RawBSONDocument]) -> str:
    op = error.get("op")
    doc_id = op.get("_id") if isinstance(op, Mapping) else None
    if doc_id is None and isinstance(error.get("index"), int) and error["index"] < len(batch):
        doc_id = batch[error["index"]]["_id"]
    pattern = error.get("keyPattern")
    match = re.search(r" index: (\S+) dup key", str(error.get("errmsg") or ""))
    index = match.group(1) if match else (json.dumps(id_to_json(dict(pattern))) if pattern else "a unique index")
    return (f"document _id {json.dumps(id_to_json(doc_id))} of {collection.full_name} violates the target's unique "
            f"index {index} (key {json.dumps(id_to_json(dict(pattern))) if isinstance(pattern, Mapping) else '?'}): "
            "another target document already holds that key, so the document cannot be copied. The target "
            "collection existed before this run with a unique index the source does not enforce (or data the source "
            "no longer has). Nothing was skipped: drop or fix the target collection (drop_target=true replaces it), "
            "then run again")


# One batch of an initial copy: its documents, their BSON bytes, and the checkpoint fields saved once it is on
# the target ({"last_id": ...} or {"resume_token": ..., "resume_node": ...}).
_CopyBatch = tuple[list[RawBSONDocument], int, dict[str, Any]]


def _insert_tolerating_duplicates(collection: Collection, batch: list[RawBSONDocument], *, ordered: bool) -> int:
    """Insert a batch; documents already present (same ``_id``) are skipped. Returns how many were inserted.

    A copy that crashed between inserting a batch and saving its checkpoint re-inserts that batch: the
    target's version is left alone, since any later change to the document is replayed by catch_up. A
    duplicate key on any OTHER unique index means a document would be dropped: that fails, naming the
    namespace, the index and the ``_id``.
    """
    from pymongo.errors import BulkWriteError

    inserted = 0
    pending = batch
    while pending:
        try:
            collection.insert_many(pending, ordered=ordered, bypass_document_validation=True)
            return inserted + len(pending)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors") or []
            unique = [e for e in errors if e.get("code") == _DUPLICATE_KEY and not _is_id_duplicate(e)]
            if unique:
                raise MigrationError(_duplicate_key_message(collection, unique[0], pending)) from None
            other = [e for e in errors if e.get("code") != _DUPLICATE_KEY]
            if other or not errors:
                first = (other or [{}])[0]
                raise MigrationError(
                    f"inserting into {collection.full_name} failed for {len(other)} of {len(pending)} documents; "
                    f"first error (code {first.get('code')}): {str(first.get('errmsg'))[:300]}"
                ) from None
            inserted += int(exc.details.get("nInserted") or 0)
            if not ordered:
                return inserted
            # Ordered (capped collections keep insertion order): continue after the duplicate.
            pending = pending[errors[0]["index"] + 1:]
    return inserted


# ------------------------------------------------------------------------------------------ apply lanes
# MongoDB holds numbers of different BSON types equal when their exact values are equal (int, long, double
# and Decimal128 alike; mongod's compareDecimalToDouble only answers 0 for an exact conversion). Every exact
# value rounded to 34 digits (a Decimal128's precision) gives equal numbers one spelling; numbers merged by
# the rounding merely share a lane.
_NUMBER_CONTEXT = Context(prec=34, rounding=ROUND_HALF_EVEN, Emin=-999_999, Emax=999_999)
_LANE_CODEC: CodecOptions = CodecOptions(uuid_representation=UuidRepresentation.UNSPECIFIED,
                                         unicode_decode_error_handler="surrogateescape")


def _canonical_number(value: int | float | Int64 | Decimal128) -> str:
    """One spelling for every number MongoDB holds equal as an ``_id``: ``1``, ``1.0``, ``Int64(1)`` and
    ``Decimal128("1.00")`` give "1"; ``-0.0`` and ``0`` give "0"; every NaN gives "NaN"."""
    number = value.to_decimal() if isinstance(value, Decimal128) else Decimal(value)
    if number.is_nan():
        return "NaN"  # an _id index holds one NaN: all NaNs (double or decimal, any payload) are equal
    if number.is_infinite():
        return "Infinity" if number > 0 else "-Infinity"
    if number.is_zero():
        return "0"
    return str(_NUMBER_CONTEXT.plus(number).normalize(_NUMBER_CONTEXT))


def _canonical_id(value: Any) -> Any:
    """``value`` with every number in it (also inside embedded documents and arrays, which MongoDB compares
    element by element) replaced by a tagged canonical string. Two values MongoDB holds equal map to the same
    result; the reverse need not hold (a string that happens to spell the tag shares a lane, which is harmless)."""
    if isinstance(value, bool):  # a bool is an int to Python, but its own BSON type to MongoDB
        return value
    if isinstance(value, (int, float, Decimal128)):  # Int64 is an int
        return "\x00number:" + _canonical_number(value)
    if isinstance(value, DBRef):
        value = value.as_doc()  # compared as the document {$ref, $id[, $db]}
    if isinstance(value, Mapping):
        return SON((key, _canonical_id(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return [_canonical_id(item) for item in value]
    return value


def _id_key(value: Any) -> bytes:
    """A dictionary key equal for every ``_id`` value MongoDB holds equal (``7``, ``7.0``, ``Int64(7)``,
    ``Decimal128("7.0")``), distinct otherwise (strings compare byte-wise, the simple collation)."""
    return bson.encode({"_id": _canonical_id(value)}, codec_options=_LANE_CODEC)


def apply_lane(doc_id: Any, lanes: int) -> int:
    """The lane (``0 .. lanes-1``) that applies every change of the document with this ``_id``.

    Stable across calls, processes and machines: a CRC-32 of ``_id_key`` (the BSON encoding of
    ``{"_id": <canonical>}``), never Python's ``hash()`` (salted per process, and ``hash(1) == hash(1.0)``
    only by accident of Python). Values MongoDB's ``_id`` index holds equal land in one lane even when their
    BSON types differ, because a delete of ``_id: 1`` followed by an insert of ``_id: 1.0`` is one key on the
    target: the two writes must stay in order. Hashing the same key the recheck set matches documents by
    keeps the two notions of "one ``_id``" from drifting apart. Strings compare byte-wise here, which is the
    simple collation; a namespace with another default collation is applied in one lane (``_EventApplier``).
    """
    if lanes <= 1:
        return 0
    try:
        key = _id_key(doc_id)
    except Exception:  # a value that cannot be encoded back cannot be written either: any fixed lane will do
        return 0
    return zlib.crc32(key) % lanes


def _same_id(found: Any, expected: Any) -> bool:
    """Whether an ``updateLookup`` document's ``_id`` is the event's ``documentKey._id`` itself: the same
    value of the same type (Python's ``==`` holds ``7 == 7.0``; MongoDB holds them equal too, but they
    are two different ``_id`` values to write)."""
    return type(found) is type(expected) and found == expected


def _merge_fragments(fragments: list[RawBSONDocument]) -> RawBSONDocument:
    """One event from the fragments ``$changeStreamSplitLargeEvent`` made of it: the top-level fields of
    every fragment in order, and the LAST fragment's resume token as ``_id`` (resuming after it resumes
    after the whole event). Values stay raw BSON, so documents keep their exact bytes."""
    import bson

    merged = SON()
    for fragment in fragments:
        for key, value in fragment.items():
            if key not in ("_id", "splitEvent"):
                merged[key] = value
    merged["_id"] = fragments[-1]["_id"]
    fragments.clear()
    return RawBSONDocument(bson.encode(merged, codec_options=RAW_CODEC), RAW_CODEC)


def _normalised_index(spec: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in spec.items() if k not in ("v", "ns", "background")}
    out["key"] = list(dict(spec["key"]).items()) if "key" in spec else None  # key order matters
    return out


# -------------------------------------------------------------------------------------------- the engine
@dataclass
class _Follow:
    """Running totals of one catch_up call."""

    events: int = 0
    last_cluster_time: Timestamp | None = None
    last_event_at: float = field(default_factory=time.monotonic)
    caught_up_once: bool = False
    caught_up_to: Timestamp | None = None
    late: dict[str, int] = field(default_factory=dict)  # namespace -> events after the fence


class LiveSync:
    """One live pull from ``source_client`` into ``target_client``, resumable across processes by ``sync_id``.

    Every method may run in a different Airflow task (and process): all progress is in the state
    collection, never in this object.
    """

    def __init__(
        self,
        source_client: MongoClient,
        target_client: MongoClient,
        *,
        sync_id: str,
        namespaces: NamespaceFilter,
        target_db_prefix: str = "",
        state_db: str = "__atlas_migration",
        batch_size: int = 1000,
        partition_docs: int = 50_000,
        apply_lanes: int = DEFAULT_APPLY_LANES,
        insert_workers: int = DEFAULT_COPY_INSERT_WORKERS,
        update_apply: str = DEFAULT_UPDATE_APPLY,
        copy_order: str = DEFAULT_COPY_ORDER,
        log: logging.Logger | None = None,
    ) -> None:
        if not sync_id or not isinstance(sync_id, str):
            raise ConfigurationError("sync_id must be a non-empty string naming this live pull")
        if batch_size < 1 or partition_docs < 1:
            raise ConfigurationError("batch_size and partition_docs must be positive")
        for name, value in (("apply_lanes", apply_lanes), ("insert_workers", insert_workers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be a whole number of at least 1, not {value!r}")
        if state_db in SYSTEM_DATABASES:
            raise ConfigurationError(f"state_db '{state_db}' is a system database: choose another name")
        if update_apply not in UPDATE_APPLY_MODES:
            raise ConfigurationError(f"update_apply must be one of {', '.join(UPDATE_APPLY_MODES)}, not {update_apply!r}")
        if copy_order not in COPY_ORDERS:
            raise ConfigurationError(f"copy_order must be one of {', '.join(COPY_ORDERS)}, not {copy_order!r}")
        self.source = source_client
        self.target = target_client
        self.sync_id = sync_id
        self.namespaces = namespaces
        self.target_db_prefix = target_db_prefix
        self.state_db = state_db
        self.batch_size = batch_size
        self.partition_docs = partition_docs
        # Catch-up applies each flush's DML in this many concurrent ordered bulk writes, a document's
        # changes always in the same one (apply_lane); 1: one bulk write per namespace after another.
        self.apply_lanes = apply_lanes
        # Concurrent inserts of one partition's initial copy (1 for a capped collection).
        self.insert_workers = insert_workers
        # How a new sync replays update events ("delta": from their updateDescription where exact, else a
        # lookup; "lookup": the stream's updateLookup document). Kept in the sync's state at start(): a
        # sync keeps the mode it started with, as its stream's events carry what that mode needs.
        self.update_apply = update_apply
        # How a collection of more than one partition is planned: "id_range" (split into _id ranges),
        # "natural" (one natural-order partition) or "auto" (natural where the source answers an _id range
        # with a collection scan; see engines/copy_order.py). Only planning reads it: the plan is stored.
        self.copy_order = copy_order
        self.log = log or logging.getLogger(__name__)
        self.max_await_ms = DEFAULT_MAX_AWAIT_MS
        self.log_interval = DEFAULT_INTERVAL_SECONDS
        self.index_build_workers = DEFAULT_INDEX_BUILD_WORKERS
        # Test seam: called as fault_hook(stage, n) after batch n of a copy ("copy") or of a catch-up
        # ("catch_up") has been written to the target and BEFORE its checkpoint/resume token is saved,
        # the worst moment for a crash. Raising from it simulates a killed task.
        self.fault_hook: Callable[[str, int], None] | None = None
        # Called after every applied batch with the (source db, collection, _id) of the documents the batch
        # changed: the verifier queues them for recheck.
        self.changed_listener: Callable[[list[tuple[str, str, Any]]], None] | None = None
        # Called when a rename is replayed (source db, coll, new db, new coll): the verifier moves its queue.
        self.rename_listener: Callable[[str, str, str, str], Any] | None = None

    # ------------------------------------------------------------------------------------------ state
    @property
    def _state(self) -> Collection:
        from pymongo import WriteConcern

        return self.target[self.state_db].get_collection(
            STATE_COLLECTION, write_concern=WriteConcern("majority"), codec_options=CodecOptions(tz_aware=True)
        )

    def _partition_key(self, partition_id: str) -> SON:
        return SON([("sync_id", self.sync_id), ("partition", partition_id)])

    def _config(self) -> dict[str, Any]:
        return {"include": list(self.namespaces.include), "exclude": list(self.namespaces.exclude),
                "target_db_prefix": self.target_db_prefix}

    def _sync_doc(self) -> dict[str, Any] | None:
        return self._state.find_one({"_id": self.sync_id})

    def _require_sync(self, *flags: str) -> dict[str, Any]:
        doc = self._sync_doc()
        if doc is None:
            raise ConfigurationError(
                f"live pull '{self.sync_id}' has not been started: call start() first (it records the change "
                "stream's start point before anything is copied)"
            )
        if doc.get("config") != self._config():
            raise ConfigurationError(
                f"live pull '{self.sync_id}' was started with {doc.get('config')}, not {self._config()}: "
                "use the same namespaces and prefix, or restart it with a new sync_id"
            )
        if doc.get("history_lost"):
            raise HistoryLost(doc["history_lost"])
        steps = {"planned": "plan_partitions()", "targets_prepared": "prepare_targets()",
                 "copy_finished": "finish_initial_copy()"}
        for flag in flags:
            if not doc.get(flag):
                raise ConfigurationError(f"live pull '{self.sync_id}': call {steps[flag]} first")
        return doc

    def _update_sync(self, update: dict[str, Any]) -> None:
        update.setdefault("$set", {})["updated_at"] = _utc_now()
        self._state.update_one({"_id": self.sync_id}, update)

    def reset(self) -> None:
        """Forget this sync's state (start point, plan, checkpoints). The target's data is left as is."""
        deleted = self._state.delete_many({"sync_id": self.sync_id}).deleted_count
        self.log.info("live pull %s: state reset (%d state documents removed)", self.sync_id, deleted)

    # -------------------------------------------------------------------------------------- source info
    def _target_db(self, db: str) -> str:
        return f"{self.target_db_prefix}{db}"

    def _selected(self, db: str, coll: str) -> bool:
        return db != self.state_db and self.namespaces.matches(db, coll)

    def _selected_collections(self) -> list[tuple[str, dict[str, Any]]]:
        """``(db, listCollections entry)`` for every selected namespace on the source, sorted."""
        found: list[tuple[str, dict[str, Any]]] = []
        for db in sorted(self.source.list_database_names()):
            if is_never_migrated(db) or db == self.state_db:
                continue
            for info in self.source[db].list_collections():
                if self._selected(db, info["name"]):
                    found.append((db, info))
        return sorted(found, key=lambda item: (item[0], item[1]["name"]))

    def _source_times(self) -> tuple[Timestamp | None, Timestamp | None]:
        """(latest write, latest majority-committed write) on the source, from ``hello``."""
        reply = self.source.admin.command("hello")
        last_write = reply.get("lastWrite") or {}
        latest = (last_write.get("opTime") or {}).get("ts")
        majority = (last_write.get("majorityOpTime") or {}).get("ts")
        fallback = reply.get("operationTime")  # mongos: no lastWrite, the cluster time stands in
        return latest or fallback, majority or latest or fallback

    def _supports_expanded_events(self) -> bool:
        # showExpandedEvents (DDL events such as createIndexes) exists from 6.0, wire version 17.
        return int(self.source.admin.command("hello").get("maxWireVersion") or 0) >= 17

    def _supports_split_events(self) -> bool:
        # $changeStreamSplitLargeEvent: MongoDB 7.0+, backported to 6.0.9.
        version = str(self.source.admin.command("buildInfo").get("version") or "0")
        parts = tuple(int(p) for p in re.findall(r"\d+", version)[:3]) + (0, 0, 0)
        return parts[:2] >= (7, 0) or (parts[:2] == (6, 0) and parts[2] >= 9)

    def _pipeline(self, split: bool = False, delta: bool = True) -> list[dict[str, Any]]:
        # Identical for every stream of a sync (resume tokens are only valid for the same pipeline). The
        # $match drops system and bookkeeping databases server-side; the namespace patterns are applied
        # here. In "lookup" mode updateDescription is unused (the looked-up document is applied) and can be
        # as large as the document, so it is dropped to keep events under the 16 MiB limit. An event that is
        # still larger (a document near 16 MiB plus the event's envelope) is split into fragments by the
        # server where it can (the stage must come last) and reassembled here.
        pipeline: list[dict[str, Any]] = [
            {"$match": {"ns.db": {"$nin": sorted({*SYSTEM_DATABASES, self.state_db})}}},
        ]
        if not delta:
            pipeline.append({"$project": {"updateDescription": 0}})
        if split:
            pipeline.append({"$changeStreamSplitLargeEvent": {}})
        return pipeline

    def _open_stream(self, *, expanded: bool, split: bool = False, resume_after: Mapping[str, Any] | None = None,
                     session=None, delta: bool = True):
        from pymongo.change_stream import ClusterChangeStream

        # client.watch() decodes events with the client's document class; events here must stay raw BSON
        # so that documents reach the target byte for byte (Decimal128, UUID subtypes, field order,
        # deprecated types). ClusterChangeStream over an admin handle with raw codec options is exactly
        # what MongoClient.watch builds, with the codec changed.
        stream = ClusterChangeStream(
            self.source.get_database("admin", codec_options=RAW_CODEC),
            self._pipeline(split, delta),
            None if delta else "updateLookup",  # delta: updates are replayed from updateDescription
            resume_after,
            self.max_await_ms,
            self.batch_size,  # events per getMore: one batch fills one flush, which the lanes share
            None,
            None,
            session,
            None,
            None,
            None,
            show_expanded_events=True if expanded else None,
        )
        stream._initialize_cursor()
        return stream

    def _history_lost(self, exc: Exception, since: Any) -> HistoryLost:
        code = getattr(exc, "code", None)
        message = (
            f"live pull '{self.sync_id}' cannot continue: the source's oplog no longer holds its resume point "
            f"(last applied cluster time {since}; server code {code}: {_server_message(exc)}). Events after that "
            "point are gone, so the target can no longer be brought up to date, and nothing further was "
            "applied. Restart the live pull from scratch with drop_target=true (start(restart=True), then "
            "prepare_targets(drop=True) and a fresh copy), and enlarge the source's oplog "
            "(replSetResizeOplog) so its window covers the initial copy plus catch-up; check_oplog_window() "
            "says how much is needed"
        )
        self._update_sync({"$set": {"history_lost": message, "status": "history_lost"}})
        return HistoryLost(message)

    # -------------------------------------------------------------------------------------------- start
    def start(self, *, restart: bool = False) -> StartPoint:
        """Record the change stream's start point (before any copy). An existing sync keeps its start point.

        ``restart=True`` forgets the previous state of this ``sync_id`` first (after HistoryLost); the
        target must then be emptied again (``prepare_targets(drop=True)``).
        """
        from pymongo.errors import DuplicateKeyError, OperationFailure

        if restart:
            self.reset()
        existing = self._sync_doc()
        if existing is not None:
            self._require_sync()
            point = StartPoint.from_dict(json.loads(existing["start"]))
            self.log.info("live pull %s: already started at %s (cluster time %s)", self.sync_id,
                          point.started_at, point.cluster_time)
            return point

        hello = self.source.admin.command("hello")
        if not hello.get("setName") and hello.get("msg") != "isdbgrid":
            raise ImpossibleStrategy(
                "the source is a standalone server without an oplog: a live pull needs a replica set or sharded "
                "cluster (change streams). Use a dump/restore strategy, or convert the source to a one-node "
                "replica set"
            )
        expanded = self._supports_expanded_events()
        split = self._supports_split_events()
        with self.source.start_session() as session:
            try:
                stream = self._open_stream(expanded=expanded, split=split, session=session,
                                           delta=self.update_apply == "delta")
            except OperationFailure as exc:
                raise MigrationError(
                    f"cannot open a change stream on the source (code {exc.code}): {_server_message(exc)}") from None
            with stream:
                # One getMore: its postBatchResumeToken (or the token of an event already returned) marks a
                # point no later than every read the copy makes afterwards, which is all the copy needs.
                event = stream.try_next()
                token = stream.resume_token
                cluster_time = event["clusterTime"] if event is not None else session.operation_time
        if token is None:
            raise MigrationError("the source's change stream returned no resume token: cannot start a live pull")
        point = StartPoint(_token_to_json(token) or {}, _ts_list(cluster_time) or [0, 0], _utc_now())
        doc = {
            "_id": self.sync_id, "kind": "sync", "sync_id": self.sync_id, "status": "copying",
            "config": self._config(), "expanded_events": expanded, "split_events": split,
            "update_apply": self.update_apply,
            "fence": None, "rechecks_applied": 0, "start": json.dumps(point.to_dict()),
            "resume_token": _token_from_json(point.resume_token), "last_applied_cluster_time": cluster_time,
            "events_applied": 0, "planned": False, "targets_prepared": False, "copy_finished": False,
            "copy_finished_cluster_time": None, "history_lost": None, "completed_at": None,
            "created_at": _utc_now(), "updated_at": _utc_now(),
        }
        try:
            self._state.insert_one(doc)
        except DuplicateKeyError:  # another task started the same sync at the same moment: theirs wins
            return StartPoint.from_dict(json.loads(self._require_sync()["start"]))
        if not expanded:
            self.log.warning(
                "live pull %s: the source is older than MongoDB 6.0, so its change stream reports no index or "
                "collection-option changes; indexes are brought in line at cutover", self.sync_id)
        self.log.info("live pull %s: started; change stream start point at cluster time %s", self.sync_id,
                      point.cluster_time)
        return point

    # ----------------------------------------------------------------------------------------- planning
    def plan_partitions(self) -> list[Partition]:
        """Split every selected collection into ``_id`` ranges of about ``partition_docs`` documents.

        The plan is stored: a retried task gets the same partitions back (checkpoints refer to them).
        """
        sync = self._require_sync()
        if sync.get("planned"):
            return self._stored_partitions()
        selected = self._selected_collections()
        names = [f"{db}.{info['name']}" for db, info in selected]
        all_names = [f"{db}.{c}" for db in self.source.list_database_names() if not is_never_migrated(db)
                     for c in self.source[db].list_collection_names()]
        if missing := self.namespaces.unmatched_includes(all_names):
            raise ConfigurationError(
                f"include pattern(s) {', '.join(repr(p) for p in missing)} match no namespace of the source"
            )
        timeseries = [f"{db}.{info['name']}" for db, info in selected
                      if info.get("type") == "timeseries" or "timeseries" in (info.get("options") or {})]
        if timeseries:
            raise ImpossibleStrategy(
                f"time-series collections cannot be migrated live: change streams do not report their writes "
                f"({', '.join(timeseries)}). Exclude them (exclude_namespaces) and migrate them with dump/restore"
            )
        partitions: list[Partition] = []
        for db, info in selected:
            if info.get("type") == "view":
                continue
            partitions += self._plan_collection(db, info)
        self._state.delete_many({"sync_id": self.sync_id, "kind": "partition"})  # a half-written earlier plan
        if partitions:
            self._state.insert_many([
                {"_id": self._partition_key(p.id), "kind": "partition", "sync_id": self.sync_id,
                 "partition": json.dumps(p.to_dict()), "last_id": None, "documents": 0, "bytes": 0, "done": False,
                 "updated_at": _utc_now()}
                for p in partitions
            ])
        _, planned_at = self._source_times()
        self._update_sync({"$set": {"planned": True, "planned_cluster_time": planned_at}})
        self.log.info("live pull %s: %d partitions over %d collections (%s)", self.sync_id, len(partitions),
                      len({p.namespace for p in partitions}), ", ".join(names) or "none selected")
        return partitions

    def _plan_collection(self, db: str, info: Mapping[str, Any]) -> list[Partition]:
        coll = info["name"]
        target_db = self._target_db(db)
        _check_target_namespace(target_db, coll)
        collection = self.source[db].get_collection(coll, codec_options=RAW_CODEC)
        documents = collection.estimated_document_count()
        capped = bool((info.get("options") or {}).get("capped"))
        parts = math.ceil(documents / self.partition_docs) if documents else 1
        if capped or parts <= 1:
            return partitions_from_boundaries(db, coll, target_db, [], documents, capped=capped)
        if self._copies_in_natural_order(collection, parts):
            return [Partition(db=db, collection=coll, target_db=target_db, index=0, documents_estimate=documents,
                              natural=True)]
        # A random sample of _id values, sorted by the server (BSON order, the collection's collation):
        # about ten per partition is enough for even ranges, and on mongod a small $sample is a random
        # cursor rather than a scan.
        sample_size = min(documents, parts * 10)
        sampled = [doc["_id"] for doc in collection.aggregate(
            [{"$sample": {"size": sample_size}}, {"$project": {"_id": 1}}, {"$sort": {"_id": 1}}],
            allowDiskUse=True,
        )]
        return partitions_from_boundaries(db, coll, target_db, choose_boundaries(sampled, parts), documents)

    def _copies_in_natural_order(self, collection: Collection, parts: int) -> bool:
        """Whether a collection of ``parts`` (> 1) ranges is copied whole in natural order instead, and why."""
        if self.copy_order != "auto":
            return self.copy_order == "natural"
        from pymongo.errors import OperationFailure

        try:
            explain = collection.database.command(
                id_range_explain_command(collection.name, MinKey(), MaxKey()))
        except OperationFailure as exc:
            self.log.warning("live pull %s: %s: the source did not explain an _id range query (code %s): copying in "
                             "%d _id ranges", self.sync_id, collection.full_name, exc.code, parts)
            return False
        if ranges_scan_the_collection(explain):
            self.log.info("live pull %s: %s: the source answers an _id range with a collection scan (COLLSCAN in "
                          "its plan), so %d ranges would read the collection %d times: copying it once, in natural "
                          "order, as one partition", self.sync_id, collection.full_name, parts, parts)
            return True
        return False

    def _stored_partitions(self) -> list[Partition]:
        docs = self._state.find({"sync_id": self.sync_id, "kind": "partition"})
        parts = [Partition.from_dict(json.loads(doc["partition"])) for doc in docs]
        return sorted(parts, key=lambda p: (p.db, p.collection, p.index))

    # ---------------------------------------------------------------------------------------- targets
    def prepare_targets(self, drop: bool = False) -> None:
        """Create every planned collection on the target with its source options, before copying.

        A target namespace that holds documents (or is a view) is refused unless ``drop``; nothing is
        written then. Once prepared, a sync never prepares again (a retry must not drop copied data).
        """
        sync = self._require_sync("planned")
        if sync.get("targets_prepared"):
            self.log.info("live pull %s: targets already prepared", self.sync_id)
            return
        collections = {(p.db, p.collection) for p in self._stored_partitions()}
        views = [(db, info) for db, info in self._selected_collections() if info.get("type") == "view"]
        view_names = {(db, info["name"]) for db, info in views}
        occupied: list[str] = []
        for db, coll in sorted(collections | view_names):
            database = self.target[self._target_db(db)]
            existing = _collection_info(database, coll)
            if existing is None:
                continue
            if existing.get("type") == "view" or database[coll].find_one({}, projection={"_id": 1}) is not None:
                occupied.append(f"{database.name}.{coll}")
        if occupied and not drop:
            raise TargetNotEmpty(
                f"{len(occupied)} target namespace(s) already hold data: {', '.join(occupied)}. Nothing was "
                "written. Set drop_target=true to replace them, or exclude them"
            )
        for db, coll in sorted(collections | view_names):
            database = self.target[self._target_db(db)]
            if drop:
                database.drop_collection(coll)
            if (db, coll) in view_names:
                continue  # views are created by finish_initial_copy, once their sources hold data
            info = _collection_info(self.source[db], coll)
            if info is None:
                continue  # dropped since planning: the stream's drop event says so again
            if _collection_info(database, coll) is None:
                _create_collection(database, coll, CollectionMetadata.from_collection_info(info, []))
            else:
                self.log.warning("%s.%s exists and is empty: copying into it without re-applying its options",
                                 database.name, coll)
        self._update_sync({"$set": {"targets_prepared": True}})
        self.log.info("live pull %s: %d target collections prepared", self.sync_id, len(collections))

    # -------------------------------------------------------------------------------------------- copy
    def copy_partition(self, partition: Partition) -> PartitionResult:
        """Copy one partition as raw BSON batches, checkpointing after every batch.

        The checkpoint is the last ``_id`` copied for an ``_id`` range, the record position for a natural-order
        partition (where the source reports one); a capped collection is copied again from its start.
        """
        self._require_sync("planned", "targets_prepared")
        key = self._partition_key(partition.id)
        state = self._state.find_one({"_id": key})
        if state is None:
            raise ConfigurationError(
                f"partition {partition.id} is not in the stored plan of live pull '{self.sync_id}': pass the "
                "partitions plan_partitions() returned"
            )
        stored = Partition.from_dict(json.loads(state["partition"]))
        if not stored.same_plan(partition):
            raise ConfigurationError(f"partition {partition.id} differs from the stored plan: {stored.to_dict()}")
        started = time.monotonic()
        if state.get("done"):
            self.log.info("live pull %s: partition %s already copied", self.sync_id, partition.id)
            return PartitionResult(partition.id, state["documents"], state["bytes"], 0.0,
                                   _json_or_none(state.get("last_id")), True)

        if stored.natural:
            batches_read, resumed_from = self._natural_batches(stored, state)
        else:
            batches_read, resumed_from = self._ordered_batches(
                self._copy_source(stored.db, stored.collection), stored, state)
        target = self._target_collection(stored.target_db, stored.collection)
        progress = Progress(f"live copy {partition.id}", stored.documents_estimate, self.log,
                            interval=self.log_interval)
        batches = 0
        # The next batches are read while earlier ones are inserted, and up to insert_workers inserts run at
        # once (one for a capped collection, whose order is its meaning): the source and the target work at
        # the same time instead of taking turns. Batches are recorded strictly in the order they were read,
        # each once its insert and every earlier one have finished, so the checkpoint ("everything up to
        # last_id is on the target", or up to a record position) never runs ahead of the data. Inserts that
        # finished past a failure are on the target without a checkpoint: the retry re-reads them and skips
        # them as duplicates.
        workers = 1 if stored.capped else self.insert_workers
        in_flight: deque[tuple[Future[int], list[RawBSONDocument], int, dict[str, Any]]] = deque()

        def record_oldest() -> None:
            nonlocal batches
            future, batch, nbytes, position = in_flight.popleft()
            inserted = future.result()
            batches += 1
            if self.fault_hook is not None:
                self.fault_hook("copy", batches)
            # Counted as copied, not as newly inserted: a batch re-read after a crash counts once,
            # since the crashed attempt never recorded it.
            self._state.update_one({"_id": key}, {
                "$set": {**position, "updated_at": _utc_now()},
                "$inc": {"documents": len(batch), "bytes": nbytes, "inserted": inserted},
            })
            progress.add(len(batch), nbytes)

        with batches_read as batch_reader, \
                ReadAhead(batch_reader, depth=COPY_READ_AHEAD_BATCHES, name=f"live-copy-{partition.id}") as read_ahead, \
                ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"live-insert-{partition.id}") as pool:
            for batch, nbytes, position in read_ahead:
                in_flight.append((pool.submit(_insert_tolerating_duplicates, target, batch, ordered=stored.capped),
                                  batch, nbytes, position))
                if len(in_flight) >= workers:
                    record_oldest()
            while in_flight:
                record_oldest()
        done = self._state.find_one_and_update(
            {"_id": key}, {"$set": {"done": True, "updated_at": _utc_now()}}, return_document=True)
        progress.finish()
        return PartitionResult(partition.id, done["documents"], done["bytes"], time.monotonic() - started,
                               resumed_from[0])

    def _copy_source(self, db: str, coll: str) -> Collection:
        """The source collection as the initial copy must read it, whatever the connection's extras say: from
        the primary with read concern majority. The start point was taken on the primary before the copy; a
        lagging secondary could serve a document older than the start point, whose later writes the change
        stream then never replays, and a non-majority read could copy a write that is later rolled back."""
        from pymongo import ReadPreference
        from pymongo.read_concern import ReadConcern

        return self.source[db].get_collection(coll, codec_options=RAW_CODEC, read_preference=ReadPreference.PRIMARY,
                                              read_concern=ReadConcern("majority"))

    def _ordered_batches(self, source: Collection, stored: Partition, state: Mapping[str, Any]
                         ) -> tuple[closing[Iterator[_CopyBatch]], list[Any]]:
        """A range partition read in ``_id`` order after its checkpoint (or a capped one, whole, in natural order).

        Returns the batches (each with the checkpoint to save once it is on the target) and, in a one-item
        list, the checkpoint this attempt starts after (None: from the start).
        """
        key = self._partition_key(stored.id)
        checkpoint = None if stored.capped else _json_or_none(state.get("last_id"))
        if stored.capped:
            # Insertion order is what a capped collection means: copy it whole in natural order. A resumed
            # copy starts over; documents already there are skipped (ordered, so the order is kept).
            query, sort = {}, [("$natural", 1)]
            if state.get("documents"):
                self.log.info("partition %s (capped): recopying from the start, existing documents skipped",
                              stored.id)
                self._state.update_one({"_id": key}, {"$set": {"documents": 0, "bytes": 0}})
        else:
            lower = id_from_json(checkpoint) if checkpoint is not None else (
                None if stored.lower is None else id_from_json(stored.lower))
            upper = None if stored.upper is None else id_from_json(stored.upper)
            query = id_range_filter(lower, upper, lower_inclusive=checkpoint is None)
            sort = [("_id", 1)]  # the checkpoint is "everything up to last_id is on the target"
            if checkpoint is not None:
                self.log.info("partition %s: resuming after _id %s", stored.id, json.dumps(checkpoint))

        def read() -> Iterator[_CopyBatch]:
            with source.find(query, sort=sort, batch_size=self.batch_size) as cursor:
                for batch, nbytes in self._raw_batches(cursor):
                    last_id = None if stored.capped else json.dumps(id_to_json(batch[-1]["_id"]))
                    yield batch, nbytes, {"last_id": last_id}

        return closing(read()), [checkpoint]

    def _natural_batches(self, stored: Partition, state: Mapping[str, Any]
                         ) -> tuple[closing[Iterator[_CopyBatch]], list[Any]]:
        """A natural-order partition: the whole collection in record order, after its saved record position.

        Each server batch is one copy batch, saved with the ``postBatchResumeToken`` that follows it and the node
        that reported it. A position is resumed only on that node in that term (record ids are node-local);
        otherwise, or when the source reports no positions (a mongos, a server without ``$_requestResumeToken``)
        or refuses the saved one (its record was deleted), the partition is read again from its first record and
        the documents already on the target are skipped. The change stream replays every change made since the
        start point, so re-reading is safe; only a resumed position saves the re-reading.
        """
        from pymongo import ReadPreference
        from pymongo.errors import OperationFailure, PyMongoError

        key = self._partition_key(stored.id)
        node = self._record_node()
        saved, saved_node = state.get("resume_token"), state.get("resume_node")
        resume = dict(saved) if reusable_position(saved, saved_node, node) else None
        database, name = self.source[stored.db], stored.collection
        # The position this attempt resumes after (relaxed ExtJSON), cleared if the source refuses it.
        resumed_from = [None if resume is None else json.loads(json_util.dumps(resume))]

        def start_over(why: str) -> None:
            resumed_from[0] = None
            self.log.info("partition %s (natural order): copying again from its first record, %s; documents "
                          "already on the target are skipped", stored.id, why)
            self._state.update_one({"_id": key}, {"$set": {"documents": 0, "bytes": 0, "resume_token": None,
                                                            "resume_node": None}})

        if resume is not None:
            self.log.info("partition %s (natural order): resuming after record position %s on %s", stored.id,
                          json_util.dumps(resume), node)
        elif state.get("documents"):
            start_over("as the source reported no record position for it" if saved is None else
                       "as its saved record position was reported by another node or election term")

        def command(body: Mapping[str, Any], session: Any) -> Any:
            return database.command(body, codec_options=RAW_CODEC, read_preference=ReadPreference.PRIMARY,
                                    session=session)

        def read() -> Iterator[_CopyBatch]:
            positions, resume_after = node is not None, resume
            with self.source.start_session(causal_consistency=False) as session:
                while True:
                    try:
                        reply = command(natural_find_command(name, self.batch_size, request_positions=positions,
                                                             resume_after=resume_after), session)
                        break
                    except OperationFailure as exc:
                        if resume_after is not None:
                            start_over(f"as the source refused to resume at its saved record position (code {exc.code})")
                            resume_after = None
                        elif positions:
                            self.log.info("partition %s: the source refused to report record positions (code %s): "
                                          "a retried copy reads it again from its first record", stored.id, exc.code)
                            positions = False
                        else:
                            raise
                cursor = reply["cursor"]
                batch, cursor_id = list(cursor["firstBatch"]), int(cursor["id"])
                if positions and cursor.get("postBatchResumeToken") is None:
                    self.log.info("partition %s: the source reports no record positions: a retried copy reads it "
                                  "again from its first record", stored.id)
                    positions = False
                try:
                    while True:
                        if batch:
                            token = cursor.get("postBatchResumeToken") if positions else None
                            yield batch, sum(len(doc.raw) for doc in batch), {
                                "resume_token": token, "resume_node": None if token is None else node}
                        if not cursor_id:
                            return
                        reply = command({"getMore": Int64(cursor_id), "collection": name,
                                         "batchSize": self.batch_size}, session)
                        cursor = reply["cursor"]
                        batch, cursor_id = list(cursor["nextBatch"]), int(cursor["id"])
                finally:
                    if cursor_id:
                        try:
                            command({"killCursors": name, "cursors": [Int64(cursor_id)]}, session)
                        except PyMongoError:
                            pass  # the server times the cursor out

        return closing(read()), resumed_from

    def _record_node(self) -> str | None:
        """The node and election term that record positions of this copy belong to; None: do not use them."""
        hello = self.source.admin.command("hello")
        if hello.get("msg") == "isdbgrid":
            return None  # a mongos: record ids are per shard node, and find through mongos reports none
        me = hello.get("me")
        if not me and (address := self.source.address) is not None:  # a standalone names no member
            me = f"{address[0]}:{address[1]}"
        return f"{me} term {hello.get('electionId')}" if me else None

    def _raw_batches(self, cursor: Iterable[RawBSONDocument]) -> Iterator[tuple[list[RawBSONDocument], int]]:
        batch: list[RawBSONDocument] = []
        size = 0
        for doc in cursor:
            if batch and (len(batch) >= self.batch_size or size + len(doc.raw) > DEFAULT_INSERT_BATCH_BYTES):
                yield batch, size
                batch, size = [], 0
            batch.append(doc)
            size += len(doc.raw)
        if batch:
            yield batch, size

    def _target_collection(self, target_db: str, coll: str) -> Collection:
        from pymongo import WriteConcern

        # Majority: a checkpoint (majority) must never get ahead of the data it vouches for.
        return self.target[target_db].get_collection(coll, codec_options=RAW_CODEC,
                                                      write_concern=WriteConcern("majority"))

    # ------------------------------------------------------------------------------------------ finish
    def finish_initial_copy(self) -> None:
        """Build secondary indexes (unique ones wait for cutover) and create the views. Idempotent."""
        sync = self._require_sync("planned", "targets_prepared")
        if sync.get("copy_finished"):
            self.log.info("live pull %s: initial copy already finished", self.sync_id)
            return
        unfinished = [Partition.from_dict(json.loads(doc["partition"])).id
                      for doc in self._state.find({"sync_id": self.sync_id, "kind": "partition", "done": False})]
        if unfinished:
            raise MigrationError(
                f"{len(unfinished)} partition(s) are not copied yet: {', '.join(sorted(unfinished)[:20])}; run "
                "copy_partition for each before finishing the initial copy"
            )
        deferred: list[str] = []
        builds: list[tuple[str, str, CollectionMetadata]] = []
        for db, coll in sorted({(p.db, p.collection) for p in self._stored_partitions()}):
            info = _collection_info(self.source[db], coll)
            if info is None:
                continue  # dropped during the copy: catch_up replays the drop
            specs = index_specs_for_restore(self.source[db][coll].list_indexes())
            now = [s for s in specs if not s.get("unique")]
            deferred += [f"{db}.{coll}:{s['name']}" for s in specs if s.get("unique")]
            if now:
                builds.append((db, coll, CollectionMetadata(collection_name=coll, indexes=now)))
        index_seconds = self._build_indexes(builds)
        self._create_views()
        _, copy_end = self._source_times()
        self._update_sync({"$set": {"copy_finished": True, "copy_finished_cluster_time": copy_end,
                                    "status": "catching_up", "index_seconds": round(index_seconds, 3)}})
        if deferred:
            self.log.info("live pull %s: unique indexes built at cutover, once the target has converged: %s",
                          self.sync_id, ", ".join(deferred))
        self.log.info("live pull %s: initial copy finished", self.sync_id)

    def index_build_seconds(self) -> float | None:
        """Seconds the secondary index builds after the copy took (None before ``finish_initial_copy``)."""
        return (self._sync_doc() or {}).get("index_seconds")

    def _build_indexes(self, builds: list[tuple[str, str, CollectionMetadata]]) -> float:
        """Build each collection's secondary indexes, several collections at a time; returns the seconds taken.

        One ``createIndexes`` per collection builds all of its indexes in one pass over the data, and only one
        build runs per collection at a time; different collections build concurrently, up to
        ``index_build_workers`` (mongod admits 3 user index builds at once by default:
        ``maxNumActiveUserIndexBuilds``; more would queue on the server and hold a connection each)."""
        from concurrent.futures import ThreadPoolExecutor

        if not builds:
            return 0.0
        started = time.monotonic()
        workers = max(1, min(self.index_build_workers, len(builds)))

        def build(job: tuple[str, str, CollectionMetadata]) -> int:
            db, coll, meta = job
            return _create_indexes(self.target[self._target_db(db)], coll, meta)

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="index-build") as pool:
            # list(): every build finishes (or fails) before this returns; the first failure is raised, naming
            # its collection and indexes (_create_indexes).
            created = sum(pool.map(build, builds))
        seconds = time.monotonic() - started
        self.log.info("live pull %s: built %d secondary index(es) on %d collection(s) in %.1fs, up to %d "
                      "collection(s) at a time", self.sync_id, created, len(builds), seconds, workers)
        return seconds

    def _create_views(self) -> None:
        for db, info in self._selected_collections():
            if info.get("type") != "view":
                continue
            database = self.target[self._target_db(db)]
            options = dict(info.get("options") or {})
            existing = _collection_info(database, info["name"])
            if existing is not None:
                if existing.get("type") == "view" and dict(existing.get("options") or {}) == options:
                    continue
                database.drop_collection(info["name"])
            _create_collection(database, info["name"], CollectionMetadata.from_collection_info(info, []))

    # ---------------------------------------------------------------------------------------- catch up
    def catch_up(
        self,
        *,
        max_seconds: float | None = None,
        until_lag_below: float | None = None,
        quiet_seconds: float | None = None,
        until_cluster_time: Timestamp | list[int] | None = None,
    ) -> CatchUpResult:
        """Replay the change stream from the saved resume token onto the target.

        Stops at the first of: the lag is at most ``until_lag_below`` seconds ("lag_ok"); no event on a
        selected namespace for ``quiet_seconds`` ("quiet"); every event up to ``until_cluster_time`` is
        applied ("until"); ``max_seconds`` elapsed ("max_seconds"). With no condition it stops once the
        stream is drained ("lag_ok"). The resume token is saved after every applied batch.

        A batch's DML is applied in ``apply_lanes`` concurrent ordered bulk writes per namespace, each
        document's changes in one lane (``apply_lane`` of its ``_id``), so every document goes through its
        changes in stream order; changes of different documents may land in any order within the batch.
        Transactions: the events of one multi-document transaction (same ``lsid`` and ``txnNumber``) are
        applied as independent writes, as they were before lanes (per namespace, not atomically): a reader of
        the target during catch-up may see part of a transaction, and a batch boundary or a failed lane may
        split one. Each document still goes through its committed versions in commit order, and once the
        stream is drained (as at cutover) every transaction is wholly there.
        """
        until = _ts_from(until_cluster_time)
        drain_only = max_seconds is None and until_lag_below is None and quiet_seconds is None and until is None

        def stop_reason(follow: _Follow, lag: float | None, elapsed: float) -> str | None:
            if drain_only:
                return "lag_ok" if follow.caught_up_once else None
            if until is not None and (
                (follow.caught_up_to is not None and follow.caught_up_to >= until)
                or (follow.last_cluster_time is not None and follow.last_cluster_time > until)  # stream order
            ):
                return "until"
            if until_lag_below is not None and lag is not None and lag <= until_lag_below:
                return "lag_ok"
            if quiet_seconds is not None and time.monotonic() - follow.last_event_at >= quiet_seconds:
                return "quiet"
            if max_seconds is not None and elapsed >= max_seconds:
                return "max_seconds"
            return None

        return self._follow(stop_reason)

    def drain_to(self, cluster_time: Timestamp | list[int], *, timeout: float = 300.0) -> CatchUpResult:
        """Apply every change event at or before ``cluster_time`` and none after it; save the resume token.

        ``catch_up(until_cluster_time=...)`` checks its stop condition per flushed batch, so it may apply
        events past the point that arrived in the same batch. This stops at the first event after the point
        without applying it (``_follow`` with ``apply_after_fence=False``: the saved resume token stays before
        it), or once an empty batch follows a majority-committed op time at or past the point (nothing at or
        before it is still to come). Raises ``MigrationError`` when the point is not reached in ``timeout``
        seconds; what was applied is at or before the point either way.
        """
        point = _ts_from(cluster_time)
        if point is None:
            raise ConfigurationError("drain_to needs a cluster time ([seconds, increment] or a Timestamp)")

        def reached(follow: _Follow, lag: float | None, elapsed: float) -> str | None:
            if follow.caught_up_to is not None and follow.caught_up_to >= point:
                return "until"
            return "max_seconds" if elapsed >= timeout else None

        result = self._follow(reached, fence=point, apply_after_fence=False)
        if result.stopped_because == "max_seconds":
            raise MigrationError(
                f"live pull '{self.sync_id}': the change stream did not reach cluster time {_ts_list(point)} within "
                f"{timeout:.0f} s (last applied {result.last_applied_cluster_time}); nothing after the point was "
                "applied")
        self.log.info("live pull %s: drained to cluster time %s (%d events applied, none after it)", self.sync_id,
                      _ts_list(point), result.events_applied)
        return result

    def _follow(self, stop_reason: Callable[[_Follow, float | None, float], str | None], *,
                fence: Timestamp | None = None, apply_after_fence: bool = True) -> CatchUpResult:
        """Read the change stream from the saved resume token and apply it until ``stop_reason`` says stop.

        With a ``fence``: every event after it on a selected namespace is counted in ``late`` (by
        namespace); ``apply_after_fence=False`` stops at the first event after the fence without applying
        it (the saved resume token stays before it).

        Each batch is written in the background while the next one is read (``_FlushPipeline``); batches are
        written one after another in stream order, and a position is saved only after its batch is written.
        Stop conditions are evaluated with nothing in flight, on the applied state, and once one says stop,
        everything already read is applied before returning."""
        from pymongo.errors import OperationFailure

        sync = self._require_sync("copy_finished")
        if sync.get("completed_at"):
            raise ConfigurationError(
                f"live pull '{self.sync_id}' was cut over at {sync['completed_at']}: the target is the live "
                "database now, and replaying source writes onto it could overwrite newer data"
            )
        applier = _EventApplier(self, sync)
        if applier.delta:
            # What an earlier catch-up wrote past its saved position (a failed batch's lanes, lookups) was
            # written before now: updates up to the latest write are replayed as lookups (_EventApplier).
            latest, _ = self._source_times()
            if latest is not None and (applier.lookup_until is None or latest > applier.lookup_until):
                applier.lookup_until = latest
        follow = _Follow(last_cluster_time=sync.get("last_applied_cluster_time"))
        started = last_flush = last_lag_log = time.monotonic()
        progress = Progress(f"live catch-up {self.sync_id} (events)", None, self.log, interval=self.log_interval)
        lag: float | None = None
        observed_majority: Timestamp | None = None
        next_probe = 0.0
        reason: str | None = None
        fragments: list[RawBSONDocument] = []
        try:
            stream = self._open_stream(expanded=bool(sync.get("expanded_events")), split=bool(sync.get("split_events")),
                                       resume_after=sync["resume_token"], delta=applier.delta)
        except OperationFailure as exc:
            if exc.code in HISTORY_LOST_CODES:
                raise self._history_lost(exc, _ts_list(follow.last_cluster_time)) from None
            if exc.code == _BSON_OBJECT_TOO_LARGE:  # the first batch already holds the event
                raise self._event_too_large(exc, follow.last_cluster_time) from None
            raise MigrationError(
                f"cannot resume the source's change stream (code {exc.code}): {_server_message(exc)}") from None
        with stream:
            pipeline = _FlushPipeline(self, applier, follow, stream.resume_token)
            token_before = stream.resume_token
            # The cluster time of the last event read. follow.last_cluster_time is that of the last event
            # applied (it moves with the saved position): batch N+1 is read while batch N is written.
            read_time = follow.last_cluster_time
            try:
                while reason is None:
                    if time.monotonic() >= next_probe:
                        # Observed BEFORE the next getMore: an empty batch afterwards proves that every majority-
                        # committed write up to this time has been delivered.
                        latest, observed_majority = self._source_times()
                        next_probe = time.monotonic() + 1.0
                        if latest is not None and follow.last_cluster_time is not None:
                            lag = max(0.0, float(latest.time - follow.last_cluster_time.time))
                    if not fragments:  # the token before a whole event, not before its last fragment
                        token_before = stream.resume_token
                    try:
                        change = self._next_event(stream, fragments)
                    except OperationFailure as exc:
                        if exc.code in HISTORY_LOST_CODES:
                            raise self._history_lost(exc, _ts_list(follow.last_cluster_time)) from None
                        if exc.code == _BSON_OBJECT_TOO_LARGE:
                            raise self._event_too_large(exc, follow.last_cluster_time) from None
                        raise MigrationError(
                            f"the source's change stream failed (code {exc.code}): {_server_message(exc)}. The "
                            "saved resume token is unchanged: run catch_up again once the cause is fixed"
                        ) from None
                    if change is None and fragments:
                        continue  # part of a split event: never checkpoint in the middle of one
                    if change is not None:
                        if fence is not None and change["clusterTime"] > fence:
                            if not apply_after_fence:
                                pipeline.flush(_Position(token_before, read_time, applier.take_count()))
                                reason = "fence"
                                break
                            namespace = self._late_namespace(change)
                            if namespace is not None:
                                follow.late[namespace] = follow.late.get(namespace, 0) + 1
                        if change["operationType"] in _DDL_EVENTS:
                            # add() applies a DDL event at once, after the DML queued before it: the batch in
                            # flight must be on the target first.
                            pipeline.settle()
                        applied, is_ddl = applier.add(change)
                        read_time = change["clusterTime"]
                        if applied:
                            follow.last_event_at = time.monotonic()
                            progress.add(1, len(change.raw))
                        # Batch DML writes, but checkpoint a DDL event at once: replaying a rename after later
                        # events would be wrong. At least once a second, so stop conditions are checked.
                        # A flush takes at most one getMore's worth (the stream reads batch_size events per
                        # batch) and splits it over the lanes; flushing batch_size * apply_lanes instead was
                        # measured no faster (the target's upserts bound it) and would hold the checkpoint
                        # back and keep apply_lanes times the events in memory.
                        if not is_ddl and applier.pending < self.batch_size and time.monotonic() - last_flush < 1.0:
                            continue
                    else:
                        # Drained: every majority-committed write observed before this getMore is read, and is
                        # applied once the flush below returns.
                        if observed_majority is not None and (read_time is None or observed_majority > read_time):
                            read_time = observed_majority
                    position = _Position(stream.resume_token, read_time, applier.take_count())
                    if change is not None and not is_ddl:
                        # A full batch (or a second's worth): stop conditions see the batches applied so far
                        # (nothing in flight), then this batch is written while the loop reads the next one.
                        pipeline.settle()
                        reason = stop_reason(follow, lag, time.monotonic() - started)
                        if reason is None:
                            pipeline.start(position)
                        else:
                            pipeline.flush(position)  # stopping: everything read is applied and saved
                    else:
                        # An empty batch, or a DDL event (just applied with everything before it): what stop
                        # conditions see must include every event read, so write and save it all now.
                        pipeline.flush(position)
                        if change is None:
                            follow.caught_up_once = True
                            follow.caught_up_to = observed_majority
                            lag = 0.0
                        reason = stop_reason(follow, lag, time.monotonic() - started)
                    last_flush = time.monotonic()
                    if last_flush - last_lag_log >= self.log_interval:
                        last_lag_log = last_flush
                        self.log.info("live catch-up %s: %d events applied, lag %s, last applied cluster time %s",
                                      self.sync_id, follow.events, "?" if lag is None else f"{lag:.0f}s",
                                      _ts_list(follow.last_cluster_time))
            finally:
                pipeline.close()
                applier.close()
            token = pipeline.saved_token
        progress.finish()
        self.log.info("live catch-up %s: stopped (%s) after %d events, lag %s", self.sync_id, reason,
                      follow.events, "?" if lag is None else f"{lag:.0f}s")
        return CatchUpResult(follow.events, _ts_list(follow.last_cluster_time), lag, _token_to_json(token), reason,
                             dict(follow.late))

    @staticmethod
    def _next_event(stream: Any, fragments: list[RawBSONDocument]) -> RawBSONDocument | None:
        """The next whole event: fragments of a split event (``splitEvent: {fragment, of}``) are collected
        in ``fragments`` across calls and returned merged once the last one arrives."""
        change = stream.try_next()
        if change is None:
            return None
        split = change.get("splitEvent")
        if split is None or int(split.get("of") or 1) <= 1:
            return change
        fragments.append(change)
        if int(split["fragment"]) < int(split["of"]):
            return None
        return _merge_fragments(fragments)

    def _late_namespace(self, change: RawBSONDocument) -> str | None:
        """The selected namespace an event after the fence writes to (None: not a migrated namespace)."""
        ns = change.get("ns") or {}
        db, coll = ns.get("db"), ns.get("coll")
        if db is None or db == self.state_db or is_never_migrated(db):
            return None
        if coll is not None and not self._selected(db, coll):
            return None
        return f"{db}.{coll}" if coll else db

    def _event_too_large(self, exc: Exception, since: Timestamp | None) -> EventTooLarge:
        return EventTooLarge(
            f"live pull '{self.sync_id}' cannot continue: the source's change stream refused an event larger than "
            f"16 MiB after cluster time {_ts_list(since)} (code {_BSON_OBJECT_TOO_LARGE}: "
            # The server's message goes on with the event's first element, its resume token, which encodes the
            # document's _id: data that stays out of logs.
            f"{_server_message(exc).split(' First element')[0]}), and "
            "this source has no $changeStreamSplitLargeEvent stage (MongoDB 6.0.9+ or 7.0+). Retrying cannot get "
            "past it. Either upgrade the source to a release with the stage and restart the live pull with "
            "drop_target=true, or exclude the collection holding documents near 16 MiB (exclude_namespaces) and "
            "migrate it with dump/restore after cutover"
        )

    def _save_position(self, token: Mapping[str, Any] | None, cluster_time: Timestamp | None, applied: int) -> None:
        if token is None:
            return
        update: dict[str, Any] = {"$set": {"resume_token": token, "last_applied_cluster_time": cluster_time}}
        if applied:
            update["$inc"] = {"events_applied": applied}
        self._update_sync(update)

    # ------------------------------------------------------------------------------------------- lag
    def lag(self) -> LagInfo:
        """How far the target trails the source, from the saved position (no stream is opened)."""
        sync = self._require_sync()
        latest, _ = self._source_times()
        applied = sync.get("last_applied_cluster_time")
        lag = None if latest is None or applied is None else max(0.0, float(latest.time - applied.time))
        pending: int | None = None
        if applied is not None:
            from pymongo.errors import PyMongoError

            try:  # needs read access to local.oplog.rs; an estimate, so give up quickly
                pending = self.source.local["oplog.rs"].count_documents({"ts": {"$gt": applied}}, maxTimeMS=2000)
            except PyMongoError:
                pending = None
        return LagInfo(_ts_list(latest), _ts_list(applied), lag, pending)

    def oplog_window_hours(self) -> float | None:
        """Hours between the oldest and newest entries of the source's oplog (None when unreadable)."""
        from pymongo.errors import PyMongoError

        from atlas_migration.inspection import read_oplog_window_hours

        try:
            return read_oplog_window_hours(self.source)
        except PyMongoError:
            return None

    def estimate_copy_seconds(self, docs_per_second: float) -> float:
        """Seconds the initial copy should take at ``docs_per_second`` (from the plan, or from counts)."""
        if docs_per_second <= 0:
            raise ConfigurationError("docs_per_second must be positive")
        sync = self._sync_doc()
        if sync is not None and sync.get("planned"):
            documents = sum(p.documents_estimate for p in self._stored_partitions())
        else:
            documents = sum(self.source[db][info["name"]].estimated_document_count()
                            for db, info in self._selected_collections() if info.get("type") != "view")
        return documents / docs_per_second

    # ----------------------------------------------------------------------------------------- cutover
    def cutover(self, fence: Fence, *, grace_seconds: float = 5.0, timeout: float = 300.0,
                verifier: Any = None) -> CatchUpResult:
        r"""Application writes are fenced (``fence``: blocked on the source, or stated stopped by an
        operator): prove every write acknowledged before the fence is on the target, then mark the sync
        complete.

        1. wait until the fence's op time is majority-committed on the source;
        2. apply every event up to the fence (the stream is drained once an empty batch follows a majority
           point at or past the fence);
        3. keep following for ``grace_seconds``: an event after the fence on a migrated namespace is a late
           write. Late writes are applied (the sync keeps running, nothing is lost) and the cutover fails
           with ``LateWrites`` naming the namespaces and counts; the fence is recorded with them;
        4. re-read every recheck-set document from the source (updates whose lookup found nothing) and
           write it (or delete it) on the target;
        5. build the deferred unique indexes and align indexes and views, then check once more that nothing
           arrived after the fence;
        6. with a ``verifier`` (``engines.verifier.LiveVerifier``): recheck every queued ``_id`` until source
           and target agree; a document still unequal after the fence (changed on the target behind the
           engine's back, say) is re-read from the source and written, then rechecked; what stays unequal
           fails the cutover with the namespaces, ``_id``\ s and fields;
        7. mark the sync complete, with the fence.

        (``drain_to`` is the other way to stop at a point: a commit point, as mongosync's /commit has, after
        which nothing is applied.)
        """
        from atlas_migration.fence import LateWrites, late_writes_message, wait_majority_committed

        sync = self._require_sync("copy_finished")
        if sync.get("completed_at"):
            self.log.info("live pull %s: already cut over at %s", self.sync_id, sync["completed_at"])
            return CatchUpResult(0, _ts_list(sync.get("last_applied_cluster_time")), 0.0,
                                 _token_to_json(sync.get("resume_token")), "complete", fence=sync.get("fence"),
                                 rechecked=int(sync.get("rechecks_applied") or 0))
        self._update_sync({"$set": {"fence": fence.to_dict()}})
        started = time.monotonic()
        wait_majority_committed(self.source, fence, timeout=timeout)
        point = fence.timestamp
        grace = grace_seconds
        reached_at: list[float] = []

        def drained(follow: _Follow, lag: float | None, elapsed: float) -> str | None:
            reached = (follow.caught_up_to is not None and follow.caught_up_to >= point) or (
                follow.last_cluster_time is not None and follow.last_cluster_time > point)
            if reached and not reached_at:
                reached_at.append(time.monotonic())
            if reached_at and time.monotonic() - reached_at[0] >= grace:
                return "fence"
            if time.monotonic() - started >= timeout:
                return "max_seconds"
            return None

        result = self._follow(drained, fence=point)
        if result.stopped_because == "max_seconds":
            raise MigrationError(
                f"cutover of live pull '{self.sync_id}': the change stream was not drained up to the fence (op time "
                f"{fence.op_time}) within {timeout:.0f} s ({result.events_applied} events applied). The sync was not "
                "marked complete; run cutover again (the fence stands)")
        late = dict(result.late_writes)
        if late:
            fence.late_writes = late
            self._update_sync({"$set": {"fence": fence.to_dict()}})
            raise LateWrites(late_writes_message(late, fence, what=f"cutover of live pull '{self.sync_id}'"), late)
        rechecked = self.apply_rechecks()
        self._align_with_source()
        # Index builds take time: nothing may have been written after the fence meanwhile.
        tail = self._follow(lambda f, lag, elapsed: "quiet" if f.caught_up_once else None, fence=point)
        if tail.late_writes:
            fence.late_writes = dict(tail.late_writes)
            self._update_sync({"$set": {"fence": fence.to_dict()}})
            raise LateWrites(late_writes_message(tail.late_writes, fence,
                                                 what=f"cutover of live pull '{self.sync_id}'"), tail.late_writes)
        if verifier is not None:
            rechecked += self._verify_at_fence(verifier)
        self._update_sync({"$set": {"completed_at": _utc_now(), "status": "complete", "fence": fence.to_dict(),
                                    "rechecks_applied": rechecked}})
        self.log.info("live pull %s: cut over at the fence (%s); every write acknowledged before it is on the "
                      "target%s", self.sync_id, fence.describe(),
                      f"; {rechecked} document(s) re-read from the source" if rechecked else "")
        return CatchUpResult(result.events_applied + tail.events_applied, tail.last_applied_cluster_time, 0.0,
                             tail.resume_token, "fence", {}, fence.to_dict(), rechecked)

    def stored_fence(self) -> Fence | None:
        """The fence an earlier cutover attempt of this sync placed (None: none yet)."""
        doc = self._require_sync()
        return Fence.from_dict(doc["fence"]) if doc.get("fence") else None

    def _verify_at_fence(self, verifier: Any, max_repairs: int = 3) -> int:
        """Recheck until clean; repair what stays unequal from the source (at most ``max_repairs`` rounds).
        Returns the number of documents repaired."""
        repaired = 0
        for round_ in range(max_repairs + 1):
            result = verifier.recheck()
            self.log.info("verifier at the fence: generation %d compared %d, %d unequal, %d open, %d pending",
                          result.generation, result.compared, result.mismatches, result.open_mismatches,
                          result.pending)
            if result.clean:
                return repaired
            keys = list(verifier.open_mismatch_keys())
            if round_ == max_repairs or (not keys and not result.pending):
                break
            if keys:
                self.log.warning("verifier at the fence: %d document(s) differ on the target (%s); re-reading them "
                                 "from the source", len(keys), ", ".join(
                                     f"{m['ns']} _id {json.dumps(m['_id'])} field {m['field']}"
                                     for m in verifier.open_mismatches(5)))
                for start in range(0, len(keys), self.batch_size):
                    self._recheck.bulk_write([self.recheck_op(db, coll, doc_id, "verifier_mismatch")
                                              for db, coll, doc_id in keys[start:start + self.batch_size]],
                                             ordered=False)
                repaired += self.apply_rechecks()
        first = verifier.open_mismatches(10)
        raise MigrationError(
            f"cutover of live pull '{self.sync_id}': the verifier still finds source and target different after the "
            f"fence: " + "; ".join(f"{m['ns']} _id {json.dumps(m['_id'])} (field {m['field']}, missing on "
                                  f"{m['missing'] or 'neither side'})" for m in first)
            + ". The sync was not marked complete")

    # ------------------------------------------------------------------------------------- recheck set
    @property
    def _recheck(self) -> Collection:
        from pymongo import WriteConcern

        return self.target[self.state_db].get_collection(RECHECK_COLLECTION, write_concern=WriteConcern("majority"))

    def recheck_key(self, db: str, coll: str, doc_id: Any) -> SON:
        return SON([("sync_id", self.sync_id), ("db", db), ("coll", coll), ("id", doc_id)])

    def recheck_op(self, db: str, coll: str, doc_id: Any, reason: str) -> Any:
        """The write that queues (db, coll, _id) in the recheck set, with why."""
        from pymongo import UpdateOne

        return UpdateOne({"_id": self.recheck_key(db, coll, doc_id)},
                         {"$set": {"reason": reason, "at": _utc_now()}}, upsert=True)

    def pending_rechecks(self) -> int:
        return self._recheck.count_documents({"_id.sync_id": self.sync_id})

    def move_rechecks(self, db: str, coll: str, to_db: str, to_coll: str) -> None:
        """A rename was replayed: queued rechecks follow the documents to their new namespace."""
        from pymongo import DeleteOne, UpdateOne

        ops: list[Any] = []
        for entry in self._recheck.find({"_id.sync_id": self.sync_id, "_id.db": db, "_id.coll": coll}):
            ops.append(UpdateOne({"_id": self.recheck_key(to_db, to_coll, entry["_id"]["id"])},
                                 {"$setOnInsert": {k: v for k, v in entry.items() if k != "_id"}}, upsert=True))
            ops.append(DeleteOne({"_id": entry["_id"]}))
        if ops:
            self._recheck.bulk_write(ops, ordered=True)

    def apply_rechecks(self) -> int:
        """Re-read every recheck-set document from the source (primary, majority: the fence has passed, so the
        source holds its final state) and write it to the target, or delete it there when the source has none.
        Whatever made its update's lookup come back empty, the target then equals the source. Returns the
        number of documents re-read."""
        from pymongo import DeleteOne, ReplaceOne

        done = 0
        while True:
            entries = list(self._recheck.find({"_id.sync_id": self.sync_id}).limit(self.batch_size))
            if not entries:
                break
            by_ns: dict[tuple[str, str], list[Any]] = {}
            for entry in entries:
                by_ns.setdefault((entry["_id"]["db"], entry["_id"]["coll"]), []).append(entry["_id"]["id"])
            for (db, coll), ids in by_ns.items():
                # Keyed by the canonical _id: $in matches 7.0 for 7 (numbers of any type with equal values
                # are one _id), and the document found must be written, not taken for gone.
                found = {_id_key(doc["_id"]): doc for doc in self._copy_source(db, coll).find({"_id": {"$in": ids}})}
                ops = []
                for doc_id in ids:
                    doc = found.get(_id_key(doc_id))
                    ops.append(ReplaceOne({"_id": doc_id}, doc, upsert=True) if doc is not None
                               else DeleteOne({"_id": doc_id}))
                target = self._target_collection(self._target_db(db), coll)
                if self.target[self._target_db(db)].list_collection_names(filter={"name": coll}) or found:
                    target.bulk_write(ops, ordered=True, bypass_document_validation=True)
                self.log.info("recheck %s.%s: %d document(s) re-read from the source (%d present, %d gone)", db, coll,
                              len(ids), len(found), len(ids) - len(found))
            self._recheck.delete_many({"_id": {"$in": [entry["_id"] for entry in entries]}})
            done += len(entries)
        return done

    def _align_with_source(self) -> None:
        """Make every selected namespace's collection, view and index set on the target match the source.

        The stream has delivered every DDL event, but a pre-6.0 source reports none of index changes, and
        unique indexes were deferred until now.
        """
        from pymongo.errors import OperationFailure

        for db, info in self._selected_collections():
            name = info["name"]
            database = self.target[self._target_db(db)]
            existing = _collection_info(database, name)
            if info.get("type") == "view":
                continue
            if existing is None:
                _create_collection(database, name, CollectionMetadata.from_collection_info(info, []))
            elif dict(existing.get("options") or {}) != dict(info.get("options") or {}):
                self.log.warning("%s.%s: collection options differ from the source's (%s vs %s)",
                                 database.name, name, existing.get("options"), info.get("options"))
            wanted = {s["name"]: s for s in index_specs_for_restore(self.source[db][name].list_indexes())}
            have = {s["name"]: s for s in index_specs_for_restore(database[name].list_indexes())}
            for index_name, spec in have.items():
                if index_name not in wanted or _normalised_index(spec) != _normalised_index(wanted[index_name]):
                    database[name].drop_index(index_name)  # gone on the source, or redefined there
            missing = [spec for n, spec in wanted.items()
                       if n not in have or _normalised_index(have[n]) != _normalised_index(spec)]
            if missing:
                try:
                    database.command(SON([("createIndexes", name), ("indexes", missing)]))
                except OperationFailure as exc:
                    raise MigrationError(
                        f"cannot build indexes {[s['name'] for s in missing]} on {database.name}.{name} at cutover "
                        f"(code {exc.code}): {str(exc)[:300]}"
                    ) from None
                self.log.info("%s.%s: built %s", database.name, name, ", ".join(s["name"] for s in missing))
        self._create_views()


# ------------------------------------------------------------------------------------- event application
@dataclass
class _Batch:
    """The queued writes of one flush, taken out of ``_EventApplier`` so the next batch can be queued while
    this one is written."""

    ops: dict[tuple[str, str], dict[int, list[Any]]]
    rechecks: list[Any]
    changed: list[tuple[str, str, Any]]


def _counted(resolved: list[tuple[Any, Any]]) -> int:
    """How many of these writes report one matched or upserted document each (replaces and updates)."""
    from pymongo import ReplaceOne, UpdateOne

    return sum(1 for op, _ in resolved if isinstance(op, ReplaceOne | UpdateOne))


@dataclass(frozen=True)
class _Lookup:
    """A queued update of (source db, coll, _id) replayed as the document the source holds when the lane is
    written (what ``updateLookup`` returns, read in one query per lane): its description is not exact, or the
    target's version of the document may be later than the one the update was made to."""

    db: str
    coll: str
    doc_id: Any
    cluster_time: Timestamp | None = None


@dataclass(frozen=True)
class _Delta:
    """A queued update replayed from its ``updateDescription`` (``update``), if the target holds the very
    version of the document it was made to when the lane is written; otherwise it becomes a ``_Lookup``."""

    db: str
    coll: str
    doc_id: Any
    update: Mapping[str, Any]
    cluster_time: Timestamp

    def lookup(self) -> _Lookup:
        return _Lookup(self.db, self.coll, self.doc_id, self.cluster_time)


@dataclass
class _Position:
    """Where the change stream stands after a batch: saved once every event before it is on the target."""

    token: Mapping[str, Any] | None
    cluster_time: Timestamp | None
    applied: int  # events of the batch counted in the sync's events_applied


class _FlushPipeline:
    """Writes ``_follow``'s batches to the target one at a time, in stream order, each in a background thread
    while the loop reads the next batch from the source (reading and writing load different servers).

    Only ever one batch is in flight, so each document's writes still reach the target in stream order. A
    batch's position (resume token, cluster time, count) is saved by ``settle`` once all of its writes have
    completed, never earlier: the saved token never covers an event that is not applied. A failed batch
    raises its first failure from ``settle`` and its position is not saved (the previous one stays).
    ``follow.events`` and ``follow.last_cluster_time`` move with the saved position, so they describe what
    is applied, which is what stop conditions and the ``CatchUpResult`` are about.
    """

    def __init__(self, sync: LiveSync, applier: _EventApplier, follow: _Follow,
                 token: Mapping[str, Any] | None) -> None:
        self.sync, self.applier, self.follow = sync, applier, follow
        self.saved_token = token
        self.flushes = 0
        self._inflight: tuple[Future[None], _Position] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"live-flush-{sync.sync_id}")

    def start(self, position: _Position) -> None:
        """Start writing everything queued in the background; ``position`` is saved once it is written."""
        self.settle()  # the previous batch first: flushes never overlap one another
        self._inflight = (self._thread.submit(self.applier.write, self.applier.take_batch()), position)

    def settle(self) -> None:
        """Wait for the batch in flight, if any, and save its position (or raise its failure)."""
        if self._inflight is None:
            return
        future, position = self._inflight
        self._inflight = None
        future.result()
        self._saved(position)

    def flush(self, position: _Position) -> None:
        """Write everything queued, after the batch in flight, in this thread; then save ``position``."""
        self.settle()
        self.applier.flush()
        self._saved(position)

    def _saved(self, position: _Position) -> None:
        self.flushes += 1
        if self.sync.fault_hook is not None:
            self.sync.fault_hook("catch_up", self.flushes)
        self.sync._save_position(position.token, position.cluster_time, position.applied)
        if position.token is not None:
            self.saved_token = position.token
        self.follow.events += position.applied
        self.follow.last_cluster_time = position.cluster_time

    def close(self) -> None:
        """Leave nothing writing behind the caller, also when it leaves by an exception: wait for the batch in
        flight without saving its position (its events are replayed from the saved token, idempotently)."""
        if self._inflight is not None:
            future, _ = self._inflight
            self._inflight = None
            if future.exception() is not None:  # waits; the exception already on its way out is the one raised
                self.sync.log.warning("live catch-up %s: a batch in flight failed too: %s", self.sync.sync_id,
                                      future.exception())
        self._thread.shutdown(wait=True)


class _EventApplier:
    """Turns change events into target writes: DML batched per namespace and lane (ordered), DDL applied at once.

    Each namespace's queued DML is split into ``sync.apply_lanes`` lanes by ``apply_lane(_id)``; ``flush``
    applies every (namespace, lane) as one ordered bulk write, at most ``apply_lanes`` at once. All writes of
    one document are in one lane, in stream order, so the document ends in the source's state; writes of
    different documents are independent (each is keyed by its own ``_id``), so their relative order does not
    matter. A namespace whose collection has a default collation is kept in one lane: ``_id`` strings equal
    under the collation are one document there, and ``apply_lane`` compares strings byte-wise.
    """

    def __init__(self, sync: LiveSync, state: Mapping[str, Any]) -> None:
        self.sync = sync
        self.copy_finished_at: Timestamp | None = state.get("copy_finished_cluster_time")
        # A sync started before update_apply existed has updateLookup events: it keeps them.
        self.delta = state.get("update_apply") == "delta"
        # Delta mode. Replaying an update's description on a LATER version of its document converges the
        # values but not always the field order (a field the later version already holds keeps its place
        # where the source appended it), so a delta is only written to the version it was made to. Every
        # update up to lookup_until is replayed as a lookup instead: the copy read each document at some
        # time up to copy_finished_cluster_time, and _follow raises it to the source's latest write when it
        # starts, which covers what an earlier, interrupted catch-up may have written past its saved
        # position (lanes of a failed batch, lookups). _ahead_until holds the same bound per document for
        # the lookups of this catch-up: (namespace, _id key) -> the source's cluster time after the read.
        self.lookup_until: Timestamp | None = state.get("copy_finished_cluster_time")
        self._ahead_until: dict[tuple[tuple[str, str], bytes], Timestamp] = {}
        # (target db, collection) -> lane -> ops in stream order
        self._ops: dict[tuple[str, str], dict[int, list[Any]]] = {}
        # (target db, collection) -> lanes it is split into (1: collated); forgotten after each DDL event
        self._lanes: dict[tuple[str, str], int] = {}
        self._rechecks: list[Any] = []
        self._changed: list[tuple[str, str, Any]] = []
        self.pending = 0
        self._applied = 0
        # One pool for the lanes of every flush of this catch-up (created on first use, ended by close()):
        # starting threads per flush cost a little on every batch.
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        """End the lanes' threads (waits for none: every flush waits for its own lanes)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def take_count(self) -> int:
        count, self._applied = self._applied, 0
        return count

    def add(self, event: RawBSONDocument) -> tuple[bool, bool]:
        """Queue or apply one event; returns (on a selected namespace, was DDL)."""
        from pymongo import DeleteOne, ReplaceOne

        op = event["operationType"]
        ns = event.get("ns") or {}
        db, coll = ns.get("db"), ns.get("coll")
        if op in _DML_EVENTS:
            if not self.sync._selected(db, coll):
                return False, False
            doc_id = event["documentKey"]["_id"]
            key = (self.sync._target_db(db), coll)
            if op == "delete":
                self._queue(key, doc_id, DeleteOne({"_id": doc_id}))
            elif op == "update" and self.delta:
                update = update_from_description(event.get("updateDescription"))
                if update is None:  # a path that is not exact: the document is read from the source
                    self._queue(key, doc_id, _Lookup(db, coll, doc_id, event["clusterTime"]))
                elif update:
                    self._queue(key, doc_id, _Delta(db, coll, doc_id, update, event["clusterTime"]))
                # else: an update that changed nothing (no field in its description) has nothing to replay
            else:
                document = event.get("fullDocument")
                if document is not None and not _same_id(document.get("_id"), doc_id):
                    # The lookup found a document whose _id is equal but not identical: deleted and
                    # re-inserted as another number type (7 -> 7.0) or, in a collated collection, in another
                    # case. Replaying it as a replace of this _id would alter the target's _id (mongod
                    # refuses that for a collation variant, the test server for a number type): the later
                    # delete and insert events carry the change; the recheck set re-reads it at cutover.
                    document = None
                if document is None:
                    # updateLookup found nothing. Usually a later delete follows, but a rename, a document
                    # moved to another shard, or a lookup racing a later write can cause it too: the update
                    # is not skipped but queued in the recheck set, and at cutover (after the fence) the
                    # document is re-read from the source and written as it is there.
                    self._queue_recheck(db, coll, doc_id)
                    self._changed.append((db, coll, doc_id))
                    self._applied += 1
                    return True, False
                self._queue(key, doc_id, ReplaceOne({"_id": doc_id}, document, upsert=True))
            self._changed.append((db, coll, doc_id))
            self._applied += 1
            return True, False
        if op in _DDL_EVENTS:
            self.flush()
            self._lanes.clear()  # a drop, create or rename may change a namespace's collation
            applied = self._apply_ddl(op, event, db, coll)
            if applied:
                self._applied += 1
            return applied, True
        if op in _PLACEMENT_EVENTS:
            self.sync.log.debug("ignoring %s event on %s.%s (data placement only)", op, db, coll)
            return False, False
        if op == "invalidate":
            raise HistoryLost(
                f"live pull '{self.sync.sync_id}': the source's change stream was invalidated; restart the live "
                "pull from scratch with drop_target=true"
            )
        raise UnsafeDDL(
            f"unrecognised change event '{op}' on {db}.{coll}: refusing to continue rather than skip a change "
            "this version does not understand. Upgrade this package, or restart the live pull after the change"
        )

    def _queue_recheck(self, db: str, coll: str, doc_id: Any) -> None:
        self._rechecks.append(self.sync.recheck_op(db, coll, doc_id, "null_lookup"))
        self.pending += 1

    def _lanes_of(self, key: tuple[str, str]) -> int:
        lanes = self._lanes.get(key)
        if lanes is None:
            lanes = self.sync.apply_lanes
            if lanes > 1:
                info = _collection_info(self.sync.target[key[0]], key[1])
                if info is not None and (info.get("options") or {}).get("collation"):
                    lanes = 1
            self._lanes[key] = lanes
        return lanes

    def _queue(self, key: tuple[str, str], doc_id: Any, op: Any) -> None:
        lane = apply_lane(doc_id, self._lanes_of(key))
        self._ops.setdefault(key, {}).setdefault(lane, []).append(op)
        self.pending += 1

    def _write_lane(self, key: tuple[str, str], ops: list[Any]) -> list[Any]:
        """Write one lane's ops as ordered bulk writes; returns the recheck-set writes the lane calls for.

        In "delta" mode the lane also holds ``_Delta`` and ``_Lookup`` placeholders. A delta whose document may
        be at a later version on the target (``_exact``) becomes a lookup; lookups are read from the source in
        one query per namespace (primary, majority, as the copy reads). A delta the target still refuses is
        replaced the same way, and the lane goes on from there. A delta that matched no document is queued
        in the recheck set, as an empty lookup is: usually a later delete follows, and the recheck at cutover
        costs one read when it does not."""
        from pymongo.errors import BulkWriteError

        collection = self.sync._target_collection(*key)
        rechecks: list[Any] = []
        pending = self._exact(key, ops) if self.delta else ops
        expected = matched = 0  # replaces and deltas written, and how many of them matched or upserted
        deltas_written: list[_Delta] = []
        while pending:
            resolved = self._resolved(key, pending, rechecks)  # (pymongo op, what it was queued as)
            if not resolved:  # only lookups of documents the source no longer has: rechecks
                break
            try:
                result = collection.bulk_write([op for op, _ in resolved], ordered=True,
                                               bypass_document_validation=True)
            except BulkWriteError as exc:
                first = (exc.details.get("writeErrors") or [{}])[0]
                index = int(first.get("index") or 0)
                queued = resolved[index][1] if index < len(resolved) else None
                if (isinstance(queued, _Delta) and first.get("code") != _DUPLICATE_KEY
                        and not exc.details.get("writeConcernErrors")):
                    expected += _counted(resolved[:index])
                    matched += int(exc.details.get("nMatched") or 0) + int(exc.details.get("nUpserted") or 0)
                    deltas_written += [q for _, q in resolved[:index] if isinstance(q, _Delta)]
                    self.sync.log.debug("live catch-up %s: %s refused a replayed update of _id %r (code %s): the "
                                        "document is read from the source", self.sync.sync_id, collection.full_name,
                                        queued.doc_id, first.get("code"))
                    refused = _id_key(queued.doc_id)
                    pending = [q.lookup() if isinstance(q, _Delta) and _id_key(q.doc_id) == refused else q
                               for _, q in resolved[index:]]
                    continue
                hint = (" A unique index on the target rejected a replayed write: unique indexes are only "
                        "built at cutover, so writes have continued after it; stop them and retry."
                        if first.get("code") == _DUPLICATE_KEY else "")
                raise MigrationError(
                    f"applying change events to {collection.full_name} failed (code {first.get('code')}): "
                    f"{str(first.get('errmsg'))[:300]}.{hint} The resume token was not advanced"
                ) from None
            if result is not None:
                expected += _counted(resolved)
                matched += result.matched_count + result.upserted_count
            deltas_written += [q for _, q in resolved if isinstance(q, _Delta)]
            break
        if deltas_written and matched < expected:
            rechecks.extend(self._unmatched_deltas(collection, deltas_written))
        return rechecks

    def _exact(self, key: tuple[str, str], ops: list[Any]) -> list[Any]:
        """``ops`` with every ``_Delta`` whose document may be at a later version on the target turned into a
        ``_Lookup``: up to ``lookup_until``, up to the cluster time of a lookup of the same document by an
        earlier batch, and after a lookup of it earlier in this lane. A full document (insert, replace) or a
        delete leaves the target at that event's exact version, so deltas after it are exact again."""
        from pymongo import DeleteOne, ReplaceOne

        ahead: set[bytes] = set()
        out: list[Any] = []
        for op in ops:
            if isinstance(op, _Delta):
                doc_key = _id_key(op.doc_id)
                until = self._ahead_until.get((key, doc_key))
                if (doc_key in ahead or (self.lookup_until is not None and op.cluster_time <= self.lookup_until)
                        or (until is not None and op.cluster_time <= until)):
                    op = op.lookup()
            if isinstance(op, _Lookup):
                ahead.add(_id_key(op.doc_id))
            elif isinstance(op, ReplaceOne | DeleteOne):
                ahead.discard(_id_key(op._filter["_id"]))
            out.append(op)
        return out

    def _resolved(self, key: tuple[str, str], ops: list[Any], rechecks: list[Any]) -> list[tuple[Any, Any]]:
        """Each op to write, paired with what it was queued as: a ``_Delta`` becomes its ``UpdateOne``, and a
        ``_Lookup`` an upserting replace by the document as the source holds it now, or nothing (and a
        recheck) when the source has no document of that very ``_id``. Records, per document, the source's
        cluster time after the read: until the stream passes it, the target may hold a later version."""
        from pymongo import DeleteOne, ReplaceOne, UpdateOne

        wanted: dict[tuple[str, str], list[Any]] = {}
        for op in ops:
            if isinstance(op, _Lookup):
                wanted.setdefault((op.db, op.coll), []).append(op.doc_id)
        found: dict[tuple[str, str], dict[bytes, RawBSONDocument]] = {}
        read_until: Timestamp | None = None
        for (db, coll), ids in wanted.items():
            with self.sync.source.start_session(causal_consistency=False) as session:
                cursor = self.sync._copy_source(db, coll).find({"_id": {"$in": ids}}, session=session)
                found[(db, coll)] = {_id_key(doc["_id"]): doc for doc in cursor}
                cluster = (session.cluster_time or {}).get("clusterTime")
            if cluster is None:  # no gossiped cluster time: the latest write, read after the lookup
                cluster, _ = self.sync._source_times()
            if cluster is not None and (read_until is None or cluster > read_until):
                read_until = cluster
        out: list[tuple[Any, Any]] = []
        for op in ops:
            if isinstance(op, _Delta):
                out.append((UpdateOne({"_id": op.doc_id}, op.update), op))
                continue
            if not isinstance(op, _Lookup):
                if isinstance(op, ReplaceOne | DeleteOne) and self._ahead_until:
                    self._ahead_until.pop((key, _id_key(op._filter["_id"])), None)
                out.append((op, op))
                continue
            doc_key = _id_key(op.doc_id)
            if read_until is not None:
                self._ahead_until[(key, doc_key)] = read_until
            document = found[(op.db, op.coll)].get(doc_key)
            if document is None or not _same_id(document.get("_id"), op.doc_id):
                # Gone (a later delete follows), renamed, or re-inserted as another type: as for an empty
                # updateLookup, the recheck at cutover re-reads it.
                rechecks.append(self.sync.recheck_op(op.db, op.coll, op.doc_id, "null_lookup"))
                continue
            out.append((ReplaceOne({"_id": op.doc_id}, document, upsert=True), op))
        if len(self._ahead_until) > _AHEAD_MARKS_KEPT and ops:
            # Marks older than this batch's events can no longer matter: the stream has passed them.
            times = [op.cluster_time for op in ops if isinstance(op, _Delta | _Lookup) and op.cluster_time]
            if times:
                oldest = min(times)
                for mark in [m for m, until in self._ahead_until.items() if until < oldest]:
                    self._ahead_until.pop(mark, None)
        return out

    def _unmatched_deltas(self, collection: Collection, deltas: list[_Delta]) -> list[Any]:
        ids = [delta.doc_id for delta in deltas]
        present = {_id_key(doc["_id"]) for doc in collection.find({"_id": {"$in": ids}}, {"_id": 1})}
        return [self.sync.recheck_op(delta.db, delta.coll, delta.doc_id, "unmatched_update") for delta in deltas
                if _id_key(delta.doc_id) not in present]

    def flush(self) -> None:
        """Apply every queued write; returns once all of them are on the target (or raises)."""
        self.write(self.take_batch())

    def take_batch(self) -> _Batch:
        """Take every queued write out of the applier, which starts an empty queue (for the next batch, read
        while this one is written). The count of applied events stays (``take_count``): the caller takes it
        with the resume token that covers them."""
        batch = _Batch(self._ops, self._rechecks, self._changed)
        self._ops, self._rechecks, self._changed = {}, [], []
        self.pending = 0
        return batch

    def write(self, batch: _Batch) -> None:
        """Apply one batch taken by ``take_batch``; returns once all of it is on the target (or raises).

        Lanes run concurrently (pymongo's MongoClient is thread-safe). When one fails, the others still run
        to their end before the first failure in (namespace, lane) order is raised: nothing is left in
        flight behind a failed flush. The caller saves the resume token only after ``write`` returns, so a
        failed flush is replayed from the previous token in full, including the lanes that succeeded. That is
        safe because every write is idempotent by ``_id`` (an upserting replace of the looked-up document, a
        delete): writing a lane's changes again leaves its documents as the replay's last change says.
        """
        jobs = [(key, ops) for key, lanes in batch.ops.items() for _, ops in sorted(lanes.items())]
        rechecks = list(batch.rechecks)
        if len(jobs) == 1 or self.sync.apply_lanes == 1:
            for key, ops in jobs:  # in the caller's thread, one namespace after another (apply_lanes=1)
                rechecks.extend(self._write_lane(key, ops) or [])
        elif jobs:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.sync.apply_lanes,
                                                thread_name_prefix=f"live-apply-{self.sync.sync_id}")
            futures = [self._pool.submit(self._write_lane, key, ops) for key, ops in jobs]
            wait(futures)  # every lane finished, failed or not, before anything is raised
            for future in futures:
                error = future.exception()
                if error is not None:
                    raise error
            for future in futures:
                rechecks.extend(future.result() or [])
        # Rechecks and the listener follow the DML of the whole flush, as they did before lanes.
        if rechecks:
            # Written before the resume token moves past these events (the caller saves it after write).
            self.sync._recheck.bulk_write(rechecks, ordered=False)
        if batch.changed and self.sync.changed_listener is not None:
            self.sync.changed_listener(batch.changed)

    # -------------------------------------------------------------------------------------------- DDL
    def _during_copy(self, event: RawBSONDocument) -> bool:
        return self.copy_finished_at is None or event["clusterTime"] <= self.copy_finished_at

    def _apply_ddl(self, op: str, event: RawBSONDocument, db: str | None, coll: str | None) -> bool:
        from pymongo.errors import OperationFailure

        sync = self.sync
        if op == "dropDatabase":
            return False  # preceded by one drop event per collection, applied one by one
        if op == "rename":
            return self._rename(event, db, coll)
        if db is None or coll is None or not sync._selected(db, coll):
            return False
        database = sync.target[sync._target_db(db)]
        description = dict(event.get("operationDescription") or {})
        if op == "drop":
            database.drop_collection(coll)
        elif op == "create":
            self._create(database, coll, description, event.get("nsType"))
        elif op == "createIndexes":
            specs = index_specs_for_restore(description.get("indexes") or [])
            deferred = [s["name"] for s in specs if s.get("unique")]
            build = [s for s in specs if not s.get("unique")]
            if deferred:
                sync.log.info("%s.%s: unique index(es) %s will be built at cutover", database.name, coll, deferred)
            if build:
                try:
                    database.command(SON([("createIndexes", coll), ("indexes", build)]))
                except OperationFailure as exc:
                    if exc.code not in _INDEX_CONFLICT_CODES:
                        raise MigrationError(f"cannot create index(es) on {database.name}.{coll}: {exc}") from None
                    # A replayed build whose name now has another definition: later events and the
                    # alignment at cutover settle it.
                    sync.log.warning("%s.%s: index conflict while replaying createIndexes: %s", database.name,
                                     coll, str(exc)[:200])
        elif op == "dropIndexes":
            for spec in description.get("indexes") or []:
                try:
                    database[coll].drop_index(spec["name"])
                except OperationFailure as exc:
                    if exc.code not in (_INDEX_NOT_FOUND, _NAMESPACE_NOT_FOUND):
                        raise MigrationError(
                            f"cannot drop index {spec['name']} on {database.name}.{coll}: {exc}") from None
        elif op == "modify":
            self._modify(database, coll, description)
        return True

    def _create(self, database: Database, coll: str, description: dict[str, Any], ns_type: str | None) -> None:
        if ns_type == "timeseries" or "timeseries" in description:
            raise UnsafeDDL(
                f"time-series collection {database.name}.{coll} was created on the source: change streams do "
                "not report time-series writes, so it cannot be migrated live. Exclude it and migrate it with "
                "dump/restore"
            )
        options = {k: v for k, v in description.items() if k not in ("idIndex", "viewPipeline")}
        if "viewOn" in description:
            # mongod reports a view's stages as "pipeline"; SecantusDB as "viewPipeline".
            options["pipeline"] = description.get("pipeline", description.get("viewPipeline", []))
        existing = _collection_info(database, coll)
        if existing is not None:
            return  # created by prepare_targets, an earlier replay of this event, or an implicit upsert
        _create_collection(database, coll, CollectionMetadata(collection_name=coll, options=options))

    def _modify(self, database: Database, coll: str, description: dict[str, Any]) -> None:
        from pymongo.errors import OperationFailure

        description.pop("stateBeforeChange", None)
        if "viewPipeline" in description:
            description.setdefault("pipeline", description.pop("viewPipeline"))
        index = description.get("index")
        if isinstance(index, Mapping) and (index.get("unique") or index.get("prepareUnique")):
            self.sync.log.info("%s.%s: unique conversion of index %s applied at cutover", database.name, coll,
                               index.get("name") or index.get("keyPattern"))
            return
        if not description:
            return
        try:
            database.command(SON([("collMod", coll), *description.items()]))
        except OperationFailure as exc:
            if exc.code in (_NAMESPACE_NOT_FOUND, _INDEX_NOT_FOUND):
                return  # dropped later in the stream, or a deferred unique index: cutover aligns it
            raise UnsafeDDL(
                f"cannot replay collMod {sorted(description)} on {database.name}.{coll} (code {exc.code}): "
                f"{str(exc)[:300]}. Apply the change on the target by hand, then run catch_up again"
            ) from None

    def _rename(self, event: RawBSONDocument, db: str | None, coll: str | None) -> bool:
        from pymongo.errors import OperationFailure

        sync = self.sync
        to = event.get("to") or (event.get("operationDescription") or {}).get("to") or {}
        to_db, to_coll = to.get("db"), to.get("coll")
        from_selected = db is not None and coll is not None and sync._selected(db, coll)
        to_selected = to_db is not None and to_coll is not None and sync._selected(to_db, to_coll)
        if not from_selected and not to_selected:
            return False
        if self._during_copy(event):
            raise UnsafeDDL(
                f"{db}.{coll} was renamed to {to_db}.{to_coll} during the initial copy: the copy may hold either "
                "name's documents, so replaying the rename cannot be trusted. Restart the live pull from scratch "
                "with drop_target=true (and avoid renames until cutover)"
            )
        if not from_selected:
            raise UnsafeDDL(
                f"{db}.{coll} (not migrated) was renamed to {to_db}.{to_coll} (migrated): its documents were never "
                "copied. Include both namespaces and restart the live pull from scratch with drop_target=true"
            )
        source_db = sync.target[sync._target_db(db)]
        if not to_selected:
            sync.log.warning("%s.%s was renamed to %s.%s, which is not migrated: dropping it on the target",
                             db, coll, to_db, to_coll)
            source_db.drop_collection(coll)
            return True
        dest_db = sync.target[sync._target_db(to_db)]
        if _collection_info(source_db, coll) is None:
            # Already renamed by an attempt that stopped before saving its resume token (or the collection
            # never held a document here): the alignment at cutover creates anything still missing.
            return True
        try:
            # dropTarget: after the source's rename, the destination name holds exactly the renamed data.
            sync.target.admin.command(SON([("renameCollection", f"{source_db.name}.{coll}"),
                                           ("to", f"{dest_db.name}.{to_coll}"), ("dropTarget", True)]))
        except OperationFailure as exc:
            if exc.code != _NAMESPACE_NOT_FOUND:
                raise MigrationError(f"cannot rename {source_db.name}.{coll} on the target: {exc}") from None
        sync.move_rechecks(db, coll, to_db, to_coll)
        if sync.rename_listener is not None:
            sync.rename_listener(db, coll, to_db, to_coll)
        return True


__all__ = [
    "CatchUpResult",
    "HistoryLost",
    "LagInfo",
    "LiveSync",
    "Partition",
    "PartitionResult",
    "STATE_COLLECTION",
    "StartPoint",
    "UnsafeDDL",
    "check_oplog_window",
    "choose_boundaries",
    "id_from_json",
    "id_range_filter",
    "id_to_json",
    "partitions_from_boundaries",
]
