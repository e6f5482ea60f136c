"""inspect_source against real server processes: replica set, standalone, restricted user, hints."""

from __future__ import annotations

import json

import pytest

from atlas_migration.inspection import DeploymentHints, inspect_source
from atlas_migration.profile import SourceProfile
from devtools.mongo_servers import start_server

pytestmark = pytest.mark.integration


def seed_small(client) -> None:
    client.shop.orders.insert_many([{"_id": i, "total": i * 2} for i in range(50)])
    client.shop.orders.create_index("total", unique=True)
    client.shop.create_collection("log", capped=True, size=65536)
    client.shop.log.insert_one({"m": "x"})
    client.shop.create_collection("big_orders", viewOn="orders", pipeline=[{"$match": {"total": {"$gt": 10}}}])
    client.analytics["daily.rollups"].insert_one({"_id": 1})


def test_replica_set_source(source):
    with source.client() as client:
        seed_small(client)
        profile = inspect_source(client, conn_id="mongo_source", hosts=["127.0.0.1:1"])
    assert profile.topology == "replica_set" and profile.set_name
    assert profile.version and profile.version_tuple >= (4, 4)
    assert profile.oplog_readable is True and profile.oplog_window_hours is not None
    by_ns = {c.namespace: c for c in profile.collections}
    assert {"shop.orders", "shop.log", "shop.big_orders", "analytics.daily.rollups"} <= set(by_ns)
    assert not any(ns.split(".", 1)[0] in ("admin", "local", "config") for ns in by_ns)
    assert by_ns["shop.orders"].documents == 50 and by_ns["shop.orders"].size_bytes > 0
    assert {ix["name"] for ix in by_ns["shop.orders"].indexes} == {"_id_", "total_1"}
    assert by_ns["shop.log"].type == "capped" and by_ns["shop.big_orders"].type == "view"
    assert by_ns["shop.big_orders"].options["viewOn"] == "orders"
    # The profile travels through XCom: it must survive JSON.
    assert SourceProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile


def test_standalone_source_has_no_oplog(standalone):
    with standalone.client() as client:
        client.shop.orders.insert_one({"_id": 1})
        profile = inspect_source(client, conn_id="mongo_source", hosts=["127.0.0.1:1"])
    assert profile.topology == "standalone"
    assert profile.oplog_readable is False and "standalone" in profile.unknown["oplog_access"]


def test_declared_hints_win_over_detection(source):
    hints = DeploymentHints.merge({"source_managed_by": "detect", "source_hosting": "aws"},
                                  {"managed_by": "cloud_manager", "hosting": "compose"})
    assert hints == DeploymentHints(managed_by="cloud_manager", hosting="aws")
    with source.client() as client:
        profile = inspect_source(client, conn_id="s", hosts=["127.0.0.1:1"], hints=hints)
    assert profile.managed_by == "cloud_manager" and profile.hosting == "aws"
    assert profile.hosting_evidence == "declared by the operator"


@pytest.mark.parametrize(
    ("hosts", "hosting"),
    [(["c123.candidate.12.composedb.com:18764"], "compose"),
     (["ec2-3-1-2-3.eu-west-1.compute.amazonaws.com:27017"], "aws"),
     (["ip-10-0-0-5.ec2.internal:27017"], "other"),
     (["ip-10-0-0-5.eu-west-1.compute.internal:27017"], "aws")],
)
def test_hosting_from_host_names(source, hosts, hosting):
    # Hosting is read from the member list the server reports, falling back to the connection's hosts; a
    # one-node test server reports 127.0.0.1, so use the hosts of a profile without members.
    from atlas_migration.inspection import _read_hosting

    profile = SourceProfile(conn_id="s", hosts=hosts)
    _read_hosting(profile, DeploymentHints(), None)
    assert profile.hosting == hosting


def test_hosting_from_ec2_lookup(source):
    calls = []

    def lookup(hosts):
        calls.append(hosts)
        return "EC2 instance i-0abc in eu-west-1"

    with source.client() as client:
        profile = inspect_source(client, conn_id="s", hosts=["127.0.0.1:1"], aws_lookup=lookup)
    assert profile.hosting == "aws" and "i-0abc" in profile.hosting_evidence and calls


def test_bad_hint_value_is_refused():
    from atlas_migration.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="managed_by='puppet'"):
        DeploymentHints.merge({}, {"managed_by": "puppet"})


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    server = start_server(
        tmp_path_factory.mktemp("auth"),
        users=[
            {"user": "root", "pwd": "r00t-Secret!", "roles": ["root"]},
            {"user": "reader", "pwd": "rd:p@ss/w0rd", "roles": [{"role": "read", "db": "shop"}]},
        ],
    )
    import pymongo

    with pymongo.MongoClient(server.uri_for("root", "r00t-Secret!")) as client:
        seed_small(client)
        client.secret_db.things.insert_one({"_id": 1})
    yield server
    server.destroy()


def test_restricted_user_records_unknowns_instead_of_crashing(auth_server):
    import pymongo

    with pymongo.MongoClient(auth_server.uri_for("reader", "rd:p@ss/w0rd")) as client:
        profile = inspect_source(client, conn_id="mongo_source", hosts=[auth_server.host])
    assert profile.version  # buildInfo is open to every user
    assert profile.oplog_readable is False and "change stream" in profile.unknown["oplog_access"]
    assert "fcv" in profile.unknown and profile.fcv is None
    # The user sees the database it may read, and nothing else.
    assert {c.db for c in profile.collections} == {"shop"}
    assert "shop.orders" in {c.namespace for c in profile.collections}
    summary = "\n".join(profile.summary_lines())
    assert "unknown (" in summary and "rd:p@ss/w0rd" not in json.dumps(profile.to_dict())


def create_refused_names(client) -> bool:
    """``shop.a/../escape`` (mongod accepts it, pymongo refuses '..'), and, where the server accepts it, a
    database ``bad db`` (pymongo refuses the space). Both are made with commands that take names as strings.
    Returns whether the server accepted the database."""
    from pymongo.errors import OperationFailure

    client.shop.command("create", "a/../escape")
    client.shop.command("insert", "a/../escape", documents=[{"_id": 1}])
    client.shop.command("create", "to_move")
    try:
        client.admin.command("renameCollection", "shop.to_move", to="bad db.c")
        return True
    except OperationFailure:  # mongod refuses a space in a database name
        client.shop.drop_collection("to_move")
        return False


def remove_refused_database(client, created: bool) -> None:
    """The fixtures' clean-up cannot drop a database the driver refuses: move its one collection out."""
    if created:
        client.admin.command("renameCollection", "bad db.c", to="shop.moved_out")


def test_names_the_driver_refuses_are_listed_by_name(source):
    from atlas_migration.errors import ConfigurationError
    from atlas_migration.namespaces import NamespaceFilter
    from atlas_migration.planning import build_copy_plan

    with source.client() as client:
        client.shop.orders.insert_one({"_id": 1})
        bad_db = create_refused_names(client)
        try:
            profile = inspect_source(client, conn_id="mongo_source", hosts=["127.0.0.1:1"])
        finally:
            remove_refused_database(client, bad_db)
    refused = {(r["db"], r["collection"]): r["reason"] for r in profile.refused_names}
    assert "'..'" in refused[("shop", "a/../escape")]
    assert ("bad db", None) in refused if bad_db else len(refused) == 1
    assert [c.namespace for c in profile.collections] == ["shop.orders"]
    with pytest.raises(ConfigurationError) as error:
        build_copy_plan(profile, NamespaceFilter())
    message = str(error.value)
    assert "namespace 'shop.a/../escape' (the driver refuses the collection name" in message
    assert "Nothing was written" in message and "'shop.a/../escape'" in message.rsplit("exclude_namespaces", 1)[1]
    if bad_db:
        assert "database 'bad db' (the driver refuses the database name: database names cannot contain the " \
               "character ' ')" in message and "'bad db.*'" in message
    # Excluded (or not included), they are skipped and named in the plan.
    plan = build_copy_plan(profile, NamespaceFilter.from_patterns([], ["shop.a/../escape", "bad db.*"]))
    assert [i.namespace for i in plan.collections] == ["shop.orders"]
    assert any("a/../escape" in line for line in plan.describe())
    assert build_copy_plan(profile, NamespaceFilter.from_patterns(["shop.orders"], [])).collections
