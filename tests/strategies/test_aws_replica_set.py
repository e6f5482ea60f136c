"""The AWS replica-set path's network steps: pure decisions, then moto in server mode (real HTTP) with the
Atlas stand-in in-thread, its peers played against the same moto (``aws_endpoint_url``): Atlas creates a
real pending VPC peering connection, the step accepts it in AWS, Atlas sees it and turns AVAILABLE."""

from __future__ import annotations

import json
import time

import boto3
import pytest

from atlas_migration.errors import ConfigurationError
from atlas_migration.hooks.atlas import AtlasAdminHook, RetryPolicy
from atlas_migration.network import (
    AtlasProject,
    MemoryStateStore,
    NetworkError,
    PeeringFailed,
    StepReport,
    accept_peering,
    atlas_region,
    check_same_region,
    cluster_regions,
    discover_placement,
    ensure_access_list,
    ensure_container,
    ensure_peer,
    ensure_routes,
    ensure_security_group_rules,
    peer_failure,
    state_key,
    teardown,
)
from atlas_migration.strategies.aws_replica_set import AwsParams
from devtools.atlas_api_server import AtlasApiServer, ClusterSpec, Scenario
from tests.helpers import peerings_into

REGION = "eu-west-1"
ATLAS_CIDR = "192.168.248.0/21"
WORKER = "127.0.0.1/32"  # the pulling worker: the test machine
TAG = "atlas-migration mongo_to_atlas/manual__test"


# ---------------------------------------------------------------- pure


def test_region_names_and_same_region_check() -> None:
    assert atlas_region("eu-west-1") == "EU_WEST_1"
    cluster = {"replicationSpecs": [{"regionConfigs": [{"providerName": "AWS", "regionName": "US_EAST_1"}]}]}
    assert cluster_regions(cluster) == ["US_EAST_1"]
    assert check_same_region("us-east-1", "c0", cluster) == "US_EAST_1"
    with pytest.raises(NetworkError, match=r"eu-west-1 \(EU_WEST_1\) but Atlas cluster 'c0' is in US_EAST_1"):
        check_same_region("eu-west-1", "c0", cluster)


def test_params_refuse_what_cannot_work() -> None:
    base = {"aws_conn_id": "aws", "target_cluster_name": "c0"}
    assert AwsParams.parse(base).prepare and AwsParams.parse(base).atlas_cidr == ATLAS_CIDR
    with pytest.raises(ConfigurationError, match="needs aws_conn_id"):
        AwsParams.parse({"target_cluster_name": "c0"})
    with pytest.raises(ConfigurationError, match="target_cluster_name"):
        AwsParams.parse({"aws_conn_id": "aws"})
    with pytest.raises(ConfigurationError, match="network_mode"):
        AwsParams.parse({**base, "network_mode": "maybe"})
    with pytest.raises(ConfigurationError, match="private"):
        AwsParams.parse({**base, "atlas_cidr_block": "8.8.0.0/21"})


def test_peer_failure_message_says_what_to_check() -> None:
    error = peer_failure({"id": "p1", "connectionId": "pcx-1", "vpcId": "vpc-1", "statusName": "FAILED",
                          "errorStateName": "REJECTED", "awsAccountId": "123456789012"})
    assert isinstance(error, PeeringFailed)
    assert "FAILED (errorStateName REJECTED)" in str(error) and "123456789012" in str(error)


# ---------------------------------------------------------------- moto + the Atlas stand-in


@pytest.fixture
def ec2(moto_endpoint):
    return boto3.client("ec2", endpoint_url=moto_endpoint, region_name=REGION, aws_access_key_id="AKIATESTKEY",
                        aws_secret_access_key="moto-secret-key")


@pytest.fixture
def source_vpc(ec2) -> dict:
    """A VPC 127.0.0.0/16 with a subnet, a security group and one instance at 127.0.0.1 (the test server)."""
    vpc = ec2.create_vpc(CidrBlock="127.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="127.0.0.0/24")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName=f"mongo-{vpc}", Description="mongod", VpcId=vpc)["GroupId"]
    instance = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=subnet,
                                 PrivateIpAddress="127.0.0.1", SecurityGroupIds=[group])["Instances"][0]
    yield {"vpc": vpc, "subnet": subnet, "group": group, "instance": instance["InstanceId"]}
    ec2.terminate_instances(InstanceIds=[instance["InstanceId"]])


@pytest.fixture
def atlas(moto_endpoint, monkeypatch):
    scenario = Scenario(speed=1.0, peer_initiating_seconds=0.0, peer_finalizing_seconds=0.0,
                        clusters=[ClusterSpec(name="c0", region_name="EU_WEST_1")], aws_endpoint_url=moto_endpoint)
    with AtlasApiServer(scenario) as server:
        public, private = next(iter(scenario.api_keys.items()))
        monkeypatch.setenv("AIRFLOW_CONN_ATLAS_NET", json.dumps({
            "conn_type": "mongodb_atlas", "host": server.url, "login": public, "password": private,
            "extra": {"org_id": scenario.atlas_org_id, "project_id": scenario.atlas_project_id}}))
        yield server, AtlasProject(AtlasAdminHook("atlas_net", retry=RetryPolicy(max_retries=1)))


def _prepare(ec2, project: AtlasProject, store: MemoryStateStore, members: list[str]) -> tuple[StepReport, str]:
    """The whole preparation as the group runs it (request, accept, configure, wait)."""
    report = StepReport()
    placement = discover_placement(ec2, members, REGION)
    region = check_same_region(placement.region, "c0", project.get_cluster("c0"))
    container = ensure_container(project, region, ATLAS_CIDR, report)
    peer = ensure_peer(project, store, state_key(project.group_id, placement.vpc_id), placement, container, report)
    deadline = time.monotonic() + 20
    while not (peer := project.get_peering_connection(peer["id"])).get("connectionId"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    accept_peering(ec2, peer["connectionId"], report)
    ensure_routes(ec2, placement.route_table_ids, ATLAS_CIDR, peer["connectionId"], report)
    ensure_security_group_rules(ec2, placement.security_group_ids, placement.ports, WORKER, report, TAG)
    ensure_access_list(project, WORKER, TAG, report)
    while (peer := project.get_peering_connection(peer["id"]))["statusName"] != "AVAILABLE":
        assert peer["statusName"] in ("PENDING_ACCEPTANCE", "FINALIZING"), peer
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return report, peer["connectionId"]


def test_prepare_is_idempotent_and_teardown_removes_only_its_own(ec2, source_vpc, atlas) -> None:
    server, project = atlas
    store = MemoryStateStore()
    first, pcx = _prepare(ec2, project, store, ["127.0.0.1:27017"])
    assert [c.kind for c in first.added] == ["container", "peering", "aws_accept", "route", "sg_rule", "access_list"]
    # The worker pulls: the members' port is open to it, never to the Atlas CIDR; Atlas lists the worker.
    group = ec2.describe_security_groups(GroupIds=[source_vpc["group"]])["SecurityGroups"][0]
    assert [r["CidrIp"] for p in group["IpPermissions"] for r in p["IpRanges"]] == [WORKER]
    assert [e["cidrBlock"] for e in project.list_access_list()] == [WORKER]
    assert ec2.describe_vpc_peering_connections(VpcPeeringConnectionIds=[pcx])["VpcPeeringConnections"][0][
        "Status"]["Code"] == "active"
    tables = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [source_vpc["vpc"]]}])["RouteTables"]
    assert any(r.get("DestinationCidrBlock") == ATLAS_CIDR and r.get("VpcPeeringConnectionId") == pcx
               for t in tables for r in t["Routes"])

    calls_before = len(server.requests(method="POST"))
    second, pcx_again = _prepare(ec2, project, store, ["127.0.0.1:27017"])
    assert second.added == [] and pcx_again == pcx
    assert len(second.in_place) == 6, second.in_place
    assert len(server.requests(method="POST")) == calls_before  # nothing created in Atlas the second time

    # A rule somebody else added stays: teardown removes exactly what the first run added.
    ec2.authorize_security_group_ingress(GroupId=source_vpc["group"], IpPermissions=[{
        "IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}])
    removed = teardown(ec2, project, store, state_key(project.group_id, source_vpc["vpc"]), first.added)
    assert len(removed) == 6  # both sides: access list, sg rule, route, AWS peering, Atlas peering, container
    assert_as_before(ec2, project, source_vpc)
    assert store.values == {}


def assert_as_before(ec2, project: AtlasProject, source_vpc: dict) -> None:
    """The VPC and the Atlas project as they were before the run (apart from the test's own port-22 rule)."""
    from atlas_migration.hooks.atlas import AtlasApiError

    group = ec2.describe_security_groups(GroupIds=[source_vpc["group"]])["SecurityGroups"][0]
    assert [p["FromPort"] for p in group["IpPermissions"]] == [22]
    tables = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [source_vpc["vpc"]]}])["RouteTables"]
    assert not any(r.get("DestinationCidrBlock") == ATLAS_CIDR for t in tables for r in t["Routes"])
    pcxs = peerings_into(ec2, source_vpc["vpc"])
    assert all(p["Status"]["Code"] in ("deleted", "rejected") for p in pcxs), pcxs
    assert project.list_peering_connections() == []
    assert project.list_containers() == [] and project.list_access_list() == []
    with pytest.raises(AtlasApiError) as gone:
        project.delete_container("0" * 24)
    assert gone.value.status == 404


def test_teardown_after_a_crash_finds_the_run_s_changes_by_listing(ec2, source_vpc, atlas) -> None:
    from atlas_migration.network import find_run_changes

    server, project = atlas
    store = MemoryStateStore()
    first, _ = _prepare(ec2, project, store, ["127.0.0.1:27017"])
    ec2.authorize_security_group_ingress(GroupId=source_vpc["group"], IpPermissions=[{
        "IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}])
    project.add_access_list_entries([{"cidrBlock": "10.9.0.0/16", "comment": "someone else's"}])
    # configure_vpc "crashed": only the container and the peering request were recorded.
    recorded = first.added[:2]
    placement = discover_placement(ec2, ["127.0.0.1:27017"], REGION)
    listed = find_run_changes(ec2, project, placement, TAG, recorded[1].ids["peer_id"])
    assert sorted(c.kind for c in listed) == ["access_list", "aws_accept", "peering", "route", "sg_rule"]
    known = {c.describe() for c in recorded}
    teardown(ec2, project, store, state_key(project.group_id, source_vpc["vpc"]),
             recorded + [c for c in listed if c.describe() not in known])
    assert [e["cidrBlock"] for e in project.list_access_list()] == ["10.9.0.0/16"]  # not ours: kept
    project.delete_access_list_entry("10.9.0.0/16")
    assert_as_before(ec2, project, source_vpc)


def test_missing_instance_is_a_clear_error(ec2, source_vpc) -> None:
    with pytest.raises(NetworkError, match=r"no EC2 instance in region eu-west-1 matches replica-set member\(s\) "
                                           r"127\.0\.0\.99:27017"):
        discover_placement(ec2, ["127.0.0.1:27017", "127.0.0.99:27017"], REGION)


def test_a_rejected_peering_is_reported_failed(ec2, source_vpc, atlas) -> None:
    server, project = atlas
    report = StepReport()
    placement = discover_placement(ec2, ["127.0.0.1:27017"], REGION)
    container = ensure_container(project, "EU_WEST_1", ATLAS_CIDR, report)
    peer = ensure_peer(project, MemoryStateStore(), "k", placement, container, report)
    peer = project.get_peering_connection(peer["id"])
    ec2.reject_vpc_peering_connection(VpcPeeringConnectionId=peer["connectionId"])  # the AWS side says no
    peer = project.get_peering_connection(peer["id"])
    assert peer["statusName"] == "FAILED" and peer["errorStateName"] == "REJECTED"
    with pytest.raises(NetworkError, match="not pending-acceptance"):
        accept_peering(ec2, peer["connectionId"], StepReport())


def test_a_rehearsal_never_prepares_the_network() -> None:
    base = {"aws_conn_id": "aws", "target_cluster_name": "c0", "network_mode": "prepare", "network_teardown": True}
    rehearsal = AwsParams.parse({**base, "rehearsal_db_prefix": "rehearsal__"})
    assert rehearsal.rehearsal and not rehearsal.prepare


def test_network_dry_run_reads_and_changes_nothing(ec2, source_vpc, atlas) -> None:
    from atlas_migration.strategies.aws_replica_set import network_dry_run

    server, project = atlas
    placement = discover_placement(ec2, ["127.0.0.1:27017"], REGION)
    group_before = ec2.describe_security_groups(GroupIds=[source_vpc["group"]])["SecurityGroups"][0]
    ap = AwsParams.parse({"aws_conn_id": "aws_test", "target_cluster_name": "c0", "atlas_conn_id": "atlas_net",
                          "rehearsal_db_prefix": "rehearsal__", "rehearsal_network_dry_run": True})
    planned = network_dry_run(ap, {"placement": placement.to_dict(), "atlas_region": "EU_WEST_1",
                                   "worker_cidrs": [WORKER]},
                              store=MemoryStateStore(), ec2=ec2)
    kinds = [line.split()[0] for line in planned["would_add"]]
    assert kinds == ["container", "peering", "route", "sg_rule", "access_list"], planned
    assert planned["calls_not_made"] == ["atlas.create_container", "atlas.create_peering_connection",
                                         "ec2.create_route", "ec2.authorize_security_group_ingress",
                                         "atlas.add_access_list_entries"]
    assert project.list_containers() == [] and project.list_access_list() == []
    assert ec2.describe_security_groups(GroupIds=[source_vpc["group"]])["SecurityGroups"][0] == group_before


def test_worker_addresses_and_who_connects_to_whom(ec2, source_vpc) -> None:
    from atlas_migration.network import connection_plan, worker_cidrs

    assert worker_cidrs([], ["127.0.0.1:27017"]) == [WORKER]  # the address this machine reaches the member from
    assert worker_cidrs(["10.1.2.3", "10.9.0.0/16"], ["127.0.0.1:1"]) == ["10.1.2.3/32", "10.9.0.0/16"]
    with pytest.raises(ConfigurationError, match="worker_cidrs"):
        worker_cidrs(["not-an-address"], ["127.0.0.1:1"])
    placement = discover_placement(ec2, ["127.0.0.1:27017"], REGION)
    plan = connection_plan(placement, [WORKER], ATLAS_CIDR, "c0")
    assert f"worker(s) ({WORKER}) connect to the source members 127.0.0.1:27017" in plan[0]
    assert source_vpc["group"] in plan[0] and "Atlas cluster 'c0'" in plan[1]
    assert plan[2].startswith("Atlas connects to nothing")
