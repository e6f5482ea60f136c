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


@pytest.mark.integration
def test_a_batch_dumps_and_restores_over_one_connection_each_side(source, target, tmp_path, monkeypatch):
    """A mapped instance holds a batch of collections: one source and one target connection serve the whole
    batch (a TLS handshake and authentication per collection would dominate against a remote Atlas)."""
    from atlas_migration import tasks
    from atlas_migration.hooks.mongo import MongoEndpoint
    from devtools.airflow_env import conn_env_name, mongo_connection_json

    monkeypatch.setenv(conn_env_name("mongo_source"), mongo_connection_json(source.uri))
    monkeypatch.setenv(conn_env_name("atlas_target"), mongo_connection_json(target.uri))
    connected: list[str] = []
    real_connect = MongoEndpoint.connect

    def counting_connect(self, *args, **kwargs):
        connected.append(self.role)
        return real_connect(self, *args, **kwargs)

    monkeypatch.setattr(MongoEndpoint, "connect", counting_connect)
    names = [f"c{i}" for i in range(6)]
    with source.client() as src:
        for i, name in enumerate(names):
            src.batch[name].insert_many([{"_id": j, "n": i} for j in range(3 + i)])
    paths = tasks.RunPaths(tmp_path, "mongo_to_atlas", "run_1")
    items = [{"db": "batch", "collection": name, "type": "collection", "documents": 3 + i, "size_bytes": 0,
              "target_db": "", "engine": "native", "gzip": True, "replace": True} for i, name in enumerate(names)]
    dumped = tasks.dump_namespaces({}, items, paths)
    restored = tasks.restore_namespaces({}, dumped, paths)
    assert connected == ["source", "target"]
    assert [r["documents"] for r in restored] == [3 + i for i in range(6)]
    with target.client() as dst:
        assert {n: dst.batch[n].count_documents({}) for n in names} == {n: 3 + i for i, n in enumerate(names)}


@pytest.mark.integration
def test_a_restore_on_a_worker_without_the_dump_fails_before_touching_the_target(source, target, tmp_path,
                                                                                 monkeypatch):
    """Dump and restore on two workers without staging_s3_uri or a shared folder: the restore names the
    missing files and the way out, and the target's collection (which a replace would drop) is untouched."""
    from atlas_migration import tasks
    from atlas_migration.errors import MigrationError
    from devtools.airflow_env import conn_env_name, mongo_connection_json

    monkeypatch.setenv(conn_env_name("mongo_source"), mongo_connection_json(source.uri))
    monkeypatch.setenv(conn_env_name("atlas_target"), mongo_connection_json(target.uri))
    with source.client() as src, target.client() as dst:
        src.shop.orders.insert_many([{"_id": i} for i in range(5)])
        dst.shop.orders.insert_one({"_id": "kept"})
    item = {"db": "shop", "collection": "orders", "type": "collection", "documents": 5, "size_bytes": 0,
            "target_db": "", "engine": "native", "gzip": True, "replace": True}
    dumped = tasks.dump_namespaces({}, [item], tasks.RunPaths(tmp_path / "worker-a", "mongo_to_atlas", "run_1"))
    with pytest.raises(MigrationError) as refused:
        tasks.restore_namespaces({}, dumped, tasks.RunPaths(tmp_path / "worker-b", "mongo_to_atlas", "run_1"))
    message = str(refused.value)
    assert "the dump of shop.orders is not in this worker's folder" in message
    assert "orders.bson.gz" in message and "staging_s3_uri" in message
    with target.client() as dst:
        assert list(dst.shop.orders.find()) == [{"_id": "kept"}]
