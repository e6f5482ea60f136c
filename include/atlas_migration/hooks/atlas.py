"""Airflow hooks for the Atlas Administration API v2 and the Cloud Manager API (live migration, push).

``AtlasAdminHook`` covers section 1 of the contract (link-tokens, available projects, validation, live
migrations and cutover, clusters, network peering containers and connections, the project access list);
``CloudManagerHook`` covers section 2 (the Cloud Manager side of the organization link). Both speak plain
``requests`` and follow the same rules:

- every Atlas call sends ``Accept: application/vnd.atlas.<version>+json`` with the version that endpoint
  has (``API_VERSIONS``); Cloud Manager calls send ``Accept: application/json``;
- ``429`` is retried after the ``Retry-After`` the service sent (or a backoff when it sent none);
  ``5xx`` is retried with capped exponential backoff and jitter, every status for GET/PUT/DELETE, only
  502/503/504 for POST (a POST answered 500 may have been applied; repeating it could create a second
  migration); network errors likewise only when repeating is safe (``RetryPolicy``);
- every failure is an ``AtlasApiError`` carrying ``status``, ``error_code`` and ``detail``;
- no key, secret, bearer token or link-token appears in a log line, an exception or a ``repr``.

Connections (created in the UI, or as ``AIRFLOW_CONN_<ID>`` JSON; use the JSON form: the URI form cannot
carry the ``http://`` of a base URL in the host field)::

    # API key pair (HTTP Digest)
    AIRFLOW_CONN_MONGODB_ATLAS_DEFAULT='{"conn_type": "mongodb_atlas",
        "host": "https://cloud.mongodb.com", "login": "<public key>", "password": "<private key>",
        "extra": {"org_id": "<24-hex org id>", "project_id": "<24-hex project id>"}}'

    # service account (OAuth 2.0 client credentials; the token is cached until shortly before expiry)
    AIRFLOW_CONN_MONGODB_ATLAS_DEFAULT='{"conn_type": "mongodb_atlas",
        "extra": {"client_id": "mdb_sa_id_...", "client_secret": "mdb_sa_sk_...",
                  "org_id": "...", "project_id": "..."}}'

    # Cloud Manager API key pair of the source organization (HTTP Digest)
    AIRFLOW_CONN_MONGODB_CLOUD_MANAGER_DEFAULT='{"conn_type": "mongodb_cloud_manager",
        "host": "https://cloud.mongodb.com", "login": "<public key>", "password": "<private key>",
        "extra": {"org_id": "<24-hex Cloud Manager org id>"}}'

``host`` defaults to ``https://cloud.mongodb.com``. Installed as a distribution (``pip install -e .``), the
package registers both connection types with Airflow (``atlas_migration.provider_info``), and Admin >
Connections shows their forms (``atlas_migration.connection_forms``); the form stores extras under their
plain names, an Airflow 2 form under ``extra__<type>__<name>``: the hooks read both.

Hooks read their connection on first use, never in ``__init__``, so building one at DAG parse time is free.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import requests
from airflow.sdk import BaseHook
from requests.auth import HTTPBasicAuth, HTTPDigestAuth

from atlas_migration.connection_forms import (
    ATLAS_CONN_TYPE,
    CLOUD_MANAGER_CONN_TYPE,
    DEFAULT_CLOUD_BASE_URL,
    HOOK_NAMES,
    field_behaviour,
    form_widgets,
    read_extra,
)
from atlas_migration.errors import ConfigurationError, MigrationError
from atlas_migration.redaction import redact
from atlas_migration.token_cache import SharedTokenCache

DEFAULT_BASE_URL = DEFAULT_CLOUD_BASE_URL
ATLAS_PATH = "/api/atlas/v2"
CLOUD_MANAGER_PATH = "/api/public/v1.0"
TOKEN_PATH = "/api/oauth/token"

# Resource versions per endpoint, as the contract's table (and the Atlas OpenAPI spec) give them.
API_VERSIONS: dict[str, str] = {
    "create_link_token": "2023-01-01",
    "delete_link_tokens": "2023-01-01",
    "list_available_projects": "2023-01-01",
    "validate_live_migration": "2024-05-30",
    "get_live_migration_validation": "2023-01-01",
    "create_live_migration": "2024-05-30",
    "get_live_migration": "2023-01-01",
    "cutover_live_migration": "2023-01-01",
    "get_cluster": "2024-08-05",
    "create_container": "2023-01-01",
    "list_containers": "2023-01-01",
    "create_peering_connection": "2023-01-01",
    "get_peering_connection": "2023-01-01",
    "add_access_list_entries": "2023-01-01",
    "list_access_list": "2023-01-01",
    "list_peering_connections": "2023-01-01",
    "delete_peering_connection": "2023-01-01",
    "delete_container": "2023-01-01",
    "delete_access_list_entry": "2023-01-01",
}

_IDEMPOTENT = frozenset({"GET", "PUT", "DELETE", "HEAD"})
_POST_RETRYABLE_5XX = frozenset({502, 503, 504})  # the gateway answered: the request never reached the service

log = logging.getLogger(__name__)


class AtlasApiError(MigrationError):
    """An Atlas or Cloud Manager API call failed. ``status`` is None when the service could not be reached;
    ``never_sent`` is then True when the request provably never left (refused or timed-out connect), False
    when it may have reached the service (a reset or a read timeout)."""

    def __init__(self, message: str, *, status: int | None = None, error_code: str | None = None,
                 detail: str | None = None, method: str = "", path: str = "", reason: str | None = None,
                 parameters: list[Any] | None = None, retry_after: float | None = None,
                 never_sent: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.detail = detail
        self.method = method
        self.path = path
        self.reason = reason
        self.parameters = parameters or []
        self.retry_after = retry_after
        self.never_sent = never_sent

    def __repr__(self) -> str:
        return f"AtlasApiError(status={self.status!r}, error_code={self.error_code!r}, detail={self.detail!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the attributes when pickled (the default only keeps ``args``, i.e. the message).
        return (type(self), (str(self),), self.__dict__)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to retry: ``max_retries`` further attempts, backoff ``base * 2**n`` capped at ``backoff_max``.

    A ``Retry-After`` longer than ``max_retry_after`` is not slept through: the error is raised with its
    ``retry_after`` so the task can be retried by Airflow instead of holding a worker slot.
    """

    max_retries: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    max_retry_after: float = 120.0

    def backoff(self, attempt: int) -> float:
        # "Equal jitter": half fixed, half random, so parallel tasks do not retry in lockstep.
        delay = min(self.backoff_max, self.backoff_base * (2 ** attempt))
        return delay / 2 + random.uniform(0, delay / 2)  # noqa: S311 - jitter, not cryptography


# --------------------------------------------------------------------------------------------------
# Request bodies
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveMigrationSource:
    """The Cloud Manager-monitored source: ``group_id`` is the Cloud Manager project id."""

    cluster_name: str
    group_id: str
    managed_authentication: bool = True
    ssl: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_certificate_path: str | None = None

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"clusterName": self.cluster_name, "groupId": self.group_id,
                                "managedAuthentication": self.managed_authentication, "ssl": self.ssl}
        for key, value in (("username", self.username), ("password", self.password),
                           ("caCertificatePath", self.ca_certificate_path)):
            if value is not None:
                body[key] = value
        return body


@dataclass(frozen=True)
class LiveMigrationDestination:
    cluster_name: str
    group_id: str
    hostname_schema_type: str = "PUBLIC"  # PUBLIC | PRIVATE_LINK | VPC_PEERING
    private_link_id: str | None = None

    def to_body(self) -> dict[str, Any]:
        body = {"clusterName": self.cluster_name, "groupId": self.group_id,
                "hostnameSchemaType": self.hostname_schema_type}
        if self.private_link_id is not None:
            body["privateLinkId"] = self.private_link_id
        return body


@dataclass(frozen=True)
class ShardingEntry:
    """Shard ``database.collection`` on the destination with ``key`` (e.g. ``[{"customerId": 1}]``)."""

    database: str
    collection: str
    key: tuple[dict[str, int], ...]

    def to_body(self) -> dict[str, Any]:
        return {"database": self.database, "collection": self.collection,
                "shardCollection": {"key": [dict(k) for k in self.key]}}


@dataclass(frozen=True)
class LiveMigrationRequest:
    """The create/validate body (version 2024-05-30). Atlas takes exactly one migration host."""

    source: LiveMigrationSource
    destination: LiveMigrationDestination
    migration_host: str
    drop_destination_data: bool = False
    sharding_entries: tuple[ShardingEntry, ...] = ()
    create_supporting_indexes: bool = False

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"source": self.source.to_body(), "destination": self.destination.to_body(),
                                "migrationHosts": [self.migration_host],
                                "dropDestinationData": self.drop_destination_data}
        if self.sharding_entries:
            body["sharding"] = {"createSupportingIndexes": self.create_supporting_indexes,
                                "shardingEntries": [e.to_body() for e in self.sharding_entries]}
        return body

    def secrets(self) -> list[str]:
        return [self.source.password] if self.source.password else []


def _migration_body(request: LiveMigrationRequest | dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    if isinstance(request, LiveMigrationRequest):
        return request.to_body(), request.secrets()
    password = (request.get("source") or {}).get("password")
    return request, [password] if password else []


# --------------------------------------------------------------------------------------------------
# Connection settings and authentication
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiConnectionConfig:
    """What a ``mongodb_atlas`` / ``mongodb_cloud_manager`` connection says; secrets never in the repr."""

    conn_id: str
    base_url: str
    org_id: str | None = None
    project_id: str | None = None
    public_key: str | None = None
    private_key: str | None = field(default=None, repr=False)
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)

    @property
    def uses_service_account(self) -> bool:
        return bool(self.client_id)

    def secrets(self) -> list[str]:
        # The public key is not secret on its own, but it names the key pair: keep it out of messages too.
        return [s for s in (self.private_key, self.client_secret, self.public_key) if s]


# An extra written either plainly (Airflow 3's form, JSON connections) or with Airflow 2's form prefix.
_extra = read_extra


def _base_url(host: str | None, port: int | None) -> str:
    url = (host or DEFAULT_BASE_URL).strip().rstrip("/")
    if "://" not in url:
        url = "https://" + url
    for suffix in (ATLAS_PATH, CLOUD_MANAGER_PATH):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    scheme, _, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    if port and ":" not in netloc:
        netloc = f"{netloc}:{port}"
    return f"{scheme}://{netloc}{slash}{path}".rstrip("/")


class _ServiceAccountToken:
    """OAuth 2.0 client-credentials token, fetched on demand and reused until shortly before it expires, by
    this process and (through ``SharedTokenCache``: encrypted, keyed by a hash) every task and trigger poll
    on the machine."""

    def __init__(self, client_id: str, client_secret: str, clock: Callable[[], float],
                 shared: SharedTokenCache | None = None) -> None:
        self.client_id = client_id
        self._secret = client_secret
        self._clock = clock
        self._token: str | None = None
        self._refresh_at = 0.0
        self._shared = shared
        self._stale: str | None = None  # the token this process saw expire: never taken back from the file

    def __repr__(self) -> str:
        return f"_ServiceAccountToken(client_id={self.client_id!r}, cached={self._token is not None})"

    def valid(self) -> str | None:
        if self._token and self._clock() < self._refresh_at:
            return self._token
        if self._token:
            self._stale, self._token = self._token, None
        if self._shared is not None:
            cached = self._shared.load(margin=60.0)
            if cached and cached[0] != self._stale:
                self._set(*cached)
                return self._token
        return None

    def store(self, token: str, expires_in: float) -> None:
        self._set(token, expires_in)
        if self._shared is not None:
            try:
                self._shared.save(token, expires_in)
            except OSError as exc:  # the cache is an optimisation: never fail a call for it
                log.warning("could not write the shared service-account token cache: %s", exc.strerror)

    def _set(self, token: str, expires_in: float) -> None:
        # Refresh a little early (at most a minute, at most a tenth of the lifetime) so a token never
        # expires between being checked here and arriving at Atlas.
        margin = min(60.0, expires_in / 10)
        self._token = token
        self._refresh_at = self._clock() + expires_in - margin

    def invalidate(self) -> None:
        if self._token and self._shared is not None:
            self._shared.remove(self._token)  # refused by Atlas: no other process may reuse it
        self._stale, self._token = self._token, None

    def basic_auth(self) -> HTTPBasicAuth:
        return HTTPBasicAuth(self.client_id, self._secret)


def _mask(secret: str | None) -> None:
    """Register a value with Airflow's log masker (task logs); harmless outside a task."""
    if not secret:
        return
    try:
        from airflow.sdk.log import mask_secret

        mask_secret(secret)
    except Exception:  # noqa: BLE001 - masking is defence in depth; our own text is redacted regardless
        log.debug("secret masker unavailable")


# --------------------------------------------------------------------------------------------------
# The shared hook machinery
# --------------------------------------------------------------------------------------------------


class _MongoCloudApiHook(BaseHook):
    """Connection reading, authentication, retries and error mapping shared by both hooks."""

    conn_type = ""
    service_name = ""
    api_path = ""
    supports_service_account = False

    def __init__(self, conn_id: str, *, retry: RetryPolicy | None = None, timeout: float = 30.0,
                 config: ApiConnectionConfig | None = None) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self._config = config
        self._session: requests.Session | None = None
        self._token: _ServiceAccountToken | None = None
        self._extra_secrets: set[str] = set()
        # Replaceable in tests: decides when a cached OAuth token counts as expired, and how retries wait.
        self.clock: Callable[[], float] = time.monotonic
        self.sleep: Callable[[float], None] = time.sleep

    def __repr__(self) -> str:
        auth = "?" if self._config is None else ("oauth" if self._config.uses_service_account else "digest")
        return f"{type(self).__name__}(conn_id={self.conn_id!r}, auth={auth!r})"

    # ---- configuration ------------------------------------------------------------------------

    @property
    def config(self) -> ApiConnectionConfig:
        if self._config is None:
            self._config = self._read_connection()
        return self._config

    def _read_connection(self) -> ApiConnectionConfig:
        try:
            conn = self.get_connection(self.conn_id)
        except Exception as exc:  # AirflowNotFoundException and friends
            if "NotFound" in type(exc).__name__:
                raise ConfigurationError(
                    f"Airflow connection '{self.conn_id}' is not defined: create it with connection type "
                    f"'{self.conn_type}' (see atlas_migration.hooks.atlas for an AIRFLOW_CONN_ example)"
                ) from None
            raise ConfigurationError(f"Airflow connection '{self.conn_id}' is unusable: "
                                     f"{type(exc).__name__}") from None
        if conn.conn_type and conn.conn_type != self.conn_type:
            raise ConfigurationError(f"Airflow connection '{self.conn_id}' has type '{conn.conn_type}'; "
                                     f"the {self.service_name} hook needs '{self.conn_type}'")
        extras = conn.extra_dejson or {}
        client_id = _extra(extras, self.conn_type, "client_id")
        client_secret = _extra(extras, self.conn_type, "client_secret")
        config = ApiConnectionConfig(
            conn_id=self.conn_id, base_url=_base_url(conn.host, conn.port),
            org_id=_extra(extras, self.conn_type, "org_id"), project_id=_extra(extras, self.conn_type, "project_id"),
            public_key=conn.login or None, private_key=conn.password or None,
            client_id=client_id, client_secret=client_secret,
        )
        for secret in (config.private_key, config.client_secret):
            _mask(secret)
        if bool(client_id) != bool(client_secret):
            raise ConfigurationError(f"connection '{self.conn_id}': a service account needs both extras "
                                     "'client_id' and 'client_secret'")
        if client_id and not self.supports_service_account:
            raise ConfigurationError(f"connection '{self.conn_id}': the {self.service_name} hook authenticates "
                                     "with an API key pair (login = public key, password = private key)")
        if not client_id and not (config.public_key and config.private_key):
            raise ConfigurationError(
                f"connection '{self.conn_id}' has no credentials: set login/password to the public/private "
                "API key" + (", or extras client_id/client_secret for a service account"
                             if self.supports_service_account else "")
            )
        return config

    def get_conn(self) -> requests.Session:
        """The authenticated ``requests.Session`` (Digest) or a plain one (bearer added per request)."""
        if self._session is None:
            session = requests.Session()
            cfg = self.config
            if cfg.uses_service_account:
                # Look ``self.clock`` up on every call so a test can swap it after the session exists.
                self._token = _ServiceAccountToken(
                    cfg.client_id or "", cfg.client_secret or "", lambda: self.clock(),
                    SharedTokenCache(cfg.base_url, cfg.client_id or "", cfg.client_secret or ""))
            else:
                session.auth = HTTPDigestAuth(cfg.public_key or "", cfg.private_key or "")
            self._session = session
        return self._session

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def _require(self, value: str | None, what: str, extra_name: str) -> str:
        value = value or getattr(self.config, extra_name)
        if not value:
            raise ConfigurationError(f"no {what} given and connection '{self.conn_id}' has no '{extra_name}' extra")
        return value

    def _redact(self, text: str, extra: Iterable[str] = ()) -> str:
        return redact(text, [*self.config.secrets(), *self._extra_secrets, *extra])

    # ---- HTTP ---------------------------------------------------------------------------------

    def _call(self, method: str, path: str, *, version: str | None = None, body: Any = None,
              params: dict[str, Any] | None = None, secrets: Iterable[str] = ()) -> Any:
        """One API call with retries; returns the decoded JSON body or None for an empty reply."""
        secrets = list(secrets)
        session = self.get_conn()
        accept = f"application/vnd.atlas.{version}+json" if version else "application/json"
        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = accept if version else "application/json"
        url = self.config.base_url + self.api_path + path
        refreshed = False
        while True:
            auth_header = {}
            if self._token is not None:
                auth_header = {"Authorization": f"Bearer {self._bearer_token(session)}"}
            response = self._send(session, method, url, path, headers={**headers, **auth_header}, json=body,
                                  params=params, secrets=secrets)
            if response.status_code == 401 and self._token is not None and not refreshed:
                # Atlas ended the token early (revoked, clock skew): fetch a new one once, then give up.
                self.log.info("%s refused the cached service-account token; fetching a new one", self.service_name)
                self._token.invalidate()
                refreshed = True
                continue
            break
        if response.status_code >= 400:
            raise self._error(response, method, self.api_path + path, secrets)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise AtlasApiError(
                f"{self.service_name} {method} {self.api_path}{path}: HTTP {response.status_code} with a "
                "body that is not JSON", status=response.status_code, error_code=None, detail=None,
                method=method, path=self.api_path + path) from None

    def _bearer_token(self, session: requests.Session) -> str:
        assert self._token is not None
        cached = self._token.valid()
        if cached:
            return cached
        url = self.config.base_url + TOKEN_PATH
        response = self._send(session, "POST", url, TOKEN_PATH, headers={"Accept": "application/json"},
                              data={"grant_type": "client_credentials"}, auth=self._token.basic_auth(),
                              retry_post_5xx=True)  # asking for a token twice is harmless
        if response.status_code >= 400:
            raise self._error(response, "POST", TOKEN_PATH, [])
        try:
            payload = response.json()
            token, expires_in = payload["access_token"], float(payload.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError):
            raise AtlasApiError(f"{self.service_name} POST {TOKEN_PATH}: the token reply has no access_token",
                                status=response.status_code, error_code=None, detail=None, method="POST",
                                path=TOKEN_PATH) from None
        _mask(token)
        self._extra_secrets.add(token)  # every token ever issued stays redacted, expired ones included
        self._token.store(token, expires_in)
        self.log.info("Fetched a service-account token for the %s, valid for %.0f s", self.service_name,
                      expires_in)
        return token

    def _send(self, session: requests.Session, method: str, url: str, path: str, *, headers: dict[str, str],
              secrets: Iterable[str] = (), retry_post_5xx: bool = False, **kwargs: Any) -> requests.Response:
        """Send with the retry policy applied; returns the last response (which may be an error)."""
        policy = self.retry
        idempotent = method in _IDEMPOTENT
        attempt = 0
        while True:
            try:
                response = session.request(method, url, headers=headers, timeout=self.timeout, **kwargs)
            except requests.RequestException as exc:
                safe = idempotent or retry_post_5xx or _never_sent(exc)
                if safe and attempt < policy.max_retries:
                    delay = policy.backoff(attempt)
                    self.log.warning("%s %s %s: %s; retrying in %.1f s (retry %d of %d)", self.service_name,
                                     method, path, type(exc).__name__, delay, attempt + 1, policy.max_retries)
                    self.sleep(delay)
                    attempt += 1
                    continue
                raise AtlasApiError(
                    f"cannot reach {self.service_name} at {self.config.base_url} ({method} {path}): "
                    f"{type(exc).__name__}: {self._redact(str(exc), secrets)}",
                    status=None, error_code=None, detail=None, method=method, path=path,
                    never_sent=_never_sent(exc)) from None

            status = response.status_code
            retry_after = _retry_after(response.headers.get("Retry-After"))
            if status == 429:
                delay = retry_after if retry_after is not None else policy.backoff(attempt)
                if attempt < policy.max_retries and delay <= policy.max_retry_after:
                    self.log.warning("%s %s %s: HTTP 429 (rate limited); retrying in %.1f s (retry %d of %d)",
                                     self.service_name, method, path, delay, attempt + 1, policy.max_retries)
                    response.close()
                    self.sleep(delay)
                    attempt += 1
                    continue
            elif status >= 500 and (idempotent or retry_post_5xx or status in _POST_RETRYABLE_5XX):
                if attempt < policy.max_retries:
                    # A 503 may say when to come back (RFC 9110); otherwise back off exponentially.
                    delay = policy.backoff(attempt)
                    if retry_after is not None and retry_after <= policy.max_retry_after:
                        delay = max(delay, retry_after)
                    self.log.warning("%s %s %s: HTTP %d; retrying in %.1f s (retry %d of %d)", self.service_name,
                                     method, path, status, delay, attempt + 1, policy.max_retries)
                    response.close()
                    self.sleep(delay)
                    attempt += 1
                    continue
            self.log.debug("%s %s %s -> HTTP %d", self.service_name, method, path, status)
            return response

    def _error(self, response: requests.Response, method: str, path: str, secrets: Iterable[str]) -> AtlasApiError:
        status = response.status_code
        error_code = detail = reason = None
        parameters: list[Any] = []
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if isinstance(payload, dict):
            error_code = payload.get("errorCode")
            detail = payload.get("detail")
            reason = payload.get("reason")
            parameters = payload.get("parameters") or []
        else:
            detail = response.text[:300] or None  # a proxy's HTML page or similar
        detail = self._redact(detail, secrets) if detail else None
        message = f"{self.service_name} {method} {path}: HTTP {status}"
        if error_code:
            message += f" {error_code}"
        if detail:
            message += f": {detail}"
        hint = _HINTS.get(status)
        if hint:
            message += f" ({hint})"
        return AtlasApiError(self._redact(message, secrets), status=status, error_code=error_code, detail=detail,
                             method=method, path=path, reason=reason,
                             parameters=[self._redact(str(p), secrets) for p in parameters],
                             retry_after=_retry_after(response.headers.get("Retry-After")))


_HINTS = {
    401: "check the connection's API key pair or service-account credentials and the API access list",
    403: "the key or service account lacks the role this call needs (Organization Owner / Project Owner)",
    406: "the endpoint does not serve the requested resource version",
    410: "the requested resource version was retired; upgrade this client",
    429: "rate limited; retry later",
}


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: either delta-seconds or an HTTP date (RFC 9110 section 10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _never_sent(exc: requests.RequestException) -> bool:
    """True when the request provably never reached the service (refused or timed-out connect)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    if not isinstance(exc, requests.ConnectionError):
        return False
    from urllib3.exceptions import MaxRetryError, NewConnectionError

    inner = exc.args[0] if exc.args else None
    if isinstance(inner, MaxRetryError):
        inner = inner.reason
    return isinstance(inner, NewConnectionError)


def _seg(value: str) -> str:
    """A path segment, percent-encoded so an id can never reach another endpoint."""
    return quote(str(value), safe="")


# --------------------------------------------------------------------------------------------------
# Atlas Administration API v2
# --------------------------------------------------------------------------------------------------


class AtlasAdminHook(_MongoCloudApiHook):
    """Atlas Administration API v2: live migration (push), clusters, network peering, access list.

    ``org_id`` / ``group_id`` arguments default to the connection's ``org_id`` / ``project_id`` extras.
    """

    conn_name_attr = "atlas_conn_id"
    default_conn_name = "mongodb_atlas_default"
    conn_type = ATLAS_CONN_TYPE
    hook_name = HOOK_NAMES[ATLAS_CONN_TYPE]
    service_name = "Atlas Administration API"
    api_path = ATLAS_PATH
    supports_service_account = True

    def __init__(self, atlas_conn_id: str = default_conn_name, *, retry: RetryPolicy | None = None,
                 timeout: float = 30.0, config: ApiConnectionConfig | None = None) -> None:
        super().__init__(atlas_conn_id, retry=retry, timeout=timeout, config=config)
        self.atlas_conn_id = atlas_conn_id

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """Extra fields of the connection form: org and project ids, service-account client id and secret
        (a password field). Airflow 3.2+ reads the same fields from the provider info instead."""
        return form_widgets(cls.conn_type)

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Base URL instead of host/scheme/port; login/password are the API key pair."""
        return field_behaviour(cls.conn_type)

    def _org(self, org_id: str | None) -> str:
        return self._require(org_id, "organization id", "org_id")

    def _group(self, group_id: str | None) -> str:
        return self._require(group_id, "project (group) id", "project_id")

    # ---- live migration ---------------------------------------------------------------------------

    def create_link_token(self, access_list_ips: list[str] | None = None, *, org_id: str | None = None) -> str:
        """``POST /orgs/{orgId}/liveMigrations/linkTokens``: a link-token for the Cloud Manager org (a secret)."""
        body = {"accessListIps": list(access_list_ips)} if access_list_ips else {}
        reply = self._call("POST", f"/orgs/{_seg(self._org(org_id))}/liveMigrations/linkTokens",
                           version=API_VERSIONS["create_link_token"], body=body)
        token = reply["linkToken"]
        _mask(token)
        self._extra_secrets.add(token)
        return token

    def delete_link_tokens(self, *, org_id: str | None = None) -> None:
        """``DELETE /orgs/{orgId}/liveMigrations/linkTokens``: revoke the organization's link-tokens."""
        self._call("DELETE", f"/orgs/{_seg(self._org(org_id))}/liveMigrations/linkTokens",
                   version=API_VERSIONS["delete_link_tokens"])

    def list_available_projects(self, *, org_id: str | None = None) -> list[dict[str, Any]]:
        """``GET /orgs/{orgId}/liveMigrations/availableProjects``: linked Cloud Manager projects and deployments."""
        return self._call("GET", f"/orgs/{_seg(self._org(org_id))}/liveMigrations/availableProjects",
                          version=API_VERSIONS["list_available_projects"]) or []

    def validate_live_migration(self, request: LiveMigrationRequest | dict[str, Any], *,
                                group_id: str | None = None) -> dict[str, Any]:
        """``POST /groups/{groupId}/liveMigrations/validate``: start a validation job (status PENDING)."""
        body, secrets = _migration_body(request)
        return self._call("POST", f"/groups/{_seg(self._group(group_id))}/liveMigrations/validate",
                          version=API_VERSIONS["validate_live_migration"], body=body, secrets=secrets)

    def get_live_migration_validation(self, validation_id: str, *, group_id: str | None = None) -> dict[str, Any]:
        """``GET /groups/{groupId}/liveMigrations/validate/{validationId}``: PENDING, SUCCESS or FAILED."""
        return self._call("GET", f"/groups/{_seg(self._group(group_id))}/liveMigrations/validate/"
                          f"{_seg(validation_id)}", version=API_VERSIONS["get_live_migration_validation"])

    def create_live_migration(self, request: LiveMigrationRequest | dict[str, Any], *,
                              group_id: str | None = None) -> dict[str, Any]:
        """``POST /groups/{groupId}/liveMigrations``: start the migration (status NEW)."""
        body, secrets = _migration_body(request)
        return self._call("POST", f"/groups/{_seg(self._group(group_id))}/liveMigrations",
                          version=API_VERSIONS["create_live_migration"], body=body, secrets=secrets)

    def get_live_migration(self, live_migration_id: str, *, group_id: str | None = None) -> dict[str, Any]:
        """``GET /groups/{groupId}/liveMigrations/{id}``: status, lagTimeSeconds, readyForCutover."""
        return self._call("GET", f"/groups/{_seg(self._group(group_id))}/liveMigrations/{_seg(live_migration_id)}",
                          version=API_VERSIONS["get_live_migration"])

    def cutover_live_migration(self, live_migration_id: str, *, group_id: str | None = None) -> None:
        """``PUT /groups/{groupId}/liveMigrations/{id}/cutover`` (202). Stop writes to the source first."""
        self._call("PUT", f"/groups/{_seg(self._group(group_id))}/liveMigrations/{_seg(live_migration_id)}/cutover",
                   version=API_VERSIONS["cutover_live_migration"])

    # ---- clusters, network peering, access list ---------------------------------------------------

    def get_cluster(self, cluster_name: str, *, group_id: str | None = None) -> dict[str, Any]:
        """``GET /groups/{groupId}/clusters/{clusterName}``: includes region and connection strings."""
        return self._call("GET", f"/groups/{_seg(self._group(group_id))}/clusters/{_seg(cluster_name)}",
                          version=API_VERSIONS["get_cluster"])

    def create_container(self, region_name: str, atlas_cidr_block: str, *, provider_name: str = "AWS",
                         group_id: str | None = None) -> dict[str, Any]:
        """``POST /groups/{groupId}/containers``: the Atlas-side VPC for one region (e.g. ``US_EAST_1``)."""
        body = {"providerName": provider_name, "atlasCidrBlock": atlas_cidr_block, "regionName": region_name}
        return self._call("POST", f"/groups/{_seg(self._group(group_id))}/containers",
                          version=API_VERSIONS["create_container"], body=body)

    def list_containers(self, *, provider_name: str = "AWS", group_id: str | None = None) -> list[dict[str, Any]]:
        """``GET /groups/{groupId}/containers?providerName=``: the ``results`` of the page."""
        reply = self._call("GET", f"/groups/{_seg(self._group(group_id))}/containers",
                           version=API_VERSIONS["list_containers"], params={"providerName": provider_name})
        return list((reply or {}).get("results", []))

    def create_peering_connection(self, *, container_id: str, aws_account_id: str, vpc_id: str,
                                  route_table_cidr_block: str, accepter_region_name: str,
                                  group_id: str | None = None) -> dict[str, Any]:
        """``POST /groups/{groupId}/peers``: ask AWS for a peering connection (accept it on the AWS side)."""
        body = {"containerId": container_id, "providerName": "AWS", "accepterRegionName": accepter_region_name,
                "awsAccountId": aws_account_id, "routeTableCidrBlock": route_table_cidr_block, "vpcId": vpc_id}
        return self._call("POST", f"/groups/{_seg(self._group(group_id))}/peers",
                          version=API_VERSIONS["create_peering_connection"], body=body)

    def get_peering_connection(self, peer_id: str, *, group_id: str | None = None) -> dict[str, Any]:
        """``GET /groups/{groupId}/peers/{peerId}``: ``statusName`` INITIATING ... AVAILABLE | FAILED."""
        return self._call("GET", f"/groups/{_seg(self._group(group_id))}/peers/{_seg(peer_id)}",
                          version=API_VERSIONS["get_peering_connection"])

    def add_access_list_entries(self, entries: list[dict[str, str]], *,
                                group_id: str | None = None) -> list[dict[str, Any]]:
        """``POST /groups/{groupId}/accessList`` with ``[{cidrBlock | ipAddress, comment}]``; returns all entries."""
        reply = self._call("POST", f"/groups/{_seg(self._group(group_id))}/accessList",
                           version=API_VERSIONS["add_access_list_entries"], body=list(entries))
        return list((reply or {}).get("results", []))

    def list_access_list(self, *, group_id: str | None = None) -> list[dict[str, Any]]:
        """``GET /groups/{groupId}/accessList``: the project's IP access list entries."""
        reply = self._call("GET", f"/groups/{_seg(self._group(group_id))}/accessList",
                           version=API_VERSIONS["list_access_list"])
        return list((reply or {}).get("results", []))

    def list_peering_connections(self, *, provider_name: str = "AWS",
                                 group_id: str | None = None) -> list[dict[str, Any]]:
        """``GET /groups/{groupId}/peers?providerName=``: the project's peering connections."""
        reply = self._call("GET", f"/groups/{_seg(self._group(group_id))}/peers",
                           version=API_VERSIONS["list_peering_connections"], params={"providerName": provider_name})
        return list((reply or {}).get("results", []))

    def delete_peering_connection(self, peer_id: str, *, group_id: str | None = None) -> None:
        """``DELETE /groups/{groupId}/peers/{peerId}`` (202): the peering turns TERMINATING, then is gone."""
        self._call("DELETE", f"/groups/{_seg(self._group(group_id))}/peers/{_seg(peer_id)}",
                   version=API_VERSIONS["delete_peering_connection"])

    def delete_container(self, container_id: str, *, group_id: str | None = None) -> None:
        """``DELETE /groups/{groupId}/containers/{containerId}`` (204); refused while a peering or cluster uses it."""
        self._call("DELETE", f"/groups/{_seg(self._group(group_id))}/containers/{_seg(container_id)}",
                   version=API_VERSIONS["delete_container"])

    def delete_access_list_entry(self, entry_value: str, *, group_id: str | None = None) -> None:
        """``DELETE /groups/{groupId}/accessList/{entryValue}`` (204): an IP address or CIDR block (URL-encoded)."""
        self._call("DELETE", f"/groups/{_seg(self._group(group_id))}/accessList/{_seg(entry_value)}",
                   version=API_VERSIONS["delete_access_list_entry"])


# --------------------------------------------------------------------------------------------------
# Cloud Manager API
# --------------------------------------------------------------------------------------------------


class CloudManagerHook(_MongoCloudApiHook):
    """Cloud Manager API (``/api/public/v1.0``, HTTP Digest): link the source org to the Atlas org.

    ``org_id`` arguments default to the connection's ``org_id`` extra (the Cloud Manager organization).
    """

    conn_name_attr = "cloud_manager_conn_id"
    default_conn_name = "mongodb_cloud_manager_default"
    conn_type = CLOUD_MANAGER_CONN_TYPE
    hook_name = HOOK_NAMES[CLOUD_MANAGER_CONN_TYPE]
    service_name = "Cloud Manager API"
    api_path = CLOUD_MANAGER_PATH
    supports_service_account = False

    def __init__(self, cloud_manager_conn_id: str = default_conn_name, *, retry: RetryPolicy | None = None,
                 timeout: float = 30.0, config: ApiConnectionConfig | None = None) -> None:
        super().__init__(cloud_manager_conn_id, retry=retry, timeout=timeout, config=config)
        self.cloud_manager_conn_id = cloud_manager_conn_id

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """Extra field of the connection form: the Cloud Manager organization id (API keys only)."""
        return form_widgets(cls.conn_type)

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return field_behaviour(cls.conn_type)

    def _org(self, org_id: str | None) -> str:
        return self._require(org_id, "Cloud Manager organization id", "org_id")

    def create_migration_link(self, link_token: str, *, org_id: str | None = None) -> dict[str, Any]:
        """``POST /orgs/{orgId}/liveExport/migrationLink`` with the Atlas link-token; returns ``{status}``."""
        _mask(link_token)
        return self._call("POST", f"/orgs/{_seg(self._org(org_id))}/liveExport/migrationLink",
                          body={"linkToken": link_token}, secrets=[link_token])

    def delete_migration_link(self, *, org_id: str | None = None) -> None:
        """``DELETE /orgs/{orgId}/liveExport/migrationLink`` (204)."""
        self._call("DELETE", f"/orgs/{_seg(self._org(org_id))}/liveExport/migrationLink")

    def get_migration_link_status(self, *, org_id: str | None = None) -> str:
        """``GET /orgs/{orgId}/liveExport/migrationLink/status``: ``SYNCED`` or ``NOT_SYNCED``."""
        reply = self._call("GET", f"/orgs/{_seg(self._org(org_id))}/liveExport/migrationLink/status")
        return str(reply["status"])
