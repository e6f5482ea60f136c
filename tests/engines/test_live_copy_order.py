"""The live initial copy in natural order: chosen from the source's plan, checkpointed by record position.

Against real server processes. The test server answers an ``_id`` range with a collection scan (its explain
says ``COLLSCAN``), so ``copy_order="auto"`` copies each multi-partition collection once in natural order.
It reports no record positions itself; ``devtools.replica_set_proxy`` adds mongod's ``$_requestResumeToken``
/ ``$_resumeAfter`` (see its docstring), so the positioned resume is tested through the proxy.
"""

from __future__ import annotations

import logging

import pymongo
import pytest
from bson import Decimal128

from atlas_migration.engines.live import STATE_COLLECTION, LiveSync
from tests.engines.test_live import STATE_DB, make_sync
from tests.helpers import assert_namespaces_identical

DOCS = 1_000


def _sync(src, dst, **kwargs) -> LiveSync:
    return make_sync(src, dst, ["big.*"], batch_size=100, partition_docs=300, **kwargs)


def _seed(src) -> None:
    # _ids out of insertion order, so natural order and _id order differ.
    src.big.items.insert_many([{"_id": (i * 7919) % DOCS, "v": Decimal128(f"{i}.5")} for i in range(DOCS)])


def _crash_at(batch_number: int):
    def crash(stage: str, batch: int) -> None:
        if stage == "copy" and batch == batch_number:
            raise RuntimeError("killed")
    return crash


def _partition_state(dst) -> dict:
    return dst[STATE_DB][STATE_COLLECTION].find_one({"kind": "partition"})


def _killed_after_four_batches(src, dst) -> LiveSync:
    sync = _sync(src, dst)
    sync.start()
    (partition,) = sync.plan_partitions()
    assert partition.natural and (partition.lower, partition.upper) == (None, None)
    sync.prepare_targets()
    sync.fault_hook = _crash_at(4)
    with pytest.raises(RuntimeError, match="killed"):
        sync.copy_partition(partition)
    saved = _partition_state(dst)
    assert saved["documents"] == 300 and not saved["done"]
    return sync


def test_auto_reads_a_collection_whose_ranges_are_scans_once_in_natural_order(source, target, caplog):
    with source.client() as src, target.client() as dst:
        _seed(src)
        by_range = _sync(src, dst, copy_order="id_range")
        by_range.start()
        assert len(by_range.plan_partitions()) >= 3
        dst.drop_database(STATE_DB)
        sync = _sync(src, dst)  # auto
        sync.start()
        with caplog.at_level(logging.INFO, logger="atlas_migration.engines.live"):
            (partition,) = sync.plan_partitions()
        assert partition.natural and partition.documents_estimate == DOCS
        assert "answers an _id range with a collection scan (COLLSCAN in its plan), so 4 ranges" in caplog.text
        sync.prepare_targets()
        result = sync.copy_partition(partition)
        assert result.documents == DOCS and result.resumed_from is None
        sync.finish_initial_copy()
        assert_namespaces_identical(src, dst, [("big", "items")])


def test_a_killed_natural_copy_without_record_positions_reads_again_and_skips_what_is_there(
        source, target, caplog):
    with source.client() as src, target.client() as dst:
        _seed(src)
        sync = _killed_after_four_batches(src, dst)
        assert _partition_state(dst)["resume_token"] is None  # the test server reports no positions
        (partition,) = sync.plan_partitions()
        with caplog.at_level(logging.INFO, logger="atlas_migration.engines.live"):
            result = _sync(src, dst).copy_partition(partition)  # a new task process
        assert "copying again from its first record, as the source reported no record position" in caplog.text
        assert result.resumed_from is None and result.documents == DOCS
        assert _partition_state(dst)["inserted"] < 2 * DOCS  # the second read skipped what was there
        sync.finish_initial_copy()
        assert_namespaces_identical(src, dst, [("big", "items")])


@pytest.fixture
def positioned(source, target):
    """A source client through the proxy that reports record positions, and the direct clients."""
    from devtools.replica_set_proxy import ReplicaSetProxy

    if source.local is None:
        pytest.skip("needs the local test server behind the proxy (a genuine mongod reports positions itself)")
    with ReplicaSetProxy(source.local.port) as proxy, source.client() as direct, target.client() as dst, \
            pymongo.MongoClient(f"mongodb://{proxy.host}/?directConnection=true") as src:
        yield src, direct, dst


def test_a_killed_natural_copy_resumes_at_its_record_position(positioned, caplog):
    src, direct, dst = positioned
    _seed(direct)
    sync = _killed_after_four_batches(src, dst)
    saved = _partition_state(dst)
    assert set(saved["resume_token"]) == {"$recordId"} and saved["resume_node"]
    direct.big.items.update_one({"_id": 1}, {"$set": {"late": True}})  # a change the stream will replay
    (partition,) = sync.plan_partitions()
    with caplog.at_level(logging.INFO, logger="atlas_migration.engines.live"):
        result = _sync(src, dst).copy_partition(partition)
    assert "resuming after record position" in caplog.text
    assert result.resumed_from == {"$recordId": saved["resume_token"]["$recordId"]}
    assert result.documents == DOCS
    # Only the batch written but not recorded before the kill (and those inserted beside it) was read twice.
    assert _partition_state(dst)["documents"] == DOCS
    sync.finish_initial_copy()
    sync.catch_up(max_seconds=10, until_lag_below=1)
    assert_namespaces_identical(direct, dst, [("big", "items")])


@pytest.mark.parametrize("why", ["another_term", "record_deleted"])
def test_a_record_position_that_cannot_be_used_reads_the_partition_again(positioned, caplog, why):
    src, direct, dst = positioned
    _seed(direct)
    sync = _killed_after_four_batches(src, dst)
    saved = _partition_state(dst)
    if why == "another_term":
        dst[STATE_DB][STATE_COLLECTION].update_one({"_id": saved["_id"]}, {"$set": {"resume_node": "elsewhere term 1"}})
        expected = "its saved record position was reported by another node or election term"
    else:  # the record the position names is gone: the server refuses to resume there
        last = direct.big.items.find({}, sort=[("$natural", 1)], skip=299, limit=1)[0]["_id"]
        direct.big.items.delete_one({"_id": last})
        expected = "the source refused to resume at its saved record position (code"
    (partition,) = sync.plan_partitions()
    with caplog.at_level(logging.INFO, logger="atlas_migration.engines.live"):
        result = _sync(src, dst).copy_partition(partition)
    assert expected in caplog.text
    assert result.resumed_from is None
    sync.finish_initial_copy()
    sync.catch_up(max_seconds=10, until_lag_below=1)
    assert_namespaces_identical(direct, dst, [("big", "items")])
