"""Catch-up replaying update events from their ``updateDescription`` ("delta", the default), on real servers.

What must hold: the target ends as the source byte for byte, field order included. A delta is written only to
the version of its document it was made to; where the target may hold a later version (the copy read the
document after the update, a lookup read it after, an earlier catch-up stopped part-way) the update is
replayed as the document read from the source. A delta the target refuses falls back to that read too; a
delta that matches nothing is rechecked at cutover; paths that are not exact are looked up, never guessed.
"""

from __future__ import annotations

import logging
import random
import threading

from pymongo.errors import WriteError

from atlas_migration.engines.live import RECHECK_COLLECTION, STATE_COLLECTION, _EventApplier
from tests.engines.test_live import STATE_DB, fence_now, initial_copy, make_sync
from tests.helpers import assert_namespaces_identical


def _record_writes(monkeypatch) -> dict[str, int]:
    """Count what the lanes wrote updates as: deltas (``UpdateOne``) and documents read from the source."""
    counts = {"delta": 0, "lookup": 0}
    resolved = _EventApplier._resolved

    def counting(self, key, ops, rechecks):
        counts["delta"] += sum(1 for op in ops if type(op).__name__ == "_Delta")
        counts["lookup"] += sum(1 for op in ops if type(op).__name__ == "_Lookup")
        return resolved(self, key, ops, rechecks)

    monkeypatch.setattr(_EventApplier, "_resolved", counting)
    return counts


def _copy_after(sync, writes) -> None:
    """Start the sync (its stream's start point), run ``writes`` on the source, then copy: the copy reads the
    documents as ``writes`` left them, and catch-up replays those writes on that later version."""
    sync.start()
    writes()
    partitions = sync.plan_partitions()
    sync.prepare_targets()
    for partition in partitions:
        sync.copy_partition(partition)
    sync.finish_initial_copy()


def _while_catching_up(sync, writes) -> None:
    """Run ``writes`` on the source while one catch-up follows the stream, then let that catch-up end once it
    has applied everything up to the source's last write (not on a lag probed before the writes)."""
    following = threading.Event()
    goal: dict = {}
    result: dict = {}

    def reached(f, lag, elapsed):
        return "done" if "t" in goal and f.last_cluster_time is not None and f.last_cluster_time >= goal["t"] else None

    def follow():
        result["r"] = sync._follow(reached)

    sync.fault_hook = lambda stage, n: following.set()  # called after each saved batch: the first is empty
    thread = threading.Thread(target=follow)
    thread.start()
    try:
        assert following.wait(30)
        writes()
    finally:
        goal["t"] = sync._source_times()[0]
        thread.join(timeout=120)
        sync.fault_hook = None
    assert result["r"].stopped_because == "done"


def test_updates_made_during_a_catch_up_are_replayed_from_their_description(source, target, monkeypatch):
    with source.client() as src, target.client() as dst:
        src.upd.c.insert_many([{"_id": i, "a": {"x": i}, "gone": True, "arr": [1, 2, 3]} for i in range(20)])
        sync = make_sync(src, dst, ["upd.*"])
        initial_copy(sync)
        counts = _record_writes(monkeypatch)

        def writes():
            for i in range(20):
                src.upd.c.update_one({"_id": i}, {"$set": {"a.y": i, "b": "new"}, "$unset": {"gone": ""}})
                src.upd.c.update_one({"_id": i}, {"$push": {"arr": i}})
                src.upd.c.update_one({"_id": i}, [{"$set": {"arr": {"$slice": ["$arr", 2]}}}])  # truncatedArrays

        _while_catching_up(sync, writes)
        assert counts["delta"] == 60 and counts["lookup"] == 0
        assert sync.pending_rechecks() == 0
        assert_namespaces_identical(src, dst, [("upd", "c")])


def test_a_delta_needs_no_source_read_so_a_rename_after_it_does_not_matter(source, target):
    """``tests/engines/test_live.py`` has the same update and rename looked up (the description is not exact
    there, or the update is in the backlog): the lookup finds nothing and the recheck waits for cutover."""
    with source.client() as src, target.client() as dst:
        src.nl.a.insert_many([{"_id": i, "v": 1, "m": {"k": 0}, "gone": True} for i in range(20)])
        sync = make_sync(src, dst, ["nl.*"])
        assert sync.update_apply == "delta"
        initial_copy(sync)
        assert dst[STATE_DB][STATE_COLLECTION].find_one({"_id": sync.sync_id})["update_apply"] == "delta"

        def writes():
            src.nl.a.update_one({"_id": 7}, {"$set": {"v": 2, "w": "x", "m.k": 5}, "$unset": {"gone": ""}})
            src.nl.a.rename("b")

        _while_catching_up(sync, writes)
        assert dst.nl.b.find_one({"_id": 7}) == {"_id": 7, "v": 2, "m": {"k": 5}, "w": "x"}
        assert sync.pending_rechecks() == 0


def test_updates_replayed_on_a_later_version_are_read_from_the_source(source, target, monkeypatch):
    """Updates between the start point and the copy: the copy read each document after them. Replaying
    ``$unset b`` then ``$set b`` on that later version would keep ``b`` before ``c`` where the source moved it
    after ``c``: they are replayed as the document read from the source, and the field order is the source's."""
    with source.client() as src, target.client() as dst:
        src.upd.c.insert_many([{"_id": i, "b": 0} for i in range(10)])
        sync = make_sync(src, dst, ["upd.*"])
        counts = _record_writes(monkeypatch)

        def writes():
            for i in range(10):
                src.upd.c.update_one({"_id": i}, {"$unset": {"b": ""}})
                src.upd.c.update_one({"_id": i}, {"$set": {"c": 1}})
                src.upd.c.update_one({"_id": i}, {"$set": {"b": 2}})

        _copy_after(sync, writes)
        assert list(dst.upd.c.find_one({"_id": 0})) == ["_id", "c", "b"]
        assert sync.catch_up().stopped_because == "lag_ok"
        assert counts == {"delta": 0, "lookup": 30}
        assert_namespaces_identical(src, dst, [("upd", "c")])


def test_a_delta_the_target_refuses_is_replaced_by_the_document_read_from_the_source(source, target, monkeypatch,
                                                                                      caplog):
    """Someone changed the target's copy (``a`` became a number): ``$set a.b`` cannot apply to it, so that
    document is read from the source, and the deltas after it in the lane are too."""
    with source.client() as src, target.client() as dst:
        src.upd.c.insert_many([{"_id": i, "a": {"x": i}} for i in range(10)])
        sync = make_sync(src, dst, ["upd.*"], apply_lanes=1)
        initial_copy(sync)
        dst.upd.c.update_one({"_id": 3}, {"$set": {"a": 5}})
        counts = _record_writes(monkeypatch)

        def writes():
            src.upd.c.update_one({"_id": 3}, {"$set": {"a.b": 1}})
            src.upd.c.update_one({"_id": 3}, {"$set": {"a.c": 2}})
            src.upd.c.update_one({"_id": 4}, {"$set": {"a.b": 2}})

        with caplog.at_level(logging.DEBUG, logger=sync.log.name):
            _while_catching_up(sync, writes)
        assert "refused a replayed update of _id 3" in caplog.text
        assert counts["lookup"] >= 1
        assert sync.pending_rechecks() == 0
        assert_namespaces_identical(src, dst, [("upd", "c")])


def test_a_delta_that_matches_nothing_is_rechecked_at_cutover(source, target):
    with source.client() as src, target.client() as dst:
        src.upd.gone.insert_many([{"_id": i, "v": 0} for i in range(10)])
        sync = make_sync(src, dst, ["upd.*"])
        initial_copy(sync)
        dst.upd.gone.delete_one({"_id": 5})  # the target lost it: the update finds nothing to apply to

        _while_catching_up(sync, lambda: src.upd.gone.update_one({"_id": 5}, {"$set": {"v": 1}}))
        entries = list(dst[STATE_DB][RECHECK_COLLECTION].find({"_id.sync_id": sync.sync_id}))
        assert [(e["_id"]["id"], e["reason"]) for e in entries] == [(5, "unmatched_update")]
        final = sync.cutover(fence_now(src), grace_seconds=0.5, timeout=30)
        assert final.rechecked == 1 and sync.pending_rechecks() == 0
        assert_namespaces_identical(src, dst, [("upd", "gone")])


def _random_update(rng: random.Random, coll, doc_id: int, step: int) -> None:
    """One of the update shapes an application makes, each reported differently in updateDescription:
    nested fields, removed fields, array appends, indexed writes, whole-array rewrites, truncations (only a
    pipeline update reports truncatedArrays), type changes, numeric field names (disambiguated, looked up)."""
    kind = rng.randrange(11)
    flt = {"_id": doc_id}
    if kind == 0:
        coll.update_one(flt, {"$set": {"n.x": step, "n.deep.y": [step]}})
    elif kind == 1:
        coll.update_one(flt, {"$unset": {"n.x": "", "extra": ""}})
    elif kind == 2:
        coll.update_one(flt, {"$push": {"arr": {"$each": [step, {"k": step}]}}})
    elif kind == 3:
        coll.update_one(flt, {"$set": {f"arr.{rng.randrange(6)}": step}})
    elif kind == 4:
        coll.update_one(flt, {"$pop": {"arr": rng.choice([1, -1])}})
    elif kind == 5:
        coll.update_one(flt, [{"$set": {"arr": {"$slice": [{"$ifNull": ["$arr", []]}, rng.randrange(3)]}}}])
    elif kind == 6:
        coll.update_one(flt, {"$set": {"n": rng.choice([step, "text", [1, 2], {"z": step}])}})
    elif kind == 7:
        coll.update_one(flt, {"$set": {"num": {"1": step, "2": [step]}}})
    elif kind == 8:
        coll.update_one(flt, {"$set": {"num.1": step}})
    elif kind == 9:
        coll.update_one(flt, {"$inc": {"count": 1}, "$set": {"extra": {"when": step}}})
    else:
        coll.replace_one(flt, {"v": step, "arr": [step] * rng.randrange(4)})


def test_random_updates_before_and_during_catch_up_converge_byte_for_byte(source, target, monkeypatch):
    """Updates before the copy (the copy reads a later version), after it (a backlog when a catch-up starts),
    then during the next catch-up (replayed on their own version), interleaved with deletes and re-inserts, over
    four lanes: the target ends as the source byte for byte, field order included, and the updates made
    during the catch-up are mostly replayed as deltas."""
    rng = random.Random(16)
    with source.client() as src, target.client() as dst:
        coll = src.upd.mix
        coll.insert_many([{"_id": i, "v": 0, "arr": [0, 1, 2], "n": {"x": 0}} for i in range(60)])
        sync = make_sync(src, dst, ["upd.*"], batch_size=40, apply_lanes=4)

        def burst(steps: range) -> None:
            for step in steps:
                doc_id = rng.randrange(60)
                if rng.random() < 0.05:
                    coll.delete_one({"_id": doc_id})
                    coll.insert_one({"_id": doc_id, "v": step, "arr": [step]})
                else:
                    try:
                        _random_update(rng, coll, doc_id, step)
                    except WriteError:  # the source refused it too (a path through a number): no event
                        pass

        _copy_after(sync, lambda: burst(range(0, 600)))
        burst(range(600, 1200))  # a backlog when the catch-up starts
        counts = _record_writes(monkeypatch)
        assert sync.catch_up().stopped_because == "lag_ok"
        _while_catching_up(sync, lambda: burst(range(1200, 2000)))
        assert sync.catch_up().stopped_because == "lag_ok"
        sync.cutover(fence_now(src), grace_seconds=0.5, timeout=60)
        assert_namespaces_identical(src, dst, [("upd", "mix")])
        assert counts["delta"] > 300, counts  # what the writer did while the catch-up ran
        assert counts["lookup"] > 30, counts  # the backlog before it, and every numeric field name (kind 8)
