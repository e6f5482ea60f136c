"""A loopback stand-in for the mongos of a Compose "single shard" cluster, in front of one replica set.

Compose's sharded deployments put a mongos router in front of ONE shard (a replica set); their "Oplog Access"
add-on exposes that shard's replica set separately. Tests have no mongos binary, so this proxy turns a
one-node replica set (SecantusDB) into what a client of such a mongos sees:

- ``hello`` / ``isMaster`` / ``ismaster`` replies are rewritten as mongos writes them: ``msg: "isdbgrid"``
  and none of the replica-set fields (``setName``, ``hosts``, ``primary``, ``me``, ``topologyVersion`` ...),
  so drivers classify the server as a Mongos. Compression is removed from the handshake, so OP_COMPRESSED
  never appears on the wire.
- ``listShards`` answers with one shard, the backend's replica set, whose ``host`` is what a real mongos
  stores for a replica-set shard: ``<setName>/<member>,...`` with the members as the backend's own hello
  lists them (``hosts``), so a client can connect to the shard as a replica set with ``replicaSet=<setName>``.
- The balancer commands are answered by the proxy with their documented behaviour: ``balancerStatus``
  (``mode``, ``inBalancerRound``, ``numBalancerRounds``), ``balancerStop`` (mode ``off``; a real one first
  waits for a balancing round in progress to end: none ever runs here) and ``balancerStart`` (mode
  ``full``), both answering ``{ok: 1}``. The mode is kept per proxy, as a cluster keeps it in its config
  servers; ``numBalancerRounds`` counts the status requests made while the mode is ``full``.
- Commands on the ``local`` database are refused with Unauthorized (code 13), as Compose's mongos refuses
  the oplog to its users (which is why Oplog Access exists).
- Everything else (authentication, CRUD, getMore, change streams, listCollections, index builds ...) is
  forwarded byte for byte to the backend, on one backend connection per client connection. That includes
  ``$readPreference``, which drivers add for a mongos: the replica-set member accepts it (checked with
  SecantusDB; mongod does too), so it needs no stripping.

What it does NOT imitate: chunk routing and chunk migrations (there is one shard, so the balancer never
moves anything and ``inBalancerRound`` is always false), config servers (``config.collections``,
``config.shards`` ... are read from the backend, which has no sharding metadata: no collection is sharded),
more than one shard (``devtools.sharded_cluster`` routes between several shards instead of relaying), ``$readPreference`` routing to secondaries, mongos-only admin commands other than the
ones above (``addShard``, ``enableSharding``, ``shardCollection``, ``getShardMap`` ... are forwarded and fail
as the replica set fails them), ``maxTimeMS`` of the balancer commands, and the privilege checks of the
commands it answers itself (``listShards`` and the balancer commands answer any client).

It also implements, through ``devtools.replica_set_proxy.ReplicaSetProxy`` which it extends, the commands a
mongos shares with mongod and the test server lacks: ``setUserWriteBlockMode`` (user writes through this
proxy are refused with UserWritesBlocked; the bypass and privileges are imitated by application names, as
documented there), ``appendOplogNote`` and mongod's refusal of change events over its size limit.

The wire format and the relay are ``devtools.wire_proxy``.

Use::

    with MongosProxy(backend_port, tls_cert=..., tls_key=..., backend_ca=...) as proxy:
        MongoClient(f"mongodb://{proxy.host}/?tls=true&tlsCAFile=...")

or ``python -m devtools.mongos_proxy --backend-port P [--port Q] ...`` (prints ``listening on host:port``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from typing import Any

import bson

from devtools.replica_set_proxy import ReplicaSetProxy
from devtools.wire_proxy import (  # noqa: F401 - re-exported: tests and older callers import them from here
    CHECKSUM_PRESENT,
    HELLO_COMMANDS,
    MORE_TO_COME,
    OP_COMPRESSED,
    OP_MSG,
    OP_QUERY,
    OP_REPLY,
    Connection,
    Decision,
    Message,
    OpMsg,
    OpQuery,
    ProtocolError,
    WireProxy,
    command_name,
    op_msg_answer,
    op_reply_answer,
    read_message,
    rewrite_reply_documents,
    serve_forever,
)

log = logging.getLogger("devtools.mongos_proxy")

# What a replica-set member adds to hello and a mongos does not have.
REPLICA_SET_FIELDS = ("setName", "hosts", "passives", "arbiters", "primary", "me", "setVersion", "electionId",
                      "secondary", "arbiterOnly", "hidden", "tags", "lastWrite", "topologyVersion", "isreplicaset")
UNAUTHORIZED = 13


# ---------------------------------------------------------------- the mongos behaviour


def mongos_hello(reply: dict[str, Any]) -> dict[str, Any]:
    """A replica-set member's hello reply as a mongos in front of it answers."""
    out = {k: v for k, v in reply.items() if k not in REPLICA_SET_FIELDS}
    out.pop("compression", None)
    if reply.get("ok"):
        out["msg"] = "isdbgrid"
        if "ismaster" in out or "isWritablePrimary" not in out:
            out["ismaster"] = True
        if "isWritablePrimary" in out:
            out["isWritablePrimary"] = True
    return out


def unauthorized(command: str, db: str) -> dict[str, Any]:
    return {"ok": 0.0, "errmsg": f"not authorized on {db} to execute command {{ {command}: ... }}",
            "code": UNAUTHORIZED, "codeName": "Unauthorized"}


class MongosProxy(ReplicaSetProxy):
    """The mongos look-alike; ``start()``/``stop()`` or a ``with`` block (see ``WireProxy``).

    It builds on ``ReplicaSetProxy``, so it also has what a mongos shares with mongod and the test server
    lacks: ``setUserWriteBlockMode`` (run on a mongos, it blocks user writes across the cluster: here, on the
    one shard behind it, for clients of this proxy), ``appendOplogNote`` and the large change-event refusal;
    the hello reply is a mongos's instead of a replica-set member's."""

    thread_name = "mongos-proxy"

    def __init__(self, backend_port: int, *, backend_host: str = "127.0.0.1", port: int = 0,
                 tls_cert: str | None = None, tls_key: str | None = None, backend_ca: str | None = None,
                 backend_tls: bool | None = None, bypass_app_names: Iterable[str] = (),
                 privileged_app_names: Iterable[str] | None = None) -> None:
        super().__init__(backend_port, backend_host=backend_host, port=port, tls_cert=tls_cert, tls_key=tls_key,
                         backend_ca=backend_ca, backend_tls=backend_tls, bypass_app_names=bypass_app_names,
                         privileged_app_names=privileged_app_names)
        self._set_name: str | None = None
        self._members: list[str] = []
        self.balancer_rounds = 0
        self.balancer_mode = "full"  # a new cluster's balancer is on

    def handle_request(self, conn: Connection, request: Message) -> Decision:
        if request.op_code == OP_MSG:
            body = bson.decode(OpMsg.parse(request.payload).body)
            local = self._local_reply(command_name(body), str(body.get("$db", "")))
            if local is not None:
                return op_msg_answer(request, self, local)
        elif request.op_code == OP_QUERY:
            query = OpQuery.parse(request.payload)
            spec = bson.decode(query.query)
            command = spec.get("$query", spec) if isinstance(spec.get("$query"), dict) else spec
            db = query.collection.split(".", 1)[0]
            local = self._local_reply(command_name(command), db) if query.collection.endswith(".$cmd") else (
                unauthorized("find", db) if db == "local" else None)
            if local is not None:
                return op_reply_answer(request, self, local)
        return super().handle_request(conn, request)

    def _rewrite_hello(self, reply: Message) -> Message:
        def rewrite(hello: dict[str, Any]) -> dict[str, Any]:
            self._remember_set_name(hello)
            return mongos_hello(hello)

        return rewrite_reply_documents(reply, rewrite)

    def _remember_set_name(self, hello: dict[str, Any]) -> None:
        if hello.get("setName"):
            self._set_name = str(hello["setName"])
            self._members = [str(h) for h in hello.get("hosts") or []]

    def _local_reply(self, command: str, db: str) -> dict[str, Any] | None:
        """The answer the proxy gives itself, or None to forward the command."""
        if db == "local":
            return unauthorized(command, db)
        if db != "admin":
            return None
        if command == "listShards":
            set_name = self.set_name()
            return {"shards": [{"_id": set_name, "host": self.shard_host(), "state": 1}], "ok": 1.0}
        if command == "balancerStatus":
            with self._lock:
                if self.balancer_mode == "full":
                    self.balancer_rounds += 1
                mode, rounds = self.balancer_mode, self.balancer_rounds
            return {"mode": mode, "inBalancerRound": False, "numBalancerRounds": bson.Int64(rounds), "ok": 1.0}
        if command in ("balancerStop", "balancerStart"):
            with self._lock:
                self.balancer_mode = "off" if command == "balancerStop" else "full"
            return {"ok": 1.0}
        return None

    def shard_host(self) -> str:
        """The one shard's ``listShards`` host: ``<setName>/<member>,...`` (the backend's own member list;
        the backend address when its hello lists none)."""
        set_name = self.set_name()
        members = self._members or [f"{self.backend[0]}:{self.backend[1]}"]
        return f"{set_name}/{','.join(members)}"

    def set_name(self) -> str:
        """The backend's replica-set name (read on the first hello relayed, or asked for now)."""
        if self._set_name is None:
            sock = self.connect_backend()
            try:
                hello = OpMsg(0, bson.encode({"hello": 1, "$db": "admin"}), []).encode()
                sock.sendall(Message(self.next_id(), 0, OP_MSG, hello).encode())
                self._remember_set_name(bson.decode(OpMsg.parse(read_message(sock).payload).body))
            finally:
                sock.close()
        return self._set_name or "shard0"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--backend-port", type=int, required=True)
    parser.add_argument("--backend-host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls-cert-file")
    parser.add_argument("--tls-key-file")
    parser.add_argument("--backend-ca-file", help="CA of the backend's TLS certificate (turns backend TLS on)")
    args = parser.parse_args(argv)
    serve_forever(MongosProxy(args.backend_port, backend_host=args.backend_host, port=args.port,
                              tls_cert=args.tls_cert_file, tls_key=args.tls_key_file,
                              backend_ca=args.backend_ca_file))


if __name__ == "__main__":
    main()
