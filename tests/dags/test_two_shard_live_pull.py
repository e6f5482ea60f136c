"""A two-shard source migrated by live pull through the real DAG (``airflow dags test``).

The source is ``devtools.sharded_cluster.ShardedCluster``, a routing mongos stand-in in front of two shards,
each a SecantusDB replica set behind its own ``ReplicaSetProxy`` (so each shard has write blocking and
``appendOplogNote``, as a real shard has) and writing periodic no-ops (mongod's ``periodicNoopIntervalSecs``)
so an idle shard does not hold back the merged change stream. ``shop.orders`` is sharded on ``_id`` in three
chunks over both shards; ``shop.customers`` and the view ``shop.recent`` are unsharded and live on the
database's primary shard. Inspection measures both shards' oplog windows (the smallest decides), an
application keeps writing through the router until the automatic cutover blocks its writes on both shards,
and the target equals the source exactly.
"""

from __future__ import annotations

import re

import pytest

from devtools.mongo_servers import start_server
from devtools.replica_set_proxy import ReplicaSetProxy
from devtools.sharded_cluster import ShardedCluster
from tests.dags.test_live_pull import FAST_POKES, Writer, seed
from tests.dags.test_mongo_to_atlas import airflow_home, conns, failure_text, reports_of  # noqa: F401 - fixture
from tests.helpers import assert_namespaces_identical, user_namespaces

pytestmark = pytest.mark.integration
DAG_ID = "mongo_to_atlas"
SPLITS, OWNERS = [1_500, 10_200], [0, 1, 0]  # the writer's inserts (from 10,000) reach both shards


@pytest.fixture
def two_shards(tmp_path_factory):
    servers, proxies = [], []
    try:
        for i in range(2):
            server = start_server(tmp_path_factory.mktemp(f"shard{i}"), extra_args=["--noop-heartbeat-seconds", "1"])
            servers.append(server)
            proxies.append(ReplicaSetProxy(server.port).start())
        with ShardedCluster([p.host for p in proxies], primaries={"shop": 1},
                            sharded={"shop.orders": {"key": {"_id": 1}, "splits": SPLITS, "owners": OWNERS}}) as router:
            yield router, proxies
    finally:
        for proxy in proxies:
            proxy.stop()
        for server in servers:
            server.destroy()


def test_two_shard_source_pulls_live_with_auto_cutover(airflow_home, two_shards, target):  # noqa: F811
    import pymongo

    router, proxies = two_shards
    router_uri = f"mongodb://{router.host}/"
    with pymongo.MongoClient(router_uri) as src:
        seed(src)
    writer = Writer(router_uri, pause=0.05)
    writer.start()
    conf = {"strategy": "auto", "pull_engine": "native", "cutover": "auto", "source_write_block": "require",
            "quiet_period_seconds": 2, "partition_docs": 1_000, "validation_mode": "full",
            "cutover_timeout_seconds": 300}
    try:
        run = airflow_home.dags_test(DAG_ID, conf, env={**conns(router_uri, target.uri), **FAST_POKES})
    finally:
        counts = writer.stop()
    with pymongo.MongoClient(router_uri) as src:  # the cutover left writes blocked: a rollback unblocks
        blocked = [proxy.user_write_block_mode for proxy in proxies]
        src.admin.command("setUserWriteBlockMode", 1, **{"global": False})
    assert run.succeeded, failure_text(run)
    out = run.output
    print("\n".join(line for line in out.splitlines()  # what inspection decided (pytest -rP shows it)
                    if re.match(r"\s+(topology          :|shard oplog       :|note              : oplog window)",
                                line)))
    assert "strategy: live_pull (chosen automatically; rule 'default')" in out
    assert "topology          : sharded (2 shards)" in out
    for i, proxy in enumerate(proxies):
        assert re.search(rf"shard oplog       : shard{i} \[secantus/{re.escape(proxy.host)}\]: \d+\.\d h", out), i
    assert "the smallest of 2 shard oplog windows, shard shard" in out
    assert router.refusals == []  # the product sent nothing the stand-in does not imitate
    assert blocked == [2, 2]  # the cutover blocked user writes on both shards
    assert all(counts.values()) and writer.refused == 1, (counts, writer.refused)
    applied = [int(n.replace(",", "")) for n in re.findall(r"catch-up: ([\d,]+) events applied", out)]
    applied += [int(n.replace(",", "")) for n in re.findall(r"cutover complete: ([\d,]+) final events", out)]
    assert sum(applied) > 0, applied
    assert reports_of(airflow_home, out)["verdict"] == "PASS"
    with pymongo.MongoClient(router_uri) as src, target.client() as dst:
        namespaces = user_namespaces(src)
        assert namespaces == [("shop", "customers"), ("shop", "orders"), ("shop", "recent")]
        assert [ns for ns in user_namespaces(dst) if not ns[0].startswith("__")] == namespaces
        assert assert_namespaces_identical(src, dst, namespaces) >= 3_500 - counts["delete"]
    # The sharded collection really was split: each shard holds part of it.
    for proxy in proxies:
        with pymongo.MongoClient(f"mongodb://{proxy.host}/?directConnection=true") as shard:
            assert shard.shop.orders.estimated_document_count() > 0
