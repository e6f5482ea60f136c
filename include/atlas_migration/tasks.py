"""The bodies of the DAG's tasks, as plain functions of the run's parameters and earlier results.

The DAG file wraps each in ``@task``; everything passed between them is a small JSON-safe dict (profiles,
plans, counts, paths), never documents and never credentials.
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import closing, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from atlas_migration.errors import ConfigurationError, MigrationError
from atlas_migration.hooks.mongo import MongoEndpoint, endpoint_from_connection
from atlas_migration.inspection import DeploymentHints, inspect_source
from atlas_migration.params import MigrationParams
from atlas_migration.planning import (
    NamespaceItem,
    build_copy_plan,
    find_occupied_targets,
    refuse_occupied_targets,
)
from atlas_migration.profile import SourceProfile
from atlas_migration.progress import Progress
from atlas_migration.routing import RoutingDecision, choose_strategy, ensure_available

log = logging.getLogger("atlas_migration")


@dataclass(frozen=True)
class RunPaths:
    """Per-run folders: ``<work_dir>/<dag_id>/<run_id>/{dump,report}``."""

    work_dir: Path
    dag_id: str
    run_id: str

    @property
    def run_prefix(self) -> str:
        return f"{self.dag_id}/{re.sub(r'[^A-Za-z0-9._-]+', '_', self.run_id)}"

    @property
    def root(self) -> Path:
        return self.work_dir / self.run_prefix

    @property
    def dump_dir(self) -> Path:
        return self.root / "dump"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"


def run_paths(params: dict[str, Any], dag_id: str, run_id: str) -> RunPaths:
    return RunPaths(MigrationParams.parse(params).work_dir, dag_id, run_id)


def _log_block(title: str, lines: list[str]) -> None:
    log.info("%s\n%s", title, "\n".join(f"    {line}" for line in lines))


def _stager(p: MigrationParams, paths: RunPaths):
    if not p.staging_s3_uri:
        return None
    from atlas_migration.staging import S3Location, Stager

    return Stager(S3Location.parse(p.staging_s3_uri), p.aws_conn_id, paths.run_prefix)


# ---------------------------------------------------------------- inspect and route


def _dump_reader(p: MigrationParams, paths: RunPaths):
    from atlas_migration.source_dump import DumpReader

    return DumpReader(p.source_dump_uri, paths.root, p.aws_conn_id)


# Connecting to one shard of a sharded source during inspection (milliseconds).
SHARD_TIMEOUT_MS = 5_000


def inspect(params: dict[str, Any], paths: RunPaths | None = None) -> dict[str, Any]:
    p = MigrationParams.parse(params)
    if p.source_dump_uri:
        from atlas_migration import source_dump

        endpoint_from_connection(p.target_conn_id, "target")
        if paths is None:
            raise ConfigurationError("inspecting a source dump needs the run's work folder")
        profile = source_dump.inventory(_dump_reader(p, paths))
        _log_block("Source profile (from the dump)", profile.summary_lines())
        return {**profile.to_dict(), "target": _inspect_target(params, p)}
    from atlas_migration.strategies.file_import import files_requested

    if files_requested(params):
        from atlas_migration.strategies.file_import import inspect_files

        return {**inspect_files(params), "target": _inspect_target(params, p)}
    source = endpoint_from_connection(p.source_conn_id, "source")
    endpoint_from_connection(p.target_conn_id, "target")  # a missing target connection fails now, not after the dump
    hints = DeploymentHints.merge(params, source.deployment_facts)
    aws_lookup = None
    if p.aws_conn_id:
        from atlas_migration.aws import ec2_host_lookup

        aws_lookup = ec2_host_lookup(p.aws_conn_id)
    def shard_connect(set_name: str | None, hosts: list[str]):
        # A shard of a sharded source, with the source's credentials and TLS options; a short timeout so an
        # unreachable shard costs seconds (its window is then recorded as unknown, naming it).
        return source.for_replica_set(set_name, hosts).connect(timeout_ms=SHARD_TIMEOUT_MS)

    with closing(source.connect()) as client:
        profile = inspect_source(client, conn_id=p.source_conn_id, hosts=source.hosts, hints=hints,
                                 aws_lookup=aws_lookup, shard_connect=shard_connect)
    _log_block("Source profile", profile.summary_lines())
    if profile.unknown:
        _log_block("Facts that could not be read", [f"{k}: {v}" for k, v in sorted(profile.unknown.items())])
    return {**profile.to_dict(), "target": _inspect_target(params, p)}


def _inspect_target(params: dict[str, Any], p: MigrationParams) -> dict[str, Any] | None:
    """The target's version, topology and tier (``target_inspection``); None when it cannot be reached here
    (the strategy's own first step then fails with the reason)."""
    from atlas_migration.target_inspection import inspect_target

    target = endpoint_from_connection(p.target_conn_id, "target")
    cluster, cluster_error = _atlas_cluster(params)
    try:
        with closing(target.connect(timeout_ms=5000)) as client:
            profile = inspect_target(client, p.target_conn_id, target.deployment_facts, cluster, cluster_error)
    except MigrationError as exc:
        log.warning("target not inspected: %s", exc)
        return None
    log.info("Target profile: %s", profile.summary())
    return profile.to_dict()


def _atlas_cluster(params: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The target cluster's Admin API description when an Atlas connection and a cluster name are given."""
    name = str(params.get("target_cluster_name") or "").strip()
    conn_id = str(params.get("atlas_conn_id") or "").strip()
    if not name or not conn_id:
        return None, None
    from airflow.sdk import BaseHook

    try:
        BaseHook.get_connection(conn_id)
    except Exception:  # AirflowNotFoundException: no Atlas connection configured, the tier may be declared
        return None, f"Atlas connection '{conn_id}' is not defined"
    from atlas_migration.hooks.atlas import AtlasAdminHook

    try:
        project = str(params.get("target_project_id") or "").strip() or None
        return AtlasAdminHook(conn_id).get_cluster(name, group_id=project), None
    except MigrationError as exc:
        return None, f"Atlas Admin API: {exc}"


def route(params: dict[str, Any], profile_data: dict[str, Any], available: frozenset[str],
          run_id: str = "") -> dict[str, Any]:
    from atlas_migration.routing import choose_for_files
    from atlas_migration.target_inspection import TargetProfile

    p = MigrationParams.parse(params)
    target = TargetProfile.from_dict(profile_data.get("target"))
    if profile_data.get("source_kind") == "files":
        decision = choose_for_files(p.strategy, len(profile_data.get("files") or []), target)
        _log_block("Routing decision", decision.explain().splitlines())
    else:
        profile = SourceProfile.from_dict(profile_data)
        decision = _dump_decision(p) if p.source_dump_uri else choose_strategy(profile, p.strategy, target)
        plan = build_copy_plan(profile, p.namespaces, p.target_db_prefix)
        _log_block("Routing decision", decision.explain().splitlines())
        _log_block("Copy plan", plan.describe())
    result = {**decision.to_dict(), "dry_run": p.dry_run, "available": decision.strategy in available}
    if p.rehearsal:
        # Before any strategy writes: the scratch databases must be ours (claimed with a marker) or new.
        claim_scratch(p, sorted({i.target_db for i in plan.all_items if i.target_db}), run_id, write=not p.dry_run)
    if p.dry_run:
        status = "available" if result["available"] else "NOT built in this release"
        log.info("Dry run: stopping after inspection and routing (the '%s' task group is %s). Nothing was written.",
                 decision.strategy, status)
        return result
    ensure_available(decision, available)
    return result


def _dump_decision(p: MigrationParams) -> RoutingDecision:
    if p.strategy not in ("auto", "mongorestore"):
        raise ConfigurationError(
            f"strategy={p.strategy} cannot run from a dump: source_dump_uri is restored with the mongorestore "
            "strategy only (leave strategy on auto)"
        )
    return RoutingDecision(
        strategy="mongorestore", rule="source_dump_uri",
        reasons=[f"the source is a dump ({p.source_dump_uri}): restored by the mongorestore group, no source "
                 "server is read"],
        requested=p.strategy,
    )


def branch(decision: dict[str, Any]) -> str | None:
    """The task group to run, or None (skip everything downstream) for a dry run."""
    return None if decision.get("dry_run") else decision["strategy"]


# ---------------------------------------------------------------- mongorestore strategy


def _engine_name(p: MigrationParams) -> str:
    from atlas_migration.engines import mongotools

    if p.dump_engine == "native":
        return "native"
    if mongotools.tools_available():
        return "mongodump"
    if p.dump_engine == "mongodump":
        raise ConfigurationError("dump_engine=mongodump but mongodump/mongorestore are not on PATH; install the "
                                 "MongoDB Database Tools or use dump_engine=auto")
    return "native"


def prepare_restore(params: dict[str, Any], profile_data: dict[str, Any], paths: RunPaths) -> list[dict[str, Any]]:
    """Check the target before anything is written; return one work item per collection (for mapping)."""
    p = MigrationParams.parse(params)
    profile = SourceProfile.from_dict(profile_data)
    plan = build_copy_plan(profile, p.namespaces, p.target_db_prefix)
    target = endpoint_from_connection(p.target_conn_id, "target")
    with closing(target.connect()) as client:
        occupied = find_occupied_targets(client, plan.all_items)
        if not p.drop_target:
            refuse_occupied_targets(occupied, p.target_conn_id)
        existing = _existing_namespaces(client, plan.all_items)
    stager = _stager(p, paths)
    if stager:
        stager.check_bucket()
    # A user's dump is restored by the built-in engine, which checks it before writing anything.
    engine = "native" if p.source_dump_uri else _engine_name(p)
    paths.dump_dir.mkdir(parents=True, exist_ok=True)
    if occupied:
        log.warning("drop_target=true: %d target namespace(s) will be replaced: %s", len(occupied), ", ".join(occupied))
    log.info("mongorestore strategy: %d collection(s), %d view(s); engine %s; dumps in %s%s",
             len(plan.collections), len(plan.views), engine, paths.dump_dir,
             f" staged through {p.staging_s3_uri}" if stager else "")
    return [
        {**item.to_dict(), "engine": engine, "gzip": p.dump_gzip,
         # Replace (drop) a namespace we create or the operator allowed us to drop; fill a pre-existing empty
         # one in place, keeping options/indexes/sharding the operator set up in Atlas.
         "replace": p.drop_target or item.target_namespace not in existing}
        for item in plan.collections
    ]


def _existing_namespaces(client, items: list[NamespaceItem]) -> set[str]:
    found: set[str] = set()
    for db_name in {i.target_db or i.db for i in items}:
        found |= {f"{db_name}.{name}" for name in client[db_name].list_collection_names()}
    return found


def dump_namespaces(params: dict[str, Any], items: list[dict[str, Any]], paths: RunPaths) -> list[dict[str, Any]]:
    """Dump a batch of collections (one mapped task instance). The params, the source connection, the staging
    bucket and ONE source client serve the whole batch: against a remote deployment, a TLS handshake and SCRAM
    authentication per collection cost more than dumping a small collection, and a batch holds up to
    thousands of them."""
    p = MigrationParams.parse(params)
    stager = _stager(p, paths)
    if p.source_dump_uri:
        return [_stage_source_dump(p, item, paths, stager) for item in items]
    source = endpoint_from_connection(p.source_conn_id, "source")
    # mongodump connects by itself: a client only when the native engine dumps something.
    native_items = any(item["engine"] != "mongodump" for item in items)
    with closing(source.connect()) if native_items else nullcontext() as client:
        return [_dump_one(p, source, client, stager, item, paths) for item in items]


def dump_namespace(params: dict[str, Any], item: dict[str, Any], paths: RunPaths) -> dict[str, Any]:
    """Dump one collection (a batch of one)."""
    return dump_namespaces(params, [item], paths)[0]


def _dump_one(p: MigrationParams, source: MongoEndpoint, client: Any, stager: Any, item: dict[str, Any],
              paths: RunPaths) -> dict[str, Any]:
    started = time.monotonic()
    if item["engine"] == "mongodump":
        _dump_with_tools(source, item, paths)
        result = {"documents": None, "bytes": None}
    else:
        from atlas_migration.engines import native

        progress = Progress(f"dump {item['db']}.{item['collection']}", item.get("documents"), log)
        # The inventory's average size sizes the cursor batches (no extra query per collection).
        average = item["size_bytes"] // item["documents"] if item.get("documents") and item.get("size_bytes") else None
        dumped = native.dump_collection(client, item["db"], item["collection"], paths.dump_dir,
                                        batch_size=p.batch_size, gzip=item.get("gzip", True),
                                        average_document_bytes=average, progress=progress).to_dict()
        result = {"documents": dumped["documents"], "bytes": dumped["bytes"]}
    from atlas_migration.engines.dump_layout import dumped_files

    # Found by the names the writer gave them (mongodump escapes collection names), prelude included.
    files = dumped_files(paths.dump_dir, item["db"], item["collection"])
    seconds = time.monotonic() - started
    staged = stager.upload(paths.root, [f"{paths.dump_dir.name}/{f}" for f in files]) if stager else []
    docs = result["documents"]
    log.info("dumped %s: %s documents, %s bytes in %.1fs%s", f"{item['db']}.{item['collection']}",
             "?" if docs is None else f"{docs:,}", result["bytes"], seconds,
             f" ({docs / seconds:,.0f} docs/s)" if docs and seconds else "")
    return {**item, **result, "files": files, "staged": staged, "dump_seconds": round(seconds, 3),
            "dump_started": round(time.time() - seconds, 3), "dump_finished": round(time.time(), 3)}


def _stage_source_dump(p: MigrationParams, item: dict[str, Any], paths: RunPaths, stager: Any) -> dict[str, Any]:
    """The dump task of a run from a user's dump: make the namespace's files readable by the restore."""
    from atlas_migration import source_dump

    started = time.monotonic()
    root, files = _dump_reader(p, paths).stage_collection(item["db"], item["collection"], paths.dump_dir,
                                                          copy=stager is not None)
    result = source_dump.result_summary(item, root)
    staged = stager.upload(paths.root, [f"{paths.dump_dir.name}/{f}" for f in files]) if stager else []
    seconds = time.monotonic() - started
    log.info("staged %s.%s from the dump at %s: %s documents in %.1fs", item["db"], item["collection"],
             p.source_dump_uri, f"{result['documents']:,}", seconds)
    return {**item, **result, "files": files, "staged": staged, "dump_seconds": round(seconds, 3),
            "dump_started": round(time.time() - seconds, 3), "dump_finished": round(time.time(), 3),
            # Read in place (a local dump folder without staging); otherwise the run's dump folder.
            "dump_root": str(root) if root != paths.dump_dir else ""}


def _dump_with_tools(source: MongoEndpoint, item: dict[str, Any], paths: RunPaths) -> None:
    from atlas_migration.engines import mongotools

    with mongotools.tool_config_file(source.tool_uri()) as config:
        argv = mongotools.mongodump_argv(config, paths.dump_dir, item["db"], item["collection"],
                                         gzip=item.get("gzip", True))
        mongotools.run_tool(argv, secrets=source.secrets, log=log)


def restore_namespaces(params: dict[str, Any], dumped: list[dict[str, Any]], paths: RunPaths) -> list[dict[str, Any]]:
    """Restore a batch of dumped collections: the params, the target connection, the staging bucket and ONE
    target client serve the whole batch (see ``dump_namespaces``)."""
    if not dumped:
        return []
    p = MigrationParams.parse(params)
    target = endpoint_from_connection(p.target_conn_id, "target")
    stager = _stager(p, paths)
    with closing(target.connect()) as client:
        return [_restore_one(p, target, client, stager, one, paths) for one in dumped]


def restore_namespace(params: dict[str, Any], dumped: dict[str, Any], paths: RunPaths) -> dict[str, Any]:
    """Restore one dumped collection (a batch of one)."""
    return restore_namespaces(params, [dumped], paths)[0]


def _restore_one(p: MigrationParams, target: MongoEndpoint, client: Any, stager: Any, dumped: dict[str, Any],
                 paths: RunPaths) -> dict[str, Any]:
    if stager:
        stager.download(paths.root, [f"{paths.dump_dir.name}/{f}" for f in dumped["files"]])
    else:
        dump_root = Path(dumped.get("dump_root") or paths.dump_dir)
        missing = [f for f in dumped["files"] if not (dump_root / f).is_file()]
        if missing:
            # Checked before the target is touched: on a distributed executor the dump may have run on
            # another worker, whose folder this one cannot see.
            raise MigrationError(
                f"the dump of {dumped['db']}.{dumped['collection']} is not in this worker's folder "
                f"({dump_root}; missing: {', '.join(missing[:3])}). Dump and restore ran on different "
                "workers without a shared folder: set staging_s3_uri (and aws_conn_id) so dumps pass through "
                "S3, or give every worker the same MIGRATION_WORK_DIR volume")
    target_db = dumped.get("target_db") or dumped["db"]
    started = time.monotonic()
    if not dumped["replace"]:
        # A pre-existing collection that was empty at preflight: anything in it now is ours from an
        # earlier attempt of this task, so empty it (keeping its options and indexes) before refilling.
        client[target_db][dumped["collection"]].delete_many({})
    if dumped["engine"] == "mongodump":
        from atlas_migration.engines import mongotools

        with mongotools.tool_config_file(target.tool_uri()) as config:
            argv = mongotools.mongorestore_argv(
                config, paths.dump_dir, [f"{dumped['db']}.{dumped['collection']}"], drop=dumped["replace"],
                workers=p.restore_workers, target_db=dumped.get("target_db") or None,
                gzip=dumped.get("gzip", True))
            mongotools.run_tool(argv, secrets=target.secrets, log=log)
        result = {"documents": client[target_db][dumped["collection"]].estimated_document_count()}
    else:
        from atlas_migration.engines import native

        progress = Progress(f"restore {dumped['db']}.{dumped['collection']}", dumped.get("documents"), log)
        result = native.restore_collection(
            client, Path(dumped.get("dump_root") or paths.dump_dir), dumped["db"], dumped["collection"], target_db=dumped.get("target_db") or None,
            drop=dumped["replace"], insert_batch_docs=p.batch_size, workers=p.restore_workers, progress=progress,
        ).to_dict()
    seconds = time.monotonic() - started
    docs = result.get("documents") or 0
    indexes = result.get("indexes_created")
    log.info("restored %s into %s.%s: %s documents%s in %.1fs (%s docs/s)", f"{dumped['db']}.{dumped['collection']}",
             target_db, dumped["collection"], f"{docs:,}", "" if indexes is None else f", {indexes} index(es) built",
             seconds, f"{docs / seconds:,.0f}" if seconds else "?")
    return {"namespace": f"{dumped['db']}.{dumped['collection']}", "target": f"{target_db}.{dumped['collection']}",
            "documents": docs, "bytes": dumped.get("bytes"), "engine": dumped["engine"],
            "dump_seconds": dumped.get("dump_seconds"), "dump_started": dumped.get("dump_started"),
            "dump_finished": dumped.get("dump_finished"), "restore_seconds": round(seconds, 3),
            "restore_started": round(time.time() - seconds, 3), "restore_finished": round(time.time(), 3)}


def restore_views(params: dict[str, Any], profile_data: dict[str, Any], paths: RunPaths) -> list[str]:
    """Views last: they need their source collections in place. Dumped here (metadata only) and restored."""
    p = MigrationParams.parse(params)
    plan = build_copy_plan(SourceProfile.from_dict(profile_data), p.namespaces, p.target_db_prefix)
    if not plan.views:
        log.info("no views to restore")
        return []
    from atlas_migration.engines import native

    target = endpoint_from_connection(p.target_conn_id, "target")
    if p.source_dump_uri:
        reader = _dump_reader(p, paths)
        with closing(target.connect()) as dst:
            for view in plan.views:
                root, _ = reader.stage_collection(view.db, view.collection, paths.dump_dir, copy=False)
                native.restore_view(dst, root, view.db, view.collection, target_db=view.target_db or None, drop=True)
                log.info("restored view %s from the dump", view.target_namespace)
        return [v.target_namespace for v in plan.views]
    source = endpoint_from_connection(p.source_conn_id, "source")
    with closing(source.connect()) as src, closing(target.connect()) as dst:
        for view in plan.views:
            native.dump_collection(src, view.db, view.collection, paths.dump_dir, gzip=p.dump_gzip)
            native.restore_view(dst, paths.dump_dir, view.db, view.collection, target_db=view.target_db or None,
                                drop=True)
            log.info("restored view %s", view.target_namespace)
    return [v.target_namespace for v in plan.views]


# ---------------------------------------------------------------- validate and report

# Strategies that keep the source live until a cutover fence: their validation follows the source at the fence.
LIVE_STRATEGIES = frozenset({"live_pull", "live_push", "compose", "aws_replica_set"})



# Where each live strategy's cutover task leaves its result (with the fence) in XCom.
CUTOVER_TASKS = {
    "live_pull": ("live_pull.cutover", "live_pull.mongosync_check_fence"),
    "compose": ("compose.pull.cutover", "compose.pull.mongosync_check_fence"),
    "aws_replica_set": ("aws_replica_set.pull.cutover", "aws_replica_set.pull.mongosync_check_fence"),
    "live_push": ("live_push.cutover",),
}
# Where each live strategy's human-in-the-loop approval leaves its record (who approved, when) in XCom.
APPROVAL_TASKS = {
    "live_pull": ("live_pull.await_cutover_approval", "live_pull.await_mongosync_approval"),
    "compose": ("compose.pull.await_cutover_approval", "compose.pull.await_mongosync_approval"),
    "aws_replica_set": ("aws_replica_set.pull.await_cutover_approval", "aws_replica_set.pull.await_mongosync_approval"),
    "live_push": ("live_push.approve_cutover",),
}


def fence_notes(result: dict[str, Any] | None) -> list[str]:
    """Report lines about the cutover fence a live strategy's cutover returned (pure)."""
    fence = (result or {}).get("fence")
    if not fence:
        return []
    from atlas_migration.fence import Fence

    parsed = Fence.from_dict(fence)
    lines = [f"Cutover fence: {parsed.describe()} (placed {parsed.taken_at})",
             "Writes were BLOCKED on the source at cutover; to roll back, unblock them with "
             "db.adminCommand({setUserWriteBlockMode: 1, global: false})" if parsed.blocked else
             "Writes were NOT blocked on the source: an operator stated that they had stopped"]
    late = parsed.late_writes
    lines.append("Late writes after the fence: none" if not late else
                 "Late writes after the fence: " + ", ".join(f"{ns} ({n})" for ns, n in sorted(late.items())))
    if result.get("rechecked"):
        lines.append(f"Recheck set: {result['rechecked']} document(s) re-read from the source at cutover")
    verification = result.get("verification")
    if verification:
        mismatches = verification.get("mismatches") or {}
        lines.append(f"Verifier: {verification.get('documents_compared', 0):,} documents compared in "
                     f"{(verification.get('partitions') or {}).get('compared', 0)} partitions, "
                     f"{verification.get('rechecked', 0):,} rechecks over {verification.get('generation', 0)} "
                     f"generations; mismatches found and resolved: {mismatches.get('resolved', 0)}, open: "
                     f"{mismatches.get('open', 0)} ({'clean' if verification.get('clean') else 'NOT clean'})")
    return lines


def file_import_results(ti) -> list[dict[str, Any]]:
    """Every mapped ``file_import`` task's result (XCom)."""
    if ti is None:
        return []
    from atlas_migration.mapping import flatten_batches

    return flatten_batches(ti.xcom_pull(task_ids="file_import.import_file_range", default=None))


def publish_report(ti, report: dict[str, Any], full_report: str | None = None) -> None:
    """Push the report (bounded: ``report_view.bound_report``) as an XCom of the run, so the api-server's
    report pages read it from the metadata DB: the files are on this worker's disk. Pushed before the task
    fails on a FAIL verdict, because a failed validation is the report people most need to read."""
    if ti is None:
        return
    from atlas_migration.report_view import REPORT_XCOM_KEY, bound_report

    ti.xcom_push(key=REPORT_XCOM_KEY, value=bound_report(report, full_report=full_report))


def validate(params: dict[str, Any], profile_data: dict[str, Any], decision: dict[str, Any],
             paths: RunPaths, notes: list[str] | None = None, notes_source=None) -> dict[str, Any]:
    """Validate the migrated namespaces; write the report files and publish the report as an XCom
    (``publish_report``; ``notes_source`` is the task instance, which also reads the strategy's results)."""
    from atlas_migration import validation

    if decision.get("dry_run"):
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException("dry run: nothing was migrated, nothing to validate")
    p = MigrationParams.parse(params)
    if decision.get("strategy") == "file_import":
        from atlas_migration.strategies import file_import

        return file_import.validate(params, file_import_results(notes_source), paths.report_dir,
                                    publish=lambda data, path: publish_report(notes_source, data, path))
    plan = build_copy_plan(SourceProfile.from_dict(profile_data), p.namespaces, p.target_db_prefix)
    target = endpoint_from_connection(p.target_conn_id, "target")
    namespaces = [(i.db, i.collection) for i in plan.all_items]
    target_db_map = {i.db: i.target_db for i in plan.all_items if i.target_db}
    if p.source_dump_uri:
        from atlas_migration.source_dump import validate_against_dump

        with closing(target.connect()) as dst:
            report = validate_against_dump(_dump_reader(p, paths), dst, namespaces, mode=p.validation_mode,
                                           target_db_map=target_db_map or None, run_id=paths.run_id,
                                           strategy=decision.get("strategy", ""), batch_size=p.batch_size)
        notes = [*(notes or []), f"source: the dump at {p.source_dump_uri}; counts and digests computed from its files"]
    else:
        source = endpoint_from_connection(p.source_conn_id, "source")
        with closing(source.connect()) as src, closing(target.connect()) as dst:
            if decision.get("strategy") in LIVE_STRATEGIES:
                # The source is fenced now: validate what it holds at the fence, not what inspection saw
                # before the sync (collections created or dropped meanwhile), and what only the target holds.
                inspected = set(namespaces)
                namespaces = validation.scope_at_fence(validation.list_namespaces(src),
                                                       validation.list_namespaces(dst), p.namespaces.matches,
                                                       p.target_db_prefix)
                target_db_map = ({db: f"{p.target_db_prefix}{db}" for db, _ in namespaces}
                                 if p.target_db_prefix else {})
                changed = sorted(set(namespaces) ^ inspected)
                if changed:
                    log.info("validation scope follows the source at the fence: %s differ from the inventory taken "
                             "at inspection (created, dropped or renamed during the sync, or only on the target)",
                             ", ".join(f"{db}.{coll}" for db, coll in changed))
            report = validation.validate_namespaces(src, dst, namespaces, mode=p.validation_mode,
                                                    target_db_map=target_db_map or None, run_id=paths.run_id,
                                                    strategy=decision.get("strategy", ""),
                                                    batch_size=p.batch_size)
    report = replace(report, notes=list(notes or []))
    files = validation.write_report(report, paths.report_dir)
    stager = _stager(p, paths)
    if stager:
        relative = {kind: str(Path(path).relative_to(paths.root)) for kind, path in files.items()}
        uris = stager.upload(paths.root, list(relative.values()))
        files.update({f"s3_{kind}": uri for kind, uri in zip(relative, uris, strict=True)})
    _log_block("Validation summary", validation.render_summary(report).splitlines())
    log.info("Validation report (%s)\n%s", files.get("markdown") or files, validation.render_markdown(report))
    publish_report(notes_source, report.to_dict(), files.get("s3_json") or files.get("json"))
    validation.raise_if_failed(report)
    return {"verdict": report.verdict, "files": files, "namespaces": len(namespaces)}


def report(profile_data: dict[str, Any], decision: dict[str, Any], validation_result: dict[str, Any]) -> dict[str, Any]:
    profile = SourceProfile.from_dict(profile_data)
    lines = [*profile.summary_lines(), "", *RoutingDecision(**{k: decision[k] for k in
             ("strategy", "rule", "reasons", "warnings", "requested")}).explain().splitlines(), "",
             f"validation: {validation_result['verdict']} over {validation_result['namespaces']} namespaces"]
    lines += [f"report ({kind}): {where}" for kind, where in validation_result["files"].items()]
    _log_block("Migration finished", lines)
    return validation_result


# ---------------------------------------------------------------- rehearsals


def _scratch_state(client, prefix: str) -> tuple[set[str], set[str]]:
    """Databases under ``prefix`` on the rehearsal target, and those a rehearsal recorded creating."""
    from atlas_migration.rehearsal import SCRATCH_MARKER_COLLECTION, SCRATCH_MARKER_DB

    existing = {n for n in client.list_database_names() if n.startswith(prefix)}
    markers = client[SCRATCH_MARKER_DB][SCRATCH_MARKER_COLLECTION]
    marked = {d["_id"] for d in markers.find({"prefix": prefix}, {"_id": 1})}
    return existing, marked


def check_scratch(params: dict[str, Any]) -> list[str]:
    """Before a rehearsal: the scratch target is reachable; say which scratch databases are left over."""
    p = MigrationParams.parse(params)
    if not p.rehearsal:
        raise ConfigurationError("check_scratch only runs in a rehearsal")
    target = endpoint_from_connection(p.target_conn_id, "target")
    with closing(target.connect()) as client:
        existing, marked = _scratch_state(client, p.target_db_prefix)
    leftovers = sorted(existing & marked)
    foreign = sorted(existing - marked)
    log.info("rehearsal writes to '%s' as %s<db>; leftover scratch databases of earlier rehearsals (replaced): %s",
             p.target_conn_id, p.target_db_prefix, ", ".join(leftovers) or "none")
    if foreign:
        log.warning("databases named %s* that no rehearsal created (never written to nor dropped by a rehearsal): "
                    "%s", p.target_db_prefix, ", ".join(foreign))
    return leftovers


def claim_scratch(p: MigrationParams, databases: list[str], run_id: str, *, write: bool = True) -> None:
    """Record (on the rehearsal target) that this rehearsal creates ``databases``, before it writes any of
    them; refuse, before anything is written, a database of that name which no rehearsal created."""
    import datetime as dt

    from atlas_migration.rehearsal import SCRATCH_MARKER_COLLECTION, SCRATCH_MARKER_DB, scratch_conflicts

    target = endpoint_from_connection(p.target_conn_id, "target")
    with closing(target.connect()) as client:
        existing, marked = _scratch_state(client, p.target_db_prefix)
        conflicts = scratch_conflicts(databases, existing, marked)
        if conflicts:
            raise ConfigurationError(
                f"the rehearsal would write into database(s) {', '.join(conflicts)} on '{p.target_conn_id}', which "
                "exist but were not created by a rehearsal. Nothing was written. Choose another "
                "rehearsal_db_prefix (or a separate rehearsal_target_conn_id)")
        if not write:
            return
        markers = client[SCRATCH_MARKER_DB][SCRATCH_MARKER_COLLECTION]
        now = dt.datetime.now(dt.UTC)
        for name in databases:
            markers.update_one({"_id": name}, {"$setOnInsert": {"prefix": p.target_db_prefix, "created_at": now,
                                                                "run_id": run_id}}, upsert=True)
    log.info("rehearsal: scratch database(s) recorded as created by a rehearsal: %s", ", ".join(databases))


def cleanup_scratch(params: dict[str, Any]) -> list[str]:
    """Drop the scratch databases a rehearsal recorded creating (a marker on the rehearsal target), and
    nothing else: a database that merely starts with the prefix is kept."""
    from atlas_migration.rehearsal import SCRATCH_MARKER_COLLECTION, SCRATCH_MARKER_DB, databases_to_drop

    p = MigrationParams.parse(params)
    if not p.rehearsal or not p.target_db_prefix:
        raise ConfigurationError("cleanup_scratch only runs in a rehearsal, with a scratch database prefix")
    target = endpoint_from_connection(p.target_conn_id, "target")
    with closing(target.connect()) as client:
        existing, marked = _scratch_state(client, p.target_db_prefix)
        scratch = databases_to_drop(existing, marked, p.target_db_prefix)
        for name in scratch:
            client.drop_database(name)
        # Markers go last: a clean-up killed half-way still finds what remains to drop.
        client[SCRATCH_MARKER_DB][SCRATCH_MARKER_COLLECTION].delete_many({"_id": {"$in": sorted(marked)}})
    kept = sorted(existing - set(scratch))
    log.info("dropped %d scratch database(s) on '%s': %s%s", len(scratch), p.target_conn_id, ", ".join(scratch) or "none",
             f"; kept (not created by a rehearsal): {', '.join(kept)}" if kept else "")
    return scratch


def record_rehearsal(params: dict[str, Any], paths: RunPaths, ti, dag_run) -> dict[str, Any]:
    """Append this rehearsal's durations, volumes and verdict to the history, rewrite the trend table, and
    fail when the rehearsal did (the history keeps failed rehearsals too)."""
    from atlas_migration import rehearsal
    from atlas_migration.mapping import flatten_batches

    p = MigrationParams.parse(params)

    def pull(task_id: str):
        return ti.xcom_pull(task_ids=task_id, default=None)

    decision = pull("route") or {}
    entry = rehearsal.summarise_run(
        run_id=paths.run_id,
        started_at=getattr(dag_run, "start_date", None),
        profile=pull("inspect_source"),
        decision=decision,
        restored=flatten_batches(pull("mongorestore.copy.restore")),
        validation_report=_read_json(paths.report_dir / "validation.json"),
    )
    history_dir = p.work_dir / paths.dag_id
    entries = rehearsal.append_history(history_dir / "history.jsonl", entry)
    trend = rehearsal.render_trend(entries[-int(params.get("keep_history") or 50):])
    (history_dir / "trend.md").write_text(trend)
    _log_block("Rehearsal trend (" + str(history_dir / "trend.md") + ")", trend.splitlines())
    if entry["status"] == "failed":
        raise MigrationError(f"rehearsal {paths.run_id} failed: {entry['failure']}. Recorded in the history.")
    return entry


def _read_json(path: Path) -> dict[str, Any] | None:
    import json

    return json.loads(path.read_text()) if path.exists() else None
