"""Verification during a live sync: every copied document compared, then every changed ``_id`` rechecked.

The design follows mongodb-labs/migration-verifier (generation 0 compares every document of every
partition; later generations recheck every ``_id`` a change event or a mismatch named, until source and
target agree), fitted to the native live pull (``engines.live.LiveSync``):

1. ``compare_partition`` compares one copy partition (the same ``_id`` range the copy used; a capped
   collection whole) in two passes that run side by side and never hold more than one batch per side:

   - the *source pass* reads the source range in ``_id`` order in batches and fetches the same ``_id``\\ s
     from the target with ``{_id: {$in: [...]}}``: a document absent from the target, or whose raw BSON
     bytes differ, is a mismatch;
   - the *target pass* reads only the ``_id``\\ s of the target range in ``_id`` order and asks the source
     for the same ``_id``\\ s: one the source does not have is a mismatch ("missing on the source").

   Matching is by the raw bytes of ``_id`` (the ``$in`` lookups only narrow the candidates), so the passes
   rely on no client-side idea of BSON order or collation: each server orders its own range, and a
   checkpoint (the last ``_id`` each pass compared, saved after every batch) is re-read by that same
   server. A killed compare resumes after its checkpoints. On mongod both range reads are ``_id`` index
   scans, the target pass's a covered one. Source reads use the primary with read concern ``majority``,
   whatever the connection's extras say.
2. ``note_changed`` queues the ``_id``\\ s the change stream changed (after the engine applied them);
   ``recheck`` reads queued ``_id``\\ s from both sides by ``$in`` and compares them: an equal pair leaves
   the queue (unless the entry was touched again meanwhile) and resolves any open mismatch for it; an
   unequal pair is (re)recorded and stays queued for the next generation.
3. ``summary`` and ``open_mismatches`` report; at cutover, after the fence, the caller repeats ``recheck``
   until it is clean or fails with the open mismatches.

Comparison is raw BSON byte equality per ``_id``, the strictest there is: ``1`` (int32) and ``1.0``
(double), or the same fields in another order, are mismatches (a faithful copy and replay keep both).
``first_difference`` names the first differing field path for the report; never is a document's content
stored or logged, since it may hold personal data (sizes are).

State, on the target under ``<state_db>`` (majority writes; every collection is keyed by ``sync_id``):

``verifier_runs``, ``_id: <sync_id>``::

    generation: int (recheck passes started), rechecked: int (entries compared over all passes),
    last_recheck: <RecheckResult dict>, created_at, updated_at

``verifier_partitions``, ``_id: {s: <sync_id>, partition: "<db>.<coll>#<index>"}``::

    sync_id, ns, partition: "<Partition JSON>", done: bool,
    source: {last_id: "<relaxed ExtJSON>" | null, documents: int, done: bool},   # content pass
    target: {last_id: ..., documents: int, done: bool},                           # extra-document pass
    mismatches: int (found by this partition's compare), seconds: float (compare wall time, all attempts),
    created_at, updated_at

``verifier_recheck``, ``_id: BinData(BSON of {s: <sync_id>, ns: "<db>.<coll>", id: <the _id's value>})``::

    sync_id, ns, db, coll (source namespace), id: <the _id's BSON value> (what the $in lookups use),
    touch: ObjectId (new at every note_changed/mismatch: an entry is removed or marked checked only if its
                     touch is still the one read, so a change after the recheck read is never lost),
    touches: int, checked_gen: int (the last generation that found it unequal; 0 = not checked since its
    last touch), reason: "changed" | "mismatch", first_touched_at, touched_at

``verifier_mismatches``, ``_id``: the recheck key::

    sync_id, ns, id: "<relaxed Extended JSON of _id>", field: "<dotted path>" | null,
    missing: "source" | "target" | null (null: both exist and differ),
    reason: "document_missing" | "value" | "type" | "only_on_source" | "only_on_target" | "field_order",
    source_bytes, target_bytes: int | null, found_by: "compare" | "recheck", seen: int,
    first_seen_at, last_seen_at, resolved: bool, resolved_at, resolution: "equal" | "renamed" | null
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from bson import SON, ObjectId, encode
from bson.binary import Binary, UuidRepresentation
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.raw_bson import RawBSONDocument

from atlas_migration.engines.live import RAW_CODEC, Partition, id_from_json, id_range_filter, id_to_json
from atlas_migration.engines.native import DEFAULT_INSERT_BATCH_BYTES
from atlas_migration.errors import ConfigurationError, MigrationError
from atlas_migration.namespaces import SYSTEM_DATABASES

if TYPE_CHECKING:
    from pymongo import MongoClient
    from pymongo.collection import Collection

RUNS_COLLECTION = "verifier_runs"
PARTITIONS_COLLECTION = "verifier_partitions"
RECHECK_COLLECTION = "verifier_recheck"
MISMATCH_COLLECTION = "verifier_mismatches"

# State documents hold _id values of the migrated data (recheck keys): decode them so that they encode back
# to the same BSON (dates outside datetime's range, UUID subtypes, Int64).
_STATE_CODEC = CodecOptions(
    tz_aware=True,
    datetime_conversion=DatetimeConversion.DATETIME_AUTO,
    uuid_representation=UuidRepresentation.UNSPECIFIED,
    unicode_decode_error_handler="surrogateescape",
)
DEFAULT_REPORT_LIMIT = 20
# Most _ids in one {_id: {$in: [...]}} lookup: a batch is looked up in chunks of this many. On mongod each
# chunk is one index-bounded read either way; SecantusDB's $in cost grows faster than linearly with the
# list (1,000 ids about 2.5 s, 100 ids about 0.09 s, measured), and a few extra round trips per batch cost
# little on mongod.
LOOKUP_IDS = 200
_MISMATCH_LOG_LIMIT = 20  # per call: the rest are counted, and all of them are in the mismatch collection


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(value: Any) -> str | None:
    return value.isoformat(timespec="seconds") if isinstance(value, dt.datetime) else None


# ------------------------------------------------------------------------------------ raw BSON walking
_FIXED_SIZES = {0x01: 8, 0x06: 0, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8, 0x13: 16,
                0xFF: 0, 0x7F: 0}
_STRING_TYPES = frozenset({0x02, 0x0D, 0x0E})  # string, JavaScript code, symbol: int32 length + bytes
_NESTED_TYPES = frozenset({0x03, 0x04})  # embedded document, array
_TYPE_NAMES = {0x01: "double", 0x02: "string", 0x03: "object", 0x04: "array", 0x05: "binData", 0x06: "undefined",
               0x07: "objectId", 0x08: "bool", 0x09: "date", 0x0A: "null", 0x0B: "regex", 0x0C: "dbPointer",
               0x0D: "javascript", 0x0E: "symbol", 0x0F: "javascriptWithScope", 0x10: "int", 0x11: "timestamp",
               0x12: "long", 0x13: "decimal", 0xFF: "minKey", 0x7F: "maxKey"}


class MalformedBSON(MigrationError):
    """Bytes that are not a well-formed BSON document."""


@dataclass(frozen=True)
class _Element:
    name: bytes
    type: int
    value: bytes  # the value's bytes as stored (for a nested document/array: the whole sub-document)


def _int32(data: bytes, at: int) -> int:
    if at + 4 > len(data):
        raise MalformedBSON("truncated length")
    return int.from_bytes(data[at:at + 4], "little", signed=True)


def _cstring_end(data: bytes, at: int) -> int:
    end = data.find(b"\x00", at)
    if end < 0:
        raise MalformedBSON("unterminated name")
    return end


def _value_size(data: bytes, kind: int, at: int) -> int:
    if kind in _FIXED_SIZES:
        return _FIXED_SIZES[kind]
    if kind in _STRING_TYPES:
        return 4 + _int32(data, at)
    if kind in _NESTED_TYPES or kind == 0x0F:  # the length includes itself
        return _int32(data, at)
    if kind == 0x05:  # binary: length, subtype, bytes
        return 5 + _int32(data, at)
    if kind == 0x0B:  # regex: pattern and options, two C strings
        return _cstring_end(data, _cstring_end(data, at) + 1) + 1 - at
    if kind == 0x0C:  # DBPointer: string + ObjectId
        return 4 + _int32(data, at) + 12
    raise MalformedBSON(f"unknown BSON type 0x{kind:02x}")


def _elements(document: bytes) -> Iterator[_Element]:
    """The top-level elements of one BSON document, in stored order."""
    length = _int32(document, 0)
    if length != len(document) or length < 5 or document[-1] != 0:
        raise MalformedBSON(f"document length {length} does not match its {len(document)} bytes")
    at = 4
    while at < length - 1:
        kind = document[at]
        name_end = _cstring_end(document, at + 1)
        start = name_end + 1
        end = start + _value_size(document, kind, start)
        if end > length - 1:
            raise MalformedBSON("element overruns its document")
        yield _Element(document[at + 1:name_end], kind, document[start:end])
        at = end


def raw_id_key(document: bytes) -> bytes:
    """The ``_id`` element of a raw document as bytes (type byte + value): equal keys mean the same ``_id``."""
    for element in _elements(document):
        if element.name == b"_id":
            return bytes([element.type]) + element.value
    raise MalformedBSON("document has no _id")


def _id_key_of(value: Any) -> bytes:
    return raw_id_key(encode({"_id": value}, codec_options=RAW_CODEC))


@dataclass(frozen=True)
class Difference:
    """Where two documents first differ: a dotted field path and why.

    ``reason``: "value" (same type, other value), "type" (other BSON type, e.g. int vs double),
    "only_on_source" / "only_on_target" (the field exists on one side), "field_order" (the same fields
    and values in another order: BSON equality is byte equality, so order matters; ``field`` is then the
    first position's field on the source side, under its parent's path).
    """

    field: str
    reason: str


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def first_difference(source: bytes, target: bytes, _prefix: str = "") -> Difference | None:
    """The first differing field path between two raw BSON documents, or None when they are byte-equal.

    Fields are taken in the source's order: the first one missing on the target or holding another value
    wins (descending into sub-documents and arrays, whose paths use the element index: ``items.3.sku``);
    then the first field only the target has; a document whose fields and values agree but whose bytes
    do not differs in field order (reported as "field_order"). A value difference is reported before an
    order difference because it is the one that changes what an application reads.
    """
    if source == target:
        return None
    left, right = list(_elements(source)), list(_elements(target))
    left_names, right_names = [e.name for e in left], [e.name for e in right]
    if len(set(left_names)) != len(left) or len(set(right_names)) != len(right):
        return _positional_difference(left, right, _prefix)  # duplicate names: only positions are meaningful
    by_name = {e.name: e for e in right}
    for element in left:
        other = by_name.get(element.name)
        path = _prefix + _name(element.name)
        if other is None:
            return Difference(path, "only_on_source")
        found = _element_difference(element, other, path)
        if found is not None:
            return found
    present = set(left_names)
    for element in right:
        if element.name not in present:
            return Difference(_prefix + _name(element.name), "only_on_target")
    for mine, theirs in zip(left_names, right_names, strict=True):
        if mine != theirs:
            return Difference(_prefix + _name(mine), "field_order")
    return Difference(_prefix.rstrip(".") or "", "value")  # unreachable for well-formed documents


def _element_difference(element: _Element, other: _Element, path: str) -> Difference | None:
    if element.type != other.type:
        return Difference(path, "type")
    if element.value == other.value:
        return None
    if element.type in _NESTED_TYPES:
        return first_difference(element.value, other.value, path + ".") or Difference(path, "value")
    return Difference(path, "value")


def _positional_difference(left: list[_Element], right: list[_Element], prefix: str) -> Difference:
    for mine, theirs in zip(left, right, strict=False):
        if mine.name != theirs.name:
            return Difference(prefix + _name(mine.name), "field_order")
        found = _element_difference(mine, theirs, prefix + _name(mine.name))
        if found is not None:
            return found
    if len(left) > len(right):
        return Difference(prefix + _name(left[len(right)].name), "only_on_source")
    return Difference(prefix + _name(right[len(left)].name), "only_on_target")


# ------------------------------------------------------------------------------------------ dataclasses
@dataclass
class Mismatch:
    """One document that differs; ``missing`` names the side without it (None: both have it)."""

    db: str
    coll: str
    id_value: Any
    missing: str | None
    field: str | None
    reason: str
    source_bytes: int | None
    target_bytes: int | None

    @property
    def ns(self) -> str:
        return f"{self.db}.{self.coll}"


def compare_documents(db: str, coll: str, id_value: Any, source: bytes | None,
                      target: bytes | None) -> Mismatch | None:
    """The mismatch between one ``_id``'s source and target raw documents (None = absent), or None if equal."""
    if source is None and target is None:
        return None
    if source is None or target is None:
        return Mismatch(db, coll, id_value, "source" if source is None else "target", None, "document_missing",
                        None if source is None else len(source), None if target is None else len(target))
    if source == target:
        return None
    diff = first_difference(source, target) or Difference("", "value")
    return Mismatch(db, coll, id_value, None, diff.field, diff.reason, len(source), len(target))


@dataclass
class RecheckResult:
    """One ``recheck`` call: ``clean`` when nothing is queued and no mismatch is open."""

    generation: int
    compared: int  # queued _ids compared in this call
    mismatches: int  # of those, found unequal
    pending: int  # entries still queued afterwards (unequal ones, and ones touched meanwhile)
    open_mismatches: int
    clean: bool
    seconds: float
    stopped_because: str  # "drained" | "max_seconds"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 3)
        return out


# --------------------------------------------------------------------------------------------- the engine
class LiveVerifier:
    """Compares a live sync's source and target; every method may run in another process (state on target)."""

    def __init__(
        self,
        source_client: MongoClient,
        target_client: MongoClient,
        *,
        sync_id: str,
        state_db: str = "__atlas_migration",
        target_db_prefix: str = "",
        batch_size: int = 1000,
        log: logging.Logger | None = None,
        parallel: bool = True,
    ) -> None:
        if not sync_id or not isinstance(sync_id, str):
            raise ConfigurationError("sync_id must be a non-empty string naming the live pull to verify")
        if batch_size < 1:
            raise ConfigurationError("batch_size must be positive")
        if state_db in SYSTEM_DATABASES:
            raise ConfigurationError(f"state_db '{state_db}' is a system database: choose another name")
        self.source = source_client
        self.target = target_client
        self.sync_id = sync_id
        self.state_db = state_db
        self.target_db_prefix = target_db_prefix
        self.batch_size = batch_size
        self.batch_bytes = DEFAULT_INSERT_BATCH_BYTES
        self.parallel = parallel  # run a partition's source and target passes side by side
        self.log = log or logging.getLogger(__name__)
        # Test seam: called as fault_hook(stage, n) after batch n of a pass ("verify_source"/"verify_target")
        # has recorded its mismatches and BEFORE its checkpoint is saved, and as fault_hook("recheck", n) once a
        # recheck batch has read both sides and before the queue is updated. Raising simulates a killed task.
        self.fault_hook: Callable[[str, int], None] | None = None
        self.max_documents_held = 0  # most documents one pass held at once (a batch plus its counterpart)
        self._indexes_ready = False
        self._logged = 0
        self._lock = threading.Lock()

    # -------------------------------------------------------------------------------------------- state
    def _state(self, name: str) -> Collection:
        from pymongo import WriteConcern
        from pymongo.read_concern import ReadConcern
        from pymongo.read_preferences import ReadPreference

        return self.target[self.state_db].get_collection(
            name, codec_options=_STATE_CODEC, write_concern=WriteConcern("majority"),
            read_concern=ReadConcern("majority"), read_preference=ReadPreference.PRIMARY)

    def _ensure_indexes(self) -> None:
        if self._indexes_ready:
            return
        self._state(RECHECK_COLLECTION).create_index([("sync_id", 1), ("checked_gen", 1)],
                                                     name="sync_id_checked_gen")
        self._state(RECHECK_COLLECTION).create_index([("sync_id", 1), ("ns", 1)], name="sync_id_ns")
        self._state(MISMATCH_COLLECTION).create_index([("sync_id", 1), ("resolved", 1), ("first_seen_at", 1)],
                                                      name="sync_id_resolved")
        self._state(PARTITIONS_COLLECTION).create_index([("sync_id", 1)], name="sync_id")
        self._indexes_ready = True

    def _key(self, ns: str, id_value: Any) -> Binary:
        # A flat binary key (the BSON of {s, ns, id}) rather than an embedded document: equality on it is a
        # plain _id index lookup on every server, and it is the same bytes for the same (sync, ns, _id).
        return Binary(encode(SON([("s", self.sync_id), ("ns", ns), ("id", id_value)]), codec_options=RAW_CODEC))

    def _partition_key(self, partition: Partition) -> SON:
        return SON([("s", self.sync_id), ("partition", partition.id)])

    def _read(self, client: MongoClient, db: str, coll: str) -> Collection:
        """Primary reads with read concern majority: a lagging secondary or a rolled-back write is never compared."""
        from pymongo.read_concern import ReadConcern
        from pymongo.read_preferences import ReadPreference

        return client[db].get_collection(coll, codec_options=RAW_CODEC, read_preference=ReadPreference.PRIMARY,
                                         read_concern=ReadConcern("majority"))

    def _sides(self, db: str, coll: str, target_db: str | None = None) -> tuple[Collection, Collection]:
        target_db = f"{self.target_db_prefix}{db}" if target_db is None else target_db
        return self._read(self.source, db, coll), self._read(self.target, target_db, coll)

    def reset(self) -> None:
        """Forget this sync's verification state (checkpoints, queue, mismatches); the data is left alone."""
        for name in (PARTITIONS_COLLECTION, RECHECK_COLLECTION, MISMATCH_COLLECTION):
            self._state(name).delete_many({"sync_id": self.sync_id})
        self._state(RUNS_COLLECTION).delete_one({"_id": self.sync_id})

    def _run_doc(self) -> dict[str, Any]:
        from pymongo import ReturnDocument

        now = _utc_now()
        return self._state(RUNS_COLLECTION).find_one_and_update(
            {"_id": self.sync_id},
            {"$setOnInsert": {"generation": 0, "rechecked": 0, "last_recheck": None, "created_at": now},
             "$set": {"updated_at": now}},
            upsert=True, return_document=ReturnDocument.AFTER)

    # ------------------------------------------------------------------------------------ partitions
    def register_partitions(self, partitions: Iterable[Partition]) -> int:
        """Record the copy's partitions (idempotent), so ``summary`` can say how many are left to compare."""
        from pymongo import UpdateOne

        ops = [UpdateOne({"_id": self._partition_key(p)}, {"$setOnInsert": self._new_partition(p)}, upsert=True)
               for p in partitions]
        self._ensure_indexes()
        if ops:
            self._state(PARTITIONS_COLLECTION).bulk_write(ops, ordered=False)
        return len(ops)

    def _new_partition(self, partition: Partition) -> dict[str, Any]:
        now = _utc_now()
        return {"sync_id": self.sync_id, "ns": partition.namespace, "partition": json.dumps(partition.to_dict()),
                "done": False, "mismatches": 0, "seconds": 0.0, "created_at": now, "updated_at": now,
                "source": {"last_id": None, "documents": 0, "done": False},
                "target": {"last_id": None, "documents": 0, "done": False}}

    def compare_partition(self, partition: Partition) -> dict[str, Any]:
        """Compare every document of one copy partition; resumable. Returns a JSON-safe result."""
        from pymongo import ReturnDocument

        self._ensure_indexes()
        states = self._state(PARTITIONS_COLLECTION)
        key = self._partition_key(partition)
        state = states.find_one_and_update(
            {"_id": key}, {"$setOnInsert": self._new_partition(partition)}, upsert=True,
            return_document=ReturnDocument.AFTER)
        stored = Partition.from_dict(json.loads(state["partition"]))
        if not stored.same_plan(partition):
            raise ConfigurationError(
                f"partition {partition.id} differs from the one this verifier compared before "
                f"({stored.to_dict()}): pass the partitions of the same live pull plan")
        resumed = {side: state[side]["last_id"] for side in ("source", "target")}
        if state.get("done"):
            return self._partition_result(state, 0.0, resumed, already_done=True)
        started = time.monotonic()
        pending = [side for side in ("source", "target") if not state[side]["done"]]
        stop = threading.Event()
        try:
            if self.parallel and len(pending) == 2:
                with ThreadPoolExecutor(max_workers=2, thread_name_prefix="verify") as pool:
                    futures = [pool.submit(self._pass, stored, side, state[side], stop) for side in pending]
                    errors = []
                    for future in futures:
                        try:
                            future.result()
                        except BaseException as exc:  # noqa: BLE001 - the first is re-raised below
                            stop.set()
                            errors.append(exc)
                    if errors:
                        raise errors[0]
            else:
                for side in pending:
                    self._pass(stored, side, state[side], stop)
        finally:
            states.update_one({"_id": key}, {"$inc": {"seconds": time.monotonic() - started}})
        done = states.find_one_and_update({"_id": key}, {"$set": {"done": True, "updated_at": _utc_now()}},
                                          return_document=ReturnDocument.AFTER)
        result = self._partition_result(done, time.monotonic() - started, resumed)
        self.log.info("verifier %s: partition %s compared: %d documents, %d mismatch(es) in %.1fs", self.sync_id,
                      partition.id, result["documents"], result["mismatches"], result["seconds"])
        return result

    @staticmethod
    def _partition_result(state: Mapping[str, Any], seconds: float, resumed: Mapping[str, Any], *,
                          already_done: bool = False) -> dict[str, Any]:
        partition = json.loads(state["partition"])
        return {
            "partition": Partition.from_dict(partition).id, "documents": int(state["source"]["documents"]),
            "target_documents": int(state["target"]["documents"]), "mismatches": int(state.get("mismatches") or 0),
            "seconds": round(seconds, 3), "already_done": already_done,
            "resumed_from": {side: None if v is None else json.loads(v) for side, v in resumed.items()},
        }

    def _range(self, partition: Partition, checkpoint: str | None) -> dict[str, Any]:
        if partition.capped:
            lower, inclusive = (None, True) if checkpoint is None else (id_from_json(json.loads(checkpoint)), False)
            return {} if lower is None else id_range_filter(lower, None, lower_inclusive=inclusive)
        if checkpoint is not None:
            lower, inclusive = id_from_json(json.loads(checkpoint)), False
        else:
            lower, inclusive = (None if partition.lower is None else id_from_json(partition.lower)), True
        upper = None if partition.upper is None else id_from_json(partition.upper)
        return id_range_filter(lower, upper, lower_inclusive=inclusive)

    def _lookup(self, collection: Collection, ids: list[Any], projection: Mapping[str, Any] | None = None
                ) -> Iterator[RawBSONDocument]:
        """The documents with these ``_id``\\ s (those that exist), read by ``$in`` in chunks of ``LOOKUP_IDS``."""
        for start in range(0, len(ids), LOOKUP_IDS):
            chunk = ids[start:start + LOOKUP_IDS]
            yield from collection.find({"_id": {"$in": chunk}}, projection=projection, batch_size=len(chunk))

    def _batches(self, cursor: Iterable[RawBSONDocument], stop: threading.Event) -> Iterator[list[RawBSONDocument]]:
        batch: list[RawBSONDocument] = []
        size = 0
        for doc in cursor:
            if batch and (len(batch) >= self.batch_size or size + len(doc.raw) > self.batch_bytes):
                yield batch
                if stop.is_set():
                    return
                batch, size = [], 0
            batch.append(doc)
            size += len(doc.raw)
        if batch:
            yield batch

    def _pass(self, partition: Partition, side: str, progress: Mapping[str, Any], stop: threading.Event) -> None:
        """One side's pass over a partition: "source" compares contents, "target" finds target-only ``_id``\\ s."""
        # The partition names its target database (the sync's prefix applied when it was planned).
        source, target = self._sides(partition.db, partition.collection, partition.target_db)
        key = self._partition_key(partition)
        query = self._range(partition, progress.get("last_id"))
        if side == "source":
            cursor = source.find(query, sort=[("_id", 1)], batch_size=self.batch_size)
        else:
            cursor = target.find(query, projection={"_id": 1}, sort=[("_id", 1)], batch_size=self.batch_size)
        batches = 0
        with cursor:
            for batch in self._batches(cursor, stop):
                ids = [doc["_id"] for doc in batch]
                if side == "source":
                    found = {raw_id_key(d.raw): d.raw for d in self._lookup(target, ids)}
                    mismatches = [m for doc, id_value in zip(batch, ids, strict=True) if (m := compare_documents(
                        partition.db, partition.collection, id_value, doc.raw, found.get(raw_id_key(doc.raw))))]
                else:
                    found = {raw_id_key(d.raw): None for d in self._lookup(source, ids, projection={"_id": 1})}
                    mismatches = [
                        Mismatch(partition.db, partition.collection, id_value, "source", None, "document_missing",
                                 None, None)
                        for doc, id_value in zip(batch, ids, strict=True) if raw_id_key(doc.raw) not in found]
                with self._lock:
                    self.max_documents_held = max(self.max_documents_held, len(batch) + len(found))
                if mismatches:
                    self._record(mismatches, found_by="compare")
                batches += 1
                if self.fault_hook is not None:
                    self.fault_hook(f"verify_{side}", batches)
                self._state(PARTITIONS_COLLECTION).update_one({"_id": key}, {
                    "$set": {f"{side}.last_id": json.dumps(id_to_json(ids[-1])), "updated_at": _utc_now()},
                    "$inc": {f"{side}.documents": len(batch), "mismatches": len(mismatches)},
                })
                del found
        if not stop.is_set():
            self._state(PARTITIONS_COLLECTION).update_one({"_id": key}, {"$set": {f"{side}.done": True}})

    # --------------------------------------------------------------------------------------- mismatches
    def _record(self, mismatches: list[Mismatch], *, found_by: str) -> None:
        """Upsert mismatch records (idempotent per ``_id``) and queue their ``_id``\\ s for recheck."""
        from pymongo import UpdateOne

        now = _utc_now()
        ops = [UpdateOne(
            {"_id": self._key(m.ns, m.id_value)},
            {"$set": {"sync_id": self.sync_id, "ns": m.ns, "id": json.dumps(id_to_json(m.id_value)),
                      "field": m.field, "missing": m.missing, "reason": m.reason, "source_bytes": m.source_bytes,
                      "target_bytes": m.target_bytes, "found_by": found_by, "last_seen_at": now, "resolved": False,
                      "resolved_at": None, "resolution": None},
             "$setOnInsert": {"first_seen_at": now}, "$inc": {"seen": 1}},
            upsert=True) for m in mismatches]
        result = self._state(MISMATCH_COLLECTION).bulk_write(ops, ordered=False)
        self._touch([(m.db, m.coll, m.id_value) for m in mismatches], reason="mismatch")
        new = [mismatches[i] for i in sorted(result.upserted_ids)]  # seen before: already in the log
        with self._lock:
            shown = new[:max(0, _MISMATCH_LOG_LIMIT - self._logged)]
            self._logged += len(shown)
        for m in shown:
            where = (f"missing on the {m.missing}" if m.missing else f"field '{m.field}' differs ({m.reason})")
            self.log.warning("verifier %s: mismatch in %s, _id %s: %s", self.sync_id, m.ns,
                             json.dumps(id_to_json(m.id_value)), where)
        if len(new) > len(shown):
            self.log.warning("verifier %s: %d more new mismatch(es) (see %s.%s)", self.sync_id,
                             len(new) - len(shown), self.state_db, MISMATCH_COLLECTION)

    # ------------------------------------------------------------------------------------------ rechecks
    def note_changed(self, items: Iterable[tuple[str, str, Any]]) -> int:
        """Queue ``(source db, collection, _id)`` of changed documents for recheck; returns how many were queued.

        Call it after the change has been applied to the target. Bulk idempotent upserts: a queued ``_id``
        gets a new ``touch`` token, so a recheck that read it before this change keeps it queued.
        """
        return self._touch(items, reason="changed")

    def _touch(self, items: Iterable[tuple[str, str, Any]], *, reason: str) -> int:
        from pymongo import UpdateOne

        self._ensure_indexes()
        unique: dict[tuple[str, bytes], tuple[str, str, Any]] = {}
        for db, coll, id_value in items:
            unique[(f"{db}.{coll}", _id_key_of(id_value))] = (db, coll, id_value)
        now = _utc_now()
        ops = [UpdateOne(
            {"_id": self._key(f"{db}.{coll}", id_value)},
            {"$set": {"touch": ObjectId(), "touched_at": now, "checked_gen": 0, "reason": reason},
             "$setOnInsert": {"sync_id": self.sync_id, "ns": f"{db}.{coll}", "db": db, "coll": coll,
                              "id": id_value, "first_touched_at": now},
             "$inc": {"touches": 1}},
            upsert=True) for db, coll, id_value in unique.values()]
        for start in range(0, len(ops), self.batch_size):
            self._state(RECHECK_COLLECTION).bulk_write(ops[start:start + self.batch_size], ordered=False)
        return len(ops)

    def rename_namespace(self, old_db: str, old_coll: str, new_db: str, new_coll: str) -> int:
        """Move queued rechecks of a renamed namespace to its new name; its open mismatches move with them."""
        from pymongo import DeleteOne

        self._ensure_indexes()
        old_ns = f"{old_db}.{old_coll}"
        queue = self._state(RECHECK_COLLECTION)
        moved = 0
        while True:
            entries = list(queue.find({"sync_id": self.sync_id, "ns": old_ns}, limit=self.batch_size))
            if not entries:
                break
            # New entries first: a crash in between leaves a duplicate recheck, never a lost one.
            self._touch([(new_db, new_coll, e["id"]) for e in entries], reason="changed")
            queue.bulk_write([DeleteOne({"_id": e["_id"]}) for e in entries], ordered=False)
            moved += len(entries)
        self._state(MISMATCH_COLLECTION).update_many(
            {"sync_id": self.sync_id, "ns": old_ns, "resolved": False},
            {"$set": {"resolved": True, "resolved_at": _utc_now(), "resolution": f"renamed to {new_db}.{new_coll}"}})
        if moved:
            self.log.info("verifier %s: %d queued recheck(s) moved from %s to %s.%s", self.sync_id, moved, old_ns,
                          new_db, new_coll)
        return moved

    def recheck(self, max_seconds: float | None = None) -> RecheckResult:
        """One generation: compare every queued ``_id`` (and any touched during the pass) on both sides.

        Equal (or absent on both sides): the entry leaves the queue if untouched since it was read, and an
        open mismatch for it is resolved (kept with ``resolved: true``). Unequal: the mismatch is recorded
        and the entry stays for the next generation. Stops when nothing is left to compare in this
        generation, or after ``max_seconds`` (under a writer faster than the recheck, pass a limit).
        """
        from pymongo import DeleteOne, ReturnDocument, UpdateOne

        self._ensure_indexes()
        self._run_doc()
        generation = self._state(RUNS_COLLECTION).find_one_and_update(
            {"_id": self.sync_id}, {"$inc": {"generation": 1}}, return_document=ReturnDocument.AFTER)["generation"]
        queue = self._state(RECHECK_COLLECTION)
        started = time.monotonic()
        compared = unequal = 0
        stopped = "drained"
        while True:
            if max_seconds is not None and time.monotonic() - started >= max_seconds:
                stopped = "max_seconds"
                break
            entries = list(queue.find({"sync_id": self.sync_id, "checked_gen": {"$lt": generation}},
                                      limit=self.batch_size))
            if not entries:
                break
            by_ns: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for entry in entries:
                by_ns.setdefault((entry["db"], entry["coll"]), []).append(entry)
            queue_ops: list[Any] = []
            resolved: list[Any] = []
            found: list[Mismatch] = []
            for (db, coll), group in by_ns.items():
                source, target = self._sides(db, coll)
                ids = [e["id"] for e in group]
                src = {raw_id_key(d.raw): d.raw for d in self._lookup(source, ids)}
                tgt = {raw_id_key(d.raw): d.raw for d in self._lookup(target, ids)}
                with self._lock:
                    self.max_documents_held = max(self.max_documents_held, len(src) + len(tgt))
                for entry, id_value in zip(group, ids, strict=True):
                    id_key = _id_key_of(id_value)
                    mismatch = compare_documents(db, coll, id_value, src.get(id_key), tgt.get(id_key))
                    guard = {"_id": entry["_id"], "touch": entry["touch"]}
                    if mismatch is None:
                        queue_ops.append(DeleteOne(guard))
                        resolved.append(entry["_id"])
                    else:
                        found.append(mismatch)
                        queue_ops.append(UpdateOne(guard, {"$set": {"checked_gen": generation,
                                                                    "reason": "mismatch"}}))
            if self.fault_hook is not None:
                self.fault_hook("recheck", compared + len(entries))  # documents read, queue not yet updated
            if found:
                self._record_recheck_mismatches(found)
            if resolved:
                self._state(MISMATCH_COLLECTION).update_many(
                    {"_id": {"$in": resolved}, "resolved": False},
                    {"$set": {"resolved": True, "resolved_at": _utc_now(), "resolution": "equal"}})
            queue.bulk_write(queue_ops, ordered=False)
            compared += len(entries)
            unequal += len(found)
        pending = queue.count_documents({"sync_id": self.sync_id})
        open_count = self._state(MISMATCH_COLLECTION).count_documents({"sync_id": self.sync_id, "resolved": False})
        result = RecheckResult(generation, compared, unequal, pending, open_count,
                               pending == 0 and open_count == 0, time.monotonic() - started, stopped)
        self._state(RUNS_COLLECTION).update_one(
            {"_id": self.sync_id},
            {"$inc": {"rechecked": compared}, "$set": {"last_recheck": result.to_dict(), "updated_at": _utc_now()}})
        if compared or not result.clean:
            self.log.info("verifier %s: recheck generation %d: %d compared, %d unequal, %d pending, %d open "
                          "mismatch(es) (%.1fs)", self.sync_id, generation, compared, unequal, pending, open_count,
                          result.seconds)
        return result

    def _record_recheck_mismatches(self, mismatches: list[Mismatch]) -> None:
        """Like ``_record`` but without re-touching the queue: the entries stay, guarded by their read touch."""
        from pymongo import UpdateOne

        now = _utc_now()
        ops = [UpdateOne(
            {"_id": self._key(m.ns, m.id_value)},
            {"$set": {"sync_id": self.sync_id, "ns": m.ns, "id": json.dumps(id_to_json(m.id_value)),
                      "field": m.field, "missing": m.missing, "reason": m.reason, "source_bytes": m.source_bytes,
                      "target_bytes": m.target_bytes, "last_seen_at": now, "resolved": False, "resolved_at": None,
                      "resolution": None},
             "$setOnInsert": {"first_seen_at": now, "found_by": "recheck"}, "$inc": {"seen": 1}},
            upsert=True) for m in mismatches]
        self._state(MISMATCH_COLLECTION).bulk_write(ops, ordered=False)

    # -------------------------------------------------------------------------------------------- reports
    def open_mismatches(self, limit: int = DEFAULT_REPORT_LIMIT) -> list[dict[str, Any]]:
        """The oldest open mismatches, JSON-safe: ns, _id (relaxed Extended JSON), field, missing, reason."""
        docs = self._state(MISMATCH_COLLECTION).find(
            {"sync_id": self.sync_id, "resolved": False}, sort=[("first_seen_at", 1)], limit=max(0, int(limit)))
        return [self._mismatch_dict(doc) for doc in docs] if limit > 0 else []

    def open_mismatch_keys(self) -> Iterator[tuple[str, str, Any]]:
        """``(source db, collection, _id)`` of every open mismatch, the ``_id`` as its BSON value (for a repair
        that re-reads the documents from the source). Streams; nothing is collected in memory here."""
        for doc in self._state(MISMATCH_COLLECTION).find({"sync_id": self.sync_id, "resolved": False},
                                                          projection={"_id": 1, "ns": 1}):
            db, _, coll = doc["ns"].partition(".")
            yield db, coll, RawBSONDocument(bytes(doc["_id"]), RAW_CODEC)["id"]  # the key is the BSON of {s, ns, id}

    @staticmethod
    def _mismatch_dict(doc: Mapping[str, Any]) -> dict[str, Any]:
        return {"ns": doc["ns"], "_id": json.loads(doc["id"]), "field": doc.get("field"),
                "missing": doc.get("missing"), "reason": doc.get("reason"), "found_by": doc.get("found_by"),
                "seen": int(doc.get("seen") or 0), "first_seen_at": _iso(doc.get("first_seen_at")),
                "last_seen_at": _iso(doc.get("last_seen_at"))}

    def summary(self, limit: int = DEFAULT_REPORT_LIMIT) -> dict[str, Any]:
        """JSON-safe progress and result of the verification (for the task log, XCom and the report)."""
        partitions = self._state(PARTITIONS_COLLECTION)
        totals = next(iter(partitions.aggregate([
            {"$match": {"sync_id": self.sync_id}},
            {"$group": {"_id": None, "total": {"$sum": 1}, "done": {"$sum": {"$cond": ["$done", 1, 0]}},
                        "documents": {"$sum": "$source.documents"}, "target_documents": {"$sum": "$target.documents"},
                        "seconds": {"$sum": "$seconds"}}},
        ])), {})
        mismatches = self._state(MISMATCH_COLLECTION)
        open_count = mismatches.count_documents({"sync_id": self.sync_id, "resolved": False})
        resolved = mismatches.count_documents({"sync_id": self.sync_id, "resolved": True})
        pending = self._state(RECHECK_COLLECTION).count_documents({"sync_id": self.sync_id})
        run = self._state(RUNS_COLLECTION).find_one({"_id": self.sync_id}) or {}
        seconds = float(totals.get("seconds") or 0.0)
        documents = int(totals.get("documents") or 0)
        return {
            "sync_id": self.sync_id,
            "partitions": {"compared": int(totals.get("done") or 0), "total": int(totals.get("total") or 0)},
            "documents_compared": documents,
            "target_ids_checked": int(totals.get("target_documents") or 0),
            "compare_seconds": round(seconds, 3),
            "compare_docs_per_second": round(documents / seconds, 1) if seconds > 0 else None,
            "mismatches": {"open": open_count, "resolved": resolved, "first": self.open_mismatches(limit)},
            "rechecks_pending": pending,
            "generation": int(run.get("generation") or 0),
            "rechecked": int(run.get("rechecked") or 0),
            "last_recheck": run.get("last_recheck"),
            "clean": open_count == 0 and pending == 0,
        }


__all__ = [
    "MISMATCH_COLLECTION",
    "PARTITIONS_COLLECTION",
    "RECHECK_COLLECTION",
    "RUNS_COLLECTION",
    "Difference",
    "LiveVerifier",
    "MalformedBSON",
    "Mismatch",
    "RecheckResult",
    "compare_documents",
    "first_difference",
    "raw_id_key",
]
