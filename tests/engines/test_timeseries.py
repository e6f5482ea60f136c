"""Time-series buckets in dumps: layouts and exact unpacking (pure functions, no server)."""

from __future__ import annotations

import bson
import pytest
from bson import SON, Binary, Decimal128, Int64, ObjectId
from bson.codec_options import CodecOptions, DatetimeConversion

from atlas_migration.engines import timeseries
from atlas_migration.engines.dump_layout import iter_bson_file
from atlas_migration.errors import DumpFormatError

ORDERED = CodecOptions(document_class=SON, datetime_conversion=DatetimeConversion.DATETIME_AUTO)


def test_unpacks_a_v1_bucket_in_the_servers_field_order_with_exact_values():
    bucket = bson.encode(SON([
        ("_id", ObjectId()),
        ("control", SON([("version", 1), ("min", {}), ("max", {})])),
        ("meta", SON([("host", "a"), ("dc", 1)])),
        ("data", SON([
            ("_id", SON([("0", 10), ("1", 11), ("2", 12)])),
            ("v", SON([("0", Decimal128("1.10")), ("2", Int64(3))])),  # row 1 has no "v": sparse column
            ("t", SON([("0", bson.datetime_ms.DatetimeMS(-(2**62))), ("1", bson.datetime_ms.DatetimeMS(0)),
                       ("2", bson.datetime_ms.DatetimeMS(5))])),
            ("blob", SON([("1", Binary(b"\x01\x02", 4))])),
        ])),
    ]))
    out = timeseries.unpack_bucket(bucket, "t", "m", "db.c")
    docs = [bson.decode(d, ORDERED) for d in out]
    assert [list(d) for d in docs] == [["t", "m", "_id", "v"], ["t", "m", "_id", "blob"], ["t", "m", "_id", "v"]]
    assert docs[0]["v"] == Decimal128("1.10") and isinstance(docs[2]["v"], Int64)
    assert docs[1]["blob"] == Binary(b"\x01\x02", 4) and docs[0]["m"] == {"host": "a", "dc": 1}
    assert docs[0]["t"] == bson.datetime_ms.DatetimeMS(-(2**62))  # beyond Python's datetime range, kept
    # Each value's bytes are copied as they are: the same bytes as in the bucket's column.
    column_v = bson.encode({"v": Decimal128("1.10")})[4:-1]
    assert column_v in out[0]


def test_a_null_meta_is_left_out_and_no_meta_field_means_none():
    base = [("_id", 1), ("control", {"version": 1}), ("data", {"t": {"0": 1}})]
    with_null = bson.encode(SON([*base[:2], ("meta", None), base[2]]))
    assert [list(bson.decode(d)) for d in timeseries.unpack_bucket(with_null, "t", "m", "x")] == [["t"]]


@pytest.mark.parametrize("version", [2, 3])
def test_compressed_buckets_are_refused_naming_the_collection(version):
    bucket = bson.encode({"_id": 1, "control": {"version": version}, "data": {"t": Binary(b"\x00", 7)}})
    with pytest.raises(DumpFormatError, match=rf"shop\.cpu: compressed time-series buckets \(control\.version {version}\)"):
        timeseries.unpack_bucket(bucket, "t", None, "shop.cpu")


def test_a_measurement_is_not_a_bucket():
    assert timeseries.bucket_version(bson.encode({"t": 1, "control": 5})) is None
    with pytest.raises(DumpFormatError, match="not a time-series bucket"):
        timeseries.unpack_bucket(bson.encode({"t": 1}), "t", None, "db.c")


@pytest.mark.parametrize(("buckets_file", "data_file", "version", "layout"), [
    (True, False, None, timeseries.LAYOUT_BUCKETS_FILE),
    (True, True, "8.3.0", timeseries.LAYOUT_BUCKETS_FILE),
    (False, True, "8.3.0", timeseries.LAYOUT_RAW_DATA),
    (False, True, "9.0.1-rc0", timeseries.LAYOUT_RAW_DATA),
    (False, True, "8.2.11", timeseries.LAYOUT_MEASUREMENTS),
    (False, True, None, timeseries.LAYOUT_MEASUREMENTS),
    (False, True, "unknown", timeseries.LAYOUT_MEASUREMENTS),
    (False, False, "8.3.0", None),
])
def test_dumped_layout(buckets_file, data_file, version, layout):
    assert timeseries.dumped_layout(buckets_file, data_file, version) == layout


def test_the_reference_buckets_unpack_to_1000_measurements(mongodump_fixtures):
    path = mongodump_fixtures / "mongo-tools/mongorestore/testdata/timeseries_tests/ts_dump/timeseries_test/system.buckets.foo_ts.bson"
    measurements = [m for b in iter_bson_file(path) for m in timeseries.unpack_bucket(b, "ts", "meta", "foo_ts")]
    assert len(measurements) == 1000
    decoded = [bson.decode(m, ORDERED) for m in measurements]
    assert all(list(d)[:2] == ["ts", "meta"] for d in decoded)
    assert len({d["_id"] for d in decoded}) == 1000


@pytest.mark.parametrize(("version", "listed", "layout"), [
    ("8.3.0", False, timeseries.LAYOUT_RAW_DATA),  # rawData: no system.buckets namespace to list
    ("9.0.0", True, timeseries.LAYOUT_RAW_DATA),
    ("7.0.14", True, timeseries.LAYOUT_BUCKETS_FILE),  # mongodump's system.buckets.<coll>.bson
    ("8.2.11", False, timeseries.LAYOUT_MEASUREMENTS),  # a server that exposes no buckets (SecantusDB)
])
def test_layout_to_dump_follows_mongodump(version, listed, layout):
    assert timeseries.layout_to_dump(version, listed) == layout
