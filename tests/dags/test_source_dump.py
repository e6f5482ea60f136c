"""``source_dump_uri`` through the real DAG: a dump written by real mongodump (the shared reference folder,
read in place and never written), an S3 prefix holding it (moto server) and a ``mongodump --archive`` file,
each restored with no source server and validated in full against the dump's own documents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument

from atlas_migration.engines.archive import write_archive
from atlas_migration.engines.dump_layout import find_bson_file, iter_bson_file
from devtools.airflow_env import AirflowHome, conn_env_name, mongo_connection_json

pytestmark = pytest.mark.integration
DAG_ID = "mongo_to_atlas"
RAW = CodecOptions(document_class=RawBSONDocument)
# mongodump 100.9.4 output (13 collections, 2 views); a run takes a part of it to stay fast: dotted, escaped
# and truncated names, a compound/unique-partial/sparse-collation/TTL-indexed collection, a collation
# collection and its view with its own collation. Every collection of it is restored by
# tests/engines/test_reference_dumps.py.
PEER = "mongodump-100.9.4"
SELECTED = ["peer.orders.2024", "peer.sp ace", "peer.c++", "peer.L*", "peer.fr_*"]
PEER_COLLECTIONS = ["orders.2024", "sp ace", "c++", "L" + "é" * 110, "fr_coll"]


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory) -> AirflowHome:
    home = AirflowHome(tmp_path_factory.mktemp("airflow-home"))
    home.migrate()
    return home


def _run(home: AirflowHome, target, conf: dict, **env: str):
    # No source connection at all: the dump is the source.
    env = {conn_env_name("atlas_target"): mongo_connection_json(target.uri), **env}
    run = home.dags_test(DAG_ID, {"validation_mode": "full", "include_namespaces": SELECTED, **conf}, env=env)
    errors = [line for line in run.output.splitlines() if "Error" in line or "error" in line][:40]
    assert run.succeeded, f"state={run.state}\n" + "\n".join(errors) + "\n" + run.output[-3000:]
    reports = sorted((home.path / "migration-work" / DAG_ID).glob("*/report/validation.json"),
                     key=lambda p: p.stat().st_mtime)
    return json.loads(reports[-1].read_text())


def _assert_restored(report: dict, target, dump_root: Path) -> None:
    assert report["verdict"] == "PASS" and report["mode"] == "full"
    results = {r["namespace"]: r for r in report["namespaces"]}
    assert sorted(results) == sorted(f"peer.{n}" for n in [*PEER_COLLECTIONS, "fr_view"])
    assert results["peer.orders.2024"]["source"]["digest"] == results["peer.orders.2024"]["target"]["digest"]
    with target.client() as dst:
        for name in PEER_COLLECTIONS:
            raw = dst.peer.get_collection(name, codec_options=RAW)
            assert sorted(bytes(d.raw) for d in raw.find()) == sorted(iter_bson_file(find_bson_file(dump_root, "peer", name)))
        assert next(dst.peer.list_collections(filter={"name": "fr_view"}))["type"] == "view"


def test_restore_from_a_local_dump_folder(airflow_home, target, mongodump_fixtures):
    dump = mongodump_fixtures / PEER / "plain"
    report = _run(airflow_home, target, {"source_dump_uri": str(dump)})
    _assert_restored(report, target, dump)


def test_restore_from_an_s3_prefix(airflow_home, target, mongodump_fixtures, aws_conn):
    import boto3

    from tests.conftest import _aws_client_kwargs

    s3 = boto3.client("s3", **_aws_client_kwargs())
    s3.create_bucket(Bucket="user-dumps", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    dump = mongodump_fixtures / PEER / "gzip"
    for path in dump.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "user-dumps", f"backups/peer/{path.relative_to(dump).as_posix()}")
    report = _run(airflow_home, target, {"source_dump_uri": "s3://user-dumps/backups/peer", "aws_conn_id": "aws_test"},
                  AIRFLOW_CONN_AWS_TEST=aws_conn)
    _assert_restored(report, target, dump)


def test_restore_from_an_archive_file(airflow_home, target, mongodump_fixtures, tmp_path):
    dump = mongodump_fixtures / PEER / "gzip"
    archive = write_archive(dump, tmp_path / "peer.archive.gz", gzip=True, server_version="8.2.11",
                            tool_version="100.9.4")
    report = _run(airflow_home, target, {"source_dump_uri": str(archive), "exclude_namespaces": ["peer.fr_view"]})
    # The exclusion holds: the view is neither validated nor created.
    assert report["verdict"] == "PASS" and len(report["namespaces"]) == 5
    with target.client() as dst:
        assert "fr_view" not in dst.peer.list_collection_names()
        for name in PEER_COLLECTIONS:
            restored = sorted(bytes(d.raw) for d in dst.peer.get_collection(name, codec_options=RAW).find())
            assert restored == sorted(iter_bson_file(find_bson_file(dump, "peer", name)))
