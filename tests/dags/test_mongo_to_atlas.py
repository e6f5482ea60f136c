"""The real DAG, run with `airflow dags test` against real server processes.

Each test runs the whole flow in a subprocess with connections given as AIRFLOW_CONN_* variables, then
checks the target (raw BSON, indexes, options), the reports and the logs.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path

import pytest

from devtools.airflow_env import AirflowHome, conn_env_name, mongo_connection_json
from devtools.mongo_servers import start_server
from devtools.sample_data import seed_sample_dataset
from tests.helpers import assert_namespaces_identical, user_namespaces, write_blocking_source

pytestmark = pytest.mark.integration
DAG_ID = "mongo_to_atlas"


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory) -> AirflowHome:
    home = AirflowHome(tmp_path_factory.mktemp("airflow-home"))
    home.migrate()
    return home


def conns(source_uri: str, target_uri: str, **extra: str) -> dict[str, str]:
    return {conn_env_name("mongo_source"): mongo_connection_json(source_uri),
            conn_env_name("atlas_target"): mongo_connection_json(target_uri), **extra}


def reports_of(home: AirflowHome, run_output: str) -> dict:
    paths = sorted((home.path / "migration-work" / DAG_ID).glob("*/report/validation.json"),
                   key=lambda p: p.stat().st_mtime)
    assert paths, "no validation report written\n" + run_output[-3000:]
    return json.loads(paths[-1].read_text())


def failure_text(run) -> str:
    dump = os.environ.get("MIGRATION_TEST_RUN_OUTPUT")  # a file to keep the whole output of a failed run in
    if dump and run is not None:
        Path(dump).write_text(run.output)
    # The tail alone often shows only the skips that follow a failure: put the error lines first.
    errors = [line[:600] for line in run.output.splitlines()
              if re.search(r"\[error|ERROR|Traceback|Error: |Exception: |Task failed", line)]
    return (f"state={run.state}\nerror lines ({len(errors)}, first 40):\n" + "\n".join(errors[:40])
            + f"\n--- last 4000 characters ---\n{run.output[-4000:]}")


def test_auto_routes_standalone_to_mongorestore_and_copies_everything(airflow_home, standalone, target):
    with standalone.client() as src:
        seed_sample_dataset(src, scale=0.1)
    # max_parallel_copies=3: the collections are dealt to three dump -> restore task instances.
    run = airflow_home.dags_test(DAG_ID, {"strategy": "auto", "validation_mode": "full", "max_parallel_copies": 3},
                                 env=conns(standalone.uri, target.uri))
    assert run.succeeded, failure_text(run)
    assert "strategy: mongorestore (chosen automatically; rule 'no_oplog')" in run.output
    assert re.search(r"\d+ collections exceed max_parallel_copies=3: 3 mapped task instances", run.output)
    assert len(set(re.findall(r"task_id=mongorestore\.copy\.dump map_index=(\d+)", run.output))) == 3
    with standalone.client() as src, target.client() as dst:
        namespaces = user_namespaces(src)
        assert len(namespaces) == 10 and user_namespaces(dst) == namespaces
        assert assert_namespaces_identical(src, dst, namespaces) == 10_000
        assert dst.shop.paid_orders.count_documents({}) == src.shop.paid_orders.count_documents({}) > 0
    report = reports_of(airflow_home, run.output)
    assert report["verdict"] == "PASS"
    assert len(report["namespaces"]) == 10


def test_include_exclude_and_forced_strategy(airflow_home, source, target):
    with source.client() as src:
        seed_sample_dataset(src, scale=0.02)
    conf = {"strategy": "mongorestore", "include_namespaces": ["shop.*", "analytics.daily.*"],
            "exclude_namespaces": ["shop.customers"], "dump_gzip": False}
    run = airflow_home.dags_test(DAG_ID, conf, env=conns(source.uri, target.uri))
    assert run.succeeded, failure_text(run)
    assert "rule 'override'" in run.output and "stop application writes" in run.output
    # dump_gzip=false: plain mongodump files (the other tests dump with gzip, the default).
    run_dir = max((airflow_home.path / "migration-work" / DAG_ID).glob("*/dump"), key=lambda p: p.stat().st_mtime)
    dumped = sorted(p.name for p in (run_dir / "shop").iterdir())
    assert "orders.bson" in dumped and "orders.metadata.json" in dumped and not any(n.endswith(".gz") for n in dumped)
    with source.client() as src, target.client() as dst:
        expected = [("analytics", "daily.rollups"), ("shop", "events_log"), ("shop", "orders"), ("shop", "paid_orders")]
        assert user_namespaces(dst) == expected
        assert_namespaces_identical(src, dst, expected)


def test_auto_on_replica_set_routes_to_live_pull(airflow_home, source, target):
    with source.client() as src:
        src.shop.orders.insert_many([{"_id": i, "v": i} for i in range(200)])
    # cutover=auto blocks user writes on the source at the fence: the test server needs the proxy for that.
    with write_blocking_source(source) as source_uri:
        run = airflow_home.dags_test(DAG_ID, {"cutover": "auto", "quiet_period_seconds": 1},
                                     env={**conns(source_uri, target.uri), "MIGRATION_POKE_INTERVAL_SECONDS": "2"})
    assert run.succeeded, failure_text(run)
    assert "strategy: live_pull (chosen automatically; rule 'default')" in run.output
    with source.client() as src, target.client() as dst:
        assert_namespaces_identical(src, dst, [("shop", "orders")])


def test_impossible_override_fails_before_writing(airflow_home, standalone, target):
    with standalone.client() as src:
        src.shop.orders.insert_one({"_id": 1})
    run = airflow_home.dags_test(DAG_ID, {"strategy": "live_pull"}, env=conns(standalone.uri, target.uri))
    assert run.state == "failed"
    assert "strategy 'live_pull' cannot migrate source 'mongo_source'" in run.output
    assert "standalone server has no oplog" in run.output
    with target.client() as dst:
        assert user_namespaces(dst) == []


def test_dry_run_prints_the_plan_and_writes_nothing(airflow_home, standalone, target):
    with standalone.client() as src:
        seed_sample_dataset(src, scale=0.01)
    run = airflow_home.dags_test(DAG_ID, {"dry_run": True}, env=conns(standalone.uri, target.uri))
    assert run.succeeded, failure_text(run)
    assert "Dry run: stopping after inspection and routing" in run.output
    assert "Copy plan" in run.output and "shop.orders" in run.output
    with target.client() as dst:
        assert user_namespaces(dst) == []


def test_non_empty_target_is_refused_then_replaced_with_drop_target(airflow_home, standalone, target):
    with standalone.client() as src:
        src.shop.orders.insert_many([{"_id": i, "v": "source"} for i in range(20)])
        src.shop.customers.insert_many([{"_id": i} for i in range(5)])
    with target.client() as dst:
        dst.shop.orders.insert_one({"_id": "keep-me", "v": "target"})
    env = conns(standalone.uri, target.uri)
    run = airflow_home.dags_test(DAG_ID, {"strategy": "mongorestore"}, env=env)
    assert run.state == "failed"
    assert "target namespace(s) on 'atlas_target' already hold data: shop.orders" in run.output
    with target.client() as dst:
        # Refused before anything was written: not even the other, empty namespace was created.
        assert list(dst.shop.orders.find()) == [{"_id": "keep-me", "v": "target"}]
        assert "customers" not in dst.shop.list_collection_names()

    run = airflow_home.dags_test(DAG_ID, {"strategy": "mongorestore", "drop_target": True}, env=env)
    assert run.succeeded, failure_text(run)
    with standalone.client() as src, target.client() as dst:
        assert_namespaces_identical(src, dst, [("shop", "orders"), ("shop", "customers")])


def test_forced_mismatch_makes_validate_fail(airflow_home, standalone, target):
    """An operator pre-created the (empty) target collection with a validator the source does not have:
    the restore fills it in place, and validation must catch the option difference and fail the run."""
    with standalone.client() as src:
        src.shop.orders.insert_many([{"_id": i} for i in range(50)])
        src.shop.customers.insert_many([{"_id": i} for i in range(5)])
    with target.client() as dst:
        dst.shop.create_collection("orders", validator={"$jsonSchema": {"required": ["customerId"]}})
    run = airflow_home.dags_test(DAG_ID, {"strategy": "mongorestore"}, env=conns(standalone.uri, target.uri))
    assert run.state == "failed", failure_text(run)
    assert "ValidationFailed" in run.output and "shop.orders" in run.output
    report = reports_of(airflow_home, run.output)
    assert report["verdict"] == "FAIL"
    by_ns = {r["namespace"]: r for r in report["namespaces"]}
    assert by_ns["shop.orders"]["status"] != "match" and by_ns["shop.customers"]["status"] == "match"


def test_missing_connection_fails_first(airflow_home, standalone, target):
    env = {conn_env_name("mongo_source"): mongo_connection_json(standalone.uri)}
    run = airflow_home.dags_test(DAG_ID, {}, env=env)
    assert run.state == "failed"
    assert "Airflow connection 'atlas_target' (target) is not defined" in run.output


def test_malformed_target_address_fails_before_writing(airflow_home, standalone, target):
    with standalone.client() as src:
        src.shop.orders.insert_one({"_id": 1})
    secret = "Sup3r-s3cret-pw"
    bad = json.dumps({"conn_type": "mongo", "host": "127.0.0.1:notaport", "login": "u", "password": secret})
    env = conns(standalone.uri, target.uri, **{conn_env_name("atlas_target"): bad})
    run = airflow_home.dags_test(DAG_ID, {"strategy": "mongorestore"}, env=env)
    assert run.state == "failed"
    assert "does not describe a valid MongoDB address" in run.output
    assert secret not in run.output


@pytest.fixture
def auth_pair(tmp_path):
    users = [{"user": "migrator", "pwd": "Src-Pa55:w/rd!", "roles": ["root"]}]
    source = start_server(tmp_path / "src", standalone=True, users=users)
    target = start_server(tmp_path / "dst", users=[{"user": "atlas", "pwd": "Tgt-Pa55@w?rd", "roles": ["root"]}])
    yield source, target
    source.destroy()
    target.destroy()


def test_no_credential_in_logs_xcom_or_report(airflow_home, auth_pair):
    source, target = auth_pair
    source_uri, target_uri = source.uri_for("migrator", "Src-Pa55:w/rd!"), target.uri_for("atlas", "Tgt-Pa55@w?rd")
    import pymongo

    with pymongo.MongoClient(source_uri) as src:
        seed_sample_dataset(src, scale=0.01)
    run = airflow_home.dags_test(DAG_ID, {"strategy": "mongorestore"}, env=conns(source_uri, target_uri))
    assert run.succeeded, failure_text(run)
    secrets = ["Src-Pa55:w/rd!", "Tgt-Pa55@w?rd", "Src-Pa55%3Aw%2Frd%21", "Tgt-Pa55%40w%3Frd"]
    places = {"dags test output": run.output}
    for path in [*airflow_home.path.rglob("*.log"), *(airflow_home.path / "migration-work").rglob("*.json"),
                 *(airflow_home.path / "migration-work").rglob("*.md")]:
        places[str(path)] = path.read_text(errors="replace")
    with sqlite3.connect(airflow_home.path / "airflow.db") as db:
        rows = db.execute("SELECT task_id, value FROM xcom").fetchall()
    assert rows, "expected XCom rows from the run"
    places["xcom"] = "\n".join(str(v) for _, v in rows)
    for where, text in places.items():
        for secret in secrets:
            assert secret not in text, f"credential leaked into {where}"
    with pymongo.MongoClient(source_uri) as src, pymongo.MongoClient(target_uri) as dst:
        assert_namespaces_identical(src, dst, user_namespaces(src))


def test_report_is_readable(airflow_home, standalone, target):
    with standalone.client() as src:
        seed_sample_dataset(src, scale=0.01)
    run = airflow_home.dags_test(DAG_ID, {}, env=conns(standalone.uri, target.uri))
    assert run.succeeded, failure_text(run)
    md = sorted(Path(airflow_home.path / "migration-work" / DAG_ID).glob("*/report/validation.md"),
                key=lambda p: p.stat().st_mtime)[-1].read_text()
    assert "PASS" in md and "shop.orders" in md and "analytics.daily.rollups" in md


def test_dumps_and_reports_are_staged_through_s3(airflow_home, standalone, target, aws_conn):
    import boto3

    from tests.conftest import _aws_client_kwargs

    s3 = boto3.client("s3", **_aws_client_kwargs())
    s3.create_bucket(Bucket="migration-staging", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    with standalone.client() as src:
        seed_sample_dataset(src, scale=0.01)
    env = conns(standalone.uri, target.uri, AIRFLOW_CONN_AWS_TEST=aws_conn)
    conf = {"staging_s3_uri": "s3://migration-staging/atlas", "aws_conn_id": "aws_test",
            "include_namespaces": ["shop.*"]}
    run = airflow_home.dags_test(DAG_ID, conf, env=env)
    assert run.succeeded, failure_text(run)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="migration-staging", Prefix="atlas/")["Contents"]]
    assert all(k.startswith(f"atlas/{DAG_ID}/") for k in keys)
    names = {k.split("/", 3)[3] for k in keys}
    assert {"dump/shop/orders.bson.gz", "dump/shop/orders.metadata.json.gz", "dump/shop/customers.bson.gz",
            "report/validation.json", "report/validation.md"} <= names
    with standalone.client() as src, target.client() as dst:
        assert_namespaces_identical(src, dst, [("shop", "orders"), ("shop", "customers"), ("shop", "events_log"),
                                               ("shop", "paid_orders")])
