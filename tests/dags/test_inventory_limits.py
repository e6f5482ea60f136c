"""Inventories larger than Airflow's ``max_map_length``: the DAG batches its mapped tasks instead of failing.

Airflow refuses to map a list longer than ``[core] max_map_length`` and fails the task that returned it,
after its body ran. These runs lower the setting (``AIRFLOW__CORE__MAX_MAP_LENGTH``, read by Airflow itself
when the list is pushed) so that a real run needs batches without thousands of task instances, and check in
the run's metadata database that no mapped task went past it. The batching rule at Airflow's default (1,024)
is unit-tested in ``tests/test_planning.py``.
"""

from __future__ import annotations

import os
import sqlite3

import pytest
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument

from tests.dags.test_mongo_to_atlas import airflow_home, conns, failure_text, reports_of  # noqa: F401 - shared fixture
from tests.helpers import write_blocking_source

pytestmark = pytest.mark.integration
DAG_ID = "mongo_to_atlas"
RAW = CodecOptions(document_class=RawBSONDocument)


def seed_many_collections(client, count: int, per_db: int = 1_000) -> list[tuple[str, str]]:
    """``count`` small collections spread over databases of ``per_db``; a few carry an index of their own."""
    namespaces = []
    for i in range(count):
        db, coll = f"many{i // per_db}", f"c{i:04d}"
        client[db][coll].insert_many([{"_id": j, "v": i * 10 + j, "tag": f"t{j}"} for j in range(1 + i % 3)])
        if i % 250 == 0:
            client[db][coll].create_index("tag", name="tag_1")
        namespaces.append((db, coll))
    return namespaces


def assert_copied(src, dst, namespaces: list[tuple[str, str]]) -> None:
    """Every collection's documents (raw BSON, _id order) and index names equal; one listing per database."""
    for db in sorted({d for d, _ in namespaces}):
        src_indexes = {c["name"]: c for c in src[db].list_collections()}
        dst_indexes = {c["name"]: c for c in dst[db].list_collections()}
        wanted = {c for d, c in namespaces if d == db}
        assert wanted <= set(dst_indexes), f"{db}: {len(wanted - set(dst_indexes))} collection(s) missing"
        for coll in sorted(wanted):
            assert src_indexes[coll].get("options") == dst_indexes[coll].get("options"), f"{db}.{coll} options"
            a = [d.raw for d in src[db].get_collection(coll, codec_options=RAW).find().sort("_id", 1)]
            b = [d.raw for d in dst[db].get_collection(coll, codec_options=RAW).find().sort("_id", 1)]
            assert a == b, f"{db}.{coll} documents differ"
            assert sorted(src[db][coll].index_information()) == sorted(dst[db][coll].index_information()), coll


def mapped_instances(home, task_id: str) -> tuple[int, int]:
    """(task instances, highest map index) of one mapped task in the latest run, from Airflow's own DB."""
    with sqlite3.connect(home.path / "airflow.db") as db:
        run_id = db.execute("SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1",
                            (DAG_ID,)).fetchone()[0]
        return db.execute("SELECT COUNT(*), MAX(map_index) FROM task_instance WHERE dag_id = ? AND run_id = ? "
                          "AND task_id = ?", (DAG_ID, run_id, task_id)).fetchone()


def test_a_2000_collection_restore_maps_batches_within_max_map_length(airflow_home, standalone, target):  # noqa: F811
    with standalone.client() as src:
        namespaces = seed_many_collections(src, 2_000)
    env = {**conns(standalone.uri, target.uri), "AIRFLOW__CORE__MAX_MAP_LENGTH": "40"}
    run = airflow_home.dags_test(DAG_ID, {"strategy": "mongorestore"}, env=env)
    assert run.succeeded, failure_text(run)
    assert ("2000 collections exceed Airflow's max_map_length (40): 40 mapped task instances of 50-50 "
            "collections each") in run.output
    assert mapped_instances(airflow_home, "mongorestore.copy.restore") == (40, 39)
    report = reports_of(airflow_home, run.output)
    assert report["verdict"] == "PASS" and len(report["namespaces"]) == 2_000
    with standalone.client() as src, target.client() as dst:
        assert_copied(src, dst, namespaces)


# Every collection is at least one partition, so N collections plan N partitions. The live pull costs about
# 0.5 s of this machine's CPU per partition (copy, verify, cutover checks, validation on the Python test
# server), so the suite runs 150; MIGRATION_TEST_PULL_COLLECTIONS=1100 runs the case past Airflow's default
# limit of 1,024 (about 10 minutes here).
PULL_COLLECTIONS = int(os.environ.get("MIGRATION_TEST_PULL_COLLECTIONS") or 150)
PULL_MAP_LENGTH = 32 if PULL_COLLECTIONS > 500 else 16


def test_a_live_pull_over_more_partitions_than_max_map_length(airflow_home, source, target):  # noqa: F811
    """copy and verify are both mapped over the partitions: each maps at most max_map_length batches."""
    with source.client() as src:
        namespaces = seed_many_collections(src, PULL_COLLECTIONS)
    with write_blocking_source(source) as source_uri:
        env = {**conns(source_uri, target.uri), "AIRFLOW__CORE__MAX_MAP_LENGTH": str(PULL_MAP_LENGTH),
               "MIGRATION_POKE_INTERVAL_SECONDS": "2"}
        run = airflow_home.dags_test(DAG_ID, {"strategy": "live_pull", "pull_engine": "native", "cutover": "auto",
                                              "quiet_period_seconds": 1}, env=env,
                                     timeout=max(900, PULL_COLLECTIONS * 2))
    assert run.succeeded, failure_text(run)
    low, high = PULL_COLLECTIONS // PULL_MAP_LENGTH, -(-PULL_COLLECTIONS // PULL_MAP_LENGTH)
    assert (f"{PULL_COLLECTIONS} partitions exceed Airflow's max_map_length ({PULL_MAP_LENGTH}): {PULL_MAP_LENGTH} "
            f"mapped task instances of {low}-{high} partitions each") in run.output
    assert mapped_instances(airflow_home, "live_pull.copy") == (PULL_MAP_LENGTH, PULL_MAP_LENGTH - 1)
    assert mapped_instances(airflow_home, "live_pull.verify") == (PULL_MAP_LENGTH, PULL_MAP_LENGTH - 1)
    assert reports_of(airflow_home, run.output)["verdict"] == "PASS"
    with source.client() as src, target.client() as dst:
        assert_copied(src, dst, namespaces)
