"""choose_strategy: every row of MongoDB's table, the fall-through notes, and impossible overrides."""

from dataclasses import replace

import pytest

from atlas_migration.errors import ImpossibleStrategy, StrategyNotAvailable
from atlas_migration.profile import (
    CollectionInfo,
    ShardOplog,
    SourceProfile,
    apply_shard_windows,
    parse_version,
)
from atlas_migration.routing import (
    LIVE_MIGRATION_MINIMUMS,
    PUSH_MINIMUMS,
    choose_strategy,
    ensure_available,
    meets_minimum,
)


def make_profile(**overrides) -> SourceProfile:
    base = SourceProfile(
        conn_id="mongo_source", hosts=["db0.internal:27017"], version="7.0.20", fcv="7.0",
        topology="replica_set", set_name="rs0", members=["db0.internal:27017"], oplog_readable=True,
        oplog_window_hours=72.0, managed_by=None, hosting="other",
        collections=[CollectionInfo("shop", "orders", "collection", 10, 100)],
    )
    return replace(base, **overrides)


# Measured shard windows (hours) of a two-shard cluster, as inspection records them.
SHARD_WINDOWS = {"shard01": 96.0, "shard02": 30.5}


def sharded_profile(windows: dict[str, float | None] | None = None, **overrides) -> SourceProfile:
    """A sharded source as inspection builds it: a mongos (no set name, no members) whose oplog window is
    the smallest of its shards' windows, through ``apply_shard_windows``; a None window is an unreadable
    shard."""
    profile = make_profile(hosts=["mongos0.internal:27017"], topology="sharded", set_name=None, members=[],
                           oplog_window_hours=None, **overrides)
    apply_shard_windows(profile, [
        ShardOplog(name, [f"{name}-a.internal:27018", f"{name}-b.internal:27018"], name, hours,
                   "" if hours is not None else f"cannot connect to replica set {name}")
        for name, hours in (SHARD_WINDOWS if windows is None else windows).items()])
    return profile


def profile_from(overrides: dict) -> SourceProfile:
    """A table row's profile: ``sharded`` (with optional shard ``windows``) builds it as inspection does."""
    overrides = dict(overrides)
    if overrides.pop("sharded", False):
        return sharded_profile(overrides.pop("windows", None), **overrides)
    return make_profile(**overrides)


def test_a_sharded_profile_gets_its_window_from_its_smallest_shard():
    profile = sharded_profile()
    assert profile.oplog_window_hours == 30.5 and profile.shards == ["shard01", "shard02"]
    decision = choose_strategy(profile)
    assert (decision.strategy, decision.rule) == ("live_pull", "default")
    assert not any("oplog window" in w for w in decision.warnings)
    short = choose_strategy(sharded_profile({"shard01": 96.0, "shard02": 6.0}))
    assert any("oplog window is 6.0 h" in w for w in short.warnings)


def test_a_sharded_profile_with_an_unreadable_shard_has_no_window_and_routing_warns_nothing_false():
    profile = sharded_profile({"shard01": 96.0, "shard02": None})
    assert profile.oplog_window_hours is None
    assert "shard shard02: cannot connect" in profile.unknown["oplog_window_hours"]
    # Routing still picks the live pull (the oplog is readable through mongos); its preflight refuses the
    # unknown window before writing anything (live_pull.start).
    assert choose_strategy(profile).strategy == "live_pull"


@pytest.mark.parametrize(
    ("overrides", "strategy", "rule"),
    [
        ({"managed_by": "cloud_manager"}, "live_push", "cloud_manager"),
        ({"sharded": True, "managed_by": "cloud_manager"}, "live_push", "cloud_manager"),
        ({}, "live_pull", "default"),
        ({"sharded": True}, "live_pull", "default"),
        ({"hosting": "atlas_shared_tier"}, "mongorestore", "shared_tier"),
        ({"oplog_readable": False}, "mongorestore", "no_oplog"),
        ({"oplog_readable": None}, "mongorestore", "no_oplog"),
        ({"topology": "standalone", "set_name": None, "oplog_readable": False}, "mongorestore", "no_oplog"),
        ({"version": "4.2.24"}, "mongorestore", "unsupported_version"),
        ({"version": "4.4.10"}, "mongorestore", "below_live_minimum"),
        ({"version": "7.0.14"}, "mongorestore", "below_live_minimum"),
        ({"version": "7.0.14", "managed_by": "cloud_manager"}, "live_push", "cloud_manager"),
        ({"version": "6.1.0"}, "mongorestore", "unsupported_version"),  # rapid release: not a live-migration source
        ({"sharded": True, "windows": {"rs0": 48.0}, "hosting": "compose"}, "compose", "compose"),
        ({"hosting": "aws"}, "aws_replica_set", "aws_replica_set"),
    ],
)
def test_every_row_of_the_table(overrides, strategy, rule):
    decision = choose_strategy(profile_from(overrides))
    assert (decision.strategy, decision.rule) == (strategy, rule)
    assert decision.reasons and decision.requested == "auto"


def test_cloud_manager_below_push_minimum_falls_through_to_pull_and_says_why():
    decision = choose_strategy(make_profile(managed_by="cloud_manager", version="5.0.29"))
    assert decision.strategy == "live_pull"
    assert "push needs" in decision.reasons[0] and "5.0.29" in decision.reasons[0]


def test_below_both_minimums_ends_in_mongorestore_with_both_reasons():
    decision = choose_strategy(make_profile(managed_by="cloud_manager", version="6.0.16"))
    assert (decision.strategy, decision.rule) == ("mongorestore", "below_live_minimum")
    assert "push needs" in decision.reasons[0] and "live-pull minimum" in decision.reasons[1]


def test_ops_manager_goes_to_pull_with_the_deprecation_rule():
    decision = choose_strategy(make_profile(managed_by="ops_manager", version="7.0.20"))
    assert decision.strategy == "live_pull"
    assert "Ops Manager" in decision.reasons[0] and "not supported on 6.0+" in decision.reasons[0]


def test_cloud_manager_standalone_falls_back_to_mongorestore():
    decision = choose_strategy(make_profile(managed_by="cloud_manager", topology="standalone", oplog_readable=False))
    assert decision.strategy == "mongorestore"
    assert any("replica set or sharded" in r for r in decision.reasons)


def test_shared_tier_wins_over_management_and_oplog():
    decision = choose_strategy(make_profile(hosting="atlas_shared_tier", managed_by="cloud_manager"))
    assert decision.strategy == "mongorestore"


def test_aws_sharded_is_plain_pull():
    assert choose_strategy(sharded_profile(hosting="aws")).strategy == "live_pull"


def test_short_oplog_window_warns():
    decision = choose_strategy(make_profile(oplog_window_hours=2.5))
    assert any("oplog window is 2.5 h" in w for w in decision.warnings)


def test_mongorestore_on_live_replica_set_warns_about_writes():
    decision = choose_strategy(make_profile(), "mongorestore")
    assert decision.rule == "override" and decision.strategy == "mongorestore"
    assert "'live_pull'" in decision.reasons[0]
    assert any("stop application writes" in w for w in decision.warnings)


@pytest.mark.parametrize(
    ("overrides", "requested", "fragment"),
    [
        ({"topology": "standalone", "oplog_readable": False}, "live_pull", "standalone server has no oplog"),
        ({"oplog_readable": False}, "live_pull", "oplog cannot be read"),
        ({"hosting": "atlas_shared_tier"}, "live_pull", "shared / multi-tenant"),
        ({"version": "4.2.0"}, "live_pull", "below the live-migration minimums"),
        ({}, "live_push", "monitored by Cloud Manager"),
        ({"managed_by": "ops_manager"}, "live_push", "Ops Manager push is not supported"),
        ({"managed_by": "cloud_manager", "version": "6.0.10"}, "live_push", "6.0.10"),
        ({}, "compose", "not a Compose deployment"),
        ({"hosting": "compose"}, "compose", "needs a sharded cluster"),
        ({}, "aws_replica_set", "not found on AWS"),
        ({"sharded": True, "hosting": "aws"}, "aws_replica_set", "needs a replica set"),
        ({}, "live_sideways", "unknown strategy"),
    ],
)
def test_impossible_overrides_fail_clearly(overrides, requested, fragment):
    with pytest.raises(ImpossibleStrategy, match="cannot migrate|unknown strategy") as excinfo:
        choose_strategy(profile_from(overrides), requested)
    assert fragment in str(excinfo.value)


@pytest.mark.parametrize("requested", ["mongorestore", "live_pull"])
def test_possible_overrides_are_accepted(requested):
    assert choose_strategy(make_profile(), requested).strategy == requested


def test_unavailable_strategy_names_itself():
    decision = choose_strategy(make_profile())
    with pytest.raises(StrategyNotAvailable, match="'live_pull' task group is not built") as excinfo:
        ensure_available(decision, frozenset({"mongorestore"}))
    assert "Nothing was written" in str(excinfo.value)
    ensure_available(choose_strategy(make_profile(), "mongorestore"), frozenset({"mongorestore"}))


@pytest.mark.parametrize(
    ("version", "live", "push"),
    [("4.4.29", True, False), ("4.4.28", False, False), ("5.0.29", True, False), ("6.0.17", False, True),
     ("6.0.24", True, True), ("7.0.13", False, True), ("7.0.18", True, True), ("8.0.4", False, True),
     ("8.0.5", True, True), ("8.2.1", True, True), ("3.6.23", False, False), (None, False, False)],
)
def test_version_minimums(version, live, push):
    parsed = parse_version(version)
    assert meets_minimum(parsed, LIVE_MIGRATION_MINIMUMS) is live
    assert meets_minimum(parsed, PUSH_MINIMUMS) is push


def test_parse_version():
    assert parse_version("7.0.13-ent") == (7, 0, 13)
    assert parse_version("8.2.11") == (8, 2, 11)
    assert parse_version("garbage") is None
