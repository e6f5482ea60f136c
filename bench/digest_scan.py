"""Does full validation's per-document hashing keep up with the raw read? ``python -m bench.digest_scan``.

A focused measurement beside the suite (``bench.run``), for the question the order-independent digest
raises: is the client's per-document sha256 the bottleneck, or the server's read? It starts a source and a
target server (SecantusDB on free loopback ports, storage in a scratch directory, both removed at the end),
writes the same documents to both (the target in reverse order, so the natural orders differ) and times,
on the same collection:

- the raw scan alone: natural order, ``RawBSONDocument``, cursor batch 1,000 (the baseline every ratio is
  against) and with the server's default batch;
- the scan plus ``multiset_digest`` (what full validation does per side), and ``snapshot_namespace`` in
  full mode (the same plus the metadata reads);
- the scan plus a blake2b-128 sum (the alternative hash);
- raw batches (``find_raw_batches``) hashed in a worker thread, fed whole batches (would moving hashing off
  the reading thread help?);
- the old ordered digest (sorted by ``_id``, server default batch, one streaming sha256);
- both sides at once, as ``validate_namespaces`` reads them: the new code, and two threads each running the
  old ordered digest.

The variants run round-robin, ``--repeats`` rounds, so a change in the machine's load touches all of them
alike; each keeps its fastest run (the machine is shared). The client's CPU time per document is printed
beside it, which tells whether the client or the server bounds the read; the CPU other processes used
during the measurement is printed at the end (compare runs only when it is low).
"""

from __future__ import annotations

import argparse
import hashlib
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
for _path in (REPO_ROOT / "include", REPO_ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import pymongo  # noqa: E402
from pymongo.collection import Collection  # noqa: E402

from atlas_migration.validation import (  # noqa: E402
    DEFAULT_SCAN_BATCH_SIZE,
    multiset_digest,
    snapshot_namespace,
    validate_namespaces,
)
from bench.datagen import RAW_CODEC_OPTIONS, DocumentFactory  # noqa: E402
from bench.measure import LoadMonitor  # noqa: E402
from devtools.mongo_servers import start_server  # noqa: E402

DB, COLL = "digest_scan", "docs"
_SEED_BATCH = 1_000


def raw_scan(collection: Collection, batch_size: int = DEFAULT_SCAN_BATCH_SIZE) -> int:
    """The baseline: every document's raw bytes touched, nothing else."""
    count = 0
    for document in collection.find({}, batch_size=batch_size):
        document.raw  # noqa: B018 - touching the bytes is the work being measured
        count += 1
    return count


def scan_multiset_digest(collection: Collection) -> int:
    count, _ = multiset_digest(d.raw for d in collection.find({}, batch_size=DEFAULT_SCAN_BATCH_SIZE))
    return count


def scan_blake2b_sum(collection: Collection) -> int:
    total, count = 0, 0
    blake2b, from_bytes = hashlib.blake2b, int.from_bytes
    for document in collection.find({}, batch_size=DEFAULT_SCAN_BATCH_SIZE):
        total += from_bytes(blake2b(document.raw, digest_size=16).digest(), "big")
        count += 1
    return count


def _split(batch: bytes) -> Iterator[memoryview]:
    view, position = memoryview(batch), 0
    while position < len(batch):
        length = int.from_bytes(view[position:position + 4], "little")
        yield view[position:position + length]
        position += length


def raw_batches_multiset_digest(collection: Collection) -> int:
    """Whole batches from the server, split by each document's length prefix: no per-document cursor step."""
    documents = (d for batch in collection.find_raw_batches({}, batch_size=DEFAULT_SCAN_BATCH_SIZE) for d in _split(batch))
    count, _ = multiset_digest(documents)
    return count


def both_sides(fn: Callable[[Collection], int], source: Collection, target: Collection) -> int:
    with ThreadPoolExecutor(max_workers=2) as pool:
        counts = list(pool.map(fn, (source, target)))
    return counts[0]


def raw_batches_hashed_in_thread(collection: Collection) -> int:
    """The reading thread only receives whole batches; a worker thread splits and hashes them."""
    batches: queue.Queue[bytes | None] = queue.Queue(maxsize=4)
    result: list[int] = []

    def hash_batches() -> None:
        total, count = 0, 0
        sha256, from_bytes = hashlib.sha256, int.from_bytes
        while (batch := batches.get()) is not None:
            view, position = memoryview(batch), 0
            while position < len(batch):
                length = from_bytes(view[position:position + 4], "little")
                total += from_bytes(sha256(view[position:position + length]).digest(), "big")
                position += length
                count += 1
        result.append(count)

    worker = threading.Thread(target=hash_batches)
    worker.start()
    try:
        for batch in collection.find_raw_batches({}, batch_size=DEFAULT_SCAN_BATCH_SIZE):
            batches.put(batch)
    finally:
        batches.put(None)
        worker.join()
    return result[0]


def old_ordered_digest(collection: Collection) -> int:
    """What full validation did before: one sha256 over every document in _id order."""
    digest, count = hashlib.sha256(), 0
    for document in collection.find({}, sort=[("_id", 1)]):
        digest.update(document.raw)
        count += 1
    return count


def timed(fn: Callable[[], int]) -> tuple[int, float, float]:
    """Documents, wall seconds and client CPU seconds of one run."""
    wall, cpu = time.perf_counter(), time.process_time()
    documents = fn()
    return documents, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.digest_scan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=50_000)
    parser.add_argument("--doc-bytes", type=int, default=1_024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="digest-scan-") as workdir:
        source_server = start_server(Path(workdir) / "source")
        try:
            target_server = start_server(Path(workdir) / "target")
            try:
                return _measure(args, source_server.uri, target_server.uri)
            finally:
                target_server.destroy()
        finally:
            source_server.destroy()


def _measure(args: argparse.Namespace, source_uri: str, target_uri: str) -> int:
    with pymongo.MongoClient(source_uri) as source_client, pymongo.MongoClient(target_uri) as target_client:
        factory = DocumentFactory(args.doc_bytes, args.seed)
        batches = list(factory.raw_batches(1, args.docs, _SEED_BATCH))
        total_bytes = sum(len(d.raw) for batch in batches for d in batch)
        started = time.perf_counter()
        source = source_client[DB].get_collection(COLL, codec_options=RAW_CODEC_OPTIONS)
        target = target_client[DB].get_collection(COLL, codec_options=RAW_CODEC_OPTIONS)
        for batch in batches:
            source.insert_many(batch, ordered=False)
        for batch in reversed(batches):
            target.insert_many(list(reversed(batch)), ordered=False)
        print(f"{args.docs:,} documents, {total_bytes / args.docs:,.0f} bytes mean, seeded on both servers in "
              f"{time.perf_counter() - started:.1f} s; best of {args.repeats}", flush=True)

        def both_sides_new() -> int:
            report = validate_namespaces(source_client, target_client, [(DB, COLL)], mode="full")
            if report.verdict != "PASS":
                raise RuntimeError(f"validation of identical data did not pass: {report.results[0].differences}")
            return report.totals.source_documents

        variants: list[tuple[str, Callable[[], int]]] = [
            ("raw scan, natural order, batch 1000 (baseline)", lambda: raw_scan(source)),
            ("raw scan, natural order, server default batch", lambda: raw_scan(source, 0)),
            ("scan + multiset_digest (sum-sha256)", lambda: scan_multiset_digest(source)),
            ("snapshot_namespace(mode=full)", lambda: snapshot_namespace(source_client, DB, COLL, mode="full").count),
            ("scan + blake2b-128 sum", lambda: scan_blake2b_sum(source)),
            ("raw batches + multiset_digest", lambda: raw_batches_multiset_digest(source)),
            ("raw batches, sha256 sum in a worker thread", lambda: raw_batches_hashed_in_thread(source)),
            ("old ordered digest (sort _id, one sha256)", lambda: old_ordered_digest(source)),
            ("both sides: validate_namespaces full (new)", both_sides_new),
            ("both sides: raw scan only, 2 threads", lambda: both_sides(raw_scan, source, target)),
            ("both sides: raw batches + multiset_digest", lambda: both_sides(raw_batches_multiset_digest, source, target)),
            ("both sides: raw batches, hashing in a 2nd thread",
             lambda: both_sides(raw_batches_hashed_in_thread, source, target)),
            ("both sides: old ordered digest, 2 threads", lambda: both_sides(old_ordered_digest, source, target)),
        ]
        best: dict[str, tuple[int, float, float]] = {}
        monitor = LoadMonitor().start()
        try:
            for round_number in range(1, args.repeats + 1):
                for name, fn in variants:
                    documents, wall, cpu = timed(fn)
                    if documents != args.docs:
                        raise RuntimeError(f"{name}: read {documents:,} documents, expected {args.docs:,}")
                    if name not in best or wall < best[name][1]:
                        best[name] = (documents, wall, cpu)
                print(f"round {round_number} of {args.repeats} done", flush=True)
        finally:
            load = monitor.stop()
        baseline = best[variants[0][0]][1]
        print(f"{'variant':48} {'docs':>8} {'s':>7} {'docs/s':>9} {'ratio':>6} {'client CPU us/doc':>18}")
        for name, _ in variants:
            documents, wall, cpu = best[name]
            print(f"{name:48} {documents:>8,} {wall:>7.2f} {documents / wall:>9,.0f} {baseline / wall:>6.2f} "
                  f"{cpu / documents * 1e6:>18.1f}")
        if load.get("available"):
            print(f"other processes used {load['other_processes_cores']} cores on average during the "
                  f"{load['seconds']} s of measurement (machine busy {load['machine_busy_percent']}%): "
                  + ", ".join(load["top_other_processes"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
