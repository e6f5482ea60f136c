"""The file import path and target-aware routing through the real DAG (`airflow dags test`)."""

from __future__ import annotations

import gzip
import json

import bson
import pytest
from bson import json_util
from bson.raw_bson import RawBSONDocument

from atlas_migration.engines.file_import import _json_options
from devtools.airflow_env import AirflowHome, conn_env_name, mongo_connection_json
from tests.dags.test_mongo_to_atlas import DAG_ID, failure_text, reports_of
from tests.engines.test_file_import import EJSON_LINE, TYPED_CSV

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory) -> AirflowHome:
    home = AirflowHome(tmp_path_factory.mktemp("airflow-home-files"))
    home.migrate()
    return home


def _target_only(target_uri: str, facts: dict | None = None) -> dict[str, str]:
    return {conn_env_name("atlas_target"): mongo_connection_json(target_uri, migration_facts=facts)}


def test_imports_json_lines_array_typed_csv_tsv_and_gzip_in_one_run(airflow_home, target, tmp_path):
    rows = [json.loads(EJSON_LINE)] + [{"_id": {"$oid": f"{i:024x}"}, "n": {"$numberLong": str(i)}} for i in range(1, 300)]
    lines = [EJSON_LINE] + [json.dumps(r) for r in rows[1:]]
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "list.json").write_text('[\n{"a": 1},\n{"b": {"$date": "2021-01-01T00:00:00Z"}}\n]\n')
    (tmp_path / "people.csv").write_text(TYPED_CSV)
    (tmp_path / "cities.tsv").write_text("name\tpop\nParis\t2100000\nOslo\t700000\n")
    (tmp_path / "zipped.csv.gz").write_bytes(gzip.compress(b"k,v.w\n1,x\n2,y\n"))
    conf = {"source_files": [str(tmp_path / "*")], "target_db": "imported", "validation_mode": "full",
            "file_split_bytes": 4096, "file_options": {"people.csv": {"columns_have_types": True,
                                                                      "namespace": "crm.people"}}}
    run = airflow_home.dags_test(DAG_ID, conf, env=_target_only(target.uri))
    assert run.succeeded, failure_text(run)
    assert "strategy: file_import (chosen automatically; rule 'source_files')" in run.output
    assert "events.jsonl" in run.output and "~" in run.output  # inspection's estimate
    with target.client(document_class=RawBSONDocument) as client:
        got = {d["_id"]: d.raw for d in client.imported.events.find({})}
        for line in lines:
            expected = bson.encode(json_util.loads(line, json_options=_json_options()))
            assert got[bson.decode(expected)["_id"]] == expected
        assert len(got) == 300
    with target.client() as client:
        assert client.imported.list.count_documents({}) == 2
        people = {d["_id"]: d for d in client.crm.people.find()}
        assert people[1]["addr"] == {"city": "Paris", "zip": 75001} and people[2]["name"] == "two\nlines"
        assert sorted(d["name"] for d in client.imported.cities.find()) == ["Oslo", "Paris"]
        assert sorted(d["v"]["w"] for d in client.imported.zipped.find()) == ["x", "y"]
    ranges = run.output.count("imported " + str(tmp_path / "events.jsonl") + " range")
    assert ranges > 2, "the JSON Lines file was not split over several mapped tasks"
    report = reports_of(airflow_home, run.output)
    assert report["verdict"] == "PASS" and len(report["namespaces"]) == 5
    assert all(n["digest_expected"] == n["digest_target"] for n in report["namespaces"])


def test_s3_prefix_with_bad_rows_skipped_names_file_and_line_never_values(airflow_home, target, aws_conn):
    import boto3

    from tests.conftest import _aws_client_kwargs

    s3 = boto3.client("s3", **_aws_client_kwargs())
    s3.create_bucket(Bucket="imports", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    s3.put_object(Bucket="imports", Key="drop/a.csv", Body=b"id.int32(),card.string()\n1,ok\nsecret-777,x\n3,ok\n")
    s3.put_object(Bucket="imports", Key="drop/b.jsonl", Body=b'{"x": 1}\n{"x": SECRET-888}\n{"x": 3}\n')
    conf = {"source_files": ["s3://imports/drop/"], "aws_conn_id": "aws_test", "target_db": "s3in",
            "columns_have_types": True, "parse_errors": "skip_row", "file_options": {"*.jsonl": {}}}
    run = airflow_home.dags_test(DAG_ID, conf, env={**_target_only(target.uri), "AIRFLOW_CONN_AWS_TEST": aws_conn})
    assert run.succeeded, failure_text(run)
    report = reports_of(airflow_home, run.output)
    assert {(r["file"], r["line"]) for r in report["rejections"]} == {
        ("s3://imports/drop/a.csv", 3), ("s3://imports/drop/b.jsonl", 2)}
    text = json.dumps(report) + run.output
    assert "secret-777" not in text and "SECRET-888" not in text
    with target.client() as client:
        assert client.s3in.a.count_documents({}) == 2 and client.s3in.b.count_documents({}) == 2


def test_flex_target_auto_picks_mongorestore_and_forced_live_pull_is_refused(airflow_home, source, target):
    with source.client() as client:
        client.shop.orders.insert_one({"_id": 1})
    env = {conn_env_name("mongo_source"): mongo_connection_json(source.uri),
           **_target_only(target.uri, {"tier": "FLEX"})}
    run = airflow_home.dags_test(DAG_ID, {"strategy": "auto", "dry_run": True}, env=env)
    assert run.succeeded, failure_text(run)
    assert "strategy: mongorestore (chosen automatically; rule 'target_restricted')" in run.output
    assert "Atlas FLEX (flex) cluster, which takes data only through self-managed tools" in run.output
    forced = airflow_home.dags_test(DAG_ID, {"strategy": "live_pull", "dry_run": True}, env=env)
    assert forced.state == "failed"
    assert "strategy 'live_pull' cannot migrate source 'mongo_source'" in forced.output
    assert "Atlas FLEX (flex) cluster" in forced.output


def test_upsert_then_merge_into_an_occupied_target_change_only_the_keyed_documents(airflow_home, target, tmp_path):
    # Insert-mode retries are covered in tests/engines/test_file_import.py (the same range imported twice:
    # nothing duplicated, every row counted as already present).
    with target.client() as client:
        client.upmerge.people.insert_many([{"_id": 1, "name": "ann", "age": 30, "city": "Rome"},
                                           {"_id": 2, "name": "bob", "age": 40, "city": "Oslo"},
                                           {"_id": 3, "name": "cid", "age": 50}])
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "people.csv").write_text("name,city\nann,Paris\ndan,Lima\n")
    (tmp_path / "merge").mkdir()
    (tmp_path / "merge" / "people.jsonl").write_text('{"name": "bob", "age": 41}\n{"name": "eve", "age": 22}\n')
    base = {"target_db": "upmerge", "upsert_fields": ["name"], "validation_mode": "counts"}
    for mode, folder in (("upsert", "up"), ("merge", "merge")):
        conf = {**base, "import_mode": mode, "source_files": [str(tmp_path / folder)]}
        run = airflow_home.dags_test(DAG_ID, conf, env=_target_only(target.uri))
        assert run.succeeded, failure_text(run)
        assert reports_of(airflow_home, run.output)["verdict"] == "PASS"
    with target.client() as client:
        people = {d["name"]: d for d in client.upmerge.people.find()}
        client.drop_database("upmerge")
    strip = {name: {k: v for k, v in doc.items() if k != "_id"} for name, doc in people.items()}
    # upsert replaces the whole document (ann loses age, keeps her _id); merge $sets only the file's fields
    # (bob keeps city); unmatched keys are inserted; cid, in neither file, is untouched.
    assert strip == {"ann": {"name": "ann", "city": "Paris"}, "bob": {"name": "bob", "age": 41, "city": "Oslo"},
                     "cid": {"name": "cid", "age": 50}, "dan": {"name": "dan", "city": "Lima"},
                     "eve": {"name": "eve", "age": 22}}
    assert (people["ann"]["_id"], people["bob"]["_id"], people["cid"]["_id"]) == (1, 2, 3)
