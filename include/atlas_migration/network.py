"""Network preparation between an AWS VPC and an Atlas project: VPC peering, routes, security groups.

The real flow (Atlas docs, "Set up a Network Peering Connection"), one idempotent step each:

1. an Atlas network container for the region (``POST /groups/{id}/containers``, its ``atlasCidrBlock``);
2. the peering request from Atlas (``POST /groups/{id}/peers``): Atlas asks AWS for a VPC peering
   connection into the customer's VPC; once Atlas knows its id (``connectionId``, PENDING_ACCEPTANCE),
3. the customer accepts it in AWS (``ec2:AcceptVpcPeeringConnection``) and Atlas moves it through
   FINALIZING to AVAILABLE (or FAILED, with ``errorStateName``);
4. routes to the Atlas CIDR through the peering in the VPC's route tables;
5. the MongoDB port opened, in the members' security groups, to the Airflow workers that pull;
6. the workers' addresses in the Atlas project's IP access list.

Who connects to whom (``connection_plan``): the DAG pulls the data itself, so the worker connects to the
source members and to the Atlas cluster (over the peering when it runs in the source VPC); Atlas connects to
nothing, so the source's port is never opened to the Atlas CIDR.

Every ``ensure_*`` function looks first and changes nothing when the step is already in place; what it did
add is returned as ``NetworkChange`` records so that a teardown removes exactly that (and only that). The
Atlas peer id is kept in a small state document (``PeeringStateStore``: an Airflow Variable per project and
VPC) so that a second run finds and reuses it; ``find_run_changes`` finds what a run added again by listing
(its tag on rules and access-list entries, its peering in Atlas's list) when its records are lost.

AWS calls use the boto3 EC2 client of the Amazon provider's ``EC2Hook`` (``hook.conn``); Atlas calls use
``AtlasAdminHook``. Nothing here logs or returns a credential.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from atlas_migration.errors import ConfigurationError, MigrationError

log = logging.getLogger("atlas_migration")

PEER_OK_STATES = ("INITIATING", "PENDING_ACCEPTANCE", "FINALIZING", "AVAILABLE")
PEER_DEAD_STATES = ("FAILED", "TERMINATING")
STATE_VARIABLE_PREFIX = "atlas_migration_network"


class NetworkError(MigrationError):
    """A network step cannot be done (wrong region, instance not found, peering FAILED...)."""


class PeeringFailed(NetworkError):
    """Atlas reports the peering connection FAILED (e.g. rejected or deleted on the AWS side)."""


def atlas_region(aws_region: str) -> str:
    """``eu-west-1`` -> ``EU_WEST_1`` (Atlas spells AWS regions in upper case with underscores)."""
    return aws_region.strip().upper().replace("-", "_")


def aws_region(atlas_region_name: str) -> str:
    return atlas_region_name.strip().lower().replace("_", "-")


def cluster_regions(cluster: dict[str, Any]) -> list[str]:
    """AWS regions (Atlas spelling) of a cluster from ``get_cluster``: every regionConfig of every spec."""
    regions: list[str] = []
    for spec in cluster.get("replicationSpecs") or []:
        for config in spec.get("regionConfigs") or []:
            if config.get("providerName", "AWS") == "AWS" and config.get("regionName"):
                regions.append(config["regionName"])
    if not regions and cluster.get("providerSettings", {}).get("regionName"):  # older cluster documents
        regions.append(cluster["providerSettings"]["regionName"])
    return sorted(set(regions))


def check_same_region(source_region: str, cluster_name: str, cluster: dict[str, Any]) -> str:
    """The Atlas region to peer with; ``NetworkError`` when the cluster is not in the source's region."""
    wanted = atlas_region(source_region)
    regions = cluster_regions(cluster)
    if wanted not in regions:
        raise NetworkError(
            f"the source replica set runs in AWS region {source_region} ({wanted}) but Atlas cluster "
            f"'{cluster_name}' is in {', '.join(regions) or 'no AWS region'}: same-region VPC peering is not "
            f"possible. Create the Atlas cluster (or add electable nodes) in {wanted}, or migrate over public "
            "addresses with the live_pull strategy")
    return wanted


# ---------------------------------------------------------------- where the members run


@dataclass(frozen=True)
class MemberInstance:
    member: str  # host:port as the replica set names it
    instance_id: str
    private_ip: str
    subnet_id: str
    security_group_ids: tuple[str, ...]


@dataclass
class Placement:
    """Where the replica set runs in AWS: one VPC of one account and region."""

    region: str
    account_id: str
    vpc_id: str
    vpc_cidr: str
    members: list[MemberInstance]
    route_table_ids: list[str]
    ports: list[int]

    @property
    def security_group_ids(self) -> list[str]:
        return sorted({g for m in self.members for g in m.security_group_ids})

    @property
    def subnet_ids(self) -> list[str]:
        return sorted({m.subnet_id for m in self.members})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["security_group_ids"], data["subnet_ids"] = self.security_group_ids, self.subnet_ids
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Placement:
        members = [MemberInstance(**{**m, "security_group_ids": tuple(m["security_group_ids"])})
                   for m in data["members"]]
        return cls(region=data["region"], account_id=data["account_id"], vpc_id=data["vpc_id"],
                   vpc_cidr=data["vpc_cidr"], members=members, route_table_ids=list(data["route_table_ids"]),
                   ports=list(data["ports"]))

    def describe(self) -> list[str]:
        lines = [f"region {self.region}, account {self.account_id}, VPC {self.vpc_id} ({self.vpc_cidr})"]
        lines += [f"member {m.member}: {m.instance_id} ({m.private_ip}, subnet {m.subnet_id}, security groups "
                  f"{', '.join(m.security_group_ids) or 'none'})" for m in self.members]
        lines.append(f"route tables: {', '.join(self.route_table_ids)}; MongoDB port(s): "
                     f"{', '.join(map(str, self.ports))}")
        return lines


def _split_member(member: str) -> tuple[str, int]:
    host, _, port = member.rpartition(":")
    if not host or not port.isdigit():
        return member, 27017
    return host.strip("[]"), int(port)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def find_instance(ec2, host: str) -> dict[str, Any] | None:
    """The EC2 instance whose private IP (or private/public DNS name, or public IP) is ``host``."""
    filters = (["private-ip-address", "ip-address"] if _is_ip(host) else ["private-dns-name", "dns-name"])
    for name in filters:
        reply = ec2.describe_instances(Filters=[{"Name": name, "Values": [host]}])
        for reservation in reply.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                if instance.get("State", {}).get("Name") in ("terminated", "shutting-down"):
                    continue
                return {**instance, "OwnerId": reservation.get("OwnerId", "")}
    return None


def route_tables_for(ec2, vpc_id: str, subnet_ids: Iterable[str]) -> list[str]:
    """The route tables the subnets use: an explicit association, else the VPC's main table."""
    tables = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["RouteTables"]
    main = next((t["RouteTableId"] for t in tables
                 if any(a.get("Main") for a in t.get("Associations", []))), None)
    found: set[str] = set()
    for subnet in subnet_ids:
        explicit = next((t["RouteTableId"] for t in tables
                         if any(a.get("SubnetId") == subnet for a in t.get("Associations", []))), None)
        table = explicit or main
        if table is None:
            raise NetworkError(f"subnet {subnet} of VPC {vpc_id} has no route table (and the VPC no main table)")
        found.add(table)
    return sorted(found)


def discover_placement(ec2, members: list[str], region: str) -> Placement:
    """Map every replica-set member to its EC2 instance; all must be in one VPC (one peering)."""
    if not members:
        raise NetworkError("the source reported no replica-set members")
    found: list[MemberInstance] = []
    missing: list[str] = []
    owners: set[str] = set()
    vpcs: set[str] = set()
    for member in members:
        host, _ = _split_member(member)
        instance = find_instance(ec2, host)
        if instance is None:
            missing.append(member)
            continue
        owners.add(instance["OwnerId"])
        vpcs.add(instance["VpcId"])
        found.append(MemberInstance(member, instance["InstanceId"], instance.get("PrivateIpAddress", ""),
                                    instance["SubnetId"],
                                    tuple(sorted(g["GroupId"] for g in instance.get("SecurityGroups", [])))))
    if missing:
        raise NetworkError(
            f"no EC2 instance in region {region} matches replica-set member(s) {', '.join(missing)} (by private "
            "IP or DNS name): check the AWS connection's account and region, or use network_mode=skip and "
            "prepare the network yourself")
    if len(vpcs) != 1:
        raise NetworkError(f"the members run in {len(vpcs)} VPCs ({', '.join(sorted(vpcs))}); one peering "
                           "connection serves one VPC: peer each VPC yourself and use network_mode=skip")
    vpc_id = vpcs.pop()
    vpc = ec2.describe_vpcs(VpcIds=[vpc_id])["Vpcs"][0]
    return Placement(region=region, account_id=sorted(owners)[0], vpc_id=vpc_id, vpc_cidr=vpc["CidrBlock"],
                     members=found, route_table_ids=route_tables_for(ec2, vpc_id, {m.subnet_id for m in found}),
                     ports=sorted({_split_member(m)[1] for m in members}))


# ---------------------------------------------------------------- what was changed


@dataclass(frozen=True)
class NetworkChange:
    """One thing this run added (``kind`` + identifiers): what the teardown removes, and nothing else."""

    kind: str  # container | peering | aws_accept | route | sg_rule | access_list
    ids: dict[str, Any]

    def describe(self) -> str:
        return f"{self.kind} " + ", ".join(f"{k}={v}" for k, v in sorted(self.ids.items()))


@dataclass
class StepReport:
    added: list[NetworkChange] = field(default_factory=list)
    in_place: list[str] = field(default_factory=list)

    def add(self, change: NetworkChange) -> None:
        log.info("network: added %s", change.describe())
        self.added.append(change)

    def skip(self, what: str) -> None:
        log.info("network: already in place, skipped: %s", what)
        self.in_place.append(what)

    def to_dict(self) -> dict[str, Any]:
        return {"added": [asdict(c) for c in self.added], "in_place": list(self.in_place)}


def changes_from(data: Iterable[dict[str, Any]]) -> list[NetworkChange]:
    return [NetworkChange(d["kind"], dict(d["ids"])) for d in data]


class PeeringStateStore(Protocol):
    def load(self, key: str) -> dict[str, Any] | None: ...

    def save(self, key: str, value: dict[str, Any] | None) -> None: ...


class VariableStateStore:
    """State documents as Airflow Variables (JSON; ids only, never a secret). Visible in Admin > Variables."""

    def load(self, key: str) -> dict[str, Any] | None:
        from airflow.sdk import Variable

        value = Variable.get(key, default=None)
        return json.loads(value) if value else None

    def save(self, key: str, value: dict[str, Any] | None) -> None:
        from airflow.sdk import Variable

        if value is None:
            Variable.delete(key)
        else:
            Variable.set(key, json.dumps(value, sort_keys=True))


class MemoryStateStore:
    """For tests and dry runs."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {}

    def load(self, key: str) -> dict[str, Any] | None:
        return self.values.get(key)

    def save(self, key: str, value: dict[str, Any] | None) -> None:
        if value is None:
            self.values.pop(key, None)
        else:
            self.values[key] = value


def state_key(project_id: str, vpc_id: str) -> str:
    return f"{STATE_VARIABLE_PREFIX}__{project_id}__{vpc_id}"


# ---------------------------------------------------------------- Atlas side


def ensure_container(atlas, region: str, atlas_cidr: str, report: StepReport) -> dict[str, Any]:
    """The project's AWS container for ``region`` (Atlas spelling): reused when it exists, else created."""
    for container in atlas.list_containers(provider_name="AWS"):
        if container.get("regionName") == region:
            if container.get("atlasCidrBlock") != atlas_cidr:
                log.info("network: the %s container uses Atlas CIDR %s (not the requested %s): using it", region,
                         container.get("atlasCidrBlock"), atlas_cidr)
            report.skip(f"Atlas network container {container['id']} for {region} ({container.get('atlasCidrBlock')})")
            return container
    container = atlas.create_container(region, atlas_cidr, provider_name="AWS")
    report.add(NetworkChange("container", {"container_id": container["id"], "region": region,
                                           "atlas_cidr": container.get("atlasCidrBlock", atlas_cidr)}))
    return container


def ensure_peer(atlas, store: PeeringStateStore, key: str, placement: Placement, container: dict[str, Any],
                report: StepReport) -> dict[str, Any]:
    """The Atlas peering request to the VPC: the one recorded under ``key`` while it is alive, else a new one."""
    from atlas_migration.hooks.atlas import AtlasApiError

    state = store.load(key) or {}
    if state.get("peer_id"):
        try:
            peer = atlas.get_peering_connection(state["peer_id"])
        except AtlasApiError as exc:
            if exc.status != 404:
                raise
            peer = None
        if peer and peer.get("statusName") in PEER_OK_STATES and peer.get("containerId") == container["id"]:
            report.skip(f"Atlas peering {peer['id']} to {placement.vpc_id} ({peer['statusName']})")
            return peer
        log.info("network: the recorded peering %s is %s: requesting a new one", state["peer_id"],
                 peer.get("statusName") if peer else "gone")
    peer = atlas.create_peering_connection(
        container_id=container["id"], aws_account_id=placement.account_id, vpc_id=placement.vpc_id,
        route_table_cidr_block=placement.vpc_cidr, accepter_region_name=placement.region)
    store.save(key, {"peer_id": peer["id"], "container_id": container["id"], "vpc_id": placement.vpc_id})
    report.add(NetworkChange("peering", {"peer_id": peer["id"], "vpc_id": placement.vpc_id}))
    return peer


def peer_failure(peer: dict[str, Any], cluster_hint: str = "") -> PeeringFailed:
    return PeeringFailed(
        f"Atlas reports the peering connection {peer.get('id')} ({peer.get('connectionId') or 'no AWS id'}) to "
        f"VPC {peer.get('vpcId')} as {peer.get('statusName')} (errorStateName {peer.get('errorStateName')}). "
        "Nothing further was changed. Check the request in the AWS console (VPC > Peering connections: it must "
        f"be accepted by account {peer.get('awsAccountId')}, CIDRs must not overlap){cluster_hint}; re-run to "
        "request a new peering")


def ensure_access_list(atlas, cidr: str, comment: str, report: StepReport) -> None:
    """The VPC's CIDR in the project's IP access list (hosts in the VPC reach the cluster over the peering)."""
    network = str(ipaddress.ip_network(cidr, strict=False))
    if any(entry.get("cidrBlock") == network for entry in atlas.list_access_list()):
        report.skip(f"Atlas access list entry {network}")
        return
    atlas.add_access_list_entries([{"cidrBlock": network, "comment": comment}])
    report.add(NetworkChange("access_list", {"cidr": network}))


# ---------------------------------------------------------------- AWS side


def peering_status(ec2, connection_id: str) -> str | None:
    """The AWS status code of a peering connection (pending-acceptance, active, ...) or None when unknown."""
    from botocore.exceptions import ClientError

    try:
        reply = ec2.describe_vpc_peering_connections(VpcPeeringConnectionIds=[connection_id])
    except ClientError as exc:
        if "NotFound" in str(exc.response.get("Error", {}).get("Code", "")):
            return None
        raise
    pcxs = reply.get("VpcPeeringConnections", [])
    return pcxs[0]["Status"]["Code"] if pcxs else None


def accept_peering(ec2, connection_id: str, report: StepReport) -> None:
    """Accept the Atlas request in AWS; already active (or provisioning) counts as in place."""
    status = peering_status(ec2, connection_id)
    if status in ("active", "provisioning"):
        report.skip(f"AWS peering connection {connection_id} ({status})")
        return
    if status != "pending-acceptance":
        raise NetworkError(f"AWS peering connection {connection_id} is {status or 'not visible to this account'}, "
                           "not pending-acceptance: it cannot be accepted (check the account and region of the "
                           "AWS connection)")
    ec2.accept_vpc_peering_connection(VpcPeeringConnectionId=connection_id)
    report.add(NetworkChange("aws_accept", {"connection_id": connection_id}))


def ensure_routes(ec2, route_table_ids: list[str], atlas_cidr: str, connection_id: str, report: StepReport) -> None:
    tables = {t["RouteTableId"]: t for t in
              ec2.describe_route_tables(RouteTableIds=list(route_table_ids))["RouteTables"]}
    for table_id in route_table_ids:
        routes = tables[table_id].get("Routes", [])
        existing = next((r for r in routes if r.get("DestinationCidrBlock") == atlas_cidr), None)
        if existing and existing.get("VpcPeeringConnectionId") == connection_id:
            report.skip(f"route {atlas_cidr} -> {connection_id} in {table_id}")
            continue
        if existing:
            raise NetworkError(f"route table {table_id} already sends {atlas_cidr} elsewhere "
                               f"({existing.get('VpcPeeringConnectionId') or existing.get('GatewayId') or '?'}): "
                               "the Atlas CIDR overlaps a network in use; choose another atlas_cidr_block")
        ec2.create_route(RouteTableId=table_id, DestinationCidrBlock=atlas_cidr, VpcPeeringConnectionId=connection_id)
        report.add(NetworkChange("route", {"route_table_id": table_id, "cidr": atlas_cidr,
                                           "connection_id": connection_id}))


def _rule_present(group: dict[str, Any], port: int, cidr: str) -> bool:
    for perm in group.get("IpPermissions", []):
        protocol = perm.get("IpProtocol")
        if protocol not in ("tcp", "6", "-1"):
            continue
        if protocol != "-1" and not perm.get("FromPort", 0) <= port <= perm.get("ToPort", -1):
            continue
        if any(r.get("CidrIp") == cidr for r in perm.get("IpRanges", [])):
            return True
    return False


def worker_cidrs(configured: list[str], members: list[str]) -> list[str]:
    """The addresses the pulling workers connect from: ``configured`` (CIDRs or addresses), else the address
    this worker's system routes to the first member from (a UDP ``connect`` sends nothing)."""
    import socket

    if configured:
        cidrs = []
        for value in configured:
            try:
                cidrs.append(str(ipaddress.ip_network(str(value).strip(), strict=False)))
            except ValueError:
                raise ConfigurationError(f"worker_cidrs: {value!r} is not an address or CIDR block") from None
        return sorted(set(cidrs))
    host, port = _split_member(members[0])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        address = probe.getsockname()[0]
    return [f"{address}/32"]


def connection_plan(placement: Placement, workers: list[str], atlas_cidr: str, cluster_name: str) -> list[str]:
    """Who connects to whom in the pull, and which network change lets each connection through."""
    members = ", ".join(m.member for m in placement.members)
    return [
        f"the Airflow worker(s) ({', '.join(workers)}) connect to the source members {members}: the members' "
        f"security groups ({', '.join(placement.security_group_ids)}) allow tcp "
        f"{', '.join(map(str, placement.ports))} from them",
        f"the worker(s) connect to Atlas cluster '{cluster_name}': over the peering ({atlas_cidr} routed from "
        f"{placement.vpc_id}) when they run in that VPC, else over its public endpoint; Atlas's access list "
        "allows their addresses",
        "Atlas connects to nothing: the DAG pulls the data itself (the source port is not opened to Atlas)",
    ]


def ensure_security_group_rules(ec2, group_ids: list[str], ports: list[int], source_cidr: str,
                                report: StepReport,
                                description: str = "MongoDB from the migration worker (atlas-migration)") -> None:
    """The MongoDB port(s) open to ``source_cidr`` (the pulling workers) in each group."""
    if not group_ids:
        raise NetworkError("the members' instances have no security group to open the MongoDB port in")
    groups = {g["GroupId"]: g for g in ec2.describe_security_groups(GroupIds=list(group_ids))["SecurityGroups"]}
    for group_id in group_ids:
        for port in ports:
            if _rule_present(groups[group_id], port, source_cidr):
                report.skip(f"security group {group_id}: tcp {port} from {source_cidr}")
                continue
            ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[{
                "IpProtocol": "tcp", "FromPort": port, "ToPort": port,
                "IpRanges": [{"CidrIp": source_cidr, "Description": description}]}])
            report.add(NetworkChange("sg_rule", {"group_id": group_id, "port": port, "cidr": source_cidr}))


# ---------------------------------------------------------------- teardown


def teardown(ec2, atlas, store: PeeringStateStore | None, key: str | None,
             changes: list[NetworkChange], *, wait_seconds: float = 300.0,
             sleep: Callable[[float], None] = time.sleep) -> list[str]:
    """Remove exactly the ``changes`` this run made, newest first, on both sides. Returns what was removed.

    AWS: security-group rules, routes, the accepted peering connection. Atlas (the contract's delete calls):
    access-list entries, the peering (Atlas deletes its request; the container is only freed once the
    peering is gone, so this waits for that), and a container this run created. Atlas refuses to delete a
    container a cluster still uses: that one is kept, and the log says so.
    """
    from botocore.exceptions import ClientError

    from atlas_migration.hooks.atlas import AtlasApiError

    removed: list[str] = []
    kinds = {c.kind for c in changes}
    for change in reversed(changes):
        try:
            if change.kind == "sg_rule":
                ec2.revoke_security_group_ingress(GroupId=change.ids["group_id"], IpPermissions=[{
                    "IpProtocol": "tcp", "FromPort": change.ids["port"], "ToPort": change.ids["port"],
                    "IpRanges": [{"CidrIp": change.ids["cidr"]}]}])
            elif change.kind == "route":
                ec2.delete_route(RouteTableId=change.ids["route_table_id"], DestinationCidrBlock=change.ids["cidr"])
            elif change.kind == "aws_accept":
                ec2.delete_vpc_peering_connection(VpcPeeringConnectionId=change.ids["connection_id"])
            elif change.kind == "access_list":
                atlas.delete_access_list_entry(change.ids["cidr"])
            elif change.kind == "peering":
                atlas.delete_peering_connection(change.ids["peer_id"])
                _wait_peer_gone(atlas, change.ids["peer_id"], wait_seconds, sleep)
            elif change.kind == "container":
                try:
                    atlas.delete_container(change.ids["container_id"])
                except AtlasApiError as exc:
                    if exc.status != 409:
                        raise
                    log.warning("network teardown: Atlas keeps %s (%s: still in use)", change.describe(),
                                exc.error_code)
                    continue
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if "NotFound" not in code:
                raise NetworkError(f"network teardown could not remove {change.describe()}: {code}") from None
            log.info("network teardown: %s was already gone", change.describe())
        except AtlasApiError as exc:
            if exc.status != 404:
                raise NetworkError(f"network teardown could not remove {change.describe()}: {exc}") from None
            log.info("network teardown: %s was already gone", change.describe())
        removed.append(change.describe())
        log.info("network teardown: removed %s", change.describe())
    if store is not None and key and "peering" in kinds:
        store.save(key, None)
    return removed


def _wait_peer_gone(atlas, peer_id: str, wait_seconds: float, sleep: Callable[[float], None]) -> None:
    from atlas_migration.hooks.atlas import AtlasApiError

    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        try:
            atlas.get_peering_connection(peer_id)
        except AtlasApiError as exc:
            if exc.status == 404:
                return
            raise
        sleep(2.0)
    raise NetworkError(f"network teardown: the Atlas peering {peer_id} was still TERMINATING after "
                       f"{wait_seconds:.0f} s; run the teardown again to remove what depends on it")


def find_run_changes(ec2, atlas, placement: Placement, tag: str, peer_id: str | None) -> list[NetworkChange]:
    """What a run added, found again by listing (after a crash that lost its XCom): security-group rules and
    access-list entries carrying the run's ``tag``; the run's Atlas peering (``peer_id``, from its state
    document) if Atlas still lists it for this VPC, with its AWS connection and the routes through it."""
    found: list[NetworkChange] = []
    peer = next((p for p in atlas.list_peering_connections()
                 if p.get("id") == peer_id and p.get("vpcId") == placement.vpc_id), None) if peer_id else None
    if peer is not None:
        found.append(NetworkChange("peering", {"peer_id": peer["id"], "vpc_id": placement.vpc_id}))
        pcx = peer.get("connectionId")
        if pcx and peering_status(ec2, pcx) in ("active", "provisioning"):
            found.append(NetworkChange("aws_accept", {"connection_id": pcx}))
        if pcx:
            tables = ec2.describe_route_tables(RouteTableIds=list(placement.route_table_ids))["RouteTables"]
            found += [NetworkChange("route", {"route_table_id": t["RouteTableId"], "cidr": r["DestinationCidrBlock"],
                                              "connection_id": pcx})
                      for t in tables for r in t.get("Routes", []) if r.get("VpcPeeringConnectionId") == pcx]
    groups = ec2.describe_security_groups(GroupIds=list(placement.security_group_ids))["SecurityGroups"]
    for group in groups:
        for perm in group.get("IpPermissions", []):
            found += [NetworkChange("sg_rule", {"group_id": group["GroupId"], "port": perm.get("FromPort"),
                                                "cidr": r["CidrIp"]})
                      for r in perm.get("IpRanges", []) if r.get("Description") == tag]
    found += [NetworkChange("access_list", {"cidr": e["cidrBlock"]})
              for e in atlas.list_access_list() if e.get("comment") == tag]
    return found


def require_cidr(value: str, name: str) -> str:
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError:
        raise ConfigurationError(f"{name}={value!r} is not a CIDR block such as 192.168.248.0/21") from None
    if not network.is_private:
        raise ConfigurationError(f"{name}={value!r} must be a private range (RFC 1918)")
    return str(network)


class AtlasProject:
    """The Atlas Admin API calls the network steps make, bound to one project (group)."""

    def __init__(self, hook, group_id: str | None = None) -> None:
        self.hook = hook
        self.group_id = group_id or hook.config.project_id
        if not self.group_id:
            raise ConfigurationError(f"no Atlas project id: set target_project_id or the '{hook.conn_id}' "
                                     "connection's project_id extra")

    def get_cluster(self, name: str) -> dict[str, Any]:
        return self.hook.get_cluster(name, group_id=self.group_id)

    def list_containers(self, provider_name: str = "AWS") -> list[dict[str, Any]]:
        return self.hook.list_containers(provider_name=provider_name, group_id=self.group_id)

    def create_container(self, region: str, cidr: str, provider_name: str = "AWS") -> dict[str, Any]:
        return self.hook.create_container(region, cidr, provider_name=provider_name, group_id=self.group_id)

    def create_peering_connection(self, **kwargs: Any) -> dict[str, Any]:
        return self.hook.create_peering_connection(**kwargs, group_id=self.group_id)

    def get_peering_connection(self, peer_id: str) -> dict[str, Any]:
        return self.hook.get_peering_connection(peer_id, group_id=self.group_id)

    def list_access_list(self) -> list[dict[str, Any]]:
        return self.hook.list_access_list(group_id=self.group_id)

    def add_access_list_entries(self, entries: list[dict[str, str]]) -> list[dict[str, Any]]:
        return self.hook.add_access_list_entries(entries, group_id=self.group_id)

    def list_peering_connections(self) -> list[dict[str, Any]]:
        return self.hook.list_peering_connections(group_id=self.group_id)

    def delete_peering_connection(self, peer_id: str) -> None:
        self.hook.delete_peering_connection(peer_id, group_id=self.group_id)

    def delete_container(self, container_id: str) -> None:
        self.hook.delete_container(container_id, group_id=self.group_id)

    def delete_access_list_entry(self, entry_value: str) -> None:
        self.hook.delete_access_list_entry(entry_value, group_id=self.group_id)
