"""The benchmark's dataset: deterministic documents of a chosen size over weighted collections.

Collection sizes are weighted 4 : 2 : 1 : 1 : ... (``c00`` holds four units, ``c01`` two, every other
collection one), so a single dataset holds collections at 1x, 2x and 4x of a base size. Validation cost
and a copy task's peak memory are then measured against collection size without seeding extra data, and
the one-unit collections are equal, which is what splitting a copy over worker processes needs.

Documents look like an orders/events collection: an ObjectId ``_id`` in insertion order, a sub-document,
a date, numbers, a small array, then padding up to the requested size. Three quarters of the padding is
text from a small vocabulary (gzip shrinks it about as much as real text) and a quarter random bytes
(tokens and hashes, incompressible), so the gzip cost of a dump is neither flattered nor exaggerated.
Sizes vary by +-20% around the mean. Each collection is one random stream: the same seed gives the same
bytes on every run and machine.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import bson
from bson import Binary, ObjectId
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument

if TYPE_CHECKING:
    from pymongo import MongoClient

RAW_CODEC_OPTIONS: CodecOptions = CodecOptions(document_class=RawBSONDocument)
DEFAULT_DB = "bench"
# Weights of c00 and c01; every further collection weighs one unit.
LEADING_WEIGHTS = (4, 2)
MIN_COLLECTIONS = len(LEADING_WEIGHTS) + 1
# The stream the insert ceiling draws its documents from: distinct from every collection's stream so the
# ceiling never inserts bytes identical to a collection's.
CEILING_STREAM = 1_000
SEED_BATCH_DOCS = 1_000
# The secondary index each collection gets: restores rebuild it after the data, as mongorestore does.
SECONDARY_INDEX = [("customer.country", 1), ("createdAt", -1)]

_EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
_EPOCH_SECONDS = int(_EPOCH.timestamp())
_COUNTRIES = ("FR", "DE", "US", "JP", "BR", "IN", "GB", "ES", "IT", "CA")
_STATUSES = ("new", "paid", "shipped", "delivered", "cancelled")
_TAGS = ("vip", "gift", "express", "b2b", "promo", "mobile", "retry")
_VOCABULARY_SIZE = 2_000
_MIN_POOL = 256 * 1024
_TEXT_SHARE = 0.75
_SIZE_JITTER = 0.2
_OVERHEAD_SAMPLE = 256


@dataclass(frozen=True)
class CollectionSpec:
    """One collection of the dataset: its name, random stream, document count and weight in units."""

    name: str
    stream: int
    documents: int
    units: int


@dataclass(frozen=True)
class DatasetSpec:
    """The whole dataset: database, mean document size, seed and the weighted collections."""

    db: str
    doc_bytes: int
    seed: int
    collections: tuple[CollectionSpec, ...]

    @classmethod
    def plan(cls, docs: int, doc_bytes: int, collections: int, seed: int, db: str = DEFAULT_DB) -> DatasetSpec:
        """Split ``docs`` over ``collections`` by weight (4, 2, 1, 1, ...); the remainder goes to ``c00``."""
        if collections < MIN_COLLECTIONS:
            raise ValueError(
                f"at least {MIN_COLLECTIONS} collections are needed (one each of 4, 2 and 1 units), got {collections}"
            )
        weights = list(LEADING_WEIGHTS) + [1] * (collections - len(LEADING_WEIGHTS))
        unit = docs // sum(weights)
        if unit < 1:
            raise ValueError(f"{docs} documents cannot fill {collections} collections weighted {sum(weights)} units")
        counts = [unit * w for w in weights]
        counts[0] += docs - sum(counts)
        specs = tuple(
            CollectionSpec(name=f"c{i:02d}", stream=i, documents=n, units=w)
            for i, (n, w) in enumerate(zip(counts, weights, strict=True))
        )
        return cls(db=db, doc_bytes=doc_bytes, seed=seed, collections=specs)

    @property
    def documents(self) -> int:
        return sum(c.documents for c in self.collections)

    @property
    def unit_documents(self) -> int:
        """Documents in a one-unit collection: the base size of the 1x/2x/4x figures."""
        return self.by_units(1).documents

    def by_units(self, units: int) -> CollectionSpec:
        """The first collection weighing ``units`` (1, 2 or 4)."""
        for spec in self.collections:
            if spec.units == units:
                return spec
        raise KeyError(f"no collection of {units} units in {[c.name for c in self.collections]}")

    @property
    def unit_collections(self) -> tuple[CollectionSpec, ...]:
        return tuple(c for c in self.collections if c.units == 1)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.collections]


class DocumentFactory:
    """Encodes the dataset's documents to BSON bytes; deterministic for a given seed and stream."""

    def __init__(self, doc_bytes: int, seed: int) -> None:
        self.doc_bytes = doc_bytes
        self.seed = seed
        rng = random.Random(seed)
        vocabulary = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 10)))
                      for _ in range(_VOCABULARY_SIZE)]
        # Padding is a random slice of these pools: far cheaper than drawing every byte per document, and
        # the pools are larger than gzip's 32 KiB window, so neighbouring documents share no long runs.
        pool = max(_MIN_POOL, 4 * doc_bytes)
        words: list[str] = []
        length = 0
        while length < pool:
            word = rng.choice(vocabulary)
            words.append(word)
            length += len(word) + 1
        self._text = " ".join(words)
        self._blob = rng.randbytes(pool)
        # The mean size of a document without padding (names, tags and dates vary a little).
        sample = random.Random(0)
        self._overhead = round(
            sum(len(bson.encode(self._document(sample, 0, i, 0, 0))) for i in range(_OVERHEAD_SAMPLE)) / _OVERHEAD_SAMPLE
        )

    def _document(self, rng: random.Random, stream: int, i: int, text_len: int, blob_len: int) -> dict:
        customer = rng.randrange(1_000_000)
        text_at = rng.randrange(len(self._text) - text_len + 1)
        blob_at = rng.randrange(len(self._blob) - blob_len + 1)
        return {
            # Timestamp-like prefix, then the stream and sequence: _id order is insertion order, as for
            # driver-generated ObjectIds.
            "_id": ObjectId((_EPOCH_SECONDS + i // 1_000).to_bytes(4, "big") + stream.to_bytes(2, "big")
                            + i.to_bytes(6, "big")),
            "seq": i,
            "customer": {"id": customer, "name": f"Customer {customer}", "country": rng.choice(_COUNTRIES)},
            "status": rng.choice(_STATUSES),
            "createdAt": _EPOCH + dt.timedelta(seconds=i * 7 + rng.randrange(7)),
            "amount": round(rng.uniform(1, 5_000), 2),
            "items": rng.randint(1, 9),
            "tags": rng.sample(_TAGS, k=rng.randint(0, 3)),
            "text": self._text[text_at:text_at + text_len],
            "token": Binary(self._blob[blob_at:blob_at + blob_len]),
        }

    def documents(self, stream: int, count: int) -> Iterator[bytes]:
        """The first ``count`` documents of ``stream`` as BSON bytes."""
        rng = random.Random(self.seed * 1_000_003 + stream)
        for i in range(count):
            target = self.doc_bytes * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER)
            pad = max(0, int(target) - self._overhead)
            text_len = min(int(pad * _TEXT_SHARE), len(self._text))
            blob_len = min(pad - text_len, len(self._blob))
            yield bson.encode(self._document(rng, stream, i, text_len, blob_len))

    def raw_batches(self, stream: int, count: int, batch_docs: int) -> Iterator[list[RawBSONDocument]]:
        """The same documents grouped into insert batches of ``RawBSONDocument`` (no re-encoding on insert)."""
        batch: list[RawBSONDocument] = []
        for raw in self.documents(stream, count):
            batch.append(RawBSONDocument(raw, RAW_CODEC_OPTIONS))
            if len(batch) >= batch_docs:
                yield batch
                batch = []
        if batch:
            yield batch


@dataclass(frozen=True)
class SeededDataset:
    """What ``seed_source`` wrote: the spec plus the real BSON bytes of each collection."""

    spec: DatasetSpec
    bytes_by_collection: dict[str, int]
    seconds: float

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_collection.values())

    @property
    def mean_doc_bytes(self) -> float:
        return self.bytes / max(1, self.spec.documents)

    def to_dict(self) -> dict:
        return {
            "db": self.spec.db, "documents": self.spec.documents, "bytes": self.bytes,
            "mean_doc_bytes": round(self.mean_doc_bytes, 1), "seed": self.spec.seed,
            "seed_seconds": round(self.seconds, 2),
            "collections": [
                {"name": c.name, "documents": c.documents, "units": c.units,
                 "bytes": self.bytes_by_collection[c.name]}
                for c in self.spec.collections
            ],
        }


def seed_source(client: MongoClient, spec: DatasetSpec, *, batch_docs: int = SEED_BATCH_DOCS) -> SeededDataset:
    """Insert every collection of ``spec`` as raw batches, then build the secondary index on each."""
    started = time.perf_counter()
    factory = DocumentFactory(spec.doc_bytes, spec.seed)
    database = client[spec.db]
    sizes: dict[str, int] = {}
    for coll in spec.collections:
        collection = database.get_collection(coll.name, codec_options=RAW_CODEC_OPTIONS)
        total = 0
        for batch in factory.raw_batches(coll.stream, coll.documents, batch_docs):
            collection.insert_many(batch, ordered=False)
            total += sum(len(doc.raw) for doc in batch)
        # After the data, like a restore: one build is cheaper than maintaining the index per insert.
        collection.create_index(SECONDARY_INDEX)
        sizes[coll.name] = total
    return SeededDataset(spec=spec, bytes_by_collection=sizes, seconds=time.perf_counter() - started)


__all__ = [
    "CEILING_STREAM",
    "CollectionSpec",
    "DatasetSpec",
    "DocumentFactory",
    "SeededDataset",
    "seed_source",
]


# ------------------------------------------------------------------------------- files for the import phase
IMPORT_CSV_HEADER = "n,name,score,city.name,city.zip,joined,note\n"
_CITIES = ("Paris", "Oslo", "Lagos", "Lima", "Osaka", "Quito", "Perth", "Tunis")


def _import_row(rng: random.Random, n: int, fmt: str) -> str:
    """One record: auto-typed numbers, a nested city, a date and a note (sometimes quoted, with a comma
    and, one row in fifty, a newline inside the quotes, so CSV range cuts meet quoted newlines)."""
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 16)))
    city = rng.choice(_CITIES)
    zip_code = rng.randint(10_000, 99_999)
    score = round(rng.uniform(0, 1000), 3)
    day = dt.date(2020, 1, 1) + dt.timedelta(days=rng.randint(0, 1500))
    if fmt == "csv":
        note = f'"{words},\n{n}"' if n % 50 == 0 else (f'"{words}, {n}"' if n % 2 else f"{words} {n}")
        return f"{n},user{n:09d},{score},{city},{zip_code},{day.isoformat()},{note}\n"
    return (f'{{"n": {n}, "name": "user{n:09d}", "score": {score}, "city": {{"name": "{city}", "zip": {zip_code}}}, '
            f'"joined": {{"$date": "{day.isoformat()}T00:00:00Z"}}, "big": {{"$numberLong": "{n * 1_000_003}"}}, '
            f'"note": "{words}"}}\n')


_WORDS = ("order", "paid", "shipped", "return", "refund", "gift", "priority", "note", "customer", "address",
          "delayed", "express", "bundle", "coupon", "review", "invoice")


def write_import_file(path, fmt: str, target_bytes: int, seed: int) -> tuple[int, int]:
    """Write a CSV (with a header line) or JSON Lines file of about ``target_bytes``; (records, bytes).

    Deterministic for a seed; written in 1 MiB chunks, so a gigabyte-sized file costs no memory."""
    if fmt not in ("csv", "json"):
        raise ValueError(f"import files are csv or json, not {fmt!r}")
    rng = random.Random(f"import-{fmt}-{seed}")
    written = rows = 0
    with open(path, "w", encoding="utf-8", newline="") as out:
        if fmt == "csv":
            out.write(IMPORT_CSV_HEADER)
            written += len(IMPORT_CSV_HEADER)
        chunk: list[str] = []
        size = 0
        while written + size < target_bytes:
            rows += 1
            line = _import_row(rng, rows, fmt)
            chunk.append(line)
            size += len(line)
            if size >= 1 << 20:
                out.write("".join(chunk))
                written, chunk, size = written + size, [], 0
        out.write("".join(chunk))
        written += size
    return rows, written
