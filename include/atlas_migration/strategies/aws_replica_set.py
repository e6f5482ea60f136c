"""The ``aws_replica_set`` strategy: a replica set on EC2, migrated over VPC peering with a live pull.

    discover (members -> EC2 instances: region, VPC, subnets, security groups, route tables; the Atlas
    cluster must be in the same region) -> request_peering (Atlas container + peering request)
    -> accept_peering (sensor: once Atlas names the pcx-..., accept it in AWS) -> configure_vpc (routes
    to the Atlas CIDR, the MongoDB port open to the pulling workers, their addresses in the Atlas access
    list: the DAG pulls, so the workers connect to both sides and Atlas connects to nothing)
    -> await_peering (sensor: AVAILABLE, or a clear error on FAILED) -> pull.* (the live pull's own tasks)
    -> teardown_network (only with network_teardown=true: removes what THIS run added)

Every network step looks before it changes anything, so a re-run (or a network the platform team set up
already) changes nothing. ``network_mode=skip`` leaves the network to the network team: the steps only log
and the pull starts at once. The Atlas peer id is remembered across runs in the Airflow Variable
``atlas_migration_network__<project>__<vpc>`` (the contract has no "list peers" call); what each run
added travels in its XCom, which is what the teardown reads.

In a rehearsal (``mongo_to_atlas_rehearsal``) no network step changes anything, whatever ``network_mode``
says: the rehearsal pulls into scratch databases over the paths that exist. With
``rehearsal_network_dry_run=true`` the preparation runs as a dry run: every read is made, and every change
it would make is logged instead of made (``DryRun``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from airflow.sdk import TriggerRule, task, task_group

from atlas_migration.errors import ConfigurationError
from atlas_migration.hooks.mongo import endpoint_from_connection
from atlas_migration.params import MigrationParams
from atlas_migration.strategies.live_pull import add_pull_tasks, poke_interval

log = logging.getLogger("atlas_migration")

GROUP_ID = "aws_replica_set"
SECTION = "AWS replica set"
NETWORK_MODES = ("prepare", "skip")
DEFAULT_ATLAS_CIDR = "192.168.248.0/21"  # the Atlas UI's default for a new AWS container
WORKER_COMMENT = "Airflow migration worker (atlas-migration)"


def run_tag(dag_id: str, run_id: str) -> str:
    """The comment / description on what a run adds (Atlas access-list comments hold 80 characters), so that
    its teardown finds them again by listing."""
    return f"atlas-migration {dag_id}/{run_id}"[:80]


def aws_params() -> dict[str, Any]:
    """Trigger-form params of the AWS replica-set path. ``atlas_conn_id``, ``target_project_id`` and
    ``target_cluster_name`` have the same names, defaults and meaning as the live push's."""
    from airflow.sdk import Param

    def param(default: Any, title: str, description: str, **schema: Any) -> Param:
        return Param(default, title=title, description=description, section=SECTION, **schema)

    return {
        "network_mode": param(
            "prepare", "Network preparation",
            "'prepare': create what is missing (Atlas container and peering, accept it in AWS, routes, security "
            "group rule, access list), each step skipped when already in place. 'skip': the network team has "
            "done it; only check the region and start the pull.", type="string", enum=list(NETWORK_MODES)),
        "atlas_conn_id": param(
            "atlas_api", "Atlas Admin API connection",
            "Airflow connection (type mongodb_atlas): the Atlas organization's API key pair or service account, "
            "extras org_id and project_id (the destination project).", type="string", minLength=1),
        "target_project_id": param(
            "", "Atlas project id",
            "24-hex id of the destination Atlas project. Empty: the Atlas connection's project_id extra.",
            type="string", pattern=r"^$|^[a-f0-9]{24}$"),
        "target_cluster_name": param(
            "", "Atlas cluster name", "The destination cluster in that project (it must exist).", type="string"),
        "atlas_cidr_block": param(
            DEFAULT_ATLAS_CIDR, "Atlas CIDR block",
            "The Atlas container's CIDR (private, /16 to /24) when one must be created; it must not overlap the "
            "source VPC. An existing container for the region keeps its own.", type="string",
            pattern=r"^\d{1,3}(\.\d{1,3}){3}/\d{1,2}$"),
        "peering_timeout_seconds": param(
            1800, "Peering timeout (s)", "Give up when the peering is not accepted / AVAILABLE by then.",
            type="integer", minimum=30, maximum=7 * 24 * 3600),
        "worker_cidrs": param(
            [], "Worker addresses",
            "Addresses or CIDR blocks the Airflow workers that run the pull connect from: the members' security "
            "groups and the Atlas access list allow them. Empty: the address this worker reaches the source from.",
            type="array", items={"type": "string"}),
        "network_teardown": param(
            False, "Remove the network afterwards",
            "After a successful pull, remove what this run added (security-group rules, routes, the peering "
            "connection; in Atlas the access-list entries, the peering and a container it created) and only "
            "that, also what it finds by listing after a crash.", type="boolean"),
    }


@dataclass(frozen=True)
class AwsParams:
    network_mode: str
    aws_conn_id: str
    atlas_conn_id: str
    project_id: str
    cluster_name: str
    atlas_cidr: str
    peering_timeout_seconds: int
    teardown: bool
    rehearsal: bool = False
    network_dry_run: bool = False
    worker_cidrs: tuple[str, ...] = ()

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> AwsParams:
        from atlas_migration.network import require_cidr

        mode = params.get("network_mode") or "prepare"
        if mode not in NETWORK_MODES:
            raise ConfigurationError(f"network_mode={mode!r} is not one of {', '.join(NETWORK_MODES)}")
        aws_conn_id = MigrationParams.parse(dict(params)).aws_conn_id
        if not aws_conn_id:
            raise ConfigurationError("the aws_replica_set strategy needs aws_conn_id (an Airflow AWS connection "
                                     "that can describe the source's EC2 instances)")
        cluster = str(params.get("target_cluster_name") or "").strip()
        if not cluster:
            raise ConfigurationError("target_cluster_name must name the destination Atlas cluster (its region is "
                                     "checked against the source's)")
        timeout = params.get("peering_timeout_seconds", 1800)
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 30:
            raise ConfigurationError(f"peering_timeout_seconds must be an integer of at least 30, got {timeout!r}")
        return cls(network_mode=mode, aws_conn_id=aws_conn_id,
                   atlas_conn_id=str(params.get("atlas_conn_id") or "atlas_api"),
                   project_id=str(params.get("target_project_id") or ""), cluster_name=cluster,
                   atlas_cidr=require_cidr(str(params.get("atlas_cidr_block") or DEFAULT_ATLAS_CIDR), "atlas_cidr_block"),
                   peering_timeout_seconds=timeout, teardown=bool(params.get("network_teardown", False)),
                   rehearsal="rehearsal_db_prefix" in params,
                   network_dry_run=bool(params.get("rehearsal_network_dry_run", False)),
                   worker_cidrs=tuple(_list_param(params.get("worker_cidrs"), "worker_cidrs")))

    @property
    def prepare(self) -> bool:
        """Whether the network steps may change anything: never in a rehearsal."""
        return self.network_mode == "prepare" and not self.rehearsal


def _list_param(value: Any, name: str) -> list[str]:
    if value in (None, ""):
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ConfigurationError(f"{name} must be a list of addresses or CIDR blocks, got {value!r}")
    return [str(v) for v in value]


# Calls a dry run lets through: they only read.
_READ_PREFIXES = ("list_", "get_", "describe_")


class DryRun:
    """Wraps an Atlas project or a boto3 EC2 client for a dry run of the network preparation: reads go
    through, every other call is recorded (and logged) instead of made, and answers with placeholder ids."""

    PLACEHOLDER = "(dry run)"

    def __init__(self, target: Any, name: str, calls: list[str]) -> None:
        self._target, self._name, self._calls = target, name, calls

    def __getattr__(self, attr: str) -> Any:
        real = getattr(self._target, attr)
        if not callable(real) or attr.startswith(_READ_PREFIXES):
            return real

        def record(*args: Any, **kwargs: Any) -> Any:
            self._calls.append(f"{self._name}.{attr}")
            log.info("network dry run: would call %s.%s", self._name, attr)
            if attr == "create_container":
                return {"id": self.PLACEHOLDER, "regionName": args[0], "atlasCidrBlock": args[1]}
            if attr == "create_peering_connection":
                return {"id": self.PLACEHOLDER, "statusName": "INITIATING"}
            return {}

        return record


def network_dry_run(ap: AwsParams, found: dict[str, Any], store: Any = None, ec2: Any = None) -> dict[str, Any]:
    """What ``network_mode=prepare`` would add for this source, read from AWS and Atlas, changing nothing."""
    from atlas_migration.network import (
        MemoryStateStore,
        Placement,
        StepReport,
        VariableStateStore,
        ensure_access_list,
        ensure_container,
        ensure_peer,
        ensure_routes,
        ensure_security_group_rules,
        state_key,
    )

    placement = Placement.from_dict(found["placement"])
    calls: list[str] = []
    atlas = DryRun(_atlas(ap), "atlas", calls)
    ec2 = DryRun(ec2 or _ec2(ap.aws_conn_id), "ec2", calls)
    report = StepReport()
    container = ensure_container(atlas, found["atlas_region"], ap.atlas_cidr, report)
    cidr = container.get("atlasCidrBlock", ap.atlas_cidr)
    key = state_key(atlas.group_id, placement.vpc_id)
    readonly = MemoryStateStore()  # the recorded peer is read, never saved
    if recorded := (store or VariableStateStore()).load(key):
        readonly.values[key] = recorded
    peer = ensure_peer(atlas, readonly, key, placement, container, report)
    connection = peer.get("connectionId") or DryRun.PLACEHOLDER
    ensure_routes(ec2, placement.route_table_ids, cidr, connection, report)
    for worker in found["worker_cidrs"]:
        ensure_security_group_rules(ec2, placement.security_group_ids, placement.ports, worker, report)
        ensure_access_list(atlas, worker, WORKER_COMMENT, report)
    return {"would_add": [c.describe() for c in report.added], "in_place": report.in_place, "calls_not_made": calls}


def _ec2(aws_conn_id: str):
    from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook

    return EC2Hook(aws_conn_id=aws_conn_id, api_type="client_type").conn


def _atlas(ap: AwsParams):
    from atlas_migration.hooks.atlas import AtlasAdminHook
    from atlas_migration.network import AtlasProject

    return AtlasProject(AtlasAdminHook(ap.atlas_conn_id), ap.project_id or None)


def replica_set_members(client) -> list[str]:
    """``host:port`` of every member: ``replSetGetStatus`` (needs clusterMonitor), else ``hello``."""
    from pymongo.errors import OperationFailure

    try:
        return [m["name"] for m in client.admin.command("replSetGetStatus")["members"]]
    except OperationFailure as exc:
        log.info("replSetGetStatus refused (%s): using hello's member list", exc.code)
    hello = client.admin.command("hello")
    return list(hello.get("hosts", [])) + list(hello.get("passives", []))


# ---------------------------------------------------------------- task bodies


def discover(params: Mapping[str, Any]) -> dict[str, Any]:
    """Members -> EC2 instances; the Atlas cluster's region must match (an error in prepare mode)."""
    from atlas_migration.network import (
        NetworkError,
        check_same_region,
        cluster_regions,
        connection_plan,
        discover_placement,
        worker_cidrs,
    )

    ap = AwsParams.parse(params)
    p = MigrationParams.parse(dict(params))
    with closing(endpoint_from_connection(p.source_conn_id, "source").connect()) as client:
        members = replica_set_members(client)
    ec2 = _ec2(ap.aws_conn_id)
    placement = discover_placement(ec2, members, ec2.meta.region_name)
    log.info("replica set on AWS:\n%s", "\n".join(f"    {line}" for line in placement.describe()))
    cluster = _atlas(ap).get_cluster(ap.cluster_name)
    try:
        region = check_same_region(placement.region, ap.cluster_name, cluster)
    except NetworkError as exc:
        if ap.prepare:
            raise
        # The network team may have set up cross-region peering: report, do not block.
        log.warning("%s (network_mode=skip: continuing)", exc)
        region = (cluster_regions(cluster) or [""])[0]
    log.info("Atlas cluster '%s' is in %s", ap.cluster_name, region)
    workers = worker_cidrs(list(ap.worker_cidrs), members)
    connections = connection_plan(placement, workers, ap.atlas_cidr, ap.cluster_name)
    log.info("who connects to whom:\n%s", "\n".join(f"    {line}" for line in connections))
    return {"placement": placement.to_dict(), "atlas_region": region, "worker_cidrs": workers,
            "connections": connections}


def request_peering(params: Mapping[str, Any], found: dict[str, Any]) -> dict[str, Any]:
    """Atlas container for the region, then the peering request into the source VPC (both reused if present)."""
    from atlas_migration.network import (
        Placement,
        StepReport,
        VariableStateStore,
        ensure_container,
        ensure_peer,
        state_key,
    )

    ap = AwsParams.parse(params)
    if ap.rehearsal:
        if not ap.network_dry_run:
            log.info("rehearsal: no network preparation (a rehearsal never changes AWS or Atlas networking; "
                     "rehearsal_network_dry_run=true shows what it would add)")
            return {"mode": "skip"}
        planned = network_dry_run(ap, found)
        log.info("rehearsal: network preparation dry run (nothing was changed): would add %s; in place: %s",
                 "; ".join(planned["would_add"]) or "nothing", "; ".join(planned["in_place"]) or "nothing")
        return {"mode": "skip", "dry_run": planned}
    if not ap.prepare:
        log.info("network_mode=skip: no Atlas container or peering is created (the network team's job)")
        return {"mode": "skip"}
    placement = Placement.from_dict(found["placement"])
    atlas = _atlas(ap)
    report = StepReport()
    container = ensure_container(atlas, found["atlas_region"], ap.atlas_cidr, report)
    overlap = _overlap(container.get("atlasCidrBlock", ap.atlas_cidr), placement.vpc_cidr)
    if overlap:
        from atlas_migration.network import NetworkError

        raise NetworkError(overlap)
    key = state_key(atlas.group_id, placement.vpc_id)
    peer = ensure_peer(atlas, VariableStateStore(), key, placement, container, report)
    return {"mode": "prepare", "peer_id": peer["id"], "state_key": key,
            "atlas_cidr": container.get("atlasCidrBlock", ap.atlas_cidr), **report.to_dict()}


def _overlap(atlas_cidr: str, vpc_cidr: str) -> str | None:
    import ipaddress

    if ipaddress.ip_network(atlas_cidr).overlaps(ipaddress.ip_network(vpc_cidr)):
        return (f"the Atlas CIDR {atlas_cidr} overlaps the source VPC's {vpc_cidr}: peered networks must not "
                "overlap; choose another atlas_cidr_block (an existing Atlas container cannot be changed)")
    return None


def accept_poke(params: Mapping[str, Any], requested: dict[str, Any]) -> dict[str, Any] | None:
    """One poke: None while Atlas has no AWS connection id yet; once it has, accept it in AWS (idempotent)."""
    from atlas_migration.network import PEER_DEAD_STATES, StepReport, accept_peering, peer_failure

    if requested.get("mode") == "skip":
        return {"mode": "skip"}
    ap = AwsParams.parse(params)
    peer = _atlas(ap).get_peering_connection(requested["peer_id"])
    if peer.get("statusName") in PEER_DEAD_STATES:
        raise peer_failure(peer)
    if not peer.get("connectionId"):
        log.info("peering %s is %s: waiting for Atlas to request it in AWS", peer["id"], peer.get("statusName"))
        return None
    report = StepReport()
    accept_peering(_ec2(ap.aws_conn_id), peer["connectionId"], report)
    return {"mode": "prepare", "connection_id": peer["connectionId"], **report.to_dict()}


def configure_vpc(params: Mapping[str, Any], found: dict[str, Any], requested: dict[str, Any],
                  accepted: dict[str, Any], tag: str = WORKER_COMMENT) -> dict[str, Any]:
    """Routes to the Atlas CIDR through the peering; the MongoDB port and the Atlas access list open to the
    pulling workers."""
    from atlas_migration.network import (
        Placement,
        StepReport,
        ensure_access_list,
        ensure_routes,
        ensure_security_group_rules,
    )

    if requested.get("mode") == "skip":
        log.info("network_mode=skip: routes, security groups and the access list are left as they are")
        return {"mode": "skip"}
    ap = AwsParams.parse(params)
    placement = Placement.from_dict(found["placement"])
    ec2 = _ec2(ap.aws_conn_id)
    report = StepReport()
    cidr = requested["atlas_cidr"]
    ensure_routes(ec2, placement.route_table_ids, cidr, accepted["connection_id"], report)
    atlas = _atlas(ap)
    for worker in found["worker_cidrs"]:
        # The workers pull: they reach the members and write to Atlas. Nothing is opened to the Atlas CIDR.
        ensure_security_group_rules(ec2, placement.security_group_ids, placement.ports, worker, report, tag)
        ensure_access_list(atlas, worker, tag, report)
    return {"mode": "prepare", **report.to_dict()}


def available_poke(params: Mapping[str, Any], requested: dict[str, Any]) -> bool:
    from atlas_migration.network import PEER_DEAD_STATES, peer_failure

    if requested.get("mode") == "skip":
        return True
    ap = AwsParams.parse(params)
    peer = _atlas(ap).get_peering_connection(requested["peer_id"])
    status = peer.get("statusName")
    if status in PEER_DEAD_STATES:
        raise peer_failure(peer)
    log.info("peering %s (%s) is %s", peer["id"], peer.get("connectionId"), status)
    return status == "AVAILABLE"


def teardown_network(params: Mapping[str, Any], results: list[dict[str, Any] | None],
                     found: dict[str, Any] | None = None, tag: str | None = None) -> list[str]:
    """Remove what this run added, newest first: what its steps recorded (XCom), plus what listing AWS and
    Atlas finds carrying its tag or its peering (a step that crashed after a change recorded nothing)."""
    from atlas_migration.network import (
        Placement,
        VariableStateStore,
        changes_from,
        find_run_changes,
        teardown,
    )

    ap = AwsParams.parse(params)
    changes = changes_from(c for r in results if r for c in r.get("added", []))
    requested = next((r for r in results if r and r.get("peer_id")), None)
    if ap.teardown and not ap.rehearsal and ap.prepare and found and tag:
        listed = find_run_changes(_ec2(ap.aws_conn_id), _atlas(ap), Placement.from_dict(found["placement"]), tag,
                                  requested.get("peer_id") if requested and any(
                                      c.kind == "peering" for c in changes) else None)
        known = {c.describe() for c in changes}
        extra = [c for c in listed if c.describe() not in known]
        if extra:
            log.info("network teardown: also found by listing (not in this run's records): %s",
                     "; ".join(c.describe() for c in extra))
        changes += extra
    if ap.rehearsal:
        log.info("rehearsal: no network teardown (a rehearsal changes no network, so it removes none)")
        return []
    if not ap.teardown:
        log.info("network_teardown=false: keeping the network (%d change(s) made by this run)", len(changes))
        return []
    if not changes:
        log.info("network teardown: this run added nothing, so nothing is removed")
        return []
    key = next((r.get("state_key") for r in results if r and r.get("state_key")), None)
    removed = teardown(_ec2(ap.aws_conn_id), _atlas(ap), VariableStateStore(), key, changes)
    log.info("network teardown: removed %d change(s) made by this run", len(removed))
    return removed


def _timed_out(context: Mapping[str, Any], what: str) -> None:
    from airflow.sdk.exceptions import AirflowSensorTimeout

    from atlas_migration.approval import waited_seconds

    limit = AwsParams.parse(context["params"]).peering_timeout_seconds
    if waited_seconds(context) > limit:
        raise AirflowSensorTimeout(f"the peering was not {what} within peering_timeout_seconds={limit}")


# ---------------------------------------------------------------- the task group


@task_group(group_id=GROUP_ID)
def aws_replica_set_group(profile) -> None:
    """The ``aws_replica_set`` task group (call inside a DAG; returns nothing)."""
    from airflow.sdk import PokeReturnValue, get_current_context

    @task(task_id="discover")
    def discover_members(params=None) -> dict:
        return discover(params)

    @task(task_id="request_peering", retries=2)
    def request(found: dict, params=None) -> dict:
        return request_peering(params, found)

    @task.sensor(task_id="accept_peering", mode="reschedule", poke_interval=poke_interval(), timeout=7 * 24 * 3600)
    def accept(requested: dict, params=None) -> PokeReturnValue:
        result = accept_poke(params, requested)
        if result is None:
            _timed_out(get_current_context(), "requested in AWS")
        return PokeReturnValue(is_done=result is not None, xcom_value=result)

    @task(task_id="configure_vpc", retries=2)
    def configure(found: dict, requested: dict, accepted: dict, params=None, dag=None, run_id=None) -> dict:
        return configure_vpc(params, found, requested, accepted, run_tag(dag.dag_id, run_id))

    @task.sensor(task_id="await_peering", mode="reschedule", poke_interval=poke_interval(), timeout=7 * 24 * 3600)
    def await_available(requested: dict, params=None) -> PokeReturnValue:
        done = available_poke(params, requested)
        if not done:
            _timed_out(get_current_context(), "AVAILABLE")
        return PokeReturnValue(is_done=done)

    @task_group(group_id="pull")
    def pull(profile) -> None:
        add_pull_tasks(profile)

    @task(task_id="teardown_network", trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def remove(found: dict, requested: dict, accepted: dict, configured: dict, params=None, dag=None,
               run_id=None) -> list[str]:
        return teardown_network(params, [requested, accepted, configured], found, run_tag(dag.dag_id, run_id))

    found = discover_members()
    requested = request(found)
    accepted = accept(requested)
    configured = configure(found, requested, accepted)
    available = await_available(requested)
    configured >> available
    pulled = pull(profile)
    available >> pulled
    pulled >> remove(found, requested, accepted, configured)
