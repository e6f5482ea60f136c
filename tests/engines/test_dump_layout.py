"""mongodump's directory layout: file names, metadata JSON, BSON framing (pure file I/O, no server)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import bson
import pytest
from bson import Binary, Int64, MaxKey, MinKey
from bson.raw_bson import RawBSONDocument

from atlas_migration.engines.dump_layout import (
    BsonFileWriter,
    CollectionMetadata,
    Prelude,
    bson_path,
    collection_file_stem,
    count_bson_documents,
    dumped_files,
    find_bson_file,
    iter_bson_file,
    legacy_collection_file_stem,
    list_dumped_namespaces,
    metadata_path,
    metadata_text,
    query_unescape,
    read_metadata,
    read_prelude,
    write_metadata,
    write_prelude,
)
from atlas_migration.errors import DumpFormatError

# What mongodump 100.x writes for a plain collection: compact canonical Extended JSON, options omitted
# when empty, keys in the order options, indexes, uuid, collectionName, type.
MONGODUMP_PLAIN_METADATA = (
    '{"indexes":[{"v":{"$numberInt":"2"},"key":{"_id":{"$numberInt":"1"}},"name":"_id_"},'
    '{"v":{"$numberInt":"2"},"key":{"email":{"$numberInt":"1"}},"name":"email_1","unique":true}],'
    '"uuid":"5b1ce5415faa460eb3f8b6d4d5d9a2c5","collectionName":"customers","type":"collection"}'
)


def _docs(n: int, pad: int = 10) -> list[bytes]:
    return [bson.encode({"_id": i, "pad": "x" * pad, "min": MinKey(), "max": MaxKey()}) for i in range(n)]


def _write_bson(path: Path, docs: list[bytes]) -> Path:
    with BsonFileWriter(path) as writer:
        for doc in docs:
            writer.write(doc)
    return path


# ---------------------------------------------------------------------------------------------- file names
@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("orders", "orders"),
        ("daily.rollups", "daily.rollups"),  # dots are kept
        ("a/b c%d", "a%2Fb+c%25d"),  # Go's url.QueryEscape: space -> '+', '/' and '%' escaped
        ("sp ace", "sp+ace"),
        ("c++", "c%2B%2B"),
        ("x&z:w=v@u", "x%26z%3Aw%3Dv%40u"),
        ("x$y~z-_", "x%24y~z-_"),  # unreserved characters kept, '$' escaped
        ("p,q;r?s#t", "p%2Cq%3Br%3Fs%23t"),
        ("données", "donn%C3%A9es"),  # UTF-8 bytes, upper-case hex
    ],
)
def test_collection_file_stem_is_query_escape_and_decodes_back(name, stem):
    assert collection_file_stem(name) == stem
    assert query_unescape(stem) == name


@pytest.mark.parametrize("stem", ["a%2", "a%zz", "%", "b%C3"])
def test_query_unescape_refuses_malformed_escapes_like_go(stem):
    with pytest.raises(DumpFormatError, match="file name stem"):
        query_unescape(stem)


def test_long_collection_names_are_truncated_with_a_digest_like_mongodump():
    name = "c" * 300
    stem = collection_file_stem(name)
    assert len(stem) == 238
    assert stem.startswith("c" * 208 + "%24")
    assert collection_file_stem("c" * 299) != stem  # the digest tells long names apart
    assert collection_file_stem("c" * 238) == "c" * 238  # at the limit: untouched
    assert collection_file_stem("c" * 200) == "c" * 200


def test_file_names_match_the_ones_real_mongodump_wrote(mongodump_fixtures):
    """Every collection of the reference dumps: its name (from the metadata) escapes to its file's name."""
    checked = 0
    for meta_file in mongodump_fixtures.rglob("*.metadata.json*"):
        try:
            doc = json.loads(metadata_text(meta_file))
        except ValueError:
            continue  # the hand-made empty metadata of testdirs/
        if not doc.get("collectionName"):
            continue
        stem = meta_file.name.split(".metadata.json")[0]
        assert collection_file_stem(doc["collectionName"]) == stem, meta_file
        checked += 1
    assert checked >= 20


def test_legacy_path_escaped_dumps_still_resolve(tmp_path):
    # Earlier versions of this engine wrote PathEscape-style names: "sp%20ace", "c++", "x&z:w=v@u".
    for name in ("sp ace", "c++", "x&z:w=v@u", "sp+ace"):
        stem = legacy_collection_file_stem(name)
        (tmp_path / "db").mkdir(exist_ok=True)
        (tmp_path / "db" / f"{stem}.metadata.json").write_text(json.dumps({"indexes": [], "collectionName": name}))
        _write_bson(tmp_path / "db" / f"{stem}.bson", _docs(1))
    assert sorted(p.name for p in (tmp_path / "db").iterdir() if p.suffix == ".bson") == [
        "c++.bson", "sp%20ace.bson", "sp+ace.bson", "x&z:w=v@u.bson"]
    assert list_dumped_namespaces(tmp_path) == [("db", n) for n in sorted(["sp ace", "c++", "x&z:w=v@u", "sp+ace"])]
    for name in ("sp ace", "c++", "x&z:w=v@u", "sp+ace"):
        # "sp+ace.bson" is mongodump's spelling of "sp ace": its metadata says it belongs to "sp+ace" here.
        assert find_bson_file(tmp_path, "db", name).name == legacy_collection_file_stem(name) + ".bson"
        assert read_metadata(tmp_path, "db", name).collection_name == name


def test_a_truncated_name_without_metadata_is_refused(tmp_path):
    stem = collection_file_stem("x" * 300)
    _write_bson(tmp_path / "db" / f"{stem}.bson", _docs(1))
    with pytest.raises(DumpFormatError, match="truncated"):
        list_dumped_namespaces(tmp_path)


def test_paths_for_a_dotted_collection(tmp_path):
    assert bson_path(tmp_path, "analytics", "daily.rollups") == tmp_path / "analytics" / "daily.rollups.bson.gz"
    assert metadata_path(tmp_path, "analytics", "daily.rollups", gzip=False) == (
        tmp_path / "analytics" / "daily.rollups.metadata.json"
    )


def test_list_dumped_namespaces(tmp_path):
    shop = tmp_path / "shop"
    _write_bson(bson_path(tmp_path, "shop", "orders"), _docs(2))
    write_metadata(tmp_path, "shop", CollectionMetadata("orders"))
    write_metadata(tmp_path, "shop", CollectionMetadata("paid", "view", {"viewOn": "orders", "pipeline": []}))
    _write_bson(bson_path(tmp_path, "analytics", "daily.rollups", gzip=False), _docs(1))  # no metadata
    write_metadata(tmp_path, "inventory", CollectionMetadata("a/b c"), gzip=False)
    long_name = "L" * 300
    write_metadata(tmp_path, "inventory", CollectionMetadata(long_name))
    # mongodump's time-series layout: buckets file + metadata of the collection itself.
    write_metadata(tmp_path, "metrics", CollectionMetadata("cpu", "timeseries", {"timeseries": {"timeField": "t"}}))
    _write_bson(bson_path(tmp_path, "metrics", "system.buckets.cpu"), _docs(1))
    # Not namespaces: users/roles files, root-level files, half-written files.
    _write_bson(tmp_path / "admin" / "$admin.system.users.bson", _docs(1))
    _write_bson(tmp_path / "oplog.bson", _docs(1))
    (shop / ".0123abcd.123.partial").write_bytes(b"junk")
    (shop / "notes.txt").write_text("hello")

    assert list_dumped_namespaces(tmp_path) == [
        ("analytics", "daily.rollups"),
        ("inventory", "L" * 300),
        ("inventory", "a/b c"),
        ("metrics", "cpu"),
        ("shop", "orders"),
        ("shop", "paid"),
    ]


def test_list_dumped_namespaces_of_a_missing_directory(tmp_path):
    with pytest.raises(DumpFormatError, match="does not exist"):
        list_dumped_namespaces(tmp_path / "nope")


# ------------------------------------------------------------------------------------------------ metadata
def test_metadata_is_written_in_mongodumps_exact_shape(tmp_path):
    meta = CollectionMetadata(
        collection_name="customers",
        indexes=[
            {"v": 2, "key": {"_id": 1}, "name": "_id_"},
            {"v": 2, "key": {"email": 1}, "name": "email_1", "unique": True},
        ],
        uuid="5b1ce5415faa460eb3f8b6d4d5d9a2c5",
    )
    path = write_metadata(tmp_path, "shop", meta)
    assert path == tmp_path / "shop" / "customers.metadata.json.gz"
    assert metadata_text(path) == MONGODUMP_PLAIN_METADATA


def test_metadata_with_options_puts_them_first_in_canonical_form(tmp_path):
    meta = CollectionMetadata(
        "events_log",
        options={"capped": True, "size": Int64(4096), "max": 100, "ratio": 0.5},
        indexes=[{"v": 2, "key": {"_id": 1}, "name": "_id_"}],
    )
    text = metadata_text(write_metadata(tmp_path, "shop", meta, gzip=False))
    assert text == (
        '{"options":{"capped":true,"size":{"$numberLong":"4096"},"max":{"$numberInt":"100"},'
        '"ratio":{"$numberDouble":"0.5"}},"indexes":[{"v":{"$numberInt":"2"},"key":{"_id":{"$numberInt":"1"}},'
        '"name":"_id_"}],"collectionName":"events_log","type":"collection"}'
    )
    back = read_metadata(tmp_path, "shop", "events_log")
    assert back == meta
    assert isinstance(back.options["size"], Int64)  # int64 stays int64 when written again
    assert back.to_json() == text


def test_hand_written_mongodump_metadata_is_readable(tmp_path):
    # As written by an older mongodump: pretty-printed, with "ns" and "background" in index specs, a legacy
    # $binary uuid field in options' validator, and no "type" field.
    (tmp_path / "sales").mkdir()
    (tmp_path / "sales" / "daily.rollups.metadata.json").write_text(json.dumps({
        "options": {"validator": {"k": {"$binary": {"base64": "AAE=", "subType": "00"}}},
                    "collation": {"locale": "fr", "strength": {"$numberInt": "2"}}},
        "indexes": [
            {"v": {"$numberInt": "2"}, "key": {"_id": {"$numberInt": "1"}}, "name": "_id_", "ns": "sales.daily.rollups"},
            {"v": {"$numberInt": "1"}, "key": {"day": {"$numberInt": "-1"}, "shop": {"$numberDouble": "1.0"}},
             "name": "day_-1_shop_1", "ns": "sales.daily.rollups", "background": True},
        ],
        "uuid": "5B1CE541-5FAA-460E-B3F8-B6D4D5D9A2C5",
    }, indent=2))
    meta = read_metadata(tmp_path, "sales", "daily.rollups")
    assert meta.collection_name == "daily.rollups"  # from the file name: no collectionName field
    assert meta.type == "collection"
    assert meta.uuid == "5b1ce5415faa460eb3f8b6d4d5d9a2c5"
    assert meta.options["collation"] == {"locale": "fr", "strength": 2}
    assert meta.options["validator"]["k"] == b"\x00\x01"  # subtype 0 decodes to bytes
    assert list(meta.indexes[1]["key"].items()) == [("day", -1), ("shop", 1.0)]  # key order kept
    assert isinstance(meta.indexes[1]["key"]["shop"], float)


def test_view_metadata_without_type_is_recognised(tmp_path):
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "paid.metadata.json").write_text(
        '{"options":{"viewOn":"orders","pipeline":[{"$match":{"status":"paid"}}]},"indexes":[]}'
    )
    assert read_metadata(tmp_path, "shop", "paid").is_view


def test_gzip_metadata_is_preferred_and_a_rewrite_removes_the_other_compression(tmp_path):
    write_metadata(tmp_path, "db", CollectionMetadata("c", options={"capped": True, "size": 1}), gzip=False)
    write_metadata(tmp_path, "db", CollectionMetadata("c"))
    assert sorted(p.name for p in (tmp_path / "db").iterdir()) == ["c.metadata.json.gz"]
    assert read_metadata(tmp_path, "db", "c").options == {}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not valid"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"options": [], "indexes": []}', "'options' must be an object"),
    ],
)
def test_invalid_metadata_raises_dump_format_error_naming_the_file(tmp_path, content, message):
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "c.metadata.json").write_bytes(content)
    with pytest.raises(DumpFormatError, match=message) as info:
        read_metadata(tmp_path, "db", "c")
    assert "c.metadata.json" in str(info.value)


def test_missing_metadata_is_a_dump_format_error(tmp_path):
    with pytest.raises(DumpFormatError, match=r"no metadata file for db\.c"):
        read_metadata(tmp_path, "db", "c")


# ------------------------------------------------------------------------------------------------ BSON data
@pytest.mark.parametrize("compressed", [True, False])
def test_bson_round_trip_is_byte_identical(tmp_path, compressed):
    docs = _docs(500, pad=300) + [bson.encode({"_id": "big", "blob": Binary(os.urandom(1_000_000))})]
    path = _write_bson(bson_path(tmp_path, "db", "c", gzip=compressed), docs)
    assert list(iter_bson_file(path)) == docs
    assert find_bson_file(tmp_path, "db", "c") == path
    if compressed:
        assert gzip.decompress(path.read_bytes()) == b"".join(docs)


def test_writer_counts_and_leaves_no_partial_file(tmp_path):
    path = bson_path(tmp_path, "db", "c")
    with BsonFileWriter(path) as writer:
        for doc in _docs(3):
            writer.write(doc)
        assert not path.exists()  # nothing at the final name until close
    assert (writer.documents, writer.bytes) == (3, sum(len(d) for d in _docs(3)))
    assert [p.name for p in path.parent.iterdir()] == ["c.bson.gz"]


def test_writer_interrupted_leaves_no_file_that_looks_complete(tmp_path):
    path = bson_path(tmp_path, "db", "c")
    _write_bson(path, _docs(5))  # a previous complete dump stays intact
    with pytest.raises(RuntimeError), BsonFileWriter(path) as writer:
        writer.write(_docs(1)[0])
        raise RuntimeError("task killed")
    assert [p.name for p in path.parent.iterdir()] == ["c.bson.gz"]
    assert len(list(iter_bson_file(path))) == 5


def test_writer_rejects_bytes_that_are_not_one_document(tmp_path):
    with BsonFileWriter(tmp_path / "c.bson") as writer, pytest.raises(DumpFormatError, match="malformed"):
        writer.write(_docs(1)[0] + b"\x00")


@pytest.mark.parametrize("background", [False, True])
def test_whole_batches_and_single_documents_interleave_in_order(tmp_path, background):
    docs = _docs(3_000, pad=400)
    path = bson_path(tmp_path, "db", "c")
    with BsonFileWriter(path, background=background) as writer:
        assert writer.write_batch(b"".join(docs[:1_000])) == 1_000
        for doc in docs[1_000:1_010]:
            writer.write(doc)  # buffered: must land after the batch above and before the next one
        assert writer.write_batch(b"".join(docs[1_010:])) == 1_990
    assert (writer.documents, writer.bytes) == (3_000, sum(map(len, docs)))
    assert list(iter_bson_file(path)) == docs


@pytest.mark.parametrize("background", [False, True])
def test_a_batch_with_a_torn_document_is_refused_and_nothing_is_left(tmp_path, background):
    docs = _docs(10)
    path = bson_path(tmp_path, "db", "c")
    with pytest.raises(DumpFormatError, match="malformed BSON document"), \
            BsonFileWriter(path, background=background) as writer:
        writer.write_batch(docs[0])
        writer.write_batch(b"".join(docs[1:])[:-3])
    assert not path.exists() and list(path.parent.iterdir()) == []


def test_background_write_failure_reaches_the_caller(tmp_path):
    writer = BsonFileWriter(tmp_path / "c.bson.gz", background=True)

    class Broken:
        def write(self, chunk):
            raise OSError("disk full")

        def close(self):
            pass

    writer._out = Broken()
    with pytest.raises(OSError, match="disk full"):
        for _ in range(20):  # the error surfaces on a later write or, at the latest, at close
            writer.write_batch(_docs(1)[0])
        writer.close()
    assert not (tmp_path / "c.bson.gz").exists()


def test_count_bson_documents_checks_framing():
    docs = _docs(4)
    assert count_bson_documents(b"".join(docs)) == 4 and count_bson_documents(b"") == 0
    with pytest.raises(DumpFormatError, match="stray byte"):
        count_bson_documents(b"".join(docs) + b"\x05\x00")
    with pytest.raises(DumpFormatError, match="at offset 0"):
        count_bson_documents(b"\xff\x00\x00\x00\x00")


def test_raw_bson_document_bytes_can_be_written(tmp_path):
    doc = RawBSONDocument(bson.encode({"_id": 1}))
    path = _write_bson(tmp_path / "c.bson", [doc.raw])
    assert list(iter_bson_file(path)) == [doc.raw]


def test_truncated_gzip_file_raises_dump_format_error(tmp_path):
    path = _write_bson(bson_path(tmp_path, "db", "orders"), _docs(2000, pad=100))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DumpFormatError, match=r"orders\.bson\.gz.*not a complete gzip stream"):
        for _ in iter_bson_file(path):
            pass


def test_truncated_document_raises_with_offset(tmp_path):
    docs = _docs(3)
    path = tmp_path / "c.bson.gz"
    path.write_bytes(gzip.compress(b"".join(docs)[:-7]))
    reader = iter_bson_file(path)
    assert next(reader) == docs[0]
    assert next(reader) == docs[1]
    with pytest.raises(DumpFormatError, match=rf"c\.bson\.gz is truncated: the document at offset {len(docs[0]) * 2}"):
        next(reader)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x02\x00", "stray byte"),
        (b"\xff\xff\xff\x7f" + b"\x00" * 10, "length 2147483647 is outside"),
        (b"\x03\x00\x00\x00", "length 3 is outside"),
        (b"\x06\x00\x00\x00\x01\x01", "does not end with a NUL"),
    ],
)
def test_garbage_raises_dump_format_error_with_offset(tmp_path, payload, message):
    good = _docs(1)[0]
    path = tmp_path / "c.bson"
    path.write_bytes(good + payload)
    with pytest.raises(DumpFormatError, match=message) as info:
        list(iter_bson_file(path))
    assert f"offset {len(good)}" in str(info.value)
    assert "c.bson" in str(info.value)


def test_missing_data_file_is_a_dump_format_error(tmp_path):
    with pytest.raises(DumpFormatError, match="does not exist"):
        list(iter_bson_file(tmp_path / "nope.bson.gz"))


# ------------------------------------------------------------------------------------------------ prelude
def test_prelude_is_written_as_mongodump_writes_it_and_read_back(tmp_path):
    path = write_prelude(tmp_path, Prelude("8.0.4", "100.12.0"), gzip=True)
    assert path.name == "prelude.json.gz"  # mongorestore --gzip looks for this name
    assert gzip.decompress(path.read_bytes()) == b'{"ServerVersion":"8.0.4","ToolVersion":"100.12.0"}'
    assert read_prelude(tmp_path) == Prelude("8.0.4", "100.12.0")
    assert read_prelude(tmp_path / "somedb") == Prelude("8.0.4", "100.12.0")  # a single database's folder
    assert read_prelude(tmp_path / "nothing" / "here") is None


def test_the_prelude_real_mongodump_wrote_is_read(mongodump_fixtures):
    root = mongodump_fixtures / "mongo-tools/mongorestore/testdata/prelude_test/prelude_gzip"
    assert read_prelude(root) == Prelude("7.0.16", "")


@pytest.mark.parametrize(("content", "message"), [
    ('{"ToolVersion":"100.12.0"}', "has no ServerVersion"),
    ('{"ServerVersion":"eight"}', "is not a MongoDB version"),
    ("not json", "not mongodump's prelude JSON"),
    ('{"ServerVersion":"3.6.23","ToolVersion":"100.12.0"}', r"MongoDB 3\.6\.23 .*older than 4\.2.*100\.19"),
])
def test_an_unusable_prelude_is_refused_clearly(tmp_path, content, message):
    (tmp_path / "prelude.json").write_text(content)
    with pytest.raises(DumpFormatError, match=message):
        read_prelude(tmp_path)


def test_unknown_server_version_is_accepted_as_mongorestore_does(tmp_path):
    (tmp_path / "prelude.json").write_text('{"ServerVersion":"unknown","ToolVersion":"100.13.0"}')
    assert read_prelude(tmp_path).server_version == "unknown"


def test_dumped_files_finds_mongodumps_escaped_names(mongodump_fixtures):
    root = mongodump_fixtures / "mongodump-100.9.4" / "gzip"
    assert dumped_files(root, "peer", "c++") == ["peer/c%2B%2B.bson.gz", "peer/c%2B%2B.metadata.json.gz"]
    assert dumped_files(root, "peer", "sp ace") == ["peer/sp+ace.bson.gz", "peer/sp+ace.metadata.json.gz"]
    assert dumped_files(root, "peer", "big_orders") == ["peer/big_orders.metadata.json.gz"]  # a view
    ts = mongodump_fixtures / "mongo-tools/mongorestore/testdata/timeseries_tests/ts_dump"
    assert dumped_files(ts, "timeseries_test", "foo_ts") == [
        "timeseries_test/system.buckets.foo_ts.bson", "timeseries_test/foo_ts.metadata.json"]
    prelude = mongodump_fixtures / "mongo-tools/mongorestore/testdata/prelude_test/prelude_gzip"
    assert dumped_files(prelude, "test", "foo") == ["test/foo.bson.gz", "test/foo.metadata.json.gz",
                                                    "prelude.json.gz"]
    with pytest.raises(DumpFormatError, match=r"no metadata file for peer\.nope"):
        dumped_files(root, "peer", "nope")
