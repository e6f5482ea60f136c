"""Namespace patterns follow mongodump's --nsInclude/--nsExclude syntax."""

import pytest

from atlas_migration.errors import ConfigurationError
from atlas_migration.namespaces import NamespaceFilter, is_never_migrated, split_namespace


@pytest.mark.parametrize(
    ("include", "exclude", "ns", "expected"),
    [
        ([], [], ("shop", "orders"), True),
        (["shop.*"], [], ("shop", "orders"), True),
        (["shop.*"], [], ("analytics", "orders"), False),
        (["*.orders"], [], ("shop", "orders"), True),
        (["*"], ["shop.orders"], ("shop", "orders"), False),
        (["*"], ["shop.orders"], ("shop", "orders2"), True),
        (["analytics.daily.*"], [], ("analytics", "daily.rollups"), True),  # dots inside collection names
        (["analytics.daily.rollups"], [], ("analytics", "dailyXrollups"), False),  # '.' is literal
        ([r"shop.a\*b"], [], ("shop", "a*b"), True),  # escaped star is literal
        ([r"shop.a\*b"], [], ("shop", "axxb"), False),
        (["sh*p.cust*"], [], ("shop", "customers"), True),
        ([], [], ("admin", "users"), False),  # never migrated, whatever the patterns
        (["*"], [], ("local", "oplog.rs"), False),
        (["config.*"], [], ("config", "chunks"), False),
        (["shop.*"], [], ("shop", "system.views"), False),
        (["*"], [], ("__atlas_migration", "checkpoints"), False),
    ],
)
def test_filter_matches(include, exclude, ns, expected):
    assert NamespaceFilter.from_patterns(include, exclude).matches(*ns) is expected


@pytest.mark.parametrize("bad", ["", "shop", ".orders", "shop.", "sh op.orders", 42])
def test_malformed_patterns_are_refused(bad):
    with pytest.raises(ConfigurationError, match="namespace pattern"):
        NamespaceFilter.from_patterns([bad], [])


def test_unmatched_includes_are_reported():
    selection = NamespaceFilter.from_patterns(["shop.*", "shpo.orders"], [])
    assert selection.unmatched_includes(["shop.orders", "analytics.sessions"]) == ["shpo.orders"]


def test_split_namespace_keeps_dots_in_collection():
    assert split_namespace("analytics.daily.rollups") == ("analytics", "daily.rollups")
    with pytest.raises(ConfigurationError):
        split_namespace("nodot")


def test_system_namespaces():
    assert is_never_migrated("admin")
    assert is_never_migrated("shop", "system.js")
    assert not is_never_migrated("shop", "orders")


def test_a_database_whose_collections_cannot_be_listed():
    everything = NamespaceFilter()
    assert everything.may_select_database("bad db")
    assert not NamespaceFilter.from_patterns([], ["bad db.*"]).may_select_database("bad db")
    assert NamespaceFilter.from_patterns([], ["bad db.x"]).may_select_database("bad db")  # other collections
    assert not NamespaceFilter.from_patterns(["shop.*"], []).may_select_database("bad db")
    assert NamespaceFilter.from_patterns(["b*.x"], []).may_select_database("bad db")
    assert not everything.may_select_database("admin")
