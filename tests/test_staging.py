"""S3 staging through S3Hook against moto in server mode (real HTTP)."""

from __future__ import annotations

import re

import pytest

from atlas_migration.errors import ConfigurationError
from atlas_migration.staging import S3Location, Stager

pytestmark = pytest.mark.integration


def test_parse_location():
    assert S3Location.parse("s3://bucket/a/b/") == S3Location("bucket", "a/b")
    assert S3Location.parse("s3://bucket").key("dag", "run/x.bson.gz") == "dag/run/x.bson.gz"
    with pytest.raises(ConfigurationError):
        S3Location.parse("https://bucket/a")
    with pytest.raises(ConfigurationError):
        S3Location.parse("s3:///a")


def test_upload_then_download_round_trip(aws_conn, tmp_path):
    import boto3

    from tests.conftest import _aws_client_kwargs

    boto3.client("s3", **_aws_client_kwargs()).create_bucket(
        Bucket="staging-rt", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    stager = Stager(S3Location.parse("s3://staging-rt/migrations"), "aws_test", "mongo_to_atlas/run_1")
    stager.check_bucket()
    src = tmp_path / "src"
    (src / "shop").mkdir(parents=True)
    payload = bytes(range(256)) * 4000
    (src / "shop" / "orders.bson.gz").write_bytes(payload)
    (src / "shop" / "orders.metadata.json.gz").write_bytes(b"{}")
    uris = stager.upload(src, ["shop/orders.bson.gz", "shop/orders.metadata.json.gz"])
    assert uris == ["s3://staging-rt/migrations/mongo_to_atlas/run_1/shop/orders.bson.gz",
                    "s3://staging-rt/migrations/mongo_to_atlas/run_1/shop/orders.metadata.json.gz"]
    dst = tmp_path / "dst"
    stager.download(dst, ["shop/orders.bson.gz"])
    assert (dst / "shop" / "orders.bson.gz").read_bytes() == payload
    with pytest.raises(ConfigurationError, match="is missing"):
        stager.download(dst, ["shop/nothing.bson.gz"])


def test_missing_bucket_is_a_clear_error(aws_conn):
    stager = Stager(S3Location.parse("s3://no-such-bucket-here/x"), "aws_test", "p")
    with pytest.raises(ConfigurationError, match="'no-such-bucket-here' does not exist"):
        stager.check_bucket()


# ------------------------------------------------------------- dump and restore on two workers, no shared disk
ESCAPED = ["plain", "c++", "sp ace", "données"]


@pytest.fixture
def staging_bucket(aws_conn):
    import boto3

    from tests.conftest import _aws_client_kwargs

    s3 = boto3.client("s3", **_aws_client_kwargs())
    s3.create_bucket(Bucket="two-workers", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    return s3


def _engines() -> list:
    from atlas_migration.engines import mongotools

    return ["native", pytest.param("mongodump", marks=pytest.mark.skipif(
        not mongotools.tools_available(), reason="mongodump/mongorestore (MongoDB Database Tools) are not on PATH"))]


@pytest.mark.parametrize("engine", _engines())
def test_staged_dump_restores_on_another_worker_and_a_missing_file_fails_by_name(
        engine, source, target, staging_bucket, tmp_path, monkeypatch):
    """Dump on worker A, delete A's disk, restore on worker B from S3 alone: every collection, whatever name
    mongodump escapes, arrives; a staged file deleted from S3 fails the restore naming it."""
    import shutil

    from atlas_migration import tasks
    from atlas_migration.errors import MigrationError
    from devtools.airflow_env import conn_env_name, mongo_connection_json

    monkeypatch.setenv(conn_env_name("mongo_source"), mongo_connection_json(source.uri))
    monkeypatch.setenv(conn_env_name("atlas_target"), mongo_connection_json(target.uri))
    params = {"staging_s3_uri": "s3://two-workers/stage", "aws_conn_id": "aws_test"}
    worker_a = tasks.RunPaths(tmp_path / "worker-a", "mongo_to_atlas", "run_1")
    worker_b = tasks.RunPaths(tmp_path / "worker-b", "mongo_to_atlas", "run_1")
    with source.client() as src:
        for i, name in enumerate(ESCAPED):
            src.peer[name].insert_many([{"_id": j, "n": i} for j in range(5 + i)])
    dumped = []
    for name in ESCAPED:
        item = {"db": "peer", "collection": name, "type": "collection", "documents": 0, "size_bytes": 0,
                "target_db": "", "engine": engine, "gzip": True, "replace": True}
        dumped.append(tasks.dump_namespace(params, item, worker_a))
    shutil.rmtree(worker_a.root)  # worker B never sees A's disk
    assert all(d["staged"] and len(d["staged"]) == len(d["files"]) for d in dumped)
    for result in dumped:
        tasks.restore_namespace(params, result, worker_b)
    with target.client() as dst:
        assert {n: dst.peer[n].count_documents({}) for n in ESCAPED} == {n: 5 + i for i, n in enumerate(ESCAPED)}

    # A staged file that is gone: the restore fails naming it, on a worker whose disk does not have it.
    victim = dumped[1]["staged"][0]
    staging_bucket.delete_object(Bucket="two-workers", Key=victim.split("/", 3)[3])
    shutil.rmtree(worker_b.root)
    with pytest.raises(MigrationError, match=re.escape(victim) + " is missing"):
        tasks.restore_namespace(params, dumped[1], worker_b)
