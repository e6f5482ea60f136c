"""Parsing, typing and splitting of JSON / CSV / TSV files (pure: no server)."""

from __future__ import annotations

import datetime as dt
import gzip
import io

import bson
import pytest
from bson import json_util
from bson.binary import Binary
from bson.decimal128 import Decimal128
from bson.int64 import Int64

from atlas_migration.engines import file_import as fi
from atlas_migration.errors import ConfigurationError

UTC = dt.UTC

# Every Extended JSON v2 type, canonical and relaxed spellings mixed.
EJSON_LINE = (
    '{"_id": {"$oid": "5f1d7f3a2b4c6d8e0f1a2b3c"}, "d": {"$date": "2020-01-02T03:04:05.678Z"}, '
    '"old": {"$date": {"$numberLong": "-2208988800001"}}, "l": {"$numberLong": "5"}, "i": {"$numberInt": "7"}, '
    '"negzero": {"$numberDouble": "-0.0"}, "inf": {"$numberDouble": "Infinity"}, "dec": {"$numberDecimal": "1.10"}, '
    '"b": {"$binary": {"base64": "AAE=", "subType": "00"}}, "u": {"$binary": {"base64": "c//SZESzTGmQ6OfR38A11A==", '
    '"subType": "04"}}, "u2": {"$uuid": "73ffd264-44b3-4c69-90e8-e7d1dfc035d4"}, "legacy": {"$binary": '
    '{"base64": "AAE=", "subType": "03"}}, "re": {"$regularExpression": {"pattern": "^a", "options": "i"}}, '
    '"ts": {"$timestamp": {"t": 1, "i": 2}}, "mn": {"$minKey": 1}, "mx": {"$maxKey": 1}, "c": {"$code": "x"}, '
    '"cws": {"$code": "x", "$scope": {"a": 1}}, "n": null, "arr": [1, {"x": 2.5}], "big": 12345678901, '
    '"dbref": {"$ref": "c", "$id": 1}, "s": "é\\u00e9\\n"}'
)


def parse_all(data: bytes, options: fi.ImportOptions, target_bytes: int = 0):
    header, ranges = fi.plan_ranges(io.BufferedReader(io.BytesIO(data)), len(data), options, target_bytes)
    out = []
    for rng in ranges:
        raw = io.BytesIO(data)
        raw.seek(rng.start)
        out.extend(fi.records(fi.open_range(raw, rng, options), rng, options, header))
    return header, ranges, out


def test_extended_json_lines_are_byte_exact_with_json_util():
    canonical = json_util.dumps(json_util.loads(EJSON_LINE, json_options=fi._json_options()),
                                json_options=json_util.CANONICAL_JSON_OPTIONS)
    data = (EJSON_LINE + "\n\n" + canonical + "\n").encode()
    _, _, records = parse_all(data, fi.ImportOptions("json"))
    assert [r.line for r in records] == [1, 3]
    expected = bson.encode(json_util.loads(EJSON_LINE, json_options=fi._json_options()))
    for record in records:
        assert fi.encode_document(record.document, None) == expected
    decoded = bson.decode(expected, codec_options=bson.CodecOptions(datetime_conversion=bson.DatetimeConversion.DATETIME_AUTO))
    assert isinstance(decoded["l"], Int64) and decoded["i"] == 7 and isinstance(decoded["dec"], Decimal128)
    assert isinstance(decoded["u"], Binary) and decoded["u"].subtype == 4 and decoded["legacy"].subtype == 3


def test_dates_outside_pythons_range_stay_exact():
    line = '{"d": {"$date": {"$numberLong": "-62135596800001"}}}'
    record = next(fi.json_lines_records(io.BytesIO(line.encode()), 1))
    assert fi.encode_document(record.document, None) == bson.encode(
        json_util.loads(line, json_options=fi._json_options()))
    assert bson.decode(fi.encode_document(record.document, None), codec_options=bson.CodecOptions(
        datetime_conversion=bson.DatetimeConversion.DATETIME_MS))["d"] == bson.DatetimeMS(-62135596800001)


def test_id_goes_first_and_missing_id_is_filled():
    raw = fi.encode_document({"a": 1, "_id": 2}, None)
    assert list(bson.decode(raw)) == ["_id", "a"]
    assert bson.decode(fi.encode_document({"a": 1}, "tag:3")) == {"_id": "tag:3", "a": 1}


def test_bad_json_lines_are_rejected_by_line_without_values():
    data = b'{"a": 1}\n{"secret": "4111-1111", \n[1, 2]\n{"d": {"$date": "not a date"}}\n'
    _, _, records = parse_all(data, fi.ImportOptions("json"))
    assert [(r.line, r.document is None) for r in records] == [(1, False), (2, True), (3, True), (4, True)]
    assert "a list where a document was expected" in records[2].rejection
    for record in records[1:]:
        assert "4111" not in record.rejection and "not a date" not in record.rejection


def test_json_array_elements_stream_with_their_lines():
    data = (b'\xef\xbb\xbf [\n  {"a": "x, ] } [ \\" {"},\n  {"b": {"$numberLong": "9"},\n   "c": [1, [2]]}\n'
            b'  , 5 ,\n {"e": 1}]\n')
    _, ranges, records = parse_all(data, fi.ImportOptions("json_array"), target_bytes=4)
    assert len(ranges) == 1  # an array is never split
    assert [r.line for r in records] == [2, 3, 5, 6]
    assert records[0].document == {"a": 'x, ] } [ " {'}
    assert records[1].document == {"b": Int64(9), "c": [1, [2]]}
    assert records[2].document is None and "int where a document" in records[2].rejection
    with pytest.raises(fi.FileFormatError, match="not closed"):
        parse_all(b'[{"a": 1},\n{"b": 2}\n', fi.ImportOptions("json_array"))
    with pytest.raises(fi.FileFormatError, match="must start with"):
        parse_all(b'{"a": 1}', fi.ImportOptions("json_array"))


TYPED_CSV = (
    "_id.int32(),name.string(),addr.city.string(),addr.zip.auto(),born.date(2006-01-02),seen.date_go(2006-01-02T15:04:05Z07:00),"
    "big.int64(),ratio.double(),price.decimal(),ok.boolean(),blob.binary(hex),b64.binary(base64),"
    "ms.date_ms(yyyy-MM-dd HH:mm:ss),ora.date_oracle(DD-MON-YYYY)\n"
    '1,"Ann, ""the"" first",Paris,75001,1990-05-17,2021-03-04T05:06:07.123+02:00,9007199254740993,2.5,1.10,true,'
    'cafe,AAE=,2020-01-02 03:04:05,17-MAY-1990\n'
    '2,"two\nlines",Lyon,abc,1991-01-01,2021-03-04T05:06:07Z,-1,1e3,-0,0,,,2020-01-02 03:04:05,01-JAN-2000\n'
)


def test_typed_csv_columns_nested_names_and_quoted_newlines():
    options = fi.ImportOptions("csv", columns_have_types=True)
    header, _, records = parse_all(TYPED_CSV.encode(), options)
    assert header[0] == "_id.int32()"
    first, second = (r.document for r in records)
    assert [r.line for r in records] == [2, 3]
    assert first["name"] == 'Ann, "the" first' and first["addr"] == {"city": "Paris", "zip": 75001}
    assert first["born"] == dt.datetime(1990, 5, 17, tzinfo=UTC)
    assert first["seen"] == dt.datetime(2021, 3, 4, 3, 6, 7, 123000, tzinfo=UTC)
    assert first["big"] == Int64(9007199254740993) and isinstance(first["big"], Int64)
    assert first["price"] == Decimal128("1.10") and first["ok"] is True
    assert first["blob"] == Binary(b"\xca\xfe", 0) and first["b64"] == Binary(b"\x00\x01", 0)
    assert first["ms"] == dt.datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert first["ora"] == dt.datetime(1990, 5, 17, tzinfo=UTC)
    assert second["name"] == "two\nlines" and second["addr"]["zip"] == "abc" and second["ratio"] == 1000.0
    assert second["blob"] == Binary(b"", 0) and second["price"] == Decimal128("-0") and second["ok"] is False


def test_blank_fields_kept_or_ignored_and_auto_types():
    data = b"a,b,c.d\n1,,2147483648\n 3,x,1.5\n"
    _, _, records = parse_all(data, fi.ImportOptions("csv"))
    assert records[0].document == {"a": 1, "b": "", "c": {"d": Int64(2147483648)}}
    assert records[1].document == {"a": " 3", "b": "x", "c": {"d": 1.5}}  # Go's ParseInt refuses spaces
    _, _, records = parse_all(data, fi.ImportOptions("csv", ignore_blanks=True))
    assert records[0].document == {"a": 1, "c": {"d": Int64(2147483648)}}


@pytest.mark.parametrize(("policy", "expected"), [
    ("stop", [None, {"n": 2, "x": "ok"}]),
    ("skip_row", [None, {"n": 2, "x": "ok"}]),
    ("skip_field", [{"x": "a"}, {"n": 2, "x": "ok"}]),
    ("auto_cast", [{"n": "secret-1", "x": "a"}, {"n": 2, "x": "ok"}]),
])
def test_parse_error_policies(policy, expected):
    data = b"n.int32(),x.string()\nsecret-1,a\n2,ok\n"
    _, _, records = parse_all(data, fi.ImportOptions("csv", columns_have_types=True, parse_errors=policy))
    assert [r.document for r in records] == expected
    if policy in ("stop", "skip_row"):
        assert records[0].rejection == "column 'n' (int32): not an int32" and records[0].line == 2
    if policy == "skip_field":
        assert records[0].skipped_fields == ["column 'n' (int32): not an int32"]


def test_field_list_extra_values_and_header_checks():
    options = fi.ImportOptions("csv", header_line=False, fields=("a", "b.c"))
    _, _, records = parse_all(b"1,2,3\n", options)
    assert records[0].document == {"a": 1, "b": {"c": 2}, "field2": 3}
    for header, message in ((b"a,a\n", "repeated"), (b"a,a.b\n", "both a value and a document"),
                            (b"$a\n", "cannot start with"), (b"a..b\n", "'..'")):
        with pytest.raises(fi.FileFormatError, match=message):
            parse_all(header + b"1\n", fi.ImportOptions("csv"))
    with pytest.raises(ConfigurationError, match="exclude each other"):
        fi.ImportOptions("csv", fields=("a",))
    with pytest.raises(fi.FileFormatError, match="has no type"):
        parse_all(b"a\n1\n", fi.ImportOptions("csv", columns_have_types=True))
    with pytest.raises(ConfigurationError, match="unknown type"):
        parse_all(b"a.int8()\n1\n", fi.ImportOptions("csv", columns_have_types=True))


def test_tsv_has_no_quoting():
    data = b'name\tnote\n"a"\tx,y\n\nb\t\r\n'
    _, _, records = parse_all(data, fi.ImportOptions("tsv"))
    assert [(r.line, r.document) for r in records] == [(2, {"name": '"a"', "note": "x,y"}),
                                                      (4, {"name": "b", "note": ""})]


def test_gzip_is_one_range_with_the_header_skipped():
    plain = b"a,b\n1,2\n3,4\n"
    options = fi.ImportOptions("csv", gzip=True)
    header, ranges, records = parse_all(gzip.compress(plain), options, target_bytes=2)
    assert header == ["a", "b"] and len(ranges) == 1
    assert [(r.line, r.document) for r in records] == [(2, {"a": 1, "b": 2}), (3, {"a": 3, "b": 4})]


def _csv_with_quoted_newlines(rows: int) -> bytes:
    out = io.StringIO()
    out.write("id,text\n")
    for i in range(rows):
        text = f'"row {i}\nsecond ""line""\n"' if i % 3 == 0 else f"plain {i}"
        out.write(f"{i},{text}\n")
    return out.getvalue().encode()


@pytest.mark.parametrize("target_bytes", [1, 7, 20, 64, 1000])
def test_csv_ranges_never_cut_a_quoted_field_and_know_their_lines(target_bytes):
    data = _csv_with_quoted_newlines(40)
    options = fi.ImportOptions("csv")
    header, ranges, records = parse_all(data, options, target_bytes)
    assert header == ["id", "text"]
    if target_bytes < 1000:
        assert len(ranges) > 1
    assert [r.start for r in ranges[1:]] == [r.end for r in ranges[:-1]]
    assert all(r.rejection is None for r in records)
    assert [r.document["id"] for r in records] == list(range(40))
    # The line numbers match a whole-file parse.
    _, _, whole = parse_all(data, options, 0)
    assert [r.line for r in records] == [r.line for r in whole]
    assert whole[1].line == 5  # row 0 spans lines 2-4


def test_json_lines_ranges_split_on_newlines():
    data = b"".join(b'{"i": %d}\n' % i for i in range(100))
    _, ranges, records = parse_all(data, fi.ImportOptions("json"), target_bytes=50)
    assert len(ranges) > 5
    assert [r.document["i"] for r in records] == list(range(100))
    assert [r.line for r in records] == list(range(1, 101))


def test_go_layouts():
    parse = fi.GoLayout.compile("Jan _2 2006 3:04PM MST").parse
    assert parse("Feb  3 2021 4:05PM UTC") == dt.datetime(2021, 2, 3, 16, 5, tzinfo=UTC)
    assert fi.GoLayout.compile("2006-01-02 15:04:05").parse("2021-02-03 04:05:06.789") == \
        dt.datetime(2021, 2, 3, 4, 5, 6, 789000, tzinfo=UTC)
    assert fi.GoLayout.compile("02/01/06 -0700").parse("03/02/21 -0130") == dt.datetime(2021, 2, 3, 1, 30, tzinfo=UTC)
    with pytest.raises(fi.RowRejected, match="does not match"):
        parse("2021-02-03")


def test_auto_follows_go_number_rules():
    assert fi.auto_value("12") == 12 and isinstance(fi.auto_value("3000000000"), Int64)
    assert fi.auto_value("1_000") == "1_000" and fi.auto_value("0x1p-2") == 0.25
    assert fi.auto_value("NaN") != fi.auto_value("NaN")  # a float NaN
    assert fi.auto_value("99999999999999999999") == 1e20  # past int64: a double, as ParseFloat gives


def test_format_detection_and_stems():
    assert fi.detect_format(b"[{}]", "x.json") == ("json_array", False)
    assert fi.detect_format(gzip.compress(b'{"a":1}\n'), "x.json.gz") == ("json", True)
    assert fi.detect_format(b"a\tb\n", "data") == ("tsv", False)
    assert fi.file_stem("dir/orders.json.gz") == "orders" and fi.file_stem("a.b.csv") == "a.b"


# ---------------------------------------------------------------- writing to a real server


def _import(collection, data: bytes, options: fi.ImportOptions, mode: str, upsert_fields=("_id",), tag="t"):
    header, ranges = fi.plan_ranges(io.BufferedReader(io.BytesIO(data)), len(data), options, 0)
    result = fi.RangeResult(file="f.csv", namespace=collection.full_name, range_index=0, mode=mode)
    raw = io.BytesIO(data)
    raw.seek(ranges[0].start)
    stream = fi.open_range(raw, ranges[0], options)
    return fi.import_records(collection, fi.records(stream, ranges[0], options, header), result=result, tag=tag,
                             policy=options.parse_errors, upsert_fields=list(upsert_fields), batch_size=2)


@pytest.mark.integration
def test_modes_and_a_retried_insert_on_a_real_server(target):
    with target.client() as client:
        coll = client.files_test.people
        options = fi.ImportOptions("csv", parse_errors="skip_row", columns_have_types=True)
        data = b"name.string(),age.int32()\nann,30\nbob,x\ncid,40\n"
        first = _import(coll, data, options, "insert")
        again = _import(coll, data, options, "insert")  # a retried task: the same _ids, nothing duplicated
        assert (first.inserted, first.rejected, again.inserted, again.already_present) == (2, 1, 0, 2)
        assert first.rejections == [{"file": "f.csv", "line": 3, "reason": "column 'age' (int32): not an int32",
                                     "action": "row_skipped"}]
        assert coll.count_documents({}) == 2 and coll.find_one({"name": "ann"})["_id"] == "t:2"
        assert first.digest == again.digest
        keyed = fi.ImportOptions("csv", columns_have_types=True)
        upsert = _import(coll, b"name.string(),city.string()\nann,Paris\ndan,Oslo\n", keyed, "upsert", ["name"])
        assert (upsert.matched, upsert.upserted) == (1, 1)
        ann = coll.find_one({"name": "ann"})
        assert ann["_id"] == "t:2" and "age" not in ann and ann["city"] == "Paris"  # replaced, _id kept
        merge = _import(coll, b"name.string(),age.int32()\ncid,41\neve,22\n", keyed, "merge", ["name"])
        assert (merge.matched, merge.modified, merge.upserted) == (1, 1, 1)
        assert {k: v for k, v in coll.find_one({"name": "cid"}).items() if k != "_id"} == {"name": "cid", "age": 41}
        deleted = _import(coll, b"name.string()\ndan\nzed\n", keyed, "delete", ["name"])
        assert deleted.deleted == 1 and sorted(d["name"] for d in coll.find()) == ["ann", "cid", "eve"]
        with pytest.raises(fi.ImportStopped, match=r"f.csv line 3: column 'age' \(int32\): not an int32"):
            _import(client.files_test.other, data, fi.ImportOptions("csv", columns_have_types=True), "insert")
        client.drop_database("files_test")
