"""``source_dump_uri``: parsing, the inventory and validation snapshots built from a dump's files (no server).
The runs through the DAG are in tests/dags/test_source_dump.py."""

from __future__ import annotations

import pytest

from atlas_migration.engines.dump_layout import find_bson_file, iter_bson_file
from atlas_migration.errors import ConfigurationError
from atlas_migration.params import MigrationParams
from atlas_migration.source_dump import DumpReader, DumpSource, inventory, snapshot_from_dump
from atlas_migration.validation import multiset_digest

PEER = "mongodump-100.9.4/plain"
TS = "mongo-tools/mongorestore/testdata/timeseries_tests/ts_dump"


@pytest.mark.parametrize(("uri", "kind"), [("/data/dump", "folder"), ("s3://b/backups/x/", "s3"),
                                           ("/data/peer.archive", "folder")])
def test_source_dump_uri_forms(uri, kind):
    assert DumpSource.parse(uri).kind == kind


@pytest.mark.parametrize("uri", ["relative/dump", "s3://bucket", "s3://bucket/", "https://x/y", "s3:///k"])
def test_bad_source_dump_uris_are_refused_by_the_params(uri):
    with pytest.raises(ConfigurationError, match="source_dump_uri"):
        MigrationParams.parse({"source_dump_uri": uri})
    assert MigrationParams.parse({"source_dump_uri": "/abs/dump"}).source_dump_uri == "/abs/dump"


def test_a_missing_path_and_a_database_folder_are_refused(mongodump_fixtures, tmp_path):
    with pytest.raises(ConfigurationError, match="does not exist"):
        DumpReader(str(tmp_path / "nope"), tmp_path).root_for(None)
    with pytest.raises(ConfigurationError, match=r"collection files .* directly.*mongodump --out"):
        DumpReader(str(mongodump_fixtures / PEER / "peer"), tmp_path).root_for(None)


def test_inventory_from_real_mongodump_output(mongodump_fixtures, tmp_path):
    profile = inventory(DumpReader(str(mongodump_fixtures / PEER), tmp_path))
    by_name = {c.name: c for c in profile.collections}
    assert len(by_name) == 15 and profile.conn_id == "" and "no source server" in profile.notes[0]
    assert (by_name["capped_log"].type, by_name["fr_view"].type, by_name["sp ace"].type) == ("capped", "view", "collection")
    orders = sum(1 for _ in iter_bson_file(find_bson_file(mongodump_fixtures / PEER, "peer", "orders.2024")))
    assert by_name["orders.2024"].documents == orders == 300
    assert [ix["name"] for ix in by_name["orders.2024"].indexes][:2] == ["_id_", "i64_partial"]


def test_inventory_and_snapshot_of_a_time_series_count_measurements(mongodump_fixtures, tmp_path):
    root = mongodump_fixtures / TS
    profile = inventory(DumpReader(str(root), tmp_path))
    assert [(c.namespace, c.type, c.documents) for c in profile.collections] == [
        ("timeseries_test.foo_ts", "timeseries", 1000)]  # admin.* is never migrated
    snapshot = snapshot_from_dump(root, "timeseries_test", "foo_ts", "full")
    assert (snapshot.count, snapshot.digest, snapshot.type) == (1000, None, "timeseries")


def test_full_snapshot_digests_the_files(mongodump_fixtures):
    root = mongodump_fixtures / PEER
    snapshot = snapshot_from_dump(root, "peer", "c++", "full")
    assert (snapshot.count, snapshot.digest) == multiset_digest(iter_bson_file(find_bson_file(root, "peer", "c++")))
    view = snapshot_from_dump(root, "peer", "fr_view", "full")
    assert view.type == "view" and view.count is None and view.options["viewOn"] == "fr_coll"


def test_a_dump_runs_the_mongorestore_strategy_only():
    from atlas_migration import tasks

    decision = tasks._dump_decision(MigrationParams.parse({"source_dump_uri": "/d"}))
    assert (decision.strategy, decision.rule) == ("mongorestore", "source_dump_uri")
    with pytest.raises(ConfigurationError, match="strategy=live_pull cannot run from a dump"):
        tasks._dump_decision(MigrationParams.parse({"source_dump_uri": "/d", "strategy": "live_pull"}))
