"""The trigger form of both DAGs: every ``Param``, the core sections and each strategy's own, in form order.

This module sits above the strategy modules (it gathers their param builders), so that ``params`` -- the
core's ``MigrationParams`` and its parsing, which every strategy imports -- imports none of them. The DAG
files call ``dag_params`` / ``rehearsal_params`` here; ``airflow.sdk.Param`` is imported inside the
functions, and the strategy modules imported below are the ones ``flow`` imports at parse time anyway.
"""

from __future__ import annotations

from typing import Any

from atlas_migration.deadlines import MAX_RUN_HOURS_LIMIT
from atlas_migration.params import (
    DEFAULT_REHEARSAL_PREFIX,
    MAX_PARALLEL_COPIES,
    REHEARSAL_PREFIX_PATTERN,
    STRATEGY_CHOICES,
)
from atlas_migration.routing import AUTO
from atlas_migration.strategies.aws_replica_set import aws_params
from atlas_migration.strategies.compose import compose_params
from atlas_migration.strategies.file_import import file_import_params
from atlas_migration.strategies.live_pull import live_pull_params
from atlas_migration.strategies.live_push import live_push_params

# Every Param names the JSON Schema draft its schema is written in. Airflow validates each Param with
# ``jsonschema.validate`` whenever it serializes a task (every task carries all the DAG's params), and that
# call first checks the schema against its metaschema: draft 2020-12's (the default when none is named)
# costs about 4x draft-07's. With ~70 params on ~80 tasks per DAG, that was most of the CPU of parsing
# this DAG folder (dag-processor, scheduler, `airflow dags test`). The schemas use draft-07 keywords only.
JSON_SCHEMA_DRAFT = "http://json-schema.org/draft-07/schema#"


def with_schema_draft(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with ``$schema`` set on each Param's schema (see ``JSON_SCHEMA_DRAFT``)."""
    for param in params.values():
        param.schema.setdefault("$schema", JSON_SCHEMA_DRAFT)
    return params


def dag_params() -> dict[str, Any]:
    """``Param`` objects for the trigger form, grouped in sections."""
    return with_schema_draft(_dag_params())


def _dag_params() -> dict[str, Any]:
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
            max_run_hours=Param(0, type="number", minimum=0, maximum=MAX_RUN_HOURS_LIMIT, title="Deadline alert (hours)",
                                description="Airflow raises a deadline alert (a warning from the triggerer, or your "
                                            "notifier) when the run is still going this many hours after it was "
                                            "queued. 0: none. Live pushes are also warned 24 hours before Atlas's "
                                            "120-hour cutover window can end."),
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
                                              "--numInsertionWorkersPerCollection), and per partition in the live "
                                              "pull's initial copy. Capped collections use one."),
            batch_size=Param(1000, type="integer", minimum=10, maximum=100_000, title="Documents per batch",
                             description="Documents per read and insert batch; batches are also bounded in bytes, "
                                         "so memory stays bounded whatever the document size."),
            max_parallel_copies=Param(0, type="integer", minimum=0, maximum=MAX_PARALLEL_COPIES,
                                      title="Parallel copy tasks",
                                      description="At most this many copy tasks of this run at once (dumps, "
                                                  "restores, live-pull partitions, file ranges): each works "
                                                  "through its share in turn, so a fleet of workers cannot "
                                                  "overload a production source. 0: no bound of its own "
                                                  "(Airflow's parallelism, pools and max_map_length apply)."),
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
        **live_pull_params(),
        **compose_params(),
        **aws_params(),
        **live_push_params(),
        **file_import_params(),
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
    return with_schema_draft(params)
