"""Run the Airflow components that execute DAG runs triggered through the REST API, and stop them all.

``airflow dags test`` runs a DAG in one process; a run created with ``POST /api/v2/dags/{id}/dagRuns``
needs the real components instead:

- ``airflow api-server`` on 127.0.0.1 and a free port: the public REST API (``/api/v2``, ``/auth/token``)
  and the Execution API (``/execution/``) that task processes talk to;
- ``airflow scheduler`` with the LocalExecutor (Airflow 3's default, and the executor that
  ``airflow standalone`` uses with SQLite): it creates task instances and runs each task in a
  supervised child process;
- ``airflow dag-processor``: parses ``dags/`` and serialises the DAG, without which the API answers 404.

The triggerer runs deferred tasks only (the live strategies' waits on a migration); the mongorestore
path has none, so it starts only with ``triggerer=True`` (about 170 MiB more). ``api_only=True`` starts the
api-server alone, for tests that read the API (connection forms, providers) and run no DAG. Every component runs in
its own session in an isolated ``AIRFLOW_HOME`` (``AirflowHome`` provides the environment and
``airflow db migrate``); every process of every session is recorded and SIGTERM'd, then SIGKILL'd, on
``stop()``: Airflow's task supervisor puts each task in its own process group, so signalling process
groups alone would leave task processes behind.

    with AirflowServices(AirflowHome(path), env={"AIRFLOW_CONN_...": ...}) as services:
        services.wait_for_dag("mongo_to_atlas")
        print(services.base_url, services.username, services.password_file)

From a shell, to try ``scripts/trigger_migration.py`` by hand (Ctrl-C stops every component):

    python -m devtools.airflow_services --source-uri mongodb://... --target-uri mongodb://... [--port 8080]
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.airflow_env import AirflowHome
from devtools.mongo_servers import free_port

# Settings that keep the whole stack under about 1 GiB on a small machine (see memory_usage()).
LEAN_SETTINGS: dict[str, str] = {
    "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
    # At most four task processes at once: each one is a full Python interpreter with Airflow loaded.
    "AIRFLOW__CORE__PARALLELISM": "4",
    # One uvicorn worker and one parsing process are plenty for a single DAG file.
    "AIRFLOW__API__WORKERS": "1",
    "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
    # The DAG file does not change while the services run: re-parse it every 5 minutes, not every 30 s,
    # which leaves the CPU to the tasks on a 2-core machine.
    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "300",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
    "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
}
PASSWORD_FILE_NAME = "simple_auth_manager_passwords.json.generated"


def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, session id, start time) of a process, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after the last ')'.
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[3]), int(fields[19])


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _alive(pid: int, start_time: int) -> bool:
    stat = _proc_stat(pid)
    # Same start time: not a new process that reused the PID. Zombies count as gone (only reaping is left).
    return stat is not None and stat[3] == start_time and stat[0] != "Z"


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB. PSS splits pages shared by forked children, so summing it does not double-count."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return rss, pss


@dataclass
class Component:
    """One Airflow component: the leader process of its own session, and every process seen in it."""

    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen | None = None
    # pid -> start time: the start time tells a recorded process from a later one that reused its PID.
    pids: dict[int, int] = field(default_factory=dict)

    @property
    def session_id(self) -> int | None:
        return self.process.pid if self.process else None

    def record(self) -> dict[int, int]:
        """Record every live process of this component's session (and descendants that left it)."""
        sid = self.session_id
        if sid is None:
            return {}
        stats = {pid: stat for pid in _all_pids() if (stat := _proc_stat(pid))}
        members = {pid for pid, stat in stats.items() if stat[2] == sid}
        # Descendants by parentage too, in case a child ever starts its own session.
        frontier = set(members)
        while frontier:
            frontier = {pid for pid, stat in stats.items() if stat[1] in frontier and pid not in members}
            members |= frontier
        for pid in members:
            if stats[pid][0] != "Z":
                self.pids.setdefault(pid, stats[pid][3])
        return {pid: start for pid, start in self.pids.items() if _alive(pid, start)}

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class ServicesError(RuntimeError):
    """A component failed to start or to become ready; the message carries the logs' tails."""


class AirflowServices:
    """api-server + scheduler + dag-processor (+ triggerer), or the api-server alone, for one isolated Airflow home.

    ``env``: extra environment for every component, e.g. ``AIRFLOW_CONN_*`` variables (tasks inherit the
    scheduler's environment, so connections defined there reach them). A random password for the user
    ``admin`` is written to ``password_file`` (mode 0600, the simple auth manager's own file) before the
    api-server starts, so it is never printed to a log.
    """

    def __init__(self, home: AirflowHome, env: dict[str, str] | None = None, *, port: int | None = None,
                 triggerer: bool = False, api_only: bool = False, settings: dict[str, str] | None = None) -> None:
        if api_only and triggerer:
            raise ValueError("api_only starts the api-server alone: no triggerer")
        self.home = home
        self.port = port or free_port()
        self._port_given = port is not None
        self.username = "admin"
        self.password_file = home.path / PASSWORD_FILE_NAME
        self.log_dir = home.path / "service-logs"
        self._extra_env = dict(env or {})
        self._settings = {**LEAN_SETTINGS, **(settings or {})}
        self._triggerer = triggerer
        self._api_only = api_only
        self._jwt_secret = secrets.token_urlsafe(32)
        self.components: list[Component] = []
        self.started_at: float | None = None
        self.ready_after: float | None = None

    # ------------------------------------------------------------------ configuration

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def password(self) -> str:
        return json.loads(self.password_file.read_text())[self.username]

    def environment(self) -> dict[str, str]:
        """The environment every component gets (the same for all: they must agree on the JWT secret)."""
        return self.home.env({
            **self._settings,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            # Task processes reach the Execution API here; the default assumes localhost:8080.
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            # The api-server signs the tokens task processes use and the scheduler issues: one shared
            # secret, set explicitly rather than relying on every process reading the same airflow.cfg.
            "AIRFLOW__API_AUTH__JWT_SECRET": self._jwt_secret,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.password_file),
            **self._extra_env,
        })

    def _write_password_file(self) -> None:
        if self.password_file.exists():
            return
        # Created 0600 before anything is written to it: the file holds a plaintext password.
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({self.username: secrets.token_urlsafe(18)}, handle)

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 180.0, *, retry_port: bool = True) -> AirflowServices:
        """Migrate the metadata DB, start the components and wait until the health endpoint says ready."""
        if retry_port:  # the first attempt: a retry on another port keeps the original start time
            self.started_at = time.monotonic()
        self.home.migrate()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._write_password_file()
        airflow = str(Path(sys.executable).parent / "airflow")
        commands = {"api-server": [airflow, "api-server", "--host", "127.0.0.1", "--port", str(self.port)]}
        if not self._api_only:
            # --skip-serve-logs: the api-server reads task logs from the shared local folder; the log server
            # would only cost a process and a fixed port (8793) that concurrent test runs would fight over.
            commands["scheduler"] = [airflow, "scheduler", "--skip-serve-logs"]
            commands["dag-processor"] = [airflow, "dag-processor"]
        if self._triggerer:
            commands["triggerer"] = [airflow, "triggerer", "--skip-serve-logs"]
        env = self.environment()
        try:
            for name, argv in commands.items():
                self._spawn(name, argv, env)
            self._wait_ready(timeout)
        except ServicesError as exc:
            self.stop()
            # Another process took the free port between free_port() and uvicorn's bind (tests run side
            # by side): try once more on a new port, which every component must then be told about.
            if self._port_given or "already in use" not in str(exc) or retry_port is False:
                raise
            self.port = free_port()
            return self.start(timeout, retry_port=False)
        except BaseException:
            self.stop()
            raise
        self.ready_after = time.monotonic() - self.started_at
        return self

    def start_celery_worker(self, name: str, queues: list[str], env: dict[str, str] | None = None, *,
                            concurrency: int = 1, wait: bool = True) -> Component:
        """``airflow celery worker`` consuming ``queues``, with the services' environment plus ``env`` (its own
        work folder, for one), stopped with the other components. ``wait``: return once Celery reports it
        ready (``wait_for_worker``); start several with ``wait=False`` first to let them boot side by side.

        Needs the CeleryExecutor and a broker in the settings. ``--skip-serve-logs``: the workers share this
        home's log folder with the api-server, which reads the task logs from there."""
        airflow = str(Path(sys.executable).parent / "airflow")
        argv = [airflow, "celery", "worker", "--queues", ",".join(queues), "--concurrency", str(concurrency),
                "--celery-hostname", f"{name}@%h", "--skip-serve-logs"]
        self._spawn(name, argv, {**self.environment(), **(env or {})})
        if wait:
            self.wait_for_worker(name)
        return self.components[-1]

    def wait_for_worker(self, name: str, timeout: float = 120.0) -> None:
        """Wait until the Celery worker ``name`` logs that it is ready to take tasks."""
        component = next(c for c in self.components if c.name == name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_running()
            if f"{name}@" in (tail := component.log_tail(20000)) and " ready." in tail:
                component.record()
                return
            time.sleep(0.5)
        raise ServicesError(f"celery worker {name} not ready after {timeout:.0f}s\n" + self.logs_tail())

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        component = Component(name, argv, self.log_dir / f"{name}.log")
        log = open(component.log_path, "ab")  # noqa: SIM115 - handed to the child process
        try:
            component.process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                                 stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        self.components.append(component)
        component.record()

    def health(self) -> dict[str, Any] | None:
        """``GET /api/v2/monitor/health`` (no authentication needed), or None while the API is down."""
        import requests

        try:
            response = requests.get(f"{self.base_url}/api/v2/monitor/health", timeout=5)
        except requests.RequestException:
            return None
        return response.json() if response.status_code == 200 else None

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self._api_only:  # health answers at all once the api-server serves; the DB must be reachable
            wanted = ["metadatabase"]
        else:
            wanted = ["metadatabase", "scheduler", "dag_processor"] + (["triggerer"] if self._triggerer else [])
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            self.check_running()
            self.record_pids()
            last = self.health()
            if last and all((last.get(part) or {}).get("status") == "healthy" for part in wanted):
                return
            time.sleep(1)
        raise ServicesError(f"Airflow components not healthy after {timeout:.0f}s (last health: {last})\n"
                            + self.logs_tail())

    def check_running(self) -> None:
        for component in self.components:
            if component.process and component.process.poll() is not None:
                raise ServicesError(f"airflow {component.name} exited with code {component.process.returncode}\n"
                                    + self.logs_tail())

    def record_pids(self) -> dict[str, dict[int, int]]:
        """Record (and return) the live processes of every component."""
        return {component.name: component.record() for component in self.components}

    def stop(self, grace: float = 5.0, leader_grace: float = 6.0) -> dict[str, list[int]]:
        """Stop every recorded process of every component: SIGTERM, then SIGKILL what outlives ``grace``.

        Leaders first: each shuts its own children down in order (idle, everything is gone in about 4 s).
        Signalling the children at the same moment made the scheduler wait until the grace ran out for
        executor workers that had already died. With tasks running, the scheduler waits for them to finish
        ("signal again if you don't want to wait"): after ``leader_grace`` every process still alive gets
        SIGTERM, and SIGKILL after ``grace``. The grace is short on purpose: measured, SIGTERM alone does
        not end a busy stack (executor workers forward it to their task, then take the next queued one),
        and the metadata DB of a throw-away home need not be left tidy.
        Returns the processes still alive at the end, per component: empty unless something is unkillable.
        """
        if not self.components:
            return {}
        self.record_pids()
        for component in self.components:
            if component.process and component.process.poll() is None:
                self._signal(component.process.pid, component.pids[component.process.pid], signal.SIGTERM)
        self._wait_gone(leader_grace, leaders_only=True)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for component in self.components:
                for pid, start in component.record().items():
                    self._signal(pid, start, sig)
            if self._wait_gone(grace if sig == signal.SIGTERM else 5.0):
                break
        for component in self.components:
            if component.process:
                try:
                    component.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        survivors = {c.name: sorted(pid for pid, start in c.pids.items() if _alive(pid, start)) for c in self.components}
        self.components = []
        return {name: pids for name, pids in survivors.items() if pids}

    def _wait_gone(self, timeout: float, leaders_only: bool = False) -> bool:
        """Wait until the leaders (or every recorded process) have exited; True when they have."""
        deadline = time.monotonic() + timeout
        while True:
            for component in self.components:
                if component.process:
                    component.process.poll()  # reap leaders so they do not linger as zombies
            if leaders_only:
                gone = all(c.process is None or c.process.returncode is not None for c in self.components)
            else:
                gone = not any(self.record_pids().values())
            if gone or time.monotonic() >= deadline:
                return gone
            time.sleep(0.25)

    @staticmethod
    def _signal(pid: int, start_time: int, sig: signal.Signals) -> None:
        if not _alive(pid, start_time):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def __enter__(self) -> AirflowServices:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ API helpers

    def session(self):
        """A ``requests.Session`` authenticated as ``admin`` (bearer token from ``POST /auth/token``)."""
        import requests

        session = requests.Session()
        response = session.post(f"{self.base_url}/auth/token",
                                json={"username": self.username, "password": self.password}, timeout=30)
        response.raise_for_status()
        session.headers["Authorization"] = f"Bearer {response.json()['access_token']}"
        return session

    def wait_for_dag(self, dag_id: str, timeout: float = 120.0) -> None:
        """Wait until the dag-processor has serialised ``dag_id`` (the API answers 404 before that)."""
        deadline = time.monotonic() + timeout
        session = self.session()
        status = None
        while time.monotonic() < deadline:
            self.check_running()
            status = session.get(f"{self.base_url}/api/v2/dags/{dag_id}", timeout=30).status_code
            if status == 200:
                return
            time.sleep(1)
        errors = session.get(f"{self.base_url}/api/v2/importErrors", timeout=30).json()
        raise ServicesError(f"DAG {dag_id!r} not available after {timeout:.0f}s (HTTP {status}); "
                            f"import errors: {errors}\n" + self.logs_tail())

    # ------------------------------------------------------------------ diagnostics

    def logs_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"----- {c.name} ({c.log_path}) -----\n{c.log_tail(chars)}" for c in self.components)

    def memory_usage(self) -> dict[str, dict[str, int]]:
        """Per component: processes, RSS and PSS in MiB, summed over every live process of its session."""
        usage = {}
        for name, pids in self.record_pids().items():
            rss = pss = 0
            for pid in pids:
                r, p = _memory_kib(pid)
                rss, pss = rss + r, pss + p
            usage[name] = {"processes": len(pids), "rss_mib": rss // 1024, "pss_mib": pss // 1024}
        return usage


@contextmanager
def api_server_only(home: AirflowHome) -> Iterator[AirflowServices]:
    """An api-server alone on ``home`` (its metadata DB shared with ``airflow dags test`` runs there), stopped
    on exit; raises if any of its processes outlived the stop."""
    services = AirflowServices(home, api_only=True)
    try:
        services.start()
        yield services
    finally:
        survivors = services.stop()
    if survivors:
        raise RuntimeError(f"processes outlived AirflowServices.stop(): {survivors}")


def main(argv: list[str] | None = None) -> int:
    """Start the components with two Mongo connections and keep them up until Ctrl-C or SIGTERM."""
    import argparse

    from devtools.airflow_env import REPO, conn_env_name, mongo_connection_json

    parser = argparse.ArgumentParser(description="Run api-server, scheduler and dag-processor for mongo_to_atlas.")
    parser.add_argument("--source-uri", required=True, help="connection string of the deployment to migrate")
    parser.add_argument("--target-uri", required=True, help="connection string of the target (Atlas)")
    parser.add_argument("--home", default=str(REPO / ".run" / "airflow-services"), help="AIRFLOW_HOME to use")
    parser.add_argument("--port", type=int, help="api-server port (default: a free one)")
    parser.add_argument("--triggerer", action="store_true", help="also start the triggerer (deferrable tasks)")
    args = parser.parse_args(argv)

    env = {conn_env_name("mongo_source"): mongo_connection_json(args.source_uri),
           conn_env_name("atlas_target"): mongo_connection_json(args.target_uri)}
    services = AirflowServices(AirflowHome(Path(args.home)), env=env, port=args.port, triggerer=args.triggerer)

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # run the finally below on SIGTERM too

    signal.signal(signal.SIGTERM, _terminate)
    try:
        services.start()
        services.wait_for_dag("mongo_to_atlas")
        print(f"Airflow API: {services.base_url} (ready in {services.ready_after:.0f}s)\n"
              f"user: {services.username}; password in {services.password_file}\n"
              f"logs: {services.log_dir}\nCtrl-C stops every component.", flush=True)
        while True:
            services.check_running()
            time.sleep(2)
    except KeyboardInterrupt:
        pass
    except ServicesError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        survivors = services.stop()
        if survivors:
            print(f"still running after SIGKILL: {survivors}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
