"""The Compose path: pure decisions (one shard behind mongos, pull or fall back to restore, allow-list
reminder), the group's wiring, a real TLS server (SecantusDB with a CA and server certificate made here)
reached with the CA given as PEM text in the connection's extras, and the mongos stand-in
(``devtools.mongos_proxy``) in front of it that the DAG tests (tests/dags/test_compose.py) migrate from."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import stat

import pytest

from atlas_migration.hooks.mongo import endpoint_from_connection
from atlas_migration.strategies.compose import (
    OplogCheck,
    allow_list_reminder,
    check_oplog,
    choose_path,
    compose_sources,
    read_topology,
    topology_from,
)

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


# ---------------------------------------------------------------- the mongos stand-in (devtools.mongos_proxy)


def test_op_msg_sections_survive_and_a_checksum_is_dropped() -> None:
    import struct

    import bson

    from devtools.mongos_proxy import CHECKSUM_PRESENT, OpMsg

    body = bson.encode({"insert": "orders", "$db": "shop"})
    docs = bson.encode({"_id": 1}) + bson.encode({"_id": 2})
    sequence = struct.pack("<i", 4 + len(b"documents\x00") + len(docs)) + b"documents\x00" + docs
    payload = struct.pack("<I", CHECKSUM_PRESENT) + b"\x00" + body + b"\x01" + sequence + b"\xde\xad\xbe\xef"
    msg = OpMsg.parse(payload)
    assert msg.body == body and msg.sequences == [sequence]
    again = OpMsg.parse(msg.encode())
    assert again.flags == 0 and again.body == body and again.sequences == [sequence]


@pytest.fixture(scope="module")
def mongos(tls_server):
    """The proxy in front of the TLS server: TLS on both sides, with the same (Compose-like) CA."""
    from devtools.mongos_proxy import MongosProxy

    server, certs = tls_server
    with MongosProxy(server.port, tls_cert=certs["cert"], tls_key=certs["key"], backend_ca=certs["ca"]) as proxy:
        yield proxy, server, certs


def test_the_proxy_looks_like_the_mongos_of_one_shard(mongos) -> None:
    import pymongo
    from pymongo.server_type import SERVER_TYPE
    from pymongo.topology_description import TOPOLOGY_TYPE

    proxy, server, certs = mongos
    # No directConnection: the driver discovers what the seed is, as it would for a Compose mongos.
    with pymongo.MongoClient(f"mongodb://{proxy.host}/", tls=True, tlsCAFile=certs["ca"], compressors="zlib",
                             serverSelectionTimeoutMS=10_000) as client:
        hello = client.admin.command("hello")
        description = client.topology_description
        assert description.topology_type == TOPOLOGY_TYPE.Sharded
        assert [s.server_type for s in description.server_descriptions().values()] == [SERVER_TYPE.Mongos]
        assert hello["msg"] == "isdbgrid" and hello["isWritablePrimary"] is True and hello["ok"] == 1
        assert not {"setName", "hosts", "primary", "me", "topologyVersion", "compression"} & set(hello)
        assert {"maxWireVersion", "maxBsonObjectSize", "logicalSessionTimeoutMinutes", "$clusterTime"} <= set(hello)
        shards = client.admin.command("listShards")["shards"]
        assert shards == [{"_id": "secantus", "host": f"secantus/127.0.0.1:{server.port}", "state": 1}]
        balancer = client.admin.command("balancerStatus")
        assert balancer["mode"] == "full" and balancer["inBalancerRound"] is False
        assert read_topology(client).problems() == []
    # The handshake came as OP_QUERY or OP_MSG; no OP_COMPRESSED although the client offered zlib.
    assert set(proxy.op_codes) <= {2004, 2013} and proxy.op_codes[2013] > 0


def test_crud_and_change_streams_pass_through_local_is_refused(mongos) -> None:
    import pymongo
    from pymongo.errors import OperationFailure

    proxy, server, certs = mongos
    with pymongo.MongoClient(f"mongodb://{proxy.host}/", tls=True, tlsCAFile=certs["ca"],
                             serverSelectionTimeoutMS=10_000) as client:
        coll = client.proxied.items
        coll.drop()
        coll.insert_many([{"_id": i, "v": i} for i in range(500)])  # one OP_MSG with a document sequence
        coll.create_index("v")
        assert len(list(coll.find(batch_size=50))) == 500  # getMore through the proxy
        with coll.watch(max_await_time_ms=200) as stream:
            coll.update_one({"_id": 1}, {"$set": {"v": -1}})
            coll.delete_one({"_id": 2})
            events = [stream.next()["operationType"] for _ in range(2)]
        assert events == ["update", "delete"]
        assert coll.count_documents({}) == 499 and "v_1" in coll.index_information()
        for read in (lambda: client.local["oplog.rs"].find_one(), lambda: client.local.list_collection_names()):
            with pytest.raises(OperationFailure) as refused:
                read()
            assert refused.value.code == 13
        # The same server read directly (the Oplog Access endpoint) does give the oplog.
        with pymongo.MongoClient(f"mongodb://127.0.0.1:{server.port}/?directConnection=true", tls=True,
                                 tlsCAFile=certs["ca"]) as direct:
            assert direct.local["oplog.rs"].find_one() is not None
        client.drop_database("proxied")


def test_the_proxy_refuses_clients_without_its_ca(mongos) -> None:
    import pymongo
    from pymongo.errors import ServerSelectionTimeoutError

    proxy, _, _ = mongos
    with pymongo.MongoClient(f"mongodb://{proxy.host}/", tls=True, serverSelectionTimeoutMS=1_500) as client:
        with pytest.raises(ServerSelectionTimeoutError):
            client.admin.command("ping")


def test_the_topology_recheck_waits_for_whichever_pull_engine_ran() -> None:
    """The pull group always has one engine's path skipped: the recheck must not be skipped with it (under
    all_success it was, so ``done`` let a failed pull through to validation and a good one skip the check)."""
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder="dags").dags["mongo_to_atlas"]
    recheck = dag.get_task("compose.recheck_topology")
    assert recheck.trigger_rule == "none_failed_min_one_success"
    assert {"compose.pull.cutover", "compose.pull.mongosync_check_fence"} <= recheck.upstream_task_ids
    assert dag.get_task("compose.done").upstream_task_ids >= {"compose.recheck_topology", "compose.restore.restore_views"}
