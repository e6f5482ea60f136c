"""Catch-up's pipelined flushes: batch N is written in the background while batch N+1 is read.

What must stay true with the overlap: flushes never overlap one another and run in stream order; a resume
token is saved only once every event before it is on the target (a failed flush leaves the previous token);
a DDL event is applied only after every write queued or in flight before it; stop conditions see applied
state only. Writes are slowed down so that an implementation that does not wait would be caught.
"""

from __future__ import annotations

import threading
import time
import zlib

import pytest
from bson import Decimal128, Int64

from atlas_migration.engines.live import _EventApplier, _id_key, apply_lane
from tests.engines.test_live import initial_copy, make_sync, state_doc
from tests.engines.test_live_lanes import EQUAL_NUMBERS, _applier, _queue
from tests.helpers import assert_namespaces_identical

SLOW_WRITE = 0.3  # seconds: long enough for the loop to read a whole batch meanwhile


def _slow_writes(monkeypatch, *, fail_call: int | None = None, background_only: bool = False) -> list[dict]:
    """Make every ``_EventApplier.write`` slow (``background_only``: only those of the background flush
    thread) and record it (thread, times, ops); ``fail_call`` (1-based) raises instead of writing anything."""
    calls: list[dict] = []
    write = _EventApplier.write

    def slow(self, batch):
        call = {"n": len(calls) + 1, "thread": threading.current_thread().name, "start": time.monotonic(),
                "ops": sum(len(ops) for lanes in batch.ops.values() for ops in lanes.values())}
        calls.append(call)
        if not background_only or call["thread"].startswith("live-flush-"):
            time.sleep(SLOW_WRITE)
        if call["n"] == fail_call:
            call["end"] = time.monotonic()
            raise RuntimeError("lane failed")
        write(self, batch)
        call["end"] = time.monotonic()
        call["ok"] = True

    monkeypatch.setattr(_EventApplier, "write", slow)
    return calls


def _updates(src, n: int) -> None:
    src.pipe.c.insert_many([{"_id": i, "v": 0} for i in range(n)])


# ---------------------------------------------------------------------------------------------- pure
def test_numbers_with_one_canonical_id_share_a_lane_through_id_key():
    sevens = [7, Int64(7), 7.0, Decimal128("7"), Decimal128("7.000"), Decimal128("0.7E1")]
    assert len({_id_key(v) for v in sevens}) == 1
    for group in [sevens, *EQUAL_NUMBERS]:
        assert len({_id_key(v) for v in group}) == 1, group
        for lanes in (2, 3, 4, 16):
            assert {apply_lane(v, lanes) for v in group} == {zlib.crc32(_id_key(group[0])) % lanes}, (group, lanes)
    assert _id_key(7) != _id_key("7") and _id_key(7) != _id_key(True)


def test_every_flush_of_a_catch_up_uses_one_pool_of_lane_threads(monkeypatch):
    threads: list[threading.Thread] = []
    write_lane = _EventApplier._write_lane

    def recording(self, key, ops):
        threads.append(threading.current_thread())  # the objects: a new pool per flush makes new ones
        return write_lane(self, key, ops)

    monkeypatch.setattr(_EventApplier, "_write_lane", recording)
    applier, log, _ = _applier(4)
    try:
        for flush in range(5):
            _queue(applier, list(range(flush * 100, flush * 100 + 100)))
            applier.flush()
    finally:
        applier.close()
    assert len(log) == 20 and len(set(threads)) <= 4
    assert all(not thread.is_alive() for thread in set(threads))  # close() ended them


# ------------------------------------------------------------------------------------ real servers
def test_the_next_batch_is_read_while_one_is_written_and_flushes_never_overlap(source, target, monkeypatch):
    calls = _slow_writes(monkeypatch)
    added: list[float] = []
    add = _EventApplier.add

    def recording(self, event):
        added.append(time.monotonic())
        return add(self, event)

    monkeypatch.setattr(_EventApplier, "add", recording)
    with source.client() as src, target.client() as dst:
        src.pipe.c.insert_many([{"_id": i, "v": 0} for i in range(40)])
        sync = make_sync(src, dst, ["pipe.*"], batch_size=5)
        initial_copy(sync)
        for i in range(40):
            src.pipe.c.update_one({"_id": i}, {"$set": {"v": i + 1}})
        result = sync.catch_up()
        assert result.stopped_because == "lag_ok" and result.events_applied == 40
        assert_namespaces_identical(src, dst, [("pipe", "c")])
    written = [c for c in calls if c["ops"]]
    assert sum(c["ops"] for c in written) == 40
    assert any(c["thread"].startswith("live-flush-") for c in written)  # in the background
    for before, after in zip(calls, calls[1:], strict=False):
        assert before["end"] <= after["start"]  # one flush at a time, in order
    # Events were queued while a batch was being written: reading overlapped writing.
    assert any(c["start"] < t < c["end"] for c in written for t in added)


def test_a_failed_flush_leaves_the_token_of_the_last_batch_written(source, target, monkeypatch):
    calls = _slow_writes(monkeypatch, fail_call=3)
    with source.client() as src, target.client() as dst:
        _updates(src, 30)
        sync = make_sync(src, dst, ["pipe.*"], batch_size=5)
        initial_copy(sync)
        before = state_doc(dst)
        for i in range(30):
            src.pipe.c.update_one({"_id": i}, {"$set": {"v": i + 1}})
        with pytest.raises(RuntimeError, match="lane failed"):
            sync.catch_up()
        failed = state_doc(dst)
        written = sum(c["ops"] for c in calls if c.get("ok"))
        assert [bool(c.get("ok")) for c in calls] == [True, True, False]  # nothing started after the failure
        assert 0 < written < 30
        # Saved exactly up to the batches written, not the one that failed, nor the one read meanwhile.
        assert failed["events_applied"] == written and failed["resume_token"] != before["resume_token"]
        assert dst.pipe.c.count_documents({"v": {"$gt": 0}}) == written

        monkeypatch.undo()
        fresh = make_sync(src, dst, ["pipe.*"], batch_size=5)
        result = fresh.catch_up()
        assert result.events_applied == 30 - written  # resumed right after the last batch written
        assert state_doc(dst)["events_applied"] == 30
        assert_namespaces_identical(src, dst, [("pipe", "c")])


def test_a_ddl_event_is_applied_after_the_dml_queued_and_in_flight_before_it(source, target, monkeypatch):
    # The DML queued right before the DDL event is written in the loop's thread, at once: only waiting for
    # the slow batch in flight makes every update visible when the DDL event is applied.
    _slow_writes(monkeypatch, background_only=True)
    seen_at_ddl: list[int] = []
    apply_ddl = _EventApplier._apply_ddl

    def checking(self, op, event, db, coll):
        if op == "createIndexes":
            seen_at_ddl.append(self.sync.target.pipe.c.count_documents({"v": {"$gt": 0}}))
        return apply_ddl(self, op, event, db, coll)

    monkeypatch.setattr(_EventApplier, "_apply_ddl", checking)
    with source.client() as src, target.client() as dst:
        _updates(src, 13)
        sync = make_sync(src, dst, ["pipe.*"], batch_size=5)
        initial_copy(sync)
        for i in range(13):  # two batches in flight or queued, three events still queued
            src.pipe.c.update_one({"_id": i}, {"$set": {"v": i + 1}})
        src.pipe.c.create_index("v", name="v_1")
        src.pipe.c.update_one({"_id": 0}, {"$set": {"v": 100}})
        result = sync.catch_up()
        assert result.stopped_because == "lag_ok"
        assert seen_at_ddl == [13]  # every update before the DDL event was on the target
        assert "v_1" in dst.pipe.c.index_information()
        assert_namespaces_identical(src, dst, [("pipe", "c")])


def test_stop_conditions_see_only_applied_events_and_the_result_all_of_them(source, target, monkeypatch):
    _slow_writes(monkeypatch)
    with source.client() as src, target.client() as dst:
        _updates(src, 40)
        sync = make_sync(src, dst, ["pipe.*"], batch_size=5)
        initial_copy(sync)
        for i in range(40):
            src.pipe.c.update_one({"_id": i}, {"$set": {"v": i + 1}})
        checks: list[tuple] = []

        def stop(follow, lag, elapsed):
            on_target = dst.pipe.c.count_documents({"v": {"$gt": 0}})
            saved = state_doc(dst)
            checks.append((follow.events, on_target, saved.get("events_applied", 0), follow.last_cluster_time,
                           saved.get("last_applied_cluster_time")))
            return "enough" if follow.events >= 20 else None

        result = sync._follow(stop)
        assert result.stopped_because == "enough"
        assert len(checks) >= 2
        for events, on_target, saved_events, cluster_time, saved_time in checks:
            # follow describes what is on the target and saved, never what is only read or in flight.
            assert events == on_target == saved_events and cluster_time == saved_time
        # Stopping applies everything already read: the result and the saved state agree with the target.
        done = state_doc(dst)
        assert result.events_applied == done["events_applied"] == dst.pipe.c.count_documents({"v": {"$gt": 0}})
        assert result.events_applied >= 20
        assert result.resume_token is not None
