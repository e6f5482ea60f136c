"""The DAG's parameters: the trigger-form definitions and ``MigrationParams``, their checked, typed form.

The JSON schema on each ``Param`` makes the UI and the REST API refuse invalid values when the run is
created; ``MigrationParams.parse`` re-checks what a schema cannot express (pattern syntax, S3 URIs) before
anything touches a server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas_migration.errors import ConfigurationError
from atlas_migration.namespaces import NamespaceFilter
from atlas_migration.routing import AUTO, Strategy

STRATEGY_CHOICES = [AUTO, *(s.value for s in Strategy)]
DEFAULT_REHEARSAL_PREFIX = "rehearsal__"
# Short enough that <prefix><db> stays within MongoDB's 64-byte database-name limit for usual names.
REHEARSAL_PREFIX_PATTERN = r"^[A-Za-z0-9_-]{3,24}$"


def dag_params() -> dict[str, Any]:
    """``Param`` objects for the trigger form, grouped in sections."""
    from airflow.sdk import Param

    def section(name: str, **params: Param) -> dict[str, Param]:
        for p in params.values():
            p.schema["section"] = name
        return params

    return {
        **section(
            "Source",
            source_conn_id=Param("mongo_source", type="string", minLength=1, title="Source connection",
                                 description="Airflow connection (type mongo) of the deployment to migrate."),
            source_managed_by=Param("detect", type="string", enum=["detect", "none", "cloud_manager", "ops_manager"],
                                    title="Managed by",
                                    description="Whether Cloud Manager or Ops Manager manages the source. 'detect' uses "
                                                "the connection's extra migration.managed_by, else 'none'."),
            source_hosting=Param("detect", type="string",
                                 enum=["detect", "other", "atlas_shared_tier", "compose", "aws"],
                                 title="Hosting",
                                 description="Where the source runs. 'detect' reads host names (and EC2 when an AWS "
                                             "connection is set)."),
            source_dump_uri=Param("", type="string", title="Restore from a dump instead",
                                  description="A mongodump output to restore instead of reading a source server: an "
                                              "absolute path to a dump folder (plain or gzip) or to a mongodump "
                                              "--archive file, or s3://bucket/prefix of a dump folder or "
                                              "s3://bucket/key of an archive. Runs the mongorestore group and "
                                              "validates against the dump's own documents. Empty: read the source "
                                              "connection."),
            aws_conn_id=Param("", type="string", title="AWS connection",
                              description="Optional Airflow AWS connection: EC2 lookup of the source hosts and S3 staging."),
        ),
        **section(
            "Target",
            target_conn_id=Param("atlas_target", type="string", minLength=1, title="Atlas connection",
                                 description="Airflow connection (type mongo) of the Atlas cluster to import into."),
        ),
        **section(
            "Strategy",
            strategy=Param(AUTO, type="string", enum=STRATEGY_CHOICES, title="Import strategy",
                           description="'auto' follows MongoDB's guidance; any other value forces a strategy and fails "
                                       "clearly if it cannot work for this source."),
            dry_run=Param(False, type="boolean", title="Dry run",
                          description="Inspect and route only: print the plan, write nothing."),
        ),
        **section(
            "Namespaces",
            include_namespaces=Param([], type="array", items={"type": "string"}, title="Include",
                                     description="mongodump --nsInclude patterns: 'db.coll', 'db.*', '*.coll'. Empty = all."),
            exclude_namespaces=Param([], type="array", items={"type": "string"}, title="Exclude",
                                     description="mongodump --nsExclude patterns, applied after the includes."),
            drop_target=Param(False, type="boolean", title="Drop target namespaces",
                              description="Replace target namespaces that already hold data. Off: such a target is refused."),
        ),
        **section(
            "Copy",
            dump_engine=Param("auto", type="string", enum=["auto", "mongodump", "native"], title="Dump engine",
                              description="'auto' uses mongodump/mongorestore when on PATH, else the built-in raw-BSON engine."),
            dump_gzip=Param(True, type="boolean", title="Compress dumps",
                            description="gzip the dump files (mongodump --gzip). Off: faster dumps on a fast local "
                                        "disk, at about twice the disk space and S3 traffic."),
            restore_workers=Param(4, type="integer", minimum=1, maximum=32, title="Insertion workers per collection",
                                  description="Parallel insert threads per collection (mongorestore "
                                              "--numInsertionWorkersPerCollection). Capped collections use one."),
            batch_size=Param(1000, type="integer", minimum=10, maximum=100_000, title="Documents per batch",
                             description="Documents per read and insert batch; batches are also bounded in bytes, "
                                         "so memory stays bounded whatever the document size."),
            work_dir=Param("", type="string", title="Work directory",
                           description="Where dumps and reports go (shared by workers unless S3 staging is used). "
                                       "Empty: $MIGRATION_WORK_DIR or $AIRFLOW_HOME/atlas_migration."),
        ),
        **section(
            "Staging",
            staging_s3_uri=Param("", type="string", pattern=r"^$|^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$",
                                 title="S3 staging location",
                                 description="s3://bucket/prefix to stage dumps and reports through (workers need no "
                                             "shared disk). Empty: no staging."),
        ),
        **_live_pull_params(),
        **_compose_params(),
        **_aws_params(),
        **_live_push_params(),
        **_file_import_params(),
        **section(
            "Validation",
            validation_mode=Param("counts", type="string", enum=["counts", "full"], title="Validation mode",
                                  description="'counts': exact counts, indexes and options. 'full': also a digest of "
                                              "every document's raw BSON (read unsorted; the _ids of differing "
                                              "documents are named when digests differ)."),
        ),
    }


def rehearsal_params() -> dict[str, Any]:
    """The rehearsal DAG's params: the migration's, plus where the scratch copy goes."""
    from airflow.sdk import Param

    params = dag_params()
    params["rehearsal_db_prefix"] = Param(
        DEFAULT_REHEARSAL_PREFIX, type="string", pattern=REHEARSAL_PREFIX_PATTERN, title="Scratch database prefix",
        description="Every rehearsed database is written as <prefix><db> on the rehearsal target, then dropped. "
                    "The real target namespaces are never touched.", section="Rehearsal")
    params["rehearsal_target_conn_id"] = Param(
        "", type="string", title="Rehearsal target connection",
        description="Optional separate Airflow connection (type mongo) for the scratch copy; empty: the target "
                    "connection, with the prefix above.", section="Rehearsal")
    params["rehearsal_network_dry_run"] = Param(
        False, type="boolean", title="Dry run of the network preparation",
        description="AWS replica-set path: a rehearsal never prepares networking. On: read AWS and Atlas and log "
                    "what network_mode=prepare would add, changing nothing.", section="Rehearsal")
    params["keep_history"] = Param(
        50, type="integer", minimum=1, maximum=10_000, title="Runs in the trend table",
        description="How many past rehearsals the trend table shows.", section="Rehearsal")
    return params


def _live_pull_params() -> dict[str, Any]:
    from atlas_migration.live_pull import live_pull_params

    return live_pull_params()


def _compose_params() -> dict[str, Any]:
    from atlas_migration.compose import compose_params

    return compose_params()


def _aws_params() -> dict[str, Any]:
    from atlas_migration.aws_replica_set import aws_params

    return aws_params()


def _file_import_params() -> dict[str, Any]:
    from atlas_migration.file_import import file_import_params

    return file_import_params()


def _live_push_params() -> dict[str, Any]:
    from atlas_migration.live_push import live_push_params

    return live_push_params()


@dataclass(frozen=True)
class MigrationParams:
    source_conn_id: str
    target_conn_id: str
    strategy: str
    dry_run: bool
    namespaces: NamespaceFilter
    drop_target: bool
    source_managed_by: str
    source_hosting: str
    aws_conn_id: str
    dump_engine: str
    dump_gzip: bool
    restore_workers: int
    batch_size: int
    work_dir: Path
    staging_s3_uri: str
    validation_mode: str
    # Rehearsals write every database as <target_db_prefix><db>; empty for a real migration.
    target_db_prefix: str = ""
    rehearsal: bool = False
    # A dump to restore instead of a source server (see source_dump); empty: the source connection.
    source_dump_uri: str = ""

    @classmethod
    def parse(cls, params: dict[str, Any]) -> MigrationParams:
        def text(key: str, default: str = "") -> str:
            value = params.get(key, default)
            if value is None:
                return default
            if not isinstance(value, str):
                raise ConfigurationError(f"parameter {key} must be a string, got {value!r}")
            return value.strip()

        def choice(key: str, default: str, allowed: list[str]) -> str:
            value = text(key, default) or default
            if value not in allowed:
                raise ConfigurationError(f"parameter {key}={value!r} is not one of {', '.join(allowed)}")
            return value

        def integer(key: str, default: int, low: int, high: int) -> int:
            value = params.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigurationError(f"parameter {key} must be an integer from {low} to {high}, got {value!r}")
            return value

        def patterns(key: str) -> list[str]:
            value = params.get(key) or []
            if isinstance(value, str):  # a single pattern typed into the form
                value = [value]
            if not isinstance(value, list):
                raise ConfigurationError(f"parameter {key} must be a list of namespace patterns, got {value!r}")
            return value

        source, target = text("source_conn_id", "mongo_source"), text("target_conn_id", "atlas_target")
        rehearsal = "rehearsal_db_prefix" in params
        prefix = text("rehearsal_db_prefix") if rehearsal else ""
        if rehearsal:
            import re

            if not re.fullmatch(REHEARSAL_PREFIX_PATTERN, prefix):
                # An empty prefix would make the rehearsal write to the real target namespaces.
                raise ConfigurationError(
                    f"rehearsal_db_prefix={prefix!r} must be 3-24 letters, digits, '_' or '-': the scratch copy "
                    "must never share names with the real target namespaces")
            target = text("rehearsal_target_conn_id") or target
        if not source or not target:
            raise ConfigurationError("source_conn_id and target_conn_id must name Airflow connections")
        if source == target:
            raise ConfigurationError(f"source and target are the same connection ('{source}')")
        staging = text("staging_s3_uri")
        if staging and not staging.startswith("s3://") or staging.rstrip("/") == "s3:/":
            raise ConfigurationError(f"staging_s3_uri must look like s3://bucket/prefix, got {staging!r}")
        source_dump_uri = text("source_dump_uri")
        if source_dump_uri:
            from atlas_migration.source_dump import DumpSource

            DumpSource.parse(source_dump_uri)  # the form only; opening it is the inspection's job
        work_dir = text("work_dir") or os.environ.get("MIGRATION_WORK_DIR") or str(
            Path(os.environ.get("AIRFLOW_HOME", "~/airflow")).expanduser() / "atlas_migration")
        return cls(
            source_conn_id=source,
            target_conn_id=target,
            strategy=choice("strategy", AUTO, STRATEGY_CHOICES),
            dry_run=bool(params.get("dry_run", False)),
            namespaces=NamespaceFilter.from_patterns(patterns("include_namespaces"), patterns("exclude_namespaces")),
            # Scratch namespaces belong to the rehearsal: leftovers of an earlier one are replaced.
            drop_target=rehearsal or bool(params.get("drop_target", False)),
            source_managed_by=choice("source_managed_by", "detect", ["detect", "none", "cloud_manager", "ops_manager"]),
            source_hosting=choice("source_hosting", "detect", ["detect", "other", "atlas_shared_tier", "compose", "aws"]),
            aws_conn_id=text("aws_conn_id"),
            dump_engine=choice("dump_engine", "auto", ["auto", "mongodump", "native"]),
            dump_gzip=bool(params.get("dump_gzip", True)),
            restore_workers=integer("restore_workers", 4, 1, 32),
            batch_size=integer("batch_size", 1000, 10, 100_000),
            work_dir=Path(work_dir),
            staging_s3_uri=staging.rstrip("/"),
            validation_mode=choice("validation_mode", "counts", ["counts", "full"]),
            target_db_prefix=prefix,
            rehearsal=rehearsal,
            source_dump_uri=source_dump_uri,
        )
