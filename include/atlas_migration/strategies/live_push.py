"""The ``live_push`` task group: Cloud Manager pushes the source into Atlas (Atlas live migration, push).

    preflight -> link_organizations (setup) -> wait_for_link -> validate_request -> wait_for_validation
      -> start_migration -> wait_for_sync (deferrable) -> cutover_evidence -> approve_cutover -> cutover
      -> wait_for_completion (deferrable) -> [the flow's validate]
    cleanup: teardown of link_organizations; removes the migration link and the link-tokens once the migration
             is over (or was never created), or on an operator's abandon; keeps them while it still runs

1. ``preflight`` changes nothing: source and destination on 6.0.17+ / 7.0.13+ (8.0+), the destination cluster
   exists, the parameters are complete, both API connections authenticate; when the Cloud Manager org is
   already linked, the source must be listed under ``availableProjects``. Every problem is reported at once.
2. ``link_organizations`` creates an Atlas link-token (restricted to ``access_list_ips``) and registers it with
   the source's Cloud Manager organization; the token lives in memory only (never XCom, never a log line).
   ``wait_for_link`` waits for SYNCED, then checks that Atlas lists the source project and deployment (Atlas
   lists ``availableProjects`` only for a linked organization, so this half of the pre-flight runs here,
   still before anything is migrated).
3. ``validate_request`` / ``wait_for_validation``: Atlas validates the request; FAILED ends the run with Atlas's
   ``errorMessage``.
4. ``start_migration`` creates the migration and records its id in the run's Variable
   ``atlas_migration_live_push__<dag_id>__<run_id>`` (``RunRecord``: ``creating`` before the POST, the id
   after). Atlas's API cannot list live migrations, so this record is how a retried or cleared task finds the
   run's migration: it reconnects to it instead of starting a second one, starts a new one only once the
   earlier one is FAILED / EXPIRED, and stops with instructions when an earlier POST's outcome is unknown
   (``start_decision``). ``wait_for_sync`` defers to ``LiveMigrationTrigger`` until ``readyForCutover`` with the
   lag at or under ``max_cutover_lag_seconds``.
5. Cutover. ``manual``: ``cutover_evidence`` reads the migration and builds the approval request
   (``cutover_approval_request``): a Markdown body with the status, the lag, how long it has been ready, the
   120-hour window left, what the cutover does to source writes and what ``cutover_decision`` warns about; a
   FAILED or EXPIRED migration fails there, before anyone is asked. ``approve_cutover`` (Airflow's
   human-in-the-loop ``ApprovalOperator``, ``atlas_migration.approval``) parks in ``awaiting_input`` until an
   operator answers in Required Actions or through the HITL REST endpoint; Reject fails the run; the response
   timeout is the smaller of ``approval_timeout_seconds`` and the window left minus a safety margin
   (``approval_margin_seconds``), so an unanswered approval fails while the migration can still be cut over.
   ``auto``: both succeed at once, without an API call. ``cutover`` then asks Atlas to cut over once the
   decision (``cutover_decision``) says so and a quiet period on the source's change stream confirms that
   application writes have stopped (``auto`` requires that evidence; ``manual`` uses it when the source
   connection can read change streams, else relies on the operator); FAILED and EXPIRED end the run.

   While the approval waits nothing watches the migration: a parked HITL task runs no code (the old
   Variable sensor re-read it on every poke). What replaces that watch: the body shows the evidence as it was
   when asked (with its time); the timeout ends the wait before the window does; and ``cutover`` re-reads the
   migration after the approval and refuses a FAILED or EXPIRED one, naming why, and waits while the lag is
   above ``max_cutover_lag_seconds``. A migration that fails while the approval waits is therefore reported
   when someone answers (or at the timeout), not at the moment it fails; Atlas's own alerts cover that gap.
6. ``wait_for_completion`` (deferred) until COMPLETE; the flow's ``validate`` compares source and Atlas.

An API outage does not end a migration (``atlas_migration.api_outage``): every read of the watching tasks
(the two triggers, ``cutover_evidence``, the ``cutover`` sensor's reads) retries
unreachable / timeout / 5xx / 429 with backoff for ``api_outage_tolerance_seconds``, logging each retry; past
that the task fails saying the migration still runs and to clear the task to resume watching. ``cleanup``
(``cleanup_decision``) removes the link and the link-tokens only when no migration was created, once it is
COMPLETE / FAILED / EXPIRED, or when an operator abandons it (param ``on_failure=abandon``, or the Variable
``atlas_migration_abandon__<dag_id>__<run_id>`` = ``abandon`` and a clear of ``cleanup``); otherwise it keeps
them, logs why and how to go on, and succeeds. Clearing a task re-runs ``link_organizations`` (Airflow clears
a task's setup with it), which keeps the run's SYNCED link instead of adding a new link-token.

Params: the push's own (``live_push_params``, section "Live push"; ``atlas_conn_id``, ``target_project_id`` and
``target_cluster_name`` are the same params as the AWS replica-set path's), and the "Cutover" section the live
strategies share (``SHARED_CUTOVER_PARAMS``, defined with the live pull: ``cutover``,
``max_cutover_lag_seconds``, ``quiet_period_seconds``, ``cutover_timeout_seconds``, ``approval_timeout_seconds``).
Sensors poke every ``$MIGRATION_POKE_INTERVAL_SECONDS`` (default 60; read when the DAG is parsed, as sensor
intervals are).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from airflow.sdk import get_current_context, setup, task, task_group, teardown

from atlas_migration.api_outage import DEFAULT_TOLERANCE_SECONDS, OutagePolicy, call_through_outage
from atlas_migration.approval import (
    ApprovalRequest,
    Deadline,
    RunApprovalOperator,
    TooLateToAsk,
    bounded_response_timeout,
    format_duration,
    run_variable_key,
    timeout_line,
    waited_seconds,
)
from atlas_migration.deadlines import PUSH_WINDOW_HOURS, PUSH_WINDOW_WARNING_HOURS
from atlas_migration.errors import ConfigurationError, MigrationError
from atlas_migration.profile import SourceProfile, parse_version
from atlas_migration.routing import PUSH_MINIMUMS, meets_minimum
from atlas_migration.triggers.live_migration import (
    LiveMigrationFailed,
    WaitForLiveMigrationOperator,
    describe,
    resume_hint,
    summarise,
)

log = logging.getLogger("atlas_migration")

GROUP_ID = "live_push"
SECTION = "Live push"
CUTOVER_WINDOW_SECONDS = PUSH_WINDOW_HOURS * 3600
# Warn (on every poke) once less than this is left of the cutover window; the wording sharpens below 6 h and 1 h.
# The first step is the run's deadline alert too (deadlines.migration_deadlines).
WINDOW_WARNING_SECONDS = (PUSH_WINDOW_WARNING_HOURS * 3600, 6 * 3600, 3600)
HOSTNAME_SCHEMA_TYPES = ("PUBLIC", "PRIVATE_LINK", "VPC_PEERING")
CUTOVER_MODES = ("manual", "auto")
ON_FAILURE_MODES = ("keep_migration", "abandon")
TERMINAL_STATUSES = ("COMPLETE", "FAILED", "EXPIRED")
# Per-run Airflow Variables (``run_variable_key`` layout): the migration record, and an operator's abandon decision.
RECORD_PREFIX = "atlas_migration_live_push"
ABANDON_PREFIX = "atlas_migration_abandon"
ABANDON = "abandon"
POKE_INTERVAL_ENV = "MIGRATION_POKE_INTERVAL_SECONDS"
DEFAULT_POKE_INTERVAL = 60.0
# Read by this group, defined once for the live strategies (``live_pull.live_pull_params``, section "Cutover").
SHARED_CUTOVER_PARAMS = ("cutover", "max_cutover_lag_seconds", "quiet_period_seconds", "cutover_timeout_seconds",
                         "approval_timeout_seconds", "source_write_block")
# Databases whose writes do not count as application writes in the quiet-period check (mongosync's own).
_INTERNAL_WRITE_DATABASES = ("mongosync_reserved_for_internal_use",)
_HEX24 = re.compile(r"^[a-f0-9]{24}$")
_DAY = 24 * 3600.0


class PreflightFailed(LiveMigrationFailed):
    """The live push cannot start; nothing was changed in Atlas (raised with every problem found)."""


# ---------------------------------------------------------------- parameters


def live_push_params() -> dict[str, Any]:
    """``Param`` objects of the push (section "Live push"). The cutover settings are the shared "Cutover"
    section's (``SHARED_CUTOVER_PARAMS``); the Atlas connection and destination params are identical to the AWS
    replica-set path's, so either definition may win a merge."""
    from airflow.sdk import Param

    def param(default: Any, title: str, description: str, **schema: Any) -> Param:
        return Param(default, title=title, description=description, section=SECTION, **schema)

    hex_or_empty = r"^$|^[a-f0-9]{24}$"
    return {
        "atlas_conn_id": param(
            "atlas_api", "Atlas Admin API connection",
            "Airflow connection (type mongodb_atlas): the Atlas organization's API key pair or service account, "
            "extras org_id and project_id (the destination project).", type="string", minLength=1),
        "cloud_manager_conn_id": param(
            "cloud_manager_api", "Cloud Manager API connection",
            "Airflow connection (type mongodb_cloud_manager): an API key pair of the source's Cloud Manager "
            "organization, extra org_id.", type="string", minLength=1),
        "source_project_id": param(
            "", "Cloud Manager project id",
            "24-hex id of the Cloud Manager project (group) that monitors the source deployment.",
            type="string", pattern=hex_or_empty),
        "source_cluster_name": param(
            "", "Source deployment name",
            "The deployment's name in Cloud Manager, as Atlas lists it under availableProjects.", type="string"),
        "target_project_id": param(
            "", "Atlas project id",
            "24-hex id of the destination Atlas project. Empty: the Atlas connection's project_id extra.",
            type="string", pattern=hex_or_empty),
        "target_cluster_name": param(
            "", "Atlas cluster name", "The destination cluster in that project (it must exist).", type="string"),
        "migration_host": param(
            "", "Migration host",
            "The migration host Cloud Manager provisioned for the source project (Atlas takes exactly one).",
            type="string"),
        "access_list_ips": param(
            [], "Link-token access list",
            "IP addresses or CIDR blocks allowed to use the link-token (the migration host's addresses). "
            "Empty: no restriction.", type="array", items={"type": "string"}),
        "hostname_schema_type": param(
            "PUBLIC", "Destination hostname type",
            "How the migration host reaches the Atlas cluster: PUBLIC, PRIVATE_LINK (set the private link id) "
            "or VPC_PEERING.", type="string", enum=list(HOSTNAME_SCHEMA_TYPES)),
        "private_link_id": param(
            "", "Private link id", "The Atlas private endpoint id; required with PRIVATE_LINK.", type="string"),
        "drop_destination_data": param(
            False, "Drop destination data",
            "Let Atlas drop everything in the destination cluster before migrating. Off: a destination that "
            "holds data is refused by Atlas's validation.", type="boolean"),
        "poll_interval_seconds": param(
            60, "Status poll interval (s)",
            "How often the deferred waits ask Atlas for the migration's status.", type="integer", minimum=1,
            maximum=3600),
        "link_timeout_seconds": param(
            1800, "Link wait timeout (s)", "Give up when the organization link is not SYNCED by then.",
            type="integer", minimum=10, maximum=int(_DAY)),
        "validation_timeout_seconds": param(
            3600, "Validation wait timeout (s)", "Give up when Atlas has not validated the request by then.",
            type="integer", minimum=10, maximum=int(_DAY)),
        "sync_timeout_seconds": param(
            7 * 24 * 3600, "Initial sync timeout (s)",
            "Give up waiting for readyForCutover after this long (Atlas keeps migrating; re-run the task to "
            "wait again).", type="integer", minimum=10, maximum=60 * 24 * 3600),
        "completion_timeout_seconds": param(
            6 * 3600, "Completion wait timeout (s)", "Give up when the cutover has not COMPLETED by then.",
            type="integer", minimum=10, maximum=int(7 * _DAY)),
        "api_outage_tolerance_seconds": param(
            int(DEFAULT_TOLERANCE_SECONDS), "API outage tolerance (s)",
            "While the run watches the migration (wait_for_sync, cutover_evidence, cutover, wait_for_completion), "
            "Atlas API failures that can pass (unreachable, timeouts, 5xx, 429) are retried with backoff for this "
            "long, each retry logged; 401/403/404 are not retried. Past it the task fails, but the migration keeps "
            "running in Atlas: clear the task to resume watching it.", type="integer", minimum=0,
            maximum=int(_DAY)),
        "on_failure": param(
            "keep_migration", "When the run fails",
            "keep_migration: clean-up keeps the organization link (and so the running Atlas migration) unless the "
            "migration is COMPLETE, FAILED or EXPIRED, so that clearing the failed task resumes it. abandon: "
            "clean-up removes the link and the link-tokens even while the migration runs, which stops it (a new "
            "run starts over). Decide later for a run in progress with the Variable "
            f"{ABANDON_PREFIX}__<dag_id>__<run_id> = {ABANDON}.", type="string", enum=list(ON_FAILURE_MODES)),
    }


@dataclass(frozen=True)
class LivePushParams:
    """The run's live-push settings, typed. Missing values are reported by ``param_problems``, not here.
    Without a ``cutover`` param the push waits for an approval: cutting over unasked is never the fallback."""

    atlas_conn_id: str = "atlas_api"
    cloud_manager_conn_id: str = "cloud_manager_api"
    source_conn_id: str = "mongo_source"
    source_project_id: str = ""
    source_cluster_name: str = ""
    target_project_id: str = ""
    target_cluster_name: str = ""
    migration_host: str = ""
    access_list_ips: tuple[str, ...] = ()
    hostname_schema_type: str = "PUBLIC"
    private_link_id: str = ""
    drop_destination_data: bool = False
    cutover: str = "manual"
    source_write_block: str = "auto"
    max_cutover_lag_seconds: float = 10
    quiet_period_seconds: float = 5
    cutover_timeout_seconds: float = 600
    poll_interval_seconds: float = 60
    link_timeout_seconds: float = 1800
    validation_timeout_seconds: float = 3600
    sync_timeout_seconds: float = 7 * 24 * 3600
    approval_timeout_seconds: float = CUTOVER_WINDOW_SECONDS
    completion_timeout_seconds: float = 6 * 3600
    api_outage_tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS
    on_failure: str = "keep_migration"
    rehearsal: bool = False  # the run belongs to the rehearsal DAG (it has a scratch-database prefix)

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> LivePushParams:
        defaults = cls()

        def text(key: str) -> str:
            value = params.get(key, getattr(defaults, key))
            if value is None:
                return ""
            if not isinstance(value, str):
                raise ConfigurationError(f"parameter {key} must be a string, got {value!r}")
            return value.strip()

        def number(key: str) -> float:
            value = params.get(key, getattr(defaults, key))
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigurationError(f"parameter {key} must be a non-negative number, got {value!r}")
            return float(value)

        ips = params.get("access_list_ips") or []
        if isinstance(ips, str):  # one address typed into the form
            ips = [ips]
        if not isinstance(ips, list) or not all(isinstance(i, str) for i in ips):
            raise ConfigurationError(f"parameter access_list_ips must be a list of addresses, got {ips!r}")
        return cls(
            atlas_conn_id=text("atlas_conn_id") or defaults.atlas_conn_id,
            cloud_manager_conn_id=text("cloud_manager_conn_id") or defaults.cloud_manager_conn_id,
            source_conn_id=text("source_conn_id") or defaults.source_conn_id,
            source_project_id=text("source_project_id"),
            source_cluster_name=text("source_cluster_name"),
            target_project_id=text("target_project_id"),
            target_cluster_name=text("target_cluster_name"),
            migration_host=text("migration_host"),
            access_list_ips=tuple(i.strip() for i in ips if i.strip()),
            hostname_schema_type=text("hostname_schema_type") or defaults.hostname_schema_type,
            private_link_id=text("private_link_id"),
            drop_destination_data=bool(params.get("drop_destination_data", False)),
            cutover=text("cutover") or defaults.cutover,
            source_write_block=text("source_write_block") or defaults.source_write_block,
            on_failure=text("on_failure") or defaults.on_failure,
            rehearsal="rehearsal_db_prefix" in params,
            **{key: number(key) for key in (
                "max_cutover_lag_seconds", "quiet_period_seconds", "cutover_timeout_seconds",
                "poll_interval_seconds", "link_timeout_seconds",
                "validation_timeout_seconds", "sync_timeout_seconds", "approval_timeout_seconds",
                "completion_timeout_seconds", "api_outage_tolerance_seconds")},
        )


# ---------------------------------------------------------------- pure decisions: pre-flight


def _push_minimums() -> str:
    return ", ".join(".".join(map(str, v)) for v in PUSH_MINIMUMS.values())


def version_meets_push_minimum(version: str | None) -> bool:
    """6.0.17+, 7.0.13+, 8.0+ (a rapid release such as 6.1 is not supported)."""
    return meets_minimum(parse_version(version), PUSH_MINIMUMS)


def param_problems(p: LivePushParams) -> list[str]:
    problems: list[str] = []
    if p.rehearsal:
        problems.append("a live push cannot be rehearsed: a rehearsal writes to scratch databases, but Atlas pushes "
                        "the whole deployment into the destination cluster itself; rehearse with strategy=mongorestore "
                        "or live_pull")
    if not _HEX24.match(p.source_project_id):
        problems.append("source_project_id must be the 24-hex id of the source's Cloud Manager project"
                        + (f" (got {p.source_project_id!r})" if p.source_project_id else " (it is empty)"))
    if not p.source_cluster_name:
        problems.append("source_cluster_name is empty: name the deployment as Cloud Manager shows it")
    if p.target_project_id and not _HEX24.match(p.target_project_id):
        problems.append(f"target_project_id {p.target_project_id!r} is not a 24-hex Atlas project id")
    if not p.target_cluster_name:
        problems.append("target_cluster_name is empty: name the destination Atlas cluster")
    if not p.migration_host:
        problems.append("migration_host is empty: Atlas needs exactly one migration host of the source project")
    if p.hostname_schema_type not in HOSTNAME_SCHEMA_TYPES:
        problems.append(f"hostname_schema_type {p.hostname_schema_type!r} is not one of "
                        f"{', '.join(HOSTNAME_SCHEMA_TYPES)}")
    if p.hostname_schema_type == "PRIVATE_LINK" and not p.private_link_id:
        problems.append("hostname_schema_type PRIVATE_LINK needs private_link_id (the Atlas private endpoint id)")
    for ip in p.access_list_ips:
        try:
            ipaddress.ip_network(ip, strict=False)
        except ValueError:
            problems.append(f"access_list_ips: {ip!r} is not an IP address or CIDR block")
    if p.cutover not in CUTOVER_MODES:
        problems.append(f"cutover {p.cutover!r} is not one of {', '.join(CUTOVER_MODES)}")
    if p.on_failure not in ON_FAILURE_MODES:
        problems.append(f"on_failure {p.on_failure!r} is not one of {', '.join(ON_FAILURE_MODES)}")
    if p.max_cutover_lag_seconds < 1:
        problems.append("max_cutover_lag_seconds must be at least 1")
    return problems


def source_problems(profile: SourceProfile) -> list[str]:
    """What the inspected source must be for a push."""
    problems: list[str] = []
    if profile.managed_by != "cloud_manager":
        problems.append("the source is not declared as monitored by Cloud Manager (source_managed_by or the "
                        "connection extra migration.managed_by); Ops Manager push is not supported on 6.0+")
    if not version_meets_push_minimum(profile.version):
        problems.append(f"the source runs MongoDB {profile.version or 'an unknown version'}; push needs "
                        f"{_push_minimums()} or later")
    if profile.topology not in ("replica_set", "sharded"):
        problems.append(f"push needs a replica set or a sharded cluster (the source is {profile.topology})")
    return problems


def cutover_problems(profile: SourceProfile, p: LivePushParams) -> list[str]:
    """``auto`` cuts over only on evidence that writes have stopped, which needs the source's change stream."""
    if p.cutover != "auto" or profile.oplog_readable is True:
        return []
    reason = profile.unknown.get("oplog_access") or profile.unknown.get("oplog_readable") or "not readable"
    return [f"cutover=auto confirms that application writes have stopped by watching the source's change stream "
            f"for quiet_period_seconds, and connection '{profile.conn_id}' cannot ({reason}): grant its user "
            "change-stream access (read on the databases, or clusterMonitor + read on local), or use cutover=manual"]


def destination_problems(cluster: Mapping[str, Any] | None, p: LivePushParams, group_id: str | None) -> list[str]:
    if not group_id:
        return ["no destination project: set target_project_id or the Atlas connection's project_id extra"]
    if not p.target_cluster_name:
        return []  # reported by param_problems
    if cluster is None:
        return [f"the destination cluster '{p.target_cluster_name}' does not exist in Atlas project {group_id}"]
    problems = []
    version = cluster.get("mongoDBVersion")
    if not version_meets_push_minimum(version):
        shown = version or "an unknown version"
        problems.append(f"the destination cluster '{p.target_cluster_name}' runs MongoDB {shown}; live migration "
                        f"needs {_push_minimums()} or later")
    if cluster.get("paused"):
        problems.append(f"the destination cluster '{p.target_cluster_name}' is paused: resume it first")
    return problems


def find_deployment(available_projects: list[Mapping[str, Any]], p: LivePushParams
                    ) -> tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]:
    project = next((x for x in available_projects if x.get("projectId") == p.source_project_id), None)
    if project is None:
        return None, None
    deployment = next((d for d in project.get("deployments") or [] if d.get("name") == p.source_cluster_name), None)
    return project, deployment


def visibility_problems(available_projects: list[Mapping[str, Any]], p: LivePushParams) -> list[str]:
    """The source as Atlas sees it through the organization link (``availableProjects``)."""
    if not _HEX24.match(p.source_project_id) or not p.source_cluster_name:
        return []  # reported by param_problems
    project, deployment = find_deployment(available_projects, p)
    if project is None:
        listed = ", ".join(f"{x.get('name')} ({x.get('projectId')})" for x in available_projects) or "none"
        return [f"Cloud Manager project {p.source_project_id} is not among the projects Atlas can migrate from "
                f"(available: {listed}); check the link and that the project belongs to the linked organization"]
    if deployment is None:
        names = ", ".join(str(d.get("name")) for d in project.get("deployments") or []) or "none"
        return [f"deployment '{p.source_cluster_name}' is not listed in Cloud Manager project "
                f"'{project.get('name')}' (deployments: {names})"]
    problems = []
    if not version_meets_push_minimum(deployment.get("mongoDBVersion")):
        problems.append(f"Cloud Manager reports '{p.source_cluster_name}' on MongoDB "
                        f"{deployment.get('mongoDBVersion')}; push needs {_push_minimums()} or later")
    hosts = list(project.get("migrationHosts") or [])
    if p.migration_host and p.migration_host not in hosts:
        problems.append(f"migration host '{p.migration_host}' is not provisioned in Cloud Manager project "
                        f"'{project.get('name')}' (its migration hosts: {', '.join(hosts) or 'none'})")
    return problems


def preflight_problems(profile: SourceProfile, destination_cluster: Mapping[str, Any] | None,
                       available_projects: list[Mapping[str, Any]] | None, params: LivePushParams,
                       group_id: str | None = None) -> list[str]:
    """Every reason the push cannot start (empty: go). ``available_projects`` None: the organizations are not
    linked yet, so the source's visibility is checked after linking (``visibility_problems``)."""
    group = group_id if group_id is not None else params.target_project_id
    problems = [*param_problems(params), *source_problems(profile), *cutover_problems(profile, params),
                *destination_problems(destination_cluster, params, group)]
    if available_projects is not None:
        problems += visibility_problems(available_projects, params)
    return problems


# ---------------------------------------------------------------- pure decisions: cutover


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


@dataclass(frozen=True)
class WindowStatus:
    """Where the run stands in Atlas's 120-hour cutover window."""

    remaining_seconds: float | None  # None: the window has not started (not ready for cutover yet)
    note: str
    warning: str | None = None


def cutover_window(ready_since: float | None, now: float, window: float = CUTOVER_WINDOW_SECONDS) -> WindowStatus:
    """The cutover window as it runs down: a note always, a warning in its last 24 hours (sharper under 6 h
    and 1 h). ``ready_since`` is when the run first saw ``readyForCutover`` (the window starts about then)."""
    if ready_since is None:
        return WindowStatus(None, "the cutover window has not started (Atlas does not report readyForCutover yet)")
    remaining = ready_since + window - now
    deadline = _utc(ready_since + window)
    if remaining <= 0:
        return WindowStatus(remaining, f"the cutover window ended at about {deadline}",
                            f"the {window / 3600:.0f}-hour cutover window has run out (ready since "
                            f"{_utc(ready_since)}): Atlas expires the migration unless the cutover has started")
    note = f"cutover window: {format_duration(remaining)} left (Atlas expires the migration at about {deadline})"
    reached = [t for t in WINDOW_WARNING_SECONDS if remaining <= t]
    if not reached:
        return WindowStatus(remaining, note)
    urgency = {24 * 3600: "less than 24 h left", 6 * 3600: "less than 6 h left", 3600: "LESS THAN 1 HOUR LEFT"}
    label = urgency.get(min(reached), f"less than {format_duration(min(reached))} left")
    return WindowStatus(remaining, note, f"cutover window: {label} ({format_duration(remaining)}); Atlas expires "
                                         f"the migration at about {deadline}: stop application writes and cut over "
                                         "before then")


@dataclass(frozen=True)
class CutoverDecision:
    action: str  # wait | cutover | done | fail
    reason: str
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cutover_decision(migration: Mapping[str, Any], params: LivePushParams, now: float, *, approved: bool = False,
                     ready_since: float | None = None) -> CutoverDecision:
    """Whether to cut over now (pure).

    ``fail`` on FAILED / EXPIRED; ``done`` once COMPLETE or a cutover is already under way (WORKING, ready,
    no lag reported: Atlas reports the lag only before the cutover); ``cutover`` when WORKING,
    ``readyForCutover``, the lag at or under ``max_cutover_lag_seconds`` and, in manual mode, approved;
    ``wait`` otherwise, with the reason.
    """
    mid = migration.get("_id") or "?"
    status = migration.get("status")
    ready = bool(migration.get("readyForCutover"))
    lag = migration.get("lagTimeSeconds")
    if ready and ready_since is None:
        ready_since = now
    window = cutover_window(ready_since, now)
    warnings = (window.warning,) if window.warning else ()
    if status == "FAILED":
        return CutoverDecision("fail", f"Atlas reports live migration {mid} FAILED: see the project's Live Migration "
                                       "page in the Atlas UI for the cause, then start a new migration")
    if status == "EXPIRED":
        return CutoverDecision("fail", f"live migration {mid} EXPIRED: the 120-hour cutover window passed without a "
                                       "cutover; start a new migration and cut over within the window")
    if status == "COMPLETE":
        return CutoverDecision("done", f"live migration {mid} is COMPLETE")
    if status != "WORKING":
        return CutoverDecision("wait", f"live migration {mid} is {status}: the initial sync has not started", warnings)
    if ready and lag is None:
        return CutoverDecision("done", f"the cutover of live migration {mid} is under way")
    if not ready:
        return CutoverDecision("wait", f"Atlas does not report readyForCutover yet ({describe(dict(migration))})",
                               warnings)
    if params.cutover == "manual" and not approved:
        return CutoverDecision("wait", "ready for cutover; waiting for an operator's approval", warnings)
    if lag is not None and float(lag) > params.max_cutover_lag_seconds:
        return CutoverDecision("wait", f"lag {lag} s is above max_cutover_lag_seconds "
                                       f"({params.max_cutover_lag_seconds:g} s)", warnings)
    how = "approved by an operator" if params.cutover == "manual" else "cutover=auto"
    return CutoverDecision("cutover", f"ready for cutover with lag {lag} s "
                                      f"(<= {params.max_cutover_lag_seconds:g} s), {how}", warnings)


# Least time the cutover needs between an approval and the end of the window: the fence, the quiet period, the
# lag draining and Atlas starting the cutover. An approval later than the window minus this is too late to act on.
MIN_APPROVAL_MARGIN_SECONDS = 3600.0


def approval_margin_seconds(p: LivePushParams) -> float:
    """Safety margin before the window's end (pure): at least an hour, more when the run's own cutover limits
    (``cutover_timeout_seconds`` + ``quiet_period_seconds``) need more."""
    return max(MIN_APPROVAL_MARGIN_SECONDS, p.cutover_timeout_seconds + p.quiet_period_seconds)


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def cutover_approval_request(migration: Mapping[str, Any], p: LivePushParams, now: float, *,
                             ready_since: float | None, write_block: bool) -> ApprovalRequest:
    """The approval request of a manual cutover (pure): the evidence as it stands at ``now`` in a Markdown body,
    and a response timeout bounded by ``approval_timeout_seconds`` and the cutover window left minus
    ``approval_margin_seconds``.

    Raises ``LiveMigrationFailed`` for a FAILED or EXPIRED migration (nothing left to approve) and
    ``TooLateToAsk`` when the window leaves less than a minute after the margin. A migration whose cutover is
    already under way or COMPLETE needs no approval (``required`` False, with the reason)."""
    mid = migration.get("_id") or "?"
    if p.cutover == "auto":
        return ApprovalRequest(required=False, what="cutover",
                               reason="cutover=auto: the run cuts over without an approval once the source is quiet")
    decision = cutover_decision(migration, p, now, approved=True, ready_since=ready_since)
    if decision.action == "fail":
        raise LiveMigrationFailed(f"not asking for approval: {decision.reason}")
    if decision.action == "done":
        return ApprovalRequest(required=False, what="cutover", reason=decision.reason)
    if migration.get("readyForCutover") and ready_since is None:
        ready_since = now
    window = cutover_window(ready_since, now)
    deadlines = []
    if window.remaining_seconds is not None:
        deadlines.append(Deadline(f"the {CUTOVER_WINDOW_SECONDS / 3600:.0f}-hour cutover window",
                                  window.remaining_seconds, approval_margin_seconds(p)))
    timeout = bounded_response_timeout(p.approval_timeout_seconds, deadlines)
    if timeout.too_late:
        raise TooLateToAsk(f"too late to ask for approval of the cutover of live migration {mid}: "
                           f"{timeout.explanation}. Cut over from the Atlas UI (Live Migration) right away, or let the "
                           "migration expire and start a new one")
    lag = migration.get("lagTimeSeconds")
    evidence = {
        "migration_id": mid, "status": migration.get("status"), "ready_for_cutover": bool(migration.get("readyForCutover")),
        "lag_seconds": lag, "max_cutover_lag_seconds": p.max_cutover_lag_seconds,
        "ready_since": _utc(ready_since) if ready_since is not None else None,
        "ready_for_seconds": None if ready_since is None else round(now - ready_since),
        "window_remaining_seconds": None if window.remaining_seconds is None else round(window.remaining_seconds),
        "source_writes_blocked": write_block, "if_approved": decision.reason, "warnings": list(decision.warnings),
        "observed_at": _utc(now),
    }
    ready_text = ("not yet" if ready_since is None else
                  f"{_utc(ready_since)} ({format_duration(now - ready_since)} ago)")
    lag_text = ("not reported" if lag is None else f"{lag} s") + f" (the cutover needs at most {p.max_cutover_lag_seconds:g} s)"
    writes = ("BLOCKED by the run at cutover (setUserWriteBlockMode on the source)" if write_block else
              "NOT blocked by the run: approving states that application writes to the source have stopped")
    rows = [("Migration status", describe(dict(migration))), ("Lag", lag_text),
            ("Ready for cutover since", ready_text), ("Cutover window", window.note),
            ("Source writes at cutover", writes), ("If approved now", decision.reason)]
    body = [f"### Cutover of Atlas live migration `{mid}`",
            f"Source deployment `{p.source_cluster_name}` (Cloud Manager project `{p.source_project_id}`) into Atlas "
            f"cluster `{p.target_cluster_name}`. Evidence read from Atlas at {_utc(now)}.",
            "", "| | |", "|---|---|", *[f"| {name} | {_md_cell(value)} |" for name, value in rows], ""]
    if decision.warnings:
        body += ["**Warnings**", *[f"- {w}" for w in decision.warnings], ""]
    request = ApprovalRequest(required=True, what="cutover", subject=f"Approve the cutover of live migration {mid} "
                              f"into '{p.target_cluster_name}'", timeout_seconds=timeout.seconds,
                              timeout_explanation=timeout.explanation, asked_at=now, evidence=evidence)
    body += [timeout_line(request), "",
             "Approve: the run fences the source, waits for the lag to drain and asks Atlas to cut over; it re-reads "
             "the migration first and refuses a FAILED or EXPIRED one. Reject: the run fails here and the migration "
             "keeps syncing until its window ends (clean-up keeps the link unless on_failure=abandon)."]
    return replace(request, body="\n".join(body))


# ---------------------------------------------------------------- pure decisions: the run's migration record

# Record states. ``creating`` is written before the POST, so a task that dies mid-request leaves a trace.
CREATING, CREATED, NOT_CREATED = "creating", "created", "not_created"


@dataclass(frozen=True)
class StartDecision:
    action: str  # create | reuse | refuse
    reason: str


def _record_help(key: str) -> str:
    return (f"Atlas's API has no call that lists live migrations, so the run cannot look it up: check the destination "
            f"project's Live Migration page in Atlas. If a migration from this run is there, reconnect to it: "
            f"airflow variables set '{key}' '{{\"state\": \"{CREATED}\", \"migration_id\": \"<its id>\", "
            f"\"group_id\": \"<project id>\"}}' and clear start_migration. If there is none, delete the Variable "
            "and clear start_migration to start one")


def start_decision(record: Mapping[str, Any] | None, status: str | None, key: str) -> StartDecision:
    """Whether ``start_migration`` creates a migration, reconnects to the run's earlier one, or stops (pure).

    ``record`` is the run's Variable (None: none yet); ``status`` what Atlas reports now for the recorded
    migration (``MISSING`` for a 404; None when there is no id to read). A run never has two migrations
    going: a second POST happens only when the earlier one has ended (FAILED, EXPIRED) or was never created.
    """
    state = (record or {}).get("state")
    if record is None or state == NOT_CREATED:
        return StartDecision("create", "no live migration has been created for this run yet")
    if state == CREATING:
        return StartDecision("refuse", f"an earlier attempt of start_migration sent the request to create a live "
                                       f"migration (at {_utc(float(record.get('requested_at') or 0))}) and did not "
                                       f"learn whether Atlas created it; starting another could run two migrations "
                                       f"into one cluster. {_record_help(key)}")
    if state != CREATED or not record.get("migration_id"):
        return StartDecision("refuse", f"Variable '{key}' holds no usable live-push record ({dict(record)!r}). "
                                       f"{_record_help(key)}")
    mid = record["migration_id"]
    if status == "MISSING":
        return StartDecision("refuse", f"Atlas does not know live migration {mid}, which this run recorded, in "
                                       f"project {record.get('group_id')}. {_record_help(key)}")
    if status in ("FAILED", "EXPIRED"):
        return StartDecision("create", f"this run's earlier live migration {mid} is {status}: starting a new one")
    return StartDecision("reuse", f"reconnecting to live migration {mid}, started by an earlier attempt of this "
                                  f"run ({status})")


def post_outcome_unknown(status: int | None, never_sent: bool) -> bool:
    """After a failed POST: might Atlas have applied it? (pure). Unreachable before sending, 429, 502/503/504
    (the gateway answered) and 4xx: no. A lost connection mid-request, 500 and other 5xx, a 2xx whose body
    broke the contract: possibly."""
    if status is None:
        return not never_sent
    if status == 429 or 400 <= status < 500 or status in (502, 503, 504):
        return False
    return True


@dataclass(frozen=True)
class CleanupDecision:
    remove_link: bool
    reason: str


def cleanup_decision(record: Mapping[str, Any] | None, status: str | None, abandon_by: str | None
                     ) -> CleanupDecision:
    """Whether the teardown removes the organization link and the link-tokens (pure).

    Removing them stops a running migration, so they go only when no migration was created, once it is
    COMPLETE / FAILED / EXPIRED, or on an operator's explicit ``abandon`` (``abandon_by`` says where it came
    from); never merely because a task of the run failed. ``status`` None: the migration could not be read.
    """
    state = (record or {}).get("state")
    mid = (record or {}).get("migration_id")
    if record is None or state == NOT_CREATED:
        return CleanupDecision(True, "no live migration was created in this run")
    if state == CREATED and status in TERMINAL_STATUSES:
        return CleanupDecision(True, f"live migration {mid} is {status}")
    if abandon_by:
        what = f"live migration {mid}" if mid else "the live migration this run may have created"
        return CleanupDecision(True, f"an operator abandoned {what} ({abandon_by}); removing the link stops it")
    if state == CREATING:
        return CleanupDecision(False, "a request to create a live migration may have reached Atlas without the run "
                                      "learning its outcome; the link stays so that such a migration keeps running")
    if status is None:
        return CleanupDecision(False, f"the status of live migration {mid} could not be read; it may still be "
                                      "running")
    return CleanupDecision(False, f"live migration {mid} is still {status} in Atlas; removing the link would "
                                  "stop it")


def abandon_requested(p: LivePushParams, variable_value: Any, key: str) -> str | None:
    """Where an abandon decision came from (the param or the run's Variable), or None (pure)."""
    if p.on_failure == "abandon":
        return "param on_failure=abandon"
    if variable_value is not None and str(variable_value).strip().lower() == ABANDON:
        return f"Variable '{key}' = {ABANDON}"
    return None


# ---------------------------------------------------------------- task bodies


@dataclass(frozen=True)
class RunRecord:
    """The run's live-migration record: an Airflow Variable holding JSON ids and times (no secrets), so a
    retried or cleared task finds the migration an earlier attempt created. ``get``/``put`` replace the
    Variable calls in tests."""

    key: str
    get: Callable[[str], Any]
    put: Callable[[str, str], None]

    def read(self) -> dict[str, Any] | None:
        raw = self.get(self.key)
        if raw is None or raw == "":
            return None
        try:
            value = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise LiveMigrationFailed(f"Variable '{self.key}' does not hold a live-push record (JSON object): "
                                      f"{_record_help(self.key)}")
        return value

    def write(self, record: Mapping[str, Any]) -> None:
        self.put(self.key, json.dumps(dict(record), sort_keys=True))


def run_record(context: Mapping[str, Any]) -> RunRecord:
    from airflow.sdk import Variable

    key = run_variable_key(context["dag"].dag_id, context["run_id"], prefix=RECORD_PREFIX)
    return RunRecord(key, lambda k: Variable.get(k, default=None),
                     lambda k, v: Variable.set(k, v, description="live_push: this run's Atlas live migration"))


def abandon_key(context: Mapping[str, Any]) -> str:
    return run_variable_key(context["dag"].dag_id, context["run_id"], prefix=ABANDON_PREFIX)


def _outage_policy(p: LivePushParams) -> OutagePolicy:
    return OutagePolicy(tolerance_seconds=p.api_outage_tolerance_seconds)


def read_migration(atlas, started: Mapping[str, Any], p: LivePushParams) -> dict[str, Any]:
    """GET the migration, riding out a transient API outage for up to ``api_outage_tolerance_seconds``."""
    return call_through_outage(
        lambda: atlas.get_live_migration(started["migration_id"], group_id=started["group_id"]),
        policy=_outage_policy(p), what="the Atlas API", still_running=resume_hint(started["migration_id"]), log=log)


def _hooks(p: LivePushParams):
    from atlas_migration.hooks.atlas import AtlasAdminHook, CloudManagerHook

    return AtlasAdminHook(p.atlas_conn_id), CloudManagerHook(p.cloud_manager_conn_id)


def _log_block(title: str, lines: list[str]) -> None:
    log.info("%s\n%s", title, "\n".join(f"    {line}" for line in lines))


def run_preflight(params: Mapping[str, Any], profile_data: dict[str, Any]) -> dict[str, Any]:
    """Step 1: read-only checks; raise ``PreflightFailed`` listing every problem before anything changes."""
    from atlas_migration.hooks.atlas import AtlasApiError

    p = LivePushParams.parse(params)
    profile = SourceProfile.from_dict(profile_data)
    if p.rehearsal:  # before any API call: the rehearsal DAG may not even have the API connections
        raise PreflightFailed("live push pre-flight failed; nothing was changed:\n  - " + param_problems(p)[0])
    atlas, cloud_manager = _hooks(p)
    try:
        group_id = p.target_project_id or atlas.config.project_id or ""
        cluster = None
        if group_id and p.target_cluster_name:
            try:
                cluster = atlas.get_cluster(p.target_cluster_name, group_id=group_id)
            except AtlasApiError as exc:
                if exc.status != 404:
                    raise
        link_status = cloud_manager.get_migration_link_status()
        # Atlas lists availableProjects only for a linked Cloud Manager organization.
        available = atlas.list_available_projects() if link_status == "SYNCED" else None
    except AtlasApiError as exc:
        raise PreflightFailed(f"live push pre-flight could not read Atlas / Cloud Manager: {exc}. Nothing was "
                              "changed.") from None
    finally:
        atlas.close()
        cloud_manager.close()
    problems = preflight_problems(profile, cluster, available, p, group_id)
    block, block_reason = False, "no cutover fence checked (pre-flight problems)"
    try:
        block, block_reason = push_write_block_decision(p)
    except ConfigurationError as exc:
        problems.append(str(exc))
    if problems:
        raise PreflightFailed("live push pre-flight failed; nothing was changed in Atlas or Cloud Manager:\n"
                              + "\n".join(f"  - {problem}" for problem in problems))
    destination_version = (cluster or {}).get("mongoDBVersion")
    _log_block("Live push pre-flight passed", [
        f"source            : {profile.version} {profile.topology}, Cloud Manager project {p.source_project_id}, "
        f"deployment '{p.source_cluster_name}'",
        f"destination       : cluster '{p.target_cluster_name}' (MongoDB {destination_version}) in project {group_id}",
        f"migration host    : {p.migration_host} ({p.hostname_schema_type})",
        f"organization link : {link_status}"
        + ("; the source is listed under availableProjects" if available is not None
           else "; the source's visibility is checked once linked"),
        f"cutover           : {p.cutover}, at a lag of at most {p.max_cutover_lag_seconds:g} s, at a fence "
        f"({block_reason}), then {p.quiet_period_seconds:g} s watching for late writes",
    ])
    return {"group_id": group_id, "destination_cluster": p.target_cluster_name,
            "destination_version": destination_version, "source_version": profile.version,
            "link_status": link_status, "source_visible": True if available is not None else None,
            "source_watchable": profile.oplog_readable is True, "write_block": block}


def create_link(params: Mapping[str, Any], record: RunRecord | None = None) -> dict[str, Any]:
    """Step 2: Atlas link-token -> Cloud Manager. The token never leaves this function.

    When the run already has a live migration (this setup re-runs when a task of the group is cleared) and the
    link is still SYNCED, the link is kept as it is: a new link-token is not needed and would only add one."""
    p = LivePushParams.parse(params)
    existing = record.read() if record is not None else None
    atlas, cloud_manager = _hooks(p)
    try:
        if existing and existing.get("state") in (CREATED, CREATING):
            status = cloud_manager.get_migration_link_status()
            if status == "SYNCED":
                log.info("this run's live migration %s already has a SYNCED organization link: keeping it (no new "
                         "link-token)", existing.get("migration_id") or "(outcome of its creation unknown)")
                return {"linked_at": time.time(), "status": status, "access_list_ips": list(p.access_list_ips),
                        "reused": True}
        token = atlas.create_link_token(list(p.access_list_ips))
        try:
            link = cloud_manager.create_migration_link(token)
        except Exception:
            # This task is the setup of the clean-up teardown, which does not run when the setup fails: revoke now.
            log.error("registering the link-token with Cloud Manager failed; revoking the Atlas link-tokens")
            try:
                atlas.delete_link_tokens()
            except MigrationError as exc:
                log.error("could not revoke the link-tokens (remove them in Atlas > Organization > Live "
                          "Migration): %s", exc)
            raise
        finally:
            del token
    finally:
        atlas.close()
        cloud_manager.close()
    log.info("created an Atlas link-token (access list: %s) and registered it with the Cloud Manager "
             "organization; link status %s", ", ".join(p.access_list_ips) or "unrestricted", link.get("status"))
    return {"linked_at": time.time(), "status": link.get("status"), "access_list_ips": list(p.access_list_ips)}


@dataclass(frozen=True)
class Poke:
    """A sensor poke's answer (turned into ``PokeReturnValue`` by the task wrapper)."""

    done: bool
    value: dict[str, Any] | None = None


def _check_deadline(started_at: float, limit: float, what: str, now: float | None = None) -> float:
    waited = (time.time() if now is None else now) - started_at
    if waited > limit:
        raise LiveMigrationFailed(f"{what} (waited {format_duration(waited)}, limit {format_duration(limit)})")
    return waited


def poke_link(params: Mapping[str, Any], linked: dict[str, Any]) -> Poke:
    """Step 2 (wait): the link is SYNCED, and Atlas lists the source project and deployment."""
    p = LivePushParams.parse(params)
    atlas, cloud_manager = _hooks(p)
    try:
        status = cloud_manager.get_migration_link_status()
        if status != "SYNCED":
            waited = _check_deadline(linked["linked_at"], p.link_timeout_seconds,
                                     f"the Cloud Manager organization link is still {status}: check the Cloud "
                                     "Manager organization settings (Live Migration) and the link-token access list")
            log.info("organization link %s after %s; waiting for SYNCED", status, format_duration(waited))
            return Poke(False)
        projects = atlas.list_available_projects()
    finally:
        atlas.close()
        cloud_manager.close()
    problems = visibility_problems(projects, p)
    if problems:
        raise PreflightFailed("the organizations are linked, but Atlas cannot migrate the source; nothing was "
                              "migrated:\n" + "\n".join(f"  - {problem}" for problem in problems))
    project, deployment = find_deployment(projects, p)
    assert project is not None and deployment is not None  # visibility_problems checked both
    facts = {"project_name": project.get("name"), "project_id": project.get("projectId"),
             "deployment": deployment.get("name"), "version": deployment.get("mongoDBVersion"),
             "managed": bool(deployment.get("managed")), "tls_enabled": bool(deployment.get("tlsEnabled")),
             "sharded": bool(deployment.get("sharded")), "db_size_bytes": deployment.get("dbSizeBytes")}
    log.info("organization link SYNCED; Atlas lists deployment '%s' (MongoDB %s, %s) in Cloud Manager project '%s'",
             facts["deployment"], facts["version"], "automation-managed" if facts["managed"] else "monitored only",
             facts["project_name"])
    return Poke(True, facts)


def build_request(p: LivePushParams, facts: Mapping[str, Any], group_id: str):
    """The create/validate body. An automation-managed source uses Cloud Manager's credentials; a monitored-only
    one needs a user: the login of the source connection (its password goes to Atlas, never to a log)."""
    from atlas_migration.hooks.atlas import (
        LiveMigrationDestination,
        LiveMigrationRequest,
        LiveMigrationSource,
    )

    username = password = None
    if not facts.get("managed"):
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(p.source_conn_id)
        if not conn.login or not conn.password:
            raise PreflightFailed(f"deployment '{p.source_cluster_name}' is monitored, not automation-managed, by "
                                  f"Cloud Manager: Atlas needs a source user, and connection '{p.source_conn_id}' "
                                  "has no login/password")
        username, password = conn.login, conn.password
    source = LiveMigrationSource(cluster_name=p.source_cluster_name, group_id=p.source_project_id,
                                 managed_authentication=bool(facts.get("managed")),
                                 ssl=bool(facts.get("tls_enabled")), username=username, password=password)
    destination = LiveMigrationDestination(cluster_name=p.target_cluster_name, group_id=group_id,
                                           hostname_schema_type=p.hostname_schema_type,
                                           private_link_id=p.private_link_id or None)
    return LiveMigrationRequest(source=source, destination=destination, migration_host=p.migration_host,
                                drop_destination_data=p.drop_destination_data)


def request_validation(params: Mapping[str, Any], checked: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    """Step 3: ask Atlas to validate the request."""
    p = LivePushParams.parse(params)
    atlas, _ = _hooks(p)
    try:
        validation = atlas.validate_live_migration(build_request(p, facts, checked["group_id"]),
                                                   group_id=checked["group_id"])
    finally:
        atlas.close()
    log.info("Atlas is validating the migration request (validation %s: %s)", validation.get("_id"),
             validation.get("status"))
    return {"validation_id": validation["_id"], "status": validation.get("status"), "requested_at": time.time()}


def poke_validation(params: Mapping[str, Any], checked: dict[str, Any], validation: dict[str, Any]) -> Poke:
    """Step 3 (wait): SUCCESS goes on; FAILED ends the run with Atlas's errorMessage."""
    p = LivePushParams.parse(params)
    atlas, _ = _hooks(p)
    try:
        result = atlas.get_live_migration_validation(validation["validation_id"], group_id=checked["group_id"])
    finally:
        atlas.close()
    status = result.get("status")
    if status == "SUCCESS":
        log.info("Atlas validated the migration request (validation %s)", validation["validation_id"])
        return Poke(True, {"validation_id": validation["validation_id"], "status": status})
    if status == "FAILED":
        reason = result.get("errorMessage") or "no reason given"
        raise LiveMigrationFailed(f"Atlas refused the live migration request: {reason}. Nothing was migrated; fix "
                                  "the cause and run again")
    waited = _check_deadline(validation["requested_at"], p.validation_timeout_seconds,
                             f"Atlas has not finished validating the request (validation {validation['validation_id']} "
                             f"is {status})")
    log.info("validation %s is %s after %s", validation["validation_id"], status, format_duration(waited))
    return Poke(False)


def start_migration(params: Mapping[str, Any], checked: dict[str, Any], facts: dict[str, Any],
                    record: RunRecord) -> dict[str, Any]:
    """Step 4: create the live migration, or reconnect to the one an earlier attempt of this run created.

    The run's record (``RunRecord``) says ``creating`` before the POST and holds the id after it, so a
    retried or cleared task never starts a second migration (``start_decision``)."""
    from atlas_migration.hooks.atlas import AtlasApiError

    p = LivePushParams.parse(params)
    earlier = record.read()
    atlas, _ = _hooks(p)
    try:
        status = None
        if earlier and earlier.get("state") == CREATED and earlier.get("migration_id"):
            status = _recorded_status(atlas, earlier, p)
        decision = start_decision(earlier, status, record.key)
        if decision.action == "refuse":
            raise LiveMigrationFailed(decision.reason)
        if decision.action == "reuse":
            log.info("%s", decision.reason)
            return {"migration_id": earlier["migration_id"], "group_id": earlier["group_id"], "status": status,
                    "started_at": earlier.get("created_at") or time.time(), "reconnected": True}
        log.info("%s", decision.reason)
        ended = [*(earlier or {}).get("ended", []), *([earlier["migration_id"]] if status in TERMINAL_STATUSES else [])]
        request = build_request(p, facts, checked["group_id"])
        atlas.config  # noqa: B018 - a connection problem shows here, before the record says "creating"
        record.write({"state": CREATING, "group_id": checked["group_id"], "requested_at": time.time(), "ended": ended})
        try:
            migration = atlas.create_live_migration(request, group_id=checked["group_id"])
        except AtlasApiError as exc:
            if post_outcome_unknown(exc.status, exc.never_sent):
                raise LiveMigrationFailed(f"creating the live migration failed ({exc}), possibly after Atlas "
                                          f"created it. {_record_help(record.key)}") from None
            record.write({"state": NOT_CREATED, "group_id": checked["group_id"], "ended": ended})
            raise
        log.info("live migration %s created; recorded in Variable '%s'", migration["_id"], record.key)
        record.write({"state": CREATED, "migration_id": migration["_id"], "group_id": checked["group_id"],
                      "created_at": time.time(), "ended": ended})
    finally:
        atlas.close()
    log.info("started live migration %s (%s) from '%s' to cluster '%s'", migration["_id"], describe(migration),
             p.source_cluster_name, p.target_cluster_name)
    if p.cutover == "auto":
        log.warning("cutover=auto: the run cuts over as soon as Atlas is ready; writes made to the source after "
                    "that are not migrated, so application writes must already be stopped")
    return {"migration_id": migration["_id"], "group_id": checked["group_id"], "status": migration.get("status"),
            "started_at": time.time(), "reconnected": False}


def _recorded_status(atlas, record: Mapping[str, Any], p: LivePushParams) -> str:
    """The recorded migration's status now (``MISSING`` on a 404), through a transient outage."""
    from atlas_migration.hooks.atlas import AtlasApiError

    def read() -> str:
        try:
            return str(atlas.get_live_migration(record["migration_id"], group_id=record["group_id"]).get("status"))
        except AtlasApiError as exc:
            if exc.status == 404:
                return "MISSING"
            raise

    return call_through_outage(read, policy=_outage_policy(p), what="the Atlas API",
                               still_running=resume_hint(record["migration_id"]), log=log)


def _pull(context: Mapping[str, Any], task_id: str) -> Any:
    return context["ti"].xcom_pull(task_ids=f"{GROUP_ID}.{task_id}", default=None)


def request_cutover_approval(params: Mapping[str, Any], checked: Mapping[str, Any], started: Mapping[str, Any],
                             synced: Mapping[str, Any] | None) -> dict[str, Any]:
    """``cutover_evidence``: read the migration (through an outage) and build the approval request
    (``cutover_approval_request``); ``cutover=auto`` needs none and reads nothing."""
    p = LivePushParams.parse(params)
    if p.cutover == "auto":
        return cutover_approval_request({}, p, time.time(), ready_since=None, write_block=False).to_dict()
    atlas, _ = _hooks(p)
    try:
        migration = read_migration(atlas, started, p)
    finally:
        atlas.close()
    request = cutover_approval_request(migration, p, time.time(), ready_since=(synced or {}).get("ready_since"),
                                       write_block=bool(checked.get("write_block")))
    for warning in request.evidence.get("warnings", []):
        log.warning("%s", warning)
    return request.to_dict()


def push_write_block_decision(p: LivePushParams) -> tuple[bool, str]:
    """Whether the cutover blocks user writes on the source (``fence.decide_write_block`` on the source
    connection); raises ``ConfigurationError`` for ``require`` without support and for ``cutover=auto``
    without write blocking (only an operator can then say writes stopped)."""
    from contextlib import closing

    from atlas_migration.fence import cutover_problems, decide_write_block, read_write_block_support
    from atlas_migration.hooks.mongo import endpoint_from_connection

    with closing(endpoint_from_connection(p.source_conn_id, "source").connect()) as client:
        support = read_write_block_support(client)
    block, why = decide_write_block(p.source_write_block, support)
    problems = cutover_problems(p.cutover, block)
    if problems:
        raise ConfigurationError(f"{' '.join(problems)} ({why})")
    return block, why


def fence_source_writes(p: LivePushParams, checked: Mapping[str, Any]) -> dict[str, Any]:
    """The cutover fence on the source before Atlas is asked to cut over: block user writes (when decided at
    pre-flight) or take the approval as the statement that they stopped; wait until the fence is
    majority-committed; watch ``quiet_period_seconds`` for late writes and fail with their count (Atlas keeps
    syncing, so nothing is lost). Returns the fence (JSON-safe) for the report."""
    from contextlib import closing

    from atlas_migration.fence import (
        count_late_writes,
        late_writes_message,
        take_fence,
        wait_majority_committed,
    )
    from atlas_migration.hooks.mongo import endpoint_from_connection
    from atlas_migration.namespaces import is_never_migrated

    with closing(endpoint_from_connection(p.source_conn_id, "source").connect()) as client:
        fence = take_fence(client, block=bool(checked.get("write_block")))
        wait_majority_committed(client, fence, timeout=p.cutover_timeout_seconds)
        late = count_late_writes(client, fence, p.quiet_period_seconds,
                                 selected=lambda db, coll: not is_never_migrated(db, coll),
                                 ignore_databases=frozenset(_INTERNAL_WRITE_DATABASES))
    if late:
        fence.late_writes = dict(late)
        raise LiveMigrationFailed(late_writes_message(late, fence, what="the Atlas cutover"))
    log.info("no application write on the source after the fence for %g s: %s", p.quiet_period_seconds,
             fence.describe())
    return fence.to_dict()


def poke_cutover(params: Mapping[str, Any], checked: dict[str, Any], started: dict[str, Any],
                 synced: dict[str, Any], approval: dict[str, Any], waited: float) -> Poke:
    """Step 5: cut over when ``cutover_decision`` says so and the source has been quiet for the quiet period;
    a refusal by Atlas (400/409: not ready after all) waits for the next poke. ``waited``: seconds since this
    sensor's first poke (application writes must stop within ``cutover_timeout_seconds``)."""
    from atlas_migration.hooks.atlas import AtlasApiError

    p = LivePushParams.parse(params)
    atlas, _ = _hooks(p)
    try:
        migration = read_migration(atlas, started, p)
        now = time.time()
        decision = cutover_decision(migration, p, now, approved=bool(approval.get("approved")),
                                    ready_since=synced.get("ready_since"))
        for warning in decision.warnings:
            log.warning("%s", warning)
        if decision.action == "fail":
            raise LiveMigrationFailed(decision.reason)
        if decision.action == "wait":
            log.info("not cutting over yet: %s", decision.reason)
            return Poke(False)
        if decision.action == "done":
            log.info("%s", decision.reason)
            return Poke(True, {"cutover_requested_at": None, "migration": summarise(migration)})
        fence = fence_source_writes(p, checked)
        try:
            atlas.cutover_live_migration(started["migration_id"], group_id=started["group_id"])
        except AtlasApiError as exc:
            if exc.status in (400, 409):
                log.warning("Atlas refused the cutover (%s); re-checking the migration at the next poke", exc)
                return Poke(False)
            raise
    finally:
        atlas.close()
    log.info("cutover requested for live migration %s: %s. Once it is COMPLETE, repoint applications to Atlas",
             started["migration_id"], decision.reason)
    return Poke(True, {"cutover_requested_at": now, "migration": summarise(migration), "fence": fence})


def cleanup_link(params: Mapping[str, Any], record: RunRecord | None, started: dict[str, Any] | None = None, *,
                 abandon_value: Any = None, abandon_variable: str = "") -> dict[str, Any]:
    """Teardown: remove the Cloud Manager migration link and the Atlas link-tokens when ``cleanup_decision``
    allows it (no migration, a finished one, or an operator's abandon). Otherwise keep them, say why and how
    to go on, and succeed: keeping a running migration alive is not a failure of the clean-up."""
    from atlas_migration.hooks.atlas import AtlasApiError

    p = LivePushParams.parse(params)
    known = record.read() if record is not None else None
    if known is None and started:  # no Variable (e.g. a run from before the record existed): the XCom says it
        known = {"state": CREATED, "migration_id": started["migration_id"], "group_id": started["group_id"]}
    atlas, cloud_manager = _hooks(p)
    status = None
    errors: list[str] = []
    try:
        if known and known.get("state") == CREATED:
            try:
                status = atlas.get_live_migration(known["migration_id"], group_id=known["group_id"]).get("status")
            except AtlasApiError as exc:
                log.warning("could not read live migration %s before clean-up: %s", known["migration_id"], exc)
        decision = cleanup_decision(known, status, abandon_requested(p, abandon_value, abandon_variable))
        if not decision.remove_link:
            log.warning("keeping the Cloud Manager migration link and the Atlas link-tokens: %s.\n"
                        "    to go on: clear the failed task (with its downstream tasks); the cleared tasks "
                        "reconnect to the migration%s\n"
                        "    to abandon the migration instead: airflow variables set '%s' %s, then clear task "
                        "%s.cleanup (removing the link stops the migration; a new run starts over)",
                        decision.reason, f" ({known.get('migration_id')})" if known.get("migration_id") else "",
                        abandon_variable or f"{ABANDON_PREFIX}__<dag_id>__<run_id>", ABANDON, GROUP_ID)
            return {"migration_status": status, "link_removed": False, "reason": decision.reason}
        log.info("removing the organization link: %s", decision.reason)
        for what, call in (("Cloud Manager migration link", cloud_manager.delete_migration_link),
                           ("Atlas link-tokens", atlas.delete_link_tokens)):
            try:
                call()
                log.info("removed the %s", what)
            except AtlasApiError as exc:
                errors.append(f"{what}: {exc}")
    finally:
        atlas.close()
        cloud_manager.close()
    if errors:
        raise MigrationError("clean-up incomplete; remove these by hand (Atlas and Cloud Manager: Organization > "
                             "Live Migration):\n" + "\n".join(f"  - {e}" for e in errors))
    return {"migration_status": status, "link_removed": True, "reason": decision.reason}


# ---------------------------------------------------------------- the task group


def poke_interval() -> float:
    """Seconds between sensor pokes, from ``$MIGRATION_POKE_INTERVAL_SECONDS`` (read at parse time)."""
    raw = os.environ.get(POKE_INTERVAL_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_POKE_INTERVAL
    except ValueError:
        raise ConfigurationError(f"{POKE_INTERVAL_ENV}={raw!r} is not a number of seconds") from None
    return max(1.0, value)


@task_group(group_id=GROUP_ID)
def live_push_group(profile) -> None:
    """Atlas live migration, push: Cloud Manager pushes the source into Atlas (module docstring). Returns
    nothing, so a branch in front of it runs its first task, not its last (FIELD-NOTES)."""
    from airflow.sdk import PokeReturnValue

    interval = poke_interval()
    # Static backstops; the params' run-time timeouts are checked on every poke and are always shorter.
    short_wait, long_wait = 2 * _DAY, CUTOVER_WINDOW_SECONDS + _DAY

    def answer(poke: Poke) -> PokeReturnValue:
        return PokeReturnValue(is_done=poke.done, xcom_value=poke.value)

    @task
    def preflight(profile: dict, params=None) -> dict:
        return run_preflight(params, profile)

    @setup
    def link_organizations(checked: dict, params=None) -> dict:
        return create_link(params, run_record(get_current_context()))

    @task.sensor(mode="reschedule", poke_interval=interval, timeout=short_wait)
    def wait_for_link(linked: dict, params=None) -> PokeReturnValue:
        return answer(poke_link(params, linked))

    @task
    def validate_request(checked: dict, facts: dict, params=None) -> dict:
        return request_validation(params, checked, facts)

    @task.sensor(mode="reschedule", poke_interval=interval, timeout=short_wait)
    def wait_for_validation(checked: dict, validation: dict, params=None) -> PokeReturnValue:
        return answer(poke_validation(params, checked, validation))

    @task(retries=0, multiple_outputs=True)
    def start(checked: dict, facts: dict, params=None) -> dict:
        return start_migration(params, checked, facts, run_record(get_current_context()))

    @task.sensor(mode="reschedule", poke_interval=interval, timeout=long_wait)
    def cutover(checked: dict, started: dict, synced: dict, approval: dict, params=None) -> PokeReturnValue:
        waited = waited_seconds(get_current_context())
        return answer(poke_cutover(params, checked, started, synced, approval, waited))

    @task
    def cutover_evidence(checked: dict, started: dict, synced: dict, params=None) -> dict:
        return request_cutover_approval(params, checked, started, synced)

    @teardown(on_failure_fail_dagrun=True)
    def cleanup(params=None) -> dict:
        from airflow.sdk import Variable

        context = get_current_context()
        key = abandon_key(context)
        return cleanup_link(params, run_record(context), _pull(context, "start_migration"),
                            abandon_value=Variable.get(key, default=None), abandon_variable=key)

    checked = preflight(profile)
    linked = link_organizations(checked)
    facts = wait_for_link(linked)
    validated = wait_for_validation(checked, validate_request(checked, facts))
    started = start.override(task_id="start_migration")(checked, facts)
    validated >> started
    synced = WaitForLiveMigrationOperator(
        task_id="wait_for_sync", wait_for="ready", atlas_conn_id="{{ params.atlas_conn_id }}",
        group_id=started["group_id"], migration_id=started["migration_id"],
        max_lag_seconds="{{ params.max_cutover_lag_seconds }}", poll_interval="{{ params.poll_interval_seconds }}",
        timeout_seconds="{{ params.sync_timeout_seconds }}",
        outage_tolerance_seconds="{{ params.api_outage_tolerance_seconds }}")
    request = cutover_evidence(checked, started, synced.output)
    approve = RunApprovalOperator(task_id="approve_cutover", request=request, what="cutover")
    requested = cutover(checked, started, synced.output, approve.output)
    completed = WaitForLiveMigrationOperator(
        task_id="wait_for_completion", wait_for="complete", atlas_conn_id="{{ params.atlas_conn_id }}",
        group_id=started["group_id"], migration_id=started["migration_id"],
        poll_interval="{{ params.poll_interval_seconds }}", timeout_seconds="{{ params.completion_timeout_seconds }}",
        outage_tolerance_seconds="{{ params.api_outage_tolerance_seconds }}")
    requested >> completed
    clean = cleanup()
    completed >> clean
    clean.as_teardown(setups=linked.operator)
