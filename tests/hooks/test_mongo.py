"""Connections: missing, malformed, unreachable and wrongly-authenticated ones fail clearly and redacted."""

from __future__ import annotations

import json

import pytest

from atlas_migration.errors import ConfigurationError, SourceUnreachable, TargetUnreachable
from atlas_migration.hooks.mongo import endpoint_from_connection
from atlas_migration.redaction import redact
from devtools.airflow_env import mongo_connection_json
from devtools.mongo_servers import free_port

SECRET = "pa:ss/w@rd-Zq9"


def set_conn(monkeypatch, conn_id: str, value: dict | str) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", value if isinstance(value, str) else json.dumps(value))


def test_missing_connection(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_NOPE", raising=False)
    with pytest.raises(ConfigurationError, match="'nope' \\(source\\) is not defined"):
        endpoint_from_connection("nope", "source")


def test_wrong_connection_type(monkeypatch):
    set_conn(monkeypatch, "wrongtype", {"conn_type": "postgres", "host": "h", "password": SECRET})
    with pytest.raises(ConfigurationError) as excinfo:
        endpoint_from_connection("wrongtype", "target")
    assert "must be 'mongo'" in str(excinfo.value) and SECRET not in str(excinfo.value)


def test_malformed_address_is_redacted(monkeypatch):
    set_conn(monkeypatch, "badhost", {"conn_type": "mongo", "host": "host:notaport", "login": "u",
                                      "password": SECRET})
    endpoint = endpoint_from_connection("badhost", "source")
    with pytest.raises(ConfigurationError) as excinfo:
        endpoint.client()
    assert "not describe a valid MongoDB address" in str(excinfo.value)
    assert SECRET not in str(excinfo.value)


def test_unreachable_host_fails_fast(monkeypatch):
    port = free_port()  # nothing listens there
    set_conn(monkeypatch, "gone", {"conn_type": "mongo", "host": "127.0.0.1", "port": port, "login": "u",
                                   "password": SECRET, "extra": {"directConnection": True}})
    with pytest.raises(SourceUnreachable) as excinfo:
        endpoint_from_connection("gone", "source").connect(timeout_ms=1500)
    assert f"127.0.0.1:{port}" in str(excinfo.value) and SECRET not in str(excinfo.value)


@pytest.mark.integration
def test_wrong_credentials(monkeypatch, tmp_path):
    from devtools.mongo_servers import start_server

    server = start_server(tmp_path, users=[{"user": "admin", "pwd": "right-one", "roles": ["root"]}])
    try:
        set_conn(monkeypatch, "badauth", mongo_connection_json(server.uri_for("admin", SECRET)))
        with pytest.raises(TargetUnreachable, match="refused the credentials") as excinfo:
            endpoint_from_connection("badauth", "target").connect(timeout_ms=5000)
        assert SECRET not in str(excinfo.value)
        set_conn(monkeypatch, "goodauth", mongo_connection_json(server.uri_for("admin", "right-one")))
        with endpoint_from_connection("goodauth", "target").connect() as client:
            assert client.admin.command("ping")["ok"] == 1
    finally:
        server.destroy()


def test_deployment_facts_are_not_passed_to_the_driver(monkeypatch):
    set_conn(monkeypatch, "facts", {"conn_type": "mongo", "host": "127.0.0.1", "port": 27017,
                                    "extra": {"directConnection": True, "migration": {"managed_by": "cloud_manager"}}})
    endpoint = endpoint_from_connection("facts", "source")
    assert endpoint.deployment_facts == {"managed_by": "cloud_manager"}
    assert "migration" not in endpoint.client_options
    endpoint.client().close()  # MongoClient would reject an unknown 'migration' option


def test_tool_uri_carries_options(monkeypatch):
    set_conn(monkeypatch, "tools", {"conn_type": "mongo", "host": "db.example.com", "port": 27017, "login": "u",
                                    "password": SECRET, "schema": "users",
                                    "extra": {"ssl": True, "directConnection": True}})
    endpoint = endpoint_from_connection("tools", "source")
    uri = endpoint.tool_uri()
    assert uri.startswith("mongodb://u:") and "@db.example.com:27017/?" in uri
    assert "tls=true" in uri and "authSource=users" in uri and "directConnection=true" in uri
    assert SECRET not in endpoint.redact(f"failed for {uri}")


def test_redact_forms():
    text = f"mongodb://user:{SECRET}@h/ and 'password': '{SECRET}' and encoded pa%3Ass%2Fw%40rd-Zq9"
    cleaned = redact(text, [SECRET])
    assert SECRET not in cleaned and "pa%3Ass%2Fw%40rd-Zq9" not in cleaned
    assert "mongodb://user:***@h/" in cleaned


PEM = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----"


def test_ca_given_as_pem_text_becomes_one_private_file_for_every_client_and_tool(monkeypatch):
    import os
    import stat

    set_conn(monkeypatch, "pemca", {"conn_type": "mongo", "host": "db.example.com", "port": 27017,
                                    "extra": {"migration": {"tls_ca_pem": PEM}}})
    first = endpoint_from_connection("pemca", "source")
    second = endpoint_from_connection("pemca", "target")
    path = first.client_options["tlsCAFile"]
    assert second.client_options["tlsCAFile"] == path  # written once per process, not once per task call
    assert first.client_options["tls"] is True
    assert open(path).read().strip() == PEM and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "tlsCAFile=" in first.tool_uri()  # mongodump/mongorestore get the same CA


def test_ca_given_twice_or_not_as_a_certificate_is_refused(monkeypatch):
    set_conn(monkeypatch, "twoca", {"conn_type": "mongo", "host": "h", "port": 1,
                                    "extra": {"tlsCAFile": "/etc/ca.pem", "migration": {"tls_ca_pem": PEM}}})
    with pytest.raises(ConfigurationError, match="both tlsCAFile and migration.tls_ca_pem"):
        endpoint_from_connection("twoca", "source")
    set_conn(monkeypatch, "notpem", {"conn_type": "mongo", "host": "h", "port": 1,
                                     "extra": {"migration": {"tls_ca_pem": "not a pem"}}})
    with pytest.raises(ConfigurationError, match="does not hold a PEM certificate"):
        endpoint_from_connection("notpem", "source")
