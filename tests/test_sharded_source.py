"""Sharded sources, the pure part: listShards host strings, the smallest shard oplog window, the shard
addresses built from the source connection, the stop_balancer param and where the balancer tasks sit."""

from __future__ import annotations

import json

import pytest

from atlas_migration.hooks.mongo import MongoEndpoint
from atlas_migration.profile import (
    ShardOplog,
    SourceProfile,
    apply_shard_windows,
    parse_shard_host,
    smallest_shard_window,
)

SECRET = "s3cr:et/pw@x"


@pytest.mark.parametrize(
    ("host", "expected"),
    [("shard01/host1:27018,host2:27018,host3:27018", ("shard01", ["host1:27018", "host2:27018", "host3:27018"])),
     ("rs0/10.0.0.5:27017", ("rs0", ["10.0.0.5:27017"])),
     (" rs0/ a:1 , b:2 ", ("rs0", ["a:1", "b:2"])),
     ("localhost:1028", (None, ["localhost:1028"]))],
)
def test_parse_shard_host(host, expected):
    assert parse_shard_host(host) == expected


@pytest.mark.parametrize(
    ("host", "fragment"),
    [("", "empty"), ("   ", "empty"), ("/h:1", "empty replica-set name"), ("rs0/", "empty host"),
     ("rs0/a:1,,b:2", "empty host"), ("rs0/a:1/b", "more than one '/'")],
)
def test_malformed_shard_hosts_are_refused_by_name(host, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_shard_host(host)


def test_the_smallest_window_decides_and_names_its_shard():
    shards = [ShardOplog("s0", ["a:1"], "s0", 80.0), ShardOplog("s1", ["b:1"], "s1", 26.5),
              ShardOplog("s2", ["c:1"], "s2", 48.0)]
    assert smallest_shard_window(shards) == (26.5, "the smallest of 3 shard oplog windows, shard s1")
    assert smallest_shard_window(shards[:1]) == (80.0, "the oplog window of the only shard, s0")


def test_a_shard_whose_oplog_dropped_nothing_decides_only_when_every_shard_is_so():
    """A shard whose oldest oplog entry is its set's initiation has a span that is its age: the smallest
    span among the shards that have dropped entries is the cluster's window."""
    young = ShardOplog("s0", ["a:1"], "s0", 0.01, since_initiation=True)
    shards = [young, ShardOplog("s1", ["b:1"], "s1", 26.5), ShardOplog("s2", ["c:1"], "s2", 48.0)]
    assert smallest_shard_window(shards) == (
        26.5, "the smallest of 3 shard oplog windows, shard s1 (not counting s0, whose oplog has dropped "
              "nothing since its set was initiated)")
    profile = SourceProfile("mongo_source", ["mongos:1"], topology="sharded")
    apply_shard_windows(profile, shards)
    assert profile.oplog_window_hours == 26.5 and profile.oplog_since_initiation is False
    both = [young, ShardOplog("s1", ["b:1"], "s1", 0.02, since_initiation=True)]
    assert smallest_shard_window(both) == (0.01, "the smallest of 2 shard oplog windows, shard s0")
    apply_shard_windows(profile, both)
    assert profile.oplog_since_initiation is True


def test_one_unreadable_shard_leaves_the_window_unknown_naming_it():
    shards = [ShardOplog("s0", ["a:1"], "s0", 80.0),
              ShardOplog("s1", ["b:1"], "s1", reason="cannot connect to replica set s1 (b:1): timed out")]
    window, why = smallest_shard_window(shards)
    assert window is None and why == "shard s1: cannot connect to replica set s1 (b:1): timed out"
    assert smallest_shard_window([]) == (None, "listShards returned no shards")


def test_apply_shard_windows_builds_the_profile_fields_and_survives_json():
    profile = SourceProfile(conn_id="src", hosts=["mongos:27017"], topology="sharded", oplog_readable=True)
    apply_shard_windows(profile, [ShardOplog("s0", ["a:1", "b:1"], "s0", 30.0), ShardOplog("s1", ["c:1"], "s1", 12.25)])
    assert profile.oplog_window_hours == 12.25 and profile.shards == ["s0", "s1"]
    assert "oplog_window_hours" not in profile.unknown
    assert profile.notes == ["oplog window 12.2 h: the smallest of 2 shard oplog windows, shard s1"]
    summary = "\n".join(profile.summary_lines())
    assert "shard oplog       : s0 [s0/a:1,b:1]: 30.0 h" in summary and "(2 shards)" in summary
    assert SourceProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile

    unknown = SourceProfile(conn_id="src", hosts=["mongos:27017"], topology="sharded")
    apply_shard_windows(unknown, [ShardOplog("s0", ["a:1"], None, reason="not a replica set")])
    assert unknown.oplog_window_hours is None
    assert unknown.unknown["oplog_window_hours"] == ("not every shard's oplog window could be read: shard s0: "
                                                      "not a replica set")


def endpoint(uri: str, **options) -> MongoEndpoint:
    return MongoEndpoint(conn_id="mongo_source", role="source", uri=uri, client_options=options,
                         hosts=["mongos1:27017"], secrets=[SECRET])


def test_a_shard_endpoint_keeps_credentials_and_tls_and_replaces_only_hosts_and_replica_set():
    source = endpoint("mongodb://app:s3cr%3Aet%2Fpw%40x@mongos1:27017,mongos2:27017/admin", tls=True,
                      tlsCAFile="/ca.pem", authMechanism="SCRAM-SHA-256", directConnection=False, replicaSet="x")
    shard = source.for_replica_set("shard01", ["h1:27018", "h2:27018"])
    assert shard.uri == "mongodb://app:s3cr%3Aet%2Fpw%40x@h1:27018,h2:27018/admin"
    assert shard.client_options == {"tls": True, "tlsCAFile": "/ca.pem", "authMechanism": "SCRAM-SHA-256",
                                    "replicaSet": "shard01"}
    assert shard.hosts == ["h1:27018", "h2:27018"] and shard.secrets == [SECRET] and shard.conn_id == "mongo_source"
    assert SECRET not in shard.redact(f"failed for {SECRET}")
    # Options named in any case are replaced, not duplicated (pymongo would refuse two replica-set names).
    assert source.for_replica_set("s", ["h:1"]).client_options["replicaSet"] == "s"
    # No credentials, no path; a lone host outside a replica set is reached directly.
    bare = endpoint("mongodb://mongos1:27017").for_replica_set(None, ["h1:27018"])
    assert bare.uri == "mongodb://h1:27018" and bare.client_options == {"directConnection": True}


def test_an_srv_source_gives_plain_shard_addresses_with_tls_on():
    shard = endpoint("mongodb+srv://app:pw@cluster0.example.net/admin", authSource="admin").for_replica_set(
        "shard01", ["h1.example.net:27018"])
    assert shard.uri == "mongodb://app:pw@h1.example.net:27018/admin"
    assert shard.client_options == {"authSource": "admin", "tls": True, "replicaSet": "shard01"}
    explicit = endpoint("mongodb+srv://c.example.net", tls=False).for_replica_set("s", ["h:1"])
    assert explicit.client_options["tls"] is False


def test_stop_balancer_param():
    from atlas_migration.errors import ConfigurationError
    from atlas_migration.strategies.live_pull import LivePullParams, live_pull_params

    param = live_pull_params()["stop_balancer"]
    assert param.value is True and param.schema["type"] == "boolean"
    assert LivePullParams.parse({}).stop_balancer is True
    assert LivePullParams.parse({"stop_balancer": False}).stop_balancer is False
    with pytest.raises(ConfigurationError, match="stop_balancer must be true or false, got 'no'"):
        LivePullParams.parse({"stop_balancer": "no"})


def test_the_balancer_is_stopped_before_either_engine_and_restarted_by_a_teardown():
    from airflow.sdk import DAG

    from atlas_migration.strategies.live_pull import live_pull_group

    with DAG("balancer_wiring", schedule=None) as dag:
        live_pull_group({})
    tasks = dag.task_dict
    stop, restart = tasks["live_pull.stop_balancer"], tasks["live_pull.restart_balancer"]
    assert stop.is_setup and restart.is_teardown and restart.on_failure_fail_dagrun
    assert stop.downstream_task_ids >= {"live_pull.choose_pull_engine", "live_pull.restart_balancer"}
    assert restart.upstream_task_ids == {"live_pull.stop_balancer", "live_pull.cutover",
                                         "live_pull.mongosync_check_fence"}
    group = dag.task_group.children["live_pull"]
    assert [t.task_id for t in group.get_roots()] == ["live_pull.stop_balancer"]
    # What follows the group (validation) waits for the engines' last tasks, not for the teardown.
    assert {t.task_id for t in group.get_leaves()} == {"live_pull.cutover", "live_pull.mongosync_check_fence"}
