"""Safe by default, through the real DAG: names the driver refuses are refused by name before anything is
written."""

from __future__ import annotations

import pytest

from tests.dags.test_mongo_to_atlas import airflow_home, conns, failure_text  # noqa: F401 - shared fixture
from tests.helpers import user_namespaces
from tests.test_inspection import create_refused_names, remove_refused_database

pytestmark = pytest.mark.integration
DAG_ID = "mongo_to_atlas"


def test_names_the_driver_refuses_fail_the_run_by_name_before_writing(airflow_home, standalone, target):  # noqa: F811
    with standalone.client() as src:
        src.shop.orders.insert_many([{"_id": i} for i in range(10)])
        bad_db = create_refused_names(src)
    try:
        run = airflow_home.dags_test(DAG_ID, {"strategy": "mongorestore"}, env=conns(standalone.uri, target.uri))
    finally:
        with standalone.client() as src:
            remove_refused_database(src, bad_db)
    assert run.state == "failed", failure_text(run)
    assert "namespace 'shop.a/../escape' (the driver refuses the collection name" in run.output, failure_text(run)
    assert "(the name contains '..')" in run.output and "exclude them with exclude_namespaces" in run.output
    if bad_db:
        assert "database 'bad db' (the driver refuses the database name" in run.output
    with target.client() as dst:
        assert user_namespaces(dst) == []
