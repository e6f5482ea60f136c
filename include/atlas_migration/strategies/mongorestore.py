"""The ``mongorestore`` strategy's tasks: dump each collection, restore it into Atlas, views last.

    prepare (target checks, one item per collection)
      -> copy[i]: dump -> restore      (a mapped task group: one instance per collection; beyond Airflow's
                                        max_map_length, one per batch of collections)
      -> restore_views                 (after every collection: a view needs its source collection)

Each collection's restore starts as soon as ITS dump is done (a mapped task group orders ``dump[i] ->
restore[i]`` only), so one collection is restored while the next is still being dumped; with the dumps first
and the restores after them all, a copy took the sum of both phases. Both tasks are safe to retry: a dump is
written to a partial file and renamed, a restore drops (or empties) what an earlier attempt wrote.

The task bodies live in ``tasks``; the Compose path adds these same tasks for its fallback.
"""

from __future__ import annotations

from airflow.sdk import task, task_group

from atlas_migration import tasks as steps

GROUP_ID = "mongorestore"


def _paths(params, dag, run_id) -> steps.RunPaths:
    return steps.run_paths(params, dag.dag_id, run_id)


def add_restore_tasks(profile) -> None:
    """Add ``prepare`` -> mapped ``copy`` (``dump`` -> ``restore``) -> ``restore_views`` to the task group
    being built."""

    @task
    def prepare(profile: dict, params=None, dag=None, run_id=None) -> list[list[dict]]:
        from atlas_migration.mapping import batches_for_mapping, max_parallel_copies

        return batches_for_mapping(steps.prepare_restore(params, profile, _paths(params, dag, run_id)), "collections",
                                   max_parallel_copies(params))

    @task(retries=2)
    def dump(items: list[dict], params=None, dag=None, run_id=None) -> list[dict]:
        return steps.dump_namespaces(params, items, _paths(params, dag, run_id))

    @task(retries=2)
    def restore(dumped: list[dict], params=None, dag=None, run_id=None) -> list[dict]:
        return steps.restore_namespaces(params, dumped, _paths(params, dag, run_id))

    @task_group(group_id="copy")
    def copy(items) -> None:
        restore(dump(items))

    @task(retries=2)
    def restore_views(profile: dict, params=None, dag=None, run_id=None) -> list[str]:
        return steps.restore_views(params, profile, _paths(params, dag, run_id))

    copy.expand(items=prepare(profile)) >> restore_views(profile)


@task_group(group_id=GROUP_ID)
def mongorestore_group(profile) -> None:
    """mongodump -> (S3) -> mongorestore, per collection, views last."""
    add_restore_tasks(profile)
