"""A loopback stand-in for the mongos of a Compose "single shard" cluster, in front of one replica set.

Compose's sharded deployments put a mongos router in front of ONE shard (a replica set); their "Oplog Access"
add-on exposes that shard's replica set separately. Tests have no mongos binary, so this proxy turns a
one-node replica set (SecantusDB) into what a client of such a mongos sees:

- ``hello`` / ``isMaster`` / ``ismaster`` replies are rewritten as mongos writes them: ``msg: "isdbgrid"``
  and none of the replica-set fields (``setName``, ``hosts``, ``primary``, ``me``, ``topologyVersion`` ...),
  so drivers classify the server as a Mongos. Compression is removed from the handshake, so OP_COMPRESSED
  never appears on the wire.
- ``listShards`` (one shard: the backend's replica set) and ``balancerStatus`` are answered by the proxy.
- Commands on the ``local`` database are refused with Unauthorized (code 13), as Compose's mongos refuses
  the oplog to its users (which is why Oplog Access exists).
- Everything else (authentication, CRUD, getMore, change streams, listCollections, index builds ...) is
  forwarded byte for byte to the backend, on one backend connection per client connection. That includes
  ``$readPreference``, which drivers add for a mongos: the replica-set member accepts it (checked with
  SecantusDB; mongod does too), so it needs no stripping.

What it does NOT imitate: chunk routing, config servers, more than one shard, ``$readPreference``
routing to secondaries, mongos-only admin commands other than the two above (``addShard``,
``enableSharding``, ``shardCollection``, ``getShardMap`` ... are forwarded and fail as the replica set
fails them), and the privilege checks of the commands it answers itself (``listShards`` answers any client).

Wire protocol handled: the 16-byte header (messageLength, requestID, responseTo, opCode), OP_MSG (2013:
flagBits, kind 0 body and kind 1 document sequences; a CRC-32C checksum, flag bit 0, is dropped and the
flag cleared when the proxy re-encodes a message, since the bytes it covered changed), and OP_QUERY (2004)
with its OP_REPLY (1) for the legacy handshake. Replies flagged ``moreToCome`` (exhaust cursors) are
relayed until the last one; requests flagged ``moreToCome`` (unacknowledged writes) get no reply.

Use::

    with MongosProxy(backend_port, tls_cert=..., tls_key=..., backend_ca=...) as proxy:
        MongoClient(f"mongodb://{proxy.host}/?tls=true&tlsCAFile=...")

or ``python -m devtools.mongos_proxy --backend-port P [--port Q] ...`` (prints ``listening on host:port``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import ssl
import struct
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Self

import bson

log = logging.getLogger("devtools.mongos_proxy")

OP_REPLY, OP_QUERY, OP_COMPRESSED, OP_MSG = 1, 2004, 2012, 2013
HEADER = struct.Struct("<iiii")
CHECKSUM_PRESENT, MORE_TO_COME = 1 << 0, 1 << 1
MAX_MESSAGE = 48 * 1024 * 1024 + 16 * 1024  # maxMessageSizeBytes plus headroom for the envelope

HELLO_COMMANDS = {"hello", "ismaster"}  # compared lower-cased: isMaster, ismaster
# What a replica-set member adds to hello and a mongos does not have.
REPLICA_SET_FIELDS = ("setName", "hosts", "passives", "arbiters", "primary", "me", "setVersion", "electionId",
                      "secondary", "arbiterOnly", "hidden", "tags", "lastWrite", "topologyVersion", "isreplicaset")
UNAUTHORIZED = 13


class ProtocolError(Exception):
    """The peer sent something this proxy does not speak (the connection is closed)."""


# ---------------------------------------------------------------- wire format


@dataclass
class Message:
    request_id: int
    response_to: int
    op_code: int
    payload: bytes  # everything after the header

    def encode(self) -> bytes:
        return HEADER.pack(HEADER.size + len(self.payload), self.request_id, self.response_to, self.op_code) + \
            self.payload


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_message(sock: socket.socket) -> Message:
    length, request_id, response_to, op_code = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if not HEADER.size <= length <= MAX_MESSAGE:
        raise ProtocolError(f"message length {length} out of range")
    return Message(request_id, response_to, op_code, _recv_exact(sock, length - HEADER.size))


@dataclass
class Decision:
    """What to do with one client request."""

    answer: Message | None = None  # the proxy's own reply (nothing goes to the backend)
    forward: Message | None = None  # the request as sent on to the backend
    expect_reply: bool = True  # False for moreToCome requests (unacknowledged writes)
    hello: bool = False  # the reply is a handshake / monitoring answer to rewrite


@dataclass
class OpMsg:
    flags: int
    body: bytes  # the kind 0 section's BSON document
    sequences: list[bytes]  # the kind 1 sections, verbatim (size, identifier, documents)

    @classmethod
    def parse(cls, payload: bytes) -> OpMsg:
        (flags,) = struct.unpack_from("<I", payload)
        end = len(payload) - (4 if flags & CHECKSUM_PRESENT else 0)
        pos, body, sequences = 4, None, []
        while pos < end:
            kind = payload[pos]
            pos += 1
            (size,) = struct.unpack_from("<i", payload, pos)
            if kind == 0:
                if body is not None:
                    raise ProtocolError("OP_MSG with two body sections")
                body = payload[pos:pos + size]
            elif kind == 1:
                sequences.append(payload[pos:pos + size])
            else:
                raise ProtocolError(f"OP_MSG section kind {kind}")
            pos += size
        if body is None or pos != end:
            raise ProtocolError("OP_MSG without a body section, or with a truncated one")
        return cls(flags, body, sequences)

    def encode(self) -> bytes:
        # No checksum: the bytes are new, and a checksum is optional on the wire.
        parts = [struct.pack("<I", self.flags & ~CHECKSUM_PRESENT), b"\x00", self.body]
        parts += [b"\x01" + seq for seq in self.sequences]
        return b"".join(parts)


@dataclass
class OpQuery:
    flags: int
    collection: str
    skip: int
    limit: int
    query: bytes
    fields: bytes

    @classmethod
    def parse(cls, payload: bytes) -> OpQuery:
        (flags,) = struct.unpack_from("<i", payload)
        name_end = payload.index(b"\x00", 4)
        collection = payload[4:name_end].decode()
        skip, limit = struct.unpack_from("<ii", payload, name_end + 1)
        pos = name_end + 9
        (size,) = struct.unpack_from("<i", payload, pos)
        return cls(flags, collection, skip, limit, payload[pos:pos + size], payload[pos + size:])

    def encode(self) -> bytes:
        return struct.pack("<i", self.flags) + self.collection.encode() + b"\x00" + \
            struct.pack("<ii", self.skip, self.limit) + self.query + self.fields


def op_reply_documents(payload: bytes) -> tuple[int, int, int, list[bytes]]:
    flags, cursor_id, starting_from, number = struct.unpack_from("<iqii", payload)
    docs, pos = [], 20
    for _ in range(number):
        (size,) = struct.unpack_from("<i", payload, pos)
        docs.append(payload[pos:pos + size])
        pos += size
    return flags, cursor_id, starting_from, docs


def op_reply(flags: int, cursor_id: int, starting_from: int, docs: Iterable[bytes]) -> bytes:
    docs = list(docs)
    return struct.pack("<iqii", flags, cursor_id, starting_from, len(docs)) + b"".join(docs)


def command_name(document: dict[str, Any]) -> str:
    return next(iter(document), "")


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


class MongosProxy:
    """The proxy: ``start()`` binds and serves from daemon threads, ``stop()`` closes every connection."""

    def __init__(self, backend_port: int, *, backend_host: str = "127.0.0.1", port: int = 0,
                 tls_cert: str | None = None, tls_key: str | None = None, backend_ca: str | None = None,
                 backend_tls: bool | None = None) -> None:
        self.backend = (backend_host, backend_port)
        self.port = port
        self._server_ctx: ssl.SSLContext | None = None
        if tls_cert:
            self._server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._server_ctx.load_cert_chain(tls_cert, tls_key)
        self._backend_ctx: ssl.SSLContext | None = None
        if backend_tls or (backend_tls is None and backend_ca):
            self._backend_ctx = ssl.create_default_context(cafile=backend_ca)
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._set_name: str | None = None
        self.balancer_rounds = 0
        self._request_id = 1_000_000  # ids of the messages the proxy writes itself
        self.connections = 0  # accepted so far (tests read it)
        self.op_codes: Counter[int] = Counter()  # opCodes of the client requests seen (tests read it)

    # -------------------------------------------------------- lifecycle

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        thread = threading.Thread(target=self._accept_loop, name=f"mongos-proxy-{self.port}", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            # shutdown() wakes the blocked accept(); close() alone does not on Linux.
            self._shutdown(self._listener)
            self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            self._shutdown(sock)
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        try:
            sock.close()
        except OSError:
            pass

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            self._track(client)
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True,
                                      name=f"mongos-proxy-{self.port}-conn{self.connections}")
            thread.start()
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    # -------------------------------------------------------- one client connection

    def _serve(self, raw_client: socket.socket) -> None:
        client: socket.socket = raw_client
        backend: socket.socket | None = None
        try:
            raw_client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._server_ctx is not None:
                client = self._server_ctx.wrap_socket(raw_client, server_side=True)
                self._track(client)
            backend = self._connect_backend()
            self._track(backend)
            # One request at a time, as drivers use a connection: read it, answer it here or relay it and
            # its reply (several replies while the backend flags moreToCome).
            while not self._stopping.is_set():
                decision = self._handle_request(read_message(client))
                if decision.answer is not None:
                    client.sendall(decision.answer.encode())
                    continue
                assert decision.forward is not None
                backend.sendall(decision.forward.encode())
                if not decision.expect_reply:
                    continue
                while True:
                    reply = read_message(backend)
                    more = self._more_to_come(reply)
                    if decision.hello:
                        reply = self._rewrite_hello_reply(reply)
                    client.sendall(reply.encode())
                    if not more:
                        break
        except (ConnectionError, OSError, ProtocolError, ssl.SSLError) as exc:
            if not self._stopping.is_set() and not isinstance(exc, ConnectionError):
                log.debug("connection closed: %s", exc)
        finally:
            for sock in (client, raw_client, backend):
                if sock is not None:
                    self._shutdown(sock)
                    self._untrack(sock)

    def _connect_backend(self) -> socket.socket:
        sock = socket.create_connection(self.backend, timeout=10)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._backend_ctx is not None:
            sock = self._backend_ctx.wrap_socket(sock, server_hostname=self.backend[0])
        return sock

    @staticmethod
    def _more_to_come(message: Message) -> bool:
        return message.op_code == OP_MSG and bool(struct.unpack_from("<I", message.payload)[0] & MORE_TO_COME)

    def _handle_request(self, request: Message) -> Decision:
        self.op_codes[request.op_code] += 1
        if request.op_code == OP_MSG:
            msg = OpMsg.parse(request.payload)
            body = bson.decode(msg.body)
            local = self._local_reply(command_name(body), str(body.get("$db", "")))
            if local is not None:
                reply = OpMsg(0, bson.encode(local), []).encode()
                return Decision(answer=Message(self._next_id(), request.request_id, OP_MSG, reply))
            hello = command_name(body).lower() in HELLO_COMMANDS
            if hello and "compression" in body:
                body.pop("compression")
                msg.body = bson.encode(body)
                request = Message(request.request_id, 0, OP_MSG, msg.encode())
            elif msg.flags & CHECKSUM_PRESENT:
                request = Message(request.request_id, 0, OP_MSG, msg.encode())  # drops the checksum
            return Decision(forward=request, expect_reply=not msg.flags & MORE_TO_COME, hello=hello)
        if request.op_code == OP_QUERY:
            query = OpQuery.parse(request.payload)
            spec = bson.decode(query.query)
            command = spec.get("$query", spec) if isinstance(spec.get("$query"), dict) else spec
            db = query.collection.split(".", 1)[0]
            is_command = query.collection.endswith(".$cmd")
            local = self._local_reply(command_name(command), db) if is_command else (
                unauthorized("find", db) if db == "local" else None)
            if local is not None:
                payload = op_reply(0, 0, 0, [bson.encode(local)])
                return Decision(answer=Message(self._next_id(), request.request_id, OP_REPLY, payload))
            hello = is_command and command_name(command).lower() in HELLO_COMMANDS
            if hello and "compression" in command:
                command.pop("compression")
                query.query = bson.encode(spec)
                request = Message(request.request_id, 0, OP_QUERY, query.encode())
            return Decision(forward=request, hello=hello)
        if request.op_code == OP_COMPRESSED:
            raise ProtocolError("OP_COMPRESSED received although compression was never negotiated")
        raise ProtocolError(f"unsupported opCode {request.op_code}")

    def _rewrite_hello_reply(self, reply: Message) -> Message:
        if reply.op_code == OP_MSG:
            msg = OpMsg.parse(reply.payload)
            hello = bson.decode(msg.body)
            self._remember_set_name(hello)
            msg.body = bson.encode(mongos_hello(hello))
            return Message(reply.request_id, reply.response_to, OP_MSG, msg.encode())
        if reply.op_code == OP_REPLY:
            flags, cursor_id, starting_from, docs = op_reply_documents(reply.payload)
            rewritten = []
            for doc in docs:
                hello = bson.decode(doc)
                self._remember_set_name(hello)
                rewritten.append(bson.encode(mongos_hello(hello)))
            return Message(reply.request_id, reply.response_to, OP_REPLY,
                           op_reply(flags, cursor_id, starting_from, rewritten))
        return reply

    def _remember_set_name(self, hello: dict[str, Any]) -> None:
        if hello.get("setName"):
            self._set_name = str(hello["setName"])

    def _next_id(self) -> int:
        with self._lock:
            self._request_id += 1
            return self._request_id

    def _local_reply(self, command: str, db: str) -> dict[str, Any] | None:
        """The answer the proxy gives itself, or None to forward the command."""
        if db == "local":
            return unauthorized(command, db)
        if db != "admin":
            return None
        if command == "listShards":
            set_name = self.set_name()
            return {"shards": [{"_id": set_name, "host": f"{set_name}/{self.backend[0]}:{self.backend[1]}",
                                "state": 1}], "ok": 1.0}
        if command == "balancerStatus":
            with self._lock:
                self.balancer_rounds += 1
                rounds = self.balancer_rounds
            return {"mode": "full", "inBalancerRound": False, "numBalancerRounds": bson.Int64(rounds), "ok": 1.0}
        return None

    def set_name(self) -> str:
        """The backend's replica-set name (read on the first hello relayed, or asked for now)."""
        if self._set_name is None:
            sock = self._connect_backend()
            try:
                hello = OpMsg(0, bson.encode({"hello": 1, "$db": "admin"}), []).encode()
                sock.sendall(Message(self._next_id(), 0, OP_MSG, hello).encode())
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
    proxy = MongosProxy(args.backend_port, backend_host=args.backend_host, port=args.port,
                        tls_cert=args.tls_cert_file, tls_key=args.tls_key_file, backend_ca=args.backend_ca_file)
    proxy.start()
    print(f"listening on {proxy.host}", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    while not stopped.wait(0.5):  # a timed wait lets the signal handlers run promptly
        pass
    proxy.stop()


if __name__ == "__main__":
    main()
