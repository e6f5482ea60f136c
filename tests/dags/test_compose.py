"""The compose strategy through the real DAG (``airflow dags test``).

The Compose deployment is imitated with what runs here: a SecantusDB one-node replica set with TLS and SCRAM
users (certificates from a CA made by the test, standing in for Compose's) is the shard; the mongos stand-in
(``devtools.mongos_proxy``, TLS with the same CA) is the router in front of it, answering hello as
``isdbgrid``, ``listShards`` with that one shard, ``balancerStatus``, and refusing ``local`` as Compose does;
the replica set reached directly is the Oplog Access endpoint. The target is a plain server standing in
for Atlas.

- pull: ``strategy=auto`` routes to ``compose`` by itself (the connection declares the hosting), preflight
  finds one shard and a readable Oplog Access endpoint,
  the live pull copies through the mongos while a writer changes the source through it, follows the change
  stream of the Oplog Access endpoint, cuts over automatically, rechecks the topology, and validation passes
  on a byte-identical target.
- fallback: the Oplog Access connection points at the mongos (a common mistake): ``local`` is refused there,
  so preflight falls back to dump and restore through mongos.
- a replica set forced through the compose strategy is refused before anything is written.

Neither the CA's PEM text nor the password appears in the run's output, task logs or XCom.

Both connections carry the CA as PEM text, the form the Compose UI gives it in, so every task (inspect,
copy, change stream, dump, validate) shows that ``hooks.endpoint_from_connection`` honours it.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote_plus

import pytest

from devtools.airflow_env import conn_env_name, mongo_connection_json
from devtools.mongo_servers import LocalMongoServer, free_port
from devtools.mongos_proxy import MongosProxy
from tests.dags.test_live_pull import FAST_POKES, Writer, seed
from tests.dags.test_mongo_to_atlas import airflow_home, conns, failure_text, reports_of  # noqa: F401 - fixture
from tests.helpers import assert_namespaces_identical, user_namespaces
from tests.strategies.test_compose import _certificates, _wait_tls

pytestmark = pytest.mark.integration
DAG_ID = "mongo_to_atlas"
USER, PASSWORD = "compose-admin", "C0mp0se:Pa55/w0rd!"
MIGRATION_HOSTS = ["35.1.2.3", "mh-0.migration.mongodb.net"]


@dataclass
class ComposeDeployment:
    shard: LocalMongoServer  # the replica set: reached directly it is the Oplog Access endpoint
    mongos: MongosProxy
    certs: dict[str, str]

    @property
    def ca_pem(self) -> str:
        return Path(self.certs["ca"]).read_text()

    def _uri(self, host: str, direct: bool) -> str:
        return (f"mongodb://{quote_plus(USER)}:{quote_plus(PASSWORD)}@{host}/?authSource=admin&tls=true"
                f"&tlsCAFile={quote_plus(self.certs['ca'])}{'&directConnection=true' if direct else ''}")

    @property
    def mongos_uri(self) -> str:
        return self._uri(self.mongos.host, direct=False)

    @property
    def shard_uri(self) -> str:
        return self._uri(self.shard.host, direct=True)

    def connection(self, port: int, **extra: object) -> str:
        """An ``AIRFLOW_CONN_*`` JSON value for the mongos or the shard, TLS on, with the user's password."""
        return json.dumps({"conn_type": "mongo", "host": "127.0.0.1", "port": port, "login": USER,
                           "password": PASSWORD, "extra": {"tls": True, "authSource": "admin", **extra}})

    def drop_user_databases(self) -> None:
        import pymongo

        with pymongo.MongoClient(self.shard_uri) as client:
            for name in client.list_database_names():
                if name not in ("admin", "local", "config"):
                    client.drop_database(name)


@pytest.fixture(scope="module")
def compose_deployment(tmp_path_factory) -> Iterator[ComposeDeployment]:
    import pymongo

    folder = tmp_path_factory.mktemp("compose")
    certs = _certificates(folder)
    port = free_port()
    shard = LocalMongoServer(port=port, storage_path=folder / f"db-{port}", _own_storage=True)
    try:
        # Users first (no auth, no TLS yet), then the real thing: --auth and TLS with the CA's certificate.
        shard.start()
        with pymongo.MongoClient(shard.uri) as client:
            client.admin.command("createUser", USER, pwd=PASSWORD, roles=["root"])
        shard.stop()
        shard.auth = True
        shard.extra_args = ["--tls-cert-file", certs["cert"], "--tls-key-file", certs["key"],
                            "--tls-ca-file", certs["ca"]]
        shard._wait_ready = lambda timeout: _wait_tls(port, certs["ca"], timeout)  # type: ignore[method-assign]
        shard.start()
        with MongosProxy(port, tls_cert=certs["cert"], tls_key=certs["key"], backend_ca=certs["ca"]) as mongos:
            yield ComposeDeployment(shard, mongos, certs)
    finally:
        shard.destroy()


def _unblock_writes(deployment: ComposeDeployment) -> None:
    """A cutover leaves user writes blocked on the source (on purpose): unblock them, as a rollback would."""
    import pymongo

    with pymongo.MongoClient(deployment.mongos_uri) as client:
        client.admin.command("setUserWriteBlockMode", 1, **{"global": False})


@pytest.fixture
def compose(compose_deployment) -> Iterator[ComposeDeployment]:
    _unblock_writes(compose_deployment)
    compose_deployment.drop_user_databases()
    yield compose_deployment
    _unblock_writes(compose_deployment)
    compose_deployment.drop_user_databases()


def _env(compose: ComposeDeployment, target_uri: str, oplog_port: int | None) -> dict[str, str]:
    # Both connections carry the CA as PEM text, as copied from the Compose UI; the mongos connection also
    # declares the hosting (127.0.0.1 is not a *.composedb.com name).
    env = {conn_env_name("mongo_source"): compose.connection(
               compose.mongos.port, migration={"hosting": "compose", "tls_ca_pem": compose.ca_pem}),
           conn_env_name("atlas_target"): mongo_connection_json(target_uri), **FAST_POKES}
    if oplog_port is not None:
        env[conn_env_name("compose_oplog")] = compose.connection(oplog_port, directConnection=True,
                                                                 migration={"tls_ca_pem": compose.ca_pem})
    return env


def _assert_no_secret_leaked(home, run_output: str, compose: ComposeDeployment) -> None:
    pem_lines = [line for line in compose.ca_pem.splitlines() if line and not line.startswith("-----")]
    secrets = [PASSWORD, quote_plus(PASSWORD), *pem_lines]
    places = {"dags test output": run_output}
    for path in [*home.path.rglob("*.log"), *(home.path / "migration-work").rglob("*.json"),
                 *(home.path / "migration-work").rglob("*.md")]:
        places[str(path)] = path.read_text(errors="replace")
    with sqlite3.connect(home.path / "airflow.db") as db:
        rows = db.execute("SELECT value FROM xcom WHERE dag_id = ?", (DAG_ID,)).fetchall()
    assert rows, "expected XCom rows from the run"
    places["xcom"] = "\n".join(str(value) for (value,) in rows)
    for where, text in places.items():
        for secret in secrets:
            assert secret not in text, f"a secret (password or CA PEM text) leaked into {where}"


def test_auto_routes_to_compose_and_pulls_live_through_mongos(airflow_home, compose, target):  # noqa: F811
    import pymongo

    with pymongo.MongoClient(compose.mongos_uri) as src:
        seed(src)
    # The application keeps writing THROUGH MONGOS during the copy and the catch-up until the automatic
    # cutover blocks user writes (setUserWriteBlockMode through the mongos); the fence is drained on the Oplog
    # Access endpoint's change stream.
    writer = Writer(compose.mongos_uri, pause=0.05)
    writer.start()
    conf = {"strategy": "auto", "oplog_conn_id": "compose_oplog", "atlas_migration_hosts": MIGRATION_HOSTS,
            "pull_engine": "native", "cutover": "auto", "source_write_block": "require", "quiet_period_seconds": 2,
            "partition_docs": 1_000, "validation_mode": "full", "cutover_timeout_seconds": 300}
    run = airflow_home.dags_test(DAG_ID, conf, env=_env(compose, target.uri, compose.shard.port))
    counts = writer.stop()
    assert run.succeeded, failure_text(run)
    assert all(counts.values()) and writer.refused == 1, (counts, writer.refused)
    # Writes were made after the resume point and reached the target through the change stream.
    applied = [int(n.replace(",", "")) for n in re.findall(r"catch-up: ([\d,]+) events applied", run.output)]
    applied += [int(n.replace(",", "")) for n in re.findall(r"cutover complete: ([\d,]+) final events", run.output)]
    assert sum(applied) > 0, applied
    out = run.output
    assert "strategy: compose (chosen automatically; rule 'compose')" in out
    assert "shards: 1 (secantus)" in out and "balancer: full" in out and "path: pull" in out
    assert "oplog access 'compose_oplog': readable" in out
    assert all(f"  {host}" in out for host in MIGRATION_HOSTS) and "allow-list these Atlas migration hosts" in out
    assert "change stream resume point recorded" in out
    # The topology is rechecked after the cutover, before validation.
    assert out.index("cutover complete") < out.index("topology unchanged: one shard (secantus)")
    assert reports_of(airflow_home, out)["verdict"] == "PASS"
    with pymongo.MongoClient(compose.shard_uri) as src, target.client() as dst:
        namespaces = user_namespaces(src)
        assert namespaces == [("shop", "customers"), ("shop", "orders"), ("shop", "recent")]
        assert [ns for ns in user_namespaces(dst) if not ns[0].startswith("__")] == namespaces
        assert assert_namespaces_identical(src, dst, namespaces) >= 3_500 - counts["delete"]
    _assert_no_secret_leaked(airflow_home, out, compose)


def test_without_a_readable_oplog_the_compose_group_falls_back_to_dump_and_restore(
        airflow_home, compose, target):  # noqa: F811
    import pymongo

    with pymongo.MongoClient(compose.mongos_uri) as src:
        seed(src)
    # The Oplog Access connection points at the mongos itself: reachable, but local.oplog.rs is refused.
    env = _env(compose, target.uri, oplog_port=None)
    env[conn_env_name("compose_oplog")] = compose.connection(compose.mongos.port,
                                                             migration={"tls_ca_pem": compose.ca_pem})
    conf = {"strategy": "auto", "oplog_conn_id": "compose_oplog", "atlas_migration_hosts": MIGRATION_HOSTS,
            "validation_mode": "full"}
    run = airflow_home.dags_test(DAG_ID, conf, env=env)
    assert run.succeeded, failure_text(run)
    out = run.output
    assert "strategy: compose (chosen automatically; rule 'compose')" in out
    assert "path: restore" in out and "FALLBACK: dump through mongos" in out
    assert "reading local.oplog.rs failed: not authorized on local" in out
    assert "topology unchanged" not in out  # the recheck belongs to the live path only
    assert reports_of(airflow_home, out)["verdict"] == "PASS"
    with pymongo.MongoClient(compose.shard_uri) as src, target.client() as dst:
        namespaces = user_namespaces(src)
        assert [ns for ns in user_namespaces(dst) if not ns[0].startswith("__")] == namespaces
        assert assert_namespaces_identical(src, dst, namespaces) == 3_500
    _assert_no_secret_leaked(airflow_home, out, compose)


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
