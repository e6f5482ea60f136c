"""Assertions shared by integration tests: byte-for-byte comparison of two deployments."""

from __future__ import annotations

from contextlib import contextmanager

from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument

RAW = CodecOptions(document_class=RawBSONDocument)
IGNORED_INDEX_FIELDS = {"v", "ns", "background"}


def raw_documents(client, db: str, coll: str) -> list[bytes]:
    collection = client[db].get_collection(coll, codec_options=RAW)
    return [doc.raw for doc in collection.find({}, sort=[("_id", 1)])]


def index_specs(client, db: str, coll: str) -> dict[str, dict]:
    return {ix["name"]: {k: v for k, v in ix.items() if k not in IGNORED_INDEX_FIELDS}
            for ix in client[db][coll].list_indexes()}


def collection_options(client, db: str) -> dict[str, tuple[str, dict]]:
    return {c["name"]: (c.get("type", "collection"), c.get("options", {})) for c in client[db].list_collections()}


def assert_namespaces_identical(source_client, target_client, namespaces: list[tuple[str, str]]) -> int:
    """Every document (raw BSON bytes, in _id order), index spec and collection option equal. Returns docs compared."""
    compared = 0
    for db, coll in namespaces:
        src_opts, dst_opts = collection_options(source_client, db), collection_options(target_client, db)
        assert coll in dst_opts, f"{db}.{coll} missing in target"
        assert src_opts[coll] == dst_opts[coll], f"{db}.{coll} options differ: {src_opts[coll]} != {dst_opts[coll]}"
        if src_opts[coll][0] == "view":
            continue
        source_docs, target_docs = raw_documents(source_client, db, coll), raw_documents(target_client, db, coll)
        assert len(source_docs) == len(target_docs), f"{db}.{coll}: {len(source_docs)} != {len(target_docs)} documents"
        for i, (a, b) in enumerate(zip(source_docs, target_docs, strict=True)):
            assert a == b, f"{db}.{coll}: document #{i} differs byte-wise"
        assert index_specs(source_client, db, coll) == index_specs(target_client, db, coll), f"{db}.{coll} indexes"
        compared += len(source_docs)
    return compared


def user_namespaces(client) -> list[tuple[str, str]]:
    return sorted(
        (db, name)
        for db in client.list_database_names() if db not in ("admin", "local", "config")
        for name in client[db].list_collection_names() if not name.startswith("system.")
    )


@contextmanager
def write_blocking_source(source):
    """A URI of the source on which setUserWriteBlockMode works: a genuine mongod (6.0+) as it is, the local
    test server behind ``devtools.replica_set_proxy``, which implements the command as mongod documents it."""
    if source.local is None:
        yield source.uri
        return
    from devtools.replica_set_proxy import ReplicaSetProxy

    with ReplicaSetProxy(source.local.port) as proxy:
        yield f"mongodb://{proxy.host}/?directConnection=true"


PROVIDER_DISTRIBUTION = "mongo-to-atlas"
PROVIDER_ENTRY_POINT = "atlas_migration.provider_info:get_provider_info"


def require_provider_distribution() -> None:
    """Fail (never skip) unless the project is installed as a distribution with its provider entry point:
    Airflow discovers providers only through installed distributions, and scripts/bootstrap.sh installs it."""
    from importlib.metadata import PackageNotFoundError, distribution

    how = ("run `make env` (scripts/bootstrap.sh), or `uv pip install --python .venv/bin/python -e .` in the "
           "repository, to install it")
    try:
        dist = distribution(PROVIDER_DISTRIBUTION)
    except PackageNotFoundError:
        raise AssertionError(f"the {PROVIDER_DISTRIBUTION} distribution is not installed: {how}") from None
    points = [ep.value for ep in dist.entry_points if ep.group == "apache_airflow_provider"]
    assert points == [PROVIDER_ENTRY_POINT], (
        f"{PROVIDER_DISTRIBUTION} is installed without its apache_airflow_provider entry point ({points}): {how}")


def peerings_into(ec2, vpc_id: str) -> list[dict]:
    """Every VPC peering connection whose accepter is ``vpc_id``.

    Filtered here, not with ``Filters=``: moto (3.x-5.x) ignores the filters of
    DescribeVpcPeeringConnections and returns every connection of the region, so a filtered call would see
    the connections other tests left in the session's moto server."""
    reply = ec2.describe_vpc_peering_connections()["VpcPeeringConnections"]
    return [p for p in reply if p["AccepterVpcInfo"]["VpcId"] == vpc_id]
