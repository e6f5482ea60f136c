"""A local stand-in for the Atlas Administration API v2 and the Cloud Manager API (live migration, push).

It implements sections 1 and 2 of ``/work/shared/contracts/README.md``: the same paths, methods, bodies,
status codes, state machines and error shapes as the real services, so a client that passes against it
works against ``https://cloud.mongodb.com``. Everything lives in memory (optionally mirrored to a JSON
state file) and every reply takes milliseconds.

Running it
----------
In-thread (tests)::

    with AtlasApiServer(Scenario(speed=100)) as server:
        server.url                      # http://127.0.0.1:<free port>
        server.advance(3600)            # move the simulated clock
        server.update_scenario(validation_outcome="FAILED")

As a process (demo, DAG tests)::

    python -m devtools.atlas_api_server --port 0 --state-file /tmp/atlas.json [--scenario s.json] [--speed 60]

It prints ``listening on http://127.0.0.1:<port>`` once ready. ``--state-file``: loaded at start when it
exists (scenario, clock and every object), rewritten after each change, so a restarted server resumes.

What is faithful
----------------
- Auth. Atlas ``/api/atlas/v2``: HTTP Digest (RFC 7616, ``qop=auth``, realm ``MMS Public API``, nonces that
  expire and are then answered ``stale=true``, nonce-count replay check; MD5 like Atlas, SHA-256 on request)
  with the public/private API key, or ``Authorization: Bearer`` with a token from ``POST /api/oauth/token``
  (Basic ``clientId:clientSecret``, form body ``grant_type=client_credentials``, ``expires_in`` 3600,
  expired and unknown tokens refused). Cloud Manager ``/api/public/v1.0``: Digest with its own keys.
- Versioning. Every Atlas call needs ``Accept: application/vnd.atlas.<date>+json`` naming a version that
  endpoint has (table in the contract); a missing or unknown one gets ``406 INVALID_VERSION_DATE`` and a
  retired one ``410 VERSION_GONE`` (``GET /clusters/{name}`` retired 2023-01-01 and 2023-02-01), as Atlas
  answers. Success replies carry ``Content-Type: application/vnd.atlas.<date>+json``, errors
  ``application/json``. Bodies must be JSON (``415`` otherwise); unknown fields are refused (Atlas rejects
  rather than ignores them).
- Errors: ``{"error", "errorCode", "detail", "reason", "parameters"}``. Ids: 24 lowercase hex (ObjectId
  layout). A token bucket per principal answers ``429 RATE_LIMITED_TOKEN_BUCKET`` with ``Retry-After``.
- State machines, derived from a simulated clock (``now = start + real_elapsed * speed + advanced``):
  link token -> Cloud Manager ``migrationLink`` (NOT_SYNCED -> SYNCED after ``link_sync_seconds``; deleting
  the Atlas link tokens breaks it); ``availableProjects`` lists the linked Cloud Manager org's projects
  (only once SYNCED unless ``require_link=False``); validation PENDING -> SUCCESS | FAILED (with
  ``errorMessage``); live migration NEW -> WORKING (``lagTimeSeconds`` falling) -> ``readyForCutover`` ->
  cutover (refused with 400 before that) -> COMPLETE, or FAILED, or EXPIRED once the 120-hour cutover
  window passes without a cutover; peers INITIATING -> PENDING_ACCEPTANCE (``connectionId`` pcx-...) ->
  accepted (admin call standing in for the AWS side, or after ``peer_auto_accept_after_seconds``) ->
  FINALIZING -> AVAILABLE, or FAILED with ``errorStateName``.
- ``validation_outcome="auto"`` and ``migration_outcome="auto"`` run the documented checks: linked org,
  source project and deployment known, source and destination on 6.0.17+ / 7.0.13+ (8.0+ accepted),
  exactly one migration host and one the source project offers, destination empty or
  ``dropDestinationData``.

Error codes: ``INVALID_VERSION_DATE``, ``VERSION_GONE``, ``RATE_LIMITED_TOKEN_BUCKET``, ``CLUSTER_NOT_FOUND``,
``GROUP_NOT_FOUND``, ``ORG_NOT_FOUND``, ``INVALID_GROUP_ID``, ``INVALID_ORG_ID``, ``INVALID_ATTRIBUTE``,
``MISSING_ATTRIBUTE``, ``INVALID_IP_ADDRESS_OR_CIDR_NOTATION``, ``UNEXPECTED_ERROR`` are Atlas's own. We could
not confirm the codes Atlas uses for the following and chose descriptive ones: 401 ``UNAUTHORIZED`` (detail
"You are not authorized for this resource.", as Atlas says), cutover before ready
``LIVE_MIGRATION_NOT_READY_FOR_CUTOVER``, unknown ids ``RESOURCE_NOT_FOUND``, malformed ids
``INVALID_PATH_PARAMETER``, ``INVALID_JSON``, ``UNSUPPORTED_MEDIA_TYPE``, ``INVALID_LINK_TOKEN``,
``INVALID_GRANT_TYPE``, ``CONTAINER_ALREADY_EXISTS``.

Scenario knobs (``Scenario`` fields; change them with ``update_scenario`` or ``PATCH /__test__/scenario``)
------------------------------------------------------------------------------------------------------------
- Credentials: ``api_keys`` {public: private} (Atlas), ``cloud_manager_api_keys`` (Cloud Manager; empty =
  same as ``api_keys``), ``service_accounts`` {client_id: secret}, ``digest_algorithms`` (["MD5"]).
- Tenancy: ``atlas_org_id``, ``atlas_project_id``, ``atlas_project_name``, ``cloud_manager_org_id``,
  ``source_projects`` (Cloud Manager projects: name, project_id, migration_hosts, deployments: name,
  cluster_id, mongodb_version, fcv, managed, sharded, shards_size, tls_enabled, db_size_bytes,
  oplog_size_mb, agent_version), ``clusters`` (Atlas destination clusters: name, mongodb_version,
  cluster_type, region_name, instance_size, has_data, standard / standard_srv connection strings).
- Time: ``speed`` (simulated seconds per real second), ``token_ttl_seconds`` (3600), ``nonce_ttl_seconds``,
  ``link_sync_seconds``, ``validation_seconds``, ``migration_new_seconds``, ``migration_initial_lag_seconds``,
  ``migration_lag_decay_per_second``, ``migration_ready_lag_seconds``, ``migration_cutover_seconds``,
  ``migration_fail_after_seconds``, ``cutover_window_seconds`` (120 h), ``peer_initiating_seconds``,
  ``peer_auto_accept_after_seconds`` (None = only an explicit accept), ``peer_finalizing_seconds``,
  ``peer_fail_after_seconds``. Objects copy the timings when they are created.
- Outcomes: ``validation_outcome`` ("auto" | "SUCCESS" | "FAILED") with ``validation_error_message``;
  ``migration_outcome`` ("auto" | "FAILED"); ``peer_outcome`` ("AVAILABLE" | "FAILED") with
  ``peer_error_state_name``; ``require_link``.
- Limits: ``rate_limit_capacity`` / ``rate_limit_refill_per_second`` (None = no limit), real time.
- AWS (optional): ``aws_endpoint_url`` (an EC2 endpoint such as moto in server mode). Set, the peering
  is played against AWS as Atlas does it: a container gets a real VPC (its ``atlasCidrBlock``) standing in
  for Atlas's own; a peer request creates a real VPC peering connection from it into the customer's
  ``vpcId`` (its ``pcx-`` id is the peer's ``connectionId``, ``pending-acceptance`` in AWS); the customer
  accepts it in AWS (``AcceptVpcPeeringConnection``), and the peer turns FINALIZING then AVAILABLE once
  ``GET /peers/{id}`` sees it ``active``; rejected or deleted in AWS turns it FAILED. Without it, the
  admin ``accept`` call stands in for the AWS side.
- Data (optional): ``local_uri`` on a deployment (``source_projects[].deployments[]``) and on a cluster
  (``clusters[]``): MongoDB connection strings of local servers playing the source deployment and the Atlas
  cluster. See "Moving data" below.

Moving data (the stand-in's approximation of the push)
------------------------------------------------------
Atlas's push runs mongosync on the migration host: an initial copy, then continuous change application
until the cutover. The stand-in moves no data while a migration is WORKING; when a cutover is requested for
a migration whose source deployment and destination cluster both have a ``local_uri``, it copies every
non-system namespace (not ``admin``/``local``/``config``, not ``system.*``) from the source server to the
target server in a background thread, with the project's built-in engine (``atlas_migration.engines.native``:
``dump_collection``/``restore_collection`` as raw BSON with options and indexes, then ``restore_view``).
With ``dropDestinationData`` it first drops every non-system database of the target. Copying at the
cutover, when application writes are stopped, leaves the target equal to the source, which is what the
real push guarantees once COMPLETE; the intermediate states (target partly filled while WORKING) are not
reproduced. The migration stays WORKING until the copy has finished and ``migration_cutover_seconds`` have
passed, then turns COMPLETE; a copy error turns it FAILED (``copy_status``/``copy_detail`` in
``GET /__test__/state``). A destination cluster with a ``local_uri`` counts as holding data when its server
has any non-system collection (instead of the ``has_data`` flag). A copy interrupted by a restart of the
stand-in is reported FAILED when the state file is loaded again.

Admin endpoints (no auth; under ``/__test__``, which the real API never uses)
-----------------------------------------------------------------------------
``GET /__test__/state``; ``GET|DELETE /__test__/requests`` (request log: method, path, status, auth
scheme, accept); ``GET|PATCH /__test__/scenario``; ``POST /__test__/clock`` ``{"advance_seconds": s}`` and/or
``{"speed": x}``; ``POST|DELETE /__test__/faults`` (``{"status", "count", "method", "path_regex",
"error_code", "detail", "retry_after"}``: the next matching authenticated calls fail that way);
``POST|DELETE /__test__/outage`` (``{"seconds", "mode": "503" | "reset"}``: for that many real seconds every
API call fails before authentication, answered 503 or with the connection closed; migrations carry on);
``POST /__test__/peers/{peerId or pcx-id}/accept|reject``; ``POST /__test__/reset`` (drop every object).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import ipaddress
import json
import math
import os
import re
import secrets
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from devtools.http_service import DispatchingHandler, LoopbackHttpService

REALM = "MMS Public API"
ATLAS_PREFIX = "/api/atlas/v2"
CLOUD_MANAGER_PREFIX = "/api/public/v1.0"
TOKEN_PATH = "/api/oauth/token"
ADMIN_PREFIX = "/__test__"
CUTOVER_WINDOW_SECONDS = 120 * 3600
_HEX24 = re.compile(r"^[a-f0-9]{24}$")
_VND = re.compile(r"application/vnd\.atlas\.(\d{4}-\d{2}-\d{2})\+json", re.IGNORECASE)
_ATLAS_REGION = re.compile(r"^[A-Z0-9_]+$")
_SUPPORTED_DIGEST = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


def object_id() -> str:
    """A 24-lowercase-hex id laid out like a MongoDB ObjectId (4-byte timestamp, 8 random bytes)."""
    return int(time.time()).to_bytes(4, "big").hex() + os.urandom(8).hex()


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def live_migration_version_ok(version: str) -> bool:
    """Push and pull live migration need 6.0.17+ or 7.0.13+ on both sides (8.0+ is past both floors)."""
    v = version_tuple(version)
    if v < (6, 0, 17):
        return False
    return not ((7, 0, 0) <= v < (7, 0, 13))


# --------------------------------------------------------------------------------------------------
# Scenario (configuration)
# --------------------------------------------------------------------------------------------------


@dataclass
class DeploymentSpec:
    """A Cloud Manager-monitored source deployment as ``availableProjects`` reports it."""

    name: str = "rs0"
    cluster_id: str = field(default_factory=object_id)
    mongodb_version: str = "7.0.14"
    fcv: str = "7.0"
    managed: bool = True
    sharded: bool = False
    shards_size: int = 0
    tls_enabled: bool = False
    db_size_bytes: int = 512 * 1024 * 1024
    oplog_size_mb: int = 2048
    agent_version: str = "13.30.0.8945-1"
    local_uri: str | None = None  # stand-in only: a local server playing this deployment ("Moving data")

    def to_api(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "clusterId": self.cluster_id,
            "mongoDBVersion": self.mongodb_version,
            "featureCompatibilityVersion": self.fcv,
            "managed": self.managed,
            "sharded": self.sharded,
            "shardsSize": self.shards_size,
            "tlsEnabled": self.tls_enabled,
            "dbSizeBytes": self.db_size_bytes,
            "oplogSizeMB": self.oplog_size_mb,
            "agentVersion": self.agent_version,
        }


@dataclass
class SourceProjectSpec:
    """A Cloud Manager project with its migration hosts and deployments."""

    name: str = "on-prem"
    project_id: str = field(default_factory=object_id)
    migration_hosts: list[str] = field(default_factory=lambda: ["migration-host-0.example.net"])
    deployments: list[DeploymentSpec] = field(default_factory=lambda: [DeploymentSpec()])


@dataclass
class ClusterSpec:
    """An Atlas destination cluster in the project."""

    name: str = "Cluster0"
    mongodb_version: str = "7.0.14"
    cluster_type: str = "REPLICASET"
    provider_name: str = "AWS"
    region_name: str = "US_EAST_1"
    instance_size: str = "M10"
    has_data: bool = False
    standard: str | None = None  # connection strings; defaults derive from the name
    standard_srv: str | None = None
    cluster_id: str = field(default_factory=object_id)
    local_uri: str | None = None  # stand-in only: a local server playing this cluster ("Moving data")


@dataclass
class Scenario:
    """Everything a test may configure; see the module docstring for what each knob drives."""

    api_keys: dict[str, str] = field(default_factory=lambda: {"local-public-key": "local-private-key"})
    cloud_manager_api_keys: dict[str, str] = field(default_factory=dict)
    service_accounts: dict[str, str] = field(default_factory=dict)
    digest_algorithms: list[str] = field(default_factory=lambda: ["MD5"])
    atlas_org_id: str = "6507f1f77bcf86cd79943901"
    atlas_project_id: str = "6507f1f77bcf86cd79943902"
    atlas_project_name: str = "migration-target"
    cloud_manager_org_id: str = "6507f1f77bcf86cd79943903"
    source_projects: list[SourceProjectSpec] = field(
        default_factory=lambda: [SourceProjectSpec(project_id="6507f1f77bcf86cd79943904")]
    )
    clusters: list[ClusterSpec] = field(default_factory=lambda: [ClusterSpec()])
    speed: float = 1.0
    token_ttl_seconds: float = 3600.0
    nonce_ttl_seconds: float = 300.0
    link_sync_seconds: float = 5.0
    validation_seconds: float = 5.0
    migration_new_seconds: float = 10.0
    migration_initial_lag_seconds: float = 600.0
    migration_lag_decay_per_second: float = 10.0
    migration_ready_lag_seconds: float = 10.0
    migration_cutover_seconds: float = 30.0
    migration_fail_after_seconds: float = 30.0
    cutover_window_seconds: float = CUTOVER_WINDOW_SECONDS
    peer_initiating_seconds: float = 5.0
    peer_auto_accept_after_seconds: float | None = None
    peer_finalizing_seconds: float = 5.0
    peer_fail_after_seconds: float = 10.0
    validation_outcome: str = "auto"
    validation_error_message: str = "Source deployment failed validation."
    migration_outcome: str = "auto"
    peer_outcome: str = "AVAILABLE"
    peer_error_state_name: str = "REJECTED"
    require_link: bool = True
    rate_limit_capacity: int | None = None
    rate_limit_refill_per_second: float | None = None
    aws_endpoint_url: str | None = None  # see "AWS (optional)" above

    def cloud_manager_keys(self) -> dict[str, str]:
        return self.cloud_manager_api_keys or self.api_keys

    def cluster(self, name: str) -> ClusterSpec | None:
        return next((c for c in self.clusters if c.name == name), None)

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial update (admin endpoint / ``update_scenario``); unknown keys are an error."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown scenario field(s): {', '.join(unknown)}")
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        rebuilt = scenario_from_dict({**current, **changes})
        for f in fields(self):
            setattr(self, f.name, getattr(rebuilt, f.name))


def scenario_from_dict(data: dict[str, Any]) -> Scenario:
    data = dict(data)
    # Accept the nested specs as dataclasses (Python callers) or plain dicts (JSON callers).
    projects = [
        p if isinstance(p, SourceProjectSpec) else SourceProjectSpec(**{
            **p, "deployments": [d if isinstance(d, DeploymentSpec) else DeploymentSpec(**d)
                                 for d in p.get("deployments", [])]})
        for p in data.pop("source_projects", [SourceProjectSpec()])
    ]
    clusters = [c if isinstance(c, ClusterSpec) else ClusterSpec(**c) for c in data.pop("clusters", [ClusterSpec()])]
    known = {f.name for f in fields(Scenario)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown scenario field(s): {', '.join(unknown)}")
    return Scenario(source_projects=projects, clusters=clusters, **data)


# --------------------------------------------------------------------------------------------------
# Simulated clock, rate limiting, injected faults
# --------------------------------------------------------------------------------------------------


class SimClock:
    """Epoch seconds that run ``speed`` times faster than real time and can jump forward."""

    def __init__(self, speed: float = 1.0, start: float | None = None) -> None:
        self._lock = threading.Lock()
        self._speed = speed
        self._real0 = time.monotonic()
        self._sim0 = time.time() if start is None else start

    def now(self) -> float:
        with self._lock:
            return self._sim0 + (time.monotonic() - self._real0) * self._speed

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._sim0 += seconds

    def set_speed(self, speed: float) -> None:
        with self._lock:
            self._sim0 += (time.monotonic() - self._real0) * self._speed
            self._real0 = time.monotonic()
            self._speed = speed

    @property
    def speed(self) -> float:
        return self._speed


class TokenBucket:
    """Classic token bucket in real seconds: ``take`` returns 0 when allowed, else the wait in seconds."""

    def __init__(self, capacity: int, refill_per_second: float) -> None:
        self.capacity = capacity
        self.refill = refill_per_second
        self.tokens = float(capacity)
        self.updated = time.monotonic()

    def take(self) -> float:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.refill)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.refill if self.refill > 0 else 60.0


@dataclass
class Fault:
    """The next ``count`` authenticated calls matching ``method``/``path_regex`` fail with ``status``."""

    status: int
    count: int = 1
    method: str | None = None
    path_regex: str | None = None
    error_code: str | None = None
    detail: str | None = None
    retry_after: int | None = None

    def matches(self, method: str, path: str) -> bool:
        if self.count <= 0:
            return False
        if self.method and self.method.upper() != method:
            return False
        return not (self.path_regex and not re.search(self.path_regex, path))


@dataclass
class Outage:
    """For ``seconds`` of real time from ``started`` (``time.monotonic``), every API call (Atlas, Cloud Manager,
    the token endpoint; not ``/__test__``) fails before it is authenticated or routed, as when the service or
    its gateway is down: ``mode`` "503" answers ``503 SERVICE_UNAVAILABLE`` in the error shape, "reset" closes
    the connection without an answer. Nothing else changes: migrations go on along the simulated clock (a
    live migration runs on the migration host whether or not the API answers)."""

    seconds: float
    mode: str = "503"
    started: float = field(default_factory=time.monotonic)

    MODES = ("503", "reset")

    def __post_init__(self) -> None:
        self.seconds = float(self.seconds)
        self.mode = str(self.mode)
        if self.mode not in self.MODES or self.seconds < 0:
            raise ValueError(f"an outage needs seconds >= 0 and mode one of {', '.join(self.MODES)}")

    def remaining(self) -> float:
        return max(0.0, self.started + self.seconds - time.monotonic())


_DEFAULT_FAULT_CODES = {
    400: "INVALID_ATTRIBUTE", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "RESOURCE_NOT_FOUND",
    409: "CONFLICT", 429: "RATE_LIMITED_TOKEN_BUCKET", 500: "UNEXPECTED_ERROR", 502: "UNEXPECTED_ERROR",
    503: "SERVICE_UNAVAILABLE", 504: "UNEXPECTED_ERROR",
}


# --------------------------------------------------------------------------------------------------
# Stored objects (all times are simulated epoch seconds)
# --------------------------------------------------------------------------------------------------


@dataclass
class LinkTokenRecord:
    token: str
    org_id: str
    access_list_ips: list[str]
    created_at: float
    revoked: bool = False


@dataclass
class MigrationLinkRecord:
    cloud_manager_org_id: str
    atlas_org_id: str
    token: str
    created_at: float
    sync_seconds: float


@dataclass
class ValidationRecord:
    id: str
    group_id: str
    source_group_id: str
    created_at: float
    pending_seconds: float
    outcome: str
    error_message: str | None

    def to_api(self, now: float) -> dict[str, Any]:
        done = now - self.created_at >= self.pending_seconds
        status = self.outcome if done else "PENDING"
        return {
            "_id": self.id,
            "groupId": self.group_id,
            "sourceGroupId": self.source_group_id,
            "status": status,
            "errorMessage": self.error_message if status == "FAILED" else None,
        }


@dataclass
class MigrationRecord:
    id: str
    group_id: str
    migration_hosts: list[str]
    destination_cluster: str
    created_at: float
    new_seconds: float
    initial_lag: float
    lag_decay: float
    ready_lag: float
    cutover_seconds: float
    cutover_window: float
    fail_after: float | None  # seconds after creation when it turns FAILED; None = never
    failure_reason: str | None = None
    cutover_at: float | None = None
    source_group_id: str | None = None
    source_cluster: str | None = None
    drop_destination_data: bool = False
    copy_status: str | None = None  # None (no data to move) | running | done | failed
    copy_detail: str | None = None

    LAG_FLOOR = 1.0

    def ready_offset(self) -> float:
        """Seconds after creation when the lag first reaches ``ready_lag`` (the 120-hour timer starts)."""
        catch_up = max(0.0, self.initial_lag - self.ready_lag) / self.lag_decay if self.lag_decay > 0 else math.inf
        return self.new_seconds + catch_up

    def state(self, now: float) -> tuple[str, bool, int | None]:
        """(status, readyForCutover, lagTimeSeconds or None)."""
        t = now - self.created_at
        if self.cutover_at is not None:
            if self.copy_status == "failed":
                return "FAILED", False, None
            if self.copy_status != "running" and now - self.cutover_at >= self.cutover_seconds:
                return "COMPLETE", False, None
            return "WORKING", True, None
        if self.fail_after is not None and t >= self.fail_after:
            return "FAILED", False, None
        if t < self.new_seconds:
            return "NEW", False, None
        if t >= self.ready_offset() + self.cutover_window:
            return "EXPIRED", False, None
        lag = max(self.LAG_FLOOR, self.initial_lag - self.lag_decay * (t - self.new_seconds))
        return "WORKING", lag <= self.ready_lag, int(round(lag))

    def to_api(self, now: float) -> dict[str, Any]:
        status, ready, lag = self.state(now)
        body: dict[str, Any] = {"_id": self.id, "status": status, "readyForCutover": ready,
                                "migrationHosts": list(self.migration_hosts)}
        if lag is not None:
            body["lagTimeSeconds"] = lag
        return body


@dataclass
class ContainerRecord:
    id: str
    group_id: str
    provider_name: str
    atlas_cidr_block: str
    region_name: str
    vpc_id: str

    def to_api(self) -> dict[str, Any]:
        return {"id": self.id, "providerName": self.provider_name, "atlasCidrBlock": self.atlas_cidr_block,
                "regionName": self.region_name, "vpcId": self.vpc_id, "provisioned": False}


@dataclass
class PeerRecord:
    id: str
    group_id: str
    container_id: str
    accepter_region_name: str
    aws_account_id: str
    route_table_cidr_block: str
    vpc_id: str
    connection_id: str
    created_at: float
    initiating_seconds: float
    auto_accept_after: float | None
    finalizing_seconds: float
    fails: bool
    fail_after: float
    error_state_name: str
    accepted_at: float | None = None
    rejected_at: float | None = None
    aws_linked: bool = False  # the connection_id is a real peering connection at Scenario.aws_endpoint_url
    deleted_at: float | None = None  # DELETE /peers/{id}: TERMINATING, then gone

    def gone(self, now: float) -> bool:
        return self.deleted_at is not None and now - self.deleted_at >= self.finalizing_seconds

    def state(self, now: float) -> tuple[str, str | None]:
        """(statusName, errorStateName)."""
        if self.deleted_at is not None:
            return "TERMINATING", None
        t = now - self.created_at
        if t < self.initiating_seconds:
            return "INITIATING", None
        if self.rejected_at is not None and now >= self.rejected_at:
            return "FAILED", "REJECTED"
        accepted_at = self.accepted_at
        if accepted_at is None and self.auto_accept_after is not None and t >= self.auto_accept_after:
            accepted_at = self.created_at + max(self.auto_accept_after, self.initiating_seconds)
        if self.fails and t >= self.fail_after and (accepted_at is None or accepted_at > self.created_at + self.fail_after):
            return "FAILED", self.error_state_name
        if accepted_at is None:
            return "PENDING_ACCEPTANCE", None
        if now - accepted_at < self.finalizing_seconds:
            return "FINALIZING", None
        return "AVAILABLE", None

    def to_api(self, now: float) -> dict[str, Any]:
        status, error_state = self.state(now)
        return {
            "id": self.id,
            "containerId": self.container_id,
            "providerName": "AWS",
            "accepterRegionName": self.accepter_region_name,
            "awsAccountId": self.aws_account_id,
            "routeTableCidrBlock": self.route_table_cidr_block,
            "vpcId": self.vpc_id,
            # Atlas only knows the AWS peering connection id once it has asked AWS for it.
            "connectionId": None if status == "INITIATING" else self.connection_id,
            "statusName": status,
            "errorStateName": error_state,
        }


@dataclass
class AccessListRecord:
    group_id: str
    cidr_block: str
    ip_address: str | None
    comment: str | None

    def to_api(self) -> dict[str, Any]:
        body: dict[str, Any] = {"cidrBlock": self.cidr_block, "groupId": self.group_id}
        if self.ip_address:
            body["ipAddress"] = self.ip_address
        if self.comment is not None:
            body["comment"] = self.comment
        return body


@dataclass
class TokenRecord:
    token: str
    client_id: str
    expires_at: float


# --------------------------------------------------------------------------------------------------
# Errors and routing
# --------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error reply in Atlas's shape."""

    def __init__(self, status: int, code: str, detail: str, parameters: list[Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.parameters = parameters or []
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"detail": self.detail, "error": self.status, "errorCode": self.code,
                "parameters": self.parameters, "reason": HTTPStatus(self.status).phrase}


@dataclass
class Reply:
    status: int
    body: Any = None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any  # http.client.HTTPMessage
    body: bytes
    params: dict[str, str] = field(default_factory=dict)
    principal: str | None = None

    def json(self) -> Any:
        if not self.body:
            raise ApiError(400, "INVALID_JSON", "Request body is empty; a JSON document is required.")
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json" and not re.fullmatch(r"application/vnd\.atlas\.[\d-]+\+json", ctype):
            raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", f"Unsupported media type {ctype or '(none)'}.")
        try:
            return json.loads(self.body)
        except ValueError:
            raise ApiError(400, "INVALID_JSON", "Received JSON is malformed.") from None


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: str
    service: str  # "atlas", "cloud_manager"
    versions: tuple[str, ...] = ()
    gone: tuple[str, ...] = ()


def _route(method: str, template: str, handler: str, service: str = "atlas", versions: tuple[str, ...] = (),
           gone: tuple[str, ...] = ()) -> Route:
    regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template)
    prefix = ATLAS_PREFIX if service == "atlas" else CLOUD_MANAGER_PREFIX
    return Route(method, re.compile(f"^{prefix}{regex}$"), handler, service, versions, gone)


V20230101 = ("2023-01-01",)
V20240530 = ("2024-05-30",)
ROUTES: tuple[Route, ...] = (
    _route("POST", "/orgs/{orgId}/liveMigrations/linkTokens", "create_link_token", versions=V20230101),
    _route("DELETE", "/orgs/{orgId}/liveMigrations/linkTokens", "delete_link_tokens", versions=V20230101),
    _route("GET", "/orgs/{orgId}/liveMigrations/availableProjects", "available_projects", versions=V20230101),
    _route("POST", "/groups/{groupId}/liveMigrations/validate", "validate", versions=V20240530),
    _route("GET", "/groups/{groupId}/liveMigrations/validate/{validationId}", "get_validation", versions=V20230101),
    _route("POST", "/groups/{groupId}/liveMigrations", "create_migration", versions=V20240530),
    _route("GET", "/groups/{groupId}/liveMigrations/{liveMigrationId}", "get_migration", versions=V20230101),
    _route("PUT", "/groups/{groupId}/liveMigrations/{liveMigrationId}/cutover", "cutover", versions=V20230101),
    _route("GET", "/groups/{groupId}/clusters/{clusterName}", "get_cluster", versions=("2024-08-05",),
           gone=("2023-01-01", "2023-02-01")),
    _route("POST", "/groups/{groupId}/containers", "create_container", versions=V20230101),
    _route("GET", "/groups/{groupId}/containers", "list_containers", versions=V20230101),
    _route("POST", "/groups/{groupId}/peers", "create_peer", versions=V20230101),
    _route("GET", "/groups/{groupId}/peers/{peerId}", "get_peer", versions=V20230101),
    _route("GET", "/groups/{groupId}/peers", "list_peers", versions=V20230101),
    _route("DELETE", "/groups/{groupId}/peers/{peerId}", "delete_peer", versions=V20230101),
    _route("DELETE", "/groups/{groupId}/containers/{containerId}", "delete_container", versions=V20230101),
    _route("DELETE", "/groups/{groupId}/accessList/{entryValue}", "delete_access_list", versions=V20230101),
    _route("POST", "/groups/{groupId}/accessList", "add_access_list", versions=V20230101),
    _route("GET", "/groups/{groupId}/accessList", "list_access_list", versions=V20230101),
    _route("POST", "/orgs/{orgId}/liveExport/migrationLink", "cm_create_link", service="cloud_manager"),
    _route("DELETE", "/orgs/{orgId}/liveExport/migrationLink", "cm_delete_link", service="cloud_manager"),
    _route("GET", "/orgs/{orgId}/liveExport/migrationLink/status", "cm_link_status", service="cloud_manager"),
)


# --------------------------------------------------------------------------------------------------
# Body checking (Atlas refuses unknown fields instead of ignoring them)
# --------------------------------------------------------------------------------------------------


def _check_object(value: Any, where: str, required: dict[str, type | tuple[type, ...]],
                  optional: dict[str, type | tuple[type, ...]] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ApiError(400, "INVALID_ATTRIBUTE", f"Invalid attribute {where} specified.", [where])
    optional = optional or {}
    for key in value:
        if key not in required and key not in optional:
            name = f"{where}.{key}" if where else key
            raise ApiError(400, "INVALID_ATTRIBUTE", f"Invalid attribute {name} specified.", [name])
    for key, kind in {**required, **optional}.items():
        name = f"{where}.{key}" if where else key
        if key not in value or value[key] is None:
            if key in required:
                raise ApiError(400, "MISSING_ATTRIBUTE", f"The required attribute {name} was not specified.",
                               [name])
            continue
        # bool is an int subclass: never accept true for a number or 1 for a flag
        wrong = (kind is bool and not isinstance(value[key], bool)) or (
            kind is not bool and (isinstance(value[key], bool) or not isinstance(value[key], kind)))
        if wrong:
            raise ApiError(400, "INVALID_ATTRIBUTE", f"Invalid attribute {name} specified.", [name])
    return value


def _check_hex(value: str, name: str) -> str:
    if not _HEX24.match(value):
        raise ApiError(400, "INVALID_ATTRIBUTE", f"Invalid attribute {name} specified.", [name])
    return value


def check_live_migration_body(body: Any) -> dict[str, Any]:
    """The 2024-05-30 create/validate body; returns it unchanged when valid."""
    _check_object(body, "", {"source": dict, "destination": dict, "migrationHosts": list},
                  {"dropDestinationData": bool, "sharding": dict})
    source = _check_object(body["source"], "source",
                           {"clusterName": str, "groupId": str, "managedAuthentication": bool, "ssl": bool},
                           {"username": str, "password": str, "caCertificatePath": str})
    _check_hex(source["groupId"], "source.groupId")
    dest = _check_object(body["destination"], "destination",
                         {"clusterName": str, "groupId": str, "hostnameSchemaType": str}, {"privateLinkId": str})
    _check_hex(dest["groupId"], "destination.groupId")
    if dest["hostnameSchemaType"] not in ("PUBLIC", "PRIVATE_LINK", "VPC_PEERING"):
        raise ApiError(400, "INVALID_ATTRIBUTE", "Invalid attribute destination.hostnameSchemaType specified.",
                       ["destination.hostnameSchemaType"])
    if dest["hostnameSchemaType"] == "PRIVATE_LINK" and not dest.get("privateLinkId"):
        raise ApiError(400, "MISSING_ATTRIBUTE",
                       "The required attribute destination.privateLinkId was not specified.",
                       ["destination.privateLinkId"])
    hosts = body["migrationHosts"]
    if len(hosts) != 1 or not all(isinstance(h, str) and h for h in hosts):
        raise ApiError(400, "INVALID_ATTRIBUTE", "Invalid attribute migrationHosts specified: exactly one "
                       "migration host is required.", ["migrationHosts"])
    if "sharding" in body and body["sharding"] is not None:
        sharding = _check_object(body["sharding"], "sharding", {"createSupportingIndexes": bool,
                                                                "shardingEntries": list})
        for i, entry in enumerate(sharding["shardingEntries"]):
            where = f"sharding.shardingEntries[{i}]"
            entry = _check_object(entry, where, {"database": str, "collection": str, "shardCollection": dict})
            key = _check_object(entry["shardCollection"], f"{where}.shardCollection", {"key": list})["key"]
            if not key or not all(isinstance(k, dict) and len(k) == 1 for k in key):
                raise ApiError(400, "INVALID_ATTRIBUTE", f"Invalid attribute {where}.shardCollection.key "
                               "specified.", [f"{where}.shardCollection.key"])
    return body


# --------------------------------------------------------------------------------------------------
# The service
# --------------------------------------------------------------------------------------------------


class AtlasApiState:
    """All mutable state and the endpoint implementations; the HTTP layer only parses and dispatches."""

    def __init__(self, scenario: Scenario, state_file: Path | None = None) -> None:
        self.lock = threading.RLock()
        self.scenario = scenario
        self.clock = SimClock(scenario.speed)
        self.state_file = state_file
        self.link_tokens: list[LinkTokenRecord] = []
        self.migration_links: dict[str, MigrationLinkRecord] = {}  # by Cloud Manager org id
        self.validations: dict[str, ValidationRecord] = {}
        self.migrations: dict[str, MigrationRecord] = {}
        self.containers: dict[str, ContainerRecord] = {}
        self.peers: dict[str, PeerRecord] = {}
        self.access_list: list[AccessListRecord] = []
        self.tokens: dict[str, TokenRecord] = {}
        self.nonces: dict[str, tuple[float, set[str]]] = {}  # nonce -> (issued real time, seen nc values)
        self.buckets: dict[str, TokenBucket] = {}
        self.faults: list[Fault] = []
        self.outage: Outage | None = None
        self.requests: deque[dict[str, Any]] = deque(maxlen=2000)
        if state_file and state_file.exists():
            self._load(json.loads(state_file.read_text()))

    # ---- persistence --------------------------------------------------------------------------

    _OBJECTS: dict[str, type] = {
        "validations": ValidationRecord, "migrations": MigrationRecord, "containers": ContainerRecord,
        "peers": PeerRecord, "tokens": TokenRecord, "migration_links": MigrationLinkRecord,
    }

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            remaining = self.outage.remaining() if self.outage else 0.0
            data: dict[str, Any] = {"scenario": asdict(self.scenario), "sim_now": self.clock.now(),
                                    "outage_remaining_seconds": remaining,
                                    "link_tokens": [asdict(t) for t in self.link_tokens],
                                    "access_list": [asdict(a) for a in self.access_list]}
            for name in self._OBJECTS:
                data[name] = {key: asdict(rec) for key, rec in getattr(self, name).items()}
            return data

    def _load(self, data: dict[str, Any]) -> None:
        self.scenario = scenario_from_dict(data["scenario"])
        self.clock = SimClock(self.scenario.speed, start=data.get("sim_now"))
        self.link_tokens = [LinkTokenRecord(**t) for t in data.get("link_tokens", [])]
        self.access_list = [AccessListRecord(**a) for a in data.get("access_list", [])]
        for name, cls in self._OBJECTS.items():
            setattr(self, name, {key: cls(**rec) for key, rec in data.get(name, {}).items()})
        for record in self.migrations.values():
            if record.copy_status == "running":  # its thread died with the previous process
                record.copy_status, record.copy_detail = "failed", "the data copy was interrupted by a restart"

    def save(self) -> None:
        if not self.state_file:
            return
        text = json.dumps(self.snapshot(), indent=1, sort_keys=True)
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.state_file)  # atomic: a reader never sees half a file

    def reset(self) -> None:
        with self.lock:
            self.link_tokens.clear()
            self.access_list.clear()
            for name in self._OBJECTS:
                getattr(self, name).clear()
            self.faults.clear()
            self.buckets.clear()

    # ---- authentication -----------------------------------------------------------------------

    def digest_challenges(self, stale: bool = False) -> list[str]:
        nonce = secrets.token_hex(16)
        with self.lock:
            self._expire_nonces()
            self.nonces[nonce] = (time.monotonic(), set())
        return [
            f'Digest realm="{REALM}", domain="", nonce="{nonce}", algorithm={alg}, qop="auth", '
            f"stale={'true' if stale else 'false'}"
            for alg in self.scenario.digest_algorithms
        ]

    def _expire_nonces(self) -> None:
        horizon = time.monotonic() - self.scenario.nonce_ttl_seconds
        for nonce in [n for n, (issued, _) in self.nonces.items() if issued < horizon]:
            del self.nonces[nonce]

    def check_digest(self, method: str, target: str, header: str, keys: dict[str, str]) -> tuple[str | None, bool]:
        """Verify an ``Authorization: Digest`` header. Returns (principal or None, stale)."""
        params = parse_auth_params(header[len("Digest "):])
        username, nonce, response = params.get("username"), params.get("nonce"), params.get("response")
        algorithm = (params.get("algorithm") or "MD5").upper()
        if not (username and nonce and response) or params.get("realm") != REALM:
            return None, False
        if algorithm not in [a.upper() for a in self.scenario.digest_algorithms] or algorithm not in _SUPPORTED_DIGEST:
            return None, False
        if params.get("uri") != target:
            return None, False
        password = keys.get(username)
        if password is None:
            return None, False
        h = _SUPPORTED_DIGEST[algorithm]

        def hexdigest(text: str) -> str:
            return h(text.encode()).hexdigest()

        ha1 = hexdigest(f"{username}:{REALM}:{password}")
        ha2 = hexdigest(f"{method}:{params['uri']}")
        qop = params.get("qop")
        if qop != "auth" or not params.get("nc") or not params.get("cnonce"):
            return None, False  # we only offer qop=auth, which RFC 7616 makes mandatory to answer
        expected = hexdigest(f"{ha1}:{nonce}:{params['nc']}:{params['cnonce']}:auth:{ha2}")
        if not secrets.compare_digest(expected, response):
            return None, False
        with self.lock:
            self._expire_nonces()
            entry = self.nonces.get(nonce)
            if entry is None:
                return None, True  # right credentials, old nonce: ask again with stale=true
            if params["nc"] in entry[1]:
                return None, False  # replayed nonce count
            entry[1].add(params["nc"])
        return username, False

    def check_bearer(self, token: str) -> tuple[str | None, str]:
        with self.lock:
            record = self.tokens.get(token)
            if record is None:
                return None, "The access token is invalid."
            if self.clock.now() >= record.expires_at:
                return None, "The access token has expired."
            return f"sa:{record.client_id}", ""

    def issue_token(self, headers: Any, body: bytes) -> Reply:
        auth = headers.get("Authorization") or ""
        client_id = secret = None
        if auth.startswith("Basic "):
            try:
                client_id, _, secret = base64.b64decode(auth[6:], validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                client_id = None
        expected = self.scenario.service_accounts.get(client_id or "")
        if expected is None or not secrets.compare_digest(expected, secret or ""):
            raise ApiError(401, "UNAUTHORIZED", "Invalid service account client credentials.")
        ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE",
                           "The token endpoint takes an application/x-www-form-urlencoded body.")
        form = parse_qs(body.decode(errors="replace"))
        if form.get("grant_type") != ["client_credentials"]:
            raise ApiError(400, "INVALID_GRANT_TYPE", "grant_type must be client_credentials.", ["grant_type"])
        token = "atls_" + secrets.token_urlsafe(32)
        ttl = self.scenario.token_ttl_seconds
        with self.lock:
            self.tokens[token] = TokenRecord(token, client_id or "", self.clock.now() + ttl)
        return Reply(200, {"access_token": token, "expires_in": int(ttl), "token_type": "Bearer"})

    def rate_limit(self, principal: str) -> float:
        cap, refill = self.scenario.rate_limit_capacity, self.scenario.rate_limit_refill_per_second
        if not cap or refill is None:
            return 0.0
        with self.lock:
            bucket = self.buckets.get(principal)
            if bucket is None or bucket.capacity != cap or bucket.refill != refill:
                bucket = self.buckets[principal] = TokenBucket(cap, refill)
            return bucket.take()

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.count -= 1
                    return fault
            return None

    # ---- tenancy helpers ----------------------------------------------------------------------

    def _org(self, req: Request, cloud_manager: bool = False) -> str:
        org_id = req.params["orgId"]
        if not _HEX24.match(org_id):
            raise ApiError(400, "INVALID_ORG_ID", f"An invalid organization ID {org_id} was specified.", [org_id])
        expected = self.scenario.cloud_manager_org_id if cloud_manager else self.scenario.atlas_org_id
        if org_id != expected:
            raise ApiError(404, "ORG_NOT_FOUND", f"No organization with ID {org_id} exists.", [org_id])
        return org_id

    def _group(self, req: Request) -> str:
        group_id = req.params["groupId"]
        if not _HEX24.match(group_id):
            raise ApiError(400, "INVALID_GROUP_ID", f"An invalid group ID {group_id} was specified.", [group_id])
        if group_id != self.scenario.atlas_project_id:
            raise ApiError(404, "GROUP_NOT_FOUND", f"No group with ID {group_id} exists.", [group_id])
        return group_id

    @staticmethod
    def _id(req: Request, name: str) -> str:
        value = req.params[name]
        if not _HEX24.match(value):
            raise ApiError(400, "INVALID_PATH_PARAMETER", f"Invalid {name} {value}: expected 24 hexadecimal "
                           "characters.", [name, value])
        return value

    def _link_synced(self, now: float) -> bool:
        link = self.migration_links.get(self.scenario.cloud_manager_org_id)
        return link is not None and self._link_status(link, now) == "SYNCED"

    def _link_status(self, link: MigrationLinkRecord, now: float) -> str:
        token = next((t for t in self.link_tokens if t.token == link.token), None)
        if token is None or token.revoked:
            return "NOT_SYNCED"
        return "SYNCED" if now - link.created_at >= link.sync_seconds else "NOT_SYNCED"

    def _visible_projects(self, now: float) -> list[SourceProjectSpec]:
        if self.scenario.require_link and not self._link_synced(now):
            return []
        return self.scenario.source_projects

    def precheck(self, group_id: str, body: dict[str, Any], now: float) -> str | None:
        """What the live-migration validation would report, or None when everything is in order."""
        source, dest, host = body["source"], body["destination"], body["migrationHosts"][0]
        if self.scenario.require_link and not self._link_synced(now):
            return ("The Cloud Manager organization is not linked to this Atlas organization: create a "
                    "link-token and connect it in Cloud Manager first.")
        project = next((p for p in self.scenario.source_projects if p.project_id == source["groupId"]), None)
        if project is None:
            return f"Source project {source['groupId']} is not available for live migration."
        deployment = next((d for d in project.deployments if d.name == source["clusterName"]), None)
        if deployment is None:
            return f"Source deployment {source['clusterName']} was not found in project {project.name}."
        if not live_migration_version_ok(deployment.mongodb_version):
            return (f"Source deployment {deployment.name} runs MongoDB {deployment.mongodb_version}; live "
                    "migration requires 6.0.17+ or 7.0.13+.")
        if host not in project.migration_hosts:
            return f"Migration host {host} is not provisioned for project {project.name}."
        if dest["groupId"] != group_id:
            return f"Destination project {dest['groupId']} does not match the request's project {group_id}."
        cluster = self.scenario.cluster(dest["clusterName"])
        if cluster is None:
            return f"Destination cluster {dest['clusterName']} does not exist."
        if not live_migration_version_ok(cluster.mongodb_version):
            return (f"Destination cluster {cluster.name} runs MongoDB {cluster.mongodb_version}; live "
                    "migration requires 6.0.17+ or 7.0.13+.")
        if self._cluster_has_data(cluster) and not body.get("dropDestinationData", False):
            return (f"Destination cluster {cluster.name} contains data; set dropDestinationData to true to "
                    "replace it.")
        return None

    # ---- Atlas: live migration ----------------------------------------------------------------

    def create_link_token(self, req: Request) -> Reply:
        org_id = self._org(req)
        body = _check_object(req.json(), "", {}, {"accessListIps": list})
        ips = body.get("accessListIps") or []
        for ip in ips:
            _ip_or_cidr(ip, "accessListIps")
        payload = {"orgId": org_id, "accessListIps": ips, "nonce": secrets.token_hex(16)}
        token = base64.b64encode(json.dumps(payload).encode()).decode()
        with self.lock:
            self.link_tokens.append(LinkTokenRecord(token, org_id, ips, self.clock.now()))
        return Reply(200, {"linkToken": token})

    def delete_link_tokens(self, req: Request) -> Reply:
        org_id = self._org(req)
        with self.lock:
            for token in self.link_tokens:
                if token.org_id == org_id:
                    token.revoked = True
        return Reply(204)

    def available_projects(self, req: Request) -> Reply:
        self._org(req)
        now = self.clock.now()
        return Reply(200, [
            {"name": p.name, "projectId": p.project_id, "migrationHosts": list(p.migration_hosts),
             "deployments": [d.to_api() for d in p.deployments]}
            for p in self._visible_projects(now)
        ])

    def validate(self, req: Request) -> Reply:
        group_id = self._group(req)
        body = check_live_migration_body(req.json())
        now = self.clock.now()
        s = self.scenario
        problem = self.precheck(group_id, body, now)
        if s.validation_outcome == "SUCCESS":
            outcome, message = "SUCCESS", None
        elif s.validation_outcome == "FAILED":
            outcome, message = "FAILED", s.validation_error_message
        else:
            outcome, message = ("FAILED", problem) if problem else ("SUCCESS", None)
        record = ValidationRecord(object_id(), group_id, body["source"]["groupId"], now, s.validation_seconds,
                                  outcome, message)
        with self.lock:
            self.validations[record.id] = record
        return Reply(200, record.to_api(now))

    def get_validation(self, req: Request) -> Reply:
        group_id = self._group(req)
        record = self.validations.get(self._id(req, "validationId"))
        if record is None or record.group_id != group_id:
            raise ApiError(404, "RESOURCE_NOT_FOUND", f"No validation job with ID {req.params['validationId']} "
                           "exists in this project.", [req.params["validationId"]])
        return Reply(200, record.to_api(self.clock.now()))

    def create_migration(self, req: Request) -> Reply:
        group_id = self._group(req)
        body = check_live_migration_body(req.json())
        if self.scenario.cluster(body["destination"]["clusterName"]) is None:
            name = body["destination"]["clusterName"]
            raise ApiError(404, "CLUSTER_NOT_FOUND", f"No cluster named {name} exists in group {group_id}.",
                           [name, group_id])
        now = self.clock.now()
        s = self.scenario
        problem = self.precheck(group_id, body, now) if s.migration_outcome == "auto" else None
        if problem:  # the migration starts, then fails the way a failed validation predicts
            fail_after: float | None = s.migration_new_seconds
        elif s.migration_outcome == "FAILED":
            fail_after, problem = s.migration_fail_after_seconds, "Migration failed (scenario)."
        else:
            fail_after = None
        record = MigrationRecord(
            id=object_id(), group_id=group_id, migration_hosts=list(body["migrationHosts"]),
            destination_cluster=body["destination"]["clusterName"], created_at=now,
            new_seconds=s.migration_new_seconds, initial_lag=s.migration_initial_lag_seconds,
            lag_decay=s.migration_lag_decay_per_second, ready_lag=s.migration_ready_lag_seconds,
            cutover_seconds=s.migration_cutover_seconds, cutover_window=s.cutover_window_seconds,
            fail_after=fail_after, failure_reason=problem, source_group_id=body["source"]["groupId"],
            source_cluster=body["source"]["clusterName"],
            drop_destination_data=bool(body.get("dropDestinationData", False)),
        )
        with self.lock:
            self.migrations[record.id] = record
        return Reply(201, record.to_api(now))

    def _migration(self, req: Request) -> MigrationRecord:
        group_id = self._group(req)
        record = self.migrations.get(self._id(req, "liveMigrationId"))
        if record is None or record.group_id != group_id:
            raise ApiError(404, "RESOURCE_NOT_FOUND", f"No live migration with ID "
                           f"{req.params['liveMigrationId']} exists in this project.",
                           [req.params["liveMigrationId"]])
        return record

    def get_migration(self, req: Request) -> Reply:
        return Reply(200, self._migration(req).to_api(self.clock.now()))

    def cutover(self, req: Request) -> Reply:
        with self.lock:
            record = self._migration(req)
            now = self.clock.now()
            if record.cutover_at is not None:
                return Reply(202)  # already cutting over: repeating the call changes nothing
            status, ready, _ = record.state(now)
            if status != "WORKING" or not ready:
                raise ApiError(400, "LIVE_MIGRATION_NOT_READY_FOR_CUTOVER",
                               f"Live migration {record.id} cannot be cut over: status {status}, "
                               f"readyForCutover {str(ready).lower()}.", [record.id, status])
            record.cutover_at = now
            endpoints = self._data_endpoints(record)
            if endpoints:
                record.copy_status = "running"
                threading.Thread(target=self._copy_data, args=(record, *endpoints), name=f"copy-{record.id}",
                                 daemon=True).start()
        return Reply(202)

    # ---- moving data (module docstring, "Moving data") ------------------------------------------

    def _cluster_has_data(self, cluster: ClusterSpec) -> bool:
        if not cluster.local_uri:
            return cluster.has_data
        import pymongo

        with pymongo.MongoClient(cluster.local_uri, serverSelectionTimeoutMS=5000) as client:
            return any(_user_namespaces(client))

    def _data_endpoints(self, record: MigrationRecord) -> tuple[str, str] | None:
        """(source URI, target URI) when both ends of the migration are played by local servers."""
        project = next((p for p in self.scenario.source_projects if p.project_id == record.source_group_id), None)
        deployment = next((d for d in project.deployments if d.name == record.source_cluster), None) if project else None
        cluster = self.scenario.cluster(record.destination_cluster)
        if deployment is None or cluster is None or not deployment.local_uri or not cluster.local_uri:
            return None
        return deployment.local_uri, cluster.local_uri

    def _copy_data(self, record: MigrationRecord, source_uri: str, target_uri: str) -> None:
        try:
            detail = copy_deployment(source_uri, target_uri, drop_destination_data=record.drop_destination_data)
            status = "done"
        except Exception as exc:  # noqa: BLE001 - any copy error must surface as a FAILED migration
            status, detail = "failed", f"data copy failed: {type(exc).__name__}: {exc}"
        with self.lock:
            record.copy_status, record.copy_detail = status, detail
            self.save()

    # ---- Atlas: clusters, network peering, access list ----------------------------------------

    def get_cluster(self, req: Request) -> Reply:
        group_id = self._group(req)
        name = req.params["clusterName"]
        spec = self.scenario.cluster(name)
        if spec is None:
            raise ApiError(404, "CLUSTER_NOT_FOUND", f"No cluster named {name} exists in group {group_id}.",
                           [name, group_id])
        host = f"{spec.name.lower()}.x1y2z.mongodb.net"
        shards = [f"{spec.name.lower()}-shard-00-0{i}.x1y2z.mongodb.net:27017" for i in range(3)]
        major = ".".join(spec.mongodb_version.split(".")[:2])
        return Reply(200, {
            "id": spec.cluster_id, "groupId": group_id, "name": spec.name, "clusterType": spec.cluster_type,
            "mongoDBVersion": spec.mongodb_version, "mongoDBMajorVersion": major, "stateName": "IDLE",
            "paused": False, "backupEnabled": False,
            "connectionStrings": {"standard": spec.standard or "mongodb://" + ",".join(shards) + "/?ssl=true",
                                  "standardSrv": spec.standard_srv or f"mongodb+srv://{host}"},
            "replicationSpecs": [{"id": object_id(), "zoneName": "Zone 1", "regionConfigs": [{
                "providerName": spec.provider_name, "regionName": spec.region_name, "priority": 7,
                "electableSpecs": {"instanceSize": spec.instance_size, "nodeCount": 3}}]}],
        })

    def create_container(self, req: Request) -> Reply:
        group_id = self._group(req)
        body = _check_object(req.json(), "", {"atlasCidrBlock": str, "regionName": str}, {"providerName": str})
        provider = body.get("providerName", "AWS")
        if provider != "AWS":
            raise ApiError(400, "INVALID_ATTRIBUTE", "Invalid attribute providerName specified.", ["providerName"])
        if not _ATLAS_REGION.match(body["regionName"]):
            raise ApiError(400, "INVALID_ATTRIBUTE", "Invalid attribute regionName specified (Atlas region "
                           "names look like US_EAST_1).", ["regionName"])
        cidr = _private_cidr(body["atlasCidrBlock"], "atlasCidrBlock", min_prefix=16, max_prefix=24)
        with self.lock:
            if any(c.group_id == group_id and c.region_name == body["regionName"] for c in self.containers.values()):
                raise ApiError(409, "CONTAINER_ALREADY_EXISTS", f"A network peering container already exists "
                               f"for {body['regionName']} in this project.", [body["regionName"]])
            vpc_id = ("vpc-" + secrets.token_hex(9)[:17] if not self.scenario.aws_endpoint_url
                      else self._aws(body["regionName"]).create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"])
            record = ContainerRecord(object_id(), group_id, provider, cidr, body["regionName"], vpc_id)
            self.containers[record.id] = record
        return Reply(201, record.to_api())

    def list_containers(self, req: Request) -> Reply:
        group_id = self._group(req)
        provider = (req.query.get("providerName") or ["AWS"])[0]
        results = [c.to_api() for c in self.containers.values()
                   if c.group_id == group_id and c.provider_name == provider]
        return Reply(200, _page(req, results))

    def create_peer(self, req: Request) -> Reply:
        group_id = self._group(req)
        body = _check_object(req.json(), "", {"containerId": str, "accepterRegionName": str, "awsAccountId": str,
                                              "routeTableCidrBlock": str, "vpcId": str}, {"providerName": str})
        if body.get("providerName", "AWS") != "AWS":
            raise ApiError(400, "INVALID_ATTRIBUTE", "Invalid attribute providerName specified.", ["providerName"])
        if not re.fullmatch(r"\d{12}", body["awsAccountId"]):
            raise ApiError(400, "INVALID_ATTRIBUTE", "Invalid attribute awsAccountId specified (twelve digits).",
                           ["awsAccountId"])
        if not re.fullmatch(r"vpc-[0-9a-f]{8,17}", body["vpcId"]):
            raise ApiError(400, "INVALID_ATTRIBUTE", "Invalid attribute vpcId specified.", ["vpcId"])
        cidr = _private_cidr(body["routeTableCidrBlock"], "routeTableCidrBlock", min_prefix=8, max_prefix=28)
        container = self.containers.get(_check_hex(body["containerId"], "containerId"))
        if container is None or container.group_id != group_id:
            raise ApiError(404, "RESOURCE_NOT_FOUND", f"No network peering container with ID "
                           f"{body['containerId']} exists in this project.", [body["containerId"]])
        if ipaddress.ip_network(cidr).overlaps(ipaddress.ip_network(container.atlas_cidr_block)):
            raise ApiError(400, "INVALID_ATTRIBUTE", "routeTableCidrBlock overlaps the Atlas CIDR block "
                           f"{container.atlas_cidr_block}.", ["routeTableCidrBlock"])
        s = self.scenario
        connection_id, aws_failure = "pcx-" + secrets.token_hex(9)[:17], None
        if s.aws_endpoint_url:
            connection_id, aws_failure = self._request_aws_peering(container, body)
        record = PeerRecord(
            id=object_id(), group_id=group_id, container_id=container.id,
            accepter_region_name=body["accepterRegionName"], aws_account_id=body["awsAccountId"],
            route_table_cidr_block=cidr, vpc_id=body["vpcId"], connection_id=connection_id,
            created_at=self.clock.now(), initiating_seconds=s.peer_initiating_seconds,
            auto_accept_after=s.peer_auto_accept_after_seconds, finalizing_seconds=s.peer_finalizing_seconds,
            fails=s.peer_outcome == "FAILED" or aws_failure is not None,
            fail_after=s.peer_initiating_seconds if aws_failure else s.peer_fail_after_seconds,
            error_state_name=aws_failure or s.peer_error_state_name, aws_linked=bool(s.aws_endpoint_url),
        )
        with self.lock:
            self.peers[record.id] = record
        return Reply(201, record.to_api(record.created_at))

    def get_peer(self, req: Request) -> Reply:
        group_id = self._group(req)
        record = self.peers.get(self._id(req, "peerId"))
        if record is None or record.group_id != group_id or record.gone(self.clock.now()):
            raise ApiError(404, "RESOURCE_NOT_FOUND", f"No network peering connection with ID "
                           f"{req.params['peerId']} exists in this project.", [req.params["peerId"]])
        if record.aws_linked:
            self._observe_aws_peering(record)
        return Reply(200, record.to_api(self.clock.now()))

    def list_peers(self, req: Request) -> Reply:
        """``GET /peers?providerName=AWS``: the project's peering connections (terminated ones are gone)."""
        group_id = self._group(req)
        provider = (req.query.get("providerName") or ["AWS"])[0]
        now = self.clock.now()
        results = []
        for record in list(self.peers.values()):
            if record.group_id != group_id or provider != "AWS" or record.gone(now):
                continue
            if record.aws_linked:
                self._observe_aws_peering(record)
            results.append(record.to_api(now))
        return Reply(200, _page(req, results))

    def delete_peer(self, req: Request) -> Reply:
        """``DELETE /peers/{id}``: 202; the peering is TERMINATING, then gone, and Atlas deletes the AWS
        peering connection (with a linked AWS). Removing a project's last peering also removes AWS security
        groups from its access list; this stand-in accepts no security-group entries, so there are none."""
        from botocore.exceptions import ClientError

        group_id = self._group(req)
        record = self.peers.get(self._id(req, "peerId"))
        now = self.clock.now()
        if record is None or record.group_id != group_id or record.gone(now):
            raise ApiError(404, "PEER_NOT_FOUND", f"No network peering connection with ID {req.params['peerId']} "
                           "exists in this project.", [req.params["peerId"]])
        with self.lock:
            if record.deleted_at is None:
                record.deleted_at = now
        if record.aws_linked:
            with contextlib.suppress(ClientError):
                self._aws(record.accepter_region_name).delete_vpc_peering_connection(
                    VpcPeeringConnectionId=record.connection_id)
        return Reply(202)

    def delete_container(self, req: Request) -> Reply:
        """``DELETE /containers/{id}``: 204; refused (409) while a peering still uses it. (The stand-in does
        not place its clusters in containers, so no cluster ever holds one.)"""
        group_id = self._group(req)
        container_id = self._id(req, "containerId")
        record = self.containers.get(container_id)
        if record is None or record.group_id != group_id:
            raise ApiError(404, "CLOUD_PROVIDER_CONTAINER_NOT_FOUND", f"No network peering container with ID "
                           f"{container_id} exists in this project.", [container_id])
        now = self.clock.now()
        with self.lock:
            if any(p.container_id == container_id and not p.gone(now) for p in self.peers.values()):
                raise ApiError(409, "CONTAINERS_IN_USE", "Cannot delete a network peering container that a "
                               "peering connection still uses.", [container_id])
            del self.containers[container_id]
        return Reply(204)

    def delete_access_list(self, req: Request) -> Reply:
        """``DELETE /accessList/{entryValue}``: 204; the value is the URL-encoded IP address or CIDR block."""
        from urllib.parse import unquote

        group_id = self._group(req)
        value = unquote(req.params["entryValue"])
        with self.lock:
            match = next((a for a in self.access_list if a.group_id == group_id
                          and value in (a.cidr_block, a.ip_address)), None)
            if match is None:
                raise ApiError(404, "ATLAS_NETWORK_PERMISSION_ENTRY_NOT_FOUND", f"IP address {value} not found in "
                               "the project's access list.", [value])
            self.access_list.remove(match)
        return Reply(204)

    def _aws(self, atlas_region: str):
        import boto3

        # Atlas's own AWS account: credentials the stand-in makes up (moto accepts any).
        return boto3.client("ec2", endpoint_url=self.scenario.aws_endpoint_url,
                            region_name=atlas_region.lower().replace("_", "-"),
                            aws_access_key_id="atlas-standin", aws_secret_access_key="atlas-standin")

    def _request_aws_peering(self, container: ContainerRecord, body: dict[str, Any]) -> tuple[str, str | None]:
        """Atlas asks AWS for a peering connection into the customer's VPC: (pcx id, failure state or None)."""
        from botocore.exceptions import ClientError

        try:
            reply = self._aws(container.region_name).create_vpc_peering_connection(
                VpcId=container.vpc_id, PeerVpcId=body["vpcId"], PeerOwnerId=body["awsAccountId"],
                PeerRegion=body["accepterRegionName"].lower().replace("_", "-"))
        except ClientError as exc:  # e.g. the VPC does not exist: Atlas reports the peer FAILED
            return "pcx-" + secrets.token_hex(9)[:17], str(exc.response.get("Error", {}).get("Code", "FAILED"))
        return reply["VpcPeeringConnection"]["VpcPeeringConnectionId"], None

    def _observe_aws_peering(self, record: PeerRecord) -> None:
        """What Atlas learns from AWS: accepted (active) or rejected / deleted / failed / expired."""
        from botocore.exceptions import ClientError

        now = self.clock.now()
        if record.accepted_at is not None and record.rejected_at is None:
            status_now, _ = record.state(now)
            if status_now != "AVAILABLE":
                return
        try:
            reply = self._aws(record.accepter_region_name).describe_vpc_peering_connections(
                VpcPeeringConnectionIds=[record.connection_id])
            pcxs = reply.get("VpcPeeringConnections", [])
            code = pcxs[0]["Status"]["Code"] if pcxs else "deleted"
        except ClientError:
            code = "deleted"
        with self.lock:
            if code in ("active", "provisioning") and record.accepted_at is None and record.rejected_at is None:
                record.accepted_at = now
            elif code in ("rejected", "deleted", "failed", "expired") and record.rejected_at is None:
                record.rejected_at = now

    def add_access_list(self, req: Request) -> Reply:
        group_id = self._group(req)
        entries = req.json()
        if not isinstance(entries, list) or not entries:
            raise ApiError(400, "INVALID_ATTRIBUTE", "The request body must be a non-empty array of access "
                           "list entries.", [])
        parsed: list[AccessListRecord] = []
        for i, entry in enumerate(entries):
            entry = _check_object(entry, f"[{i}]", {}, {"cidrBlock": str, "ipAddress": str, "comment": str,
                                                        "awsSecurityGroup": str, "deleteAfterDate": str})
            given = [k for k in ("cidrBlock", "ipAddress", "awsSecurityGroup") if entry.get(k)]
            if len(given) != 1 or given[0] == "awsSecurityGroup":
                # Security-group entries only work over an existing peering; this path never needs them.
                raise ApiError(400, "INVALID_ATTRIBUTE", f"Entry {i} needs exactly one of cidrBlock or ipAddress.",
                               [f"[{i}]"])
            if "ipAddress" in given:
                ip = entry["ipAddress"]
                try:
                    cidr = str(ipaddress.ip_network(ip))
                except ValueError:
                    raise ApiError(400, "INVALID_IP_ADDRESS_OR_CIDR_NOTATION",
                                   f"The address {ip} must be in valid IP address or CIDR notation.", [ip]) from None
                parsed.append(AccessListRecord(group_id, cidr, ip, entry.get("comment")))
            else:
                parsed.append(AccessListRecord(group_id, _ip_or_cidr(entry["cidrBlock"], "cidrBlock"), None,
                                               entry.get("comment")))
        with self.lock:
            for new in parsed:  # Atlas updates an existing entry's comment instead of duplicating it
                old = next((a for a in self.access_list if a.group_id == group_id and a.cidr_block == new.cidr_block),
                           None)
                if old:
                    old.comment = new.comment
                else:
                    self.access_list.append(new)
            results = [a.to_api() for a in self.access_list if a.group_id == group_id]
        return Reply(201, _page(req, results))

    def list_access_list(self, req: Request) -> Reply:
        group_id = self._group(req)
        return Reply(200, _page(req, [a.to_api() for a in self.access_list if a.group_id == group_id]))

    # ---- Cloud Manager --------------------------------------------------------------------------

    def cm_create_link(self, req: Request) -> Reply:
        cm_org = self._org(req, cloud_manager=True)
        body = _check_object(req.json(), "", {"linkToken": str})
        with self.lock:
            token = next((t for t in self.link_tokens if t.token == body["linkToken"]), None)
            if token is None or token.revoked:
                raise ApiError(400, "INVALID_LINK_TOKEN", "The link-token is invalid or has been revoked; "
                               "generate a new one in Atlas.", [])
            now = self.clock.now()
            link = MigrationLinkRecord(cm_org, token.org_id, token.token, now, self.scenario.link_sync_seconds)
            self.migration_links[cm_org] = link
            return Reply(200, {"status": self._link_status(link, now)})

    def cm_delete_link(self, req: Request) -> Reply:
        cm_org = self._org(req, cloud_manager=True)
        with self.lock:
            self.migration_links.pop(cm_org, None)
        return Reply(204)

    def cm_link_status(self, req: Request) -> Reply:
        cm_org = self._org(req, cloud_manager=True)
        with self.lock:
            link = self.migration_links.get(cm_org)
            status = self._link_status(link, self.clock.now()) if link else "NOT_SYNCED"
        return Reply(200, {"status": status})

    # ---- test controls --------------------------------------------------------------------------

    def set_peer_decision(self, ident: str, accept: bool) -> dict[str, Any]:
        with self.lock:
            record = next((p for p in self.peers.values() if ident in (p.id, p.connection_id)), None)
            if record is None:
                raise ApiError(404, "RESOURCE_NOT_FOUND", f"No peer {ident}.", [ident])
            now = self.clock.now()
            status, _ = record.state(now)
            if status != "PENDING_ACCEPTANCE":
                raise ApiError(409, "CONFLICT", f"Peer {ident} is {status}, not PENDING_ACCEPTANCE.", [status])
            if accept:
                record.accepted_at = now
            else:
                record.rejected_at = now
            return record.to_api(now)


def _user_namespaces(client: Any) -> list[tuple[str, str, str]]:
    """(db, name, type) of every namespace a live migration moves: no system databases or collections."""
    from atlas_migration.namespaces import is_never_migrated

    found = []
    for db_name in client.list_database_names():
        if is_never_migrated(db_name):
            continue
        for info in client[db_name].list_collections():
            if not is_never_migrated(db_name, info["name"]):
                found.append((db_name, info["name"], info.get("type", "collection")))
    return sorted(found)


def copy_deployment(source_uri: str, target_uri: str, *, drop_destination_data: bool = False) -> str:
    """Copy every non-system namespace from one server to another (collections first, views last), with the
    project's raw-BSON engine; returns a one-line summary. See "Moving data" in the module docstring."""
    import tempfile

    import pymongo

    from atlas_migration.engines import native

    with pymongo.MongoClient(source_uri, serverSelectionTimeoutMS=10_000) as src, \
            pymongo.MongoClient(target_uri, serverSelectionTimeoutMS=10_000) as dst, \
            tempfile.TemporaryDirectory(prefix="atlas-stand-in-copy-") as tmp:
        if drop_destination_data:
            for db_name in {db for db, _, _ in _user_namespaces(dst)}:
                dst.drop_database(db_name)
        namespaces = _user_namespaces(src)
        documents = 0
        for db_name, name, kind in namespaces:
            if kind != "view":
                native.dump_collection(src, db_name, name, tmp)
                documents += native.restore_collection(dst, tmp, db_name, name).documents
        for db_name, name, kind in namespaces:
            if kind == "view":
                native.dump_collection(src, db_name, name, tmp)
                native.restore_view(dst, tmp, db_name, name)
    return f"copied {len(namespaces)} namespace(s), {documents} document(s)"


def _page(req: Request, results: list[dict[str, Any]]) -> dict[str, Any]:
    base = f"http://localhost{req.path}"
    return {"links": [{"href": base, "rel": "self"}], "results": results, "totalCount": len(results)}


def _ip_or_cidr(value: Any, name: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except (TypeError, ValueError):
        raise ApiError(400, "INVALID_IP_ADDRESS_OR_CIDR_NOTATION",
                       f"The address {value} must be in valid IP address or CIDR notation.", [name]) from None


def _private_cidr(value: str, name: str, *, min_prefix: int, max_prefix: int) -> str:
    try:
        network = ipaddress.ip_network(value, strict=True)
    except ValueError:
        raise ApiError(400, "INVALID_IP_ADDRESS_OR_CIDR_NOTATION",
                       f"The address {value} must be in valid IP address or CIDR notation.", [name]) from None
    if network.version != 4 or not network.is_private or not min_prefix <= network.prefixlen <= max_prefix:
        raise ApiError(400, "INVALID_ATTRIBUTE", f"Invalid attribute {name} specified: {value} must be a private "
                       f"IPv4 block between /{min_prefix} and /{max_prefix}.", [name])
    return str(network)


def parse_auth_params(text: str) -> dict[str, str]:
    """Parse ``key=value, key="quoted value"`` pairs of an Authorization header (RFC 7235 auth-params)."""
    out: dict[str, str] = {}
    for match in re.finditer(r'(\w[\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))', text):
        out[match.group(1).lower()] = match.group(2) if match.group(2) is not None else match.group(3)
    return out


# --------------------------------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------------------------------


class _Handler(DispatchingHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real service
    server_version = "mdbws"
    sys_version = ""
    state: AtlasApiState  # set on the subclass built per server

    def _dispatch(self) -> None:
        body = self.read_body()
        parts = urlsplit(self.path)
        req = Request(self.command, parts.path, parse_qs(parts.query), self.headers, body)
        auth_scheme = (self.headers.get("Authorization") or "").split(" ", 1)[0] or None
        outage = self.state.outage
        if outage is not None and outage.remaining() > 0 and not req.path.startswith(ADMIN_PREFIX):
            self.state.requests.append({"method": req.method, "path": req.path, "query": parts.query,
                                        "status": 503 if outage.mode == "503" else 0, "auth": auth_scheme,
                                        "accept": self.headers.get("Accept"), "principal": None, "outage": True})
            if outage.mode == "reset":
                self.close_connection = True  # no status line: the client sees the connection dropped
                return
            error = ApiError(503, "SERVICE_UNAVAILABLE", "The service is temporarily unavailable.")
            self._send(Reply(503, error.body()))
            return
        try:
            reply = self._handle(req, parts)
        except ApiError as exc:
            reply = Reply(exc.status, exc.body(), headers=exc.headers)
        except Exception as exc:  # noqa: BLE001 - a bug here must look like Atlas's 500, not a dropped socket
            reply = Reply(500, ApiError(500, "UNEXPECTED_ERROR", f"Unexpected error: {type(exc).__name__}").body())
        if not req.path.startswith(ADMIN_PREFIX):
            self.state.requests.append({
                "method": req.method, "path": req.path, "query": parts.query, "status": reply.status,
                "auth": auth_scheme, "accept": self.headers.get("Accept"), "principal": req.principal,
            })
            if req.method != "GET" and reply.status < 400:
                with self.state.lock:
                    self.state.save()
        self._send(reply)

    def _send(self, reply: Reply) -> None:
        payload = b"" if reply.body is None else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        if payload:
            self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(payload)))
        for key, value in reply.headers.items():
            if key == "WWW-Authenticate":
                for challenge in value.split("\n"):
                    self.send_header(key, challenge)
            else:
                self.send_header(key, value)
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    def _handle(self, req: Request, parts: Any) -> Reply:
        state = self.state
        if req.path.startswith(ADMIN_PREFIX):
            return self._admin(req)
        if req.path == TOKEN_PATH:
            if req.method != "POST":
                raise ApiError(405, "METHOD_NOT_ALLOWED", "Use POST.")
            return state.issue_token(req.headers, req.body)
        if req.path.startswith(ATLAS_PREFIX + "/"):
            service = "atlas"
        elif req.path.startswith(CLOUD_MANAGER_PREFIX + "/"):
            service = "cloud_manager"
        else:
            raise ApiError(404, "RESOURCE_NOT_FOUND", f"Cannot find resource {req.path}.", [req.path])

        # Authenticate before anything else, as the real gateway does.
        target = req.path + (f"?{parts.query}" if parts.query else "")
        req.principal = self._authenticate(service, target)

        route = None
        path_known = False
        for candidate in ROUTES:
            match = candidate.pattern.match(req.path)
            if match and candidate.service == service:
                path_known = True
                if candidate.method == req.method:
                    route, req.params = candidate, match.groupdict()
                    break
        if route is None:
            if path_known:
                raise ApiError(405, "METHOD_NOT_ALLOWED", f"Method {req.method} is not allowed on {req.path}.")
            raise ApiError(404, "RESOURCE_NOT_FOUND", f"Cannot find resource {req.path}.", [req.path])

        fault = state.take_fault(req.method, req.path)
        if fault is not None:
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
            code = fault.error_code or _DEFAULT_FAULT_CODES.get(fault.status, "UNEXPECTED_ERROR")
            raise ApiError(fault.status, code, fault.detail or f"Injected {fault.status}.", [], headers)
        wait = state.rate_limit(req.principal or "anonymous")
        if wait > 0:
            raise ApiError(429, "RATE_LIMITED_TOKEN_BUCKET", "You have exceeded the rate limit for this "
                           "resource; retry later.", [], {"Retry-After": str(max(1, math.ceil(wait)))})

        content_type = "application/json"
        if route.versions:
            version = self._version(route, req)
            content_type = f"application/vnd.atlas.{version}+json;charset=utf-8"
        reply: Reply = getattr(state, route.handler)(req)
        if reply.body is not None and reply.status < 400:
            reply.content_type = content_type
        return reply

    def _authenticate(self, service: str, target: str) -> str:
        state = self.state
        header = self.headers.get("Authorization") or ""
        keys = state.scenario.api_keys if service == "atlas" else state.scenario.cloud_manager_keys()
        detail = "You are not authorized for this resource."
        if header.startswith("Bearer ") and service == "atlas":
            principal, why = state.check_bearer(header[len("Bearer "):].strip())
            if principal:
                return principal
            detail = f"{detail} {why}"
        elif header.startswith("Digest "):
            principal, stale = state.check_digest(self.command, target, header, keys)
            if principal:
                return principal
            if stale:
                raise ApiError(401, "UNAUTHORIZED", detail, [],
                               {"WWW-Authenticate": "\n".join(state.digest_challenges(stale=True))})
        raise ApiError(401, "UNAUTHORIZED", detail, [], {"WWW-Authenticate": "\n".join(state.digest_challenges())})

    def _version(self, route: Route, req: Request) -> str:
        accept = req.headers.get("Accept") or ""
        requested = _VND.findall(accept)
        for version in requested:
            if version in route.versions:
                return version
        for version in requested:
            if version in route.gone:
                resource = req.path.lstrip("/")
                raise ApiError(410, "VERSION_GONE", f"Version {version} of {resource} is no longer available.",
                               [version, resource])
        raise ApiError(406, "INVALID_VERSION_DATE", "Invalid accept header or version date.", [])

    def _admin(self, req: Request) -> Reply:
        state = self.state
        sub = req.path[len(ADMIN_PREFIX):]
        body = json.loads(req.body) if req.body else {}
        with state.lock:
            if sub == "/state" and req.method == "GET":
                return Reply(200, state.snapshot())
            if sub == "/requests":
                if req.method == "DELETE":
                    state.requests.clear()
                    return Reply(204)
                return Reply(200, list(state.requests))
            if sub == "/scenario":
                if req.method in ("PATCH", "POST"):
                    try:
                        state.scenario.update(body)
                    except (TypeError, ValueError) as exc:
                        raise ApiError(400, "INVALID_ATTRIBUTE", str(exc)) from None
                    if "speed" in body:
                        state.clock.set_speed(state.scenario.speed)
                    state.save()
                return Reply(200, asdict(state.scenario))
            if sub == "/clock" and req.method == "POST":
                if "speed" in body:
                    state.scenario.speed = float(body["speed"])
                    state.clock.set_speed(state.scenario.speed)
                if "advance_seconds" in body:
                    state.clock.advance(float(body["advance_seconds"]))
                state.save()
                return Reply(200, {"now": state.clock.now(), "speed": state.clock.speed})
            if sub == "/faults":
                if req.method == "DELETE":
                    state.faults.clear()
                    return Reply(204)
                items = body if isinstance(body, list) else [body]
                try:
                    state.faults.extend(Fault(**item) for item in items)
                except TypeError as exc:
                    raise ApiError(400, "INVALID_ATTRIBUTE", str(exc)) from None
                return Reply(200, [asdict(f) for f in state.faults])
            if sub == "/outage":
                if req.method == "DELETE":
                    state.outage = None
                    return Reply(204)
                if req.method == "POST":
                    try:
                        state.outage = Outage(seconds=body.get("seconds", 0), mode=body.get("mode", "503"))
                    except (TypeError, ValueError) as exc:
                        raise ApiError(400, "INVALID_ATTRIBUTE", str(exc)) from None
                    return Reply(200, {"seconds": state.outage.seconds, "mode": state.outage.mode})
            if sub == "/reset" and req.method == "POST":
                state.reset()
                state.save()
                return Reply(204)
            match = re.fullmatch(r"/peers/([^/]+)/(accept|reject)", sub)
            if match and req.method == "POST":
                result = state.set_peer_decision(match.group(1), match.group(2) == "accept")
                state.save()
                return Reply(200, result)
        raise ApiError(404, "RESOURCE_NOT_FOUND", f"Unknown admin endpoint {req.path}.")


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


class AtlasApiServer(LoopbackHttpService):
    """The stand-in on 127.0.0.1; ``start()`` serves from a daemon thread, ``serve_forever()`` in-line."""

    thread_name = "atlas-api-server"

    def __init__(self, scenario: Scenario | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 state_file: Path | str | None = None) -> None:
        self.state = AtlasApiState(scenario or Scenario(), Path(state_file) if state_file else None)
        super().__init__(type("AtlasApiHandler", (_Handler,), {"state": self.state}), host, port)
        self.state.save()

    @property
    def scenario(self) -> Scenario:
        return self.state.scenario

    # Programmatic versions of the admin endpoints.

    def now(self) -> float:
        return self.state.clock.now()

    def advance(self, seconds: float) -> None:
        self.state.clock.advance(seconds)

    def set_speed(self, speed: float) -> None:
        with self.state.lock:
            self.state.scenario.speed = speed
            self.state.clock.set_speed(speed)

    def update_scenario(self, **changes: Any) -> None:
        with self.state.lock:
            self.state.scenario.update(changes)
            if "speed" in changes:
                self.state.clock.set_speed(self.state.scenario.speed)

    def start_outage(self, seconds: float, mode: str = "503") -> None:
        """Every API call fails for ``seconds`` of real time from now (``Outage``)."""
        self.state.outage = Outage(seconds=seconds, mode=mode)

    def add_fault(self, status: int, count: int = 1, **kwargs: Any) -> None:
        with self.state.lock:
            self.state.faults.append(Fault(status=status, count=count, **kwargs))

    def accept_peer(self, peer_or_connection_id: str) -> dict[str, Any]:
        return self.state.set_peer_decision(peer_or_connection_id, accept=True)

    def reject_peer(self, peer_or_connection_id: str) -> dict[str, Any]:
        return self.state.set_peer_decision(peer_or_connection_id, accept=False)

    def requests(self, path_contains: str = "", method: str | None = None) -> list[dict[str, Any]]:
        return [r for r in list(self.state.requests)
                if path_contains in r["path"] and (method is None or r["method"] == method)]

    def clear_requests(self) -> None:
        self.state.requests.clear()


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for value in values:
        key, sep, secret = value.partition(":")
        if not sep or not key or not secret:
            raise SystemExit(f"--{what} takes ID:SECRET")
        out[key] = secret
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on start)")
    parser.add_argument("--state-file", type=Path, help="JSON state, loaded when present and kept up to date")
    parser.add_argument("--scenario", type=Path, help="JSON object of Scenario fields (ignored if the state "
                                                      "file already exists)")
    parser.add_argument("--speed", type=float, help="simulated seconds per real second")
    parser.add_argument("--api-key", action="append", default=[], help="PUBLIC:PRIVATE (repeatable)")
    parser.add_argument("--service-account", action="append", default=[], help="CLIENT_ID:SECRET (repeatable)")
    args = parser.parse_args(argv)

    scenario = scenario_from_dict(json.loads(args.scenario.read_text())) if args.scenario else Scenario()
    if args.api_key:
        scenario.api_keys = _pairs(args.api_key, "api-key")
    if args.service_account:
        scenario.service_accounts = _pairs(args.service_account, "service-account")
    if args.speed is not None:
        scenario.speed = args.speed
    server = AtlasApiServer(scenario, host=args.host, port=args.port, state_file=args.state_file)
    print(f"listening on {server.url}", flush=True)
    server.serve_until_interrupted()


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # SIGTERM: leave through the finally above
    main()
