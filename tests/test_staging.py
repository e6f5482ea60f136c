"""S3 staging through S3Hook against moto in server mode (real HTTP)."""

from __future__ import annotations

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
