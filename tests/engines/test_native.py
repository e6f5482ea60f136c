"""The built-in raw-BSON engine against real servers: dump from ``source``, restore into ``target``."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import shutil
import tracemalloc
import uuid

import bson
import pytest
from bson import SON, Binary, Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions
from bson.datetime_ms import DatetimeMS
from bson.raw_bson import RawBSONDocument
from pymongo import ASCENDING, DESCENDING

from atlas_migration.engines.dump_layout import (
    bson_path,
    find_bson_file,
    iter_bson_file,
    list_dumped_namespaces,
    read_metadata,
    read_prelude,
)
from atlas_migration.engines.native import (
    dump_collection,
    index_specs_for_restore,
    restore_collection,
    restore_view,
)
from atlas_migration.errors import ConfigurationError, DumpFormatError, MigrationError, TargetNotEmpty

pytestmark = pytest.mark.integration

RAW = CodecOptions(document_class=RawBSONDocument)


def raw_sorted(client, db: str, coll: str) -> list[bytes]:
    return [bytes(d.raw) for d in client[db].get_collection(coll, codec_options=RAW).find().sort("_id", 1)]


def index_map(client, db: str, coll: str) -> dict[str, dict]:
    return {ix["name"]: {k: v for k, v in ix.items() if k not in ("v", "ns")} for ix in client[db][coll].list_indexes()}


def collection_options(client, db: str, coll: str) -> dict:
    return next(client[db].list_collections(filter={"name": coll}))["options"]


def mixed_documents() -> list[bytes]:
    """Documents mixing every BSON type worth worrying about, encoded once so bytes can be compared."""
    docs = []
    for i in range(300):
        docs.append(SON([
            ("_id", i),
            ("price", Decimal128(f"{i}.{i % 100:02d}")),
            ("uuid", Binary.from_uuid(uuid.UUID(int=i * 7919 + 1), UuidRepresentation.STANDARD)),
            ("legacy_uuid", Binary(uuid.UUID(int=i).bytes, 3)),
            ("at", dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=i)),
            ("far", DatetimeMS(253402300799999 - i)),  # 9999-12-31, the edge of datetime's range
            ("old", dt.datetime(1901, 12, 13, tzinfo=dt.UTC)),
            ("bin", Binary(bytes(range(i % 256)), 0)),
            ("user_bin", Binary(b"\x00\xffz", 0x80)),
            ("nested", [[i, [i + 1, {"deep": [[], {}]}]], {"k": None}]),
            ("edges", [MinKey(), MaxKey(), float("nan"), -0.0, float("inf")]),
            ("long", Int64(2**40 + i)),
            ("oid", ObjectId(i.to_bytes(12, "big"))),
            ("re", Regex("^ab.*c$", "im")),
            ("ts", Timestamp(1_700_000_000, i + 1)),
            ("code", Code("function(x) { return x + y; }", {"y": i})),
            ("text", "héllo wörld ✓ " * (i % 5)),
            ("flag", i % 2 == 0),
        ]))
    docs.append(SON([("_id", 10_000), ("blob", Binary(os.urandom(1_000_000))), ("note", "about 1 MB")]))
    return [bson.encode(d) for d in docs]


def seed_raw(client, db: str, coll: str, raw_docs: list[bytes]) -> None:
    client[db].get_collection(coll, codec_options=RAW).insert_many([RawBSONDocument(r) for r in raw_docs])


# ---------------------------------------------------------------------------------------------- round trip
def test_raw_bson_round_trip_is_byte_identical(source, target, tmp_path):
    docs = mixed_documents()
    with source.client() as src, target.client() as dst:
        seed_raw(src, "shop", "mixed", docs)
        dumped = dump_collection(src, "shop", "mixed", tmp_path, batch_size=64)
        restored = restore_collection(dst, tmp_path, "shop", "mixed", insert_batch_docs=50)
        assert raw_sorted(dst, "shop", "mixed") == raw_sorted(src, "shop", "mixed")
        assert sorted(raw_sorted(dst, "shop", "mixed")) == sorted(docs)  # the server kept our bytes too

    assert (dumped.documents, dumped.bytes, dumped.type) == (len(docs), sum(map(len, docs)), "collection")
    assert dumped.paths == ["shop/mixed.bson.gz", "shop/mixed.metadata.json.gz"]
    assert all((tmp_path / p).is_file() for p in dumped.paths)
    assert (restored.documents, restored.bytes, restored.target_namespace) == (len(docs), dumped.bytes, "shop.mixed")
    for result in (dumped, restored):  # XCom-safe
        assert json.loads(json.dumps(result.to_dict())) == result.to_dict()
    # The file holds the documents as the source stored them, in natural order.
    assert sorted(iter_bson_file(tmp_path / "shop" / "mixed.bson.gz")) == sorted(docs)


def test_parallel_insert_workers_restore_everything(source, target, tmp_path):
    docs = [bson.encode({"_id": i, "v": "x" * (i % 50)}) for i in range(3_000)]
    with source.client() as src, target.client() as dst:
        seed_raw(src, "shop", "orders", docs)
        dump_collection(src, "shop", "orders", tmp_path, gzip=False)
        assert find_bson_file(tmp_path, "shop", "orders").name == "orders.bson"
        result = restore_collection(dst, tmp_path, "shop", "orders", workers=4, insert_batch_docs=100,
                                    insert_batch_bytes=2_000)
        assert result.documents == 3_000
        assert raw_sorted(dst, "shop", "orders") == sorted(docs, key=lambda d: bson.decode(d)["_id"])


def test_standalone_source_dumps_like_a_replica_set(standalone, target, tmp_path):
    with standalone.client() as src, target.client() as dst:
        src.legacy.items.insert_many([{"_id": i, "name": f"item {i}"} for i in range(50)])
        src.legacy.items.create_index("name", unique=True)
        dump_collection(src, "legacy", "items", tmp_path)
        restore_collection(dst, tmp_path, "legacy", "items")
        assert raw_sorted(dst, "legacy", "items") == raw_sorted(src, "legacy", "items")
        assert index_map(dst, "legacy", "items") == index_map(src, "legacy", "items")


# ------------------------------------------------------------------------------------ options and indexes
def _create_source_schema(src) -> None:
    shop = src.shop
    shop.create_collection("events_log", capped=True, size=64 * 1024, max=500)
    shop.create_collection(
        "stock", validator={"$jsonSchema": {"required": ["sku", "qty"]}}, validationLevel="moderate",
        validationAction="error",
    )
    shop.create_collection("people", collation={"locale": "fr", "strength": 2})
    shop.create_collection("clustered", clusteredIndex={"key": {"_id": 1}, "unique": True})
    shop.create_collection("audited", changeStreamPreAndPostImages={"enabled": True})
    customers = shop.customers
    customers.create_index("email", unique=True)
    customers.create_index([("country", ASCENDING), ("signedUpAt", DESCENDING)], name="country_recent")
    customers.create_index("lastSeen", expireAfterSeconds=3600)
    customers.create_index("balance", partialFilterExpression={"active": True})
    customers.create_index("referrer", sparse=True)
    customers.create_index([("home", "2dsphere")])
    customers.create_index("surname", collation={"locale": "de", "strength": 1})

    shop.events_log.insert_many([{"_id": i, "msg": f"event {i}"} for i in range(100)])
    shop.stock.insert_many([{"_id": i, "sku": f"S{i}", "qty": i} for i in range(20)])
    shop.people.insert_many([{"_id": i, "name": n} for i, n in enumerate(["Émile", "emile", "Zoé"])])
    shop.clustered.insert_many([{"_id": i} for i in range(5)])
    shop.audited.insert_one({"_id": 1})
    shop.customers.insert_many([
        {"_id": i, "email": f"c{i}@example.com", "country": "FR", "signedUpAt": dt.datetime(2026, 1, 1),
         "active": i % 2 == 0, "balance": i, "home": {"type": "Point", "coordinates": [2.35, 48.85]},
         "surname": f"Müller{i}", **({"referrer": i - 1} if i else {})}
        for i in range(30)
    ])


def test_indexes_and_collection_options_are_restored(source, target, tmp_path):
    names = ["events_log", "stock", "people", "clustered", "audited", "customers"]
    with source.client() as src, target.client() as dst:
        _create_source_schema(src)
        for name in names:
            dump_collection(src, "shop", name, tmp_path)
        results = {name: restore_collection(dst, tmp_path, "shop", name) for name in names}

        for name in names:
            assert collection_options(dst, "shop", name) == collection_options(src, "shop", name), name
            assert index_map(dst, "shop", name) == index_map(src, "shop", name), name
            assert raw_sorted(dst, "shop", name) == raw_sorted(src, "shop", name), name
        assert results["customers"].indexes_created == 7
        assert results["events_log"].indexes_created == 0
        # A capped collection comes back in insertion (natural) order.
        assert [d["_id"] for d in dst.shop.events_log.find()] == list(range(100))
        # The collation is checked through listCollections above (SecantusDB records a collection's default
        # collation but does not apply it to queries). The validator is in force on the target:
        with pytest.raises(Exception, match="failed validation"):
            dst.shop.stock.insert_one({"_id": 99, "sku": "no qty"})


def test_index_specs_drop_server_derived_fields():
    specs = index_specs_for_restore([
        {"v": 2, "key": {"_id": 1}, "name": "_id_", "ns": "a.b"},
        {"v": 1, "key": {"a": 1}, "name": "a_1", "ns": "a.b", "background": True, "unique": True},
    ])
    assert specs == [{"key": {"a": 1}, "name": "a_1", "unique": True}]


def test_documents_that_predate_the_validator_are_restored(source, target, tmp_path):
    with source.client() as src, target.client() as dst:
        src.shop.stock.insert_many([{"_id": 1, "sku": "A", "qty": 1}, {"_id": 2, "sku": "legacy"}])
        src.shop.command("collMod", "stock", validator={"$jsonSchema": {"required": ["qty"]}})
        dump_collection(src, "shop", "stock", tmp_path)
        with pytest.raises(MigrationError, match=r"shop\.stock failed for 1 of 2 .*code 121"):
            restore_collection(dst, tmp_path, "shop", "stock", bypass_document_validation=False)
        restore_collection(dst, tmp_path, "shop", "stock", drop=True)
        assert raw_sorted(dst, "shop", "stock") == raw_sorted(src, "shop", "stock")


def test_timeseries_measurements_are_restored_into_a_timeseries_collection(source, target, tmp_path):
    with source.client() as src, target.client() as dst:
        src.metrics.create_collection(
            "cpu", timeseries={"timeField": "t", "metaField": "host", "granularity": "minutes"},
            expireAfterSeconds=86_400 * 365,
        )
        start = dt.datetime.now(dt.UTC).replace(microsecond=0)
        src.metrics.cpu.insert_many(
            [{"t": start - dt.timedelta(minutes=i), "host": {"name": f"h{i % 3}"}, "load": i / 10} for i in range(60)]
        )
        dumped = dump_collection(src, "metrics", "cpu", tmp_path)
        assert dumped.type == "timeseries" and dumped.documents == 60
        # The test server exposes no buckets: measurements, under a prelude naming its (pre-8.3) version.
        assert dumped.paths == ["metrics/cpu.bson.gz", "metrics/cpu.metadata.json.gz"]
        assert read_prelude(tmp_path).server_version == src.server_info()["version"]
        assert restore_collection(dst, tmp_path, "metrics", "cpu").timeseries_restore == "measurements"
        assert collection_options(dst, "metrics", "cpu")["timeseries"]["timeField"] == "t"
        assert collection_options(dst, "metrics", "cpu")["expireAfterSeconds"] == 86_400 * 365
        key = lambda d: d["load"]  # noqa: E731
        assert sorted(dst.metrics.cpu.find({}, {"_id": 0}), key=key) == sorted(src.metrics.cpu.find({}, {"_id": 0}), key=key)


# ----------------------------------------------------------------------------------------------------- views
def test_view_is_restored_after_its_collection(source, target, tmp_path):
    with source.client() as src, target.client() as dst:
        src.shop.orders.insert_many([{"_id": i, "status": ["paid", "new"][i % 2], "total": i} for i in range(10)])
        pipeline = [{"$match": {"status": "paid"}}, {"$project": {"total": 1}}]
        src.shop.create_collection("paid_orders", viewOn="orders", pipeline=pipeline)
        view_dump = dump_collection(src, "shop", "paid_orders", tmp_path)
        dump_collection(src, "shop", "orders", tmp_path)
        assert view_dump.type == "view" and view_dump.documents == 0
        assert view_dump.paths == ["shop/paid_orders.metadata.json.gz"]  # views have no data file

        restore_collection(dst, tmp_path, "shop", "orders")
        restored = restore_view(dst, tmp_path, "shop", "paid_orders")
        assert restored.type == "view"
        info = next(dst.shop.list_collections(filter={"name": "paid_orders"}))
        assert info["type"] == "view" and info["options"] == {"viewOn": "orders", "pipeline": pipeline}
        assert list(dst.shop.paid_orders.find().sort("_id", 1)) == list(src.shop.paid_orders.find().sort("_id", 1))

        # Retrying is harmless; a different view of that name is not silently replaced.
        restore_view(dst, tmp_path, "shop", "paid_orders")
        restore_collection(dst, tmp_path, "shop", "paid_orders")  # delegates to restore_view
        dst.shop.drop_collection("paid_orders")
        dst.shop.create_collection("paid_orders", viewOn="orders", pipeline=[])
        with pytest.raises(TargetNotEmpty, match="another definition"):
            restore_view(dst, tmp_path, "shop", "paid_orders")
        restore_view(dst, tmp_path, "shop", "paid_orders", drop=True)
        assert dst.shop.paid_orders.count_documents({}) == 5


def test_dotted_collection_and_view_into_a_renamed_database(source, target, tmp_path):
    with source.client() as src, target.client() as dst:
        src.analytics["daily.rollups"].insert_many([{"_id": d, "visits": d * 10} for d in range(31)])
        src.analytics["daily.rollups"].create_index("visits")
        src.analytics.create_collection("busy.days", viewOn="daily.rollups", pipeline=[{"$match": {"visits": {"$gt": 200}}}])
        dump_collection(src, "analytics", "daily.rollups", tmp_path)
        dump_collection(src, "analytics", "busy.days", tmp_path)
        assert (tmp_path / "analytics" / "daily.rollups.bson.gz").is_file()
        assert list_dumped_namespaces(tmp_path) == [("analytics", "busy.days"), ("analytics", "daily.rollups")]

        result = restore_collection(dst, tmp_path, "analytics", "daily.rollups", target_db="rehearsal_analytics")
        restore_view(dst, tmp_path, "analytics", "busy.days", target_db="rehearsal_analytics")
        assert result.target_namespace == "rehearsal_analytics.daily.rollups"
        assert "analytics" not in dst.list_database_names()
        assert raw_sorted(dst, "rehearsal_analytics", "daily.rollups") == raw_sorted(src, "analytics", "daily.rollups")
        assert "visits_1" in index_map(dst, "rehearsal_analytics", "daily.rollups")
        assert dst.rehearsal_analytics["busy.days"].count_documents({}) == 10


# -------------------------------------------------------------------------------------- safety and retries
def test_target_not_empty_is_refused_before_anything_is_written(source, target, tmp_path):
    with source.client() as src, target.client() as dst:
        src.shop.orders.insert_many([{"_id": i} for i in range(20)])
        src.shop.orders.create_index("x")
        dump_collection(src, "shop", "orders", tmp_path)
        dst.shop.orders.insert_one({"_id": "precious"})
        with pytest.raises(TargetNotEmpty, match=r"shop\.orders already holds documents"):
            restore_collection(dst, tmp_path, "shop", "orders")
        assert list(dst.shop.orders.find()) == [{"_id": "precious"}]
        assert list(index_map(dst, "shop", "orders")) == ["_id_"]

        # An empty existing collection is filled (no documents to lose).
        dst.shop.orders.delete_many({})
        assert restore_collection(dst, tmp_path, "shop", "orders").documents == 20
        assert "x_1" in index_map(dst, "shop", "orders")


def test_restore_with_drop_is_idempotent_after_a_crash(source, target, tmp_path):
    good, broken = tmp_path / "good", tmp_path / "broken"
    docs = [bson.encode({"_id": i, "payload": "p" * 200}) for i in range(2_000)]
    with source.client() as src, target.client() as dst:
        seed_raw(src, "shop", "orders", docs)
        src.shop.orders.create_index("payload")
        dump_collection(src, "shop", "orders", good)
        # A dump cut off mid-document: the restore inserts some batches, then fails on the torn document and
        # removes the collection it created, so no partial copy stays behind.
        shutil.copytree(good, broken)
        data = gzip.decompress(bson_path(broken, "shop", "orders").read_bytes())
        bson_path(broken, "shop", "orders").write_bytes(gzip.compress(data[: len(data) // 2 + 17]))
        with pytest.raises(DumpFormatError, match="truncated"):
            restore_collection(dst, broken, "shop", "orders", insert_batch_docs=100)
        assert "orders" not in dst.shop.list_collection_names()
        # A task killed outright cleans nothing up: what it left is refused without drop and replaced with it.
        dst.shop.orders.insert_many([bson.decode(d) for d in docs[:500]])

        with pytest.raises(TargetNotEmpty):
            restore_collection(dst, good, "shop", "orders")
        for _ in range(2):  # the retry, then a retry of a successful run
            result = restore_collection(dst, good, "shop", "orders", drop=True, workers=2)
            assert result.documents == len(docs)
            assert raw_sorted(dst, "shop", "orders") == docs
            assert list(index_map(dst, "shop", "orders")) == ["_id_", "payload_1"]


def test_streaming_dump_and_restore_keep_memory_bounded(source, target, tmp_path):
    blob = os.urandom(16 * 1024) * 4  # 64 KiB, cheap to compress, large enough to make the collection big
    count = 480  # about 31 MB of documents
    with source.client() as src, target.client() as dst:
        coll = src.big.blobs
        for start in range(0, count, 80):
            coll.insert_many([{"_id": i, "blob": Binary(blob)} for i in range(start, start + 80)])
        total = count * (len(blob) + 30)

        tracemalloc.start()
        try:
            dumped = dump_collection(src, "big", "blobs", tmp_path, batch_bytes=1024 * 1024)
            _, dump_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            restored = restore_collection(dst, tmp_path, "big", "blobs", insert_batch_bytes=1024 * 1024)
            _, restore_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert dumped.documents == restored.documents == count
        assert dumped.bytes > total * 0.99
        # Holding the collection in memory would need more than 31 MB; one batch is about 1 MB.
        assert dump_peak < 8 * 1024 * 1024, dump_peak
        assert restore_peak < 8 * 1024 * 1024, restore_peak
        assert dst.big.blobs.count_documents({}) == count


# --------------------------------------------------------------------------------------------- bad inputs
def test_unknown_namespace_is_a_configuration_error(source, tmp_path):
    with source.client() as src:
        src.shop.orders.insert_one({"_id": 1})
        with pytest.raises(ConfigurationError, match=r"shop\.nope does not exist"):
            dump_collection(src, "shop", "nope", tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("db", "coll"), [("admin", "system.users"), ("local", "oplog.rs"), ("shop", "system.js")])
def test_system_namespaces_are_never_dumped(source, tmp_path, db, coll):
    with source.client() as src, pytest.raises(ConfigurationError, match="never migrated"):
        dump_collection(src, db, coll, tmp_path)


def test_restore_into_a_system_database_is_refused(source, target, tmp_path):
    with source.client() as src, target.client() as dst:
        src.shop.orders.insert_one({"_id": 1})
        dump_collection(src, "shop", "orders", tmp_path)
        with pytest.raises(ConfigurationError, match="system namespace"):
            restore_collection(dst, tmp_path, "shop", "orders", target_db="admin")


def test_metadata_without_data_file_is_an_incomplete_dump(source, target, tmp_path):
    with source.client() as src, target.client() as dst:
        src.shop.orders.insert_one({"_id": 1})
        dump_collection(src, "shop", "orders", tmp_path)
        bson_path(tmp_path, "shop", "orders").unlink()
        with pytest.raises(DumpFormatError, match="incomplete"):
            restore_collection(dst, tmp_path, "shop", "orders")
        assert "shop" not in dst.list_database_names()


def _expected_measurements(buckets_file) -> list[dict]:
    """Measurements of v1 buckets, worked out independently with bson.decode: time, meta, then columns."""
    out = []
    for bucket in bson.decode_all(open(buckets_file, "rb").read()):
        data = bucket["data"]
        for row, when in data["ts"].items():
            doc = {"ts": when}
            if bucket.get("meta") is not None:
                doc["meta"] = bucket["meta"]
            doc.update({name: col[row] for name, col in data.items() if name != "ts" and row in col})
            out.append(doc)
    return out


TS_DUMP = "mongo-tools/mongorestore/testdata/timeseries_tests/ts_dump"


@pytest.mark.parametrize(("dump", "db", "coll", "measurements"), [
    (TS_DUMP, "timeseries_test", "foo_ts", 1000),
    ("mongo-tools/mongorestore/testdata/c5timeseries", "db1", "c5timeseries", None),
])
def test_mongodump_timeseries_buckets_restore_as_their_measurements(target, mongodump_fixtures, dump, db, coll,
                                                                   measurements):
    root = mongodump_fixtures / dump
    buckets = root / db / f"system.buckets.{coll}.bson"
    expected = _expected_measurements(buckets)
    with target.client() as dst:
        result = restore_collection(dst, root, db, coll)
        assert result.type == "timeseries" and result.timeseries_restore in ("buckets unpacked", "raw buckets")
        restored = list(dst[db][coll].find())
        assert len(restored) == len(expected) and (measurements is None or len(restored) == measurements)
        by_id = {d["_id"]: d for d in restored}
        for doc in expected:  # every measurement with its values (field order is the server's business here)
            assert by_id[doc["_id"]] == doc
        assert collection_options(dst, db, coll)["timeseries"]["timeField"] == "ts"


def test_timeseries_8_3_layout_is_told_apart_by_the_prelude(target, mongodump_fixtures, tmp_path):
    # mongodump 100.16+ against an 8.3+ server: the buckets as <coll>.bson, prelude.json with the version.
    source = mongodump_fixtures / TS_DUMP / "timeseries_test"
    (tmp_path / "timeseries_test").mkdir()
    shutil.copy(source / "foo_ts.metadata.json", tmp_path / "timeseries_test" / "foo_ts.metadata.json")
    shutil.copy(source / "system.buckets.foo_ts.bson", tmp_path / "timeseries_test" / "foo_ts.bson")
    with target.client() as dst:
        # Without the prelude the layout reads as measurements, and the buckets are refused as such.
        with pytest.raises(DumpFormatError, match="refusing to insert buckets as measurements"):
            restore_collection(dst, tmp_path, "timeseries_test", "foo_ts")
        assert "timeseries_test" not in dst.list_database_names()
        (tmp_path / "prelude.json").write_text('{"ServerVersion":"8.3.0","ToolVersion":"100.16.0"}')
        result = restore_collection(dst, tmp_path, "timeseries_test", "foo_ts")
        assert result.documents == 1000


def test_compressed_buckets_are_refused_where_the_target_takes_no_buckets(target, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "cpu.metadata.json").write_text(
        '{"options":{"timeseries":{"timeField":"t"}},"indexes":[],"collectionName":"cpu","type":"timeseries"}')
    bucket = {"_id": ObjectId(), "control": {"version": 2, "min": {}, "max": {}, "count": 3},
              "data": {"t": Binary(b"\x00" * 8, 7)}}
    (tmp_path / "m" / "system.buckets.cpu.bson").write_bytes(bson.encode(bucket))
    with target.client() as dst:
        with pytest.raises(DumpFormatError, match=r"m\.cpu.*compressed time-series buckets \(control\.version 2\)"):
            restore_collection(dst, tmp_path, "m", "cpu")
        assert "cpu" not in dst.m.list_collection_names()  # the collection created for it is gone again


def test_a_prelude_from_a_server_older_than_4_2_is_refused(target, tmp_path):
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "c.bson").write_bytes(bson.encode({"_id": 1}))
    (tmp_path / "prelude.json").write_text('{"ServerVersion":"4.0.28","ToolVersion":"100.12.0"}')
    with target.client() as dst, pytest.raises(DumpFormatError, match=r"MongoDB 4\.0\.28.*mongorestore 100\.19"):
        restore_collection(dst, tmp_path, "shop", "c")


def test_hand_written_mongodump_style_dump_is_restored(target, tmp_path):
    # The layout and metadata an older mongodump writes without --gzip: plain files, "ns" and
    # "background" in index specs, a v:1 index, $numberLong options, no type/collectionName.
    db_dir = tmp_path / "crm"
    db_dir.mkdir()
    docs = [bson.encode({"_id": i, "email": f"u{i}@example.com", "score": Int64(i)}) for i in range(25)]
    (db_dir / "users.bson").write_bytes(b"".join(docs))
    (db_dir / "users.metadata.json").write_text(
        '{"options":{"capped":true,"size":{"$numberLong":"1048576"}},"indexes":['
        '{"v":{"$numberInt":"2"},"key":{"_id":{"$numberInt":"1"}},"name":"_id_","ns":"crm.users"},'
        '{"v":{"$numberInt":"1"},"unique":true,"key":{"email":{"$numberInt":"1"}},"name":"email_1",'
        '"ns":"crm.users","background":true}]}'
    )
    assert read_metadata(tmp_path, "crm", "users").options == {"capped": True, "size": 1048576}
    with target.client() as dst:
        result = restore_collection(dst, tmp_path, "crm", "users")
        assert result.documents == 25 and result.indexes_created == 1
        assert raw_sorted(dst, "crm", "users") == docs
        assert index_map(dst, "crm", "users")["email_1"] == {"key": {"email": 1}, "name": "email_1", "unique": True}
        assert collection_options(dst, "crm", "users")["capped"] is True


# ------------------------------------------------------------------------------- interop with real mongodump
# Collection names that mongodump escapes, as in the reference dump by mongodump 100.9.4 (database "peer").
ESCAPED_NAMES = ["sp ace", "c++", "x&z:w=v@u", "données", "a/b c%d", "L" + "é" * 110]
LONG_FIXTURE_NAME = (
    "aVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVery"
    "VeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryVeryLongCollectionNameConsisting"
    "OfExactlyTwoHundredAndFortySevenCharacters"
)


def test_engine_dump_file_names_are_the_ones_mongodump_writes(source, tmp_path, mongodump_fixtures):
    peer = mongodump_fixtures / "mongodump-100.9.4"
    long_dir = mongodump_fixtures / "mongo-tools/mongorestore/testdata/longcollectionname/db1"
    names_200 = "n" * 200  # 200 bytes: under mongodump's 238-byte limit, so not truncated
    with source.client() as src:
        for name in [*ESCAPED_NAMES, names_200]:
            src.peer[name].insert_one({"_id": 1})
        src.db1[LONG_FIXTURE_NAME].insert_one({"_id": 1})
        for gzip_files, folder in ((False, "plain"), (True, "gzip")):
            out = tmp_path / folder
            for name in [*ESCAPED_NAMES, names_200]:
                dumped = dump_collection(src, "peer", name, out, gzip=gzip_files)
                if name != names_200:
                    # Exactly the file names real mongodump wrote for these collections.
                    assert {p.split("/", 1)[1] for p in dumped.paths} <= {p.name for p in (peer / folder / "peer").iterdir()}
                else:
                    assert dumped.paths[0] == f"peer/{names_200}.bson" + (".gz" if gzip_files else "")
            dumped = dump_collection(src, "db1", LONG_FIXTURE_NAME, out, gzip=False)
            assert {p.split("/", 1)[1] for p in dumped.paths} == {p.name for p in long_dir.iterdir()}
            assert sorted(c for _, c in list_dumped_namespaces(out)) == sorted([*ESCAPED_NAMES, names_200, LONG_FIXTURE_NAME])


@pytest.mark.parametrize("folder", ["plain", "gzip"])
def test_mongodump_escaped_names_restore_by_their_real_names(target, mongodump_fixtures, folder):
    dump = mongodump_fixtures / "mongodump-100.9.4" / folder
    with target.client() as dst:
        for name in ESCAPED_NAMES:
            restored = restore_collection(dst, dump, "peer", name)
            assert restored.target_namespace == f"peer.{name}"
            data_file = find_bson_file(dump, "peer", name)
            assert raw_sorted(dst, "peer", name) == sorted(iter_bson_file(data_file))
            assert restored.documents >= 1
        assert sorted(n for n in dst.peer.list_collection_names()) == sorted(ESCAPED_NAMES)
