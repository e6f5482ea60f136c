"""The work the benchmark's child processes do: ceilings, dump, restore, copy, validation, tools.

Every function takes a ``Meter`` first and keyword arguments that pickle (URIs, names, paths, numbers),
connects its own clients (a child shares nothing with the parent) and wraps exactly the measured stretch
in ``meter.section``. Setup that a real task would not repeat per document, such as building the
ceiling's batches, stays outside the sections. Functions raise when the work did not do what it should
(wrong document count, validation mismatch), so a broken engine never shows up as a fast one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pymongo
from bson.raw_bson import RawBSONDocument

from atlas_migration.engines import mongotools, native
from atlas_migration.progress import Progress
from atlas_migration.validation import render_summary, validate_namespaces
from bench.datagen import CEILING_STREAM, RAW_CODEC_OPTIONS, DocumentFactory
from bench.measure import Meter

log = logging.getLogger("bench.workers")


def _client(uri: str) -> pymongo.MongoClient:
    return pymongo.MongoClient(uri, serverSelectionTimeoutMS=30_000)


def _progress(step: str, db: str, coll: str) -> Progress:
    # The DAG's tasks pass one, so the measured path includes its per-document bookkeeping; its lines go to
    # a logger nobody configured in the child, so they are dropped.
    return Progress(f"{step} {db}.{coll}", None, log)


# ------------------------------------------------------------------------------------------------ ceilings
def _insert_in_threads(collection: Any, batches: list[list[RawBSONDocument]], threads: int) -> None:
    if threads == 1:
        for batch in batches:
            collection.insert_many(batch, ordered=False)
        return
    failures: list[BaseException] = []

    def insert_share(share: list[list[RawBSONDocument]]) -> None:
        try:
            for batch in share:
                collection.insert_many(batch, ordered=False)
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the calling thread
            failures.append(exc)

    # Striped shares: every thread gets the same number of batches give or take one.
    workers = [threading.Thread(target=insert_share, args=(batches[i::threads],)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if failures:
        raise failures[0]


def insert_ceiling(
    meter: Meter,
    *,
    target_uri: str,
    db: str,
    doc_bytes: int,
    seed: int,
    documents: int,
    batch_sizes: Sequence[int],
    thread_counts: Sequence[int],
) -> None:
    """The target's raw bulk-insert throughput: pre-built raw batches, ``insert_many(ordered=False)``.

    One section per (batch size, threads) trial, each into a fresh collection (as a restore inserts into a
    freshly created one), dropped afterwards. Documents are encoded before any timing starts.
    """
    factory = DocumentFactory(doc_bytes, seed)
    raws = list(factory.documents(CEILING_STREAM, documents))
    total_bytes = sum(len(raw) for raw in raws)
    with _client(target_uri) as client:
        database = client[db]
        for batch_docs in batch_sizes:
            batches = [
                [RawBSONDocument(raw, RAW_CODEC_OPTIONS) for raw in raws[start:start + batch_docs]]
                for start in range(0, len(raws), batch_docs)
            ]
            for threads in thread_counts:
                name = f"ceiling_b{batch_docs}_t{threads}"
                database.drop_collection(name)
                database.create_collection(name)
                collection = database.get_collection(name, codec_options=RAW_CODEC_OPTIONS)
                with meter.section(f"insert batch={batch_docs} threads={threads}") as section:
                    _insert_in_threads(collection, batches, threads)
                section.documents, section.bytes = len(raws), total_bytes
                section.extra = {"batch_docs": batch_docs, "threads": threads}
                inserted = collection.estimated_document_count()
                database.drop_collection(name)
                if inserted != len(raws):
                    raise RuntimeError(f"ceiling trial {name} inserted {inserted} of {len(raws)} documents")


def read_ceiling(
    meter: Meter,
    *,
    source_uri: str,
    db: str,
    collections: Sequence[str],
    batch_sizes: Sequence[int],
    sorted_collection: str,
) -> None:
    """The source's raw read throughput: every collection read whole as ``RawBSONDocument``.

    One section per cursor batch size (0 is the server's default), each reading every collection; then one
    section reading ``sorted_collection`` sorted by ``_id``, which is what full validation asks for.
    """
    with _client(source_uri) as client:
        database = client.get_database(db, codec_options=RAW_CODEC_OPTIONS)
        for batch_size in batch_sizes:
            with meter.section(f"read batch={batch_size or 'server default'}") as section:
                for name in collections:
                    # Touching .raw is what the dump does with each document; nothing is decoded.
                    for document in database[name].find({}, batch_size=batch_size):
                        section.documents += 1
                        section.bytes += len(document.raw)
            section.extra = {"batch_size": batch_size}
        with meter.section(f"read {sorted_collection} sorted by _id") as section:
            for document in database[sorted_collection].find({}, sort=[("_id", 1)]):
                section.documents += 1
                section.bytes += len(document.raw)


# -------------------------------------------------------------------------------------------- the engine
def dump(
    meter: Meter,
    *,
    source_uri: str,
    db: str,
    collections: Sequence[str],
    out_root: str,
    gzip: bool,
    batch_size: int,
) -> list[dict[str, Any]]:
    """``native.dump_collection`` for each collection, one section each."""
    results = []
    with _client(source_uri) as client:
        for name in collections:
            with meter.section(f"dump {name}") as section:
                result = native.dump_collection(
                    client, db, name, out_root, batch_size=batch_size, gzip=gzip, progress=_progress("dump", db, name),
                )
            section.documents, section.bytes = result.documents, result.bytes
            section.extra = {"file_bytes": result.file_bytes}
            results.append(result.to_dict())
    return results


def restore(
    meter: Meter,
    *,
    target_uri: str,
    dump_root: str,
    db: str,
    collections: Sequence[str],
    target_db: str,
    workers: int,
    batch_docs: int,
) -> list[dict[str, Any]]:
    """``native.restore_collection`` (drop, create, insert, build indexes) for each collection, one section each."""
    results = []
    with _client(target_uri) as client:
        for name in collections:
            with meter.section(f"restore {name}") as section:
                result = native.restore_collection(
                    client, dump_root, db, name, target_db=target_db, drop=True, insert_batch_docs=batch_docs,
                    workers=workers, progress=_progress("restore", db, name),
                )
            section.documents, section.bytes = result.documents, result.bytes
            section.extra = {"indexes_created": result.indexes_created}
            results.append(result.to_dict())
    return results


def copy(
    meter: Meter,
    *,
    source_uri: str,
    target_uri: str,
    db: str,
    collections: Sequence[str],
    dump_root: str,
    target_db: str,
    workers: int,
    batch_docs: int,
) -> None:
    """End to end: dump every collection, then restore every one, as the DAG does (restores map over dumps).

    One section over the whole copy; the dump and restore shares of it go into the section's ``extra``.
    """
    with _client(source_uri) as source, _client(target_uri) as target, meter.section("copy") as section:
        dumped = [
            native.dump_collection(source, db, name, dump_root, batch_size=batch_docs, progress=_progress("dump", db, name))
            for name in collections
        ]
        restored = [
            native.restore_collection(
                target, dump_root, db, name, target_db=target_db, drop=True, insert_batch_docs=batch_docs,
                workers=workers, progress=_progress("restore", db, name),
            )
            for name in collections
        ]
    section.documents = sum(r.documents for r in restored)
    section.bytes = sum(r.bytes for r in restored)
    section.extra = {
        "dump_seconds": round(sum(d.seconds for d in dumped), 3),
        "restore_seconds": round(sum(r.seconds for r in restored), 3),
        "dumped_documents": sum(d.documents for d in dumped),
    }


def validate(
    meter: Meter,
    *,
    source_uri: str,
    target_uri: str,
    db: str,
    collections: Sequence[str],
    target_db: str,
    mode: str,
) -> None:
    """``validation.validate_namespaces`` over the given collections; raises unless the verdict is PASS."""
    with _client(source_uri) as source, _client(target_uri) as target:
        with meter.section(f"validate {mode}") as section:
            report = validate_namespaces(
                source, target, [(db, name) for name in collections], mode=mode, target_db_map={db: target_db},
            )
    if report.verdict != "PASS":
        raise RuntimeError(f"the copy does not validate:\n{render_summary(report)}")
    section.documents = report.totals.source_documents
    section.extra = {"verdict": report.verdict, "report_seconds": report.seconds}


# ------------------------------------------------------------------------------------ MongoDB Database Tools
def tools_copy(
    meter: Meter,
    *,
    source_uri: str,
    target_uri: str,
    db: str,
    collections: Sequence[str],
    out_dir: str,
    target_db: str,
    workers: int,
) -> None:
    """mongodump of each collection (gzip), then one mongorestore of them all into ``target_db``."""
    with mongotools.tool_config_file(source_uri) as config, meter.section("mongodump") as dumped:
        for name in collections:
            mongotools.run_tool(mongotools.mongodump_argv(config, out_dir, db, name, gzip=True), log=log)
    with mongotools.tool_config_file(target_uri) as config, meter.section("mongorestore") as restored:
        argv = mongotools.mongorestore_argv(
            config, out_dir, [(db, name) for name in collections], drop=True, gzip=True, workers=workers,
            target_db=target_db,
        )
        result = mongotools.run_tool(argv, log=log)
    # mongodump reports no count; the parent knows the dataset and fills documents and bytes in.
    dumped.extra = {"files": sorted(p.name for p in Path(out_dir, db).iterdir())}
    restored.documents = result.documents_restored or 0


__all__ = ["copy", "dump", "insert_ceiling", "read_ceiling", "restore", "tools_copy", "validate"]
