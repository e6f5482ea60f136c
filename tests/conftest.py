"""Shared fixtures: real MongoDB-compatible servers on 127.0.0.1 and a throw-away Airflow home.

By default the suite starts SecantusDB processes (a replica-set source with an oplog, a standalone source
without one, and a target standing in for Atlas). Set ``MIGRATION_TEST_SOURCE_URI`` and
``MIGRATION_TEST_TARGET_URI`` to run the same suite against genuine mongod deployments instead; the suite
drops every non-system database it finds on them after each test, so point it at disposable servers.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Airflow reads its configuration when first imported: give the whole test session its own home.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="airflow-test-home-"))
os.environ.setdefault("AIRFLOW_HOME", str(_SESSION_HOME))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(Path(__file__).resolve().parent.parent / "dags"))

from devtools.mongo_servers import LocalMongoServer, start_server  # noqa: E402

SYSTEM_DBS = {"admin", "local", "config"}


@dataclass
class ServerHandle:
    """A running deployment the tests may write to; ``uri`` carries no credentials unless the server needs them."""

    name: str
    uri: str
    local: LocalMongoServer | None = None

    def client(self, **kwargs):
        import pymongo

        return pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=10_000, **kwargs)

    def drop_user_databases(self) -> None:
        with self.client() as client:
            for name in client.list_database_names():
                if name not in SYSTEM_DBS:
                    client.drop_database(name)


def _external(name: str) -> str | None:
    return os.environ.get(name) or None


def pytest_configure(config: pytest.Config) -> None:
    # `make test` runs the suite on pytest-xdist workers, each starting its own local servers. Genuine servers
    # given through the environment are shared by every worker, and each worker drops their databases
    # around its tests: refuse that combination instead of letting the workers wipe each other's data.
    workers = getattr(config.option, "numprocesses", None)
    external = [n for n in ("MIGRATION_TEST_SOURCE_URI", "MIGRATION_TEST_TARGET_URI") if _external(n)]
    if workers and external and not os.environ.get("PYTEST_XDIST_WORKER"):
        raise pytest.UsageError(f"the servers named by {' and '.join(external)} would be shared by every test "
                                "worker: run the suite in one process (make test TEST_WORKERS=0, or pytest -n 0)")


# The modules that take longest (several minutes each, measured in CI), heaviest first. With `make test`
# (pytest-xdist, one file per worker at a time, handed out in collection order) they start first and the
# short modules fill the gaps at the end, instead of one long module starting last and running alone.
HEAVIEST_FIRST = (
    "tests/dags/test_live_pull.py",
    "tests/dags/test_inventory_limits.py",
    "tests/dags/test_live_push.py",
    "tests/dags/test_mongo_to_atlas.py",
    "tests/dags/test_file_import.py",
    "tests/dags/test_rehearsal.py",
    "tests/api/test_clear_and_retry.py",
    "tests/api/test_celery_workers.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order only: the heaviest modules first (see HEAVIEST_FIRST), every other test in collection order."""
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    root = Path(str(config.rootpath))

    def key(item: pytest.Item) -> int:
        try:
            relative = Path(str(item.path)).relative_to(root).as_posix()
        except ValueError:
            return len(rank)
        return rank.get(relative, len(rank))

    items.sort(key=key)  # stable: the order inside a module and among the rest is unchanged


@pytest.fixture(scope="session")
def server_workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("servers")


def _session_server(workdir: Path, env_name: str, name: str, **kwargs) -> Iterator[ServerHandle]:
    uri = _external(env_name)
    if uri:
        yield ServerHandle(name, uri)
        return
    server = start_server(workdir / name, **kwargs)
    try:
        yield ServerHandle(name, server.uri, server)
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def source_server(server_workdir) -> Iterator[ServerHandle]:
    """A replica-set source (oplog readable)."""
    yield from _session_server(server_workdir, "MIGRATION_TEST_SOURCE_URI", "source")


@pytest.fixture(scope="session")
def target_server(server_workdir) -> Iterator[ServerHandle]:
    """The target standing in for Atlas."""
    yield from _session_server(server_workdir, "MIGRATION_TEST_TARGET_URI", "target")


@pytest.fixture(scope="session")
def standalone_server(server_workdir) -> Iterator[ServerHandle]:
    """A standalone source without an oplog (always a local process: genuine deployments are replica sets)."""
    server = start_server(server_workdir / "standalone", standalone=True)
    try:
        yield ServerHandle("standalone", server.uri, server)
    finally:
        server.destroy()


@pytest.fixture
def source(source_server) -> Iterator[ServerHandle]:
    source_server.drop_user_databases()
    yield source_server
    source_server.drop_user_databases()


@pytest.fixture
def target(target_server) -> Iterator[ServerHandle]:
    target_server.drop_user_databases()
    yield target_server
    target_server.drop_user_databases()


@pytest.fixture
def standalone(standalone_server) -> Iterator[ServerHandle]:
    standalone_server.drop_user_databases()
    yield standalone_server
    standalone_server.drop_user_databases()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """AWS (S3, EC2) as a real HTTP endpoint on 127.0.0.1: moto in server mode."""
    import logging

    from moto.server import ThreadedMotoServer

    from devtools.mongo_servers import free_port

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_conn(moto_endpoint, monkeypatch) -> str:
    """An Airflow AWS connection 'aws_test' pointing at the moto server, exported for this test."""
    import json

    value = json.dumps({"conn_type": "aws", "login": "AKIATESTKEY", "password": "moto-secret-key",
                        "extra": {"endpoint_url": moto_endpoint, "region_name": "eu-west-1"}})
    monkeypatch.setenv("AIRFLOW_CONN_AWS_TEST", value)
    return value


def _aws_client_kwargs() -> dict:
    """boto3 client arguments matching the 'aws_test' connection (read back from the environment)."""
    import json

    conn = json.loads(os.environ["AIRFLOW_CONN_AWS_TEST"])
    return {"endpoint_url": conn["extra"]["endpoint_url"], "region_name": conn["extra"]["region_name"],
            "aws_access_key_id": conn["login"], "aws_secret_access_key": conn["password"]}


# Real mongodump output kept beside the repositories (never copied into this one); see its README.
REFERENCE_DUMPS = Path(__file__).resolve().parent.parent.parent / "shared" / "reference" / "mongodump-dumps"


@pytest.fixture(scope="session")
def mongodump_fixtures() -> Path:
    """The read-only folder of dumps written by real mongodump (``../shared/reference/mongodump-dumps``)."""
    if not (REFERENCE_DUMPS / "README.md").is_file():
        pytest.skip(f"reference dumps by real mongodump not found at {REFERENCE_DUMPS}")
    return REFERENCE_DUMPS


@pytest.fixture(autouse=True)
def _token_cache_dir(tmp_path_factory, monkeypatch) -> None:
    """Each test gets its own shared service-account token cache (atlas_migration.token_cache)."""
    monkeypatch.setenv("MIGRATION_TOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("token-cache")))
