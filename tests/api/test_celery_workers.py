"""``mongo_to_atlas`` on Airflow's CeleryExecutor with two workers that share no migration folder.

The stack is what a Celery deployment runs: Redis as the broker and PostgreSQL as the metadata database
(Debian's packages, installed by ``.ci/run``, started here on loopback by ``devtools.support_servers``),
api-server, scheduler and dag-processor, and two ``airflow celery worker`` processes. The deployment's
cluster policy (``atlas_migration.worker_queues.route_tasks`` in ``airflow_local_settings.py``) sends
dumps to the worker "near_source" and restores to the worker "near_atlas"; each worker has its own
``MIGRATION_WORK_DIR``, so a restore finds a dump only through the S3 staging prefix (moto in server mode).
Each worker reports its own host name (``[core] hostname_callable``), as workers on two machines would,
so the task instances read through the REST API say which worker ran what.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.airflow_env import AirflowHome, conn_env_name, mongo_connection_json
from devtools.airflow_services import AirflowServices
from devtools.sample_data import seed_sample_dataset
from devtools.support_servers import PostgresServer, RedisServer, postgres_available, redis_available
from tests.helpers import assert_namespaces_identical, user_namespaces

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (redis_available() and postgres_available()),
                       reason="redis-server and PostgreSQL (Debian: redis-server, postgresql) are not installed"),
]
DAG_ID = "mongo_to_atlas"
BUCKET = "celery-staging"
# Airflow 3 knows the executors of providers by their class path only.
CELERY_EXECUTOR = "airflow.providers.celery.executors.celery_executor.CeleryExecutor"
WORKERS = {"near_source": "mongorestore.copy.dump", "near_atlas": "mongorestore.copy.restore"}
LOCAL_SETTINGS = f'''"""The deployment's cluster policy: dumps near the source, restores near Atlas."""
from atlas_migration.worker_queues import route_tasks

task_policy = route_tasks({json.dumps({task: queue for queue, task in WORKERS.items()})})
'''


@pytest.fixture(scope="module")
def celery_stack(tmp_path_factory, standalone_server, target_server, moto_endpoint) -> Iterator[AirflowServices]:
    root = tmp_path_factory.mktemp("celery-stack")
    with RedisServer(root / "redis") as redis, PostgresServer(root / "postgres") as postgres:
        celery = {"AIRFLOW__CORE__EXECUTOR": CELERY_EXECUTOR,
                  "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres.sqlalchemy_url,
                  "AIRFLOW__CELERY__BROKER_URL": redis.url,
                  "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + postgres.sqlalchemy_url,
                  # Tasks pick the worker by queue; the policy above sets the queues.
                  "AIRFLOW__OPERATORS__DEFAULT_QUEUE": "default"}
        home = AirflowHome(root / "airflow-home", settings=celery)
        (home.path / "config").mkdir(parents=True)
        (home.path / "config" / "airflow_local_settings.py").write_text(LOCAL_SETTINGS)
        aws = {"conn_type": "aws", "login": "AKIACELERYTEST", "password": "moto-secret-celery",
               "extra": {"endpoint_url": moto_endpoint, "region_name": "eu-west-1"}}
        env = {conn_env_name("mongo_source"): mongo_connection_json(standalone_server.uri),
               conn_env_name("atlas_target"): mongo_connection_json(target_server.uri),
               conn_env_name("aws_test"): json.dumps(aws)}
        services = AirflowServices(home, env=env, settings={"AIRFLOW__CORE__EXECUTOR": CELERY_EXECUTOR})
        try:
            services.start()
            services.wait_for_dag(DAG_ID)
            for name in WORKERS:
                services.start_celery_worker(name, ["default", name], {
                    "MIGRATION_WORK_DIR": str(root / f"work-{name}"),
                    "MIGRATION_TEST_WORKER_NAME": name,
                    "AIRFLOW__CORE__HOSTNAME_CALLABLE": "devtools.support_servers.worker_hostname"}, wait=False)
            for name in WORKERS:
                services.wait_for_worker(name)
            services.work_root = root
            yield services
        finally:
            survivors = services.stop()
        assert not survivors, f"processes outlived AirflowServices.stop(): {survivors}"


def trigger_and_wait(services: AirflowServices, conf: dict, timeout: float = 600) -> tuple[str, str]:
    base = f"{services.base_url}/api/v2/dags/{DAG_ID}"
    with services.session() as api:
        api.patch(base, json={"is_paused": False}, timeout=30).raise_for_status()
        created = api.post(f"{base}/dagRuns", json={"logical_date": None, "conf": conf}, timeout=30)
        created.raise_for_status()
        run_id = created.json()["dag_run_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            services.check_running()
            state = api.get(f"{base}/dagRuns/{run_id}", timeout=30).json()["state"]
            if state in ("success", "failed"):
                return run_id, state
            time.sleep(2)
    raise AssertionError(f"run {run_id} not finished after {timeout:.0f}s\n" + services.logs_tail())


def task_instances(services: AirflowServices, run_id: str) -> list[dict]:
    with services.session() as api:
        reply = api.get(f"{services.base_url}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances",
                        params={"limit": 200}, timeout=30)
        reply.raise_for_status()
        return reply.json()["task_instances"]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_dump_and_restore_run_on_different_workers_through_s3_staging(celery_stack, standalone, target):
    import boto3

    moto = json.loads(celery_stack.environment()[conn_env_name("aws_test")])
    s3 = boto3.client("s3", endpoint_url=moto["extra"]["endpoint_url"], region_name="eu-west-1",
                      aws_access_key_id=moto["login"], aws_secret_access_key=moto["password"])
    s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    with standalone.client() as src:
        seed_sample_dataset(src, scale=0.01)
    conf = {"strategy": "mongorestore", "staging_s3_uri": f"s3://{BUCKET}/runs", "aws_conn_id": "aws_test",
            "include_namespaces": ["shop.*"], "max_parallel_copies": 2}
    run_id, state = trigger_and_wait(celery_stack, conf)
    tis = task_instances(celery_stack, run_id)
    summary = [(t["task_id"], t["map_index"], t["state"], t["queue"], t["hostname"]) for t in tis]
    assert state == "success", f"{summary}\n{celery_stack.logs_tail()}"

    # The policy routed every dump to near_source and every restore to near_atlas, and those workers ran them.
    for queue, task_id in WORKERS.items():
        ran = [t for t in tis if t["task_id"] == task_id]
        assert ran and all(t["queue"] == queue and t["hostname"].endswith(f"-{queue}") for t in ran), summary
    hosts = {t["hostname"].rsplit("-", 1)[1] for t in tis if t["hostname"]}
    assert hosts == set(WORKERS), summary
    # Each worker's own log shows the tasks Celery handed it ("Executing workload in Celery: ... task_id=...").
    executed = {c.name: re.findall(r"Executing workload in Celery: .*? task_id='([^']+)'.*?run_id='([^']+)'",
                                   c.log_tail(500_000)) for c in celery_stack.components if c.name in WORKERS}
    for name, task_id in WORKERS.items():
        mine = [task for task, run in executed[name] if run == run_id]
        assert mine.count(task_id) == len([t for t in tis if t["task_id"] == task_id]), executed[name]
        assert not set(WORKERS.values()) - {task_id} & set(mine), executed[name]

    # No shared folder: near_source wrote the dumps in its folder and uploaded them; near_atlas, which never
    # ran a dump, holds them in its own folder because it downloaded them from the staging prefix.
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/")["Contents"]]
    dumped = {k.split("/dump/", 1)[1] for k in keys if "/dump/" in k}
    assert "shop/orders.bson.gz" in dumped, keys
    for name in WORKERS:
        files = {f.split("dump/", 1)[1] for f in files_under(celery_stack.work_root / f"work-{name}") if "dump/" in f}
        assert dumped <= files, (name, sorted(dumped - files))
    with standalone.client() as src, target.client() as dst:
        namespaces = [ns for ns in user_namespaces(src) if ns[0] == "shop"]
        assert [ns for ns in user_namespaces(dst)] == namespaces
        assert assert_namespaces_identical(src, dst, namespaces) > 0
