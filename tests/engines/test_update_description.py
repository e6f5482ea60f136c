"""``update_from_description``: which update descriptions are replayed as update operators, and how."""

from __future__ import annotations

import bson
import pytest
from bson import SON
from bson.raw_bson import RawBSONDocument

from atlas_migration.engines.update_description import update_from_description


def _description(updated=None, removed=(), truncated=(), disambiguated=None) -> dict:
    out = {"updatedFields": updated or {}, "removedFields": list(removed), "truncatedArrays": list(truncated)}
    if disambiguated is not None:
        out["disambiguatedPaths"] = disambiguated
    return out


def test_set_unset_and_truncation_become_their_operators():
    update = update_from_description(_description(
        {"a": 1, "n.x": [2]}, ["gone", "n.old"], [{"field": "arr", "newSize": 2}], disambiguated={}))
    assert update == SON([("$set", {"a": 1, "n.x": [2]}), ("$unset", SON([("gone", ""), ("n.old", "")])),
                          ("$push", SON([("arr", SON([("$each", []), ("$slice", 2)]))]))])


def test_a_description_that_changes_nothing_is_an_empty_update():
    assert update_from_description(_description(disambiguated={})) == SON()


def test_updated_fields_are_passed_as_raw_bson_byte_for_byte():
    raw = RawBSONDocument(bson.encode({"a": {"$odd": 1}, "b": 2**40}))
    update = update_from_description({"updatedFields": raw, "removedFields": [], "truncatedArrays": []})
    assert update["$set"] is raw


@pytest.mark.parametrize("description", [
    # MongoDB 6.1+: a listed path holds a dotted or numeric field name.
    _description({"a.1": 5}, disambiguated={"a.1": ["a", "1"]}),
    # Without disambiguatedPaths a dotted path could be a field whose name holds a dot.
    _description({"a.b": 5}),
    _description(removed=["a.b"]),
    _description(truncated=[{"field": "a.arr", "newSize": 1}]),
    # $-prefixed components would be read as operators ($, $[]); empty ones are no field at all.
    _description({"a.$": 1}, disambiguated={}),
    _description({"$x": 1}, disambiguated={}),
    _description({"a..b": 1}, disambiguated={}),
    _description({"": 1}, disambiguated={}),
    # Malformed: missing parts, wrong types, a negative or non-integer size, a path truncated twice.
    {"updatedFields": {"a": 1}},
    {"updatedFields": [], "removedFields": []},
    _description(truncated=[{"field": "arr", "newSize": -1}], disambiguated={}),
    _description(truncated=[{"field": "arr", "newSize": True}], disambiguated={}),
    _description(truncated=[{"field": "arr", "newSize": 1}, {"field": "arr", "newSize": 2}], disambiguated={}),
    None,
], ids=lambda d: repr(d)[:60])
def test_a_description_that_is_not_exact_is_refused(description):
    assert update_from_description(description) is None


def test_dotted_and_numeric_paths_are_taken_when_the_server_says_nothing_is_ambiguous():
    update = update_from_description(_description({"a.b.0": 1, "arr.3": 2}, ["c.d"], disambiguated={}))
    assert update == SON([("$set", {"a.b.0": 1, "arr.3": 2}), ("$unset", SON([("c.d", "")]))])


def test_top_level_fields_are_exact_without_disambiguated_paths():
    # The document root is never an array, so "1" is a field name on any server.
    assert update_from_description(_description({"1": "x", "a": 2}, ["b"])) == SON(
        [("$set", {"1": "x", "a": 2}), ("$unset", SON([("b", "")]))])
