"""Pure tests of validation: normalisation, comparison, BSON ordering, the report and its rendering.

No server is involved: snapshots are built by hand exactly as ``snapshot_namespace`` would build them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math

import bson
import pytest
from bson import Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.binary import Binary
from bson.son import SON

from atlas_migration.errors import ConfigurationError, ValidationFailed
from atlas_migration.validation import (
    DIGEST_ALGORITHM,
    DocumentDifference,
    NamespaceResult,
    NamespaceSnapshot,
    ValidationReport,
    bson_sort_key,
    collection_type,
    compare_namespace,
    digest_algorithm,
    multiset_digest,
    normalize_collection_options,
    normalize_index,
    normalize_indexes,
    normalize_value,
    raise_if_failed,
    render_markdown,
    render_summary,
    validate_namespaces,
    write_report,
)

ID_INDEX = {"v": 2, "key": {"_id": 1}, "name": "_id_"}
# Digests in the format snapshot_namespace produces ("<algorithm>:<64 hex digits>").
DIGEST_A, DIGEST_B, DIGEST_C = (f"{DIGEST_ALGORITHM}:{c * 64}" for c in "abc")


def snap(db: str = "shop", coll: str = "orders", **kwargs) -> NamespaceSnapshot:
    defaults = {"mode": "counts", "exists": True, "type": "collection", "count": 10,
                "indexes": normalize_indexes([ID_INDEX]), "options": {}}
    defaults.update(kwargs)
    return NamespaceSnapshot(db=db, coll=coll, **defaults)


def report_of(*results: NamespaceResult, mode: str = "counts") -> ValidationReport:
    return ValidationReport(
        run_id="manual__2026-05-01", strategy="mongodump_restore", mode=mode,
        started_at="2026-05-01T10:00:00Z", finished_at="2026-05-01T10:00:04Z", seconds=4.2,
        results=sorted(results, key=lambda r: r.namespace),
    )


# ---------------------------------------------------------------------------------------------- normalisation


def test_index_key_order_is_significant():
    ab = normalize_index({"key": SON([("a", 1), ("b", -1)]), "name": "combo"})
    ba = normalize_index({"key": SON([("b", -1), ("a", 1)]), "name": "combo"})
    assert ab["key"] == [["a", 1], ["b", -1]]
    assert ab != ba
    result = compare_namespace(snap(indexes=[ab]), snap(indexes=[ba]))
    assert result.status == "mismatch"
    assert result.differences == ['index \'combo\' key: source [["a",1],["b",-1]], target [["b",-1],["a",1]]']


def test_index_format_version_namespace_and_background_are_ignored():
    old = normalize_index({"v": 1, "ns": "shop.orders", "background": True, "key": {"a": 1}, "name": "a_1"})
    new = normalize_index({"v": 2, "key": {"a": 1}, "name": "a_1"})
    assert old == new == {"key": [["a", 1]], "name": "a_1"}


def test_numeric_types_are_normalised_in_index_keys_and_options():
    one = normalize_index({"key": {"a": 1, "b": Int64(-1)}, "name": "ab", "expireAfterSeconds": 3600,
                           "partialFilterExpression": {"qty": {"$gt": 2}}})
    other = normalize_index({"key": {"a": 1.0, "b": -1.0}, "name": "ab", "expireAfterSeconds": Int64(3600),
                             "partialFilterExpression": {"qty": {"$gt": Decimal128("2")}}})
    assert one == other
    result = compare_namespace(snap(indexes=[one]), snap(indexes=[other]))
    assert result.status == "match" and result.indexes_match


def test_non_integral_numbers_stay_distinct():
    assert normalize_value(2.5) == 2.5
    assert normalize_value(2.5) != normalize_value(2)
    assert normalize_value(Decimal128("2.5")) == {"$numberDecimal": "2.5"}
    assert normalize_value(float("nan")) == {"$numberDouble": "NaN"}


def test_option_order_does_not_matter_but_boolean_flags_are_canonical():
    a = normalize_index({"name": "email_1", "key": {"email": 1}, "unique": True, "sparse": True,
                         "collation": {"locale": "fr", "strength": 2}})
    b = normalize_index({"collation": {"strength": 2, "locale": "fr"}, "sparse": 1, "unique": True,
                         "name": "email_1", "key": {"email": 1}})
    assert compare_namespace(snap(indexes=[a]), snap(indexes=[b])).status == "match"
    # unique: false is what leaving the flag out means.
    assert normalize_index({"key": {"a": 1}, "name": "a_1", "unique": False}) == normalize_index(
        {"key": {"a": 1}, "name": "a_1"}
    )


def test_true_and_one_are_not_equal_outside_flags():
    a = normalize_index({"key": {"a": 1}, "name": "a_1", "partialFilterExpression": {"active": True}})
    b = normalize_index({"key": {"a": 1}, "name": "a_1", "partialFilterExpression": {"active": 1}})
    result = compare_namespace(snap(indexes=[a]), snap(indexes=[b]))
    assert result.differences == [
        'index \'a_1\' partialFilterExpression: source {"active":true}, target {"active":1}'
    ]


def test_collection_options_drop_identity_storage_and_default_fields():
    options = normalize_collection_options({
        "uuid": "abc", "info": {"readOnly": False}, "idIndex": ID_INDEX,
        "storageEngine": {"wiredTiger": {"configString": "block_compressor=zstd"}},
        "validationLevel": "strict", "validationAction": "error", "capped": False,
        "validator": {"$jsonSchema": {"required": ["sku", "qty"]}},
    })
    assert options == {"validator": {"$jsonSchema": {"required": ["sku", "qty"]}}}
    assert normalize_collection_options({"capped": True, "size": 4096.0, "max": Int64(50)}) == {
        "capped": True, "max": 50, "size": 4096,
    }


def test_view_pipeline_key_order_matters_but_validator_key_order_does_not():
    pipe_a = normalize_collection_options({"viewOn": "orders", "pipeline": [{"$sort": SON([("a", 1), ("b", 1)])}]})
    pipe_b = normalize_collection_options({"viewOn": "orders", "pipeline": [{"$sort": SON([("b", 1), ("a", 1)])}]})
    view = {"type": "view", "indexes": []}
    result = compare_namespace(snap(options=pipe_a, **view), snap(options=pipe_b, **view))
    assert result.status == "mismatch" and not result.options_match
    assert result.differences[0].startswith("option pipeline: ")

    val_a = normalize_collection_options({"validator": SON([("a", {"$type": "int"}), ("b", {"$exists": True})])})
    val_b = normalize_collection_options({"validator": SON([("b", {"$exists": True}), ("a", {"$type": "int"})])})
    assert compare_namespace(snap(options=val_a), snap(options=val_b)).status == "match"


def test_normalised_metadata_is_json_safe():
    value = normalize_value({"since": dt.datetime(2026, 1, 1), "ref": ObjectId("0" * 24), "re": Regex("^a", "i"),
                             "bin": Binary(b"\x01", 4), "inf": float("inf"), "n": Int64(3)})
    assert json.loads(json.dumps(value)) == value
    assert value["ref"] == {"$oid": "0" * 24} and value["n"] == 3


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"type": "view", "options": {"viewOn": "a", "pipeline": []}}, "view"),
        ({"type": "timeseries", "options": {"timeseries": {"timeField": "t"}}}, "timeseries"),
        ({"type": "collection", "options": {"timeseries": {"timeField": "t"}}}, "timeseries"),
        ({"type": "collection", "options": {"capped": True, "size": 4096}}, "capped"),
        ({"type": "collection", "options": {}}, "collection"),
        ({"type": "collection"}, "collection"),
    ],
)
def test_collection_type(entry, expected):
    assert collection_type(entry) == expected


# ---------------------------------------------------------------------------------------------- comparison


def test_identical_snapshots_match():
    result = compare_namespace(snap(), snap())
    assert (result.status, result.differences, result.indexes_match, result.options_match) == ("match", [], True, True)


def test_count_difference_is_reported_with_both_counts_and_the_delta():
    result = compare_namespace(snap(count=12_000), snap(count=11_999))
    assert result.status == "mismatch"
    assert result.differences == ["document count: source 12,000, target 11,999 (-1)"]
    # Indexes and options are fine: only the count differs.
    assert result.indexes_match and result.options_match


def test_missing_extra_and_different_indexes_are_named():
    source = normalize_indexes([ID_INDEX, {"key": {"email": 1}, "name": "email_1", "unique": True},
                                {"key": {"country": 1}, "name": "country_1"}])
    target = normalize_indexes([ID_INDEX, {"key": {"email": 1}, "name": "email_1"},
                                {"key": {"tier": 1}, "name": "tier_1"}])
    result = compare_namespace(snap(indexes=source), snap(indexes=target))
    assert result.status == "mismatch" and not result.indexes_match and result.options_match
    assert result.differences == [
        'index \'country_1\' missing in target (key [["country",1]])',
        "index 'email_1' unique: source true, target absent",
        'index \'tier_1\' only in target (key [["tier",1]])',
    ]


def test_option_and_type_differences_are_reported():
    capped = snap(type="capped", options=normalize_collection_options({"capped": True, "size": 4096}))
    plain = snap(type="collection", options={})
    result = compare_namespace(capped, plain)
    assert result.differences == [
        "type: source capped, target collection",
        "option capped: source true, target absent",
        "option size: source 4096, target absent",
    ]
    assert not result.options_match and result.indexes_match


def test_missing_in_target_and_missing_in_source():
    gone = snap(exists=False, type="", count=None, indexes=[])
    result = compare_namespace(snap(type="capped", count=1_500), gone)
    assert result.status == "missing_in_target"
    assert result.differences == ["namespace does not exist in the target (source: capped, 1,500 documents)"]
    assert not result.ok
    # Validating what the source does not have must not pass either.
    assert compare_namespace(gone, snap()).status == "mismatch"
    assert compare_namespace(gone, gone).differences == [
        "namespace does not exist in the source; nor does the target"
    ]


def test_digest_difference_and_mapped_target_namespace():
    source = snap(mode="full", digest=DIGEST_A)
    target = snap(db="rehearsal_shop", mode="full", digest=DIGEST_B)
    result = compare_namespace(source, target)
    assert result.namespace == "shop.orders" and result.target_namespace == "rehearsal_shop.orders"
    assert result.digest_differs
    assert result.differences == [f"content digest differs (sum-sha256 source {'a' * 12}…, target {'b' * 12}…)"]
    assert compare_namespace(snap(mode="full", digest=DIGEST_C), snap(mode="full", digest=DIGEST_C)).ok


def test_digests_of_different_algorithms_never_match():
    # An unprefixed digest is the ordered sha256 of earlier versions: even equal hex digits prove nothing.
    old = snap(mode="full", digest="a" * 64)
    result = compare_namespace(old, snap(mode="full", digest=DIGEST_A))
    assert result.status == "mismatch" and result.digest_differs
    assert result.differences == [
        "content digests use different algorithms (source sha256, target sum-sha256): "
        "snapshot both sides with the same version"
    ]
    assert (digest_algorithm(DIGEST_A), digest_algorithm("a" * 64)) == ("sum-sha256", "sha256")


def test_snapshot_with_a_digest_round_trips():
    snapshot = snap(mode="full", digest=DIGEST_A, count=3)
    data = json.loads(json.dumps(snapshot.to_dict()))
    assert data["digest"] == DIGEST_A
    assert NamespaceSnapshot.from_dict(data) == snapshot
    assert NamespaceSnapshot.from_dict(snap().to_dict()).digest is None


def test_snapshots_of_different_modes_are_not_compared():
    with pytest.raises(ValueError, match="counts snapshot with a full snapshot"):
        compare_namespace(snap(), snap(mode="full", digest=DIGEST_A))


def test_document_differences_are_appended_with_a_note_when_capped():
    base = compare_namespace(snap(mode="full", digest=DIGEST_A), snap(mode="full", digest=DIGEST_B))
    found = [DocumentDifference("missing_in_target", "7"), DocumentDifference("different", '{"$oid": "' + "1" * 24 + '"}')]
    result = base.with_document_differences(found, limit=2)
    assert result.differences[1:] == [
        "document _id 7: missing in target",
        'document _id {"$oid": "111111111111111111111111"}: differs between source and target',
        "(stopped after the first 2 differing documents; there may be more)",
    ]
    unexplained = base.with_document_differences([], limit=10)
    assert "no differing document found" in unexplained.differences[-1]


# ---------------------------------------------------------------------------------------------- the digest


def _documents(n: int = 6) -> list[bytes]:
    return [bson.encode({"_id": i, "name": f"customer {i}", "balance": Decimal128(f"{i}.5")}) for i in range(n)]


def test_digest_format_names_its_algorithm():
    count, digest = multiset_digest(_documents())
    algorithm, _, digits = digest.partition(":")
    assert (count, algorithm, len(digits)) == (6, "sum-sha256", 64)
    assert int(digits, 16) >= 0  # plain lower-case hex
    assert digits == digits.lower()
    assert multiset_digest([]) == (0, "sum-sha256:" + "0" * 64)


def test_digest_does_not_depend_on_document_order():
    documents = _documents()
    expected = multiset_digest(documents)
    assert multiset_digest(reversed(documents)) == expected
    assert multiset_digest(documents[3:] + documents[:3]) == expected
    assert multiset_digest(iter(sorted(documents))) == expected  # any iterable, read once


def test_a_single_changed_byte_changes_the_digest():
    documents = _documents()
    _, expected = multiset_digest(documents)
    # The digest hashes bytes without parsing them: a flipped bit in a field name, in the middle of a value
    # or in the last value byte must all show.
    for position in (5, len(documents[2]) // 2, len(documents[2]) - 2):
        damaged = bytearray(documents[2])
        damaged[position] ^= 0x01
        count, digest = multiset_digest([*documents[:2], bytes(damaged), *documents[3:]])
        assert count == 6 and digest != expected, position


def test_same_value_with_another_bson_type_changes_the_digest():
    # 2 and 2.0 are equal values but different bytes: full mode is a byte-identical check.
    assert multiset_digest([bson.encode({"_id": 1, "n": 2})]) != multiset_digest([bson.encode({"_id": 1, "n": 2.0})])


def test_missing_extra_and_duplicated_documents_change_the_digest():
    documents = _documents()
    count, expected = multiset_digest(documents)
    extra = bson.encode({"_id": 99, "name": "customer 99"})
    cases = {
        "missing": documents[:-1],
        "extra": [*documents, extra],
        "duplicated": [*documents, documents[0]],
        "replaced by a duplicate": [*documents[:-1], documents[0]],  # same count
    }
    for name, variant in cases.items():
        assert multiset_digest(variant)[1] != expected, name
    assert multiset_digest(cases["replaced by a duplicate"])[0] == count


def test_pairs_do_not_cancel_out():
    # The case XOR would miss: {A, B, B} and {A, C, C} have the same count and the same XOR of hashes.
    a, b, c = _documents(3)
    assert multiset_digest([a, b, b]) != multiset_digest([a, c, c])
    assert multiset_digest([a, b, b]) != multiset_digest([a])


def test_field_order_inside_a_document_changes_the_digest():
    ordered = bson.encode(SON([("_id", 1), ("a", 1), ("b", 2)]))
    reordered = bson.encode(SON([("_id", 1), ("b", 2), ("a", 1)]))
    assert bson.decode(ordered) == bson.decode(reordered)  # the same document as a mapping...
    assert multiset_digest([ordered]) != multiset_digest([reordered])  # ...but not the same bytes


# ---------------------------------------------------------------------------------------------- BSON order


def test_bson_sort_key_follows_mongodb_type_and_value_order():
    expected = [
        MinKey(), None, float("nan"), -math.inf, Decimal128("1.5"), Int64(2), 2.5, 3, "", "a", "z", "é",
        {"a": 1}, {"a": 1, "b": 1}, {"b": 0}, {"a": "x"}, [1, 2],
        Binary(b"\x01", 5), b"\x01\x02", Binary(b"\x00\x00", 4),
        ObjectId("0" * 24), ObjectId("f" * 24), False, True,
        dt.datetime(1960, 1, 1), dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
        Timestamp(4, 9), Timestamp(5, 1), Regex("a", ""), Regex("a", "i"), Regex("b", ""), MaxKey(),
    ]
    keys = [bson_sort_key(v) for v in expected]
    # Strictly increasing: every neighbour pair is in MongoDB's order and no two distinct values tie.
    assert all(a < b for a, b in zip(keys, keys[1:], strict=False))


def test_bson_sort_key_treats_equal_numbers_as_the_same_id():
    assert bson_sort_key(2) == bson_sort_key(Int64(2)) == bson_sort_key(2.0) == bson_sort_key(Decimal128("2"))
    assert bson_sort_key(True) != bson_sort_key(1)


# ---------------------------------------------------------------------------------------------- the report


def _mixed_report() -> ValidationReport:
    ok = compare_namespace(snap(coll="customers", count=1_000), snap(coll="customers", count=1_000))
    view = compare_namespace(
        snap(coll="paid_orders", type="view", count=400, indexes=[],
             options={"viewOn": "orders", "pipeline": [{"$match": {"status": "paid"}}]}),
        snap(coll="paid_orders", type="view", count=400, indexes=[],
             options={"viewOn": "orders", "pipeline": [{"$match": {"status": "paid"}}]}),
    )
    counted = compare_namespace(snap(coll="orders", count=3_500), snap(coll="orders", count=3_499))
    piped = compare_namespace(snap(coll="we|ird_name", count=5), snap(coll="we|ird_name", count=5, indexes=[]))
    missing = compare_namespace(snap(db="inventory", coll="stock.levels", count=350),
                                snap(db="inventory", coll="stock.levels", exists=False, count=None, indexes=[]))
    return report_of(ok, view, counted, piped, missing)


def test_totals_and_verdict():
    report = _mixed_report()
    totals = report.totals
    assert (totals.namespaces, totals.matched, totals.mismatched) == (5, 2, 3)
    # Views are not added to the document totals (their documents are the collection's).
    assert totals.source_documents == 1_000 + 3_500 + 5 + 350
    assert totals.target_documents == 1_000 + 3_499 + 5
    assert report.verdict == "FAIL"
    assert report_of(compare_namespace(snap(), snap())).verdict == "PASS"
    assert report_of().verdict == "FAIL"


def test_report_is_json_safe_and_round_trips():
    report = _mixed_report()
    data = json.loads(json.dumps(report.to_dict()))
    assert data["verdict"] == "FAIL"
    assert data["totals"]["mismatched"] == 3
    assert [ns["namespace"] for ns in data["namespaces"]] == [
        "inventory.stock.levels", "shop.customers", "shop.orders", "shop.paid_orders", "shop.we|ird_name",
    ]
    assert ValidationReport.from_dict(data) == report


def test_markdown_has_verdict_first_a_row_per_namespace_and_every_difference():
    text = render_markdown(_mixed_report())
    lines = text.splitlines()
    assert lines[2] == ("**Validation FAIL: 3 of 5 namespaces do not match "
                        "(counts mode, strategy mongodump_restore, run manual__2026-05-01)**")
    assert "| namespace | type | source count | target count | indexes | options | verdict |" in lines
    assert "| shop.orders | collection | 3,500 | 3,499 | ok (1) | ok | MISMATCH |" in lines
    assert "| shop.customers | collection | 1,000 | 1,000 | ok (1) | ok | match |" in lines
    assert "| shop.paid_orders | view | 400 | 400 | ok | ok | match |" in lines
    assert "| inventory.stock.levels | collection | 350 | — | — | — | MISSING IN TARGET |" in lines
    # A pipe in a collection name must not break the table.
    assert "| shop.we\\|ird_name | collection | 5 | 5 | DIFFERS | ok | MISMATCH |" in lines
    differences = text.split("## Differences", 1)[1]
    assert "### `shop.orders`\n\n- document count: source 3,500, target 3,499 (-1)" in differences
    assert "### `shop.we|ird_name`\n\n- index '_id_' missing in target" in differences
    assert "- namespace does not exist in the target (source: collection, 350 documents)" in differences
    assert "shop.customers" not in differences


def test_markdown_for_a_pass_and_a_mapped_target():
    result = compare_namespace(snap(mode="full", digest=DIGEST_C), snap(db="rehearsal_shop", mode="full", digest=DIGEST_C))
    text = render_markdown(report_of(result, mode="full"))
    assert "**Validation PASS: the 1 namespace matches (full mode" in text
    assert "| shop.orders → rehearsal_shop.orders | collection | 10 | 10 | ok (1) | ok | match |" in text
    assert "None: every namespace matches." in text


def test_summary_is_short_and_names_mismatches():
    summary = render_summary(_mixed_report())
    lines = summary.splitlines()
    assert lines[0].startswith("Validation FAIL: 3 of 5 namespaces do not match")
    assert "documents: source 4,855, target 4,504; 4.2 s" in lines[1]
    assert lines[2:] == [
        "  inventory.stock.levels: missing_in_target: namespace does not exist in the target "
        "(source: collection, 350 documents)",
        "  shop.orders: mismatch: document count: source 3,500, target 3,499 (-1)",
        "  shop.we|ird_name: mismatch: index '_id_' missing in target (key [[\"_id\",1]])",
    ]
    assert len(render_summary(_mixed_report(), max_namespaces=1).splitlines()) == 4


def test_write_report_writes_json_and_markdown(tmp_path):
    report = _mixed_report()
    paths = write_report(report, tmp_path / "reports" / "run-1")
    assert set(paths) == {"json", "markdown"}
    assert json.loads(open(paths["json"], encoding="utf-8").read()) == report.to_dict()
    assert open(paths["markdown"], encoding="utf-8").read() == render_markdown(report)


def test_raise_if_failed_lists_every_mismatching_namespace():
    many = [compare_namespace(snap(coll=f"c{i:02d}", count=100), snap(coll=f"c{i:02d}", count=100 - i))
            for i in range(1, 31)]
    with pytest.raises(ValidationFailed) as caught:
        raise_if_failed(report_of(*many, compare_namespace(snap(coll="fine"), snap(coll="fine"))))
    message = str(caught.value)
    assert message.splitlines()[0].startswith("Validation FAIL: 30 of 31 namespaces do not match")
    for i in range(1, 31):
        assert f"- shop.c{i:02d} (mismatch): document count: source 100, target {100 - i}" in message
    assert "shop.fine" not in message


def test_raise_if_failed_quotes_first_differences_and_redacts():
    options = {"validator": {"$expr": {"$eq": ["$uri", "mongodb://admin:hunter22@db.example.com"]}}}
    result = compare_namespace(snap(options=options, count=3), snap(options={}, count=5, indexes=[]))
    base = result.with_document_differences([DocumentDifference("extra_in_target", "42")], limit=10)
    with pytest.raises(ValidationFailed) as caught:
        raise_if_failed(report_of(base))
    message = str(caught.value)
    assert "- shop.orders (mismatch): document count: source 3, target 5 (+2); index '_id_' missing" in message
    assert "; option validator: source " in message
    # Four differences: the first three are quoted, the document difference is counted.
    assert message.endswith(", target absent (+1 more)")
    assert "hunter22" not in message and "mongodb://admin:***@" in message


def test_raise_if_failed_passes_silently_and_refuses_an_empty_validation():
    raise_if_failed(report_of(compare_namespace(snap(), snap())))
    with pytest.raises(ValidationFailed, match="no namespaces were validated"):
        raise_if_failed(report_of())


def test_bad_arguments_are_configuration_errors():
    with pytest.raises(ConfigurationError, match="validation mode 'fast'"):
        validate_namespaces(None, None, [("shop", "orders")], mode="fast")
    with pytest.raises(ConfigurationError, match="must be a \\(database, collection\\) pair"):
        validate_namespaces(None, None, ["shop.orders"])


def test_notes_are_kept_and_shown_in_both_renderings():
    report = dataclasses.replace(_mixed_report(), notes=["Compose path: restore",
                                                          "FALLBACK: writes after the dump are NOT migrated"])
    assert ValidationReport.from_dict(json.loads(json.dumps(report.to_dict()))).notes == report.notes
    assert "- Note: FALLBACK: writes after the dump are NOT migrated" in render_markdown(report).splitlines()
    assert "  note: Compose path: restore" in render_summary(report).splitlines()
