"""route_tasks: the cluster policy that sends the migration's tasks to worker queues (pure; the Celery
test in tests/api/test_celery_workers.py runs it inside Airflow)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from atlas_migration.worker_queues import queue_for, route_tasks


@dataclass
class FakeDag:
    dag_id: str


@dataclass
class FakeTask:
    task_id: str
    dag: FakeDag
    queue: str = "default"


def test_first_matching_pattern_wins_and_others_keep_their_queue():
    routes = {"mongorestore.copy.dump": "near_source", "*.restore": "near_atlas", "*": "elsewhere"}
    assert queue_for("mongorestore.copy.dump", routes) == "near_source"
    assert queue_for("mongorestore.copy.restore", routes) == "near_atlas"
    assert queue_for("inspect", routes) == "elsewhere"
    assert queue_for("inspect", {"*.dump": "x"}) is None


def test_policy_sets_the_queue_of_migration_dags_only():
    policy = route_tasks({"*.dump": "near_source"})
    dump = FakeTask("mongorestore.copy.dump", FakeDag("mongo_to_atlas"))
    other_dag = FakeTask("mongorestore.copy.dump", FakeDag("someone_elses_dag"))
    unmatched = FakeTask("validate", FakeDag("mongo_to_atlas"))
    for task in (dump, other_dag, unmatched):
        policy(task)
    assert (dump.queue, other_dag.queue, unmatched.queue) == ("near_source", "default", "default")
    rehearsal = FakeTask("mongorestore.copy.dump", FakeDag("mongo_to_atlas_rehearsal"))
    policy(rehearsal)
    assert rehearsal.queue == "near_source"


def test_a_pattern_without_a_queue_is_refused():
    with pytest.raises(ValueError, match="needs a queue name"):
        route_tasks({"*.dump": " "})


def test_the_policy_reaches_the_real_dag_s_mapped_tasks():
    from airflow.dag_processing.dagbag import DagBag

    from devtools.airflow_env import REPO

    bag = DagBag(dag_folder=str(REPO / "dags" / "mongo_to_atlas.py"))
    assert not bag.import_errors
    dag = bag.dags["mongo_to_atlas"]
    policy = route_tasks({"mongorestore.copy.dump": "near_source", "mongorestore.copy.restore": "near_atlas"})
    for task in dag.tasks:
        policy(task)
    queues = {t.task_id: t.queue for t in dag.tasks}
    assert queues["mongorestore.copy.dump"] == "near_source"
    assert queues["mongorestore.copy.restore"] == "near_atlas"
    assert queues["inspect_source"] == "default"
