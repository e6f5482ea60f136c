"""``inspect_source``: read a live deployment into a ``SourceProfile``.

Every probe is independent: a command the user may not run (restricted users, managed services) leaves
that fact unknown, with the server's reason, and inspection carries on. Nothing here writes.

A sharded source (a mongos) has no oplog of its own, and its mongos refuses ``local``: the oplog window is
measured on every shard, each reached as its own replica set (``listShards`` gives ``<set>/<host:port,...>``)
with the source connection's credentials and TLS options (``shard_connect``), and the smallest window is the
source's (``profile.apply_shard_windows``). A shard that cannot be reached or read leaves the window unknown,
naming the shard: the live pull's preflight then refuses, rather than trusting a guess.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from atlas_migration.namespaces import is_never_migrated
from atlas_migration.profile import (
    HOSTINGS,
    MANAGERS,
    CollectionInfo,
    ShardOplog,
    SourceProfile,
    apply_shard_windows,
    parse_shard_host,
)

log = logging.getLogger(__name__)

# Host-name suffixes that identify where a deployment runs.
COMPOSE_SUFFIXES = (".composedb.com", ".compose.direct", ".compose.io")
AWS_SUFFIXES = (".amazonaws.com", ".compute.internal")
ATLAS_SUFFIXES = (".mongodb.net",)
MANAGEMENT_AGENT_USERS = ("mms-automation", "mms-monitoring-agent", "mms-backup-agent")
# Connects to one shard: (replica-set name or None, ["host:port", ...]) -> a client that answered ping.
ShardConnect = Callable[[str | None, list[str]], Any]


@dataclass(frozen=True)
class DeploymentHints:
    """Facts declared by the operator (DAG params win over the connection's ``migration`` extras)."""

    managed_by: str | None = None  # cloud_manager | ops_manager | "none"
    hosting: str | None = None  # atlas_shared_tier | compose | aws | other

    @classmethod
    def merge(cls, params: dict[str, Any], connection_facts: dict[str, Any]) -> DeploymentHints:
        def pick(param_key: str, fact_key: str, allowed: tuple[str, ...]) -> str | None:
            value = params.get(param_key)
            if value in (None, "", "detect"):
                value = connection_facts.get(fact_key)
            if value in (None, "", "detect"):
                return None
            if value not in (*allowed, "none"):
                from atlas_migration.errors import ConfigurationError

                raise ConfigurationError(f"{param_key}={value!r} is not one of: detect, none, {', '.join(allowed)}")
            return value

        return cls(
            managed_by=pick("source_managed_by", "managed_by", MANAGERS),
            hosting=pick("source_hosting", "hosting", HOSTINGS),
        )


# The no-op ``rs.initiate`` writes as the replica set's first oplog entry. While it is still the oldest entry,
# the oplog has dropped nothing: its span is its age, and its window is still growing toward its capacity.
INITIATION_MESSAGE = "initiating set"


@dataclass(frozen=True)
class OplogSpan:
    """What the oldest and newest entries of a ``local.oplog.rs`` say: the hours between them, and whether
    the oldest is the replica set's initiation entry (nothing truncated yet, so the span is not a window)."""

    hours: float
    since_initiation: bool


def read_oplog_span(client) -> OplogSpan | None:
    """The deployment's oplog span; None when ``local.oplog.rs`` is empty or missing. Lets ``PyMongoError``
    through: each caller says in its own terms why it was unreadable."""
    oplog = client.local["oplog.rs"]
    first = oplog.find_one({}, projection={"ts": 1, "op": 1, "o.msg": 1}, sort=[("$natural", 1)])
    last = oplog.find_one({}, projection={"ts": 1}, sort=[("$natural", -1)])
    if not first or not last:
        return None
    body = first.get("o")
    initiation = first.get("op") == "n" and isinstance(body, dict) and body.get("msg") == INITIATION_MESSAGE
    return OplogSpan(max(0.0, (last["ts"].time - first["ts"].time) / 3600), initiation)


def read_oplog_window_hours(client) -> float | None:
    """Hours between the oldest and newest entries of the deployment's ``local.oplog.rs`` (see
    ``read_oplog_span``); None when it is empty or missing."""
    span = read_oplog_span(client)
    return None if span is None else span.hours


def _jsonable(value: Any) -> Any:
    """BSON values (dates, regexes, Int64 ...) as relaxed Extended JSON, safe for XCom."""
    from bson import json_util

    return json.loads(json_util.dumps(value, json_options=json_util.RELAXED_JSON_OPTIONS))


def _reason(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    text = str(getattr(exc, "details", None) and exc.details.get("errmsg") or exc).split(", full error")[0]
    return f"{text} (code {code})" if code is not None else text


def _host_suffix(hosts: list[str], suffixes: tuple[str, ...]) -> str | None:
    for host in hosts:
        name = host.rsplit(":", 1)[0].lower()
        if name.endswith(suffixes):
            return name
    return None


def inspect_source(
    client,
    *,
    conn_id: str,
    hosts: list[str],
    hints: DeploymentHints = DeploymentHints(),
    aws_lookup: Callable[[list[str]], str | None] | None = None,
    shard_connect: ShardConnect | None = None,
) -> SourceProfile:
    """Inspect the deployment behind ``client`` (already connected and pinged).

    ``shard_connect`` reaches a shard of a sharded source (see ``ShardConnect``); without it a sharded
    source's oplog window stays unknown. The caller closes nothing: inspection closes every shard client."""
    from pymongo.errors import PyMongoError

    profile = SourceProfile(conn_id=conn_id, hosts=list(hosts),
                            inspected_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))

    def probe(fact: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except PyMongoError as exc:
            profile.unknown[fact] = _reason(exc)
            log.info("could not read %s: %s", fact, profile.unknown[fact])
            return None

    build = probe("version", lambda: client.admin.command("buildInfo"))
    profile.version = build.get("version") if build else None
    fcv = probe("fcv", lambda: client.admin.command({"getParameter": 1, "featureCompatibilityVersion": 1}))
    if fcv:
        value = fcv.get("featureCompatibilityVersion")
        profile.fcv = value.get("version") if isinstance(value, dict) else value

    hello = probe("topology", lambda: client.admin.command("hello")) or {}
    list_shards = _read_topology(client, profile, hello, probe)
    _read_oplog(client, profile, probe)
    if profile.topology == "sharded":
        _read_shard_oplogs(profile, list_shards, shard_connect)
        _read_sharding_facts(client, profile, probe)
    _read_management(client, profile, hints, probe)
    _read_hosting(profile, hints, aws_lookup)
    _read_inventory(client, profile, probe)
    return profile


def _read_topology(client, profile: SourceProfile, hello: dict, probe) -> dict | None:
    """Topology facts; returns the ``listShards`` reply of a sharded source (None otherwise or unreadable)."""
    if not hello:
        return None
    if hello.get("msg") == "isdbgrid":
        profile.topology = "sharded"
        shards = probe("shards", lambda: client.admin.command("listShards"))
        if shards:
            profile.shards = [s.get("_id") for s in shards.get("shards", [])]
        return shards
    elif hello.get("setName"):
        profile.topology = "replica_set"
        profile.set_name = hello["setName"]
        profile.members = sorted(set(hello.get("hosts", []) + hello.get("passives", []) + hello.get("arbiters", [])))
    else:
        profile.topology = "standalone"
    return None


def _read_oplog(client, profile: SourceProfile, probe) -> None:
    from pymongo.errors import PyMongoError

    if profile.topology == "standalone":
        profile.oplog_readable = False
        profile.unknown["oplog_access"] = "a standalone server has no oplog"
        return
    if profile.topology == "unknown":
        profile.unknown["oplog_readable"] = "topology unknown"
        return
    # What live migration needs is a change stream over the whole deployment (mongosync reads the oplog
    # through change streams); open one and close it straight away.
    try:
        with client.watch(max_await_time_ms=1) as stream:
            stream.try_next()
        profile.oplog_readable = True
    except PyMongoError as exc:
        profile.oplog_readable = False
        profile.unknown["oplog_access"] = f"cannot open a change stream on the deployment: {_reason(exc)}"
        return
    if profile.topology == "sharded":
        return  # each shard has its own oplog: _read_shard_oplogs measures them on the shards

    def window() -> float | None:
        span = read_oplog_span(client)
        if span is None:
            profile.unknown["oplog_window_hours"] = "local.oplog.rs is empty"
            return None
        profile.oplog_since_initiation = span.since_initiation
        # To the second (6 decimals of an hour are 3.6 ms): rounding to 0.001 h turned a window of a second
        # or two, as a freshly started server has, into 0.0.
        return round(span.hours, 6)

    profile.oplog_window_hours = probe("oplog_window_hours", window)


def shard_oplog(entry: dict, shard_connect: ShardConnect | None) -> ShardOplog:
    """One ``listShards`` entry -> its oplog window, measured on the shard's replica set with the same code
    as a replica-set source (``read_oplog_span``); the reason instead when it cannot be."""
    from pymongo.errors import PyMongoError

    from atlas_migration.errors import MigrationError

    name = str(entry.get("_id") or "?")
    try:
        set_name, hosts = parse_shard_host(str(entry.get("host") or ""))
    except ValueError as exc:
        return ShardOplog(name, [], reason=str(exc))
    shard = ShardOplog(name, hosts, set_name)
    if set_name is None:
        shard.reason = "not a replica set (no '<set>/' in its listShards host), so it has no oplog"
        return shard
    if shard_connect is None:
        shard.reason = "no connection to the shards was given to inspection"
        return shard
    try:
        client = shard_connect(set_name, hosts)
    except MigrationError as exc:  # unreachable, credentials refused: the message is already redacted
        shard.reason = f"cannot connect to replica set {set_name} ({','.join(hosts)}): {exc}"
        return shard
    try:
        span = read_oplog_span(client)
    except PyMongoError as exc:
        shard.reason = f"cannot read local.oplog.rs on {set_name}: {_reason(exc)}"
        return shard
    finally:
        client.close()
    if span is None:
        shard.reason = f"local.oplog.rs on {set_name} is empty"
    else:
        shard.window_hours = round(span.hours, 6)
        shard.since_initiation = span.since_initiation
    return shard


def _read_shard_oplogs(profile: SourceProfile, list_shards: dict | None, shard_connect: ShardConnect | None) -> None:
    if list_shards is None:
        reason = profile.unknown.get("shards", "listShards was not answered")
        profile.unknown["oplog_window_hours"] = f"the shards could not be listed ({reason}), so their oplogs were not read"
        return
    shards = [shard_oplog(entry, shard_connect) for entry in list_shards.get("shards", [])]
    for shard in shards:
        log.info("shard oplog: %s", shard.describe())
    apply_shard_windows(profile, shards)


def _read_sharding_facts(client, profile: SourceProfile, probe) -> None:
    """Inventory facts of a sharded source: the balancer state and the shard keys of sharded collections."""
    status = probe("balancer", lambda: client.admin.command("balancerStatus"))
    if status:
        profile.balancer = {"mode": status.get("mode"), "in_balancer_round": bool(status.get("inBalancerRound"))}

    def shard_keys() -> list[dict[str, Any]]:
        # Dropped collections (``dropped: true`` before 5.0) and, from 8.0, tracked unsharded collections
        # (``unsplittable: true``) are listed too: neither has a shard key of its own.
        found = client.config.collections.find({"dropped": {"$ne": True}, "unsplittable": {"$ne": True}},
                                               projection={"_id": 1, "key": 1, "unique": 1})
        keys = []
        for doc in found:
            db_name, _, coll = str(doc["_id"]).partition(".")
            if "key" in doc and not is_never_migrated(db_name, coll):
                keys.append({"namespace": doc["_id"], "key": _jsonable(doc["key"]), "unique": bool(doc.get("unique"))})
        return sorted(keys, key=lambda k: k["namespace"])

    profile.shard_keys = probe("shard_keys", shard_keys) or []


def _read_management(client, profile: SourceProfile, hints: DeploymentHints, probe) -> None:
    if hints.managed_by:
        profile.managed_by = None if hints.managed_by == "none" else hints.managed_by
        profile.notes.append(f"management declared by the operator: {hints.managed_by}")
        return
    # Cloud Manager / Ops Manager agents authenticate as well-known users; seeing them is a strong hint,
    # but which of the two manages the deployment cannot be told from the server.
    users = probe("management", lambda: client.admin.command(
        "usersInfo", [{"user": u, "db": "admin"} for u in MANAGEMENT_AGENT_USERS]))
    found = [u["user"] for u in (users or {}).get("users", [])]
    if found:
        profile.notes.append(
            f"management agent users found ({', '.join(found)}): the deployment looks managed by Cloud Manager "
            "or Ops Manager; set source_managed_by to use push"
        )


def _read_hosting(profile: SourceProfile, hints: DeploymentHints,
                  aws_lookup: Callable[[list[str]], str | None] | None) -> None:
    if hints.hosting:
        profile.hosting = None if hints.hosting == "none" else hints.hosting
        profile.hosting_evidence = "declared by the operator"
        return
    hosts = profile.members or profile.hosts
    if host := _host_suffix(hosts, COMPOSE_SUFFIXES):
        profile.hosting, profile.hosting_evidence = "compose", f"host name {host}"
    elif host := _host_suffix(hosts, AWS_SUFFIXES):
        profile.hosting, profile.hosting_evidence = "aws", f"host name {host}"
    elif aws_lookup is not None and (evidence := aws_lookup(hosts)):
        profile.hosting, profile.hosting_evidence = "aws", evidence
    else:
        profile.hosting = "other"
        checked = "host names" + (" and EC2 lookup" if aws_lookup else "")
        profile.hosting_evidence = f"not Compose or AWS by {checked}"
        if host := _host_suffix(hosts, ATLAS_SUFFIXES):
            profile.notes.append(
                f"{host} is an Atlas cluster: if it is a shared tier (M0, Flex, M2/M5) set source_hosting=atlas_shared_tier"
            )


def _list_databases(client, probe) -> list[str] | None:
    from pymongo.errors import OperationFailure

    def names() -> list[str]:
        try:
            return client.list_database_names()
        except OperationFailure as exc:
            if exc.code != 13:
                raise
        # Restricted users may list only the databases they hold privileges on, plus (where that list is
        # refused or incomplete) the databases named in their own privileges.
        names: set[str] = set()
        try:
            names |= {d["name"] for d in client.list_databases(nameOnly=True, authorizedDatabases=True)}
        except OperationFailure as exc:
            if exc.code != 13:
                raise
        status = client.admin.command("connectionStatus", showPrivileges=True)
        auth = status.get("authInfo", {})
        names |= {p.get("resource", {}).get("db") or "" for p in auth.get("authenticatedUserPrivileges", [])}
        # Database-scoped roles (read, readWrite, dbOwner on X) name their database too.
        names |= {r.get("db") or "" for r in auth.get("authenticatedUserRoles", []) if r.get("db") != "admin"}
        return sorted(n for n in names if n)

    return probe("inventory", names)


def driver_refusal(client, db_name: str, collection: str | None = None) -> str | None:
    """Why pymongo refuses to address this database (or collection), in its own words plus what it means;
    None when it accepts it. The server accepts some of these names (a collection ``a/../escape`` on
    mongod; a database with a space on some servers), so the source may hold them."""
    from pymongo.errors import InvalidName

    try:
        db = client[db_name]
    except InvalidName as exc:
        return f"the driver refuses the database name: {exc}"
    if collection is None:
        return None
    try:
        db[collection]
    except InvalidName as exc:
        # pymongo says "cannot be empty" for a name containing "..": say what is actually wrong.
        hint = " (the name contains '..')" if ".." in collection and "empty" in str(exc) else ""
        return f"the driver refuses the collection name: {exc}{hint}"
    return None


def _read_inventory(client, profile: SourceProfile, probe) -> None:
    databases = _list_databases(client, probe)
    if databases is None:
        return
    for db_name in sorted(databases):
        if is_never_migrated(db_name):
            continue
        if refused := driver_refusal(client, db_name):
            # Its collections cannot even be listed through the driver: the whole database is refused.
            profile.refused_names.append({"db": db_name, "collection": None, "reason": refused})
            continue
        db = client[db_name]
        infos = probe(f"collections:{db_name}", lambda db=db: list(db.list_collections()))
        for info in sorted(infos or [], key=lambda i: i["name"]):
            name = info["name"]
            if is_never_migrated(db_name, name):
                continue
            if refused := driver_refusal(client, db_name, name):
                profile.refused_names.append({"db": db_name, "collection": name, "reason": refused})
                continue
            profile.collections.append(_collection_info(db, info, profile, probe))


def _collection_info(db, info: dict, profile: SourceProfile, probe) -> CollectionInfo:
    name, options = info["name"], dict(info.get("options", {}))
    kind = info.get("type", "collection")
    if kind == "collection" and options.get("capped"):
        kind = "capped"
    entry = CollectionInfo(db=db.name, name=name, type=kind, options=_jsonable(options))
    if kind == "view":
        return entry
    ns = f"{db.name}.{name}"
    coll = db[name]
    entry.documents = probe(f"documents:{ns}", coll.estimated_document_count)
    stats = probe(f"size:{ns}", lambda: db.command("collStats", name))
    if stats:
        entry.size_bytes = int(stats.get("size", 0))
    indexes = probe(f"indexes:{ns}", lambda: list(coll.list_indexes()))
    if indexes is not None:
        entry.indexes = _jsonable([dict(ix) for ix in indexes])
    return entry
