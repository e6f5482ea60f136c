"""The mongorestore group's shape: each collection's restore waits for its own dump only (a mapped task
group), so copies overlap; views wait for every collection. Runs are covered by tests/dags/."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder="dags")
    assert not bag.import_errors
    return bag.dags["mongo_to_atlas"]


@pytest.mark.parametrize("group", ["mongorestore", "compose.restore"])
def test_restore_is_mapped_per_collection_with_dump(dag, group):
    from airflow.sdk.definitions.taskgroup import MappedTaskGroup

    copy = dag.task_group_dict[f"{group}.copy"]
    assert isinstance(copy, MappedTaskGroup)
    dump, restore = dag.get_task(f"{group}.copy.dump"), dag.get_task(f"{group}.copy.restore")
    assert restore.upstream_task_ids == {dump.task_id}
    assert dump.upstream_task_ids == {f"{group}.prepare"}
    assert restore.task_id in dag.get_task(f"{group}.restore_views").upstream_task_ids
    assert dump.retries == restore.retries == 2  # both are safe to retry
