"""Routing by what the target can take, and file runs (pure: no server)."""

from __future__ import annotations

import pytest

from atlas_migration.errors import ImpossibleStrategy
from atlas_migration.routing import choose_for_files, choose_strategy, target_problems
from atlas_migration.target_inspection import TargetProfile, tier_from_cluster, tier_kind
from tests.test_routing import make_profile


def target(**overrides) -> TargetProfile:
    return TargetProfile(**{"conn_id": "atlas_target", "version": "8.0.4", "topology": "replica_set", **overrides})


@pytest.mark.parametrize("tier", ["FLEX", "M0", "M2", "M5", "SERVERLESS", "flex"])
def test_restricted_tiers_route_auto_to_mongorestore_and_say_why(tier):
    profile = make_profile()
    assert choose_strategy(profile).strategy == "live_pull"
    decision = choose_strategy(profile, target=target(tier=tier))
    assert (decision.strategy, decision.rule) == ("mongorestore", "target_restricted")
    assert f"Atlas {tier}" in decision.reasons[-1] and "self-managed tools" in decision.reasons[-1]
    assert "rule 'default' chose 'live_pull'" in decision.reasons[-1]


@pytest.mark.parametrize("strategy", ["live_pull", "live_push", "aws_replica_set", "compose"])
def test_forced_live_strategies_are_refused_on_a_flex_target(strategy):
    with pytest.raises(ImpossibleStrategy, match=r"Atlas FLEX \(flex\) cluster.*would choose 'mongorestore'"):
        choose_strategy(make_profile(managed_by="cloud_manager", hosting="aws"), strategy, target(tier="FLEX"))


def test_mongorestore_is_allowed_on_any_tier_and_dedicated_tiers_change_nothing():
    assert choose_strategy(make_profile(), "mongorestore", target(tier="FLEX")).strategy == "mongorestore"
    assert choose_strategy(make_profile(), target=target(tier="M10")).strategy == "live_pull"
    assert choose_strategy(make_profile(), target=None).strategy == "live_pull"


def test_target_versions():
    src = make_profile(version="7.0.20")
    decision = choose_strategy(src, target=target(version="6.0.25"))
    assert decision.rule == "target_restricted" and "older than the source's 7.0.20" in decision.reasons[-1]
    assert target_problems("live_push", "6.0.20", target(version="6.0.10")) == [
        "the target runs MongoDB 6.0.10; live migration (push) needs a target on 6.0.17+, 7.0.13+ or 8.0+"]
    assert target_problems("live_pull", "5.0.30", target(version="5.0.30")) == [
        "the target runs MongoDB 5.0.30; live pull (mongosync) needs a target on 6.0+"]
    assert target_problems("live_pull", "7.0.20", target(version=None)) == []
    assert target_problems("mongorestore", "8.0.4", target(version="4.4.0", tier="M0")) == []


def test_tiers_from_the_admin_api_cluster_description():
    def cluster(provider: str, size: str | None) -> dict:
        return {"replicationSpecs": [{"regionConfigs": [{"providerName": provider,
                                                          "electableSpecs": {"instanceSize": size}}]}]}

    assert tier_from_cluster(cluster("TENANT", "M0")) == "M0"
    assert tier_from_cluster(cluster("FLEX", None)) == "FLEX"
    assert tier_from_cluster(cluster("AWS", "M30")) == "M30"
    assert tier_from_cluster({}) is None
    assert [tier_kind(t) for t in ("M0", "FLEX", "SERVERLESS", "M10", None)] == [
        "shared", "flex", "serverless", "dedicated", None]


def test_file_runs_route_to_file_import():
    decision = choose_for_files("auto", 3, target(tier="FLEX"))
    assert (decision.strategy, decision.rule) == ("file_import", "source_files")
    assert "3 file(s)" in decision.reasons[0] and "Atlas FLEX" in decision.reasons[1]
    with pytest.raises(ImpossibleStrategy, match="needs a source deployment"):
        choose_for_files("live_pull", 1)
    with pytest.raises(ImpossibleStrategy, match="name them in source_files"):
        choose_strategy(make_profile(), "file_import")
