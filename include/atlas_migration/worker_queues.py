"""Send the migration's tasks to worker queues without editing the DAG: an Airflow cluster policy.

On Celery (or any executor with queues) the workers that can reach the source are often not the ones
that should write to Atlas: the source sits in a private network, Atlas is reached from the cloud. A
``task_policy`` in ``airflow_local_settings.py`` sets each task's ``queue`` when the DAG is parsed, so the
routing is the deployment's business, not the DAG file's:

    # $AIRFLOW_HOME/config/airflow_local_settings.py
    from atlas_migration.worker_queues import route_tasks

    task_policy = route_tasks({
        "mongorestore.copy.dump": "near_source",      # reads the source
        "mongorestore.copy.restore": "near_atlas",     # writes the target
    })

Patterns are ``fnmatch`` patterns on task ids (``"*.dump"``); the first matching pattern wins; tasks that
match none keep their queue (``[operators] default_queue``). Only the DAGs named in ``dag_ids`` are touched.
Dump and restore on different workers need ``staging_s3_uri`` (no shared disk): see README "Running on
Celery or Kubernetes".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Any

MIGRATION_DAG_IDS = ("mongo_to_atlas", "mongo_to_atlas_rehearsal")


def queue_for(task_id: str, routes: Mapping[str, str]) -> str | None:
    """The queue of the first pattern in ``routes`` that matches ``task_id``, or None."""
    for pattern, queue in routes.items():
        if fnmatchcase(task_id, pattern):
            return queue
    return None


def route_tasks(routes: Mapping[str, str], dag_ids: Iterable[str] = MIGRATION_DAG_IDS) -> Callable[[Any], None]:
    """A ``task_policy`` that puts the tasks of ``dag_ids`` matching a pattern of ``routes`` on its queue."""
    routes = dict(routes)
    for pattern, queue in routes.items():
        if not isinstance(queue, str) or not queue.strip():
            raise ValueError(f"task pattern {pattern!r} needs a queue name, not {queue!r}")
    wanted = frozenset(dag_ids)

    def task_policy(task: Any) -> None:
        dag_id = getattr(getattr(task, "dag", None), "dag_id", None) or getattr(task, "dag_id", None)
        if dag_id not in wanted:
            return
        queue = queue_for(task.task_id, routes)
        if queue is not None:
            task.queue = queue

    return task_policy
