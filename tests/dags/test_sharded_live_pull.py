"""A sharded (non-Compose) source migrated by live pull through the real DAG (``airflow dags test``).

The source is the mongos stand-in (``devtools.mongos_proxy``) in front of the session ``source`` replica
set, its one shard; no hosting is declared, so it is not the Compose path. Inspection measures the oplog
window on the shard (reached as a replica set with the source connection's options, as ``listShards``
names it), routing picks ``live_pull``, ``stop_balancer`` stops the balancer before the copy, an
application keeps writing through the mongos until the automatic cutover blocks its writes, and the
``restart_balancer`` teardown turns the balancer back on. The target equals the source exactly.
"""

from __future__ import annotations

import re
import sqlite3

import pytest

from devtools.mongos_proxy import MongosProxy
from tests.dags.test_live_pull import FAST_POKES, Writer, seed
from tests.dags.test_mongo_to_atlas import airflow_home, conns, failure_text, reports_of  # noqa: F401 - fixture
from tests.helpers import assert_namespaces_identical, user_namespaces

pytestmark = pytest.mark.integration
DAG_ID = "mongo_to_atlas"


def test_sharded_source_pulls_live_with_the_balancer_stopped_and_restarted(airflow_home, source, target):  # noqa: F811
    import pymongo

    if source.local is None:
        pytest.skip("the mongos stand-in needs the local test server behind it")
    with MongosProxy(source.local.port) as mongos:
        mongos_uri = f"mongodb://{mongos.host}/"
        with pymongo.MongoClient(mongos_uri) as src:
            seed(src)
        writer = Writer(mongos_uri, pause=0.05)
        writer.start()
        conf = {"strategy": "auto", "pull_engine": "native", "cutover": "auto", "source_write_block": "require",
                "quiet_period_seconds": 2, "partition_docs": 1_000, "validation_mode": "full",
                "cutover_timeout_seconds": 300}
        run = airflow_home.dags_test(DAG_ID, conf, env={**conns(mongos_uri, target.uri), **FAST_POKES})
        counts = writer.stop()
        balancer_after = mongos.balancer_mode
        with pymongo.MongoClient(mongos_uri) as src:  # the cutover left writes blocked: a rollback unblocks
            src.admin.command("setUserWriteBlockMode", 1, **{"global": False})
    assert run.succeeded, failure_text(run)
    out = run.output
    assert "strategy: live_pull (chosen automatically; rule 'default')" in out
    assert "topology          : sharded (1 shards)" in out
    assert re.search(rf"shard oplog       : secantus \[secantus/{re.escape(source.local.host)}\]: \d+\.\d h", out)
    assert "the oplog window of the only shard, secantus" in out and "balancer          : full" in out
    # The balancer was stopped before the copy began, and restarted after the cutover by the teardown.
    assert "balancer: was 'full', now 'off' (stopped by this run" in out
    assert out.index("now 'off' (stopped by this run") < out.index("change stream resume point recorded")
    assert out.index("cutover complete") < out.index("balancer: restarted (was 'full' before the run, now 'full')")
    assert balancer_after == "full"
    # The run's marker (written before balancerStop, so a retry after a kill still owns the restart) is gone.
    with sqlite3.connect(airflow_home.path / "airflow.db") as db:
        markers = db.execute("SELECT key FROM variable WHERE key LIKE 'atlas_migration_balancer__%'").fetchall()
    assert markers == []
    assert re.search(r"now 'off' \(stopped by this run, recorded in Variable 'atlas_migration_balancer__"
                     rf"{DAG_ID}__[^']+'", out)
    assert "an earlier try of this run stopped it" not in out
    # Writes through the mongos kept coming until the cutover blocked them, and reached the target.
    assert all(counts.values()) and writer.refused == 1, (counts, writer.refused)
    applied = [int(n.replace(",", "")) for n in re.findall(r"catch-up: ([\d,]+) events applied", out)]
    applied += [int(n.replace(",", "")) for n in re.findall(r"cutover complete: ([\d,]+) final events", out)]
    assert sum(applied) > 0, applied
    assert reports_of(airflow_home, out)["verdict"] == "PASS"
    with source.client() as src, target.client() as dst:
        namespaces = user_namespaces(src)
        assert namespaces == [("shop", "customers"), ("shop", "orders"), ("shop", "recent")]
        assert [ns for ns in user_namespaces(dst) if not ns[0].startswith("__")] == namespaces
        assert assert_namespaces_identical(src, dst, namespaces) >= 3_500 - counts["delete"]
