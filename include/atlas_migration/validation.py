"""Validation of a migration: prove, namespace by namespace, that the target holds what the source holds.

The module is split into pure decisions on plain data and I/O at the edges:

- I/O: ``snapshot_namespace`` reads one namespace into a ``NamespaceSnapshot`` (existence, type, exact
  count, normalised index specs and collection options and, in ``full`` mode, an order-independent digest
  of every document's raw BSON bytes, read in natural order; see ``multiset_digest``).
  ``find_document_differences`` merges both sides in ``_id`` order to name the first documents that
  differ; ``validate_namespaces`` runs it only for namespaces whose digests differ, so a matching
  namespace costs one unsorted scan per side. ``validate_namespaces`` drives both for a list of
  namespaces and returns a ``ValidationReport``; ``write_report`` writes it to disk.
- Pure: normalisation (``normalize_index``, ``normalize_indexes``, ``normalize_collection_options``),
  ``multiset_digest``, ``compare_namespace``, the report's totals and verdict, ``render_markdown``,
  ``render_summary`` and ``raise_if_failed``.

Reports never contain document bodies (documents may hold personal data): a differing document is named by
its ``_id`` in relaxed Extended JSON, and nothing else about it is kept. Nor do they contain credentials:
clients are passed in already connected and no URI is ever printed.

Full mode compares raw bytes, so it is deliberately strict: a document whose fields were reordered, or whose
``2`` became ``2.0``, differs. That is what "byte-identical copy" means for mongodump/mongorestore and for
the raw-BSON engine; index and option metadata, on the other hand, are compared semantically (see the
normalisation functions), because servers legitimately rewrite those.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bson import DBRef, Decimal128, MaxKey, MinKey, ObjectId, Regex, Timestamp, json_util
from bson.binary import Binary
from bson.code import Code
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.datetime_ms import DatetimeMS
from bson.raw_bson import RawBSONDocument

from atlas_migration.errors import ConfigurationError, ValidationFailed
from atlas_migration.redaction import redact

if TYPE_CHECKING:
    from pymongo import MongoClient
    from pymongo.collection import Collection

Mode = Literal["counts", "full"]
Status = Literal["match", "mismatch", "missing_in_target"]
DifferenceKind = Literal["missing_in_target", "extra_in_target", "different"]

MODES: tuple[str, ...] = ("counts", "full")

# Index fields that differ between servers without changing what the index does: the index format version,
# the namespace (absent since 4.4, and different anyway when a rehearsal restores into a prefixed
# database) and the build flag (ignored since 4.2).
IGNORED_INDEX_FIELDS = frozenset({"v", "ns", "background"})
# Flags where ``false`` (or ``0``) means the same as leaving the flag out; old servers also stored ``1``.
BOOLEAN_INDEX_FLAGS = frozenset({"unique", "sparse", "hidden"})
# Collection metadata that identifies a particular copy or tunes storage rather than describing the data:
# the UUID (new on every create), the listCollections envelope fields (``info``, ``idIndex``; also found
# beside the options in mongodump's metadata.json), WiredTiger configuration strings (Atlas manages
# storage) and MMAPv1-era fields that newer servers drop.
IGNORED_COLLECTION_OPTIONS = frozenset(
    {"uuid", "info", "idIndex", "storageEngine", "indexOptionDefaults", "flags", "autoIndexId"}
)
# Options whose default value some servers echo and others omit: equal to the default means absent.
DEFAULT_COLLECTION_OPTIONS: dict[str, Any] = {"capped": False, "validationLevel": "strict", "validationAction": "error"}
# Options in which the order of keys inside sub-documents changes the meaning ($sort and $project stages of
# a view's pipeline). Everywhere else sub-document key order is insignificant; an index's key pattern is
# kept as an ordered list of pairs so its order is always significant.
ORDER_SENSITIVE_OPTIONS = frozenset({"pipeline"})

DEFAULT_DIFFERENCE_LIMIT = 10
# Documents per cursor batch when scanning or merging. Bounded so a batch of large documents never holds
# 16 MB of them at once, and because the test server answers slower with the server's default (16 MB)
# batches than with 1,000-document ones; it matches the DAG's default batch_size.
DEFAULT_SCAN_BATCH_SIZE = 1_000
# Named in every digest string ("<algorithm>:<hex>") so a digest from an older format (a bare sha256 of
# the documents in _id order) or another algorithm is never taken for an equal value.
DIGEST_ALGORITHM = "sum-sha256"
_DIGEST_BITS = 256
_DIGEST_MODULUS = 1 << _DIGEST_BITS
# What a digest without an algorithm prefix was: the ordered digest of earlier versions.
_LEGACY_DIGEST_ALGORITHM = "sha256"
# How many differences per namespace raise_if_failed and render_summary quote.
_QUOTED_DIFFERENCES = 3
_VALUE_WIDTH = 160

# Raw BSON end to end: bytes are hashed exactly as stored. DATETIME_AUTO keeps dates outside Python's
# datetime range decodable when an _id is one.
_RAW_OPTIONS: CodecOptions = CodecOptions(
    document_class=RawBSONDocument, datetime_conversion=DatetimeConversion.DATETIME_AUTO
)
_ID_ORDER = [("_id", 1)]
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


# --------------------------------------------------------------------------------------------------------
# Normalisation (pure)
# --------------------------------------------------------------------------------------------------------


def normalize_value(value: Any) -> Any:
    """Turn a decoded BSON value into JSON-safe data where numerically equal numbers are equal.

    ``2``, ``2.0``, ``Int64(2)`` and ``Decimal128("2")`` all become ``2``; other numbers stay floats (or
    ``{"$numberDecimal": ...}``). Non-JSON types (ObjectId, dates, regexes, binary...) become their relaxed
    Extended JSON form. Key order of sub-documents is preserved; whether it matters is the comparison's call.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):  # includes Int64
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        if math.isfinite(value):
            return value
        return _relaxed_json(value)
    if isinstance(value, Decimal128):
        number = value.to_decimal()
        if number.is_finite() and number == number.to_integral_value():
            return int(number)
        return {"$numberDecimal": str(value)}
    if isinstance(value, Mapping) and not isinstance(value, DBRef):
        return {str(key): normalize_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [normalize_value(item) for item in value]
    return _relaxed_json(value)


def _relaxed_json(value: Any) -> Any:
    return json.loads(json_util.dumps(value, json_options=json_util.RELAXED_JSON_OPTIONS))


def normalize_index(spec: Mapping[str, Any]) -> dict[str, Any]:
    """One ``listIndexes`` entry as comparable JSON-safe data.

    The key pattern becomes a list of ``[field, direction]`` pairs, so compound key order stays
    significant after a JSON round trip; every other field is a plain mapping whose order does not matter.
    """
    out: dict[str, Any] = {}
    for name, value in spec.items():
        if name in IGNORED_INDEX_FIELDS:
            continue
        if name == "key":
            out["key"] = [[str(path), normalize_value(direction)] for path, direction in value.items()]
        elif name in BOOLEAN_INDEX_FLAGS:
            if value:
                out[name] = True
        else:
            out[name] = normalize_value(value)
    return dict(sorted(out.items()))


def normalize_indexes(specs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every index of a collection, normalised and sorted by name."""
    return sorted((normalize_index(spec) for spec in specs), key=lambda spec: str(spec.get("name", "")))


def normalize_collection_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``options`` of a ``listCollections`` entry without fields that legitimately differ."""
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name in IGNORED_COLLECTION_OPTIONS:
            continue
        normalised = normalize_value(value)
        if name in DEFAULT_COLLECTION_OPTIONS and normalised == DEFAULT_COLLECTION_OPTIONS[name]:
            continue
        out[name] = normalised
    return dict(sorted(out.items()))


def collection_type(entry: Mapping[str, Any]) -> str:
    """``view``, ``timeseries``, ``capped`` or ``collection`` for a ``listCollections`` entry.

    mongod reports time series collections with type ``timeseries``; some servers (SecantusDB) report
    ``collection`` with a ``timeseries`` option, so the option decides too.
    """
    options = entry.get("options") or {}
    if entry.get("type") == "view" or "viewOn" in options:
        return "view"
    if entry.get("type") == "timeseries" or "timeseries" in options:
        return "timeseries"
    if options.get("capped"):
        return "capped"
    return "collection"


def _canonical(value: Any, *, ordered: bool) -> str:
    """Text that is equal exactly when two normalised values are equal (``true`` is not ``1``)."""
    return json.dumps(value, sort_keys=not ordered, separators=(",", ":"))


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "absent"
    text = json.dumps(value, separators=(",", ":"))
    return text if len(text) <= _VALUE_WIDTH else text[: _VALUE_WIDTH - 1] + "…"


_ABSENT = object()


# --------------------------------------------------------------------------------------------------------
# Snapshots
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NamespaceSnapshot:
    """What one side holds for one namespace; JSON-safe (``to_dict``/``from_dict`` round-trip)."""

    db: str
    coll: str
    mode: str = "counts"
    exists: bool = False
    type: str = ""
    count: int | None = None
    indexes: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    # "sum-sha256:<hex>" (see multiset_digest) over every document's raw BSON; only in full mode, never
    # for views (a view's documents are its source collection's, validated there).
    digest: str | None = None

    @property
    def namespace(self) -> str:
        return f"{self.db}.{self.coll}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "db": self.db, "coll": self.coll, "mode": self.mode, "exists": self.exists, "type": self.type,
            "count": self.count, "indexes": self.indexes, "options": self.options, "digest": self.digest,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NamespaceSnapshot:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigurationError(f"validation mode {mode!r} is not one of {', '.join(MODES)}")


def list_catalog(client: MongoClient, db: str) -> dict[str, Mapping[str, Any]]:
    """One database's ``listCollections`` entries by name: one round trip for all of its namespaces."""
    return {entry["name"]: entry for entry in client[db].list_collections()}


def snapshot_namespace(
    client: MongoClient, db: str, coll: str, *, mode: str = "counts", batch_size: int = DEFAULT_SCAN_BATCH_SIZE,
    catalog: Mapping[str, Mapping[str, Any]] | None = None,
) -> NamespaceSnapshot:
    """Read one namespace's existence, type, exact count, indexes, options and (full mode) content digest.

    The digest comes from one natural-order scan of raw BSON in ``batch_size`` batches (see
    ``multiset_digest``); nothing is sorted and no document is decoded. ``catalog``: the database's
    ``list_catalog``, when the caller validates many of its namespaces (else one filtered listing here).
    """
    _check_mode(mode)
    database = client[db]
    if catalog is not None:
        entry = catalog.get(coll)
    else:
        entry = next(iter(database.list_collections(filter={"name": coll})), None)
    if entry is None:
        return NamespaceSnapshot(db=db, coll=coll, mode=mode)
    kind = collection_type(entry)
    options = normalize_collection_options(entry.get("options") or {})
    collection = database[coll]
    if kind == "view":
        # Views have no indexes of their own: mongod refuses listIndexes on them (code 166) and SecantusDB
        # answers with a phantom _id_ index, so neither answer is worth comparing.
        return NamespaceSnapshot(
            db=db, coll=coll, mode=mode, exists=True, type=kind,
            count=collection.count_documents({}), options=options,
        )
    indexes = normalize_indexes(collection.list_indexes())
    if mode == "full":
        # One pass yields both the count and the digest, so they describe the same data; a separate
        # count_documents would cost another scan and could see a different moment.
        count, digest = multiset_digest(document.raw for document in _natural_documents(collection, batch_size))
    else:
        count, digest = collection.count_documents({}), None
    return NamespaceSnapshot(
        db=db, coll=coll, mode=mode, exists=True, type=kind, count=count, indexes=indexes, options=options,
        digest=digest,
    )


def _natural_documents(collection: Collection, batch_size: int) -> Iterator[RawBSONDocument]:
    """Every document as raw BSON in whatever order the server stores them (one batch in memory at a time)."""
    # No sort and no hint: the cheapest read any server offers (a sort by _id walks an index on mongod and
    # sorts the whole collection on some servers), and the multiset digest does not need an order.
    return iter(collection.with_options(codec_options=_RAW_OPTIONS).find({}, batch_size=batch_size))


def _documents_by_id(collection: Collection, batch_size: int) -> Iterator[RawBSONDocument]:
    """Every document as raw BSON in the server's _id order (one batch in memory at a time)."""
    # No hint: mongod walks the _id index (or the cluster key) for this sort on its own, and a hint would
    # fail on collections without an _id index.
    return iter(
        collection.with_options(codec_options=_RAW_OPTIONS).find({}, sort=_ID_ORDER, batch_size=batch_size)
    )


def multiset_digest(raw_documents: Iterable[bytes]) -> tuple[int, str]:
    """The number of documents and an order-independent digest of their exact bytes.

    Each document's raw BSON is hashed on its own (sha256) and the hashes, read as 256-bit integers, are
    added modulo 2**256. The result is a digest of the multiset of documents:

    - the order in which documents arrive does not matter, so each side can be scanned in natural order,
      whatever order the copy happened to insert them in;
    - any changed byte changes that document's hash and therefore the sum; so does a missing, an extra or
      a duplicated document (a duplicate adds its hash a second time). Addition, not XOR: under XOR two
      copies of a document cancel out, so a target holding {A, C, C} would match a source holding {A, B, B}
      (same count, same XOR); under addition it differs unless 2*h(B) == 2*h(C) mod 2**256.
    - field order inside a document still matters, because the hash covers the document's bytes: a copy
      that reorders fields has not preserved the document, and a migration must preserve it.

    It guards against accidental differences, not against an adversary who chooses documents to make sums
    collide (a sum of hashes admits generalised-birthday attacks); validation compares a copy with its
    source, where no such adversary exists. The count is returned beside the digest because the same scan
    yields it. sha256 rather than blake2b: measured on this project's hosts (SHA extensions), sha256 of a
    1 KB document takes about 0.9 us against 1.4 us, both far below the cost of reading it.
    """
    total = 0
    count = 0
    sha256, from_bytes = hashlib.sha256, int.from_bytes  # locals: this loop runs once per document
    for raw in raw_documents:
        total += from_bytes(sha256(raw).digest(), "big")
        count += 1
    # Reduced once at the end: the running sum only grows by log2(count) bits, cheaper than a modulo per
    # document.
    return count, f"{DIGEST_ALGORITHM}:{total % _DIGEST_MODULUS:0{_DIGEST_BITS // 4}x}"


def digest_algorithm(digest: str) -> str:
    """The algorithm a digest string names (``sum-sha256``); ``sha256`` for the unprefixed ordered digest."""
    algorithm, separator, _ = digest.partition(":")
    return algorithm if separator else _LEGACY_DIGEST_ALGORITHM


def _digest_hex(digest: str) -> str:
    return digest.partition(":")[2] or digest


# --------------------------------------------------------------------------------------------------------
# Comparison (pure)
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DocumentDifference:
    """One document that differs, named only by its ``_id`` (relaxed Extended JSON)."""

    kind: DifferenceKind
    id: str

    def describe(self) -> str:
        what = {
            "missing_in_target": "missing in target",
            "extra_in_target": "only in target",
            "different": "differs between source and target",
        }[self.kind]
        return f"document _id {self.id}: {what}"

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "id": self.id}


@dataclass(frozen=True)
class NamespaceResult:
    """The comparison of one namespace: status, human-readable differences and both snapshots."""

    namespace: str
    target_namespace: str
    status: Status
    differences: list[str]
    indexes_match: bool
    options_match: bool
    source: NamespaceSnapshot
    target: NamespaceSnapshot
    document_differences: list[DocumentDifference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "match"

    @property
    def digest_differs(self) -> bool:
        return self.source.digest is not None and self.target.digest is not None and (
            self.source.digest != self.target.digest
        )

    def with_document_differences(self, found: list[DocumentDifference], limit: int) -> NamespaceResult:
        """This result plus the documents ``find_document_differences`` named."""
        lines = [difference.describe() for difference in found]
        if found and len(found) >= limit:
            lines.append(f"(stopped after the first {limit} differing documents; there may be more)")
        if not found:
            lines.append(
                "no differing document found although the digests differ: the servers ordered _id values "
                "differently (a different collation?) or the data changed during validation"
            )
        return replace(self, differences=[*self.differences, *lines], document_differences=list(found))

    def to_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "target_namespace": self.target_namespace,
            "status": self.status,
            "type": self.source.type,
            "target_type": self.target.type,
            "source_count": self.source.count,
            "target_count": self.target.count,
            "indexes_match": self.indexes_match,
            "options_match": self.options_match,
            "differences": list(self.differences),
            "document_differences": [difference.to_dict() for difference in self.document_differences],
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NamespaceResult:
        return cls(
            namespace=data["namespace"],
            target_namespace=data["target_namespace"],
            status=data["status"],
            differences=list(data["differences"]),
            indexes_match=data["indexes_match"],
            options_match=data["options_match"],
            source=NamespaceSnapshot.from_dict(data["source"]),
            target=NamespaceSnapshot.from_dict(data["target"]),
            document_differences=[DocumentDifference(**item) for item in data.get("document_differences", [])],
        )


def _index_differences(source: list[dict[str, Any]], target: list[dict[str, Any]]) -> list[str]:
    by_name_source = {str(spec.get("name")): spec for spec in source}
    by_name_target = {str(spec.get("name")): spec for spec in target}
    lines: list[str] = []
    for name in sorted(by_name_source.keys() | by_name_target.keys()):
        src, tgt = by_name_source.get(name), by_name_target.get(name)
        if tgt is None:
            lines.append(f"index '{name}' missing in target (key {_show(src.get('key'))})")
        elif src is None:
            lines.append(f"index '{name}' only in target (key {_show(tgt.get('key'))})")
        else:
            for attribute in sorted(src.keys() | tgt.keys(), key=lambda a: (a != "key", a)):
                a, b = src.get(attribute, _ABSENT), tgt.get(attribute, _ABSENT)
                if a is _ABSENT or b is _ABSENT or _canonical(a, ordered=attribute == "key") != _canonical(
                    b, ordered=attribute == "key"
                ):
                    lines.append(f"index '{name}' {attribute}: source {_show(a)}, target {_show(b)}")
    return lines


def _option_differences(source: dict[str, Any], target: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for name in sorted(source.keys() | target.keys()):
        a, b = source.get(name, _ABSENT), target.get(name, _ABSENT)
        ordered = name in ORDER_SENSITIVE_OPTIONS
        if a is _ABSENT or b is _ABSENT or _canonical(a, ordered=ordered) != _canonical(b, ordered=ordered):
            lines.append(f"option {name}: source {_show(a)}, target {_show(b)}")
    return lines


def compare_namespace(source: NamespaceSnapshot, target: NamespaceSnapshot) -> NamespaceResult:
    """Compare two snapshots of the same namespace (the target may live in a mapped database)."""
    if source.mode != target.mode:
        raise ValueError(f"cannot compare a {source.mode} snapshot with a {target.mode} snapshot")

    def result(status: Status, differences: list[str], indexes_match: bool, options_match: bool):
        return NamespaceResult(
            namespace=source.namespace, target_namespace=target.namespace, status=status,
            differences=differences, indexes_match=indexes_match, options_match=options_match,
            source=source, target=target,
        )

    if not source.exists:
        # Asked to validate something the source does not have: never a silent pass.
        where = f"the target has it ({target.type}, {_count(target.count)} documents)" if target.exists else (
            "nor does the target"
        )
        return result("mismatch", [f"namespace does not exist in the source; {where}"], False, False)
    if not target.exists:
        return result(
            "missing_in_target",
            [f"namespace does not exist in the target (source: {source.type}, {_count(source.count)} documents)"],
            False, False,
        )

    differences: list[str] = []
    if source.type != target.type:
        differences.append(f"type: source {source.type}, target {target.type}")
    if source.count != target.count:
        delta = (target.count or 0) - (source.count or 0)
        differences.append(f"document count: source {source.count:,}, target {target.count:,} ({delta:+,})")
    index_lines = _index_differences(source.indexes, target.indexes)
    option_lines = _option_differences(source.options, target.options)
    differences += index_lines + option_lines
    # A digest missing on one side only follows from a type difference (views have none), reported above.
    if source.digest and target.digest and source.digest != target.digest:
        source_algorithm, target_algorithm = digest_algorithm(source.digest), digest_algorithm(target.digest)
        if source_algorithm != target_algorithm:
            # Snapshots from different versions: nothing can be concluded, so never a pass.
            differences.append(
                f"content digests use different algorithms (source {source_algorithm}, target "
                f"{target_algorithm}): snapshot both sides with the same version"
            )
        else:
            differences.append(
                f"content digest differs ({source_algorithm} source {_digest_hex(source.digest)[:12]}…, "
                f"target {_digest_hex(target.digest)[:12]}…)"
            )
    return result("mismatch" if differences else "match", differences, not index_lines, not option_lines)


# --------------------------------------------------------------------------------------------------------
# Document-level differences (I/O)
# --------------------------------------------------------------------------------------------------------

# mongod's canonical type order for sorting (bsontypes.cpp canonicalizeBSONType).
_RANK_MINKEY, _RANK_NULL, _RANK_NUMBER, _RANK_STRING, _RANK_OBJECT, _RANK_ARRAY = -1, 5, 10, 15, 20, 25
_RANK_BINARY, _RANK_OBJECTID, _RANK_BOOL, _RANK_DATE, _RANK_TIMESTAMP, _RANK_REGEX = 30, 35, 40, 45, 47, 50
_RANK_CODE, _RANK_CODE_WITH_SCOPE, _RANK_MAXKEY, _RANK_UNKNOWN = 60, 65, 100, 200


def bson_sort_key(value: Any) -> tuple:
    """A key that orders decoded BSON values as MongoDB sorts them (simple collation).

    Numbers compare by value across int/long/double/decimal (NaN first), documents field by field (type,
    then name, then value), binary by length, then subtype, then bytes. It only has to agree with the
    server most of the time: ``find_document_differences`` confirms every unpaired document with a point
    lookup, so a disagreement costs a query, never a false report.
    """
    if isinstance(value, MinKey):
        return (_RANK_MINKEY,)
    if isinstance(value, MaxKey):
        return (_RANK_MAXKEY,)
    if value is None:
        return (_RANK_NULL,)
    if isinstance(value, bool):  # before int: bool is an int subclass
        return (_RANK_BOOL, value)
    if isinstance(value, int | float):
        return (_RANK_NUMBER, 0) if isinstance(value, float) and math.isnan(value) else (_RANK_NUMBER, 1, value)
    if isinstance(value, Decimal128):
        number: Decimal = value.to_decimal()
        return (_RANK_NUMBER, 0) if number.is_nan() else (_RANK_NUMBER, 1, number)
    if isinstance(value, Code):  # before str: Code is a str subclass
        return (_RANK_CODE_WITH_SCOPE, str(value)) if value.scope is not None else (_RANK_CODE, str(value))
    if isinstance(value, str):
        # Code-point order equals UTF-8 byte order, which is what the simple collation compares.
        return (_RANK_STRING, value)
    if isinstance(value, DBRef):
        return bson_sort_key(value.as_doc())
    if isinstance(value, Mapping):
        return (_RANK_OBJECT, tuple((key[0], str(name), key) for name, key in
                                    ((name, bson_sort_key(item)) for name, item in value.items())))
    if isinstance(value, list | tuple):
        return (_RANK_ARRAY, tuple(bson_sort_key(item) for item in value))
    if isinstance(value, Binary):
        return (_RANK_BINARY, len(value), value.subtype, bytes(value))
    if isinstance(value, bytes):  # binary subtype 0 decodes to bytes
        return (_RANK_BINARY, len(value), 0, value)
    if isinstance(value, ObjectId):
        return (_RANK_OBJECTID, value.binary)
    if isinstance(value, dt.datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return (_RANK_DATE, (moment - _EPOCH) // dt.timedelta(milliseconds=1))
    if isinstance(value, DatetimeMS):
        return (_RANK_DATE, int(value))
    if isinstance(value, Timestamp):
        return (_RANK_TIMESTAMP, value.time, value.inc)
    if isinstance(value, Regex):
        return (_RANK_REGEX, str(value.pattern), str(value.flags))
    return (_RANK_UNKNOWN, type(value).__name__, repr(value))


def format_id(value: Any) -> str:
    """An ``_id`` as relaxed Extended JSON, the form an operator can paste into a query."""
    return json_util.dumps(value, json_options=json_util.RELAXED_JSON_OPTIONS)


def _merge_order(s: RawBSONDocument | None, t: RawBSONDocument | None) -> int:
    """-1 when the source document comes first (or the target is exhausted), 1 for the target, 0 if paired."""
    if t is None:
        return -1
    if s is None:
        return 1
    s_key, t_key = bson_sort_key(s["_id"]), bson_sort_key(t["_id"])
    return -1 if s_key < t_key else (1 if t_key < s_key else 0)


def find_document_differences(
    source_client: MongoClient,
    target_client: MongoClient,
    db: str,
    coll: str,
    target_db: str | None = None,
    limit: int = DEFAULT_DIFFERENCE_LIMIT,
    batch_size: int = DEFAULT_SCAN_BATCH_SIZE,
) -> list[DocumentDifference]:
    """Name up to ``limit`` documents missing from, extra in, or different in the target.

    Both sides are streamed as raw BSON sorted by ``_id`` (``batch_size`` documents at a time) and merged,
    so memory stays constant whatever the collection size. Documents are equal when their raw bytes are
    equal. A document the merge cannot pair is looked up by ``_id`` on the other side before it is
    reported, which keeps the answer right even where the servers order some ``_id`` types differently from
    ``bson_sort_key``. The sorted reads cost more than the digest's natural-order scan, which is why
    ``validate_namespaces`` only merges namespaces whose digests differ.
    """
    if limit < 1:
        raise ConfigurationError(f"limit must be at least 1, got {limit}")
    source = source_client[db][coll].with_options(codec_options=_RAW_OPTIONS)
    target = target_client[target_db or db][coll].with_options(codec_options=_RAW_OPTIONS)
    found: dict[str, DocumentDifference] = {}

    def record(kind: DifferenceKind, document: RawBSONDocument) -> None:
        shown = format_id(document["_id"])
        found.setdefault(shown, DocumentDifference(kind=kind, id=shown))

    def confirm(document: RawBSONDocument, other_side: Collection, kind: DifferenceKind) -> None:
        # $eq so that a regex _id is matched as a value, not used as a pattern.
        counterpart = other_side.find_one({"_id": {"$eq": document["_id"]}})
        if counterpart is None:
            record(kind, document)
        elif counterpart.raw != document.raw:
            # Reported under the source's _id whichever side the merge met first.
            record("different", document if kind == "missing_in_target" else counterpart)

    source_docs, target_docs = _documents_by_id(source, batch_size), _documents_by_id(target, batch_size)
    s, t = next(source_docs, None), next(target_docs, None)
    while (s is not None or t is not None) and len(found) < limit:
        order = _merge_order(s, t)
        if order < 0:
            confirm(s, target, "missing_in_target")
            s = next(source_docs, None)
        elif order > 0:
            confirm(t, source, "extra_in_target")
            t = next(target_docs, None)
        else:
            if s.raw != t.raw:
                record("different", s)
            s, t = next(source_docs, None), next(target_docs, None)
    return list(found.values())[:limit]


# --------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationTotals:
    namespaces: int
    matched: int
    mismatched: int
    # Collections only: a view's documents are its source collection's and would be counted twice.
    source_documents: int
    target_documents: int

    def to_dict(self) -> dict[str, int]:
        return {
            "namespaces": self.namespaces, "matched": self.matched, "mismatched": self.mismatched,
            "source_documents": self.source_documents, "target_documents": self.target_documents,
        }


@dataclass(frozen=True)
class ValidationReport:
    """Run metadata plus one ``NamespaceResult`` per namespace, sorted by namespace."""

    run_id: str
    strategy: str
    mode: str
    started_at: str
    finished_at: str
    seconds: float
    results: list[NamespaceResult]
    # What the strategy wants the reader to know about how the data got there (e.g. a fallback taken).
    notes: list[str] = field(default_factory=list)

    @property
    def totals(self) -> ValidationTotals:
        matched = sum(1 for r in self.results if r.ok)
        return ValidationTotals(
            namespaces=len(self.results),
            matched=matched,
            mismatched=len(self.results) - matched,
            source_documents=sum(r.source.count or 0 for r in self.results if r.source.type != "view"),
            target_documents=sum(r.target.count or 0 for r in self.results if r.target.type != "view"),
        )

    @property
    def mismatches(self) -> list[NamespaceResult]:
        return [r for r in self.results if not r.ok]

    @property
    def verdict(self) -> Literal["PASS", "FAIL"]:
        # Validating nothing proves nothing: an empty list (a planning bug, usually) must not read as PASS.
        return "PASS" if self.results and not self.mismatches else "FAIL"

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "strategy": self.strategy,
            "mode": self.mode,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "seconds": self.seconds,
            "verdict": self.verdict,
            "totals": self.totals.to_dict(),
            "namespaces": [r.to_dict() for r in self.results],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ValidationReport:
        return cls(
            run_id=data["run_id"], strategy=data["strategy"], mode=data["mode"], started_at=data["started_at"],
            finished_at=data["finished_at"], seconds=data["seconds"],
            results=[NamespaceResult.from_dict(item) for item in data["namespaces"]],
            notes=list(data.get("notes") or []),
        )


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _checked_namespaces(namespaces: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    checked: set[tuple[str, str]] = set()
    for item in namespaces:
        if (
            not isinstance(item, tuple | list) or len(item) != 2
            or not all(isinstance(part, str) and part for part in item)
        ):
            raise ConfigurationError(f"namespace {item!r} must be a (database, collection) pair of names")
        checked.add((item[0], item[1]))
    return sorted(checked)


# Databases that tools keep on the target for themselves, never migrated data.
TOOL_DATABASES = frozenset({"mongosync_reserved_for_internal_use"})


def scope_at_fence(
    source_namespaces: Iterable[tuple[str, str]],
    target_namespaces: Iterable[tuple[str, str]],
    selected: Callable[[str, str], bool],
    target_db_prefix: str = "",
) -> list[tuple[str, str]]:
    """What a live migration validates: the selected namespaces as the source has them now (after the
    cutover fence, when no write can change them), so a collection created during the sync is checked and
    one dropped during it is not; plus every selected namespace present only on the target (named by its
    source namespace), which ``compare_namespace`` reports as a mismatch. Pure: plain lists in, sorted list out.
    """
    from atlas_migration.namespaces import is_never_migrated

    scope = {(db, coll) for db, coll in source_namespaces if not is_never_migrated(db, coll) and selected(db, coll)}
    for target_db, coll in target_namespaces:
        if target_db in TOOL_DATABASES or not target_db.startswith(target_db_prefix):
            continue
        db = target_db[len(target_db_prefix):]
        if db and not is_never_migrated(db, coll) and selected(db, coll):
            scope.add((db, coll))
    return sorted(scope)


def list_namespaces(client: MongoClient) -> list[tuple[str, str]]:
    """Every ``(db, collection)`` of a deployment (views included), system databases skipped."""
    from atlas_migration.inspection import driver_refusal
    from atlas_migration.namespaces import SYSTEM_DATABASES

    # Names the driver refuses were refused at planning when selected; the others are excluded: skip them.
    return [(db, name) for db in client.list_database_names()
            if db not in SYSTEM_DATABASES and not driver_refusal(client, db)
            for name in client[db].list_collection_names() if not driver_refusal(client, db, name)]


def validate_namespaces(
    source_client: MongoClient,
    target_client: MongoClient,
    namespaces: list[tuple[str, str]],
    *,
    mode: str = "counts",
    target_db_map: dict[str, str] | None = None,
    run_id: str = "",
    strategy: str = "",
    difference_limit: int = DEFAULT_DIFFERENCE_LIMIT,
    batch_size: int = DEFAULT_SCAN_BATCH_SIZE,
) -> ValidationReport:
    """Compare every ``(db, coll)`` of the source with the target's ``(target_db_map.get(db, db), coll)``.

    In full mode each side is scanned once in natural order for its digest (source and target at the same
    time); only a namespace whose digests differ is then merged document by document in ``_id`` order to
    name the first ``difference_limit`` differing ``_id`` values. ``batch_size`` is the cursor batch of
    every scan.
    """
    _check_mode(mode)
    selected = _checked_namespaces(namespaces)
    db_map = dict(target_db_map or {})
    started_at, clock = _utc_now(), time.monotonic()
    results: list[NamespaceResult] = []
    # Each database's catalog is listed once per side (a deployment may hold thousands of collections, and
    # a listing per namespace is a round trip each); the entries are read at the database's first namespace.
    catalogs: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = {}

    def catalog(side: str, client: MongoClient, db: str) -> dict[str, Mapping[str, Any]]:
        if (side, db) not in catalogs:
            catalogs[(side, db)] = list_catalog(client, db)
        return catalogs[(side, db)]

    # Source and target are different deployments: reading both at once halves the wall-clock time.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="validation") as pool:
        for db, coll in selected:
            target_db = db_map.get(db, db)
            source_future = pool.submit(
                snapshot_namespace, source_client, db, coll, mode=mode, batch_size=batch_size,
                catalog=catalog("source", source_client, db),
            )
            target_future = pool.submit(
                snapshot_namespace, target_client, target_db, coll, mode=mode, batch_size=batch_size,
                catalog=catalog("target", target_client, target_db),
            )
            result = compare_namespace(source_future.result(), target_future.result())
            if result.digest_differs:
                found = find_document_differences(
                    source_client, target_client, db, coll, target_db, limit=difference_limit,
                    batch_size=batch_size,
                )
                result = result.with_document_differences(found, difference_limit)
            results.append(result)
    return ValidationReport(
        run_id=run_id, strategy=strategy, mode=mode, started_at=started_at, finished_at=_utc_now(),
        seconds=round(time.monotonic() - clock, 3), results=sorted(results, key=lambda r: r.namespace),
    )


# --------------------------------------------------------------------------------------------------------
# Rendering (pure) and writing
# --------------------------------------------------------------------------------------------------------


def _headline(report: ValidationReport) -> str:
    totals = report.totals
    if report.verdict == "PASS":
        outcome = "the 1 namespace matches" if totals.namespaces == 1 else f"all {totals.namespaces} namespaces match"
    elif not totals.namespaces:
        outcome = "no namespaces were validated"
    else:
        outcome = f"{totals.mismatched} of {totals.namespaces} namespaces do not match"
    context = [f"{report.mode} mode"]
    if report.strategy:
        context.append(f"strategy {report.strategy}")
    if report.run_id:
        context.append(f"run {report.run_id}")
    return f"Validation {report.verdict}: {outcome} ({', '.join(context)})"


def _cell(text: object) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    # Collection names may contain markdown characters (_ * |); a code span shows them literally.
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _count(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _type_cell(result: NamespaceResult) -> str:
    if not result.target.exists or result.source.type == result.target.type or not result.source.exists:
        return result.source.type or result.target.type or "—"
    return f"{result.source.type} → {result.target.type}"


def _metadata_cell(matches: bool, result: NamespaceResult, count: int | None = None) -> str:
    if not (result.source.exists and result.target.exists):
        return "—"
    if not matches:
        return "DIFFERS"
    return "ok" if count is None else f"ok ({count})"


_STATUS_CELL = {"match": "match", "mismatch": "MISMATCH", "missing_in_target": "MISSING IN TARGET"}


def render_markdown(report: ValidationReport) -> str:
    """The human report: verdict line, run metadata, one table row per namespace, then every difference."""
    totals = report.totals
    lines = [
        "# Migration validation",
        "",
        f"**{_headline(report)}**",
        "",
        f"- Run: {report.run_id or '—'}",
        f"- Strategy: {report.strategy or '—'}",
        f"- Mode: {report.mode}" + (" (counts, indexes and options)" if report.mode == "counts" else
                                    " (counts, indexes, options and a digest of every document)"),
        f"- Started: {report.started_at}; finished: {report.finished_at} ({report.seconds:.1f} s)",
        f"- Namespaces: {totals.namespaces} ({totals.matched} matched, {totals.mismatched} mismatched)",
        f"- Documents (collections, views excluded): source {totals.source_documents:,}, "
        f"target {totals.target_documents:,}",
        *[f"- Note: {note}" for note in report.notes],
        "",
        "| namespace | type | source count | target count | indexes | options | verdict |",
        "|---|---|---:|---:|---|---|---|",
    ]
    for r in report.results:
        name = r.namespace if r.target_namespace == r.namespace else f"{r.namespace} → {r.target_namespace}"
        index_count = len(r.source.indexes) if r.source.type != "view" else None
        lines.append(
            "| " + " | ".join(_cell(cell) for cell in (
                name, _type_cell(r), _count(r.source.count), _count(r.target.count),
                _metadata_cell(r.indexes_match, r, index_count), _metadata_cell(r.options_match, r),
                _STATUS_CELL[r.status],
            )) + " |"
        )
    lines += ["", "## Differences", ""]
    if not report.results:
        lines.append("No namespaces were validated.")
    elif not report.mismatches:
        lines.append("None: every namespace matches.")
    for r in report.mismatches:
        lines += [f"### {_code(r.namespace)}", ""]
        lines += [f"- {difference}" for difference in r.differences]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _quoted(result: NamespaceResult) -> str:
    shown = "; ".join(result.differences[:_QUOTED_DIFFERENCES])
    more = len(result.differences) - _QUOTED_DIFFERENCES
    return shown + (f" (+{more} more)" if more > 0 else "")


def render_summary(report: ValidationReport, max_namespaces: int = 20) -> str:
    """A few lines for the task log: the verdict, totals, and each mismatch with its first differences."""
    totals = report.totals
    lines = [
        _headline(report),
        f"  documents: source {totals.source_documents:,}, target {totals.target_documents:,}; "
        f"{report.seconds:.1f} s",
        *[f"  note: {note}" for note in report.notes],
    ]
    mismatches = report.mismatches
    lines += [f"  {r.namespace}: {r.status}: {_quoted(r)}" for r in mismatches[:max_namespaces]]
    if len(mismatches) > max_namespaces:
        lines.append(f"  ... and {len(mismatches) - max_namespaces} more (see validation.md)")
    return "\n".join(lines)


def write_report(report: ValidationReport, out_dir: Path) -> dict[str, str]:
    """Write ``validation.json`` and ``validation.md`` under ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out_dir / "validation.json", out_dir / "validation.md"
    json_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    markdown_path.write_text(render_markdown(report), encoding="utf-8")
    return {"json": str(json_path), "markdown": str(markdown_path)}


def raise_if_failed(report: ValidationReport) -> None:
    """Raise ``ValidationFailed`` naming every mismatching namespace with its first differences."""
    if report.verdict == "PASS":
        return
    lines = [_headline(report) + ":"]
    if not report.results:
        lines.append("- check the migration plan: it selected no namespaces")
    lines += [f"- {r.namespace} ({r.status.replace('_', ' ')}): {_quoted(r)}" for r in report.mismatches]
    # Differences hold only names, counts and metadata; redact anyway in case an option value carries a URI.
    raise ValidationFailed(redact("\n".join(lines)))
