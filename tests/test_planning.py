"""CopyPlan selection and ordering (pure)."""

import pytest

from atlas_migration.errors import ConfigurationError, TargetNotEmpty
from atlas_migration.namespaces import NamespaceFilter
from atlas_migration.planning import (
    DEFAULT_MAX_MAP_LENGTH,
    build_copy_plan,
    map_batches,
    refuse_occupied_targets,
)
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


@pytest.mark.parametrize("count", [0, 1, 7, 1024, 1025, 2000, 5000])
def test_map_batches_stay_within_the_limit_and_keep_every_item_once(count: int) -> None:
    items = list(range(count))
    batches = map_batches(items, DEFAULT_MAX_MAP_LENGTH)
    assert len(batches) == min(count, DEFAULT_MAX_MAP_LENGTH)
    assert sorted(i for batch in batches for i in batch) == items
    if count <= DEFAULT_MAX_MAP_LENGTH:
        assert batches == [[i] for i in items]  # one task per item, as before
    else:
        sizes = {len(batch) for batch in batches}
        assert max(sizes) - min(sizes) <= 1 and all(batch == sorted(batch) for batch in batches)


def test_map_batches_deal_large_items_across_batches() -> None:
    """Lists arrive largest first: the first batches must not take all the large collections."""
    sizes = sorted(range(1, 101), reverse=True)
    batches = map_batches(sizes, 10)
    totals = [sum(batch) for batch in batches]
    assert [batch[0] for batch in batches] == list(range(100, 90, -1))
    assert max(totals) - min(totals) <= 10 * 9  # contiguous slices would differ by 900


def test_map_batches_refuse_a_limit_below_one() -> None:
    with pytest.raises(ConfigurationError, match="at least 1"):
        map_batches([1, 2], 0)
