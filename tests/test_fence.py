"""The cutover fence: pure decisions, and the source-side steps against a real server."""

from __future__ import annotations

import threading
import time

import pytest

from atlas_migration.errors import ConfigurationError
from atlas_migration.fence import (
    Fence,
    WriteBlockSupport,
    count_late_writes,
    cutover_problems,
    decide_write_block,
    late_writes_message,
    take_fence,
    wait_majority_committed,
    write_block_support,
)
from atlas_migration.namespaces import is_never_migrated


@pytest.mark.parametrize("version, fcv, topology, privileged, available", [
    ("8.0.4", "8.0", "replica_set", True, True),
    ("6.0.2", "6.0", "sharded", True, True),
    ("7.0.1", "5.0", "replica_set", True, False),  # FCV decides
    ("5.0.30", None, "replica_set", True, False),
    ("8.0.4", "8.0", "replica_set", False, False),
    ("8.0.4", "8.0", "replica_set", None, False),
    ("8.0.4", "8.0", "standalone", True, False),
    (None, None, "replica_set", True, False),
])
def test_write_block_support(version, fcv, topology, privileged, available):
    support = write_block_support(version=version, fcv=fcv, topology=topology, privileged=privileged)
    assert support.available is available and support.reason


def test_decide_write_block_follows_the_mode():
    yes, no = WriteBlockSupport(True, "6.0+"), WriteBlockSupport(False, "MongoDB 5.0")
    assert decide_write_block("auto", yes)[0] is True
    assert decide_write_block("require", yes)[0] is True
    block, why = decide_write_block("auto", no)
    assert block is False and "operator's statement" in why and "MongoDB 5.0" in why
    assert decide_write_block("off", yes)[0] is False
    with pytest.raises(ConfigurationError, match="require.*MongoDB 5.0.*Nothing was written"):
        decide_write_block("require", no)
    with pytest.raises(ConfigurationError, match="not one of"):
        decide_write_block("sometimes", yes)


def test_automatic_cutover_needs_write_blocking():
    assert cutover_problems("auto", True) == [] and cutover_problems("manual", False) == []
    assert "cutover=manual" in cutover_problems("auto", False)[0]


def test_fence_round_trips_and_describes_itself():
    fence = Fence(op_time=[10, 2], blocked=False, how="operator_statement", taken_at="t", late_writes={"a.b": 2})
    assert Fence.from_dict(fence.to_dict()) == fence
    message = late_writes_message({"a.b": 2, "c.d": 5}, fence, what="cutover")
    assert "7 application write(s)" in message and message.index("c.d (5)") < message.index("a.b (2)")


@pytest.mark.integration
def test_late_writes_are_counted_by_namespace_after_the_fence(source):
    with source.client() as client:
        client.shop.orders.insert_one({"_id": "before"})  # before the fence: not late
        fence = take_fence(client, block=False)
        assert fence.how == "operator_statement" and not fence.blocked
        wait_majority_committed(client, fence, timeout=10)

        def write() -> None:
            time.sleep(0.3)
            client["__atlas_migration"].state.insert_one({"_id": 1})  # the project's own bookkeeping
            client.mongosync_reserved_for_internal_use.x.insert_one({"_id": 1})
            client.shop.orders.insert_one({"_id": "after-1"})
            client.shop.orders.update_one({"_id": "after-1"}, {"$set": {"x": 1}})
            client.shop.excluded.insert_one({"_id": 1})

        writer = threading.Thread(target=write)
        writer.start()
        try:
            late = count_late_writes(client, fence, 2.0,
                                     selected=lambda db, coll: not is_never_migrated(db, coll) and coll != "excluded",
                                     ignore_databases=frozenset({"mongosync_reserved_for_internal_use"}))
        finally:
            writer.join()
        assert dict(late) == {"shop.orders": 2}


class SlowToOpen:
    """The real client, but its change streams take ``delay`` seconds to open, as a loaded server's do when
    it has a long oplog to scan to the start point (about 3 s for 300,000 entries on the test server)."""

    def __init__(self, client, delay: float) -> None:
        self.client, self.delay = client, delay
        self.admin = client.admin

    def watch(self, *args, **kwargs):
        stream = self.client.watch(*args, **kwargs)
        time.sleep(self.delay)
        return stream


@pytest.mark.integration
def test_late_writes_are_found_when_the_stream_opens_slower_than_the_watch_lasts(source):
    """The watch lasts ``seconds`` from the moment the stream is open, and ends only once the stream has
    delivered every write up to the deadline: a slow open used to end the watch before its first read."""
    with source.client() as client:
        fence = take_fence(client, block=False)
        wait_majority_committed(client, fence, timeout=10)
        client.shop.orders.insert_many([{"_id": 2}, {"_id": 3}])  # after the fence
        late = count_late_writes(SlowToOpen(client, delay=2.0), fence, 1.0, selected=lambda db, coll: True)
        assert dict(late) == {"shop.orders": 2}
