"""The aws_replica_set strategy through the real DAG: moto in server mode holds the source's EC2 instance
(private IP 127.0.0.1, the test server), VPC, route table and security group; the Atlas stand-in runs as
a subprocess and plays its peers against the same moto. Routing picks the strategy by itself (the EC2
lookup finds the source), the network is prepared, the live pull copies, validation passes, and no AWS or
Atlas secret reaches the log or XCom."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import boto3
import pytest

from devtools.airflow_env import REPO, conn_env_name
from tests.dags.test_mongo_to_atlas import airflow_home, conns, failure_text  # noqa: F401 - shared fixture
from tests.helpers import assert_namespaces_identical, peerings_into, user_namespaces, write_blocking_source

pytestmark = pytest.mark.integration
DAG_ID = "mongo_to_atlas"
REGION = "eu-west-1"
AWS_SECRET = "moto-secret-key-dag"
ATLAS_PUBLIC, ATLAS_PRIVATE = "dagpublic", "dag-private-key-5f2c"
ATLAS_CIDR = "192.168.248.0/21"


@pytest.fixture
def ec2(moto_endpoint):
    return boto3.client("ec2", endpoint_url=moto_endpoint, region_name=REGION, aws_access_key_id="AKIADAGTEST",
                        aws_secret_access_key=AWS_SECRET)


@pytest.fixture
def source_on_ec2(ec2, source):
    vpc = ec2.create_vpc(CidrBlock="127.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="127.0.0.0/24")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName=f"mongo-{vpc}", Description="mongod", VpcId=vpc)["GroupId"]
    instance = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=subnet,
                                 PrivateIpAddress="127.0.0.1", SecurityGroupIds=[group])["Instances"][0]
    yield {"vpc": vpc, "group": group}
    ec2.terminate_instances(InstanceIds=[instance["InstanceId"]])


def _stand_in(tmp_path, moto_endpoint: str, region: str):
    scenario = {"speed": 1.0, "peer_initiating_seconds": 1.0, "peer_finalizing_seconds": 1.0,
                "aws_endpoint_url": moto_endpoint, "clusters": [{"name": "c0", "region_name": region}]}
    (tmp_path / "scenario.json").write_text(json.dumps(scenario))
    process = subprocess.Popen(
        [sys.executable, "-m", "devtools.atlas_api_server", "--port", "0", "--scenario", str(tmp_path / "scenario.json"),
         "--api-key", f"{ATLAS_PUBLIC}:{ATLAS_PRIVATE}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    line = process.stdout.readline()
    assert "listening on" in line, line
    return process, line.split("listening on", 1)[1].strip()


def _env(source_uri: str, target_uri: str, moto_endpoint: str, atlas_url: str) -> dict[str, str]:
    from devtools.atlas_api_server import Scenario

    defaults = Scenario()
    aws = {"conn_type": "aws", "login": "AKIADAGTEST", "password": AWS_SECRET,
           "extra": {"endpoint_url": moto_endpoint, "region_name": REGION}}
    atlas = {"conn_type": "mongodb_atlas", "host": atlas_url, "login": ATLAS_PUBLIC, "password": ATLAS_PRIVATE,
             "extra": {"org_id": defaults.atlas_org_id, "project_id": defaults.atlas_project_id}}
    return {**conns(source_uri, target_uri), conn_env_name("aws_test"): json.dumps(aws),
            conn_env_name("atlas_api"): json.dumps(atlas), "MIGRATION_POKE_INTERVAL_SECONDS": "1"}


CONF = {"strategy": "auto", "aws_conn_id": "aws_test", "target_cluster_name": "c0", "pull_engine": "native",
        "cutover": "auto", "quiet_period_seconds": 2, "atlas_cidr_block": ATLAS_CIDR, "validation_mode": "full"}


def atlas_project_state(url: str) -> dict[str, list]:
    """The stand-in's containers, peers and access list of the project, read through the API."""
    import requests
    from requests.auth import HTTPDigestAuth

    from devtools.atlas_api_server import Scenario

    project, state = Scenario().atlas_project_id, {}
    for what in ("containers", "peers", "accessList"):
        reply = requests.get(f"{url}/api/atlas/v2/groups/{project}/{what}", timeout=10,
                             params={"providerName": "AWS"} if what != "accessList" else None,
                             auth=HTTPDigestAuth(ATLAS_PUBLIC, ATLAS_PRIVATE),
                             headers={"Accept": "application/vnd.atlas.2023-01-01+json"})
        reply.raise_for_status()
        state[what] = reply.json()["results"]
    return state


def _xcom_text(home) -> str:
    with sqlite3.connect(home.path / "airflow.db") as db:
        return "\n".join(str(row[0]) for row in db.execute("SELECT value FROM xcom"))


def test_aws_group_prepares_the_network_and_pulls(airflow_home, source, target, ec2, source_on_ec2,  # noqa: F811
                                                  moto_endpoint, tmp_path):
    with source.client() as src:
        src.shop.orders.insert_many([{"_id": i, "total": i % 50} for i in range(500)])
        src.shop.orders.create_index("total")
    process, url = _stand_in(tmp_path, moto_endpoint, "EU_WEST_1")
    try:
        # cutover=auto blocks writes on the source at the fence: the test server needs the proxy for that.
        with write_blocking_source(source) as source_uri:
            run = airflow_home.dags_test(DAG_ID, {**CONF, "network_teardown": True, "source_write_block": "require"},
                                         env=_env(source_uri, target.uri, moto_endpoint, url))
        atlas_after = atlas_project_state(url)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert run.succeeded, failure_text(run)
    assert "user writes are now BLOCKED on the source" in run.output
    assert "strategy: aws_replica_set (chosen automatically; rule 'aws_replica_set')" in run.output
    assert "member 127.0.0.1:" in run.output and "network: added aws_accept" in run.output
    # The DAG pulls: the source port was opened to the worker (this machine), never to the Atlas CIDR.
    assert "network: added sg_rule cidr=127.0.0.1/32" in run.output
    assert f"sg_rule cidr={ATLAS_CIDR}" not in run.output and "Atlas connects to nothing" in run.output
    # The teardown left the VPC and the Atlas project as they were before the run.
    assert "network teardown: removed access_list cidr=127.0.0.1/32" in run.output
    assert atlas_after == {"containers": [], "peers": [], "accessList": []}, atlas_after
    peering = peerings_into(ec2, source_on_ec2["vpc"])
    assert [p["Status"]["Code"] for p in peering] == ["deleted"]
    group = ec2.describe_security_groups(GroupIds=[source_on_ec2["group"]])["SecurityGroups"][0]
    assert group["IpPermissions"] == []
    tables = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [source_on_ec2["vpc"]]}])["RouteTables"]
    assert not any(r.get("DestinationCidrBlock") == ATLAS_CIDR for t in tables for r in t["Routes"])
    with source.client() as src, target.client() as dst:
        assert_namespaces_identical(src, dst, user_namespaces(src))
    xcoms = _xcom_text(airflow_home)
    for secret in (AWS_SECRET, ATLAS_PRIVATE):
        assert secret not in run.output and secret not in xcoms


def test_wrong_region_fails_before_any_network_change(airflow_home, source, target, ec2, source_on_ec2,  # noqa: F811
                                                      moto_endpoint, tmp_path):
    with source.client() as src:
        src.shop.orders.insert_one({"_id": 1})
    def peerings() -> set[str]:
        # moto keeps state for the whole session: compare with what existed before this run.
        return {p["VpcPeeringConnectionId"] for p in peerings_into(ec2, source_on_ec2["vpc"])}

    before = peerings()
    process, url = _stand_in(tmp_path, moto_endpoint, "US_EAST_1")
    try:
        run = airflow_home.dags_test(DAG_ID, {**CONF, "strategy": "aws_replica_set"},
                                     env=_env(source.uri, target.uri, moto_endpoint, url))
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert run.state == "failed", failure_text(run)
    assert "runs in AWS region eu-west-1 (EU_WEST_1) but Atlas cluster 'c0' is in US_EAST_1" in run.output, failure_text(run)
    assert peerings() == before
