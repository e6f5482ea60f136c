"""Start and stop real MongoDB-compatible server processes on free loopback ports.

The servers are SecantusDB (``secantusd-py``): WiredTiger storage, a one-node replica set with a real
``local.oplog.rs`` (or ``--standalone`` for a source without an oplog). Every process is started in its own
session and stopped by PID, so nothing outlives the demo or the test run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SERVER_COMMAND = "secantusd-py"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_executable() -> str:
    # Prefer the one installed beside the running interpreter (the project's venv).
    beside = Path(sys.executable).parent / SERVER_COMMAND
    if beside.exists():
        return str(beside)
    found = shutil.which(SERVER_COMMAND)
    if not found:
        raise RuntimeError(f"{SERVER_COMMAND} not found: run `make env` (it installs SecantusDB)")
    return found


@dataclass
class LocalMongoServer:
    """One server process. ``uri`` has no credentials; use ``uri_for(user, password)`` for auth."""

    port: int
    storage_path: Path
    standalone: bool = False
    auth: bool = False
    extra_args: list[str] = field(default_factory=list)
    log_path: Path | None = None
    process: subprocess.Popen | None = None
    _own_storage: bool = False

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def uri(self) -> str:
        return f"mongodb://{self.host}/?directConnection=true"

    def uri_for(self, user: str, password: str, auth_source: str = "admin") -> str:
        from urllib.parse import quote_plus

        return (
            f"mongodb://{quote_plus(user)}:{quote_plus(password)}@{self.host}/"
            f"?directConnection=true&authSource={auth_source}"
        )

    def start(self, timeout: float = 60.0) -> LocalMongoServer:
        argv = [
            _server_executable(),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--storage-path", str(self.storage_path),
            "--log-level", "WARNING",
            "--cache-size", "256M",
        ]
        if self.standalone:
            argv.append("--standalone")
        if self.auth:
            argv.append("--auth")
        argv += self.extra_args
        self.log_path = self.log_path or self.storage_path.with_suffix(".log")
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import pymongo

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process and self.process.poll() is not None:
                raise RuntimeError(f"server on port {self.port} exited: {self._log_tail()}")
            try:
                with pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=500) as client:
                    client.admin.command("ping")
                    return
            except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
                last = exc
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server on port {self.port} not ready after {timeout}s: {last}")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:] if self.log_path else ""
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def restart(self, *, auth: bool | None = None) -> LocalMongoServer:
        self.stop()
        if auth is not None:
            self.auth = auth
        return self.start()

    def destroy(self) -> None:
        self.stop()
        if self._own_storage:
            shutil.rmtree(self.storage_path, ignore_errors=True)


def start_server(
    workdir: Path | None = None,
    *,
    standalone: bool = False,
    oplog_max_entries: int | None = None,
    users: list[dict] | None = None,
    extra_args: list[str] | None = None,
) -> LocalMongoServer:
    """Start a server on a free port with on-disk storage under ``workdir``.

    ``users``: ``[{"user", "pwd", "roles"}]`` created in ``admin`` first, then the server is restarted with
    ``--auth`` (the server's documented way of provisioning SCRAM users).
    """
    own = workdir is None
    base = Path(workdir or tempfile.mkdtemp(prefix="mongo-server-"))
    base.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = list(extra_args or [])
    if oplog_max_entries is not None:
        args += ["--oplog-max-entries", str(oplog_max_entries)]
    server = LocalMongoServer(
        port=port, storage_path=base / f"db-{port}", standalone=standalone, extra_args=args, _own_storage=True
    )
    server.start()
    if users:
        import pymongo

        with pymongo.MongoClient(server.uri) as client:
            for spec in users:
                client.admin.command("createUser", spec["user"], pwd=spec["pwd"], roles=spec["roles"])
        server.restart(auth=True)
    if own:
        server._own_storage = True
    return server
