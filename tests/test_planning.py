"""CopyPlan selection and ordering (pure)."""

import pytest

from atlas_migration.errors import ConfigurationError, TargetNotEmpty
from atlas_migration.namespaces import NamespaceFilter
from atlas_migration.planning import build_copy_plan, refuse_occupied_targets
from atlas_migration.profile import CollectionInfo, SourceProfile


def profile() -> SourceProfile:
    return SourceProfile(conn_id="mongo_source", hosts=["h:1"], collections=[
        CollectionInfo("shop", "orders", "collection", 1000, 50_000),
        CollectionInfo("shop", "customers", "collection", 200, 90_000),
        CollectionInfo("shop", "paid_orders", "view"),
        CollectionInfo("analytics", "daily.rollups", "collection", 10, 100),
        CollectionInfo("logs", "events", "capped", 5, 10),
    ])


def test_largest_first_and_views_last():
    plan = build_copy_plan(profile(), NamespaceFilter())
    assert [i.namespace for i in plan.collections] == [
        "shop.customers", "shop.orders", "analytics.daily.rollups", "logs.events"]
    assert [i.namespace for i in plan.views] == ["shop.paid_orders"]


def test_include_exclude_and_skipped_listed():
    plan = build_copy_plan(profile(), NamespaceFilter.from_patterns(["shop.*", "analytics.*"], ["shop.customers"]))
    assert {i.namespace for i in plan.all_items} == {"shop.orders", "shop.paid_orders", "analytics.daily.rollups"}
    assert set(plan.skipped) == {"shop.customers", "logs.events"}


def test_unknown_namespace_is_an_error():
    with pytest.raises(ConfigurationError, match="'shop.ordres' match no namespace"):
        build_copy_plan(profile(), NamespaceFilter.from_patterns(["shop.ordres"], []))


def test_excluding_everything_is_an_error():
    with pytest.raises(ConfigurationError, match="nothing to migrate"):
        build_copy_plan(profile(), NamespaceFilter.from_patterns([], ["*"]))


def test_target_prefix():
    plan = build_copy_plan(profile(), NamespaceFilter.from_patterns(["shop.orders"], []), target_db_prefix="rehearsal_")
    assert plan.collections[0].target_namespace == "rehearsal_shop.orders"


def test_refuse_occupied_lists_every_namespace():
    with pytest.raises(TargetNotEmpty) as excinfo:
        refuse_occupied_targets(["shop.orders", "shop.customers"], "atlas_target")
    assert "shop.orders, shop.customers" in str(excinfo.value) and "Nothing was written" in str(excinfo.value)
    # What to do next after a crashed run: clear and retry within that run, or a new run replacing them.
    assert "clear and retry that run's failed task within the same run" in str(excinfo.value)
    assert "resumes from the checkpoints" in str(excinfo.value)
    assert "new run with drop_target=true, which replaces exactly these namespaces" in str(excinfo.value)
    refuse_occupied_targets([], "atlas_target")


def test_profile_round_trips_through_json():
    import json

    original = profile()
    original.unknown["fcv"] = "not authorized"
    again = SourceProfile.from_dict(json.loads(json.dumps(original.to_dict())))
    assert again == original
    assert again.total_documents == 1215 and again.databases == ["analytics", "logs", "shop"]
