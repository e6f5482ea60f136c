"""The ``compose`` strategy: a Compose "single shard" sharded cluster behind mongos, over TLS with a
Compose-issued CA certificate (MongoDB's "Migrate from Compose" procedure).

    preflight (TLS with the connection's CA; listShards: exactly one shard behind mongos; balancerStatus
    recorded; the Oplog Access endpoint reachable and its oplog readable; the Atlas migration hosts to
    allow-list) -> choose_path (branch)
        -> pull.*     (oplog readable: the live pull's own tasks; copy through mongos, change stream from
                       the Oplog Access endpoint) -> recheck_topology
        -> restore.*  (no oplog access: dump through mongos, restore into Atlas; writes must be stopped)

Where the change stream comes from. Compose users cannot read the oplog through mongos (that is what the
Oplog Access add-on sells): it exposes the shard's replica set, where ``local.oplog.rs`` and change streams
are readable. With exactly ONE shard that replica set's oplog records every write made to the cluster, so
its change stream is complete. The initial copy still reads through mongos (the routed view applications
see, and what the Compose user may read), and the start point is taken on the shard BEFORE the copy reads
anything: mongos and the shard share one cluster time, so every read of the copy is after the start point
and events in between are re-applied idempotently. That reasoning holds only with one shard: a shard added
during the migration would take writes the stream never sees. So preflight refuses anything but one shard,
records the balancer state, and ``recheck_topology`` confirms it is still one shard after the cutover,
before validation.

The CA certificate: the connection's ``tlsCAFile`` extra (a path on the workers), or the PEM text in its
``migration.tls_ca_pem`` extra, which ``hooks.endpoint_from_connection`` writes to a 0600 file for every task
(inspection, copy, stream, dump, validation) alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import closing
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow.sdk import TriggerRule, task, task_group

from atlas_migration.errors import ImpossibleStrategy
from atlas_migration.hooks.mongo import MongoEndpoint, endpoint_from_connection
from atlas_migration.params import MigrationParams
from atlas_migration.strategies.live_pull import PullSources, add_pull_tasks
from atlas_migration.strategies.mongorestore import add_restore_tasks

log = logging.getLogger("atlas_migration")

GROUP_ID = "compose"
SECTION = "Compose"


def compose_params() -> dict[str, Any]:
    """Trigger-form params of the Compose path."""
    from airflow.sdk import Param

    def param(default: Any, title: str, description: str, **schema: Any) -> Param:
        return Param(default, title=title, description=description, section=SECTION, **schema)

    return {
        "oplog_conn_id": param(
            "compose_oplog", "Oplog Access connection",
            "Airflow connection (type mongo) of the Compose Oplog Access endpoint (the shard's replica set, "
            "same CA certificate). Without it, or when its oplog cannot be read, the Compose path falls back "
            "to dump and restore through mongos.", type="string"),
        "atlas_migration_hosts": param(
            [], "Atlas migration hosts",
            "Addresses (host names, IPs or CIDRs) of the Atlas migration hosts, as the Atlas UI lists them: they "
            "must be allow-listed in Compose (Security > Whitelist) for the mongos and the Oplog Access "
            "endpoint. Preflight prints them.", type="array", items={"type": "string"}),
    }


# ---------------------------------------------------------------- TLS with the Compose CA


def tls_summary(endpoint: MongoEndpoint) -> str:
    options = endpoint.client_options
    tls = any(bool(options.get(k)) for k in ("tls", "ssl")) or bool(options.get("tlsCAFile"))
    if not tls:
        return "TLS off"
    ca = "CA from the connection" if options.get("tlsCAFile") else "system CA store"
    return f"TLS on ({ca}{', certificate checks DISABLED' if options.get('tlsAllowInvalidCertificates') else ''})"


# ---------------------------------------------------------------- pure decisions


@dataclass
class ComposeTopology:
    is_mongos: bool
    shards: list[str]
    balancer_mode: str | None = None  # full | off | autoSplitOnly; None when unreadable
    balancer_note: str = ""

    def problems(self) -> list[str]:
        found: list[str] = []
        if not self.is_mongos:
            found.append("the source connection does not reach a mongos (hello has no msg 'isdbgrid'): the Compose "
                         "path needs the deployment's mongos router")
        elif len(self.shards) != 1:
            found.append(f"the cluster has {len(self.shards)} shard(s) ({', '.join(self.shards) or 'none listed'}): "
                         "the Compose path handles Compose's single-shard clusters only (one shard's oplog must "
                         "hold every write); migrate a multi-shard cluster with mongosync through mongos")
        return found


def topology_from(hello: Mapping[str, Any], list_shards: Mapping[str, Any] | None,
                  balancer: Mapping[str, Any] | None, balancer_error: str = "") -> ComposeTopology:
    shards = [s.get("_id", "?") for s in (list_shards or {}).get("shards", [])]
    mode = (balancer or {}).get("mode")
    note = balancer_error or ("a balancing round is in progress" if (balancer or {}).get("inBalancerRound") else "")
    return ComposeTopology(is_mongos=hello.get("msg") == "isdbgrid", shards=shards, balancer_mode=mode,
                           balancer_note=note)


@dataclass
class OplogCheck:
    conn_id: str
    configured: bool
    reachable: bool = False
    readable: bool = False
    change_stream: bool = False
    window_hours: float | None = None
    detail: str = ""


@dataclass
class ComposePath:
    path: str  # pull | restore
    reasons: list[str] = field(default_factory=list)


def choose_path(oplog: OplogCheck) -> ComposePath:
    """Pull when the Oplog Access endpoint gives a readable oplog and change streams; else dump and restore."""
    if oplog.configured and oplog.reachable and oplog.readable and oplog.change_stream:
        window = "unknown" if oplog.window_hours is None else f"{oplog.window_hours:.1f} h"
        return ComposePath("pull", [f"the Oplog Access endpoint '{oplog.conn_id}' is reachable, its oplog readable "
                                    f"(window {window}) and change streams open: live pull, copy through mongos"])
    if not oplog.configured:
        why = f"no Oplog Access connection '{oplog.conn_id}' is defined"
    elif not oplog.reachable:
        why = f"the Oplog Access endpoint '{oplog.conn_id}' is unreachable ({oplog.detail})"
    else:
        why = f"the Oplog Access endpoint '{oplog.conn_id}' does not give a readable oplog ({oplog.detail})"
    return ComposePath("restore", [
        why, "FALLBACK: dump through mongos and restore into Atlas (mongorestore path). Writes made to the source "
        "after the dump starts are NOT migrated: stop application writes first (or add Compose's Oplog Access)"])


def report_notes(checked: Mapping[str, Any] | None) -> list[str]:
    """The validation report's lines on the path preflight chose (from its XCom), so that a fallback to dump
    and restore, and what it means for writes, stays on record beside the verdict."""
    if not checked or not checked.get("path"):
        return []
    return [f"Compose path: {checked['path']}", *[str(r) for r in checked.get("reasons") or []]]


def allow_list_reminder(hosts: list[str]) -> list[str]:
    if not hosts:
        return ["no atlas_migration_hosts given: look them up in the Atlas UI (Migrate from Compose) and allow-list "
                "them in Compose for the mongos and the Oplog Access endpoint before a live migration"]
    return ["allow-list these Atlas migration hosts in Compose (Security > Whitelist) for the mongos AND the "
            "Oplog Access endpoint:", *[f"  {h}" for h in hosts]]


# ---------------------------------------------------------------- task bodies


def _connection_defined(conn_id: str) -> bool:
    from airflow.sdk import BaseHook

    try:
        BaseHook.get_connection(conn_id)
        return True
    except Exception:  # AirflowNotFoundException and friends: not configured
        return False


def check_oplog(conn_id: str) -> OplogCheck:
    """Connect to the Oplog Access endpoint, read the newest oplog entry, open (and close) a change stream."""
    from pymongo.errors import PyMongoError

    from atlas_migration.errors import MigrationError
    from atlas_migration.inspection import read_oplog_window_hours

    check = OplogCheck(conn_id, configured=bool(conn_id) and _connection_defined(conn_id))
    if not check.configured:
        return check
    try:
        endpoint = endpoint_from_connection(conn_id, "source")
        client = endpoint.connect()
    except MigrationError as exc:
        check.detail = str(exc)
        return check
    check.reachable = True
    with closing(client):
        try:
            check.window_hours = read_oplog_window_hours(client)
            check.readable = check.window_hours is not None
            if not check.readable:
                check.detail = "local.oplog.rs is empty or missing (is this a replica-set member?)"
                return check
        except PyMongoError as exc:
            check.detail = f"reading local.oplog.rs failed: {endpoint.redact(exc)}"
            return check
        try:
            with client.watch(max_await_time_ms=100) as stream:
                stream.try_next()
            check.change_stream = True
        except PyMongoError as exc:
            check.detail = f"a change stream could not be opened: {endpoint.redact(exc)}"
    return check


def read_topology(client) -> ComposeTopology:
    from pymongo.errors import OperationFailure

    hello = client.admin.command("hello")
    shards = balancer = None
    balancer_error = ""
    if hello.get("msg") == "isdbgrid":
        shards = client.admin.command("listShards")
        try:
            balancer = client.admin.command("balancerStatus")
        except OperationFailure as exc:  # restricted Compose users: record, do not fail
            balancer_error = f"balancerStatus refused (code {exc.code})"
    return topology_from(hello, shards, balancer, balancer_error)


def preflight(params: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the Compose path needs to know before it touches Atlas; fails on a wrong topology."""
    p = MigrationParams.parse(dict(params))
    endpoint = endpoint_from_connection(p.source_conn_id, "source")
    with closing(endpoint.connect()) as client:
        topology = read_topology(client)
    problems = topology.problems()
    if problems:
        raise ImpossibleStrategy("Compose preflight: " + "; ".join(problems) + ". Nothing was written.")
    oplog_conn = str(params.get("oplog_conn_id") or "").strip()
    oplog = check_oplog(oplog_conn)
    decision = choose_path(oplog)
    hosts = [str(h) for h in params.get("atlas_migration_hosts") or []]
    lines = [
        f"mongos {', '.join(endpoint.hosts)}: {tls_summary(endpoint)}",
        f"shards: {len(topology.shards)} ({', '.join(topology.shards)})",
        f"balancer: {topology.balancer_mode or 'unknown'}{' (' + topology.balancer_note + ')' if topology.balancer_note else ''}",
        f"oplog access '{oplog_conn or '-'}': " + ("readable" if oplog.readable and oplog.change_stream else
                                                    f"not usable ({oplog.detail or 'not configured'})"),
        f"path: {decision.path}", *[f"  because: {r}" for r in decision.reasons],
        *allow_list_reminder(hosts),
    ]
    log.info("Compose preflight\n%s", "\n".join(f"    {line}" for line in lines))
    if decision.path == "restore":
        log.warning("Compose: falling back to dump and restore through mongos: %s", " ".join(decision.reasons))
    if topology.balancer_mode not in (None, "off"):
        log.info("the balancer is '%s': harmless with one shard (nothing to move), but do not add a shard until the "
                 "migration is over", topology.balancer_mode)
    return {"topology": asdict(topology), "oplog": asdict(oplog), "path": decision.path,
            "reasons": decision.reasons, "atlas_migration_hosts": hosts}


def recheck_topology(params: Mapping[str, Any]) -> dict[str, Any]:
    """After the cutover: still one shard, so the one shard's change stream saw every write."""
    p = MigrationParams.parse(dict(params))
    with closing(endpoint_from_connection(p.source_conn_id, "source").connect()) as client:
        topology = read_topology(client)
    problems = topology.problems()
    if problems:
        raise ImpossibleStrategy("the cluster changed during the migration: " + "; ".join(problems) + ". Writes to "
                                 "another shard were not followed: re-run the migration with drop_target=true")
    log.info("topology unchanged: one shard (%s)", ", ".join(topology.shards))
    return asdict(topology)


def compose_sources() -> PullSources:
    """Copy through mongos (``source_conn_id``), change stream from the Oplog Access endpoint."""
    return PullSources(copy_conn_param="source_conn_id", stream_conn_param="oplog_conn_id")


# ---------------------------------------------------------------- task groups


@task_group(group_id=GROUP_ID)
def compose_group(profile) -> None:
    """The ``compose`` task group (call inside a DAG; returns nothing)."""

    @task(task_id="preflight")
    def run_preflight(params=None) -> dict:
        return preflight(params)

    @task.branch(task_id="choose_path")
    def choose(checked: dict) -> str:
        return f"{GROUP_ID}.{checked['path']}"

    @task_group(group_id="pull")
    def pull(profile) -> None:
        add_pull_tasks(profile, compose_sources())

    @task_group(group_id="restore")
    def restore(profile) -> None:
        add_restore_tasks(profile)

    # The pull group always ends with one engine's path skipped (native or mongosync): under the default
    # all_success rule that skip would skip the recheck too, and ``done`` would pass a failed pull on.
    @task(task_id="recheck_topology", trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def recheck(params=None) -> dict:
        return recheck_topology(params)

    @task(task_id="done", trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def done(checked: dict) -> str:
        return checked["path"]

    checked = run_preflight()
    pulled, restored = pull(profile), restore(profile)
    choose(checked) >> [pulled, restored]
    finished = done(checked)
    pulled >> recheck() >> finished
    restored >> finished
