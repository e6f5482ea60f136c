"""Catch-up's apply lanes: which lane a document's changes take, and that lanes keep each document in order.

The lane function is pure (no server): deterministic across processes, one lane for every spelling of a
number MongoDB holds equal, spread over the lanes. The flush's failure handling runs against stand-in
collections. The end-to-end test replays interleaved updates, deletes and re-inserts of the same documents
(and ``_id`` values of different numeric types that are one key) through four lanes on real servers.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from bson import SON, Decimal128, Int64, ObjectId
from bson.binary import Binary
from pymongo import ReplaceOne
from pymongo.errors import BulkWriteError

from atlas_migration.engines.live import LiveSync, _EventApplier, apply_lane
from atlas_migration.errors import ConfigurationError, MigrationError
from atlas_migration.namespaces import NamespaceFilter
from tests.engines.test_live import initial_copy, make_sync
from tests.helpers import assert_namespaces_identical

REPO = Path(__file__).resolve().parents[2]

# Numbers that are one _id to MongoDB (exact values equal), whatever their BSON type.
EQUAL_NUMBERS = [
    [1, 1.0, Int64(1), Decimal128("1"), Decimal128("1.000"), Decimal128("0.1E1")],
    [0, -0.0, 0.0, Int64(0), Decimal128("0"), Decimal128("-0"), Decimal128("0E-10")],
    [2**40, float(2**40), Int64(2**40), Decimal128(str(2**40))],
    [-7, -7.0, Decimal128("-7.00")],
    [0.5, Decimal128("0.5"), Decimal128("5E-1")],
    [float("nan"), Decimal128("NaN"), Decimal128("-NaN")],
    [float("inf"), Decimal128("Infinity")],
    [float("-inf"), Decimal128("-Infinity")],
    # The exact value of the double 0.1, which mongod holds equal to that double (and not to "0.1").
    [0.1, Decimal128("0.1000000000000000055511151231257827")],
]

SAMPLE_IDS = [1, 2.5, Int64(2**40), Decimal128("3.25"), "a", "A", ObjectId("5f1d7a0e2c3b4a5d6e7f8091"),
              Binary(b"\x01" * 16, 4), {"k": 1, "s": "x"}, None, True, False]


# ---------------------------------------------------------------------------------------------- pure
def test_the_same_id_takes_the_same_lane_on_every_call():
    for doc_id in SAMPLE_IDS:
        lanes = {apply_lane(doc_id, 4) for _ in range(5)}
        assert len(lanes) == 1 and 0 <= lanes.pop() < 4


def test_lanes_are_the_same_in_another_process_with_another_hash_seed():
    code = ("import json; from tests.engines.test_live_lanes import SAMPLE_IDS; "
            "from atlas_migration.engines.live import apply_lane; "
            "print(json.dumps([[apply_lane(i, n) for n in (2, 3, 4, 7)] for i in SAMPLE_IDS]))")
    here = [[apply_lane(i, n) for n in (2, 3, 4, 7)] for i in SAMPLE_IDS]
    for seed in ("1", "2", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed,
               "PYTHONPATH": os.pathsep.join([str(REPO / "include"), str(REPO), os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                             check=True, timeout=60)
        assert json.loads(out.stdout) == here


def test_numbers_mongodb_holds_equal_share_a_lane_whatever_their_type():
    for group in EQUAL_NUMBERS:
        for lanes in (2, 4, 16, 97):
            assert len({apply_lane(value, lanes) for value in group}) == 1, (group, lanes)
    # Inside embedded documents too: {k: 1} and {k: 1.0} are one _id.
    assert len({apply_lane(SON([("k", v), ("s", "x")]), 97) for v in EQUAL_NUMBERS[0]}) == 1


def test_values_of_other_types_are_not_taken_for_numbers():
    # A bool is its own BSON type (true is not 1): it may take any lane, but its own lane every time, and
    # the spread test below shows distinct values do not all collapse into one lane.
    assert apply_lane(True, 97) == apply_lane(True, 97) and apply_lane(False, 97) == apply_lane(False, 97)
    assert len({apply_lane(v, 97) for v in (1, True, "1", Decimal128("1"))}) >= 2


def test_many_ids_spread_over_the_lanes():
    rng = random.Random(3)
    kinds = {
        "ObjectId": [ObjectId() for _ in range(4_000)],
        "int": list(range(4_000)),
        "float": [rng.uniform(-1e6, 1e6) for _ in range(4_000)],
        "str": [f"user-{i}" for i in range(4_000)],
    }
    for kind, ids in kinds.items():
        counts = Counter(apply_lane(i, 4) for i in ids)
        assert set(counts) == {0, 1, 2, 3}, kind
        assert min(counts.values()) > 0.2 * len(ids), (kind, counts)  # an even share is 0.25


def test_one_lane_is_lane_zero_and_lanes_must_be_at_least_one():
    assert {apply_lane(i, 1) for i in SAMPLE_IDS} == {0}
    for bad in (0, -1, 1.5, True, "4"):
        with pytest.raises(ConfigurationError, match="apply_lanes"):
            LiveSync(None, None, sync_id="s", namespaces=NamespaceFilter.from_patterns(["a.*"], None),
                     apply_lanes=bad)  # type: ignore[arg-type]


class _FakeCollection:
    """Records each bulk write's thread; fails the ones whose first op's _id is in ``fail_ids``."""

    def __init__(self, name: str, log: list, fail_ids: set, gate: threading.Barrier | None) -> None:
        self.full_name, self.log, self.fail_ids, self.gate = name, log, fail_ids, gate

    def bulk_write(self, ops, ordered, bypass_document_validation):
        assert ordered is True
        if self.gate is not None:
            self.gate.wait(timeout=10)  # every lane is in flight at once, or this times out
        ids = [op._filter["_id"] for op in ops]
        self.log.append((self.full_name, ids, threading.current_thread().name))
        if self.fail_ids & set(ids):
            raise BulkWriteError({"writeErrors": [{"index": 0, "code": 11000, "errmsg": "E11000 duplicate key"}],
                                  "nInserted": 0})


def _applier(lanes: int, fail_ids: set = frozenset(), gate=None):
    log: list = []
    listened: list = []
    sync = SimpleNamespace(
        apply_lanes=lanes, sync_id="fake", target=None, changed_listener=listened.extend,
        _target_collection=lambda db, coll: _FakeCollection(f"{db}.{coll}", log, set(fail_ids), gate),
    )
    applier = _EventApplier(sync, {})  # type: ignore[arg-type]
    applier._lanes_of = lambda key: lanes  # no server: no collation lookup
    return applier, log, listened


def _queue(applier, ids):
    for doc_id in ids:
        applier._queue(("db", "c"), doc_id, ReplaceOne({"_id": doc_id}, {"v": 1}, upsert=True))
        applier._changed.append(("db", "c", doc_id))


def test_flush_writes_every_lane_concurrently_in_stream_order_within_a_lane():
    applier, log, listened = _applier(4, gate=threading.Barrier(4))
    ids = list(range(200)) * 2  # every document twice: both writes in one lane, in order
    _queue(applier, ids)
    applier.flush()
    assert len(log) == 4 and len({thread for _, _, thread in log}) == 4
    for _, lane_ids, _ in log:
        (lane,) = {apply_lane(i, 4) for i in lane_ids}
        assert lane_ids == [i for i in ids if apply_lane(i, 4) == lane]  # stream order kept
    assert sorted(i for _, lane_ids, _ in log for i in lane_ids) == sorted(ids)
    assert len(listened) == len(ids) and applier.pending == 0


def test_a_failed_lane_fails_the_flush_after_the_other_lanes_finished():
    ids = list(range(200))
    failing = {i for i in ids if apply_lane(i, 4) == 2}
    applier, log, listened = _applier(4, fail_ids={min(failing)}, gate=threading.Barrier(4))
    _queue(applier, ids)
    with pytest.raises(MigrationError, match=r"applying change events to db\.c failed \(code 11000\).*unique index.*"
                                             r"The resume token was not advanced"):
        applier.flush()
    assert len(log) == 4  # every lane ran to its end
    assert listened == []  # the listener hears only of flushes that were applied


def test_one_lane_writes_in_the_callers_thread():
    applier, log, _ = _applier(1)
    _queue(applier, list(range(50)))
    applier.flush()
    assert [(ids, thread) for _, ids, thread in log] == [(list(range(50)), threading.current_thread().name)]


# ------------------------------------------------------------------------------------ real servers
def test_interleaved_changes_of_the_same_documents_converge_through_four_lanes(source, target, monkeypatch):
    threads: set[str] = set()
    write_lane = _EventApplier._write_lane

    def recording(self, key, ops):
        threads.add(threading.current_thread().name)
        return write_lane(self, key, ops)

    monkeypatch.setattr(_EventApplier, "_write_lane", recording)
    rng = random.Random(11)
    with source.client() as src, target.client() as dst:
        coll, other = src.lanes.c, src.lanes.d
        coll.insert_many([{"_id": i, "v": 0} for i in range(120)] + [{"_id": i, "v": 0} for i in (205, 206, 207)])
        other.insert_many([{"_id": ObjectId(), "v": 0} for _ in range(30)])
        sync = make_sync(src, dst, ["lanes.*"], batch_size=50, apply_lanes=4)
        initial_copy(sync)
        live = set(range(120))
        for step in range(1_500):
            doc_id = rng.randrange(130)
            if doc_id in live:
                action = rng.random()
                if action < 0.6:
                    coll.update_one({"_id": doc_id}, {"$inc": {"v": 1}, "$set": {"step": step}})
                elif action < 0.8:
                    coll.replace_one({"_id": doc_id}, {"v": step, "replaced": True})
                else:
                    coll.delete_one({"_id": doc_id})
                    live.discard(doc_id)
            else:
                coll.insert_one({"_id": doc_id, "v": step, "reborn": True})
                live.add(doc_id)
            if step % 7 == 0:
                other.update_many({"v": {"$lt": 3}}, {"$inc": {"v": 1}})
        # One key, three BSON types: the delete and the re-insert must reach the target in this order. (Ids
        # the loop above never updated: an update event of _id 7 whose updateLookup finds the retyped
        # document cannot be replayed on a target that still holds _id 7, with or without lanes.)
        for doc_id, again in ((205, 205.0), (206, Int64(206)), (207, Decimal128("207.0"))):
            coll.delete_one({"_id": doc_id})
            coll.insert_one({"_id": again, "v": "retyped"})
            coll.update_one({"_id": again}, {"$set": {"w": 1}})
        result = sync.catch_up()
        assert result.stopped_because == "lag_ok" and result.events_applied > 1_500
        assert len({t for t in threads if t.startswith("live-apply-")}) > 1  # the lanes did run concurrently
        assert_namespaces_identical(src, dst, [("lanes", "c"), ("lanes", "d")])
        assert type(dst.lanes.c.find_one({"_id": 205})["_id"]) is float


def test_a_collated_namespace_is_applied_in_one_lane(source, target):
    with source.client() as src, target.client() as dst:
        src.lanes.create_collection("ci", collation={"locale": "en", "strength": 2})
        src.lanes.ci.insert_many([{"_id": f"k{i}", "v": 0} for i in range(40)])
        sync = make_sync(src, dst, ["lanes.*"], batch_size=50, apply_lanes=4)
        initial_copy(sync)
        for i in range(40):  # same key under the collation, other bytes: delete, then re-insert upper-case
            src.lanes.ci.delete_one({"_id": f"k{i}"})
            src.lanes.ci.insert_one({"_id": f"K{i}", "v": i})
        applier = _EventApplier(sync, {})
        assert applier._lanes_of(("lanes", "ci")) == 1
        sync.catch_up()
        assert_namespaces_identical(src, dst, [("lanes", "ci")])



@pytest.mark.parametrize("update_apply", ["lookup", "delta"])
@pytest.mark.parametrize("retyped", [7.0, Int64(7), Decimal128("7.0")], ids=["double", "long", "decimal"])
def test_an_update_whose_lookup_finds_the_id_retyped_is_rechecked_not_replayed(source, target, retyped,
                                                                                update_apply):
    """``_id: 7`` updated, then deleted and inserted again as another number type. MongoDB holds the two
    equal, so the update's ``updateLookup`` returns the new document; replaying it as a replace of ``_id: 7``
    would alter the target's ``_id`` (refused by the test server for a decimal, by mongod for a collation
    variant). The update goes to the recheck set instead; the delete and insert that follow, and the
    recheck, leave the target as the source. In "delta" mode the updates set ``m.1`` in a document (a
    numeric field name, listed in ``disambiguatedPaths``), so they are looked up too: by the lane, from the
    source, with the same check of the ``_id`` found."""
    with source.client() as src, target.client() as dst:
        src.lanes.r.insert_many([{"_id": 7, "v": 0, "m": {"1": 0}}, {"_id": 8, "v": 0, "m": {"1": 0}}])
        sync = make_sync(src, dst, ["lanes.*"], batch_size=50, apply_lanes=4, update_apply=update_apply)
        initial_copy(sync)
        src.lanes.r.update_one({"_id": 7}, {"$set": {"v": 1, "m.1": 1}})
        src.lanes.r.update_one({"_id": 8}, {"$set": {"v": 1, "m.1": 1}})
        src.lanes.r.delete_one({"_id": 7})
        src.lanes.r.insert_one({"_id": retyped, "v": "retyped"})
        assert sync.catch_up().stopped_because == "lag_ok"
        assert sync.pending_rechecks() == 1  # only _id 7's update: _id 8's lookup found _id 8 itself
        sync.apply_rechecks()
        assert_namespaces_identical(src, dst, [("lanes", "r")])
        assert type(dst.lanes.r.find_one({"_id": 7})["_id"]) is type(retyped)
