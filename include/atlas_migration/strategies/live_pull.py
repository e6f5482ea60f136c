"""The ``live_pull`` strategy: copy the source while it keeps serving writes, follow its change stream, cut
over when the target has caught up. Atlas's own pull migration has no API, so the group runs the pull itself
with one of two engines (``pull_engine``):

- ``native``: the project's engine (``engines.live.LiveSync``):

      start (resume point recorded BEFORE the copy) -> copy (mapped: one task per _id partition,
      checkpointed; batches of partitions beyond Airflow's max_map_length) -> finish_copy, with verify
      (mapped like copy) beside catch_up (until lag < max_cutover_lag_seconds) -> cutover_evidence ->
      await_cutover_approval (manual only: Airflow's human-in-the-loop approval, evidence in its body) ->
      cutover (catch up again, fence, drain to it, late-write grace, rechecks) -> validate

- ``mongosync``: a standalone mongosync (``mongosync_conn_id``) driven through its REST API:

      mongosync_start -> wait_can_commit (deferrable) -> mongosync_commit_evidence -> await_mongosync_approval
      (manual only) -> mongosync_commit -> wait_committed (deferrable) -> mongosync_check_fence -> validate

  A manual approval parks in ``awaiting_input`` (no slot, no code running): the native engine therefore
  catches up again at the start of ``cutover``, writes still flowing, before it places the fence, so a long
  wait lengthens that catch-up and not the downtime; mongosync keeps syncing by itself meanwhile.

  ``source_write_block`` and the mongosync release (declared in the connection's extras, or inferred from
  ``/progress``) decide whether mongosync blocks source writes at ``/commit`` (``enableUserWriteBlocking``
  in ``/start`` up to 1.19, its startup configuration from 1.20). Without that, the commit needs the
  operator's approval (``cutover=auto`` is refused before ``/start``) and a fence check: no write may reach
  the source for ``quiet_period_seconds`` after the fence, or ``/commit`` is not sent; after COMMITTED a
  write after the fence fails the run (it may be missing from Atlas).

A sharded source (a mongos): ``stop_balancer`` (default on) stops the source's balancer before either
engine starts (``stop_balancer``, the group's root) and a teardown (``restart_balancer``) starts it again
once the pull is over, whatever happened, but only when this run stopped it. MongoDB's guidance for live
migrations out of a sharded cluster is to stop the balancer for the whole migration (mongosync refuses to
run otherwise without namespace filtering): a chunk migration during the copy moves documents between
shards while they are read and replays them as ``fromMigrate`` oplog entries on two shards.

``auto`` picks mongosync when its connection exists, else native. Every task is safe to retry: the native
engine resumes from checkpoints stored on the target (``__atlas_migration.live_sync``), and mongosync
calls are made only in the state that accepts them.

Other strategies reuse these tasks: ``add_pull_tasks(profile, sources)`` adds them to the task group being
built (the ``compose`` and ``aws_replica_set`` groups nest them in a ``pull`` group). ``PullSources`` says
which connection the native engine copies from and which one its change stream reads: the same one here,
a mongos and a separately reachable oplog for Compose.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from airflow.sdk import task, task_group

from atlas_migration.approval import (
    ApprovalRequest,
    RunApprovalOperator,
    bounded_response_timeout,
    timeout_line,
)
from atlas_migration.engines.copy_order import COPY_ORDERS, DEFAULT_COPY_ORDER
from atlas_migration.errors import ConfigurationError, MigrationError
from atlas_migration.fence import WRITE_BLOCK_MODES
from atlas_migration.hooks.mongo import MongoEndpoint, endpoint_from_connection
from atlas_migration.params import MigrationParams
from atlas_migration.planning import build_copy_plan, find_occupied_targets, refuse_occupied_targets
from atlas_migration.profile import SourceProfile
from atlas_migration.triggers.mongosync import MongosyncWaitOperator

if TYPE_CHECKING:
    from atlas_migration.inspection import OplogSpan

log = logging.getLogger("atlas_migration")

GROUP_ID = "live_pull"
ENGINES = ("auto", "native", "mongosync")
# Reschedule-mode sensors poke this often (seconds); tests shorten it through the environment.
POKE_INTERVAL_ENV = "MIGRATION_POKE_INTERVAL_SECONDS"


def poke_interval() -> float:
    try:
        return max(1.0, float(os.environ.get(POKE_INTERVAL_ENV, "60")))
    except ValueError:
        return 60.0


def live_pull_params() -> dict[str, Any]:
    """Trigger-form params of the live strategies (sections "Live pull" and "Cutover")."""
    from airflow.sdk import Param

    return {
        "pull_engine": Param("auto", type="string", enum=list(ENGINES), title="Pull engine", section="Live pull",
                             description="'mongosync': drive the mongosync at mongosync_conn_id; 'native': the "
                                         "project's change-stream engine; 'auto': mongosync when its connection exists."),
        "mongosync_conn_id": Param("mongosync_api", type="string", title="mongosync connection", section="Live pull",
                                   description="Airflow connection of a running mongosync (cluster0 = source, "
                                               "cluster1 = Atlas), e.g. http://mongosync-host:27182."),
        "partition_docs": Param(50_000, type="integer", minimum=1_000, maximum=10_000_000, section="Live pull",
                                title="Documents per copy partition",
                                description="Native engine: collections larger than this are split into _id ranges, "
                                            "one mapped task each."),
        "copy_order": Param(DEFAULT_COPY_ORDER, type="string", enum=list(COPY_ORDERS), section="Live pull",
                            title="Initial copy order",
                            description="Native engine, collections of more than one partition: 'id_range' splits "
                                        "them into _id ranges (one mapped task each, resumed after the last _id); "
                                        "'natural' copies each whole in natural order (one scan, resumed at a "
                                        "record position where the source reports one); 'auto': natural where the "
                                        "source's plan for an _id range is a collection scan, else _id ranges."),
        "expected_copy_docs_per_second": Param(5_000, type="integer", minimum=1, section="Live pull",
                                               title="Expected copy rate (docs/s)",
                                               description="Used to estimate the initial copy time against the source's "
                                                           "oplog window before anything starts."),
        "catch_up_timeout_seconds": Param(3_600, type="integer", minimum=10, section="Live pull",
                                          title="Catch-up timeout (s)",
                                          description="Fail when the target has not caught up "
                                                      "(lag under the cutover threshold) by then."),
        "stop_balancer": Param(True, type="boolean", title="Stop the source's balancer", section="Live pull",
                               description="Sharded source: stop its balancer (balancerStop) before the pull starts "
                                           "and start it again when the pull is over, whatever the outcome, if this "
                                           "run stopped it (MongoDB's guidance for live migrations: no chunk "
                                           "migrations during the copy and sync). A balancer that was already off is "
                                           "left off. The source's user needs the balancer privileges "
                                           "(clusterManager). Off: the operator manages the balancer. Ignored for "
                                           "replica sets and rehearsals."),
        "cutover": Param("auto", type="string", enum=["auto", "manual"], title="Cutover", section="Cutover",
                         description="'auto': once the lag is under max_cutover_lag_seconds, block user writes on the "
                                     "source (needs source write blocking) and cut over at that fence. 'manual': wait "
                                     "for an operator's approval in the run's Required Actions (a human-in-the-loop "
                                     "approval, with the evidence in its body; also through the REST API), which also "
                                     "states that application writes have stopped when writes are not blocked."),
        "source_write_block": Param("auto", type="string", enum=list(WRITE_BLOCK_MODES), section="Cutover",
                                    title="Block writes on the source at cutover",
                                    description="'auto': block user writes with setUserWriteBlockMode (MongoDB 6.0+, "
                                                "privilege setUserWriteBlockMode) when possible; 'require': refuse the "
                                                "run before writing anything when it is not possible; 'off': never "
                                                "block (the operator states writes stopped; cutover=auto is refused)."),
        "max_cutover_lag_seconds": Param(10, type="integer", minimum=1, maximum=3_600, section="Cutover",
                                         title="Largest lag at cutover (s)",
                                         description="The target must be at most this far behind the source."),
        "quiet_period_seconds": Param(5, type="integer", minimum=1, maximum=600, section="Cutover",
                                      title="Late-write grace period (s)",
                                      description="After the cutover fence is drained, keep watching the source this "
                                                  "long: any write to a migrated namespace after the fence fails the "
                                                  "cutover with the late-write count (the sync keeps running)."),
        "cutover_timeout_seconds": Param(600, type="integer", minimum=10, section="Cutover",
                                         title="Cutover drain timeout (s)",
                                         description="Fail the cutover when writes do not stop within this time."),
        "approval_timeout_seconds": Param(120 * 3600, type="integer", minimum=60, section="Cutover",
                                          title="Approval timeout (s)",
                                          description="Manual cutover: give up when no approval arrives by then (live push: "
                                                      "also bounded by the 120-hour cutover window left, minus a "
                                                      "safety margin)."),
    }


@dataclass(frozen=True)
class LivePullParams:
    engine: str
    mongosync_conn_id: str
    partition_docs: int
    expected_copy_docs_per_second: int
    catch_up_timeout_seconds: int
    cutover: str
    max_cutover_lag_seconds: int
    quiet_period_seconds: int
    cutover_timeout_seconds: int
    source_write_block: str = "auto"
    stop_balancer: bool = True
    copy_order: str = DEFAULT_COPY_ORDER

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> LivePullParams:
        def integer(key: str, default: int, low: int) -> int:
            value = params.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigurationError(f"parameter {key} must be an integer of at least {low}, got {value!r}")
            return value

        engine = params.get("pull_engine") or "auto"
        if engine not in ENGINES:
            raise ConfigurationError(f"pull_engine={engine!r} is not one of {', '.join(ENGINES)}")
        cutover = params.get("cutover") or "auto"
        if cutover not in ("auto", "manual"):
            raise ConfigurationError(f"cutover={cutover!r} is not one of auto, manual")
        write_block = params.get("source_write_block") or "auto"
        if write_block not in WRITE_BLOCK_MODES:
            raise ConfigurationError(f"source_write_block={write_block!r} is not one of {', '.join(WRITE_BLOCK_MODES)}")
        copy_order = params.get("copy_order") or DEFAULT_COPY_ORDER
        if copy_order not in COPY_ORDERS:
            raise ConfigurationError(f"copy_order={copy_order!r} is not one of {', '.join(COPY_ORDERS)}")
        stop_balancer = params.get("stop_balancer", True)
        if not isinstance(stop_balancer, bool):
            raise ConfigurationError(f"parameter stop_balancer must be true or false, got {stop_balancer!r}")
        return cls(
            engine=engine,
            mongosync_conn_id=str(params.get("mongosync_conn_id") or "mongosync_api"),
            partition_docs=integer("partition_docs", 50_000, 1_000),
            expected_copy_docs_per_second=integer("expected_copy_docs_per_second", 5_000, 1),
            catch_up_timeout_seconds=integer("catch_up_timeout_seconds", 3_600, 10),
            cutover=cutover,
            max_cutover_lag_seconds=integer("max_cutover_lag_seconds", 10, 1),
            quiet_period_seconds=integer("quiet_period_seconds", 5, 1),
            cutover_timeout_seconds=integer("cutover_timeout_seconds", 600, 10),
            source_write_block=write_block,
            stop_balancer=stop_balancer,
            copy_order=copy_order,
        )


def _connection_exists(conn_id: str) -> bool:
    from airflow.sdk import BaseHook

    try:
        BaseHook.get_connection(conn_id)
        return True
    except Exception:  # AirflowNotFoundException and friends: the connection is simply not configured
        return False


def choose_engine(params: Mapping[str, Any], group_id: str = GROUP_ID) -> str:
    """The group's branch: the first task of the chosen engine's path (inside the task group ``group_id``)."""
    lp = LivePullParams.parse(params)
    engine = lp.engine
    if MigrationParams.parse(params).rehearsal:
        # mongosync copies into the real namespaces and commits a real cutover: a rehearsal copies into its
        # scratch databases with the native engine, whose cutover only ends the scratch copy.
        if engine == "mongosync":
            raise ConfigurationError("pull_engine=mongosync cannot be rehearsed (mongosync cannot write to scratch "
                                     "databases and its commit is a real cutover): rehearse with pull_engine=native")
        engine = "native"
    if engine == "auto":
        engine = "mongosync" if _connection_exists(lp.mongosync_conn_id) else "native"
        log.info("pull_engine=auto: %s (%s)", engine,
                 f"connection '{lp.mongosync_conn_id}' exists" if engine == "mongosync"
                 else f"no connection '{lp.mongosync_conn_id}'")
    elif engine == "mongosync" and not _connection_exists(lp.mongosync_conn_id):
        raise ConfigurationError(f"pull_engine=mongosync but Airflow connection '{lp.mongosync_conn_id}' is not defined")
    return f"{group_id}.{'mongosync_start' if engine == 'mongosync' else 'start'}"


# ---------------------------------------------------------------- native engine


@dataclass(frozen=True)
class PullSources:
    """Where the native engine reads: ``copy_conn_param`` names the param holding the connection the initial
    copy (and indexes, views) reads; ``stream_conn_param`` the one whose change stream gives the start point,
    catch-up and cutover drain. Both may be the same."""

    copy_conn_param: str = "source_conn_id"
    stream_conn_param: str = "source_conn_id"

    def conn_id(self, params: Mapping[str, Any], phase: str) -> str:
        key = self.stream_conn_param if phase == "stream" else self.copy_conn_param
        if key == "source_conn_id":
            return MigrationParams.parse(params).source_conn_id
        value = str(params.get(key) or "").strip()
        if not value:
            raise ConfigurationError(f"parameter {key} must name the Airflow connection the live pull reads")
        return value


DEFAULT_SOURCES = PullSources()


def _sync_id(dag_id: str, run_id: str) -> str:
    return f"{dag_id}/{run_id}"


def _open_sync(params: Mapping[str, Any], dag_id: str, run_id: str, sources: PullSources = DEFAULT_SOURCES,
               phase: str = "copy"):
    """A LiveSync bound to this run, reading from the ``phase``'s source ("copy" or "stream"), plus the two
    clients to close afterwards. Every phase's LiveSync shares the state kept on the target."""
    from atlas_migration.engines.live import LiveSync

    p = MigrationParams.parse(params)
    lp = LivePullParams.parse(params)
    source = endpoint_from_connection(sources.conn_id(params, phase), "source").connect()
    try:
        target = endpoint_from_connection(p.target_conn_id, "target").connect()
    except Exception:
        source.close()
        raise
    sync = LiveSync(source, target, sync_id=_sync_id(dag_id, run_id), namespaces=p.namespaces,
                    target_db_prefix=p.target_db_prefix, batch_size=p.batch_size, partition_docs=lp.partition_docs,
                    insert_workers=p.restore_workers, copy_order=lp.copy_order, log=log)
    return sync, source, target


def _verifier_for(sync):
    """The document verifier of this live pull (state beside the sync's, on the target)."""
    from atlas_migration.engines.verifier import LiveVerifier

    return LiveVerifier(sync.source, sync.target, sync_id=sync.sync_id, state_db=sync.state_db,
                        target_db_prefix=sync.target_db_prefix, batch_size=sync.batch_size, log=log)


class _Session:
    """``with _Session(params, dag_id, run_id, sources, phase) as sync:`` closes both clients whatever happens.

    Every applied change event is queued for the verifier's recheck (``LiveSync.changed_listener``)."""

    def __init__(self, params: Mapping[str, Any], dag_id: str, run_id: str, sources: PullSources = DEFAULT_SOURCES,
                 phase: str = "copy") -> None:
        self.sync, self._source, self._target = _open_sync(params, dag_id, run_id, sources, phase)
        self.verifier = _verifier_for(self.sync)
        self.sync.changed_listener = self.verifier.note_changed
        self.sync.rename_listener = self.verifier.rename_namespace

    def __enter__(self):
        return self.sync

    def __exit__(self, *exc: object) -> None:
        self._source.close()
        self._target.close()


def _oplog_span(endpoint: MongoEndpoint) -> OplogSpan | None:
    """The endpoint's ``local.oplog.rs`` span (hours, and whether it still holds its set's initiation entry);
    None when unreadable."""
    from pymongo.errors import PyMongoError

    from atlas_migration.inspection import read_oplog_span

    with closing(endpoint.connect()) as client:
        try:
            return read_oplog_span(client)
        except PyMongoError as exc:
            log.warning("cannot read the oplog of '%s': %s", endpoint.conn_id, endpoint.redact(exc))
            return None


def write_block_decision(params: Mapping[str, Any], sources: PullSources = DEFAULT_SOURCES) -> tuple[bool, str]:
    """Whether cutover blocks user writes on the source, and why; raises ``ConfigurationError`` (before
    anything is written, when called from ``start``) for ``source_write_block=require`` on a source that
    cannot, and for ``cutover=auto`` without write blocking."""
    from atlas_migration.fence import cutover_problems, decide_write_block, read_write_block_support

    p = MigrationParams.parse(params)
    lp = LivePullParams.parse(params)
    if p.rehearsal:
        return False, "a rehearsal never blocks writes on the source: its cutover only ends the scratch copy"
    with closing(endpoint_from_connection(sources.conn_id(params, "copy"), "source").connect()) as client:
        support = read_write_block_support(client)
    block, why = decide_write_block(lp.source_write_block, support)
    problems = cutover_problems(lp.cutover, block)
    if problems:
        raise ConfigurationError(f"{' '.join(problems)} ({why}). Nothing was written")
    return block, why


def start(params: Mapping[str, Any], profile_data: dict[str, Any], dag_id: str, run_id: str,
          sources: PullSources = DEFAULT_SOURCES) -> list[dict[str, Any]]:
    """Refuse what cannot work before writing anything; then record the resume point and plan partitions."""
    from atlas_migration.engines.live import check_oplog_window

    p = MigrationParams.parse(params)
    lp = LivePullParams.parse(params)
    profile = SourceProfile.from_dict(profile_data)
    plan = build_copy_plan(profile, p.namespaces, p.target_db_prefix)
    estimated = profile.total_documents / lp.expected_copy_docs_per_second
    window, young, whose = profile.oplog_window_hours, bool(profile.oplog_since_initiation), "the source"
    if sources.stream_conn_param != sources.copy_conn_param:
        # The change stream reads another deployment's oplog (Compose's Oplog Access endpoint behind a
        # mongos): that oplog must keep the copy's writes. The profiled source has no window of its own
        # (a mongos reports none), so measure the stream source's.
        stream_conn = sources.conn_id(params, "stream")
        span = _oplog_span(endpoint_from_connection(stream_conn, "source"))
        window, young = (None, False) if span is None else (span.hours, span.since_initiation)
        whose = f"'{stream_conn}'"
    ok, message = check_oplog_window(window, estimated, since_initiation=young)
    if window is None and whose == "the source" and profile.unknown.get("oplog_window_hours"):
        message += f" (inspection: {profile.unknown['oplog_window_hours']})"
    log.info("oplog window check (oplog of %s): %s", whose, message)
    if not ok:
        raise ConfigurationError(f"live pull refused before writing anything: {message}")
    _, why = write_block_decision(params, sources)
    log.info("cutover fence: %s", why)
    with closing(endpoint_from_connection(p.target_conn_id, "target").connect()) as target:
        occupied = find_occupied_targets(target, plan.all_items)
    if not p.drop_target:
        refuse_occupied_targets(occupied, p.target_conn_id)
    # The start point comes from the change stream's source BEFORE the copy source is read at all.
    with _Session(params, dag_id, run_id, sources, "stream") as sync:
        point = sync.start()
    with _Session(params, dag_id, run_id, sources, "copy") as sync:
        partitions = [part.to_dict() for part in sync.plan_partitions()]
        sync.prepare_targets(drop=p.drop_target)
    log.info("live pull %s: change stream resume point recorded at %s (cluster time %s), before the copy; "
             "%d partition(s) to copy", _sync_id(dag_id, run_id), point.started_at, point.cluster_time, len(partitions))
    return partitions


def copy_partition(params: Mapping[str, Any], partition: dict[str, Any], dag_id: str, run_id: str,
                   sources: PullSources = DEFAULT_SOURCES) -> dict[str, Any]:
    from atlas_migration.engines.live import Partition

    with _Session(params, dag_id, run_id, sources, "copy") as sync:
        result = sync.copy_partition(Partition.from_dict(partition))
    log.info("copied partition %s: %s documents in %.1fs%s", result.partition, f"{result.documents:,}",
             result.seconds, f" (resumed after {result.resumed_from})" if result.resumed_from else "")
    return result.to_dict()


def verify_partition(params: Mapping[str, Any], partition: dict[str, Any], dag_id: str, run_id: str,
                     sources: PullSources = DEFAULT_SOURCES) -> dict[str, Any]:
    """Compare every document of one copied partition, source against target (resumable); mismatches are
    kept on the target, logged by _id and field, and rechecked until cutover."""
    from atlas_migration.engines.live import Partition

    part = Partition.from_dict(partition)
    session = _Session(params, dag_id, run_id, sources, "copy")
    with session:
        result = session.verifier.compare_partition(part)
        first = session.verifier.open_mismatches(5)
    log.info("verified partition %s: %s", part.id, result)
    for mismatch in first:
        log.warning("verifier: %s _id %s differs (field %s, missing on %s); it is rechecked until cutover",
                    mismatch["ns"], json.dumps(mismatch["_id"]), mismatch["field"], mismatch["missing"] or "neither side")
    return result


def finish_copy(params: Mapping[str, Any], dag_id: str, run_id: str, sources: PullSources = DEFAULT_SOURCES) -> None:
    with _Session(params, dag_id, run_id, sources, "copy") as sync:
        sync.finish_initial_copy()
    log.info("initial copy finished: indexes and views in place; following the change stream next")


def catch_up(params: Mapping[str, Any], dag_id: str, run_id: str, sources: PullSources = DEFAULT_SOURCES) -> dict[str, Any]:
    """Apply change events until the target is within ``max_cutover_lag_seconds`` of the source."""
    lp = LivePullParams.parse(params)
    with _Session(params, dag_id, run_id, sources, "stream") as sync:
        result = _catch_up_under_threshold(sync, lp, "catch-up", "Retry this task to keep catching up from its "
                                           "checkpoint, or raise catch_up_timeout_seconds.")
    return result.to_dict()


def _catch_up_under_threshold(sync, lp: LivePullParams, label: str, if_not: str):
    """Apply change events until the lag is under ``max_cutover_lag_seconds``; ``MigrationError`` (ending with
    ``if_not``) when ``catch_up_timeout_seconds`` ran out first."""
    result = sync.catch_up(until_lag_below=lp.max_cutover_lag_seconds, max_seconds=lp.catch_up_timeout_seconds)
    log.info("%s: %s events applied, lag %s s (%s)", label, f"{result.events_applied:,}",
             "?" if result.lag_seconds is None else f"{result.lag_seconds:.1f}", result.stopped_because)
    if result.stopped_because == "max_seconds" and (result.lag_seconds or 0) > lp.max_cutover_lag_seconds:
        raise MigrationError(
            f"the target did not catch up within {lp.catch_up_timeout_seconds} s (lag {result.lag_seconds} s > "
            f"{lp.max_cutover_lag_seconds} s): the source writes faster than the target applies. {if_not}")
    return result


# ---------------------------------------------------------------- manual cutover: what the approver sees

NATIVE_APPROVAL = "live-pull cutover"
MONGOSYNC_APPROVAL = "mongosync commit"


def _approval_markdown(title: str, rows: list[tuple[str, str]], request_timeout: ApprovalRequest,
                       after: str) -> str:
    table = ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]
    return "\n".join([title, "", *table, "", f"**If approved:** {after}", "", timeout_line(request_timeout)])


def _timeout_for(params: Mapping[str, Any]):
    limit = _approval_limit(params)
    return bounded_response_timeout(limit if limit is not None else 120 * 3600)


def native_cutover_request(params: Mapping[str, Any], facts: Mapping[str, Any], now: float) -> ApprovalRequest:
    """The approval request of the native engine's manual cutover (pure): ``facts`` as read by
    ``native_cutover_evidence`` (lag, oplog span, verifier progress, rechecks, how writes are fenced).

    Nothing runs while the approval waits (a parked task holds no slot and runs no code), so the cutover that
    follows an approval first catches up again (writes still flowing) and only then places the fence: a long
    wait makes the catch-up longer, not the downtime. The oplog span is shown, not used as a deadline: on a
    young oplog it is the age of its first entry, far below its capacity."""
    lp = LivePullParams.parse(params)
    if lp.cutover != "manual":
        return ApprovalRequest(required=False, what=NATIVE_APPROVAL,
                               reason="cutover=auto: the run cuts over at a write-blocking fence once caught up")
    timeout = _timeout_for(params)
    lag = facts.get("lag_seconds")
    verifier = facts.get("verifier") or {}
    parts = verifier.get("partitions") or {}
    mismatches = verifier.get("mismatches") or {}
    window = facts.get("oplog_window_hours")
    evidence = {
        "lag_seconds": lag, "pending_oplog_entries": facts.get("pending_estimate"),
        "max_cutover_lag_seconds": lp.max_cutover_lag_seconds, "oplog_window_hours": window,
        "verifier_partitions_compared": parts.get("compared"), "verifier_partitions_total": parts.get("total"),
        "verifier_open_mismatches": mismatches.get("open"), "rechecks_pending": facts.get("rechecks_pending"),
        "source_writes_blocked": bool(facts.get("block")), "write_fence": facts.get("block_reason"),
        "observed_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)),
    }
    request = ApprovalRequest(required=True, what=NATIVE_APPROVAL, subject="Approve the live-pull cutover",
                              timeout_seconds=timeout.seconds, timeout_explanation=timeout.explanation, asked_at=now,
                              evidence=evidence)
    fence = ("user writes are BLOCKED on the source (setUserWriteBlockMode), the change stream is drained to that "
             "fence and watched for late writes" if facts.get("block") else
             "your approval is the statement that application writes have STOPPED: the fence is placed at the "
             "source's last write, and any write after it fails the cutover (nothing is lost; stop the writers and "
             "clear the cutover task)")
    rows = [
        ("Lag", "unknown" if lag is None else f"{lag:.0f} s (cutover threshold {lp.max_cutover_lag_seconds} s)"),
        ("Oplog entries not yet applied", str(facts.get("pending_estimate", "unknown"))),
        ("Oplog span now", "unknown" if window is None else
         f"{window:.2f} h (catch-up after approval must start within it: older history is lost)"),
        ("Verifier", f"{parts.get('compared', '?')} of {parts.get('total', '?')} partitions compared, "
                     f"{mismatches.get('open', '?')} open mismatch(es) (rechecked until cutover; open ones fail it)"),
        ("Rechecks queued", str(facts.get("rechecks_pending", "?"))),
        ("Source writes at cutover", facts.get("block_reason") or "?"),
        ("Read at", evidence["observed_at"]),
    ]
    body = _approval_markdown("Evidence for the live-pull cutover (native engine):", rows, request,
                              f"the run catches up again until the lag is under {lp.max_cutover_lag_seconds} s, "
                              f"then {fence}; then the verifier's last rechecks, then validation.")
    return ApprovalRequest(**{**request.to_dict(), "body": body})


def native_cutover_evidence(params: Mapping[str, Any], dag_id: str, run_id: str,
                            sources: PullSources = DEFAULT_SOURCES) -> dict[str, Any]:
    """``cutover_evidence``: read what the approver should see and build the request (no write anywhere)."""
    lp = LivePullParams.parse(params)
    if lp.cutover != "manual":
        return native_cutover_request(params, {}, time.time()).to_dict()
    block, why = write_block_decision(params, sources)
    with _Session(params, dag_id, run_id, sources, "stream") as sync:
        lag = sync.lag()
        facts = {"lag_seconds": lag.lag_seconds, "pending_estimate": lag.pending_estimate,
                 "oplog_window_hours": sync.oplog_window_hours(), "rechecks_pending": sync.pending_rechecks(),
                 "verifier": _verifier_for(sync).summary(), "block": block, "block_reason": why}
    request = native_cutover_request(params, facts, time.time())
    log.info("approval request for the live-pull cutover built; %s", timeout_line(request).replace("**", ""))
    return request.to_dict()


def mongosync_commit_request(params: Mapping[str, Any], progress: Mapping[str, Any], source_blocked: bool,
                             now: float) -> ApprovalRequest:
    """The approval request of mongosync's manual commit (pure): mongosync's ``/progress`` as it stands.

    mongosync keeps syncing by itself while the approval waits, and ``mongosync_commit`` checks canCommit and the
    lag again before ``/commit``."""
    lp = LivePullParams.parse(params)
    if lp.cutover != "manual":
        return ApprovalRequest(required=False, what=MONGOSYNC_APPROVAL,
                               reason="cutover=auto: the run commits once mongosync can commit")
    timeout = _timeout_for(params)
    verification = progress.get("verification") or {}
    evidence = {
        "state": progress.get("state"), "can_commit": progress.get("canCommit"),
        "lag_seconds": progress.get("lagTimeSeconds"), "max_cutover_lag_seconds": lp.max_cutover_lag_seconds,
        "verification_source_phase": (verification.get("source") or {}).get("phase"),
        "verification_destination_phase": (verification.get("destination") or {}).get("phase"),
        "source_writes_blocked": source_blocked,
        "observed_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)),
    }
    request = ApprovalRequest(required=True, what=MONGOSYNC_APPROVAL, subject="Approve the mongosync commit",
                              timeout_seconds=timeout.seconds, timeout_explanation=timeout.explanation, asked_at=now,
                              evidence=evidence)
    fence = ("mongosync blocks writes on the source at commit (enableUserWriteBlocking)" if source_blocked else
             "your approval is the statement that application writes have STOPPED: the run places a fence, watches "
             f"the source for {lp.quiet_period_seconds} s and sends /commit only if no write came; a write after "
             "the fence fails the run")
    rows = [
        ("mongosync", f"state {evidence['state']}, canCommit {str(evidence['can_commit']).lower()}"),
        ("Lag", f"{evidence['lag_seconds']} s (commit threshold {lp.max_cutover_lag_seconds} s)"),
        ("Embedded verifier", f"source {evidence['verification_source_phase'] or 'n/a'}, destination "
                              f"{evidence['verification_destination_phase'] or 'n/a'}"),
        ("Source writes at commit", "BLOCKED by mongosync" if source_blocked else "not blocked"),
        ("Read at", evidence["observed_at"]),
    ]
    body = _approval_markdown("Evidence for the mongosync commit:", rows, request,
                              f"{fence}; then the run waits for COMMITTED and checks again that no write reached the "
                              "source after the fence.")
    return ApprovalRequest(**{**request.to_dict(), "body": body})


def mongosync_commit_evidence(params: Mapping[str, Any], started: Mapping[str, Any]) -> dict[str, Any]:
    """``mongosync_commit_evidence``: read ``/progress`` and build the request (no write anywhere)."""
    from atlas_migration.hooks.mongosync import MongosyncHook

    lp = LivePullParams.parse(params)
    if lp.cutover != "manual":
        return mongosync_commit_request(params, {}, False, time.time()).to_dict()
    source_blocked = _mongosync_blocks_source(started)
    progress = MongosyncHook(lp.mongosync_conn_id).progress()
    request = mongosync_commit_request(params, progress.raw, source_blocked, time.time())
    log.info("approval request for the mongosync commit built; %s", timeout_line(request).replace("**", ""))
    return request.to_dict()


def cutover(params: Mapping[str, Any], dag_id: str, run_id: str, sources: PullSources = DEFAULT_SOURCES) -> dict[str, Any]:
    """Fence application writes (block them on the source, or take the operator's approval as the statement
    that they stopped), drain to the fence, watch for late writes, then mark the sync complete."""
    from atlas_migration.fence import take_fence

    lp = LivePullParams.parse(params)
    block, why = write_block_decision(params, sources)
    log.info("cutover: %s", why)
    writes_to = endpoint_from_connection(sources.conn_id(params, "copy"), "source")
    with closing(writes_to.connect()) as writes_client, _Session(params, dag_id, run_id, sources, "stream") as sync:
        fence = sync.stored_fence()
        if fence is None or fence.late_writes or (block and not fence.blocked):
            # Catch up again before the fence, writes still flowing: after a manual approval the run may have
            # waited for hours, and draining that backlog behind blocked writes would be downtime.
            _catch_up_under_threshold(sync, lp, "cutover: caught up before the fence",
                                      "No fence was placed and writes are not blocked: retry this task, or raise "
                                      "catch_up_timeout_seconds.")
            # A fence after late writes is stale: the operator stopped the writers and cleared this task.
            fence = take_fence(sync.source, block=block, block_client=writes_client)
        else:
            log.info("cutover: resuming at the fence placed earlier (%s)", fence.describe())
        log.info("cutover: draining every write up to the fence, then watching %d s for late writes",
                 lp.quiet_period_seconds)
        verifier = _verifier_for(sync)
        result = sync.cutover(fence, grace_seconds=lp.quiet_period_seconds, timeout=lp.cutover_timeout_seconds,
                              verifier=verifier)
        verification = verifier.summary()
    log.info("cutover complete: %s final events applied; %s; the target is in sync. Repoint applications to Atlas%s.",
             f"{result.events_applied:,}", fence.describe(),
             " (writes stay blocked on the source; to roll back: db.adminCommand({setUserWriteBlockMode: 1, "
             "global: false}))" if fence.blocked else "")
    log.info("verification at cutover: %s documents compared, %s mismatch(es) found and resolved, %s open",
             f"{verification['documents_compared']:,}", verification["mismatches"]["resolved"],
             verification["mismatches"]["open"])
    return {**result.to_dict(), "verification": verification}


# ---------------------------------------------------------------- the source's balancer (sharded sources)

# After balancerStop (which itself waits for a balancing round in progress), how long to wait for
# balancerStatus to report no round under way: mongosync's documentation allows 15 minutes for in-progress
# chunk migrations to finish.
BALANCER_SETTLE_SECONDS = 900.0


def _balancer_command(client, command: str, endpoint: MongoEndpoint) -> dict[str, Any]:
    from pymongo.errors import OperationFailure

    try:
        return client.admin.command(command)
    except OperationFailure as exc:
        message = (f"{command} was refused by the source '{endpoint.conn_id}' (code {exc.code}: "
                   f"{endpoint.redact(exc.details.get('errmsg') if exc.details else exc)})")
        if exc.code == 13:  # Unauthorized: no retry helps, the operator must grant or opt out
            raise ConfigurationError(f"{message}: the source's user needs the balancer privileges (e.g. the "
                                     "clusterManager role), or set stop_balancer=false and manage the balancer "
                                     "yourself") from None
        raise MigrationError(message) from None


def wait_balancer_settled(client, endpoint: MongoEndpoint, timeout: float = BALANCER_SETTLE_SECONDS,
                          poll: float = 2.0) -> dict[str, Any]:
    """Poll ``balancerStatus`` until no balancing round is under way; raises ``MigrationError`` at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        status = _balancer_command(client, "balancerStatus", endpoint)
        if not status.get("inBalancerRound"):
            return status
        if time.monotonic() >= deadline:
            raise MigrationError(f"the source's balancer was stopped but a balancing round was still under way "
                                 f"after {timeout:.0f} s: chunk migrations are still moving documents")
        time.sleep(poll)


BALANCER_PREFIX = "atlas_migration_balancer"


@dataclass(frozen=True)
class RunMarker:
    """A per-run record that outlives a killed try (a failed try's XCom does not): an Airflow Variable in the
    DAG, plain callables in tests."""

    key: str
    read: Callable[[], str | None]
    write: Callable[[str], None]
    remove: Callable[[], None]


def balancer_marker(dag_id: str, run_id: str) -> RunMarker:
    """The Variable ``atlas_migration_balancer__<dag_id>__<run_id>``: written BEFORE ``balancerStop``, so a
    retry after a try killed between the stop and its XCom still knows that this run stopped the balancer
    (it finds it off, and would otherwise take it for "already off" and never restart it)."""
    from airflow.sdk import Variable

    from atlas_migration.approval import run_variable_key

    key = run_variable_key(dag_id, run_id, prefix=BALANCER_PREFIX)
    return RunMarker(key, lambda: Variable.get(key, default=None),
                     lambda value: Variable.set(key, value, description="live_pull: this run stopped the source's "
                                                                        "balancer; restart_balancer restarts it"),
                     lambda: Variable.delete(key))


def stop_balancer(params: Mapping[str, Any], sources: PullSources = DEFAULT_SOURCES,
                  marker: RunMarker | None = None) -> dict[str, Any]:
    """Stop the sharded source's balancer before the pull (``stop_balancer``). XCom: ``stopped_by_run`` (the
    teardown restarts it only then), ``mode_before`` and ``reason``. Nothing is written to the target; the
    run's ``marker`` records the stop before it is made."""
    p = MigrationParams.parse(params)
    lp = LivePullParams.parse(params)

    def untouched(reason: str, mode: str | None = None) -> dict[str, Any]:
        log.info("balancer: %s", reason)
        return {"stopped_by_run": False, "mode_before": mode, "reason": reason}

    if p.rehearsal:
        return untouched("a rehearsal never stops the source's balancer (as it never blocks writes)")
    if not lp.stop_balancer:
        return untouched("stop_balancer=false: the operator manages the source's balancer")
    endpoint = endpoint_from_connection(sources.conn_id(params, "copy"), "source")
    with closing(endpoint.connect()) as client:
        if client.admin.command("hello").get("msg") != "isdbgrid":
            return untouched("the source is not a sharded cluster: it has no balancer")
        recorded = marker.read() if marker else None
        if recorded is not None:
            # An earlier try of this run stopped it (or was about to): make sure it is off, and own the restart.
            mode = json.loads(recorded).get("mode_before")
            log.info("balancer: an earlier try of this run stopped it (Variable '%s'); making sure it is off",
                     marker.key)
        else:
            mode = _balancer_command(client, "balancerStatus", endpoint).get("mode")
            if mode == "off":
                return untouched("the source's balancer was already off: left off, and not restarted afterwards",
                                 mode)
            if marker:
                marker.write(json.dumps({"mode_before": mode}))
        _balancer_command(client, "balancerStop", endpoint)
        try:
            status = wait_balancer_settled(client, endpoint)
        except BaseException:
            # The teardown runs only after a successful stop: undo the stop here rather than leave it off.
            _balancer_command(client, "balancerStart", endpoint)
            if marker:
                marker.remove()
            raise
    log.info("balancer: was '%s', now '%s' (stopped by this run%s; restarted by restart_balancer when the pull "
             "is over)", mode, status.get("mode"), f", recorded in Variable '{marker.key}'" if marker else "")
    return {"stopped_by_run": True, "mode_before": mode, "reason": f"stopped by this run (was '{mode}')"}


def restart_balancer(params: Mapping[str, Any], stopped: Mapping[str, Any] | None,
                     sources: PullSources = DEFAULT_SOURCES, marker: RunMarker | None = None) -> dict[str, Any]:
    """The teardown of ``stop_balancer``: ``balancerStart`` when this run stopped the balancer (then the run's
    marker is removed), else nothing."""
    if not stopped or not stopped.get("stopped_by_run"):
        reason = (stopped or {}).get("reason") or "the balancer was not stopped by this run"
        log.info("balancer: not restarted (%s)", reason)
        return {"restarted": False, "reason": reason}
    endpoint = endpoint_from_connection(sources.conn_id(params, "copy"), "source")
    with closing(endpoint.connect()) as client:
        _balancer_command(client, "balancerStart", endpoint)
        mode = _balancer_command(client, "balancerStatus", endpoint).get("mode")
    if marker:
        marker.remove()
    log.info("balancer: restarted (was '%s' before the run, now '%s')", stopped.get("mode_before"), mode)
    return {"restarted": True, "mode": mode}


# ---------------------------------------------------------------- mongosync engine


def _fence_key(dag_id: str, run_id: str) -> str:
    return f"mongosync/{dag_id}/{run_id}"


def mongosync_start(params: Mapping[str, Any], profile_data: dict[str, Any]) -> dict[str, Any]:
    """Refuse what cannot work, decide write blocking for the mongosync release in use, then ``/start``.

    Returns the progress summary plus ``mongosync`` (release and write-blocking plan) for the commit task.
    """
    from atlas_migration.engines.mongosync import decide_start, namespace_filters
    from atlas_migration.hooks.mongosync import MongosyncHook

    p = MigrationParams.parse(params)
    lp = LivePullParams.parse(params)
    mode = lp.source_write_block
    if p.target_db_prefix:
        raise ConfigurationError("mongosync cannot rename databases: rehearse with pull_engine=native")
    plan = build_copy_plan(SourceProfile.from_dict(profile_data), p.namespaces)
    with closing(endpoint_from_connection(p.target_conn_id, "target").connect()) as target:
        occupied = find_occupied_targets(target, plan.all_items)
    hook = MongosyncHook(lp.mongosync_conn_id)
    progress = hook.progress()
    with closing(endpoint_from_connection(p.source_conn_id, "source").connect()) as source:
        decision = decide_start(hook, progress, source, mode=mode, cutover=lp.cutover)
    log.info("mongosync %s; %s", decision.version.describe(), decision.plan.reason)
    if progress.state in ("RUNNING", "PAUSED", "COMMITTING", "COMMITTED"):
        log.info("mongosync is already %s (a retried task): not starting it again", progress.state)
        if progress.state == "PAUSED":
            hook.resume()
        return {**progress.summary(), "mongosync": decision.to_dict()}
    if occupied:
        # mongosync needs an empty destination for the synced namespaces; it has no "drop first" option.
        raise ConfigurationError(f"mongosync needs empty target namespaces; these hold data: {', '.join(occupied)}. "
                                 "Drop them in Atlas first, or use pull_engine=native with drop_target=true.")
    filters = namespace_filters(list(p.namespaces.include), list(p.namespaces.exclude))
    hook.start("cluster0", "cluster1", build_indexes="beforeDataCopy", reversible=False,
               verification_enabled=True, enable_user_write_blocking=decision.plan.start_field,
               write_blocking_in_start=decision.write_blocking_in_start,
               include_namespaces=filters.include_namespaces or None,
               exclude_namespaces=filters.exclude_namespaces or None)
    return {**hook.progress().summary(), "mongosync": decision.to_dict()}


def _mongosync_blocks_source(started: Mapping[str, Any] | None) -> bool:
    """Whether mongosync blocks source writes at ``/commit``, as ``mongosync_start`` recorded it."""
    return bool(((started or {}).get("mongosync") or {}).get("write_blocking", {}).get("source_blocked"))


def mongosync_commit(params: Mapping[str, Any], started: Mapping[str, Any], dag_id: str, run_id: str) -> dict[str, Any]:
    """``/commit`` behind the cutover fence (``engines.mongosync.commit_with_fence``). XCom: ``committed``, ``reason``,
    ``fence`` (op time, blocked or not, late writes) and ``source_write_blocked``."""
    from atlas_migration.engines.mongosync import (
        commit_with_fence,
        late_write_selector,
        load_fence,
        save_fence,
    )
    from atlas_migration.hooks.mongosync import MongosyncHook

    p = MigrationParams.parse(params)
    lp = LivePullParams.parse(params)
    source_blocked = _mongosync_blocks_source(started)
    hook = MongosyncHook(lp.mongosync_conn_id)
    key = _fence_key(dag_id, run_id)
    with closing(endpoint_from_connection(p.source_conn_id, "source").connect()) as source, \
            closing(endpoint_from_connection(p.target_conn_id, "target").connect()) as target:
        if not source_blocked:
            log.info("mongosync commit without source write blocking: the operator has stated that writes stopped; "
                     "placing the fence and watching the source for %d s before /commit", lp.quiet_period_seconds)
        result = commit_with_fence(hook, source, source_blocked=source_blocked,
                                   max_lag_seconds=lp.max_cutover_lag_seconds, quiet_seconds=lp.quiet_period_seconds,
                                   selected=late_write_selector(p.namespaces), keep=partial(save_fence, target, key))
        if result.get("committed"):
            fence = load_fence(target, key)
            result["fence"] = None if fence is None else fence.to_dict()
            log.info("mongosync already committed (a retried task)")
        else:
            log.info("mongosync commit requested (%s; fence at op time %s, %s); waiting for COMMITTED",
                     result["reason"], result["fence"]["op_time"],
                     "source writes blocked by mongosync" if source_blocked else "no late write in the quiet period")
    return {**result, "source_write_blocked": source_blocked}


def mongosync_check_fence(params: Mapping[str, Any], dag_id: str, run_id: str) -> dict[str, Any]:
    """After COMMITTED: no write reached the source after the fence (else fail with count and namespaces).
    XCom: ``fence`` (with ``late_writes``) and ``late_writes_after_commit``."""
    from atlas_migration.engines.mongosync import check_after_commit, late_write_selector, load_fence

    p = MigrationParams.parse(params)
    with closing(endpoint_from_connection(p.source_conn_id, "source").connect()) as source, \
            closing(endpoint_from_connection(p.target_conn_id, "target").connect()) as target:
        fence = load_fence(target, _fence_key(dag_id, run_id))
        if fence is None:
            raise MigrationError("no cutover fence was recorded for this run's mongosync commit (the commit was made "
                                 "outside this DAG?): whether writes reached the source after it cannot be checked")
        result = check_after_commit(source, fence, selected=late_write_selector(p.namespaces))
    log.info("after COMMITTED: no application write reached the source after the fence (%s)", fence.describe())
    return result


# ---------------------------------------------------------------- the task group


def _approval_limit(params: Mapping[str, Any]) -> float | None:
    value = params.get("approval_timeout_seconds")
    return float(value) if isinstance(value, int | float) else None


def _group_of(ti) -> str:
    """The id of the task group a task instance belongs to (its task id without the last part)."""
    return ti.task_id.rpartition(".")[0]


def add_pull_tasks(profile, sources: PullSources = DEFAULT_SOURCES, *, manage_balancer: bool = False) -> None:
    """Add the pull's tasks (engine branch, native path, mongosync path) to the task group being built.

    Call inside a task group (never at DAG level: the branch names its tasks relative to its group). The
    group's root is the ``choose_pull_engine`` branch, or with ``manage_balancer`` the ``stop_balancer``
    setup before it, whose teardown ``restart_balancer`` runs after both engines' last tasks.
    """

    @task.branch
    def choose_pull_engine(params=None, ti=None) -> str:
        return choose_engine(params, _group_of(ti))

    @task(task_id="start")
    def start_sync(profile: dict, params=None, dag=None, run_id=None) -> list[list[dict]]:
        from atlas_migration.mapping import batches_for_mapping, max_parallel_copies

        return batches_for_mapping(start(params, profile, dag.dag_id, run_id, sources), "partitions",
                                   max_parallel_copies(params))

    # A retried batch resumes each of its partitions from its checkpoint (copy) or its last compared _id.
    @task(retries=3)
    def copy(partitions: list[dict], params=None, dag=None, run_id=None) -> list[dict]:
        return [copy_partition(params, one, dag.dag_id, run_id, sources) for one in partitions]

    @task(retries=3)
    def verify(partitions: list[dict], params=None, dag=None, run_id=None) -> list[dict]:
        return [verify_partition(params, one, dag.dag_id, run_id, sources) for one in partitions]

    @task(retries=3)
    def finish_initial_copy(params=None, dag=None, run_id=None) -> None:
        finish_copy(params, dag.dag_id, run_id, sources)

    @task(task_id="catch_up", retries=3)
    def catch_up_to_lag(params=None, dag=None, run_id=None) -> dict:
        return catch_up(params, dag.dag_id, run_id, sources)

    @task(task_id="cutover", retries=3)
    def cutover_native(params=None, dag=None, run_id=None) -> dict:
        return cutover(params, dag.dag_id, run_id, sources)

    @task(task_id="mongosync_start", retries=2)
    def start_mongosync(profile: dict, params=None) -> dict:
        return mongosync_start(params, profile)

    @task(task_id="mongosync_commit", retries=2)
    def commit_mongosync(started: dict, params=None, dag=None, run_id=None) -> dict:
        return mongosync_commit(params, started, dag.dag_id, run_id)

    @task(task_id="mongosync_check_fence")
    def check_mongosync_fence(params=None, dag=None, run_id=None) -> dict:
        return mongosync_check_fence(params, dag.dag_id, run_id)

    @task(task_id="cutover_evidence", retries=2)
    def native_evidence(params=None, dag=None, run_id=None) -> dict:
        return native_cutover_evidence(params, dag.dag_id, run_id, sources)

    @task(task_id="mongosync_commit_evidence", retries=2)
    def mongosync_evidence(started: dict, params=None) -> dict:
        return mongosync_commit_evidence(params, started)

    wait_can_commit = MongosyncWaitOperator(
        task_id="wait_can_commit", mongosync_conn_id="{{ params.mongosync_conn_id }}", until="can_commit",
        max_lag_seconds="{{ params.max_cutover_lag_seconds }}", poll_interval=poke_interval())
    wait_committed = MongosyncWaitOperator(
        task_id="wait_committed", mongosync_conn_id="{{ params.mongosync_conn_id }}", until="committed",
        poll_interval=poke_interval())

    partitions = start_sync(profile)
    copied = copy.expand(partitions=partitions)
    finished = finish_initial_copy()
    copied >> finished
    # The verifier compares every copied partition while catch-up runs; cutover waits for both.
    verified = verify.expand(partitions=partitions)
    finished >> verified
    native_request = native_evidence()
    finished >> catch_up_to_lag() >> native_request
    # Human-in-the-loop (cutover=manual): parks in awaiting_input until answered in Required Actions or the
    # REST API; with cutover=auto the request says so and it succeeds at once.
    approved = RunApprovalOperator(task_id="await_cutover_approval", request=native_request, what=NATIVE_APPROVAL)
    native_done = cutover_native()
    [approved, verified] >> native_done
    started = start_mongosync(profile)
    mongosync_request = mongosync_evidence(started)
    await_mongosync = RunApprovalOperator(task_id="await_mongosync_approval", request=mongosync_request,
                                          what=MONGOSYNC_APPROVAL)
    started >> wait_can_commit >> mongosync_request
    await_mongosync >> commit_mongosync(started) >> wait_committed
    mongosync_done = check_mongosync_fence()
    wait_committed >> mongosync_done
    branch = choose_pull_engine()
    branch >> [partitions, started]
    if manage_balancer:

        @task(task_id="stop_balancer", retries=2)
        def stop_source_balancer(params=None, dag=None, run_id=None) -> dict:
            return stop_balancer(params, sources, balancer_marker(dag.dag_id, run_id))

        @task(task_id="restart_balancer", retries=2)
        def restart_source_balancer(stopped: dict, params=None, dag=None, run_id=None) -> dict:
            return restart_balancer(params, stopped, sources, balancer_marker(dag.dag_id, run_id))

        stopped = stop_source_balancer()
        stopped >> branch
        restarted = restart_source_balancer(stopped)
        [native_done, mongosync_done] >> restarted
        # Runs once both engine paths are done (one is always skipped), whatever their outcome; a failed
        # restart fails the run, so a balancer left off does not go unnoticed.
        restarted.as_teardown(setups=stopped.operator, on_failure_fail_dagrun=True)


@task_group(group_id=GROUP_ID)
def live_pull_group(profile) -> None:
    """The ``live_pull`` task group: a branch per engine, inside the balancer's stop and restart (call inside a
    DAG; returns nothing)."""
    add_pull_tasks(profile, manage_balancer=True)
