"""Connections to the source deployment and the Atlas target.

Both use the Mongo provider's ``mongo`` connection type. Deployment facts that cannot be read from the
server itself (who manages it, where it is hosted) may be declared in the connection's extras under a
``migration`` key, e.g. ``{"migration": {"managed_by": "cloud_manager", "hosting": "aws"}}``; this hook removes
that key before the remaining extras are handed to ``MongoClient`` as the provider does.

TLS with a private CA (Compose issues its own): give the CA either as a ``tlsCAFile`` extra (a path that
exists on every worker) or as PEM text in ``migration.tls_ca_pem``; the text is written once per process to
a 0600 file that is removed at exit, and every client and tool of the endpoint uses it.

pymongo and the provider are imported lazily: this module is imported by DAG files at parse time.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from atlas_migration.errors import (
    ConfigurationError,
    MigrationError,
    SourceCredentialsRefused,
    SourceUnreachable,
    TargetCredentialsRefused,
    TargetUnreachable,
)
from atlas_migration.redaction import redact

if TYPE_CHECKING:
    from pymongo import MongoClient

# Connection-string spellings of the provider's extras that mongodump/mongorestore understand.
_TOOL_OPTION_NAMES = {"ssl": "tls", "allow_insecure": "tlsInsecure"}
_PROVIDER_ONLY_EXTRAS = {"srv"}
DEFAULT_TIMEOUT_MS = 10_000
CA_PEM_FACT = "tls_ca_pem"  # key under the connection's "migration" extra


@dataclass
class MongoEndpoint:
    """How to reach one deployment: a client factory plus what tools and logs need, without secrets leaking."""

    conn_id: str
    role: str  # "source" or "target": used in error messages
    uri: str  # contains the password: never log it, never put it in XCom
    client_options: dict[str, Any]
    hosts: list[str]
    secrets: list[str] = field(default_factory=list)
    deployment_facts: dict[str, Any] = field(default_factory=dict)

    def redact(self, text: object) -> str:
        return redact(str(text), self.secrets)

    def client(self, timeout_ms: int = DEFAULT_TIMEOUT_MS, **overrides: Any) -> MongoClient:
        """A new MongoClient; raises ``ConfigurationError`` (redacted) when the address is malformed."""
        import pymongo
        from pymongo.errors import ConfigurationError as PyMongoConfigurationError
        from pymongo.errors import InvalidURI

        options = {
            "serverSelectionTimeoutMS": timeout_ms,
            "connectTimeoutMS": timeout_ms,
            "appname": "atlas-migration",
            **self.client_options,
            **overrides,
        }
        try:
            return pymongo.MongoClient(self.uri, **options)
        except (InvalidURI, PyMongoConfigurationError, ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"Airflow connection '{self.conn_id}' ({self.role}) does not describe a valid MongoDB "
                f"address: {self.redact(exc)}"
            ) from None

    def connect(self, timeout_ms: int = DEFAULT_TIMEOUT_MS, **overrides: Any) -> MongoClient:
        """A client that has answered ``ping``: fails fast and clearly on unreachable hosts or bad credentials."""
        from pymongo.errors import OperationFailure, PyMongoError

        client = self.client(timeout_ms, **overrides)
        error_class = SourceUnreachable if self.role == "source" else TargetUnreachable
        try:
            client.admin.command("ping")
        except OperationFailure as exc:
            client.close()
            if exc.code in (18, 13):  # AuthenticationFailed, Unauthorized
                refused = SourceCredentialsRefused if self.role == "source" else TargetCredentialsRefused
                raise refused(
                    f"{self.role} '{self.conn_id}' at {', '.join(self.hosts)} refused the credentials "
                    f"(code {exc.code}): check the connection's login, password and authSource"
                ) from None
            raise error_class(f"{self.role} '{self.conn_id}' rejected ping: {self.redact(exc)}") from None
        except PyMongoError as exc:
            client.close()
            raise error_class(
                f"cannot reach {self.role} '{self.conn_id}' at {', '.join(self.hosts)} within "
                f"{timeout_ms / 1000:.0f}s: {self.redact(exc)}"
            ) from None
        return client

    def for_replica_set(self, set_name: str | None, hosts: list[str]) -> MongoEndpoint:
        """The same credentials and TLS options, pointed at another replica set of the deployment (a shard
        that ``listShards`` names): only the hosts and ``replicaSet`` change.

        The user name, password and the URI's path (its authentication database) are kept, so is every
        extra (``authSource``, ``authMechanism``, ``tls``, ``tlsCAFile`` ...). ``directConnection`` is dropped
        (it would pin the client to one member) unless the shard is a single host outside a replica set.
        An SRV source (``mongodb+srv``) becomes a plain ``mongodb://`` address with ``tls`` on, as SRV implies;
        options its DNS TXT record carried are not known here, so give ``authSource`` as an extra if it is
        not ``admin``."""
        scheme, rest = self.uri.split("://", 1)
        netloc, slash, path = rest.partition("/")
        userinfo, at, _ = netloc.rpartition("@")
        uri = f"mongodb://{userinfo}{at}{','.join(hosts)}{slash}{path}"
        options = {k: v for k, v in self.client_options.items()
                   if k.lower() not in ("replicaset", "directconnection", "srv")}
        if scheme == "mongodb+srv" and not any(k in options for k in ("tls", "ssl")):
            options["tls"] = True
        if set_name:
            options["replicaSet"] = set_name
        elif len(hosts) == 1:
            options["directConnection"] = True
        return MongoEndpoint(conn_id=self.conn_id, role=self.role, uri=uri, client_options=options,
                             hosts=list(hosts), secrets=list(self.secrets), deployment_facts={})

    def tool_uri(self) -> str:
        """The full connection string for mongodump/mongorestore (passed in a 0600 config file, never argv)."""
        # The tools refuse --db values that differ from a database in the URI path; that path only names
        # the authentication database, so move it into authSource.
        scheme, rest = self.uri.split("://", 1)
        netloc, _, auth_db = rest.partition("/")
        options: dict[str, Any] = {"authSource": auth_db} if auth_db else {}
        for key, value in self.client_options.items():
            if key in _PROVIDER_ONLY_EXTRAS:
                continue
            if isinstance(value, bool):
                value = "true" if value else "false"
            options[_TOOL_OPTION_NAMES.get(key, key)] = value
        query = urlencode(options)
        return f"{scheme}://{netloc}/{'?' + query if query else ''}"


_CA_FILES: dict[str, str] = {}  # sha256 of the PEM text -> its file


@atexit.register
def _remove_ca_files() -> None:
    for path in _CA_FILES.values():
        try:
            os.unlink(path)
        except OSError:
            pass


def write_ca_file(pem: str) -> str:
    """Write PEM text to a 0600 file (once per process per certificate, removed at exit); returns its path."""
    text = pem.strip()
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ConfigurationError(f"extra migration.{CA_PEM_FACT} does not hold a PEM certificate "
                                 "(-----BEGIN CERTIFICATE----- ...)")
    key = hashlib.sha256(text.encode()).hexdigest()
    path = _CA_FILES.get(key)
    if path and os.path.exists(path):
        return path
    fd, path = tempfile.mkstemp(prefix="mongo-ca-", suffix=".pem")  # mkstemp creates it 0600
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")
    _CA_FILES[key] = path
    return path


def endpoint_from_connection(conn_id: str, role: str) -> MongoEndpoint:
    """Read an Airflow ``mongo`` connection into a ``MongoEndpoint``; clear errors for missing/wrong ones."""
    if not conn_id:
        raise ConfigurationError(f"no Airflow connection id given for the {role}")
    try:
        from airflow.providers.mongo.hooks.mongo import MongoHook
    except ImportError as exc:  # pragma: no cover - the provider is a hard dependency
        raise MigrationError("apache-airflow-providers-mongo is not installed") from exc

    try:
        hook = MongoHook(mongo_conn_id=conn_id)
    except Exception as exc:  # AirflowNotFoundException, AirflowConfigException, parse errors
        name = type(exc).__name__
        if "NotFound" in name:
            raise ConfigurationError(
                f"Airflow connection '{conn_id}' ({role}) is not defined: create it with connection type "
                "'mongo' (UI: Admin > Connections, or an AIRFLOW_CONN_<ID> environment variable)"
            ) from None
        raise ConfigurationError(f"Airflow connection '{conn_id}' ({role}) is unusable: {redact(str(exc))}") from None

    conn = hook.connection
    extras = dict(hook.extras)
    facts = extras.pop("migration", None) or {}
    if not isinstance(facts, dict):
        raise ConfigurationError(f"connection '{conn_id}': extra 'migration' must be a JSON object")
    if hook.allow_insecure:
        extras["tlsAllowInvalidCertificates"] = True
    pem = facts.get(CA_PEM_FACT)
    if pem:
        if extras.get("tlsCAFile"):
            raise ConfigurationError(f"connection '{conn_id}' gives both tlsCAFile and migration.{CA_PEM_FACT}: "
                                     "keep one")
        extras["tlsCAFile"] = write_ca_file(str(pem))
        extras.setdefault("tls", True)
    host = conn.host or ""
    if not host:
        raise ConfigurationError(f"Airflow connection '{conn_id}' ({role}) has no host")
    hosts = [h if (":" in h or not conn.port) else f"{h}:{conn.port}" for h in host.split(",")]
    secrets = [s for s in (conn.password,) if s]
    return MongoEndpoint(
        conn_id=conn_id,
        role=role,
        uri=hook.uri,
        client_options=extras,
        hosts=hosts,
        secrets=secrets,
        deployment_facts=facts,
    )
