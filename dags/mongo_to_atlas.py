"""
### mongo_to_atlas: migrate a MongoDB deployment into MongoDB Atlas

1. **inspect_source** reads the source (version, FCV, topology, oplog access and window, management,
   hosting, inventory) into a `SourceProfile`.
2. **route** applies MongoDB's guidance (README, "Routing") and explains which rule matched; a forced
   `strategy` that cannot work fails here, before anything is written. `dry_run` stops here.
3. **choose_strategy** branches to exactly one task group per import strategy.
4. **validate** compares every migrated namespace in Atlas with the source and fails on any mismatch;
   **report** prints the outcome and where the JSON / Markdown reports are.

Connections: `mongo_source` and `atlas_target` (type `mongo`), optional AWS connection for EC2 lookup and
S3 staging. The work is done by the `atlas_migration` package in `include/`.
"""

from __future__ import annotations

from airflow.sdk import TriggerRule, dag, task, task_group
from atlas_migration import tasks as steps
from atlas_migration.params import dag_params

# Strategies with a task group in this DAG; routing to any other fails with a clear error.
AVAILABLE_STRATEGIES = frozenset({"mongorestore"})


def _paths(params, dag, run_id) -> steps.RunPaths:
    return steps.run_paths(params, dag.dag_id, run_id)


@dag(
    dag_id="mongo_to_atlas",
    schedule=None,
    catchup=False,
    params=dag_params(),
    doc_md=__doc__,
    tags=["mongodb", "atlas", "migration"],
    max_active_runs=1,
)
def mongo_to_atlas():
    @task
    def inspect_source(params=None) -> dict:
        return steps.inspect(params)

    @task
    def route(profile: dict, params=None) -> dict:
        return steps.route(params, profile, AVAILABLE_STRATEGIES)

    @task.branch
    def choose_strategy(decision: dict) -> str | None:
        return steps.branch(decision)

    @task_group(group_id="mongorestore")
    def mongorestore(profile: dict) -> None:
        """mongodump -> (S3) -> mongorestore, one mapped task per collection, views last."""

        @task
        def prepare(profile: dict, params=None, dag=None, run_id=None) -> list[dict]:
            return steps.prepare_restore(params, profile, _paths(params, dag, run_id))

        @task(retries=2)
        def dump(item: dict, params=None, dag=None, run_id=None) -> dict:
            return steps.dump_namespace(params, item, _paths(params, dag, run_id))

        @task(retries=2)
        def restore(dumped: dict, params=None, dag=None, run_id=None) -> dict:
            return steps.restore_namespace(params, dumped, _paths(params, dag, run_id))

        @task(retries=2)
        def restore_views(profile: dict, params=None, dag=None, run_id=None) -> list[str]:
            return steps.restore_views(params, profile, _paths(params, dag, run_id))

        restored = restore.expand(dumped=dump.expand(item=prepare(profile)))
        restored >> restore_views(profile)

    @task(trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def validate(profile: dict, decision: dict, params=None, dag=None, run_id=None) -> dict:
        return steps.validate(params, profile, decision, _paths(params, dag, run_id))

    @task
    def report(profile: dict, decision: dict, result: dict) -> dict:
        return steps.report(profile, decision, result)

    profile = inspect_source()
    decision = route(profile)
    groups = [mongorestore(profile)]
    choose_strategy(decision) >> groups
    result = validate(profile, decision)
    groups >> result
    report(profile, decision, result)


mongo_to_atlas()
