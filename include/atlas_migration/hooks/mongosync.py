"""The mongosync (Cluster-to-Cluster Sync) REST API as an Airflow hook, and the shapes of its replies.

mongosync listens on ``http://localhost:27182/api/v1`` by default. Every call is a POST with a JSON body
(``{}`` when the endpoint takes none) except ``GET /progress``; replies are ``{"success": true}`` or
``{"success": false, "error": "<name>", "errorDescription": "..."}``. Which calls are allowed depends on
the state (section 3 of the contracts README)::

    INITIALIZING -> IDLE -start-> RUNNING <-pause/resume-> PAUSED
    RUNNING -commit (canCommit)-> COMMITTING -> COMMITTED (automatic) -reverse (reversible)-> REVERSING -> RUNNING

``MongosyncHook`` offers ``start``, ``pause``, ``resume``, ``commit``, ``reverse`` and ``progress``; every
``success: false`` is raised as ``MongosyncError`` carrying mongosync's ``error`` and ``errorDescription``;
``MongosyncProgress`` is a ``/progress`` reply. What the live pull decides from them (when to commit, which
release and write-blocking plan, namespace filters, the fence around ``/commit``) is in
``atlas_migration.engines.mongosync``.

Connection (mongosync's API has no authentication, so no credential is ever read or sent)::

    AIRFLOW_CONN_MONGOSYNC_DEFAULT='{"conn_type": "mongosync", "host": "mongosync-host", "port": 27182,
                                     "schema": "http"}'

``host`` may also be a full URL (``http://host:27182/api/v1``, or a proxy's ``https://proxy/mongosync``;
``/api/v1`` is appended when missing); ``schema`` is the URL scheme (``http`` or ``https``, as for Airflow's
``http`` connections, which are accepted too). Login and password are never read. Without a connection id
the hook uses ``http://localhost:27182/api/v1``.
"""


from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
from airflow.sdk import BaseHook

from atlas_migration.connection_forms import (
    MONGOSYNC_CONN_TYPE,
    MONGOSYNC_DEFAULT_PORT,
    WRITE_BLOCKING_VALUES,
    field_behaviour,
    form_widgets,
)
from atlas_migration.errors import ConfigurationError, MigrationError
from atlas_migration.hooks.atlas import RetryPolicy
from atlas_migration.redaction import redact

DEFAULT_BASE_URL = "http://localhost:27182/api/v1"
DEFAULT_PORT = MONGOSYNC_DEFAULT_PORT
API_PATH = "/api/v1"
CONN_TYPE = MONGOSYNC_CONN_TYPE
ACCEPTED_CONN_TYPES = frozenset({"mongosync", "http", "https"})
# mongosync turns canCommit false while the lag exceeds this (contracts README, section 3).
COMMIT_LAG_LIMIT_SECONDS = 30

# States, as /progress reports them.
INITIALIZING, IDLE, RUNNING, PAUSED = "INITIALIZING", "IDLE", "RUNNING", "PAUSED"
COMMITTING, COMMITTED, REVERSING = "COMMITTING", "COMMITTED", "REVERSING"
STATES = (INITIALIZING, IDLE, RUNNING, PAUSED, COMMITTING, COMMITTED, REVERSING)

# ``info`` values /progress reports.
INFO_COLLECTION_COPY = "collection copy"
INFO_CHANGE_EVENT_APPLICATION = "change event application"
INFO_WAITING_FOR_COMMIT = "waiting for commit to complete"
INFO_COMMIT_COMPLETED = "commit completed"

BUILD_INDEXES_OPTIONS = ("afterDataCopy", "beforeDataCopy", "excludeHashed", "excludeHashedAfterCopy", "never")
WRITE_BLOCKING_OPTIONS = WRITE_BLOCKING_VALUES


class MongosyncError(MigrationError):
    """mongosync refused a call (``success: false``) or could not be reached (``error`` is then None)."""

    def __init__(self, message: str, *, error: str | None = None, error_description: str | None = None,
                 endpoint: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.error = error
        self.error_description = error_description
        self.endpoint = endpoint
        self.status = status

    def __repr__(self) -> str:
        return (f"MongosyncError(error={self.error!r}, error_description={self.error_description!r}, "
                f"endpoint={self.endpoint!r})")

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the attributes when pickled (the default only keeps ``args``).
        return (type(self), (str(self),), self.__dict__)


# --------------------------------------------------------------------------------------------------
# /progress
# --------------------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def reply_lag_seconds(body: dict[str, Any]) -> float | None:
    """The sync's lag from a ``progress`` object: ``lag.overallLagSeconds`` (1.21+), else the deprecated
    ``lagTimeSeconds``."""
    lag = body.get("lag")
    overall = _number(lag.get("overallLagSeconds")) if isinstance(lag, dict) else None
    return overall if overall is not None else _number(body.get("lagTimeSeconds"))


@dataclass(frozen=True)
class MongosyncProgress:
    """The fields of a ``/progress`` reply the DAG decides on; ``raw`` keeps the whole ``progress`` object.

    ``lag_time_seconds`` is the sync's lag whatever the version reports it in (``lag.overallLagSeconds``
    from 1.21, ``lagTimeSeconds`` before); ``estimated_oplog_time_remaining`` and ``warnings`` exist from
    1.19, ``cea_stage`` from 1.22 (None when the reply has no such field).
    """

    state: str
    can_commit: bool
    can_write: bool
    info: str | None
    lag_time_seconds: float | None
    estimated_total_bytes: int | None
    estimated_copied_bytes: int | None
    estimated_oplog_time_remaining: Any = None
    warnings: tuple[Any, ...] = ()
    cea_stage: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_reply(cls, reply: dict[str, Any]) -> MongosyncProgress:
        """Accept the whole reply (``{"success", "progress": {...}}``) or only its ``progress`` object."""
        body = reply.get("progress", reply) if isinstance(reply, dict) else None
        if not isinstance(body, dict) or "state" not in body:
            raise MongosyncError("mongosync /progress reply has no progress.state", endpoint="/progress")
        copy = body.get("collectionCopy") or {}
        warnings = body.get("warnings")
        return cls(
            state=str(body["state"]),
            can_commit=bool(body.get("canCommit")),
            can_write=bool(body.get("canWrite")),
            info=body.get("info"),
            lag_time_seconds=reply_lag_seconds(body),
            estimated_total_bytes=copy.get("estimatedTotalBytes"),
            estimated_copied_bytes=copy.get("estimatedCopiedBytes"),
            estimated_oplog_time_remaining=body.get("estimatedOplogTimeRemaining"),
            warnings=tuple(warnings) if isinstance(warnings, list) else (),
            cea_stage=body.get("ceaStage") if isinstance(body.get("ceaStage"), str) else None,
            raw=body,
        )

    @property
    def copy_fraction(self) -> float | None:
        if not self.estimated_total_bytes or self.estimated_copied_bytes is None:
            return None
        return min(1.0, self.estimated_copied_bytes / self.estimated_total_bytes)

    def summary(self) -> dict[str, Any]:
        """A small JSON-safe dict for XCom and task logs."""
        return {
            "state": self.state, "canCommit": self.can_commit, "canWrite": self.can_write, "info": self.info,
            "lagTimeSeconds": self.lag_time_seconds, "estimatedTotalBytes": self.estimated_total_bytes,
            "estimatedCopiedBytes": self.estimated_copied_bytes,
            "warnings": [str(w)[:300] for w in self.warnings[:10]],
        }

    def line(self) -> str:
        """One log line: state, info, lag and copy progress."""
        text = f"mongosync {self.state}"
        if self.info:
            text += f" ({self.info})"
        if self.lag_time_seconds is not None:
            text += f", lag {self.lag_time_seconds:.0f} s"
        fraction = self.copy_fraction
        if fraction is not None:
            text += (f", copied {self.estimated_copied_bytes / 1e6:,.1f}/{self.estimated_total_bytes / 1e6:,.1f} MB"
                     f" ({100 * fraction:.0f}%)")
        return text + f", canCommit={str(self.can_commit).lower()}, canWrite={str(self.can_write).lower()}"


# --------------------------------------------------------------------------------------------------
# The hook
# --------------------------------------------------------------------------------------------------


# What mongosync calls are retried (shared backoff: ``hooks.atlas.RetryPolicy``, base 1 s here): ``GET
# /progress`` on network errors and 5xx (mongosync documents that /progress may fail for a while after a
# resume or restart, and that retrying is safe); a POST only when it never left this machine (connection
# refused or connect timeout), since repeating a state change could act twice.
DEFAULT_RETRY = RetryPolicy(backoff_base=1.0)


def normalize_base_url(url: str) -> str:
    """``host[:port]`` or ``http(s)://host[:port][/api/v1]`` -> ``http(s)://host:port/api/v1``."""
    text = url.strip().rstrip("/")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"mongosync URL {redact(url)!r} is not http(s)://host:port[/api/v1]")
    if parts.username or parts.password:
        raise ConfigurationError("the mongosync URL must not carry credentials: mongosync's API has no "
                                 "authentication (restrict access to its port instead)")
    port = parts.port or DEFAULT_PORT
    path = parts.path.rstrip("/")
    if not path.endswith(API_PATH):
        path += API_PATH
    return f"{parts.scheme}://{parts.hostname}:{port}{path}"


def _mongosync_payload(response: requests.Response) -> dict[str, Any] | None:
    """The reply's JSON object when it is mongosync's ``{"success": ...}`` shape, else None."""
    try:
        payload = response.json()
    except ValueError:
        return None
    return payload if isinstance(payload, dict) and "success" in payload else None


def _never_sent(exc: requests.RequestException) -> bool:
    if isinstance(exc, requests.ConnectTimeout):
        return True
    text = str(exc)
    return isinstance(exc, requests.ConnectionError) and ("NewConnectionError" in text or "refused" in text)


class MongosyncHook(BaseHook):
    """The mongosync REST API (``http://localhost:27182/api/v1`` unless the connection says otherwise)."""

    conn_name_attr = "mongosync_conn_id"
    default_conn_name = "mongosync_default"
    conn_type = CONN_TYPE
    hook_name = "mongosync"

    def __init__(self, mongosync_conn_id: str | None = default_conn_name, *, base_url: str | None = None,
                 timeout: float = 30.0, retry: RetryPolicy | None = None) -> None:
        super().__init__()
        self.mongosync_conn_id = mongosync_conn_id
        self._base_url = normalize_base_url(base_url) if base_url else None
        self.timeout = timeout
        self.retry = retry or DEFAULT_RETRY
        self._session: requests.Session | None = None
        self._extras: dict[str, Any] = {}
        self.sleep: Callable[[float], None] = time.sleep  # replaceable in tests

    def __repr__(self) -> str:
        return f"MongosyncHook(conn_id={self.mongosync_conn_id!r}, base_url={self._base_url!r})"

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """Extra fields of the connection form: the mongosync release and its write-blocking startup option
        (the extras ``decide_start`` reads). Airflow 3.2+ reads the same fields from the provider info."""
        return form_widgets(cls.conn_type)

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """No login/password (mongosync's API has no authentication); schema is the URL scheme."""
        return field_behaviour(cls.conn_type)

    # ---- configuration ------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http(s)://host:port/api/v1``, read from the connection on first use."""
        if self._base_url is None:
            self._base_url = self._read_connection() if self.mongosync_conn_id else DEFAULT_BASE_URL
        return self._base_url

    @property
    def extras(self) -> dict[str, Any]:
        """The connection's extras (``version``, ``write_blocking``); empty without a connection."""
        _ = self.base_url
        return dict(self._extras)

    def _read_connection(self) -> str:
        conn_id = self.mongosync_conn_id or ""
        try:
            conn = self.get_connection(conn_id)
        except Exception as exc:  # AirflowNotFoundException and friends
            if "NotFound" in type(exc).__name__:
                raise ConfigurationError(
                    f"Airflow connection '{conn_id}' is not defined: create it with type 'mongosync', host and "
                    f"port of the mongosync process (default {DEFAULT_BASE_URL})"
                ) from None
            raise ConfigurationError(f"Airflow connection '{conn_id}' is unusable: {type(exc).__name__}") from None
        if conn.conn_type and conn.conn_type not in ACCEPTED_CONN_TYPES:
            raise ConfigurationError(f"Airflow connection '{conn_id}' has type '{conn.conn_type}'; the mongosync "
                                     "hook needs 'mongosync' (or 'http')")
        try:
            extras = conn.extra_dejson
        except Exception:  # noqa: BLE001 - malformed extras: reported as such, never echoed
            raise ConfigurationError(f"connection '{conn_id}': extras are not a JSON object") from None
        self._extras = dict(extras) if isinstance(extras, dict) else {}
        host = (conn.host or "localhost").strip()
        if "://" not in host:
            scheme = (conn.schema or "http").strip().lower()
            if scheme not in ("http", "https"):
                raise ConfigurationError(f"connection '{conn_id}': schema must be 'http' or 'https' (the URL "
                                         f"scheme), not {conn.schema!r}")
            host = f"{scheme}://{host}:{conn.port or DEFAULT_PORT}"
        elif conn.port and urlsplit(host).port is None:
            parts = urlsplit(host)
            host = f"{parts.scheme}://{parts.hostname}:{conn.port}{parts.path}"
        return normalize_base_url(host)

    def get_conn(self) -> requests.Session:
        if self._session is None:
            self._session = requests.Session()
        return self._session

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    # ---- HTTP ---------------------------------------------------------------------------------

    def _call(self, method: str, endpoint: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        url = self.base_url + endpoint
        session = self.get_conn()
        attempt = 0
        while True:
            try:
                if method == "GET":
                    response = session.get(url, timeout=self.timeout)
                else:
                    response = session.post(url, json=body if body is not None else {}, timeout=self.timeout)
            except requests.RequestException as exc:
                if (method == "GET" or _never_sent(exc)) and attempt < self.retry.max_retries:
                    delay = self.retry.backoff(attempt)
                    self.log.warning("mongosync %s %s: %s; retrying in %.1f s (retry %d of %d)", method, endpoint,
                                     type(exc).__name__, delay, attempt + 1, self.retry.max_retries)
                    self.sleep(delay)
                    attempt += 1
                    continue
                raise MongosyncError(f"cannot reach mongosync at {self.base_url} ({method} {endpoint}): "
                                     f"{type(exc).__name__}: {redact(str(exc))}", endpoint=endpoint) from None
            payload = _mongosync_payload(response)
            if payload is None and response.status_code >= 500 and method == "GET" \
                    and attempt < self.retry.max_retries:
                # Not mongosync speaking (a proxy, or mongosync restarting): worth another look.
                delay = self.retry.backoff(attempt)
                self.log.warning("mongosync %s %s: HTTP %d; retrying in %.1f s (retry %d of %d)", method, endpoint,
                                 response.status_code, delay, attempt + 1, self.retry.max_retries)
                self.sleep(delay)
                attempt += 1
                continue
            if payload is None:
                raise MongosyncError(f"mongosync {method} {endpoint}: HTTP {response.status_code} with a reply that "
                                     "is not mongosync's {success, ...} JSON", endpoint=endpoint,
                                     status=response.status_code)
            if payload.get("success") is not True:
                error, description = payload.get("error"), payload.get("errorDescription")
                raise MongosyncError(f"mongosync refused {method} {endpoint}: {error}: {redact(str(description))}",
                                     error=error, error_description=description, endpoint=endpoint,
                                     status=response.status_code)
            return payload

    # ---- endpoints ----------------------------------------------------------------------------

    @staticmethod
    def start_body(source: str = "cluster0", destination: str = "cluster1", *, build_indexes: str | None = None,
                   include_namespaces: list[dict[str, Any]] | None = None,
                   exclude_namespaces: list[dict[str, Any]] | None = None, reversible: bool | None = None,
                   enable_user_write_blocking: str | bool | None = None,
                   verification_enabled: bool | None = None, write_blocking_in_start: bool = True) -> dict[str, Any]:
        """The ``/start`` body; optional fields are sent only when given (mongosync's defaults apply).

        A reversible sync needs ``enableUserWriteBlocking: "sourceAndDestination"`` (mongosync's reverse
        requirements), so it is added when ``reversible`` is true and no write-blocking mode was given.
        ``write_blocking_in_start=False`` (mongosync 1.20+) never sends the field: it was removed from
        ``/start``, and write blocking is then mongosync's startup configuration.
        """
        if not write_blocking_in_start and enable_user_write_blocking is not None:
            raise ConfigurationError("enableUserWriteBlocking was removed from /start in mongosync 1.20: write "
                                     "blocking is set in mongosync's startup configuration")
        if build_indexes is not None and build_indexes not in BUILD_INDEXES_OPTIONS:
            raise ConfigurationError(f"buildIndexes {build_indexes!r} is not one of {', '.join(BUILD_INDEXES_OPTIONS)}")
        if isinstance(enable_user_write_blocking, str) and enable_user_write_blocking not in WRITE_BLOCKING_OPTIONS:
            raise ConfigurationError(f"enableUserWriteBlocking {enable_user_write_blocking!r} is not one of "
                                     f"{', '.join(WRITE_BLOCKING_OPTIONS)} (or true/false)")
        body: dict[str, Any] = {"source": source, "destination": destination}
        if build_indexes is not None:
            body["buildIndexes"] = build_indexes
        if include_namespaces:
            body["includeNamespaces"] = include_namespaces
        if exclude_namespaces:
            body["excludeNamespaces"] = exclude_namespaces
        if reversible is not None:
            body["reversible"] = bool(reversible)
            if reversible and enable_user_write_blocking is None and write_blocking_in_start:
                enable_user_write_blocking = "sourceAndDestination"
        if enable_user_write_blocking is not None:
            body["enableUserWriteBlocking"] = enable_user_write_blocking
        if verification_enabled is not None:
            body["verification"] = {"enabled": bool(verification_enabled)}
        return body

    def start(self, source: str = "cluster0", destination: str = "cluster1", **options: Any) -> None:
        """``POST /start`` (IDLE only); ``options`` as ``start_body``."""
        body = self.start_body(source, destination, **options)
        self._call("POST", "/start", body)
        self.log.info("mongosync started: %s -> %s (%s)", source, destination,
                      ", ".join(k for k in body if k not in ("source", "destination")) or "no options")

    def pause(self) -> None:
        """``POST /pause`` (RUNNING only)."""
        self._call("POST", "/pause")

    def resume(self) -> None:
        """``POST /resume`` (PAUSED only)."""
        self._call("POST", "/resume")

    def commit(self) -> None:
        """``POST /commit`` (RUNNING with canCommit); mongosync then goes COMMITTING -> COMMITTED by itself."""
        self._call("POST", "/commit")

    def reverse(self) -> None:
        """``POST /reverse`` (COMMITTED, and only when the sync was started reversible)."""
        self._call("POST", "/reverse")

    def progress(self) -> MongosyncProgress:
        """``GET /progress``."""
        return MongosyncProgress.from_reply(self._call("GET", "/progress"))
