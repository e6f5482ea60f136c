"""The DAG's parameters in their checked, typed form: ``MigrationParams`` (and ``DumpSource``).

The JSON schema on each ``Param`` (the trigger form is built in ``dag_params``) makes the UI and the REST API
refuse invalid values when the run is created; ``MigrationParams.parse`` re-checks what a schema cannot
express (pattern syntax, S3 URIs) before anything touches a server.

Part of the pure core: every strategy module imports ``MigrationParams``, so this module imports none of
them (the form, which gathers each strategy's params, lives above them in ``dag_params``).
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
MAX_PARALLEL_COPIES = 1024  # Airflow's default max_map_length: a larger bound could never be reached


# What ``source_dump_uri`` names (``source_dump.DumpReader`` tells a local folder from an archive file).
FOLDER, ARCHIVE, S3 = "folder", "archive", "s3"


@dataclass(frozen=True)
class DumpSource:
    """Where the user's dump is: ``kind`` is ``folder``/``archive`` (local) or ``s3`` (prefix or object)."""

    uri: str
    kind: str

    @classmethod
    def parse(cls, uri: str) -> DumpSource:
        """Check the form only (no I/O): an ``s3://bucket/key-or-prefix`` or an absolute local path."""
        uri = uri.strip()
        if uri.startswith("s3://"):
            bucket, _, key = uri[5:].partition("/")
            if not bucket or not key.strip("/"):
                raise ConfigurationError(f"source_dump_uri {uri!r} must name a bucket and a prefix or object key")
            return cls(uri.rstrip("/"), S3)
        if "://" in uri or not Path(uri).is_absolute():
            raise ConfigurationError(
                f"source_dump_uri {uri!r} must be an absolute local path (a dump folder or an archive file) or "
                "s3://bucket/prefix"
            )
        return cls(uri, FOLDER)  # folder or archive: told apart when it is opened


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
    # At most this many copy task instances per mapped copy step (mapping.batches_for_mapping); 0: no bound.
    max_parallel_copies: int = 0

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
            max_parallel_copies=integer("max_parallel_copies", 0, 0, MAX_PARALLEL_COPIES),
        )
