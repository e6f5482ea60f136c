"""The compose strategy through the real DAG. No mongos can run here, so the group's own run is covered by
tests/test_compose.py (TLS server, topology and fallback decisions); this checks the DAG's side: the group is
wired, and forcing it on a source that is not a sharded cluster fails in ``route`` before anything is
written, naming the reason."""

from __future__ import annotations

import pytest

from tests.dags.test_mongo_to_atlas import airflow_home, conns, failure_text  # noqa: F401 - shared fixture
from tests.helpers import user_namespaces

pytestmark = pytest.mark.integration
DAG_ID = "mongo_to_atlas"


def test_compose_on_a_replica_set_is_refused_before_writing(airflow_home, source, target):  # noqa: F811
    with source.client() as src:
        src.shop.orders.insert_one({"_id": 1})
    conf = {"strategy": "compose", "source_hosting": "compose", "oplog_conn_id": "compose_oplog",
            "atlas_migration_hosts": ["35.1.2.3"]}
    run = airflow_home.dags_test(DAG_ID, conf, env=conns(source.uri, target.uri))
    assert run.state == "failed", failure_text(run)
    assert "the Compose path needs a sharded cluster behind mongos (topology: replica_set)" in run.output
    with target.client() as dst:
        assert user_namespaces(dst) == []
