"""The built-in dump/restore engine, used when mongodump/mongorestore are not on ``PATH``.

Documents travel as raw BSON end to end: the dump reads them with ``RawBSONDocument`` and writes their bytes
straight into ``<coll>.bson.gz``; the restore wraps the file's bytes in ``RawBSONDocument`` again and inserts
them. Nothing is decoded, so values keep their exact types and bytes (Decimal128, UUID subtypes, dates
outside Python's range, field order), and memory stays bounded by one cursor batch / one insert batch
whatever the collection's size.

The dump directory follows mongodump's layout (``dump_layout``), ``prelude.json`` included, so mongorestore
can restore what this engine dumps and this engine can restore what mongodump dumps. Time-series
collections are dumped as mongodump dumps them, as buckets (``system.buckets.<coll>.bson`` before 8.3,
``<coll>.bson`` read with ``rawData`` from 8.3), whenever the source exposes its buckets; a source that
exposes none (some MongoDB-compatible servers) gets its measurements written as ``<coll>.bson`` with a
pre-8.3 prelude, which only this engine restores (mongorestore would take them for buckets: a warning says
so). Restoring buckets: see ``timeseries`` (raw buckets where the target takes them, exact unpacking of
uncompressed buckets where it does not, never buckets inserted as measurements).

Restores are safe to retry: with ``drop=True`` the target collection is dropped and rebuilt from the dump,
so a second attempt after a crash leaves exactly the dumped documents; with ``drop=False`` a target that
already holds documents is refused (``TargetNotEmpty``) before anything is written.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bson import SON, Decimal128
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument

from atlas_migration.engines import timeseries
from atlas_migration.engines.dump_layout import (
    ENGINE_TOOL_VERSION,
    TIMESERIES_BUCKETS_PREFIX,
    BsonFileWriter,
    CollectionMetadata,
    Prelude,
    bson_path,
    check_restorable,
    find_bson_file,
    find_timeseries_buckets_file,
    iter_bson_file,
    read_metadata,
    write_metadata,
    write_prelude,
)
from atlas_migration.errors import ConfigurationError, DumpFormatError, MigrationError, TargetNotEmpty
from atlas_migration.namespaces import SYSTEM_DATABASES, is_never_migrated
from atlas_migration.progress import Progress

if TYPE_CHECKING:
    from pymongo import MongoClient
    from pymongo.collection import Collection
    from pymongo.database import Database

log = logging.getLogger(__name__)

RAW_CODEC_OPTIONS: CodecOptions = CodecOptions(document_class=RawBSONDocument)
DEFAULT_BATCH_SIZE = 1_000
# A cursor batch is held a few times over while pymongo receives and splits it (about 4x measured), so
# aim batches at 4 MiB rather than the server's 16 MiB cap to keep a dump's footprint near 20 MB.
DEFAULT_BATCH_BYTES = 4 * 1024 * 1024
DEFAULT_INSERT_BATCH_DOCS = 1_000
# gzip level of dumped data. A dump is a transient copy on its way into Atlas, so speed beats size: level 1
# compressed sample data about 1.6x faster than mongodump's level 6 for files about 7% larger, and the
# dump's compression thread is otherwise its bottleneck. mongorestore reads any level.
DUMP_COMPRESSLEVEL = 1
# Under the 16 MiB BSON limit so that one batch is one OP_MSG with room for the command envelope.
DEFAULT_INSERT_BATCH_BYTES = 16 * 1024 * 1024 - 64 * 1024
# listIndexes fields that createIndexes must not be given back: the server derives them.
_INDEX_FIELDS_NOT_RESTORED = frozenset({"v", "ns", "background"})


@dataclass
class DumpResult:
    """What ``dump_collection`` wrote; ``to_dict()`` is JSON-safe for XCom (no documents, no secrets)."""

    db: str
    collection: str
    type: str
    documents: int
    bytes: int  # uncompressed BSON bytes
    file_bytes: int  # bytes on disk (data + metadata, compressed when gzip)
    seconds: float
    paths: list[str] = field(default_factory=list)  # relative to the dump root, POSIX separators

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 3)
        return out


@dataclass
class RestoreResult:
    """What ``restore_collection``/``restore_view`` did; ``to_dict()`` is JSON-safe for XCom."""

    db: str
    collection: str
    target_namespace: str
    type: str
    documents: int
    bytes: int
    seconds: float
    indexes_created: int = 0
    index_seconds: float = 0.0  # of ``seconds``, building the secondary indexes after the data
    # Time series only: how the data went in ("raw buckets", "buckets unpacked", "measurements").
    timeseries_restore: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 3)
        out["index_seconds"] = round(self.index_seconds, 3)
        return out


# ----------------------------------------------------------------------------------------------- guards
def _check_source_namespace(db: str, coll: str) -> None:
    if not db or not coll:
        raise ConfigurationError(f"'{db}.{coll}' is not a namespace: database and collection are required")
    if is_never_migrated(db, coll):
        raise ConfigurationError(
            f"{db}.{coll} is never migrated: admin, local, config and system.* namespaces are not restorable "
            "into Atlas"
        )


def _check_target_namespace(target_db: str, coll: str) -> None:
    if target_db in SYSTEM_DATABASES or coll.startswith("system."):
        raise ConfigurationError(f"refusing to restore into {target_db}.{coll}: a system namespace")


def _collection_info(database: Database, name: str) -> dict[str, Any] | None:
    # Filtering by name server-side: listing a database with thousands of collections for one is wasteful.
    return next(iter(database.list_collections(filter={"name": name})), None)


# --------------------------------------------------------------------------------------------------- dump
# Documents read to estimate a collection's average size (see ``_cursor_batch_size``).
_SIZE_SAMPLE_DOCS = 16


def _cursor_batch_size(collection: Collection, batch_size: int, batch_bytes: int,
                       average_document_bytes: int | None = None) -> int:
    """Documents per cursor batch so that one batch is about ``batch_bytes``.

    The average document size comes from the caller (the DAG has it from the inventory) or else from the
    first few documents. Not ``collStats`` here: it needs its own privilege, and some servers compute it by
    reading the whole collection, which doubled the cost of a dump. An estimate is enough: the byte target
    only keeps memory in check, and the server caps every batch at 16 MiB anyway.
    """
    average = average_document_bytes or 0
    if average <= 0:
        sizes = [len(document.raw) for document in collection.find({}, limit=_SIZE_SAMPLE_DOCS,
                                                                     batch_size=_SIZE_SAMPLE_DOCS)]
        if not sizes:
            return batch_size
        average = sum(sizes) // len(sizes)
    return max(1, min(batch_size, batch_bytes // max(1, average)))


def _timeseries_reader(database: Database, coll: str, server_version: str):
    """Where a time-series collection's dump data comes from: ``(file name, cursor factory or None)``.

    As mongodump: buckets through ``rawData`` on 8.3+ (written as ``<coll>.bson``), the ``system.buckets``
    collection before (written as ``system.buckets.<coll>.bson``). A source that exposes no buckets gives
    its measurements (``<coll>.bson``, cursor None): only this engine restores those.
    """
    buckets_name = TIMESERIES_BUCKETS_PREFIX + coll
    listed = False if timeseries.supports_raw_data(server_version) else (
        _collection_info(database, buckets_name) is not None)
    layout = timeseries.layout_to_dump(server_version, listed)
    if layout == timeseries.LAYOUT_RAW_DATA:
        raw_buckets = database.get_collection(coll, codec_options=RAW_CODEC_OPTIONS)
        return coll, lambda batch: raw_buckets.aggregate_raw_batches([], batchSize=batch, rawData=True)
    if layout == timeseries.LAYOUT_BUCKETS_FILE:
        buckets = database.get_collection(buckets_name, codec_options=RAW_CODEC_OPTIONS)
        return buckets_name, lambda batch: buckets.find_raw_batches({}, batch_size=batch)
    log.warning(
        "%s.%s: the source (version %s) exposes no time-series buckets; its measurements are dumped instead, "
        "which this engine restores but mongorestore cannot (it takes <coll>.bson for buckets)",
        database.name, coll, server_version,
    )
    return coll, None


def dump_collection(
    client: MongoClient,
    db: str,
    coll: str,
    out_root: Path | str,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
    gzip: bool = True,
    compresslevel: int = DUMP_COMPRESSLEVEL,
    average_document_bytes: int | None = None,
    progress: Progress | None = None,
) -> DumpResult:
    """Dump one collection, view or time-series collection into ``out_root`` in mongodump's layout.

    ``average_document_bytes`` (from an inventory) sizes the cursor batches without a sampling query.

    The data file is written first and the metadata last, each atomically, so a dump interrupted at any
    point has no metadata file for the collection and is recognisably incomplete.
    """
    _check_source_namespace(db, coll)
    if batch_size < 1 or batch_bytes < 1:
        raise ConfigurationError("batch_size and batch_bytes must be positive")
    started = time.monotonic()
    out_root = Path(out_root)
    database = client[db]
    info = _collection_info(database, coll)
    if info is None:
        raise ConfigurationError(f"{db}.{coll} does not exist on the source: no collection or view of that name")
    is_view = info.get("type") == "view"
    indexes = [] if is_view else list(database[coll].list_indexes())
    meta = CollectionMetadata.from_collection_info(info, indexes)

    server_version = str(client.server_info().get("version") or "unknown")
    # Every collection's dump writes the same prelude (atomically), so a dump of any subset has one.
    write_prelude(out_root, Prelude(server_version, ENGINE_TOOL_VERSION), gzip=gzip)

    documents = nbytes = file_bytes = 0
    paths: list[str] = []
    if not is_view:
        raw = database.get_collection(coll, codec_options=RAW_CODEC_OPTIONS)
        data_name, open_cursor = coll, None
        if meta.is_timeseries:
            data_name, open_cursor = _timeseries_reader(database, coll, server_version)
        effective_batch = _cursor_batch_size(raw, batch_size, batch_bytes, average_document_bytes)
        # Capped collections are restored in insertion order, which is what "oldest first" means to them.
        sort = [("$natural", 1)] if meta.options.get("capped") else None
        # Raw batches are already mongodump's file format (BSON documents back to back): they go to the file
        # whole, compressed in a background thread while the next batch arrives; no document is split out.
        with BsonFileWriter(bson_path(out_root, db, data_name, gzip=gzip), compresslevel=compresslevel,
                            background=True) as writer:
            cursor = (open_cursor(effective_batch) if open_cursor is not None
                      else raw.find_raw_batches({}, batch_size=effective_batch, sort=sort))
            with cursor:
                for batch in cursor:
                    count = writer.write_batch(batch)
                    if progress is not None:
                        progress.add(count, len(batch))
        documents, nbytes = writer.documents, writer.bytes
        file_bytes += writer.file_bytes
        paths.append(writer.path.relative_to(out_root).as_posix())
    meta_file = write_metadata(out_root, db, meta, gzip=gzip)
    file_bytes += meta_file.stat().st_size
    paths.append(meta_file.relative_to(out_root).as_posix())
    result = DumpResult(
        db=db, collection=coll, type=meta.type, documents=documents, bytes=nbytes, file_bytes=file_bytes,
        seconds=time.monotonic() - started, paths=paths,
    )
    log.debug("dumped %s.%s (%s): %d documents, %d bytes in %.1fs", db, coll, meta.type, documents, nbytes,
             result.seconds)
    return result


# ------------------------------------------------------------------------------------------------ restore
def index_specs_for_restore(indexes: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The createIndexes specs for a dump's index list: ``_id_`` skipped, server-derived fields dropped."""
    specs = []
    for index in indexes:
        if index.get("name") == "_id_":
            continue  # created with the collection (also the clustered index of a clustered collection)
        specs.append({k: v for k, v in index.items() if k not in _INDEX_FIELDS_NOT_RESTORED})
    return specs


def _create_collection(database: Database, coll: str, meta: CollectionMetadata) -> None:
    from pymongo.errors import OperationFailure

    # Options go back exactly as listCollections reported them (capped/size/max, validator,
    # validationLevel/Action, collation, timeseries, expireAfterSeconds, clusteredIndex,
    # changeStreamPreAndPostImages, ...): that is what mongorestore does, and the server accepts its own.
    command = SON([("create", coll), *meta.options.items()])
    try:
        database.command(command)
    except OperationFailure as exc:
        raise MigrationError(
            f"cannot create {database.name}.{coll} with options {sorted(meta.options)}: {exc}"
        ) from None


def _create_indexes(database: Database, coll: str, meta: CollectionMetadata) -> int:
    from pymongo.errors import OperationFailure

    specs = index_specs_for_restore(meta.indexes)
    if not specs:
        return 0
    try:
        reply = database.command(SON([("createIndexes", coll), ("indexes", specs)]))
    except OperationFailure as exc:
        names = ", ".join(str(s.get("name")) for s in specs)
        reason = (exc.details or {}).get("errmsg") or str(exc)
        raise MigrationError(
            f"cannot build indexes ({names}) on {database.name}.{coll} (code {exc.code}): {str(reason)[:300]}"
        ) from None
    before, after = reply.get("numIndexesBefore"), reply.get("numIndexesAfter")
    return after - before if isinstance(before, int) and isinstance(after, int) else len(specs)


def _batches(
    documents: Iterator[bytes], max_docs: int, max_bytes: int, counter: list[int]
) -> Iterator[list[RawBSONDocument]]:
    """Group raw documents into insert batches bounded by count and bytes; ``counter`` = [docs, bytes]."""
    batch: list[RawBSONDocument] = []
    size = 0
    for raw in documents:
        if batch and (len(batch) >= max_docs or size + len(raw) > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(RawBSONDocument(raw, RAW_CODEC_OPTIONS))
        size += len(raw)
        counter[0] += 1
        counter[1] += len(raw)
    if batch:
        yield batch


def _insert_batch(collection: Collection, batch: list[RawBSONDocument], *, ordered: bool, bypass: bool,
                  raw_data: bool = False) -> None:
    from pymongo.errors import BulkWriteError, OperationFailure

    try:
        if raw_data:
            _insert_raw_data_batch(collection, batch, ordered=ordered, bypass=bypass)
            return
        collection.insert_many(batch, ordered=ordered, bypass_document_validation=bypass)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors") or [{}]
        first = errors[0]
        raise MigrationError(
            f"inserting into {collection.full_name} failed for {len(errors)} of {len(batch)} documents of a "
            f"batch; first error (code {first.get('code')}): {str(first.get('errmsg'))[:300]}"
        ) from None
    except OperationFailure as exc:
        # The whole command refused, e.g. a document of the dump that is not valid BSON (mongod checks every
        # document it receives): nothing of the batch was inserted.
        raise MigrationError(
            f"the server refused a batch of {len(batch)} documents for {collection.full_name} (code {exc.code}): "
            f"{str(exc.details.get('errmsg') if exc.details else exc)[:300]}"
        ) from None


def _insert_raw_data_batch(collection: Collection, batch: list[RawBSONDocument], *, ordered: bool,
                           bypass: bool) -> None:
    """Insert time-series buckets through the collection with ``rawData`` (MongoDB 8.3+), as mongorestore
    does there; pymongo's insert helpers cannot pass the flag, so this is the insert command itself."""
    command = SON([("insert", collection.name), ("documents", batch), ("ordered", ordered),
                   ("bypassDocumentValidation", bypass), ("rawData", True)])
    reply = collection.database.command(command)
    errors = reply.get("writeErrors") or []
    if errors:
        first = errors[0]
        raise MigrationError(
            f"inserting buckets into {collection.full_name} (rawData) failed for {len(errors)} of {len(batch)} "
            f"buckets; first error (code {first.get('code')}): {str(first.get('errmsg'))[:300]}"
        )


def _insert_all(
    collection: Collection,
    batches: Iterator[list[RawBSONDocument]],
    *,
    workers: int,
    ordered: bool,
    bypass: bool,
    progress: Progress | None = None,
    raw_data: bool = False,
) -> None:
    def insert(batch: list[RawBSONDocument]) -> None:
        _insert_batch(collection, batch, ordered=ordered, bypass=bypass, raw_data=raw_data)
        if progress is not None:
            progress.add(len(batch), sum(len(doc.raw) for doc in batch))

    if workers <= 1:
        for batch in batches:
            insert(batch)
        return

    # A bounded queue: the file reader blocks once one batch per worker is waiting, so at most about
    # 2 * workers + 1 batches exist at once (each worker also holds its encoded message while it sends).
    pending: queue.Queue[list[RawBSONDocument] | None] = queue.Queue(maxsize=workers)
    failures: list[BaseException] = []
    failed = threading.Event()

    def insert_worker() -> None:
        while True:
            batch = pending.get()
            if batch is None:
                return
            if failed.is_set():
                continue  # drain without inserting: the restore is failing anyway
            try:
                insert(batch)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread below
                failures.append(exc)
                failed.set()

    threads = [
        threading.Thread(target=insert_worker, name=f"restore-{collection.name}-{i}", daemon=True)
        for i in range(workers)
    ]
    for thread in threads:
        thread.start()
    try:
        for batch in batches:
            if failed.is_set():
                break
            pending.put(batch)
    except BaseException:
        failed.set()
        raise
    finally:
        for _ in threads:
            pending.put(None)
        for thread in threads:
            thread.join()
    if failures:
        raise failures[0]


def restore_collection(
    client: MongoClient,
    dump_root: Path | str,
    db: str,
    coll: str,
    *,
    target_db: str | None = None,
    drop: bool = False,
    insert_batch_docs: int = DEFAULT_INSERT_BATCH_DOCS,
    insert_batch_bytes: int = DEFAULT_INSERT_BATCH_BYTES,
    workers: int = 1,
    bypass_document_validation: bool = True,
    progress: Progress | None = None,
) -> RestoreResult:
    """Restore ``db.coll`` from the dump at ``dump_root`` into ``target_db`` (default: the same name).

    Order: check the dump and the target (nothing written yet), drop when asked, create the collection with
    its options, insert raw batches (``ordered=False``; ``workers`` threads share a bounded queue), then
    build the secondary indexes, after the data as mongorestore does because that is faster.

    ``bypass_document_validation`` (default on) inserts documents that the source accepted before its
    validator existed or under ``validationLevel: moderate``; it needs the ``bypassDocumentValidation``
    privilege (Atlas: the ``restore`` or ``atlasAdmin`` role).
    """
    target_db = target_db or db
    _check_source_namespace(db, coll)
    _check_target_namespace(target_db, coll)
    if insert_batch_docs < 1 or insert_batch_bytes < 1 or workers < 1:
        raise ConfigurationError("insert_batch_docs, insert_batch_bytes and workers must be positive")
    prelude = check_restorable(dump_root, db)  # legacy formats, oplog to replay, servers before 4.2
    meta = read_metadata(dump_root, db, coll)
    if meta.is_view:
        return restore_view(client, dump_root, db, coll, target_db=target_db, drop=drop)
    check_metadata(meta, f"{db}.{coll}")
    data_file = find_bson_file(dump_root, db, coll)
    layout = None
    if meta.is_timeseries:
        buckets_file = find_timeseries_buckets_file(dump_root, db, coll)
        layout = timeseries.dumped_layout(buckets_file is not None, data_file is not None,
                                          prelude.server_version if prelude else None)
        if buckets_file is not None:
            data_file = buckets_file
    if data_file is None:
        raise DumpFormatError(
            f"the dump at {dump_root} has metadata but no data file for {db}.{coll}: the dump is incomplete"
        )
    if layout is not None:
        _check_timeseries_layout(data_file, meta, layout, f"{db}.{coll}")

    database = client[target_db]
    target_ns = f"{target_db}.{coll}"
    existing = _collection_info(database, coll)
    if existing is not None and not drop:
        if existing.get("type") == "view":
            raise TargetNotEmpty(f"{target_ns} already exists as a view; set drop to replace it")
        if database[coll].find_one({}, projection={"_id": 1}) is not None:
            raise TargetNotEmpty(
                f"{target_ns} already holds documents; set drop to replace it (nothing was written)"
            )

    started = time.monotonic()
    if drop:
        database.drop_collection(coll)
    created = existing is None or drop
    if created:
        _create_collection(database, coll, meta)
    else:
        log.warning("%s exists and is empty: restoring into it without re-applying its options", target_ns)
    try:
        how, counter, indexes_started, indexes_created = _fill(
            client, database, coll, meta, data_file, layout, insert_batch_docs=insert_batch_docs,
            insert_batch_bytes=insert_batch_bytes, workers=workers, bypass=bypass_document_validation,
            progress=progress,
        )
    except BaseException:
        # A collection this attempt created is not left half-restored (bad data mid-file, an index the target
        # refuses): it is removed again, so the target holds no partial copy.
        if created:
            database.drop_collection(coll)
        raise
    finished = time.monotonic()
    result = RestoreResult(
        db=db, collection=coll, target_namespace=target_ns, type=meta.type, documents=counter[0],
        bytes=counter[1], seconds=finished - started, indexes_created=indexes_created,
        index_seconds=finished - indexes_started, timeseries_restore=how,
    )
    log.debug("restored %s.%s into %s: %d documents, %d indexes in %.1fs", db, coll, target_ns,
             result.documents, indexes_created, result.seconds)
    return result


def _fill(client: MongoClient, database: Database, coll: str, meta: CollectionMetadata, data_file: Path,
          layout: str | None, *, insert_batch_docs: int, insert_batch_bytes: int, workers: int,
          bypass: bool, progress: Progress | None) -> tuple[str | None, list[int], float, int]:
    """Insert the data, then build the indexes; returns (time-series restore mode, [docs, bytes], when the
    index build started, indexes created)."""
    counter = [0, 0]
    documents: Iterator[bytes] = iter_bson_file(data_file)
    insert_into = database.get_collection(coll, codec_options=RAW_CODEC_OPTIONS)
    raw_data = False
    how = None
    if layout in (timeseries.LAYOUT_BUCKETS_FILE, timeseries.LAYOUT_RAW_DATA):
        how, insert_into, raw_data, documents = _bucket_sink(client, database, coll, meta, data_file)
    elif layout == timeseries.LAYOUT_MEASUREMENTS:
        how = "measurements"
    capped = bool(meta.options.get("capped"))
    batches = _batches(documents, insert_batch_docs, insert_batch_bytes, counter)
    _insert_all(
        insert_into,
        batches,
        # A capped collection keeps insertion order and evicts the oldest: one ordered writer preserves it.
        workers=1 if capped else workers,
        ordered=capped,
        bypass=bypass,
        progress=progress,
        raw_data=raw_data,
    )
    indexes_started = time.monotonic()
    return how, counter, indexes_started, _create_indexes(database, coll, meta)


# Index key values MongoDB 3.4+ accepts besides non-zero numbers.
_INDEX_KEY_TYPES = frozenset({"2d", "2dsphere", "2dsphere_bucket", "hashed", "text"})


def check_metadata(meta: CollectionMetadata, ns: str) -> None:
    """Refuse, before anything is written, collection options and index specs that MongoDB 4.2+ rejects.

    Legacy index keys (values ``true``, ``0``, ``""`` of pre-3.4 servers) are not rewritten behind the
    operator's back: mongorestore too restores them only when asked (``--convertLegacyIndexes``).
    """
    if meta.options.get("autoIndexId") is False:
        raise DumpFormatError(
            f"{ns}: the dump's options set autoIndexId: false (a collection without an _id index), which MongoDB "
            "4.0+ accepts only in the local database; this collection cannot be restored as dumped"
        )
    for index in meta.indexes:
        name = index.get("name")
        key = index.get("key")
        if not isinstance(key, dict) or not key:
            raise DumpFormatError(f"{ns}: index {name!r} in the dump has no key pattern")
        for field_name, value in key.items():
            if value == "geoHaystack":
                raise DumpFormatError(
                    f"{ns}: index {name!r} is a geoHaystack index, a type removed in MongoDB 5.0; drop or replace "
                    "it in the dump's metadata (a 2d index serves the same queries)"
                )
            valid = (isinstance(value, str) and value in _INDEX_KEY_TYPES) or (
                not isinstance(value, bool) and isinstance(value, int | float | Decimal128)
                and float(value.to_decimal() if isinstance(value, Decimal128) else value) != 0
            )
            if not valid:
                raise DumpFormatError(
                    f"{ns}: index {name!r} has the legacy key value {value!r} for {field_name!r} (accepted before "
                    "MongoDB 3.4, refused since); fix the dump's metadata or restore with mongorestore "
                    "--convertLegacyIndexes"
                )


def _check_timeseries_layout(data_file: Path, meta: CollectionMetadata, layout: str, ns: str) -> None:
    """The first document must be what the layout says (a bucket, or a measurement): buckets are never
    inserted as measurements, nor measurements as buckets. Checked before anything is written."""
    first = next(iter(iter_bson_file(data_file)), None)
    if first is None:
        return
    is_bucket = timeseries.bucket_version(first) is not None
    time_field = (meta.options.get("timeseries") or {}).get("timeField")
    if layout == timeseries.LAYOUT_MEASUREMENTS and is_bucket and time_field not in _field_names(first):
        raise DumpFormatError(
            f"{ns}: {data_file.name} holds time-series buckets, but the dump has no prelude.json naming an 8.3+ "
            "server (the layout where mongodump writes buckets as <coll>.bson); refusing to insert buckets as "
            "measurements. Restore it with the prelude.json that mongodump wrote beside it"
        )
    if layout != timeseries.LAYOUT_MEASUREMENTS and not is_bucket:
        raise DumpFormatError(f"{ns}: {data_file.name} should hold time-series buckets but its first document "
                              "is not a bucket (no control.version/data)")


def _field_names(document: bytes) -> list[str]:
    return [element.name for element in timeseries.iter_elements(document)]


def _bucket_sink(client: MongoClient, database: Database, coll: str, meta: CollectionMetadata,
                 data_file: Path) -> tuple[str, Collection, bool, Iterator[bytes]]:
    """Where dumped buckets go: ``(how, collection, rawData?, documents)``.

    As mongorestore: through the collection with ``rawData`` on an 8.3+ target, into ``system.buckets.<coll>``
    before. A target that exposes no buckets gets the measurements unpacked from them, which is exact for
    uncompressed buckets only: compressed ones are refused (and the collection just created is dropped again).
    """
    target_version = str(client.server_info().get("version") or "")
    if timeseries.supports_raw_data(target_version):
        return "raw buckets", database.get_collection(coll, codec_options=RAW_CODEC_OPTIONS), True, \
            iter_bson_file(data_file)
    buckets_name = TIMESERIES_BUCKETS_PREFIX + coll
    if _collection_info(database, buckets_name) is not None:
        return "raw buckets", database.get_collection(buckets_name, codec_options=RAW_CODEC_OPTIONS), False, \
            iter_bson_file(data_file)
    spec = meta.options.get("timeseries") or {}
    time_field, meta_field = spec.get("timeField"), spec.get("metaField")
    where = f"{database.name}.{coll} ({data_file.name})"
    if not time_field:
        raise DumpFormatError(f"{where}: the metadata's timeseries options name no timeField")
    # Every bucket must unpack exactly before one is inserted (the caller drops the collection it created).
    for bucket in iter_bson_file(data_file):
        if timeseries.bucket_version(bucket) != 1:
            timeseries.unpack_bucket(bucket, time_field, meta_field, where)  # raises the precise error

    def measurements() -> Iterator[bytes]:
        for bucket in iter_bson_file(data_file):
            yield from timeseries.unpack_bucket(bucket, time_field, meta_field, where)

    log.info("%s: the target exposes no time-series buckets; restoring the measurements unpacked from the "
             "dumped buckets", where)
    return "buckets unpacked", database.get_collection(coll, codec_options=RAW_CODEC_OPTIONS), False, measurements()


def restore_view(
    client: MongoClient,
    dump_root: Path | str,
    db: str,
    view: str,
    *,
    target_db: str | None = None,
    drop: bool = False,
) -> RestoreResult:
    """Create a dumped view in ``target_db``. Its source collection must be restored first (caller's job).

    An identical view already in place is accepted as is, so retries succeed without ``drop``.
    """
    target_db = target_db or db
    _check_source_namespace(db, view)
    _check_target_namespace(target_db, view)
    check_restorable(dump_root, db)
    meta = read_metadata(dump_root, db, view)
    if not meta.is_view:
        raise ConfigurationError(f"{db}.{view} in the dump is a {meta.type}, not a view: use restore_collection")
    database = client[target_db]
    target_ns = f"{target_db}.{view}"
    started = time.monotonic()
    existing = _collection_info(database, view)
    if existing is not None:
        if not drop:
            if existing.get("type") == "view" and dict(existing.get("options") or {}) == meta.options:
                log.info("view %s already exists with the same definition", target_ns)
                return RestoreResult(db, view, target_ns, "view", 0, 0, time.monotonic() - started)
            raise TargetNotEmpty(f"{target_ns} already exists with another definition; set drop to replace it")
        database.drop_collection(view)
    _create_collection(database, view, meta)
    return RestoreResult(db, view, target_ns, "view", 0, 0, time.monotonic() - started)


__all__ = [
    "DumpResult",
    "RestoreResult",
    "dump_collection",
    "index_specs_for_restore",
    "restore_collection",
    "restore_view",
]
