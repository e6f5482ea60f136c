"""MongoDB Database Tools (mongodump/mongorestore), used when both are on ``PATH``.

Credentials never reach argv (visible to every local user through ``ps``/``/proc``): the connection string
goes into a temporary 0600 YAML file passed with ``--config``, deleted as soon as the tool exits. Tool output
is redacted line by line before it is logged or put into an exception.

What the builders never emit, whatever the caller asks: ``--restoreDbUsersAndRoles`` (Atlas does not
support it), ``--oplog``/``--oplogReplay`` (point-in-time dumps are not this engine's job) and namespaces in
``admin``, ``local`` or ``config``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atlas_migration.errors import ConfigurationError, ToolFailed
from atlas_migration.namespaces import SYSTEM_DATABASES, is_never_migrated
from atlas_migration.redaction import redact

MONGODUMP = "mongodump"
MONGORESTORE = "mongorestore"
OUTPUT_TAIL_LINES = 40
DEFAULT_INSERTION_WORKERS = 1

# Flags that would put a secret in argv, replay an oplog, or restore users/roles: refused in ``extra``.
_FORBIDDEN_FLAGS = (
    "--password", "-p", "--uri", "--restoreDbUsersAndRoles", "--dumpDbUsersAndRoles", "--oplog",
    "--oplogReplay", "--oplogFile", "--oplogLimit", "--sslPEMKeyPassword", "--tlsCertificateKeyFilePassword",
)
# mongorestore's last line: "123 document(s) restored successfully. 4 document(s) failed to restore."
_RESTORE_SUMMARY = re.compile(
    r"(\d+) document\(s\) restored successfully\. (\d+) document\(s\) failed to restore"
)


def tools_available() -> bool:
    """Whether both mongodump and mongorestore are on ``PATH``."""
    return shutil.which(MONGODUMP) is not None and shutil.which(MONGORESTORE) is not None


# ------------------------------------------------------------------------------------------- config file
def yaml_double_quoted(value: str) -> str:
    """``value`` as a YAML double-quoted scalar (the tools parse their --config file as YAML)."""
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0 or ch in "\u2028\u2029\ufeff":
            # Control characters and YAML line breaks must be escaped to survive a double-quoted scalar.
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


@contextmanager
def tool_config_file(uri: str, *, directory: Path | str | None = None) -> Iterator[Path]:
    """A temporary YAML ``--config`` file holding ``uri: "<uri>"`` (mode 0600), deleted on exit."""
    if not uri or not isinstance(uri, str):
        raise ConfigurationError("a connection string is required for the MongoDB Database Tools")
    # mkstemp creates the file 0600 from the start: there is no window in which others could read it.
    fd, name = tempfile.mkstemp(prefix="mongotools-", suffix=".yaml", dir=directory)
    path = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(f"uri: {yaml_double_quoted(uri)}\n")
        os.chmod(path, 0o600)
        yield path
    finally:
        path.unlink(missing_ok=True)


# -------------------------------------------------------------------------------------------- argv builders
def escape_namespace_pattern(text: str) -> str:
    """Make a literal name safe inside --nsInclude/--nsFrom/--nsTo: ``\\`` and ``*`` get a backslash."""
    return text.replace("\\", "\\\\").replace("*", "\\*")


def _check_extra(extra: Sequence[str]) -> list[str]:
    args = [str(a) for a in extra]
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in _FORBIDDEN_FLAGS:
            raise ConfigurationError(
                f"extra tool argument '{flag}' is not allowed: credentials go through the config file, and "
                "oplog replay and users/roles restores are not part of a migration to Atlas"
            )
    return args


def _check_namespace(db: str, coll: str) -> None:
    if not db or not coll:
        raise ConfigurationError(f"'{db}.{coll}' is not a namespace: database and collection are required")
    if is_never_migrated(db, coll):
        raise ConfigurationError(f"{db}.{coll} is never migrated (admin, local, config and system.* are excluded)")
    if "$" in db or "$" in coll:
        # mongorestore rejects '$' in --nsInclude patterns, and MongoDB forbids it in user namespaces.
        raise ConfigurationError(f"namespace {db}.{coll} contains '$', which mongorestore cannot select")


def mongodump_argv(
    config_path: Path | str,
    out_dir: Path | str,
    db: str,
    coll: str,
    *,
    gzip: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """``mongodump --config=... --out=... --db=... --collection=... [--gzip]`` for one namespace."""
    _check_namespace(db, coll)
    argv = [
        MONGODUMP,
        f"--config={config_path}",
        f"--out={out_dir}",
        f"--db={db}",
        f"--collection={coll}",  # a literal name, not a pattern: no escaping
    ]
    if gzip:
        argv.append("--gzip")
    return argv + _check_extra(extra)


def mongorestore_argv(
    config_path: Path | str,
    dump_dir: Path | str,
    namespaces: Iterable[str | tuple[str, str]],
    *,
    drop: bool,
    gzip: bool = True,
    workers: int = DEFAULT_INSERTION_WORKERS,
    target_db: str | None = None,
    bypass_document_validation: bool = True,
    stop_on_error: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """``mongorestore`` restoring exactly ``namespaces`` (``"db.coll"`` or ``(db, coll)``) from ``dump_dir``.

    ``target_db`` renames the (single) source database with ``--nsFrom/--nsTo``. ``stop_on_error`` is on by
    default because mongorestore otherwise exits 0 after failing to insert documents.
    """
    pairs: list[tuple[str, str]] = []
    for ns in namespaces:
        if isinstance(ns, tuple):
            db, coll = ns
        else:
            db, sep, coll = str(ns).partition(".")
            if not sep:
                raise ConfigurationError(f"'{ns}' is not a namespace of the form <database>.<collection>")
        _check_namespace(db, coll)
        pairs.append((db, coll))
    if not pairs:
        raise ConfigurationError("mongorestore needs at least one namespace to restore")
    if workers < 1:
        raise ConfigurationError("workers must be at least 1")

    argv = [MONGORESTORE, f"--config={config_path}", f"--dir={dump_dir}"]
    argv += [f"--nsInclude={escape_namespace_pattern(db)}.{escape_namespace_pattern(coll)}" for db, coll in pairs]
    source_dbs = sorted({db for db, _ in pairs})
    if target_db:
        if target_db in SYSTEM_DATABASES or "$" in target_db or "." in target_db:
            raise ConfigurationError(f"'{target_db}' cannot be a target database")
        if len(source_dbs) > 1:
            raise ConfigurationError(
                f"target_db '{target_db}' would merge databases {', '.join(source_dbs)}: restore one source "
                "database per call"
            )
        if target_db != source_dbs[0]:
            # One wildcard rename per database: --nsInclude already selected the collections.
            argv += [
                f"--nsFrom={escape_namespace_pattern(source_dbs[0])}.*",
                f"--nsTo={escape_namespace_pattern(target_db)}.*",
            ]
    argv.append(f"--numInsertionWorkersPerCollection={workers}")
    if gzip:
        argv.append("--gzip")
    if drop:
        argv.append("--drop")
    if bypass_document_validation:
        argv.append("--bypassDocumentValidation")
    if stop_on_error:
        argv.append("--stopOnError")
    return argv + _check_extra(extra)


# ------------------------------------------------------------------------------------------------- runner
@dataclass
class ToolResult:
    """A finished tool run (argv carries no secrets; output lines are redacted)."""

    argv: list[str]
    returncode: int
    seconds: float
    output_tail: list[str] = field(default_factory=list)
    documents_restored: int | None = None  # from mongorestore's summary line, when present
    documents_failed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "argv": list(self.argv), "returncode": self.returncode, "seconds": round(self.seconds, 3),
            "output_tail": list(self.output_tail), "documents_restored": self.documents_restored,
            "documents_failed": self.documents_failed,
        }


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def run_tool(
    argv: Sequence[str],
    *,
    secrets: Iterable[str | None] = (),
    log: logging.Logger | logging.LoggerAdapter[Any],
    tail_lines: int = OUTPUT_TAIL_LINES,
) -> ToolResult:
    """Run a tool (argv list, no shell), log its redacted output as it comes, raise ``ToolFailed`` on failure.

    Failure means a non-zero exit, or a mongorestore summary reporting documents that failed to restore.
    If this call is interrupted (task timeout, kill), the tool is terminated rather than left running.
    """
    argv = [str(a) for a in argv]
    secrets = [s for s in secrets if s]
    shown = redact(" ".join(argv), secrets)
    tool = Path(argv[0]).name if argv else "tool"
    tail: deque[str] = deque(maxlen=tail_lines)
    restored = failed = None
    started = time.monotonic()
    log.info("running %s", shown)
    try:
        # stderr folded into stdout: the tools log to stderr, and one pipe cannot deadlock on the other.
        process = subprocess.Popen(  # noqa: S603 - an argv list built by this module, no shell
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    except OSError as exc:
        raise ToolFailed(f"cannot start {tool}: {redact(str(exc), secrets)}") from None
    try:
        assert process.stdout is not None
        for raw_line in process.stdout:
            line = redact(raw_line.decode("utf-8", errors="replace").rstrip("\r\n"), secrets)
            if not line:
                continue
            tail.append(line)
            log.info("%s: %s", tool, line)
            summary = _RESTORE_SUMMARY.search(line)
            if summary:
                restored, failed = int(summary.group(1)), int(summary.group(2))
        returncode = process.wait()
    except BaseException:
        _stop(process)
        raise
    finally:
        if process.stdout is not None:
            process.stdout.close()
    result = ToolResult(
        argv=[redact(a, secrets) for a in argv], returncode=returncode, seconds=time.monotonic() - started,
        output_tail=list(tail), documents_restored=restored, documents_failed=failed,
    )
    if returncode != 0 or (failed or 0) > 0:
        why = f"exited with code {returncode}" if returncode != 0 else f"failed to restore {failed} document(s)"
        output = "\n".join(tail) or "(no output)"
        raise ToolFailed(f"{tool} {why}. Last output lines:\n{output}")
    log.info("%s finished in %.1fs", tool, result.seconds)
    return result


__all__ = [
    "ToolResult",
    "escape_namespace_pattern",
    "mongodump_argv",
    "mongorestore_argv",
    "run_tool",
    "tool_config_file",
    "tools_available",
    "yaml_double_quoted",
]
