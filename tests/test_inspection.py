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


def test_a_window_of_seconds_is_not_taken_for_an_empty_oplog(source, monkeypatch):
    """A server started a moment ago has an oplog spanning a second or two: the window is that, not 0.0
    (rounding it to 0.001 h once made a live pull refuse a fresh source as 'unknown or empty')."""
    from atlas_migration import inspection

    monkeypatch.setattr(inspection, "read_oplog_span", lambda client: inspection.OplogSpan(1.0 / 3600, True))
    with source.client() as client:
        profile = inspect_source(client, conn_id="mongo_source", hosts=["127.0.0.1:1"])
    assert profile.oplog_window_hours == pytest.approx(1.0 / 3600, rel=0.01)
    assert profile.oplog_since_initiation is True
    assert "its age: nothing dropped since the replica set was initiated" in "\n".join(profile.summary_lines())


def test_an_oplog_that_still_holds_its_initiation_entry_is_told_from_one_that_dropped_entries(tmp_path):
    """A fresh replica set's oplog starts with the no-op rs.initiate wrote: its span is its age, however
    short. Once the oplog has dropped entries (here past a 20-entry cap; the test server trims it every
    1,000 writes) the span is its window."""
    import pymongo

    from atlas_migration.inspection import read_oplog_span

    server = start_server(tmp_path / "small-oplog", oplog_max_entries=20)
    try:
        with pymongo.MongoClient(server.uri) as client:
            young = inspect_source(client, conn_id="mongo_source", hosts=["127.0.0.1:1"])
            client.shop.orders.insert_many([{"_id": i} for i in range(1_200)])
            full = read_oplog_span(client)
            profile = inspect_source(client, conn_id="mongo_source", hosts=["127.0.0.1:1"])
    finally:
        server.destroy()
    assert young.oplog_since_initiation is True and young.oplog_window_hours is not None
    assert full is not None and full.since_initiation is False
    assert profile.oplog_since_initiation is False and profile.oplog_window_hours == round(full.hours, 6)


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


@pytest.fixture
def mongos_source(source):
    """The mongos stand-in in front of the session ``source`` replica set (its one shard)."""
    if source.local is None:
        pytest.skip("the mongos stand-in needs the local test server behind it")
    from devtools.mongos_proxy import MongosProxy

    with MongosProxy(source.local.port) as proxy:
        yield proxy


def shard_connect_via(endpoint_uri: str):
    """What the DAG's inspect task passes: the source connection pointed at one shard, short timeout."""
    from atlas_migration.hooks.mongo import MongoEndpoint

    source = MongoEndpoint(conn_id="mongo_source", role="source", uri=endpoint_uri, client_options={},
                           hosts=["mongos"], secrets=[])

    def connect(set_name, hosts):
        return source.for_replica_set(set_name, hosts).connect(timeout_ms=1_500)

    return connect


def test_sharded_source_window_is_measured_on_its_shard(source, mongos_source):
    import pymongo

    from atlas_migration.inspection import read_oplog_window_hours

    with source.client() as direct:
        direct.shop.orders.insert_many([{"_id": i} for i in range(5)])
    with pymongo.MongoClient(f"mongodb://{mongos_source.host}/", serverSelectionTimeoutMS=10_000) as client:
        assert client.admin.command("listShards")["shards"] == [
            {"_id": "secantus", "host": f"secantus/{source.local.host}", "state": 1}]
        profile = inspect_source(client, conn_id="mongo_source", hosts=[mongos_source.host],
                                 shard_connect=shard_connect_via(f"mongodb://{mongos_source.host}"))
        with source.client() as direct:
            after = read_oplog_window_hours(direct)
        # The balancer commands behave as documented: stop -> off, start -> full, seen by balancerStatus.
        client.admin.command("balancerStop")
        stopped = inspect_source(client, conn_id="mongo_source", hosts=[mongos_source.host])
        client.admin.command("balancerStart")
        assert client.admin.command("balancerStatus")["mode"] == "full"
    assert profile.topology == "sharded" and profile.oplog_readable is True
    [shard] = profile.shard_oplogs
    assert (shard.name, shard.replica_set, shard.hosts, shard.reason) == ("secantus", "secantus", [source.local.host], "")
    # Read on the shard itself (the mongos refuses local): the same window a direct read gives, up to the
    # rounding to 3 decimals and the seconds between the two reads.
    assert shard.window_hours == pytest.approx(after, abs=0.002)
    assert profile.oplog_window_hours == shard.window_hours and "oplog_window_hours" not in profile.unknown
    assert any(n.endswith("the oplog window of the only shard, secantus") for n in profile.notes)
    assert profile.balancer == {"mode": "full", "in_balancer_round": False}
    assert profile.shard_keys == []  # the stand-in's shard has no sharding metadata: nothing is sharded
    assert "shop.orders" in {c.namespace for c in profile.collections}
    # Without a way to reach the shards, the window stays unknown and says which shard and why.
    assert stopped.balancer == {"mode": "off", "in_balancer_round": False}
    assert stopped.oplog_window_hours is None
    assert stopped.unknown["oplog_window_hours"] == ("not every shard's oplog window could be read: shard secantus: "
                                                      "no connection to the shards was given to inspection")


def test_an_unreachable_shard_leaves_the_window_unknown_naming_it(source, mongos_source):
    import pymongo

    from devtools.mongo_servers import free_port

    port = free_port()  # nothing listens there: the shard is down or not allow-listed

    def connect_elsewhere(set_name, hosts):
        return shard_connect_via(f"mongodb://{mongos_source.host}")(set_name, [f"127.0.0.1:{port}"])

    with pymongo.MongoClient(f"mongodb://{mongos_source.host}/", serverSelectionTimeoutMS=10_000) as client:
        profile = inspect_source(client, conn_id="mongo_source", hosts=[mongos_source.host],
                                 shard_connect=connect_elsewhere)
    assert profile.oplog_window_hours is None and profile.shard_oplogs[0].window_hours is None
    reason = profile.unknown["oplog_window_hours"]
    assert reason.startswith("not every shard's oplog window could be read: shard secantus: cannot connect to "
                             f"replica set secantus ({source.local.host}): cannot reach source 'mongo_source' at "
                             f"127.0.0.1:{port}"), reason


def test_a_retried_stop_balancer_still_owns_the_restart(source, mongos_source, monkeypatch):
    """A try killed between balancerStop and its XCom: the retry finds the balancer off but the run's marker
    (written before the stop) says this run stopped it, so the teardown restarts it and removes the marker.
    A balancer that was off before the run stays off."""
    import pymongo

    from atlas_migration.strategies.live_pull import RunMarker, restart_balancer, stop_balancer
    from devtools.airflow_env import conn_env_name, mongo_connection_json

    monkeypatch.setenv(conn_env_name("mongo_source"), mongo_connection_json(f"mongodb://{mongos_source.host}/"))
    store: dict[str, str] = {}
    marker = RunMarker("balancer-marker", lambda: store.get("m"), lambda v: store.__setitem__("m", v),
                       lambda: store.pop("m", None))

    class Killed(Exception):
        """The worker dies right after balancerStop."""

    import atlas_migration.strategies.live_pull as live_pull

    real_command = live_pull._balancer_command
    with pymongo.MongoClient(f"mongodb://{mongos_source.host}/", serverSelectionTimeoutMS=10_000) as client:
        assert client.admin.command("balancerStatus")["mode"] == "full"
        # Dies right after balancerStop, before the task's own clean-up could run (as a killed worker).
        monkeypatch.setattr(live_pull, "_balancer_command",
                            _stop_then_die(live_pull._balancer_command, Killed))
        with pytest.raises(Killed):
            stop_balancer({}, marker=marker)
        assert client.admin.command("balancerStatus")["mode"] == "off" and "m" in store
        monkeypatch.setattr(live_pull, "_balancer_command", real_command)
        retried = stop_balancer({}, marker=marker)
        assert retried["stopped_by_run"] is True and retried["mode_before"] == "full"
        assert restart_balancer({}, retried, marker=marker)["restarted"] is True
        assert client.admin.command("balancerStatus")["mode"] == "full" and store == {}
        # Off before the run, no marker: left off, and the teardown does nothing.
        client.admin.command("balancerStop")
        untouched = stop_balancer({}, marker=marker)
        assert untouched["stopped_by_run"] is False and store == {}
        assert restart_balancer({}, untouched, marker=marker)["restarted"] is False
        assert client.admin.command("balancerStatus")["mode"] == "off"
        client.admin.command("balancerStart")


def _stop_then_die(real, killed):
    """``_balancer_command`` that runs balancerStop and then dies, like a worker killed right after it."""

    def command(client, name, endpoint):
        reply = real(client, name, endpoint)
        if name == "balancerStop":
            raise killed()
        return reply

    return command
