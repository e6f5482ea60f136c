"""
### mongo_to_atlas_rehearsal: rehearse the migration on a schedule, into scratch databases

The same flow as `mongo_to_atlas` (inspect, route, migrate, validate), but every target database is
written as `<rehearsal_db_prefix><db>` (optionally on a separate `rehearsal_target_conn_id`), so the real
target namespaces are never touched. Afterwards:

- **record_rehearsal** appends durations per phase, volume, throughput and the verdict to
  `<work_dir>/mongo_to_atlas_rehearsal/history.jsonl` and rewrites `trend.md` next to it (it runs, and
  records, even when the rehearsal failed; then it fails too so the run shows red);
- **cleanup_scratch** (a teardown: runs whatever happened) drops the scratch databases.

Schedule: `$MIGRATION_REHEARSAL_SCHEDULE` (cron or preset; default `@weekly`; `none` to trigger by hand).
"""

from __future__ import annotations

import os

from airflow.sdk import dag

from atlas_migration.dag_params import rehearsal_params
from atlas_migration.deadlines import migration_deadlines
from atlas_migration.flow import migration_flow
from atlas_migration.retry_policy import default_args

_schedule = os.environ.get("MIGRATION_REHEARSAL_SCHEDULE", "@weekly").strip()


@dag(
    dag_id="mongo_to_atlas_rehearsal",
    schedule=None if _schedule.lower() in ("", "none") else _schedule,
    catchup=False,
    params=rehearsal_params(),
    doc_md=__doc__,
    tags=["mongodb", "atlas", "migration", "rehearsal"],
    max_active_runs=1,
    # Certain failures (bad configuration, refused credentials, lost oplog history, a failed validation)
    # fail at once; transient ones keep each task's retries.
    default_args=default_args(),
    # max_run_hours and the live push's cutover window (atlas_migration.deadlines).
    deadline=migration_deadlines(),
)
def mongo_to_atlas_rehearsal():
    migration_flow(rehearsal=True)


mongo_to_atlas_rehearsal()
