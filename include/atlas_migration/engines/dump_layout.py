"""mongodump's directory layout, read and written with plain file I/O (no server involved).

``mongodump --out ROOT [--gzip]`` writes, per collection::

    ROOT/<db>/<coll>.bson[.gz]            concatenated BSON documents (each starts with its int32 LE length)
    ROOT/<db>/<coll>.metadata.json[.gz]   {"options": {...}, "indexes": [...], "uuid": "<hex>",
                                           "collectionName": "<coll>", "type": "collection"|"view"|"timeseries"}

The metadata is canonical Extended JSON v2 in that key order; ``options`` is omitted when empty and ``uuid``
when unknown. Views have only a metadata file. mongodump writes a time-series collection's buckets as
``system.buckets.<coll>.bson``; this package's native engine instead stores the measurements as
``<coll>.bson`` (see ``native``).

File names are the collection name escaped with Go's ``url.QueryEscape`` as mongodump does (``sp ace`` ->
``sp+ace``, ``c++`` -> ``c%2B%2B``, ``a/b`` -> ``a%2Fb``, ``données`` -> ``donn%C3%A9es``; dots are kept, so
``daily.rollups`` -> ``daily.rollups.bson.gz``) and decoded with ``QueryUnescape`` as mongorestore does.
Names whose escaped form exceeds 238 bytes are cut to 208 bytes plus ``%24`` and a SHA-1 digest;
``collectionName`` in the metadata then carries the real name. Dumps written by earlier versions of this
engine (``url.PathEscape`` style: ``sp%20ace``, ``c++``) still read, told apart by ``collectionName``.
Reading accepts gzip and plain files alike.

Files are written under a temporary name and renamed into place once complete, so an interrupted dump
never leaves a file that looks finished.
"""

from __future__ import annotations

import base64
import gzip as gzip_module
import hashlib
import io
import json
import os
import queue
import re
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO
from urllib.parse import quote, quote_plus, unquote_plus

from bson import json_util
from bson.binary import Binary
from bson.json_util import CANONICAL_JSON_OPTIONS, DatetimeConversion, JSONOptions

from atlas_migration.errors import DumpFormatError

BSON_SUFFIX = ".bson"
METADATA_SUFFIX = ".metadata.json"
GZIP_SUFFIX = ".gz"
PARTIAL_SUFFIX = ".partial"
TIMESERIES_BUCKETS_PREFIX = "system.buckets."
# mongod accepts user documents up to 16 MiB; internal documents (oplog entries) may exceed that by 16 KiB.
MAX_BSON_DOCUMENT_SIZE = 16 * 1024 * 1024 + 16 * 1024
MIN_BSON_DOCUMENT_SIZE = 5  # int32 length + terminating NUL
# Go's gzip default level, which mongodump uses: a good speed/size balance for dumps.
DEFAULT_COMPRESSLEVEL = 6

# mongodump's file names: Go's url.QueryEscape of the collection name (mongorestore decodes with
# QueryUnescape). Earlier versions of this engine imitated url.PathEscape, which keeps these characters and
# writes a space as %20; reading still accepts that form (see ``_stem_candidates``).
_LEGACY_PATH_SEGMENT_SAFE = "$&+:=@"
# Longest file name mongodump allows itself is 255 bytes including ".metadata.json.gz" (17 bytes): escaped
# names longer than 238 bytes are cut to 208 bytes, then "%24" ($) and the unpadded URL-safe base64 of the
# SHA-1 of the (unescaped) name, 27 characters: 208 + 3 + 27 = 238.
_MAX_ESCAPED_NAME = 238
_TRUNCATED_PREFIX = 208
_TRUNCATION_DELIMITER = "%24"
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")

# Reading: keep $numberLong as Int64 and dates beyond datetime's range as DatetimeMS, so that writing the
# metadata back produces the same canonical JSON.
_READ_JSON_OPTIONS = JSONOptions(datetime_conversion=DatetimeConversion.DATETIME_AUTO, tz_aware=True)
_INT32 = struct.Struct("<i")


# --------------------------------------------------------------------------------------------- file names
def query_escape(name: str) -> str:
    """Go's ``url.QueryEscape``: unreserved ASCII (letters, digits, ``-_.~``) kept, space -> ``+``, every other
    byte of the UTF-8 encoding as ``%XX`` (upper-case hex)."""
    return quote_plus(name, safe="")


def query_unescape(escaped: str) -> str:
    """Go's ``url.QueryUnescape``: ``+`` -> space, ``%XX`` -> that byte; a malformed escape is an error
    (Go refuses it too), raised as ``DumpFormatError``."""
    for match in re.finditer("%", escaped):
        i = match.start()
        if len(escaped) < i + 3 or escaped[i + 1] not in _HEX_DIGITS or escaped[i + 2] not in _HEX_DIGITS:
            raise DumpFormatError(f"invalid URL escape {escaped[i:i + 3]!r} in the file name stem {escaped!r}")
    try:
        return unquote_plus(escaped, errors="strict")
    except UnicodeDecodeError:
        raise DumpFormatError(f"the file name stem {escaped!r} does not decode to UTF-8") from None


def _truncate(escaped: str, coll: str) -> str:
    if len(escaped) <= _MAX_ESCAPED_NAME:
        return escaped
    digest = base64.urlsafe_b64encode(hashlib.sha1(coll.encode()).digest()).rstrip(b"=").decode()  # noqa: S324 - mongodump's naming, not security
    return escaped[:_TRUNCATED_PREFIX] + _TRUNCATION_DELIMITER + digest


def collection_file_stem(coll: str) -> str:
    """The file-name stem mongodump writes for a collection: QueryEscape'd, and when that is longer than
    238 bytes its first 208 bytes + ``%24`` + the SHA-1 digest of the name (``collectionName`` in the
    metadata then carries the real name)."""
    return _truncate(query_escape(coll), coll)


def legacy_collection_file_stem(coll: str) -> str:
    """The stem earlier versions of this engine wrote (``url.PathEscape`` style), read for compatibility."""
    return _truncate(quote(coll, safe=_LEGACY_PATH_SEGMENT_SAFE), coll)


def _stem_candidates(coll: str) -> list[str]:
    # mongodump's form first; then this engine's earlier PathEscape-style form and the raw name (dumps by
    # old tool versions), each only when it differs. A candidate's metadata must name ``coll`` (see
    # ``_find_existing``), so "sp+ace" (mongodump's "sp ace") is never taken for the collection "sp+ace".
    stems = [collection_file_stem(coll)]
    for stem in (legacy_collection_file_stem(coll), coll):
        if stem not in stems and "/" not in stem and "\0" not in stem:
            stems.append(stem)
    return stems


def bson_path(root: Path | str, db: str, coll: str, *, gzip: bool = True) -> Path:
    """Where the data file of ``db.coll`` goes (whether or not it exists)."""
    return Path(root) / db / (collection_file_stem(coll) + BSON_SUFFIX + (GZIP_SUFFIX if gzip else ""))


def metadata_path(root: Path | str, db: str, coll: str, *, gzip: bool = True) -> Path:
    """Where the metadata file of ``db.coll`` goes (whether or not it exists)."""
    return Path(root) / db / (collection_file_stem(coll) + METADATA_SUFFIX + (GZIP_SUFFIX if gzip else ""))


def _metadata_names(directory: Path, stem: str) -> str | None:
    """The ``collectionName`` recorded in ``<stem>.metadata.json[.gz]``, or None when there is no such
    file or it has no name (dumps by old tool versions)."""
    for ext in (GZIP_SUFFIX, ""):
        path = directory / f"{stem}{METADATA_SUFFIX}{ext}"
        if path.is_file():
            name = _raw_metadata_document(path).get("collectionName")
            return name if isinstance(name, str) and name else None
    return None


def _find_existing(directory: Path, stems: list[str], suffix: str, coll: str | None = None) -> Path | None:
    for stem in stems:
        for ext in (GZIP_SUFFIX, ""):
            candidate = directory / f"{stem}{suffix}{ext}"
            if not candidate.is_file():
                continue
            if coll is not None:
                # A spelling may be another collection's file ("sp+ace" is mongodump's "sp ace" and an
                # earlier dump's "sp+ace"): take it only when its metadata names this collection or none.
                named = _metadata_names(directory, stem)
                if named is not None and named != coll:
                    continue
            return candidate
    return None


def find_bson_file(root: Path | str, db: str, coll: str) -> Path | None:
    """The existing data file of ``db.coll`` (gzip or plain), or None."""
    return _find_existing(Path(root) / db, _stem_candidates(coll), BSON_SUFFIX, coll)


def find_timeseries_buckets_file(root: Path | str, db: str, coll: str) -> Path | None:
    """mongodump's bucket file for a time-series collection (``system.buckets.<coll>.bson[.gz]``), or None."""
    return _find_existing(Path(root) / db, _stem_candidates(TIMESERIES_BUCKETS_PREFIX + coll), BSON_SUFFIX,
                          TIMESERIES_BUCKETS_PREFIX + coll)


def find_metadata_file(root: Path | str, db: str, coll: str) -> Path | None:
    """The existing metadata file of ``db.coll`` (gzip or plain), or None."""
    return _find_existing(Path(root) / db, _stem_candidates(coll), METADATA_SUFFIX, coll)


def _strip_suffix(name: str, suffix: str) -> str | None:
    for ext in (GZIP_SUFFIX, ""):
        full = suffix + ext
        if name.endswith(full) and len(name) > len(full):
            return name[: -len(full)]
    return None


def _is_truncated_stem(stem: str) -> bool:
    # mongorestore's test: a 238-byte stem containing the "%24" delimiter names its collection only in its
    # metadata file.
    return len(stem) == _MAX_ESCAPED_NAME and _TRUNCATION_DELIMITER in stem


def collection_name_for_stem(stem: str, recorded: str | None, where: object = "a dump file") -> str:
    """The collection a file-name stem stands for, given the ``collectionName`` its metadata records.

    The recorded name wins when the stem is one of its spellings (mongodump's, this engine's earlier one, or
    the raw name), which tells mongodump's ``sp+ace`` ("sp ace") from an earlier dump's ``sp+ace``. Otherwise
    the stem is decoded as mongorestore does (``QueryUnescape``); a truncated stem needs the recorded name.
    """
    if recorded and stem in (collection_file_stem(recorded), legacy_collection_file_stem(recorded), recorded):
        return recorded
    if _is_truncated_stem(stem):
        raise DumpFormatError(
            f"{where}: the file name is truncated (mongodump's '%24<digest>' form) and no metadata file "
            "records the collection's full name"
        )
    return query_unescape(stem)


def list_dumped_namespaces(root: Path | str) -> list[tuple[str, str]]:
    """Every ``(db, collection)`` with a metadata or data file under ``root``, sorted.

    Names are decoded as mongorestore decodes them (``QueryUnescape``, or ``collectionName`` from the
    metadata for truncated names and this engine's earlier file names). Time-series bucket files
    (``system.buckets.X``) are represented by their collection ``X``; mongodump's users/roles files
    (``$admin.system.*``) and non-collection files (``oplog.bson``, ``prelude.json``) are not namespaces.
    Filtering out system namespaces is the caller's business (``namespaces.NamespaceFilter``).
    """
    root = Path(root)
    if not root.is_dir():
        raise DumpFormatError(f"dump directory {root} does not exist")
    found: set[tuple[str, str]] = set()
    for db_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        db = db_dir.name
        for path in sorted(db_dir.iterdir()):
            if not path.is_file() or path.name.endswith(PARTIAL_SUFFIX) or path.name.startswith("$"):
                continue
            stem = _strip_suffix(path.name, METADATA_SUFFIX)
            if stem is not None:
                found.add((db, collection_name_for_stem(stem, _metadata_names(db_dir, stem), path)))
                continue
            stem = _strip_suffix(path.name, BSON_SUFFIX)
            if stem is None:
                continue
            if stem.startswith(TIMESERIES_BUCKETS_PREFIX):
                inner = stem[len(TIMESERIES_BUCKETS_PREFIX):]
                if not _is_truncated_stem(stem):  # a truncated one is listed through its metadata
                    found.add((db, collection_name_for_stem(inner, _metadata_names(db_dir, inner), path)))
            elif not _is_truncated_stem(stem) or _metadata_names(db_dir, stem) is None:
                found.add((db, collection_name_for_stem(stem, _metadata_names(db_dir, stem), path)))
    return sorted(found)


def dumped_files(root: Path | str, db: str, coll: str) -> list[str]:
    """The files a dump holds for ``db.coll`` under the names the writer (mongodump or this engine) gave them,
    relative to ``root`` with POSIX separators: the data file (or time-series buckets file) when there is
    one, the metadata file, and the prelude (at the root, or in the database's folder for ``--db`` dumps).

    This is what staging uploads, so that the restore, possibly on a worker without this disk, has every
    file it reads. Raises ``DumpFormatError`` when there is no metadata file for the collection.
    """
    root = Path(root)
    metadata = find_metadata_file(root, db, coll)
    if metadata is None:
        raise DumpFormatError(
            f"no metadata file for {db}.{coll} under {root / db} (expected {collection_file_stem(coll)}"
            f"{METADATA_SUFFIX}[.gz]): the dump did not write this collection"
        )
    files = [p for p in (find_timeseries_buckets_file(root, db, coll), find_bson_file(root, db, coll)) if p]
    files.append(metadata)
    for folder in (root, root / db):
        files.extend(folder / name for name in (PRELUDE_FILE + GZIP_SUFFIX, PRELUDE_FILE)
                     if (folder / name).is_file())
    return [p.relative_to(root).as_posix() for p in files]


# ------------------------------------------------------------------------------------ whole-dump checks
OPLOG_FILE = "oplog.bson"
LEGACY_INDEXES_FILE = "system.indexes.bson"


def check_restorable(root: Path | str, db: str) -> Prelude | None:
    """Refuse, before anything is written, a dump this engine cannot restore faithfully; returns its prelude.

    - a prelude naming a server older than 4.2 (``read_prelude``);
    - ``oplog.bson`` with entries (``mongodump --oplog``): the data is only consistent once those are
      replayed, which this engine does not do;
    - ``<db>/system.indexes.bson``: the index catalogue of dumps by mongodump 2.x/3.0 (servers before 3.0).
    """
    root = Path(root)
    prelude = read_prelude(root)
    for name in (LEGACY_INDEXES_FILE + GZIP_SUFFIX, LEGACY_INDEXES_FILE):
        if (root / db / name).is_file():
            raise DumpFormatError(
                f"the dump of database {db} at {root} keeps its indexes in {name}: it was written by mongodump 2.x/3.0 "
                "from a server before 3.0, a format this engine does not restore (Database Tools 100.20+ do "
                "not either); restore it with mongorestore 100.19.x into a 4.2+ server"
            )
    for name in (OPLOG_FILE + GZIP_SUFFIX, OPLOG_FILE):
        path = root / name
        if path.is_file() and next(iter(iter_bson_file(path)), None) is not None:
            raise DumpFormatError(
                f"the dump at {root} was taken with mongodump --oplog and {name} holds oplog entries that must be "
                "replayed for the data to be consistent; this engine does not replay them: restore it with "
                "mongorestore --oplogReplay"
            )
    return prelude


# ---------------------------------------------------------------------------------------------- prelude
PRELUDE_FILE = "prelude.json"
# This package's name in ToolVersion, so a reader can tell the engine's dumps from mongodump's.
ENGINE_TOOL_VERSION = "atlas-migration native engine"
# Dumps of servers older than this are refused: the Database Tools dropped them in 100.20 (restore those with
# mongorestore 100.19.x), and the engine follows the same line.
MIN_DUMP_SERVER_VERSION = (4, 2, 0)
_SERVER_VERSION_UNKNOWN = "unknown"  # what mongodump writes when it could not read the server's version


@dataclass(frozen=True)
class Prelude:
    """``prelude.json`` as mongodump (100.12+) writes it: ``{"ServerVersion":..., "ToolVersion":...}``."""

    server_version: str
    tool_version: str = ""

    def to_json(self) -> str:
        # Go's json.Marshal of mongodump's PreludeData: compact, in this key order.
        return json.dumps({"ServerVersion": self.server_version, "ToolVersion": self.tool_version},
                          separators=(",", ":"), ensure_ascii=False)

    @property
    def server_version_tuple(self) -> tuple[int, int, int] | None:
        return version_tuple(self.server_version)


def version_tuple(version: str | None) -> tuple[int, int, int] | None:
    """``"8.3.0-rc1"`` -> (8, 3, 0); None for a missing or unparseable version (as mongorestore treats it)."""
    if not version:
        return None
    core = version.split("-", 1)[0].split("+", 1)[0]
    parts = core.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1]), int(parts[2])


def write_prelude(root: Path | str, prelude: Prelude, *, gzip: bool = True) -> Path:
    """Write ``<root>/prelude.json[.gz]`` atomically (every collection's dump task may write the same one)."""
    final = Path(root) / (PRELUDE_FILE + (GZIP_SUFFIX if gzip else ""))
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_path(final)
    data = prelude.to_json().encode("utf-8")
    try:
        with open(partial, "wb") as raw:
            if gzip:
                with gzip_module.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=DEFAULT_COMPRESSLEVEL,
                                          mtime=0) as gz:
                    gz.write(data)
            else:
                raw.write(data)
        _commit(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return final


def read_prelude(root: Path | str) -> Prelude | None:
    """The dump's ``prelude.json[.gz]`` (at the root, or in the parent of a single database's folder), or
    None when there is none (mongodump before 100.12 wrote none).

    Raises ``DumpFormatError`` for a prelude that is not mongodump's JSON, has no ``ServerVersion``, or comes
    from a server this engine cannot restore (older than 4.2).
    """
    root = Path(root)
    for folder in (root, root.parent):
        for name in (PRELUDE_FILE + GZIP_SUFFIX, PRELUDE_FILE):
            path = folder / name
            if path.is_file():
                return _parse_prelude(path)
    return None


def _parse_prelude(path: Path) -> Prelude:
    try:
        raw = path.read_bytes()
        doc = json.loads(gzip_module.decompress(raw) if path.name.endswith(GZIP_SUFFIX) else raw)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError) as exc:
        raise DumpFormatError(f"{path} is not mongodump's prelude JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DumpFormatError(f"{path} is not mongodump's prelude JSON: expected an object")
    server, tool = doc.get("ServerVersion"), doc.get("ToolVersion") or ""
    if not isinstance(server, str) or not server:
        raise DumpFormatError(f"{path} has no ServerVersion: the dump's origin cannot be checked")
    return check_prelude(Prelude(server, str(tool)), path)


def check_prelude(prelude: Prelude, where: object) -> Prelude:
    """Refuse a dump whose server version is not a version or is older than 4.2; returns the prelude."""
    if prelude.server_version != _SERVER_VERSION_UNKNOWN:
        parsed = prelude.server_version_tuple
        if parsed is None:
            raise DumpFormatError(f"{where}: ServerVersion {prelude.server_version!r} is not a MongoDB version")
        if parsed < MIN_DUMP_SERVER_VERSION:
            raise DumpFormatError(
                f"the dump {where} was taken from MongoDB {prelude.server_version} (tools "
                f"{prelude.tool_version or 'unknown'}): dumps of servers older than 4.2 are not restored by this "
                "engine (nor by Database Tools 100.20+); restore it with mongorestore 100.19.x"
            )
    return prelude


# ------------------------------------------------------------------------------------------ atomic files
def _partial_path(final: Path) -> Path:
    # Same directory (so the rename is atomic), hidden, a suffix no reader accepts, and the PID so that two
    # attempts racing on one path do not write into each other's file. Named by a digest because the final
    # name may already be 255 bytes long (mongodump's limit for truncated collection names).
    digest = hashlib.sha1(final.name.encode()).hexdigest()[:20]  # noqa: S324 - a file name, not security
    return final.with_name(f".{digest}.{os.getpid()}{PARTIAL_SUFFIX}")


def partial_path(final: Path) -> Path:
    """A temporary name beside ``final`` for writing it atomically (no suffix on the final name: mongodump's
    truncated file names are already 255 bytes, the longest a file name may be)."""
    return _partial_path(final)


def _other_compression(final: Path) -> Path:
    name = final.name
    return final.with_name(name[: -len(GZIP_SUFFIX)] if name.endswith(GZIP_SUFFIX) else name + GZIP_SUFFIX)


def _commit(partial: Path, final: Path) -> None:
    os.replace(partial, final)
    # A re-run that switched compression must not leave the previous attempt's file beside the new one:
    # readers prefer .gz and would pick whichever they find first.
    _other_compression(final).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ metadata
def _uuid_hex(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, Binary | bytes):
        return bytes(value).hex()
    if hasattr(value, "hex") and not isinstance(value, str):  # uuid.UUID
        return value.hex
    return str(value).replace("-", "").lower() or None


@dataclass
class CollectionMetadata:
    """One ``<coll>.metadata.json`` document."""

    collection_name: str
    type: str = "collection"  # "collection", "view" or "timeseries"
    options: dict[str, Any] = field(default_factory=dict)
    indexes: list[dict[str, Any]] = field(default_factory=list)
    uuid: str | None = None

    @property
    def is_view(self) -> bool:
        return self.type == "view"

    @property
    def is_timeseries(self) -> bool:
        return self.type == "timeseries" or "timeseries" in self.options

    @classmethod
    def from_collection_info(cls, info: dict[str, Any], indexes: list[dict[str, Any]]) -> CollectionMetadata:
        """Build from a ``listCollections`` entry and the ``listIndexes`` result."""
        options = dict(info.get("options") or {})
        kind = info.get("type") or "collection"
        if kind == "collection" and "timeseries" in options:
            kind = "timeseries"  # some servers report time-series collections as type "collection"
        return cls(
            collection_name=info["name"],
            type=kind,
            options=options,
            indexes=[dict(ix) for ix in indexes],
            uuid=_uuid_hex((info.get("info") or {}).get("uuid")),
        )

    def to_document(self) -> dict[str, Any]:
        """The metadata document in mongodump's key order (options omitted when empty, uuid when unknown)."""
        doc: dict[str, Any] = {}
        if self.options:
            doc["options"] = self.options
        doc["indexes"] = list(self.indexes)
        if self.uuid:
            doc["uuid"] = self.uuid
        doc["collectionName"] = self.collection_name
        if self.type:
            doc["type"] = self.type
        return doc

    @classmethod
    def from_document(cls, doc: dict[str, Any], *, default_name: str | None = None) -> CollectionMetadata:
        """Parse a metadata document; dumps by old tool versions lack collectionName, uuid and type."""
        if not isinstance(doc, dict):
            raise DumpFormatError(f"metadata must be a JSON object, not {type(doc).__name__}")
        name = doc.get("collectionName") or default_name
        if not name:
            raise DumpFormatError("metadata has no collectionName and none could be derived from its file name")
        options = doc.get("options")
        indexes = doc.get("indexes")
        options = {} if options is None else options
        indexes = [] if indexes is None else indexes
        if not isinstance(options, dict) or not isinstance(indexes, list):
            raise DumpFormatError(f"metadata of '{name}': 'options' must be an object and 'indexes' a list")
        kind = doc.get("type") or ("view" if "viewOn" in options else "collection")
        return cls(
            collection_name=name, type=kind, options=dict(options), indexes=[dict(ix) for ix in indexes],
            uuid=_uuid_hex(doc.get("uuid")),
        )

    def to_json(self) -> str:
        """Canonical Extended JSON v2, compact, like mongodump's ``MarshalExtJSON(meta, true, false)``."""
        return json_util.dumps(
            self.to_document(), json_options=CANONICAL_JSON_OPTIONS, separators=(",", ":"), ensure_ascii=False
        )


def write_metadata(root: Path | str, db: str, meta: CollectionMetadata, *, gzip: bool = True) -> Path:
    """Write ``<root>/<db>/<coll>.metadata.json[.gz]`` atomically; returns its path."""
    final = metadata_path(root, db, meta.collection_name, gzip=gzip)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_path(final)
    data = meta.to_json().encode("utf-8")
    try:
        with open(partial, "wb") as raw:
            if gzip:
                with gzip_module.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=DEFAULT_COMPRESSLEVEL, mtime=0) as gz:
                    gz.write(data)
            else:
                raw.write(data)
            raw.flush()
            os.fsync(raw.fileno())
        _commit(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return final


def _raw_metadata_document(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
        text = (gzip_module.decompress(raw) if path.name.endswith(GZIP_SUFFIX) else raw).decode("utf-8")
        # An empty metadata file is "no metadata" to mongorestore: default options, no secondary indexes.
        doc = json_util.loads(text, json_options=_READ_JSON_OPTIONS) if text.strip() else {}
    except FileNotFoundError:
        raise DumpFormatError(f"metadata file {path} does not exist") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise DumpFormatError(f"metadata file {path} is not valid (gzip) Extended JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DumpFormatError(f"{path}: metadata must be a JSON object, not {type(doc).__name__}")
    return doc


def read_metadata_file(path: Path | str) -> CollectionMetadata:
    """Parse one metadata file (gzip or plain); the collection name is resolved as mongorestore does."""
    path = Path(path)
    doc = _raw_metadata_document(path)
    stem = _strip_suffix(path.name, METADATA_SUFFIX)
    recorded = doc.get("collectionName")
    recorded = recorded if isinstance(recorded, str) and recorded else None
    try:
        name = collection_name_for_stem(stem, recorded, path) if stem else recorded
        meta = CollectionMetadata.from_document(doc, default_name=name)
    except DumpFormatError as exc:
        raise DumpFormatError(f"{path}: {exc}") from None
    if name:
        meta.collection_name = name
    return meta


def read_metadata(root: Path | str, db: str, coll: str) -> CollectionMetadata:
    """The metadata of ``db.coll`` in the dump at ``root`` (gzip or plain)."""
    path = find_metadata_file(root, db, coll)
    if path is None:
        raise DumpFormatError(
            f"no metadata file for {db}.{coll} under {Path(root) / db} "
            f"(expected {collection_file_stem(coll)}{METADATA_SUFFIX}[.gz])"
        )
    return read_metadata_file(path)


# ---------------------------------------------------------------------------------------------- BSON data
# Small documents are gathered into chunks of about this size before they reach gzip: one compressor call
# per document costs more than the compression itself.
WRITE_CHUNK_BYTES = 1 << 20
# Chunks waiting for the background writer: one is enough to overlap reading and compressing, and each
# one more costs a cursor batch of memory.
BACKGROUND_QUEUE_CHUNKS = 1


def count_bson_documents(data: bytes | bytearray | memoryview, where: object = "a BSON batch") -> int:
    """Check that ``data`` is a sequence of whole BSON documents (length prefixes and terminators) and
    return how many there are. Raises ``DumpFormatError`` naming ``where`` and the byte offset."""
    view = memoryview(data)
    end = len(view)
    offset = count = 0
    while offset < end:
        if end - offset < MIN_BSON_DOCUMENT_SIZE:
            raise DumpFormatError(f"{where}: {end - offset} stray byte(s) at offset {offset}")
        (length,) = _INT32.unpack_from(view, offset)
        if length < MIN_BSON_DOCUMENT_SIZE or offset + length > end or view[offset + length - 1] != 0:
            raise DumpFormatError(f"{where}: malformed BSON document ({length} bytes declared) at offset {offset}")
        offset += length
        count += 1
    return count


class BsonFileWriter:
    """Streams raw BSON documents into ``path`` (gzip when it ends with ``.gz``).

    Bytes go to a hidden ``.<digest>.<pid>.partial`` file beside ``path`` and are renamed to ``path`` by
    ``close()``; leaving the ``with`` block on an exception (or calling ``abort()``) deletes the partial
    file instead.

    ``background=True`` moves compression and file writes to a thread fed through a short queue: zlib
    releases the GIL while it deflates, so a dump reads its next cursor batch while the previous one is
    compressed. Feed it whole batches (``write_batch``) so the queue carries megabytes, not documents.
    """

    def __init__(self, path: Path | str, *, compresslevel: int = DEFAULT_COMPRESSLEVEL,
                 background: bool = False) -> None:
        self.path = Path(path)
        self.gzip = self.path.name.endswith(GZIP_SUFFIX)
        self.documents = 0
        self.bytes = 0  # uncompressed BSON bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = _partial_path(self.path)
        self._raw: BinaryIO | None = open(self._partial, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._out: BinaryIO = (
            gzip_module.GzipFile(filename="", mode="wb", fileobj=self._raw, compresslevel=compresslevel, mtime=0)
            if self.gzip
            else self._raw
        )
        self._pending = bytearray()
        self._closed = False
        self._queue: queue.Queue[bytes | None] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        if background:
            self._queue = queue.Queue(maxsize=BACKGROUND_QUEUE_CHUNKS)
            self._thread = threading.Thread(target=self._drain, name=f"write-{self.path.name}", daemon=True)
            self._thread.start()

    # -- the background writer
    def _drain(self) -> None:
        assert self._queue is not None
        while True:
            chunk = self._queue.get()
            if chunk is None:
                return
            if self._error is None:  # after a failure keep consuming, so producers never block forever
                try:
                    self._out.write(chunk)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the producer's thread
                    self._error = exc

    def _emit(self, chunk: bytes) -> None:
        if self._queue is None:
            self._out.write(chunk)
            return
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def _flush_pending(self) -> None:
        if self._pending:
            chunk, self._pending = bytes(self._pending), bytearray()
            self._emit(chunk)

    def _stop_thread(self) -> None:
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error

    # -- writing
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path} is already closed")

    def write(self, document: bytes | bytearray | memoryview) -> None:
        """Append one BSON document, given as its raw bytes."""
        self._check_open()
        size = len(document)
        if size < MIN_BSON_DOCUMENT_SIZE or _INT32.unpack_from(document, 0)[0] != size:
            raise DumpFormatError(f"refusing to write a malformed BSON document ({size} bytes) to {self.path}")
        self._pending += document
        self.documents += 1
        self.bytes += size
        if len(self._pending) >= WRITE_CHUNK_BYTES:
            self._flush_pending()

    def write_batch(self, data: bytes) -> int:
        """Append a run of whole BSON documents (a raw cursor batch) in one write; returns how many."""
        self._check_open()
        count = count_bson_documents(data, f"refusing to write to {self.path}")
        self._flush_pending()
        self._emit(bytes(data))
        self.documents += count
        self.bytes += len(data)
        return count

    def close(self) -> Path:
        """Flush, fsync and rename into place; returns the final path."""
        if self._closed:
            return self.path
        try:
            self._flush_pending()
            self._stop_thread()
            if self._out is not self._raw:
                self._out.close()
            assert self._raw is not None
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            self._raw = None
            _commit(self._partial, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Discard everything written; the final path is left untouched."""
        self._closed = True
        self._pending = bytearray()
        try:
            self._stop_thread()
        except BaseException:  # noqa: BLE001, S110 - aborting already; the file is discarded
            pass
        for stream in (self._out, self._raw):
            try:
                if stream is not None:
                    stream.close()
            except Exception:  # noqa: BLE001, S110 - the partial file is deleted next; nothing to keep
                pass
        self._raw = None
        self._partial.unlink(missing_ok=True)

    @property
    def file_bytes(self) -> int:
        """Size of the finished file on disk (compressed size for gzip)."""
        return self.path.stat().st_size

    def __enter__(self) -> BsonFileWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _open_for_reading(path: Path) -> BinaryIO:
    if path.name.endswith(GZIP_SUFFIX):
        # A large read buffer: gzip decompression is much faster in big chunks than in 4-byte reads.
        return io.BufferedReader(gzip_module.GzipFile(filename=str(path), mode="rb"), buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)  # noqa: SIM115 - returned to a with-block


def iter_bson_file(path: Path | str, *, max_document_size: int = MAX_BSON_DOCUMENT_SIZE) -> Iterator[bytes]:
    """Yield each document of a ``.bson``/``.bson.gz`` file as raw bytes, one at a time (bounded memory).

    Raises ``DumpFormatError`` naming the file and the byte offset (in the uncompressed stream) when the
    file is truncated, the gzip stream is corrupt, or a length prefix or terminator is not valid BSON.
    """
    path = Path(path)
    offset = 0
    try:
        with _open_for_reading(path) as stream:
            while True:
                header = stream.read(4)
                if not header:
                    return
                if len(header) < 4:
                    raise DumpFormatError(
                        f"{path} is truncated: {len(header)} stray byte(s) at offset {offset} where a document "
                        "length was expected"
                    )
                (length,) = _INT32.unpack(header)
                if length < MIN_BSON_DOCUMENT_SIZE or length > max_document_size:
                    raise DumpFormatError(
                        f"{path} is not valid BSON at offset {offset}: document length {length} is outside "
                        f"[{MIN_BSON_DOCUMENT_SIZE}, {max_document_size}]"
                    )
                body = stream.read(length - 4)
                if len(body) < length - 4:
                    raise DumpFormatError(
                        f"{path} is truncated: the document at offset {offset} declares {length} bytes but "
                        f"only {len(body) + 4} remain"
                    )
                if body[-1] != 0:
                    raise DumpFormatError(
                        f"{path} is not valid BSON at offset {offset}: the {length}-byte document does not end "
                        "with a NUL byte"
                    )
                yield header + body
                offset += length
    except FileNotFoundError:
        raise DumpFormatError(f"data file {path} does not exist") from None
    except (EOFError, zlib.error, gzip_module.BadGzipFile) as exc:
        # EOFError: the gzip stream ends before its end-of-stream marker (a truncated .gz file).
        raise DumpFormatError(f"{path} is not a complete gzip stream (near uncompressed offset {offset}): {exc}") from None


def metadata_text(path: Path | str) -> str:
    """The decompressed JSON text of a metadata file (for inspection and tests)."""
    path = Path(path)
    raw = path.read_bytes()
    return (gzip_module.decompress(raw) if path.name.endswith(GZIP_SUFFIX) else raw).decode("utf-8")


__all__ = [
    "BsonFileWriter",
    "CollectionMetadata",
    "ENGINE_TOOL_VERSION",
    "Prelude",
    "bson_path",
    "check_prelude",
    "check_restorable",
    "collection_file_stem",
    "collection_name_for_stem",
    "count_bson_documents",
    "dumped_files",
    "find_bson_file",
    "find_metadata_file",
    "find_timeseries_buckets_file",
    "iter_bson_file",
    "legacy_collection_file_stem",
    "list_dumped_namespaces",
    "metadata_path",
    "metadata_text",
    "partial_path",
    "query_escape",
    "query_unescape",
    "read_metadata",
    "read_metadata_file",
    "read_prelude",
    "write_metadata",
    "version_tuple",
    "write_prelude",
]
