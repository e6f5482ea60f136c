"""The Compose path: pure decisions (one shard behind mongos, pull or fall back to restore, allow-list
reminder) and a real TLS server (SecantusDB with a CA and server certificate made here) reached with the CA
given as PEM text in the connection's extras."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import stat

import pytest

from atlas_migration.compose import (
    OplogCheck,
    allow_list_reminder,
    check_oplog,
    choose_path,
    compose_sources,
    read_topology,
    topology_from,
)
from atlas_migration.hooks import endpoint_from_connection

# ---------------------------------------------------------------- pure


def test_one_shard_behind_mongos_is_accepted() -> None:
    topology = topology_from({"msg": "isdbgrid"}, {"shards": [{"_id": "rs0", "host": "rs0/a:27017"}]},
                             {"mode": "full", "inBalancerRound": False})
    assert topology.problems() == [] and topology.balancer_mode == "full"


def test_not_mongos_or_several_shards_is_refused() -> None:
    assert "does not reach a mongos" in topology_from({"setName": "rs0"}, None, None).problems()[0]
    two = topology_from({"msg": "isdbgrid"}, {"shards": [{"_id": "a"}, {"_id": "b"}]}, None)
    assert "2 shard(s) (a, b)" in two.problems()[0]
    assert "balancerStatus refused" in topology_from({"msg": "isdbgrid"}, {"shards": [{"_id": "a"}]}, None,
                                                     "balancerStatus refused (code 13)").balancer_note


def test_pull_needs_a_readable_oplog_and_change_streams_else_restore() -> None:
    ok = OplogCheck("oplog", configured=True, reachable=True, readable=True, change_stream=True, window_hours=30)
    assert choose_path(ok).path == "pull"
    for check, why in [
        (OplogCheck("oplog", configured=False), "no Oplog Access connection 'oplog'"),
        (OplogCheck("oplog", True, reachable=False, detail="timeout"), "unreachable (timeout)"),
        (OplogCheck("oplog", True, True, readable=True, change_stream=False, detail="code 13"), "does not give"),
    ]:
        decision = choose_path(check)
        assert decision.path == "restore" and why in decision.reasons[0]
        assert "FALLBACK" in decision.reasons[1] and "NOT migrated" in decision.reasons[1]


def test_allow_list_reminder_names_every_host() -> None:
    lines = allow_list_reminder(["35.1.2.3", "mh-0.mongodb.net"])
    assert "35.1.2.3" in lines[1] and "mh-0.mongodb.net" in lines[2]
    assert "look them up in the Atlas UI" in allow_list_reminder([])[0]


def test_sources_copy_through_mongos_and_stream_from_the_oplog_endpoint() -> None:
    sources = compose_sources()
    params = {"source_conn_id": "compose_mongos", "target_conn_id": "atlas", "oplog_conn_id": "compose_oplog"}
    assert sources.conn_id(params, "copy") == "compose_mongos"
    assert sources.conn_id(params, "stream") == "compose_oplog"


# ---------------------------------------------------------------- a real TLS server


def _certificates(folder) -> dict[str, str]:
    """A CA (standing in for Compose's) and a server certificate for 127.0.0.1 signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Compose test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(cert.public_bytes(pem))
    paths["key"].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    from devtools.mongo_servers import LocalMongoServer, free_port

    folder = tmp_path_factory.mktemp("tls")
    certs = _certificates(folder)
    port = free_port()
    server = LocalMongoServer(port=port, storage_path=folder / f"db-{port}", _own_storage=True, extra_args=[
        "--tls-cert-file", certs["cert"], "--tls-key-file", certs["key"], "--tls-ca-file", certs["ca"]])
    # LocalMongoServer polls without TLS; a refused handshake means not ready yet, so start it by hand.
    server._wait_ready = lambda timeout: _wait_tls(port, certs["ca"], timeout)  # type: ignore[method-assign]
    server.start()
    yield server, certs
    server.destroy()


def _wait_tls(port: int, ca: str, timeout: float) -> None:
    import time

    import pymongo

    deadline = time.monotonic() + timeout
    while True:
        try:
            with pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true", tls=True, tlsCAFile=ca,
                                     serverSelectionTimeoutMS=500) as client:
                client.admin.command("ping")
                return
        except Exception:  # noqa: BLE001 - keep polling until the deadline
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def _conn(monkeypatch, conn_id: str, port: int, extra: dict) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_" + conn_id.upper(), json.dumps({
        "conn_type": "mongo", "host": "127.0.0.1", "port": port, "extra": {"directConnection": True, **extra}}))


def test_oplog_endpoint_over_tls_with_the_ca_as_pem_text(tls_server, monkeypatch) -> None:
    server, certs = tls_server
    pem = open(certs["ca"]).read()
    _conn(monkeypatch, "compose_oplog", server.port, {"tls": True, "migration": {"tls_ca_pem": pem}})
    endpoint = endpoint_from_connection("compose_oplog", "source")
    ca_file = endpoint.client_options["tlsCAFile"]
    assert open(ca_file).read().strip() == pem.strip()
    assert stat.S_IMODE(os.stat(ca_file).st_mode) == 0o600
    check = check_oplog("compose_oplog")
    assert (check.reachable, check.readable, check.change_stream) == (True, True, True), check
    assert choose_path(check).path == "pull"
    # The server is a replica-set member, not a mongos: the Compose preflight's topology check refuses it.
    with endpoint.connect() as client:
        assert "does not reach a mongos" in read_topology(client).problems()[0]


def test_without_the_ca_the_endpoint_is_unreachable_and_the_path_falls_back(tls_server, monkeypatch) -> None:
    server, _ = tls_server
    _conn(monkeypatch, "compose_oplog", server.port, {"tls": True})  # system CAs: the Compose CA is unknown
    check = check_oplog("compose_oplog")
    assert check.configured and not check.reachable and "cannot reach source" in check.detail
    assert choose_path(check).path == "restore"
