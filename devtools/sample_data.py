"""A deterministic sample dataset shaped like a small production deployment.

Three databases, ten collections, a capped collection, a view and a collection whose name contains dots;
unique, compound, TTL, partial and sparse indexes; documents mixing Decimal128, UUID, dates, binary,
nested arrays and sub-documents. ``seed_sample_dataset`` writes it through raw ``insert_many`` batches.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from dataclasses import dataclass

from bson import Binary, Decimal128, ObjectId
from bson.binary import UuidRepresentation

# Documents per collection at scale 1.0 (100,000 documents in all).
BASE_COUNTS = {
    ("shop", "customers"): 15_000,
    ("shop", "orders"): 35_000,
    ("shop", "events_log"): 2_000,  # capped
    ("analytics", "sessions"): 20_000,
    ("analytics", "pageviews"): 15_000,
    ("analytics", "daily.rollups"): 3_000,
    ("inventory", "products"): 6_000,
    ("inventory", "stock.levels"): 3_500,
    ("inventory", "warehouses"): 500,
}
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class SeedSummary:
    databases: int
    collections: int
    views: int
    documents: int


def _uuid(rng: random.Random) -> Binary:
    return Binary.from_uuid(uuid.UUID(int=rng.getrandbits(128), version=4), UuidRepresentation.STANDARD)


def _customer(rng: random.Random, i: int) -> dict:
    return {
        "_id": i,
        "email": f"customer{i}@example.com",
        "name": {"first": f"First{i % 997}", "last": f"Last{i % 991}"},
        "country": rng.choice(["FR", "DE", "US", "JP", "BR", "IN"]),
        "tier": rng.choice(["free", "pro", "enterprise", None]),
        "balance": Decimal128(f"{rng.randint(0, 10_000_000) / 100:.2f}"),
        "externalId": _uuid(rng),
        "signedUpAt": EPOCH + dt.timedelta(minutes=rng.randint(0, 500_000)),
        "tags": rng.sample(["vip", "churn-risk", "beta", "newsletter", "mobile"], k=rng.randint(0, 3)),
    }


def _order(rng: random.Random, i: int) -> dict:
    lines = [
        {"sku": f"SKU-{rng.randint(1, 6000):05d}", "qty": rng.randint(1, 5),
         "price": Decimal128(f"{rng.randint(100, 50_000) / 100:.2f}"), "options": [[rng.randint(0, 3)] * 2]}
        for _ in range(rng.randint(1, 4))
    ]
    return {
        "_id": ObjectId(int(EPOCH.timestamp()).to_bytes(4, "big") + i.to_bytes(8, "big")),
        "customerId": rng.randint(0, 14_999),
        "status": rng.choice(["new", "paid", "shipped", "cancelled"]),
        "createdAt": EPOCH + dt.timedelta(seconds=rng.randint(0, 30_000_000)),
        "lines": lines,
        "total": Decimal128(f"{rng.randint(100, 200_000) / 100:.2f}"),
        "note": None if rng.random() < 0.7 else "gift wrap",
    }


def _event(rng: random.Random, i: int) -> dict:
    return {"_id": i, "kind": rng.choice(["login", "logout", "error"]), "at": EPOCH + dt.timedelta(seconds=i)}


def _session(rng: random.Random, i: int) -> dict:
    # createdAt is recent so the TTL index (one year) never expires a document during a migration.
    return {
        "_id": _uuid(rng),
        "userId": rng.randint(0, 14_999),
        "createdAt": dt.datetime.now(dt.UTC) - dt.timedelta(minutes=rng.randint(0, 10_000)),
        "device": {"os": rng.choice(["ios", "android", "linux"]), "version": [rng.randint(1, 17), rng.randint(0, 9)]},
        "durationMs": rng.randint(10, 3_600_000),
    }


def _pageview(rng: random.Random, i: int) -> dict:
    return {
        "_id": ObjectId(),
        "sessionRef": i % 20_000,
        "path": f"/p/{rng.randint(1, 500)}",
        "payload": Binary(rng.randbytes(rng.randint(16, 96))),
        "ms": rng.random() * 1000,
        "flags": {"bot": rng.random() < 0.05, "ab": rng.choice(["a", "b"])},
    }


def _rollup(rng: random.Random, i: int) -> dict:
    return {"_id": {"day": i // 3, "metric": ["views", "sessions", "revenue"][i % 3]},
            "value": Decimal128(str(rng.randint(0, 10**9))), "samples": [rng.random() for _ in range(5)]}


def _product(rng: random.Random, i: int) -> dict:
    doc = {"_id": f"SKU-{i + 1:05d}", "title": f"Product {i}", "price": Decimal128(f"{rng.randint(100, 50_000) / 100:.2f}"),
           "dims": [rng.random() * 10 for _ in range(3)], "active": rng.random() < 0.8}
    if rng.random() < 0.3:
        doc["discontinuedAt"] = EPOCH + dt.timedelta(days=rng.randint(0, 300))
    if rng.random() < 0.5:
        doc["barcode"] = f"{rng.randint(10**11, 10**12 - 1)}"
    return doc


def _stock(rng: random.Random, i: int) -> dict:
    return {"_id": i, "sku": f"SKU-{i % 6000 + 1:05d}", "warehouse": i % 500, "qty": rng.randint(0, 1000),
            "history": [{"at": EPOCH + dt.timedelta(days=d), "qty": rng.randint(0, 1000)} for d in range(3)]}


def _warehouse(rng: random.Random, i: int) -> dict:
    return {"_id": i, "code": f"WH{i:04d}", "location": {"type": "Point", "coordinates": [rng.uniform(-180, 180), rng.uniform(-80, 80)]}}


GENERATORS = {
    ("shop", "customers"): _customer,
    ("shop", "orders"): _order,
    ("shop", "events_log"): _event,
    ("analytics", "sessions"): _session,
    ("analytics", "pageviews"): _pageview,
    ("analytics", "daily.rollups"): _rollup,
    ("inventory", "products"): _product,
    ("inventory", "stock.levels"): _stock,
    ("inventory", "warehouses"): _warehouse,
}


def _create_collections_and_indexes(client) -> int:
    from pymongo import ASCENDING, DESCENDING

    shop, analytics, inventory = client.shop, client.analytics, client.inventory
    shop.create_collection("events_log", capped=True, size=4 * 1024 * 1024)
    shop.customers.create_index("email", unique=True)
    shop.customers.create_index([("country", ASCENDING), ("signedUpAt", DESCENDING)])
    shop.orders.create_index([("customerId", ASCENDING), ("createdAt", DESCENDING)])
    shop.orders.create_index("lines.sku")
    analytics.sessions.create_index("createdAt", expireAfterSeconds=365 * 24 * 3600)
    analytics.pageviews.create_index([("path", ASCENDING), ("ms", DESCENDING)])
    inventory.products.create_index("barcode", unique=True, sparse=True)
    inventory.products.create_index("price", partialFilterExpression={"active": True})
    inventory.create_collection("stock.levels", validator={"$jsonSchema": {"required": ["sku", "qty"]}})
    inventory["stock.levels"].create_index([("sku", ASCENDING), ("warehouse", ASCENDING)], unique=True)
    inventory.warehouses.create_index([("location", "2dsphere")])
    shop.create_collection("paid_orders", viewOn="orders", pipeline=[{"$match": {"status": "paid"}}])
    return 1


def seed_sample_dataset(client, scale: float = 1.0, seed: int = 7, batch_size: int = 2_000) -> SeedSummary:
    """Write the dataset (``scale`` multiplies every count). The target databases must not exist yet."""
    rng = random.Random(seed)
    views = _create_collections_and_indexes(client)
    total = 0
    for (db, coll), base in BASE_COUNTS.items():
        count = max(1, int(base * scale))
        make = GENERATORS[(db, coll)]
        batch: list[dict] = []
        for i in range(count):
            batch.append(make(rng, i))
            if len(batch) >= batch_size:
                client[db][coll].insert_many(batch, ordered=False)
                batch = []
        if batch:
            client[db][coll].insert_many(batch, ordered=False)
        total += count
    return SeedSummary(
        databases=len({db for db, _ in BASE_COUNTS}), collections=len(BASE_COUNTS), views=views, documents=total
    )
