"""mongo_to_atlas_rehearsal, run for real: scratch databases only, history and trend, teardown always."""

from __future__ import annotations

import json

import pytest

from devtools.sample_data import seed_sample_dataset
from tests.dags.test_aws_replica_set import ec2, source_on_ec2  # noqa: F401 - shared fixtures
from tests.dags.test_mongo_to_atlas import airflow_home, conns, failure_text  # noqa: F401 - shared fixture
from tests.helpers import user_namespaces

pytestmark = pytest.mark.integration
DAG_ID = "mongo_to_atlas_rehearsal"


def history(home) -> list[dict]:
    path = home.path / "migration-work" / DAG_ID / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_rehearsal_never_touches_real_namespaces_and_records_a_trend(airflow_home, standalone, target):  # noqa: F811
    with standalone.client() as src:
        seed_sample_dataset(src, scale=0.01)
    with target.client() as dst:
        dst.shop.orders.insert_one({"_id": "real-target-document"})
        dst["rehearsal__leftover"].junk.insert_one({"_id": 1})  # from a crashed earlier rehearsal...
        dst["__atlas_migration"].rehearsal_scratch.insert_one({"_id": "rehearsal__leftover", "prefix": "rehearsal__"})
        # ...and a real database that merely starts with the prefix: no rehearsal created it, none may drop it.
        dst["rehearsal__app_prod"].accounts.insert_one({"_id": "real"})
        real_before = user_namespaces(dst)
    before = len(history(airflow_home))
    env = conns(standalone.uri, target.uri)
    for _ in range(2):
        run = airflow_home.dags_test(DAG_ID, {"validation_mode": "full"}, env=env)
        assert run.succeeded, failure_text(run)
    assert "dropped 4 scratch database(s)" in run.output or "dropped 3 scratch database(s)" in run.output
    with target.client() as dst:
        # The real namespace is untouched and every scratch database is gone again.
        assert list(dst.shop.orders.find()) == [{"_id": "real-target-document"}]
        assert user_namespaces(dst) == [ns for ns in real_before if ns[0] == "rehearsal__app_prod"
                                        or not ns[0].startswith("rehearsal__")]
        assert [d for d in dst.list_database_names() if d.startswith("rehearsal__")] == ["rehearsal__app_prod"]
        assert list(dst["rehearsal__app_prod"].accounts.find()) == [{"_id": "real"}]
        assert dst["__atlas_migration"].rehearsal_scratch.count_documents({}) == 0
    assert "kept (not created by a rehearsal): rehearsal__app_prod" in run.output
    entries = history(airflow_home)[before:]
    assert [e["status"] for e in entries] == ["success", "success"]
    for entry in entries:
        assert entry["documents"] == 1_000 and entry["namespaces"] == 9 and entry["mismatches"] == []
        assert entry["copy_seconds"] > 0 and entry["validate_seconds"] is not None and entry["docs_per_second"] > 0
    trend = (airflow_home.path / "migration-work" / DAG_ID / "trend.md").read_text()
    assert entries[-1]["run_id"] in trend and "against the one before" in trend


def test_failed_rehearsal_is_recorded_and_cleaned_up(airflow_home, standalone, target):  # noqa: F811
    with standalone.client() as src:
        src.shop.orders.insert_many([{"_id": i} for i in range(10)])
    with target.client() as dst:
        dst["rehearsal__shop"].orders.insert_one({"_id": "leftover"})  # left by an earlier rehearsal
        dst["__atlas_migration"].rehearsal_scratch.insert_one({"_id": "rehearsal__shop", "prefix": "rehearsal__"})
    run = airflow_home.dags_test(DAG_ID, {"strategy": "live_pull"}, env=conns(standalone.uri, target.uri))
    assert run.state == "failed", failure_text(run)
    entry = history(airflow_home)[-1]
    assert entry["status"] == "failed" and "did not reach validation" in entry["failure"]
    with target.client() as dst:
        assert not [d for d in dst.list_database_names() if d.startswith("rehearsal__")]


def test_bad_prefix_is_refused_before_writing(airflow_home, standalone, target):  # noqa: F811
    with standalone.client() as src:
        src.shop.orders.insert_one({"_id": 1})
    run = airflow_home.dags_test(DAG_ID, {"rehearsal_db_prefix": ""}, env=conns(standalone.uri, target.uri))
    # Refused by the param's schema when the run is created: no task ran at all.
    assert run.returncode != 0 and run.state is None
    assert "rehearsal_db_prefix" in run.output and "does not match" in run.output
    with target.client() as dst:
        assert user_namespaces(dst) == []


def test_rehearsal_of_an_aws_source_touches_no_network_no_source_writes_no_mongosync(
        airflow_home, source, target, ec2, source_on_ec2, moto_endpoint, tmp_path):  # noqa: F811
    """strategy=auto routes this source to aws_replica_set with network_mode=prepare and network_teardown on,
    cutover=auto with source_write_block=require and a mongosync connection defined: a real migration would
    peer the VPC, open the security group, block writes on the source and drive mongosync. The rehearsal
    does none of it and copies into scratch databases only."""
    import pymongo
    import requests
    from requests.auth import HTTPDigestAuth

    from devtools.airflow_env import conn_env_name
    from devtools.atlas_api_server import Scenario
    from tests.dags.test_aws_replica_set import ATLAS_PRIVATE, ATLAS_PUBLIC, CONF, _env, _stand_in
    from tests.dags.test_live_pull import write_blocking_source

    with source.client() as src:
        src.shop.orders.insert_many([{"_id": i} for i in range(200)])
    group = ec2.describe_security_groups(GroupIds=[source_on_ec2["group"]])["SecurityGroups"][0]
    tables = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [source_on_ec2["vpc"]]}])["RouteTables"]
    peerings = ec2.describe_vpc_peering_connections()["VpcPeeringConnections"]
    process, url = _stand_in(tmp_path, moto_endpoint, "EU_WEST_1")
    try:
        with write_blocking_source(source) as source_uri:
            env = {**_env(source_uri, target.uri, moto_endpoint, url),
                   conn_env_name("mongosync_api"): json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": 9})}
            conf = {**CONF, "pull_engine": "auto", "network_teardown": True, "source_write_block": "require"}
            run = airflow_home.dags_test(DAG_ID, conf, env=env)
            with pymongo.MongoClient(source_uri, serverSelectionTimeoutMS=10_000) as via_proxy:
                # Writes were never blocked on the source (1 = off): a write still goes through.
                assert via_proxy.admin.command("serverStatus")["repl"]["userWriteBlockMode"] == 1
                via_proxy.shop.after_rehearsal.insert_one({"_id": 1})
        project = Scenario().atlas_project_id
        seen = {}
        for what in ("containers?providerName=AWS", "accessList", "peers?providerName=AWS"):
            reply = requests.get(f"{url}/api/atlas/v2/groups/{project}/{what}", timeout=10,
                                 auth=HTTPDigestAuth(ATLAS_PUBLIC, ATLAS_PRIVATE),
                                 headers={"Accept": "application/vnd.atlas.2023-01-01+json"})
            seen[what] = reply.json().get("results") if reply.status_code == 200 else reply.status_code
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert run.succeeded, failure_text(run)
    assert "strategy: aws_replica_set (chosen automatically; rule 'aws_replica_set')" in run.output
    assert "rehearsal: no network preparation" in run.output and "network: added" not in run.output
    assert "a rehearsal never blocks writes on the source" in run.output
    assert "change stream resume point recorded" in run.output  # the native engine, not mongosync
    assert seen["containers?providerName=AWS"] == [] and seen["accessList"] == [], seen
    assert ec2.describe_security_groups(GroupIds=[source_on_ec2["group"]])["SecurityGroups"][0] == group
    assert ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [source_on_ec2["vpc"]]}])["RouteTables"] == tables
    assert ec2.describe_vpc_peering_connections()["VpcPeeringConnections"] == peerings
    with target.client() as dst:
        assert not [d for d in dst.list_database_names() if d.startswith("rehearsal__") or d == "shop"]
