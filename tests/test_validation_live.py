"""Validation against real servers: the ``source`` and ``target`` fixtures drop user databases around each test.

Each side is seeded with the same deterministic documents (so their raw BSON is byte-identical), then the
target is damaged in one precise way and the report must say exactly that.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator

import bson
import pytest
from bson import Decimal128, Int64, MaxKey, MinKey, ObjectId
from bson.binary import Binary
from pymongo import ASCENDING, DESCENDING

from atlas_migration.errors import ValidationFailed
from atlas_migration.validation import (
    DocumentDifference,
    find_document_differences,
    multiset_digest,
    raise_if_failed,
    render_markdown,
    snapshot_namespace,
    validate_namespaces,
)

pytestmark = pytest.mark.integration

N = 1_500
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SHOP = [("shop", "customers"), ("shop", "events_log"), ("shop", "pro_customers")]
PRIVATE = "personal-note-7f3a"  # a document value that must never reach a report


def _customer(i: int) -> dict:
    return {
        "_id": i,
        "email": f"user{i}@example.com",
        "country": ["FR", "DE", "US"][i % 3],
        "tier": ["free", "pro", "enterprise"][i % 3],
        "signedUpAt": EPOCH + dt.timedelta(minutes=i),
        "balance": Decimal128(f"{i}.50"),
        "tags": ["beta"] if i % 5 == 0 else [],
        "note": PRIVATE,
    }


def seed_shop(client, db: str = "shop", *, capped: bool = True, unique_email: bool = True,
              view_tier: str = "pro") -> None:
    """A collection with a unique and a compound index, a capped collection and a view on the first."""
    database = client[db]
    database.customers.insert_many([_customer(i) for i in range(N)])
    database.customers.create_index("email", unique=unique_email)
    database.customers.create_index([("country", ASCENDING), ("signedUpAt", DESCENDING)])
    if capped:
        database.create_collection("events_log", capped=True, size=1024 * 1024)
    database.events_log.insert_many([{"_id": i, "kind": "login", "at": EPOCH + dt.timedelta(seconds=i)}
                                     for i in range(200)])
    database.create_collection("pro_customers", viewOn="customers", pipeline=[{"$match": {"tier": view_tier}}])


@pytest.fixture
def clients(source, target) -> Iterator[tuple]:
    with source.client() as source_client, target.client() as target_client:
        yield source_client, target_client


def by_namespace(report) -> dict:
    return {r.namespace: r for r in report.results}


@pytest.mark.parametrize("mode", ["counts", "full"])
def test_identical_data_passes(clients, mode):
    source_client, target_client = clients
    seed_shop(source_client)
    seed_shop(target_client)
    report = validate_namespaces(source_client, target_client, SHOP, mode=mode, run_id="r1", strategy="raw")
    assert report.verdict == "PASS", render_markdown(report)
    raise_if_failed(report)
    results = by_namespace(report)
    assert [results[ns].source.type for ns in sorted(results)] == ["collection", "capped", "view"]
    assert results["shop.customers"].source.count == N
    assert results["shop.pro_customers"].source.count == N // 3
    assert len(results["shop.customers"].source.indexes) == 3
    totals = report.totals
    assert (totals.namespaces, totals.matched, totals.source_documents, totals.target_documents) == (
        3, 3, N + 200, N + 200
    )
    digest = results["shop.customers"].source.digest
    if mode == "full":
        assert digest is not None and digest.startswith("sum-sha256:") and len(digest) == len("sum-sha256:") + 64
        assert results["shop.customers"].target.digest == digest
    else:
        assert digest is None
    assert results["shop.pro_customers"].source.digest is None  # views are validated by count and definition
    assert (report.run_id, report.strategy, report.mode) == ("r1", "raw", mode)
    assert report.started_at.endswith("Z") and report.seconds > 0


def test_missing_document(clients):
    source_client, target_client = clients
    seed_shop(source_client)
    seed_shop(target_client)
    target_client.shop.customers.delete_one({"_id": 777})

    counts = by_namespace(validate_namespaces(source_client, target_client, SHOP))["shop.customers"]
    assert counts.status == "mismatch"
    assert counts.differences == ["document count: source 1,500, target 1,499 (-1)"]
    # The view over customers sees one "pro" customer fewer too (777 % 3 == 0 is "free": it does not).
    full = validate_namespaces(source_client, target_client, SHOP, mode="full")
    customers = by_namespace(full)["shop.customers"]
    assert customers.document_differences == [DocumentDifference("missing_in_target", "777")]
    assert customers.differences[0] == "document count: source 1,500, target 1,499 (-1)"
    assert customers.differences[1].startswith("content digest differs")
    assert customers.differences[2:] == ["document _id 777: missing in target"]
    assert by_namespace(full)["shop.events_log"].ok and by_namespace(full)["shop.pro_customers"].ok


def test_extra_document(clients):
    source_client, target_client = clients
    seed_shop(source_client)
    seed_shop(target_client)
    target_client.shop.customers.insert_one(_customer(N + 40))  # tier "pro": the view's count changes too

    counts = by_namespace(validate_namespaces(source_client, target_client, SHOP))
    assert counts["shop.customers"].differences == ["document count: source 1,500, target 1,501 (+1)"]
    assert counts["shop.pro_customers"].differences == ["document count: source 500, target 501 (+1)"]
    full = by_namespace(validate_namespaces(source_client, target_client, SHOP, mode="full"))
    assert full["shop.customers"].document_differences == [DocumentDifference("extra_in_target", str(N + 40))]


def test_changed_field_with_the_same_count_is_caught_only_in_full_mode(clients, tmp_path):
    source_client, target_client = clients
    seed_shop(source_client)
    seed_shop(target_client)
    target_client.shop.customers.update_one({"_id": 1234}, {"$set": {"note": "changed " + PRIVATE}})
    # Same value, different BSON type: a byte-level change a count can never see.
    target_client.shop.events_log.update_one({"_id": 150}, {"$set": {"kind": "login", "at": EPOCH}})

    counts = validate_namespaces(source_client, target_client, SHOP)
    assert counts.verdict == "PASS"  # counts mode cannot see an edited document: that is what full mode is for
    full = validate_namespaces(source_client, target_client, SHOP, mode="full")
    assert full.verdict == "FAIL"
    results = by_namespace(full)
    assert results["shop.customers"].document_differences == [DocumentDifference("different", "1234")]
    assert results["shop.events_log"].document_differences == [DocumentDifference("different", "150")]
    assert "document _id 1234: differs between source and target" in results["shop.customers"].differences
    # Documents are named by _id only: no body reaches the report or the exception.
    assert PRIVATE not in json.dumps(full.to_dict()) and PRIVATE not in render_markdown(full)
    with pytest.raises(ValidationFailed) as caught:
        raise_if_failed(full)
    assert "shop.customers (mismatch)" in str(caught.value) and "shop.events_log (mismatch)" in str(caught.value)
    assert PRIVATE not in str(caught.value)


def test_document_merge_with_mixed_id_types(clients):
    """Every BSON type the server can use as _id: identical sides yield no difference, damage is named exactly."""
    source_client, target_client = clients
    ids = [MinKey(), None, 3, Int64(4), 2.5, Decimal128("1.5"), "b", "a", "é", {"k": 1}, {"k": "x"},
           {"a": 1, "b": 2}, Binary(b"\x01\x02", 0), Binary(b"\x00\x00", 4), Binary(b"\x01", 5),
           ObjectId("0" * 24), ObjectId("f" * 24), False, True, dt.datetime(1960, 1, 1), EPOCH, MaxKey()]
    ids += list(range(100, 400))
    for client in clients:
        client.mixed.things.insert_many([{"_id": value, "n": i} for i, value in enumerate(ids)])
    assert find_document_differences(source_client, target_client, "mixed", "things") == []

    target = target_client.mixed.things
    target.delete_one({"_id": "a"})
    # SecantusDB orders equal-length binaries by bytes before subtype (mongod: subtype first), so here the
    # merge meets the two binaries out of step; the point lookups must keep that from becoming a report.
    target.delete_one({"_id": {"$eq": Binary(b"\x00\x00", 4)}})
    target.update_one({"_id": ObjectId("f" * 24)}, {"$set": {"n": -1}})
    target.insert_one({"_id": ObjectId("1" * 24), "n": 0})
    target.replace_one({"_id": 3}, {"n": 3.0})  # 3 became 3.0: same value, different bytes
    found = find_document_differences(source_client, target_client, "mixed", "things")
    assert sorted(found, key=lambda d: d.id) == sorted([
        DocumentDifference("missing_in_target", '"a"'),
        DocumentDifference("missing_in_target", '{"$binary": {"base64": "AAA=", "subType": "04"}}'),
        DocumentDifference("different", '{"$oid": "ffffffffffffffffffffffff"}'),
        DocumentDifference("extra_in_target", '{"$oid": "111111111111111111111111"}'),
        DocumentDifference("different", "3"),
    ], key=lambda d: d.id)
    assert len(find_document_differences(source_client, target_client, "mixed", "things", limit=2)) == 2


def _natural_ids(client, db: str, coll: str) -> list:
    return [document["_id"] for document in client[db][coll].find({}, {"_id": 1})]


def test_digest_does_not_depend_on_insertion_order(clients):
    """The same documents inserted in different orders: equal digests, and a damaged one is still named."""
    source_client, target_client = clients
    documents = [_customer(i) for i in range(N)]
    source_client.shop.orders.insert_many(documents)
    # The target gets them in reverse, then in two halves swapped: its natural order differs from the source's.
    reordered = list(reversed(documents))
    target_client.shop.orders.insert_many(reordered[N // 2:] + reordered[: N // 2])
    assert _natural_ids(source_client, "shop", "orders") != _natural_ids(target_client, "shop", "orders")

    source = snapshot_namespace(source_client, "shop", "orders", mode="full")
    target = snapshot_namespace(target_client, "shop", "orders", mode="full", batch_size=7)
    assert (source.count, target.count) == (N, N)
    assert source.digest == target.digest
    # The digest is the pure function over each document's exact bytes, whatever the read order.
    assert source.digest == multiset_digest(bson.encode(document) for document in documents)[1]
    report = validate_namespaces(source_client, target_client, [("shop", "orders")], mode="full")
    assert report.verdict == "PASS", render_markdown(report)

    # Same count, one value changed: only the digest sees it, and the _id merge names the document.
    target_client.shop.orders.update_one({"_id": 321}, {"$set": {"tier": "pro "}})
    result = validate_namespaces(
        source_client, target_client, [("shop", "orders")], mode="full", batch_size=50
    ).results[0]
    assert result.status == "mismatch" and result.source.count == result.target.count == N
    assert result.differences[0].startswith("content digest differs (sum-sha256 source ")
    assert result.document_differences == [DocumentDifference("different", "321")]


def test_field_order_change_is_a_difference(clients):
    """A copy that reorders a document's fields has not preserved it: full mode says which one."""
    source_client, target_client = clients
    for client in clients:
        client.shop.orders.insert_many([{"_id": i, "a": i, "b": -i} for i in range(100)])
    target_client.shop.orders.replace_one({"_id": 42}, {"b": -42, "a": 42})
    assert list(target_client.shop.orders.find_one({"_id": 42})) == ["_id", "b", "a"]  # stored reordered
    result = validate_namespaces(source_client, target_client, [("shop", "orders")], mode="full").results[0]
    assert result.document_differences == [DocumentDifference("different", "42")]


def test_index_differences(clients):
    source_client, target_client = clients
    seed_shop(source_client)
    seed_shop(target_client, unique_email=False)
    target_client.shop.customers.drop_index("country_1_signedUpAt_-1")
    # Same name, keys in the other order: a different index.
    source_client.shop.events_log.create_index([("kind", 1), ("at", 1)], name="kind_at")
    target_client.shop.events_log.create_index([("at", 1), ("kind", 1)], name="kind_at")

    results = by_namespace(validate_namespaces(source_client, target_client, SHOP))
    customers = results["shop.customers"]
    assert customers.status == "mismatch" and not customers.indexes_match and customers.options_match
    assert customers.differences == [
        'index \'country_1_signedUpAt_-1\' missing in target (key [["country",1],["signedUpAt",-1]])',
        "index 'email_1' unique: source true, target absent",
    ]
    assert results["shop.events_log"].differences == [
        'index \'kind_at\' key: source [["kind",1],["at",1]], target [["at",1],["kind",1]]'
    ]
    assert results["shop.pro_customers"].ok


def test_capped_source_and_uncapped_target(clients):
    source_client, target_client = clients
    seed_shop(source_client)
    seed_shop(target_client, capped=False)
    result = by_namespace(validate_namespaces(source_client, target_client, SHOP))["shop.events_log"]
    assert result.status == "mismatch" and result.indexes_match and not result.options_match
    assert result.differences == [
        "type: source capped, target collection",
        "option capped: source true, target absent",
        "option size: source 1048576, target absent",
    ]


def test_namespace_missing_in_target(clients):
    source_client, target_client = clients
    seed_shop(source_client)
    seed_shop(target_client)
    source_client.inventory.warehouses.insert_many([{"_id": i} for i in range(25)])
    report = validate_namespaces(source_client, target_client, [*SHOP, ("inventory", "warehouses")], mode="full")
    result = by_namespace(report)["inventory.warehouses"]
    assert result.status == "missing_in_target"
    assert result.differences == ["namespace does not exist in the target (source: collection, 25 documents)"]
    assert result.target.count is None and result.document_differences == []
    assert (report.totals.mismatched, report.verdict) == (1, "FAIL")
    with pytest.raises(ValidationFailed, match=r"- inventory\.warehouses \(missing in target\): namespace does not"):
        raise_if_failed(report)


def test_view_compared_by_count_and_definition(clients):
    source_client, target_client = clients
    seed_shop(source_client)
    seed_shop(target_client, view_tier="enterprise")
    for mode in ("counts", "full"):
        result = by_namespace(validate_namespaces(source_client, target_client, SHOP, mode=mode))["shop.pro_customers"]
        assert result.source.type == result.target.type == "view"
        assert result.source.indexes == result.target.indexes == []
        # 1,500 customers in three tiers: the same count, so only the definition gives it away.
        assert result.differences == [
            'option pipeline: source [{"$match":{"tier":"pro"}}], target [{"$match":{"tier":"enterprise"}}]'
        ]
    target_client.shop.customers.insert_one(_customer(N + 2))  # an enterprise customer
    result = by_namespace(validate_namespaces(source_client, target_client, SHOP))["shop.pro_customers"]
    assert result.differences[0] == "document count: source 500, target 501 (+1)"


def test_target_db_map_validates_a_prefixed_rehearsal_database(clients):
    source_client, target_client = clients
    seed_shop(source_client)
    seed_shop(target_client, db="rehearsal_shop")
    report = validate_namespaces(
        source_client, target_client, SHOP, mode="full", target_db_map={"shop": "rehearsal_shop"}
    )
    assert report.verdict == "PASS", render_markdown(report)
    assert [r.target_namespace for r in report.results] == [f"rehearsal_{db}.{coll}" for db, coll in SHOP]
    assert "| shop.customers → rehearsal_shop.customers | collection | 1,500 | 1,500 |" in render_markdown(report)

    unmapped = validate_namespaces(source_client, target_client, SHOP)
    assert {r.status for r in unmapped.results} == {"missing_in_target"}


def test_snapshot_of_a_timeseries_collection(clients):
    source_client, _ = clients
    source_client.metrics.create_collection("cpu", timeseries={"timeField": "t", "metaField": "host"})
    source_client.metrics.cpu.insert_many([{"t": EPOCH + dt.timedelta(seconds=i), "host": "a", "v": i}
                                           for i in range(50)])
    snapshot = snapshot_namespace(source_client, "metrics", "cpu", mode="full")
    assert (snapshot.exists, snapshot.type, snapshot.count) == (True, "timeseries", 50)
    assert snapshot.options["timeseries"]["timeField"] == "t"
    assert snapshot_namespace(source_client, "metrics", "nope").exists is False
