"""The work the benchmark's child processes do: ceilings, dump, restore, copy, validation, tools, live sync.

Every function takes a ``Meter`` first and keyword arguments that pickle (URIs, names, paths, numbers),
connects its own clients (a child shares nothing with the parent) and wraps exactly the measured stretch
in ``meter.section``. Setup that a real task would not repeat per document, such as building the
ceiling's batches, stays outside the sections. Functions raise when the work did not do what it should
(wrong document count, validation mismatch), so a broken engine never shows up as a fast one.
"""

from __future__ import annotations

import logging
import random
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pymongo
from bson import Timestamp
from bson.raw_bson import RawBSONDocument

from atlas_migration.engines import mongotools, native
from atlas_migration.engines.live import STATE_COLLECTION, LiveSync
from atlas_migration.engines.verifier import LiveVerifier
from atlas_migration.namespaces import NamespaceFilter
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
    section reading ``sorted_collection`` sorted by ``_id``, which is what full validation's ``_id`` merge asks
    for when digests differ (the digest itself reads in natural order).
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
    average_document_bytes: int | None = None,
) -> list[dict[str, Any]]:
    """``native.dump_collection`` for each collection, one section each. ``average_document_bytes`` is
    what the DAG passes from its inventory (it sizes cursor batches without a sampling query)."""
    results = []
    with _client(source_uri) as client:
        for name in collections:
            with meter.section(f"dump {name}") as section:
                result = native.dump_collection(
                    client, db, name, out_root, batch_size=batch_size, gzip=gzip,
                    average_document_bytes=average_document_bytes, progress=_progress("dump", db, name),
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
            section.extra = {"indexes_created": result.indexes_created, "index_seconds": result.index_seconds}
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
    average_document_bytes: int | None = None,
) -> None:
    """End to end as the DAG runs it with two worker slots: collection i is restored as soon as its dump is
    done, while collection i+1 is being dumped (the DAG's per-collection mapped ``dump -> restore`` group).

    A dumping thread hands finished collections to the restoring (calling) thread. One section over the
    whole copy; the dump and restore shares of it go into the section's ``extra``.
    """
    import queue

    dumped: list[native.DumpResult] = []
    ready: queue.Queue[str | None] = queue.Queue()
    failure: list[BaseException] = []

    def dump_all(source: pymongo.MongoClient) -> None:
        try:
            for name in collections:
                dumped.append(native.dump_collection(source, db, name, dump_root, batch_size=batch_docs,
                                                     average_document_bytes=average_document_bytes,
                                                     progress=_progress("dump", db, name)))
                ready.put(name)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the restoring thread
            failure.append(exc)
        finally:
            ready.put(None)

    restored: list[native.RestoreResult] = []
    with _client(source_uri) as source, _client(target_uri) as target, meter.section("copy") as section:
        dumper = threading.Thread(target=dump_all, args=(source,), name="bench-dump", daemon=True)
        dumper.start()
        while (name := ready.get()) is not None:
            restored.append(native.restore_collection(
                target, dump_root, db, name, target_db=target_db, drop=True, insert_batch_docs=batch_docs,
                workers=workers, progress=_progress("restore", db, name),
            ))
        dumper.join()
        if failure:
            raise failure[0]
    section.documents = sum(r.documents for r in restored)
    section.bytes = sum(r.bytes for r in restored)
    section.extra = {
        "dump_seconds": round(sum(d.seconds for d in dumped), 3),
        "restore_seconds": round(sum(r.seconds for r in restored), 3),
        "index_seconds": round(sum(r.index_seconds for r in restored), 3),
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


# ------------------------------------------------------------------------------------------- live sync
LIVE_STATE_DB = "__atlas_migration"  # LiveSync's default state database (on the target)


def _live_sync(source: pymongo.MongoClient, target: pymongo.MongoClient, *, sync_id: str, db: str,
               target_db_prefix: str, batch_docs: int, partition_docs: int, copy_order: str = "auto") -> LiveSync:
    # Every child builds the same LiveSync: all progress is in the state collection, as in the DAG's tasks.
    return LiveSync(
        source, target, sync_id=sync_id, namespaces=NamespaceFilter.from_patterns([f"{db}.*"], None),
        target_db_prefix=target_db_prefix, state_db=LIVE_STATE_DB, batch_size=batch_docs,
        partition_docs=partition_docs, copy_order=copy_order, log=log,
    )


def live_initial_copy(
    meter: Meter,
    *,
    source_uri: str,
    target_uri: str,
    db: str,
    sync_id: str,
    target_db_prefix: str,
    batch_docs: int,
    partition_docs: int,
    copy_order: str = "auto",
) -> dict[str, Any]:
    """LiveSync start, plan_partitions, prepare_targets(drop=True), copy_partition of each, finish_initial_copy.

    One section over the whole sequence (what the initial copy of a live pull costs end to end).
    """
    with _client(source_uri) as source, _client(target_uri) as target:
        sync = _live_sync(source, target, sync_id=sync_id, db=db, target_db_prefix=target_db_prefix,
                          batch_docs=batch_docs, partition_docs=partition_docs, copy_order=copy_order)
        with meter.section("live initial copy") as section:
            sync.start()
            partitions = sync.plan_partitions()
            sync.prepare_targets(drop=True)
            results = [sync.copy_partition(partition) for partition in partitions]
            sync.finish_initial_copy()
        # Nothing was written meanwhile: a drained catch-up moves the saved position to now, so the
        # steady-state lag measured next does not start at the age of the start point.
        sync.catch_up()
        section.documents = sum(r.documents for r in results)
        section.bytes = sum(r.bytes for r in results)
        section.extra = {"partitions": len(partitions), "collections": len({p.namespace for p in partitions}),
                         "natural_partitions": sum(p.natural for p in partitions),
                         "index_seconds": sync.index_build_seconds() or 0.0}
    return {"partitions": len(partitions)}


def _write_ops(collection: Any, raws: Iterator[bytes], ops: int, rate: float | None,
               seed: int) -> tuple[int, int, int, int]:
    """``ops`` writes, in a repeating mix: insert, ``$inc`` update, insert, delete (half inserts, a quarter
    updates and a quarter deletes of documents this writer inserted; an update or delete with nothing to
    touch inserts instead).

    Paced to ``rate`` ops/s on a fixed schedule (a late op is not made up by a burst), or as fast as the
    server takes them without a rate. Returns (ops, inserts, deletes, bytes of the documents as the stream
    carries them: the inserted document, or the looked-up updated one; a delete carries none).
    """
    rng = random.Random(seed)
    inserted: list[tuple[Any, int]] = []  # (_id, size)
    done = inserts = deletes = nbytes = 0
    started = time.perf_counter()
    for op in range(ops):
        if rate:
            delay = started + op / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        kind = ("insert", "update", "insert", "delete")[op % 4]
        if kind == "delete" and len(inserted) > 1:
            _id, _ = inserted.pop(rng.randrange(len(inserted)))
            result = collection.delete_one({"_id": _id})
            if result.deleted_count != 1:
                raise RuntimeError(f"live writer: delete of {_id} deleted {result.deleted_count} documents")
            deletes += 1
        elif kind == "update" and inserted:
            _id, size = rng.choice(inserted)
            result = collection.update_one({"_id": _id}, {"$inc": {"items": 1}})
            if result.modified_count != 1:
                raise RuntimeError(f"live writer: update of {_id} modified {result.modified_count} documents")
            nbytes += size
        else:
            raw = next(raws)
            document = RawBSONDocument(raw)
            collection.insert_one(document)
            inserted.append((document["_id"], len(raw)))
            inserts += 1
            nbytes += len(raw)
        done += 1
    return done, inserts, deletes, nbytes


def live_writer(
    meter: Meter,
    *,
    source_uri: str,
    db: str,
    collection: str,
    doc_bytes: int,
    seed: int,
    stream: int,
    ops: int,
    rate: float | None,
) -> dict[str, Any]:
    """Writes ``ops`` operations to the source at ``rate`` ops/s (or flat out): one section."""
    factory = DocumentFactory(doc_bytes, seed)
    raws = factory.documents(stream, ops)  # lazily encoded: at 200 ops/s the encoding is negligible
    with _client(source_uri) as client:
        coll = client[db][collection]
        with meter.section(f"write {ops} ops" + (f" at {rate:g}/s" if rate else "")) as section:
            done, inserts, deletes, nbytes = _write_ops(coll, raws, ops, rate, seed + stream)
        section.documents, section.bytes = done, nbytes
        section.extra = {"inserts": inserts, "updates": done - inserts - deletes, "deletes": deletes,
                         "rate_target": rate}
    return {"ops": done, "inserts": inserts, "deletes": deletes, "bytes": nbytes}


def _percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))]


def _sample_saved_lag(source_uri: str, target_uri: str, sync_id: str, interval: float, stop: threading.Event,
                      samples: list[float]) -> None:
    """What ``LiveSync.lag()`` computes (source's latest write minus the saved position), every ``interval``.

    Without ``lag()``'s pending-entry estimate: that counts oplog entries, a scan of the whole oplog on
    SecantusDB (up to 2 s of source CPU per sample), which would load the source the writer writes to.
    """
    with _client(source_uri) as source, _client(target_uri) as target:
        state = target[LIVE_STATE_DB][STATE_COLLECTION]
        while not stop.wait(interval):
            applied = (state.find_one({"_id": sync_id}, {"last_applied_cluster_time": 1}) or {}).get(
                "last_applied_cluster_time")
            latest = ((source.admin.command("hello").get("lastWrite") or {}).get("opTime") or {}).get("ts")
            if applied is not None and latest is not None:
                samples.append(max(0.0, float(latest.time - applied.time)))


def live_steady(
    meter: Meter,
    *,
    source_uri: str,
    target_uri: str,
    db: str,
    sync_id: str,
    target_db_prefix: str,
    batch_docs: int,
    partition_docs: int,
    seconds: float,
    round_seconds: float,
    sample_seconds: float,
    drain_quiet_seconds: float,
    drain_max_seconds: float = 600.0,
) -> dict[str, Any]:
    """``catch_up`` in rounds of ``round_seconds`` for ``seconds`` while a writer runs; the lag is sampled.

    Two kinds of samples: the lag each round's ``catch_up`` saw when it stopped (``CatchUpResult``), and,
    from a thread every ``sample_seconds``, the lag of the saved position as ``lag()`` computes it. Both
    are whole seconds: cluster times have one-second resolution. Sampling starts after the first round: until
    a catch-up has run, the saved position is the start point, from before the copy, and samples measured how
    long the copy took instead of the steady state's lag (28-51 s, which alone decided the p95).
    Afterwards, outside the section, the stream is drained until it has been quiet for
    ``drain_quiet_seconds`` (the writer has stopped; up to ``drain_max_seconds``, how long it took is
    reported: a writer faster than the target leaves a backlog), so a backlog measured next starts clean.
    """
    with _client(source_uri) as source, _client(target_uri) as target:
        sync = _live_sync(source, target, sync_id=sync_id, db=db, target_db_prefix=target_db_prefix,
                          batch_docs=batch_docs, partition_docs=partition_docs)
        result_lags: list[float] = []
        saved_lags: list[float] = []
        rounds = events = 0
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_saved_lag, name="lag-sampler", daemon=True,
                                   args=(source_uri, target_uri, sync_id, sample_seconds, stop, saved_lags))
        with meter.section("live steady-state catch-up") as section:
            started = time.perf_counter()
            while time.perf_counter() - started < seconds:
                left = seconds - (time.perf_counter() - started)
                result = sync.catch_up(max_seconds=max(0.1, min(round_seconds, left)))
                rounds += 1
                events += result.events_applied
                if rounds == 1:
                    sampler.start()  # the saved position is up to date from here on
                elif result.lag_seconds is not None:
                    result_lags.append(result.lag_seconds)
            stop.set()
        if sampler.is_alive():
            sampler.join()
        drain_started = time.perf_counter()
        drained = sync.catch_up(quiet_seconds=drain_quiet_seconds, max_seconds=drain_max_seconds)
        drain_seconds = time.perf_counter() - drain_started
        if drained.stopped_because != "quiet":
            raise RuntimeError(f"live steady state: the stream did not go quiet within {drain_max_seconds:g} s after "
                               f"the writer ({drained})")
        final = sync.lag()
    samples = saved_lags + result_lags
    if not samples:
        raise RuntimeError("live steady state: no lag sample")
    section.documents = events
    section.extra = {
        "rounds": rounds, "events_after_section": drained.events_applied, "drain_seconds": round(drain_seconds, 1),
        "lag_samples": len(samples), "lag_median_s": statistics.median(samples),
        "lag_p95_s": _percentile(samples, 0.95), "lag_max_s": max(samples),
        "lag_samples_saved": saved_lags, "lag_samples_catch_up": result_lags,
        "lag_after_drain": final.to_dict(),
    }
    return section.extra


def _verifier(source: pymongo.MongoClient, target: pymongo.MongoClient, *, sync_id: str, target_db_prefix: str,
              batch_docs: int) -> LiveVerifier:
    return LiveVerifier(source, target, sync_id=sync_id, state_db=LIVE_STATE_DB, target_db_prefix=target_db_prefix,
                        batch_size=batch_docs, log=log)


def live_verify_compare(
    meter: Meter,
    *,
    source_uri: str,
    target_uri: str,
    db: str,
    sync_id: str,
    target_db_prefix: str,
    batch_docs: int,
    partition_docs: int,
) -> dict[str, Any]:
    """``LiveVerifier.compare_partition`` of every partition of the live copy (nothing writing): one section.

    Fails when a mismatch is found: the copy was exact (the copy phase checked its counts, catch-up drained).
    """
    with _client(source_uri) as source, _client(target_uri) as target:
        sync = _live_sync(source, target, sync_id=sync_id, db=db, target_db_prefix=target_db_prefix,
                          batch_docs=batch_docs, partition_docs=partition_docs)
        partitions = sync.plan_partitions()  # the stored plan
        verifier = _verifier(source, target, sync_id=sync_id, target_db_prefix=target_db_prefix,
                             batch_docs=batch_docs)
        verifier.reset()
        verifier.register_partitions(partitions)
        total_bytes = sum(source[db].command("collStats", name).get("size", 0)
                          for name in {p.collection for p in partitions})
        with meter.section("verify: compare every partition") as section:
            results = [verifier.compare_partition(partition) for partition in partitions]
        summary = verifier.summary(limit=5)
    section.documents = sum(r["documents"] for r in results)
    section.bytes = total_bytes
    section.extra = {"partitions": len(partitions), "max_documents_held": verifier.max_documents_held,
                     "mismatches": summary["mismatches"]}
    if summary["mismatches"]["open"]:
        raise RuntimeError(f"verifier compare found mismatches in an exact copy: {summary['mismatches']}")
    return section.extra


def live_verify_recheck(
    meter: Meter,
    *,
    source_uri: str,
    target_uri: str,
    db: str,
    sync_id: str,
    target_db_prefix: str,
    batch_docs: int,
    seconds: float,
    round_seconds: float,
    settle_seconds: float,
) -> dict[str, Any]:
    """Rechecks while a writer and catch-up run: the change stream's ``_id``s queued, one recheck per round.

    The engine is to call ``note_changed`` with the ids of the events it applied; here a change stream of
    the verifier's own stands in (it sees events before catch-up applies them, so an entry may stay pending
    for a round: the figure is an upper bound). Lag of an event: from its cluster time (whole seconds) to the
    end of the recheck that found its ``_id`` equal on both sides. After the writer stops, rounds go on until
    nothing is pending (at most ``settle_seconds``).
    """
    with _client(source_uri) as source, _client(target_uri) as target:
        verifier = _verifier(source, target, sync_id=sync_id, target_db_prefix=target_db_prefix,
                             batch_docs=batch_docs)
        lags: list[float] = []
        pending_max = rounds = noted = 0
        waiting: dict[Any, float] = {}  # _id -> cluster time (s) of its oldest unverified event
        newest: Timestamp | None = None  # cluster time of the newest event seen
        with source[db].watch(max_await_time_ms=200) as stream, \
                meter.section("verify: rechecks during the writer") as section:
            started = last_event = time.perf_counter()
            while True:
                now = time.perf_counter()
                if now - started > seconds + settle_seconds or (
                        now - started > seconds and not waiting and now - last_event > 2.0):
                    break
                round_end = now + round_seconds
                items = []
                while time.perf_counter() < round_end:
                    event = stream.try_next()
                    if event is None or "documentKey" not in event:
                        continue
                    items.append((event["ns"]["db"], event["ns"]["coll"], event["documentKey"]["_id"]))
                    waiting.setdefault(event["documentKey"]["_id"], float(event["clusterTime"].time))
                    newest = event["clusterTime"]
                if items:
                    last_event = time.perf_counter()
                noted += verifier.note_changed(items)
                result = verifier.recheck(max_seconds=round_seconds * 4)
                rounds += 1
                pending_max = max(pending_max, result.pending)
                still = {doc["id"] for doc in target[LIVE_STATE_DB]["verifier_recheck"].find(
                    {"sync_id": sync_id}, {"id": 1})}
                wall = time.time()
                for key in [k for k in waiting if k not in still]:
                    lags.append(max(0.0, wall - waiting.pop(key)))
        settled = _settle_after_the_writer(source, target, verifier, sync_id, db, newest)
        final = verifier.summary(limit=5)
    if not lags:
        raise RuntimeError("verifier recheck: no change was rechecked")
    section.documents = len(lags)
    section.extra = {
        "rounds": rounds, "noted": noted, "verified": len(lags), "unverified_at_end": len(waiting),
        "lag_median_s": statistics.median(lags), "lag_p95_s": _percentile(lags, 0.95), "lag_max_s": max(lags),
        "pending_max": pending_max, "pending_end": final["rechecks_pending"],
        "open_mismatches_end": final["mismatches"]["open"], "rechecked_total": final["rechecked"],
        "unverified_at_section_end": len(waiting), **settled,
    }
    return section.extra


def _settle_after_the_writer(source: pymongo.MongoClient, target: pymongo.MongoClient, verifier: Any, sync_id: str,
                             db: str, newest: Timestamp | None, timeout: float = 600.0) -> dict[str, Any]:
    """Outside the measurement: wait until the writer has stopped (no change in ``db`` for 3 s after
    ``newest``, the last one seen) and catch-up has applied everything up to its last change, then recheck
    until the verifier is clean (at most 10 rounds). A writer faster than the target leaves a backlog that
    catch-up drains after the section, and rechecks of documents it has not reached yet stay open; after
    this, an open mismatch is a difference between source and target, not a target still behind. (Not the
    source's last write: the server writes to its own databases, which no catch-up replays.)"""
    state = target[LIVE_STATE_DB][STATE_COLLECTION]
    started = last_change = time.monotonic()
    kwargs = {"start_at_operation_time": newest} if newest is not None else {}
    with source[db].watch(max_await_time_ms=500, **kwargs) as stream:
        while time.monotonic() - started < timeout:
            event = stream.try_next()
            if event is not None:
                if newest is None or event["clusterTime"] > newest:
                    newest = event["clusterTime"]
                last_change = time.monotonic()
                continue
            applied = (state.find_one({"_id": sync_id}, {"last_applied_cluster_time": 1}) or {}).get(
                "last_applied_cluster_time")
            if (time.monotonic() - last_change >= 3.0 and applied is not None
                    and (newest is None or applied >= newest)):
                break
    caught_up = round(time.monotonic() - started, 1)
    rounds = 0
    while rounds < 10:
        rounds += 1
        if verifier.recheck().clean:
            break
    return {"settle_wait_s": caught_up, "settle_rounds": rounds}


def live_role(meter: Meter, *, role: str, **kwargs: Any) -> dict[str, Any]:
    """One function for a group whose children do different work: "writer", "steady" or "verify"."""
    work = {"writer": live_writer, "steady": live_steady, "verify": live_verify_recheck}[role]
    return work(meter, **kwargs)


def live_backlog_catch_up(
    meter: Meter,
    *,
    source_uri: str,
    target_uri: str,
    db: str,
    sync_id: str,
    target_db_prefix: str,
    batch_docs: int,
    partition_docs: int,
    expected_events: int,
) -> dict[str, Any]:
    """``catch_up`` (no stop condition: until the stream is drained) over a backlog written while stopped."""
    with _client(source_uri) as source, _client(target_uri) as target:
        sync = _live_sync(source, target, sync_id=sync_id, db=db, target_db_prefix=target_db_prefix,
                          batch_docs=batch_docs, partition_docs=partition_docs)
        before = sync.lag()
        with meter.section("live catch-up of a backlog") as section:
            result = sync.catch_up()
            events, calls = result.events_applied, 1
            # "Drained" is the first empty getMore; should one come early, go on until every event is in.
            while events < expected_events and calls < 100:
                more = sync.catch_up()
                events += more.events_applied
                calls += 1
        section.documents = events
        section.extra = {"calls": calls, "lag_before_s": before.lag_seconds,
                         "pending_estimate_before": before.pending_estimate, "lag_after_s": result.lag_seconds}
    if events != expected_events:
        raise RuntimeError(f"live catch-up applied {events} events where {expected_events} were written")
    return section.extra


def live_cutover(
    meter: Meter,
    *,
    source_uri: str,
    target_uri: str,
    db: str,
    sync_id: str,
    target_db_prefix: str,
    batch_docs: int,
    partition_docs: int,
    quiet_seconds: float,
) -> dict[str, Any]:
    """``cutover`` with writes stopped, then every collection's document count on both sides."""
    with _client(source_uri) as source, _client(target_uri) as target:
        sync = _live_sync(source, target, sync_id=sync_id, db=db, target_db_prefix=target_db_prefix,
                          batch_docs=batch_docs, partition_docs=partition_docs)
        with meter.section("live cutover") as section:
            from atlas_migration.fence import take_fence

            # The bench's writer has stopped: the statement the operator would make, then the fence.
            result = sync.cutover(take_fence(source, block=False), grace_seconds=quiet_seconds, timeout=300.0)
        names = sorted(source[db].list_collection_names())
        counts = {name: (source[db][name].count_documents({}),
                         target[f"{target_db_prefix}{db}"][name].count_documents({})) for name in names}
    section.documents = sum(t for _, t in counts.values())
    section.extra = {"events_applied": result.events_applied}
    return {"events_applied": result.events_applied, "counts": counts}


__all__ = ["copy", "dump", "insert_ceiling", "live_backlog_catch_up", "live_cutover", "live_initial_copy",
           "live_role", "live_steady", "live_verify_compare", "live_verify_recheck", "live_writer", "read_ceiling",
           "restore", "tools_copy", "validate"]


# ------------------------------------------------------------------------------------------- file import
def file_import(
    meter: Meter,
    *,
    target_uri: str,
    path: str,
    fmt: str,
    db: str,
    coll: str,
    batch_docs: int,
    split_bytes: int,
    expected_rows: int,
) -> None:
    """The DAG's native file import: plan byte ranges (not measured: the plan task), then import each range
    as its mapped task does (one section per range, one after another in this process)."""
    import io
    import os

    from atlas_migration.engines import file_import as engine

    options = engine.ImportOptions(fmt)
    size = os.path.getsize(path)
    started = time.perf_counter()
    with open(path, "rb") as raw:
        header, ranges = engine.plan_ranges(io.BufferedReader(raw, 1 << 20), size, options, split_bytes)
    plan_seconds = time.perf_counter() - started
    tag = engine.file_tag(path, size)
    inserted = 0
    with _client(target_uri) as client:
        collection = client[db][coll]
        for rng in ranges:
            result = engine.RangeResult(file=path, namespace=f"{db}.{coll}", range_index=rng.index, mode="insert")
            with meter.section(f"import {fmt} range {rng.index}") as section, open(path, "rb") as raw:
                raw.seek(rng.start)
                records = engine.records(engine.open_range(raw, rng, options), rng, options, header)
                engine.import_records(collection, records, result=result, tag=tag, policy="stop", upsert_fields=[],
                                      batch_size=batch_docs)
            if result.rejected or result.already_present:
                raise RuntimeError(f"range {rng.index}: {result.rejected} rejected, {result.already_present} present")
            section.documents = result.inserted
            section.bytes = (size if rng.end < 0 else rng.end) - rng.start
            section.extra = {"plan_seconds": plan_seconds, "ranges": len(ranges)}
            inserted += result.inserted
    if inserted != expected_rows:
        raise RuntimeError(f"imported {inserted:,} documents from {path}, which holds {expected_rows:,} records")


def mongoimport_files(meter: Meter, *, target_uri: str, files: Sequence[tuple[str, str, str]], db: str) -> None:
    """mongoimport of each (path, format, collection), insert mode, one section each; the count comes from the
    target (mongoimport's summary line is not parsed)."""
    from atlas_migration.engines import file_import as engine
    from atlas_migration.strategies.file_import import mongoimport_argv

    with mongotools.tool_config_file(target_uri) as config, _client(target_uri) as client:
        for path, fmt, coll in files:
            item = {"namespace": f"{db}.{coll}", "location": path, "mode": "insert", "upsert_fields": []}
            with meter.section(f"mongoimport {fmt}") as section:
                mongotools.run_tool(mongoimport_argv(str(config), item, engine.ImportOptions(fmt)), log=log)
            section.documents = client[db][coll].estimated_document_count()
            section.bytes = Path(path).stat().st_size
