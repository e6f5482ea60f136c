"""Redis and PostgreSQL from Debian's packages, started on loopback for a distributed-executor test.

Airflow's CeleryExecutor needs a broker (Redis here) and a metadata database that several processes can
use at once (PostgreSQL: SQLite is for the single-machine executors). Each server runs in its own
temporary folder on a free port, with nothing persisted, and is stopped by ``stop()`` / the context
manager. ``.ci/run`` installs the packages (``redis-server``, ``postgresql``); ``available()`` says whether
the binaries are here.

PostgreSQL refuses to run as root: as root, ``initdb`` and the server run as the ``postgres`` user that
Debian's package creates (through ``runuser``), in a folder that user owns.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from devtools.mongo_servers import free_port


def _postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian: /usr/lib/postgresql/<major>/bin)."""
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    if folders:
        return Path(folders[-1])
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def redis_available() -> bool:
    return shutil.which("redis-server") is not None


def postgres_available() -> bool:
    folder = _postgres_bin()
    return folder is not None and (folder / "initdb").exists() and (os.geteuid() != 0 or shutil.which("runuser") is not None)


def worker_hostname() -> str:
    """The host name a worker reports to Airflow (``[core] hostname_callable``): the machine's name plus
    ``MIGRATION_TEST_WORKER_NAME``, so two workers on one test machine tell apart in task instances the way
    workers on two hosts would."""
    import socket

    return f"{socket.gethostname()}-{os.environ.get('MIGRATION_TEST_WORKER_NAME', 'worker')}"


def _wait_port(port: int, timeout: float, process: subprocess.Popen, log: Path, what: str) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}:\n{log.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} not listening on 127.0.0.1:{port} after {timeout:.0f}s:\n"
                       f"{log.read_text(errors='replace')[-2000:]}")


@dataclass
class RedisServer:
    """``redis-server`` on 127.0.0.1, no persistence."""

    folder: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = self.folder / "redis.log"
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.folder), "--logfile", str(log), "--daemonize", "no"]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        _wait_port(self.port, 30, self.process, log, "redis-server")
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class PostgresServer:
    """A throw-away PostgreSQL cluster on 127.0.0.1 with one database, trusted local connections only."""

    folder: Path
    database: str = "airflow"
    user: str = "airflow"
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def sqlalchemy_url(self) -> str:
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _as_owner(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    def start(self) -> PostgresServer:
        bin_dir = _postgres_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        data = self.folder / "data"
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # The tmp folders above are root's: the postgres user needs to reach and own its own folder.
            for parent in [self.folder, *self.folder.parents]:
                if parent == Path("/"):
                    break
                parent.chmod(parent.stat().st_mode | 0o011)
            shutil.chown(self.folder, "postgres", "postgres")
        init = subprocess.run(self._as_owner([str(bin_dir / "initdb"), "-D", str(data), "-U", self.user,
                                              "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"]),
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{init.stdout[-1500:]}\n{init.stderr[-1500:]}")
        log = self.folder / "postgres.log"
        log_handle = open(log, "ab")  # noqa: SIM115 - handed to the child process
        try:
            # Loopback TCP only, the socket in the cluster's own folder, durability off (nothing here must
            # survive a crash), enough connections for scheduler, api-server, dag-processor and two workers.
            self.process = subprocess.Popen(
                self._as_owner([str(bin_dir / "postgres"), "-D", str(data), "-p", str(self.port), "-k", str(self.folder),
                                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                                "-c", "full_page_writes=off", "-c", "max_connections=200"]),
                stdin=subprocess.DEVNULL, stdout=log_handle, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log_handle.close()
        _wait_port(self.port, 60, self.process, log, "postgres")
        created = subprocess.run(self._as_owner([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                                                 "-U", self.user, self.database]),
                                 capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
        if created.returncode != 0:
            self.stop()
            raise RuntimeError(f"createdb failed: {created.stderr[-1500:]}")
        return self

    def stop(self) -> None:
        if not self.process or self.process.poll() is not None:
            return
        # SIGINT to the postmaster itself is PostgreSQL's "fast" shutdown (SIGTERM would wait for clients);
        # runuser in between does not pass SIGINT on, so the pid comes from the cluster's postmaster.pid.
        pid_file = self.folder / "data" / "postmaster.pid"
        try:
            os.kill(int(pid_file.read_text().split()[0]), 2)
        except (OSError, ValueError, IndexError):
            self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait(timeout=10)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
