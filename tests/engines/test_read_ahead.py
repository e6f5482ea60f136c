"""ReadAhead: items in order, bounded look-ahead, errors where a plain loop raises them, a clean stop."""

from __future__ import annotations

import threading
import time

import pytest

from atlas_migration.engines.read_ahead import ReadAhead


def test_every_item_arrives_in_order_and_is_read_off_the_callers_thread():
    readers: set[str] = set()

    def items():
        for i in range(1_000):
            readers.add(threading.current_thread().name)
            yield i

    with ReadAhead(items(), depth=3, name="reader") as ahead:
        assert list(ahead) == list(range(1_000))
    assert readers == {"reader"}


def test_it_reads_at_most_depth_items_ahead_of_the_caller():
    produced = []

    def items():
        for i in range(100):
            produced.append(i)
            yield i

    with ReadAhead(items(), depth=2) as ahead:
        taken = iter(ahead)
        assert next(taken) == 0
        time.sleep(0.3)  # time to run ahead as far as it may
        # item 0 taken, items 1-2 queued, item 3 read and waiting for room: never further
        assert len(produced) <= 4
        assert next(taken) == 1


def test_an_error_while_reading_is_raised_after_the_items_before_it():
    def items():
        yield "a"
        yield "b"
        raise RuntimeError("getMore failed")

    seen = []
    with ReadAhead(items()) as ahead, pytest.raises(RuntimeError, match="getMore failed"):
        for item in ahead:
            seen.append(item)
    assert seen == ["a", "b"]


def test_leaving_early_stops_the_reader_before_the_with_block_ends():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    ahead = ReadAhead(endless(), depth=1, name="endless-reader")
    with ahead:
        for item in ahead:
            if item == 5:
                break
    assert not ahead._thread.is_alive()
    assert "endless-reader" not in {t.name for t in threading.enumerate()}


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        ReadAhead([], depth=0)
