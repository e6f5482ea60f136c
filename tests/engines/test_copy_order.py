"""Pure rules of the live initial copy's read order: explain shapes, the natural find, position reuse."""

from __future__ import annotations

import pytest
from bson import Int64

from atlas_migration.engines.copy_order import (
    id_range_explain_command,
    natural_find_command,
    ranges_scan_the_collection,
    reusable_position,
    winning_plan_stages,
)

# Shapes as the servers print them (queryPlanner verbosity), trimmed to what the rule reads.
MONGOD_CLASSIC = {"queryPlanner": {
    "winningPlan": {"stage": "FETCH", "inputStage": {"stage": "IXSCAN", "indexName": "_id_"}},
    "rejectedPlans": [{"stage": "SORT", "inputStage": {"stage": "COLLSCAN"}}]}}
MONGOD_SBE = {"queryPlanner": {"winningPlan": {
    "queryPlan": {"stage": "FETCH", "inputStage": {"stage": "IXSCAN", "indexName": "_id_"}},
    "slotBasedPlan": {"stages": "[2] nlj ..."}}}}
MONGOS = {"queryPlanner": {"winningPlan": {"stage": "SHARD_MERGE_SORT", "shards": [
    {"shardName": "s0", "winningPlan": {"stage": "FETCH", "inputStage": {"stage": "IXSCAN"}}},
    {"shardName": "s1", "winningPlan": {"stage": "SHARDING_FILTER", "inputStage": {"stage": "COLLSCAN"}}}]}}}
SCAN_AND_SORT = {"queryPlanner": {"winningPlan": {
    "stage": "SORT", "sortPattern": {"_id": 1}, "inputStage": {"stage": "COLLSCAN", "direction": "forward"}}}}


def test_an_id_index_plan_keeps_ranges_and_a_rejected_collection_scan_does_not_count() -> None:
    assert winning_plan_stages(MONGOD_CLASSIC) == ["FETCH", "IXSCAN"]
    assert not ranges_scan_the_collection(MONGOD_CLASSIC)
    assert not ranges_scan_the_collection(MONGOD_SBE)


def test_a_collection_scan_anywhere_in_the_winning_plan_means_natural_order() -> None:
    assert ranges_scan_the_collection(SCAN_AND_SORT)
    assert ranges_scan_the_collection(MONGOS)  # one shard scanning is enough to scan per range


def test_an_explain_without_a_planner_section_keeps_ranges() -> None:
    assert winning_plan_stages({"ok": 1}) == [] and not ranges_scan_the_collection({"ok": 1})


def test_the_explained_query_is_the_range_copy_query_and_never_executes() -> None:
    command = id_range_explain_command("orders", 1, 9)
    assert command == {"explain": {"find": "orders", "filter": {"_id": {"$gte": 1, "$lt": 9}}, "sort": {"_id": 1}},
                       "verbosity": "queryPlanner"}


def test_the_natural_find_asks_for_positions_only_with_the_natural_hint() -> None:
    plain = natural_find_command("c", 500, request_positions=False)
    assert list(plain)[0] == "find" and plain["hint"] == {"$natural": 1} and "$_requestResumeToken" not in plain
    assert plain["readConcern"] == {"level": "majority"} and plain["batchSize"] == 500
    token = {"$recordId": Int64(42)}
    resumed = natural_find_command("c", 500, request_positions=True, resume_after=token)
    assert resumed["$_requestResumeToken"] is True and resumed["$_resumeAfter"] == token
    with pytest.raises(ValueError, match="request_positions"):
        natural_find_command("c", 500, request_positions=False, resume_after=token)


@pytest.mark.parametrize(("token", "stored_node", "node", "expected"), [
    ({"$recordId": Int64(7)}, "h:1 term 7f", "h:1 term 7f", True),
    ({"$recordId": Int64(7)}, "h:1 term 7f", "h:1 term 80", False),  # an election since: maybe another node
    ({"$recordId": Int64(7)}, "h:1 term 7f", "h:2 term 7f", False),
    ({"$recordId": Int64(7)}, "h:1 term 7f", None, False),  # now through a mongos
    (None, None, "h:1 term 7f", False),  # the source reported no position
])
def test_a_record_position_is_reused_only_on_its_node_in_its_term(token, stored_node, node, expected) -> None:
    assert reusable_position(token, stored_node, node) is expected
