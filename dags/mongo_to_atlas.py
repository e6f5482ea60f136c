"""
### mongo_to_atlas: migrate a MongoDB deployment into MongoDB Atlas

1. **inspect_source** reads the source (version, FCV, topology, oplog access and window, management,
   hosting, inventory) into a `SourceProfile`.
2. **route** applies MongoDB's guidance (README, "Routing") and explains which rule matched; a forced
   `strategy` that cannot work fails here, before anything is written. `dry_run` stops here.
3. **choose_strategy** branches to exactly one task group per import strategy (`mongorestore`: dump,
   optionally staged through S3, and restore, one mapped task per collection, views last).
4. **validate** compares every migrated namespace in Atlas with the source and fails on any mismatch;
   **report** prints the outcome and where the JSON / Markdown reports are.

Connections: `mongo_source` and `atlas_target` (type `mongo`), optional AWS connection for EC2 lookup and
S3 staging. The flow is `atlas_migration.flow.migration_flow` (shared with `mongo_to_atlas_rehearsal`).
"""

from __future__ import annotations

from airflow.sdk import dag

from atlas_migration.dag_params import dag_params
from atlas_migration.deadlines import migration_deadlines
from atlas_migration.flow import migration_flow
from atlas_migration.retry_policy import default_args


@dag(
    dag_id="mongo_to_atlas",
    schedule=None,
    catchup=False,
    params=dag_params(),
    doc_md=__doc__,
    tags=["mongodb", "atlas", "migration"],
    max_active_runs=1,
    # Certain failures (bad configuration, refused credentials, lost oplog history, a failed validation)
    # fail at once; transient ones keep each task's retries.
    default_args=default_args(),
    # max_run_hours and the live push's cutover window (atlas_migration.deadlines).
    deadline=migration_deadlines(),
)
def mongo_to_atlas():
    migration_flow()


mongo_to_atlas()
