"""Run Airflow commands against this repository in a throw-away home (SQLite metadata DB).

Used by the demo and the integration tests: connections are passed as ``AIRFLOW_CONN_<ID>`` environment
variables in JSON form (the Mongo provider reads ``srv``/``ssl`` from JSON extras as real booleans).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def mongo_connection_json(uri: str, *, migration_facts: dict | None = None) -> str:
    """An ``AIRFLOW_CONN_*`` JSON value of type ``mongo`` equivalent to a MongoDB connection string."""
    from pymongo.uri_parser import parse_uri

    srv = uri.startswith("mongodb+srv://")
    parsed = parse_uri(uri, connect_timeout=None) if not srv else None
    extra: dict[str, Any] = {}
    if srv:
        # Do not resolve SRV records here; keep the seed host and let the driver resolve it.
        rest = uri.split("://", 1)[1]
        userinfo, _, rest = rest.rpartition("@")
        host = rest.split("/", 1)[0].split("?", 1)[0]
        login, _, password = userinfo.partition(":")
        from urllib.parse import parse_qsl, unquote_plus, urlsplit

        query = dict(parse_qsl(urlsplit("mongodb://x/?" + rest.split("?", 1)[1]).query)) if "?" in rest else {}
        extra.update(query)
        extra["srv"] = True
        conn = {"conn_type": "mongo", "host": host, "login": unquote_plus(login) or None,
                "password": unquote_plus(password) or None}
    else:
        assert parsed is not None
        hosts = ",".join(f"{h}:{p}" for h, p in parsed["nodelist"])
        conn = {"conn_type": "mongo", "host": hosts, "login": parsed["username"], "password": parsed["password"]}
        options = parsed["options"]
        for key, value in options.items():
            if key == "authmechanismproperties":
                continue
            extra[_CAMEL.get(key, key)] = value
    if migration_facts:
        extra["migration"] = migration_facts
    conn["extra"] = extra
    return json.dumps({k: v for k, v in conn.items() if v is not None})


# pymongo lower-cases option names; MongoClient accepts either, but keep the documented spelling.
_CAMEL = {
    "directconnection": "directConnection", "authsource": "authSource", "replicaset": "replicaSet",
    "authmechanism": "authMechanism", "tlsallowinvalidcertificates": "tlsAllowInvalidCertificates",
    "tlscafile": "tlsCAFile", "readpreference": "readPreference", "retrywrites": "retryWrites",
    "w": "w", "tls": "tls", "ssl": "tls", "appname": "appname",
}


def conn_env_name(conn_id: str) -> str:
    return "AIRFLOW_CONN_" + re.sub(r"[^A-Za-z0-9]", "_", conn_id).upper()


@dataclass
class AirflowHome:
    """An isolated AIRFLOW_HOME whose DAG folder is this repository's ``dags/``.

    ``settings``: Airflow configuration every command of this home gets (``AIRFLOW__SECTION__KEY``), e.g. a
    PostgreSQL metadata database; ``airflow db migrate`` included."""

    path: Path
    settings: dict[str, str] = field(default_factory=dict)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW_VAR_"))}
        pythonpath = [str(REPO / "include"), str(REPO)]
        if env.get("PYTHONPATH"):
            pythonpath.append(env["PYTHONPATH"])
        env.update(
            {
                "AIRFLOW_HOME": str(self.path),
                "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
                "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "PYTHONPATH": os.pathsep.join(pythonpath),
                "MIGRATION_WORK_DIR": str(self.path / "migration-work"),
            }
        )
        env.update(self.settings)
        env.update(extra or {})
        return env

    def airflow(self, *args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
        argv = [str(Path(sys.executable).parent / "airflow"), *args]
        return subprocess.run(
            argv, env=self.env(env), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )

    def migrate(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        done = self.path / ".migrated"
        if done.exists():
            return
        result = self.airflow("db", "migrate")
        if result.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        done.touch()

    def dags_test(self, dag_id: str, conf: dict, env: dict[str, str] | None = None, timeout: float = 900) -> DagTestRun:
        # Parse only the DAG's own file (named after its dag_id) when there is one: the whole folder would
        # parse and serialize every other DAG in it as well, several seconds per run for nothing.
        dag_file = REPO / "dags" / f"{dag_id}.py"
        file_args = ["--dagfile-path", str(dag_file)] if dag_file.is_file() else []
        result = self.airflow("dags", "test", dag_id, *file_args, "-c", json.dumps(conf), env=env, timeout=timeout)
        output = result.stdout + "\n" + result.stderr
        match = re.findall(r"DagRun Finished: .*?state=(\w+)", output)
        return DagTestRun(returncode=result.returncode, state=match[-1] if match else None, output=output)


@dataclass
class DagTestRun:
    returncode: int
    state: str | None
    output: str

    @property
    def succeeded(self) -> bool:
        return self.state == "success"
