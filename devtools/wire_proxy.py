"""The generic part of the loopback wire proxies in devtools: MongoDB's wire format and a threaded relay.

A ``WireProxy`` listens on 127.0.0.1, opens one backend connection per client connection (TLS on either
side when configured) and relays requests one at a time, as drivers use a connection. Subclasses shape
what the client sees through two hooks:

- ``handle_request(conn, request) -> Decision``: answer here (``answer``), or forward (``forward``, maybe
  rewritten), optionally with ``rewrite``, a function applied to every reply the backend sends for it.
- ``Connection.backend_command(db, body)`` lets a hook run its own command on the client's backend
  connection (so it runs with the client's authentication) before deciding.

Wire protocol handled: the 16-byte header (messageLength, requestID, responseTo, opCode), OP_MSG (2013:
flagBits, kind 0 body and kind 1 document sequences; a CRC-32C checksum, flag bit 0, is dropped and the
flag cleared when the proxy re-encodes a message, since the bytes it covered changed), and OP_QUERY (2004)
with its OP_REPLY (1) for the legacy handshake. Replies flagged ``moreToCome`` (exhaust cursors, streaming
hello) are relayed until the last one; requests flagged ``moreToCome`` (unacknowledged writes) get no
reply. OP_COMPRESSED is refused: proxies strip ``compression`` from the handshake so it is never agreed.

Used by ``devtools.mongos_proxy`` (a mongos look-alike) and ``devtools.replica_set_proxy``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Self

import bson

log = logging.getLogger("devtools.wire_proxy")

OP_REPLY, OP_QUERY, OP_COMPRESSED, OP_MSG = 1, 2004, 2012, 2013
HEADER = struct.Struct("<iiii")
CHECKSUM_PRESENT, MORE_TO_COME = 1 << 0, 1 << 1
MAX_MESSAGE = 48 * 1024 * 1024 + 16 * 1024  # maxMessageSizeBytes plus headroom for the envelope
HELLO_COMMANDS = {"hello", "ismaster"}  # compared lower-cased: isMaster, ismaster


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

    def documents(self) -> dict[str, list[bytes]]:
        """The kind 1 sections as {identifier: [raw BSON document, ...]}."""
        out: dict[str, list[bytes]] = {}
        for seq in self.sequences:
            name_end = seq.index(b"\x00", 4)
            docs, pos = out.setdefault(seq[4:name_end].decode(), []), name_end + 1
            while pos < len(seq):
                (size,) = struct.unpack_from("<i", seq, pos)
                docs.append(seq[pos:pos + size])
                pos += size
        return out


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


def more_to_come(message: Message) -> bool:
    return message.op_code == OP_MSG and bool(struct.unpack_from("<I", message.payload)[0] & MORE_TO_COME)


def rewrite_reply_documents(reply: Message, rewrite: Callable[[dict[str, Any]], dict[str, Any]]) -> Message:
    """``reply`` with its command document(s) passed through ``rewrite`` (OP_MSG body or OP_REPLY documents)."""
    if reply.op_code == OP_MSG:
        msg = OpMsg.parse(reply.payload)
        msg.body = bson.encode(rewrite(bson.decode(msg.body)))
        return Message(reply.request_id, reply.response_to, OP_MSG, msg.encode())
    if reply.op_code == OP_REPLY:
        flags, cursor_id, starting_from, docs = op_reply_documents(reply.payload)
        docs = [bson.encode(rewrite(bson.decode(doc))) for doc in docs]
        return Message(reply.request_id, reply.response_to, OP_REPLY, op_reply(flags, cursor_id, starting_from, docs))
    return reply


@dataclass
class Decision:
    """What to do with one client request."""

    answer: Message | None = None  # the proxy's own reply (nothing goes to the backend)
    forward: Message | None = None  # the request as sent on to the backend
    expect_reply: bool = True  # False for moreToCome requests (unacknowledged writes)
    rewrite: Callable[[Message], Message] | None = None  # applied to each backend reply before relaying


@dataclass
class Connection:
    """One client connection and its backend connection; ``info`` is for the subclass (handshake facts ...)."""

    number: int
    proxy: WireProxy
    backend: socket.socket | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def backend_command(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        """Run one command of the proxy's own on this client's backend connection and return the reply."""
        assert self.backend is not None
        payload = OpMsg(0, bson.encode({**body, "$db": db}), []).encode()
        self.backend.sendall(Message(self.proxy.next_id(), 0, OP_MSG, payload).encode())
        reply = read_message(self.backend)
        if reply.op_code != OP_MSG:
            raise ProtocolError(f"backend answered opCode {reply.op_code} to an OP_MSG")
        return bson.decode(OpMsg.parse(reply.payload).body)


def op_msg_answer(request: Message, proxy: WireProxy, document: dict[str, Any]) -> Decision:
    """A Decision answering an OP_MSG request with ``document``."""
    payload = OpMsg(0, bson.encode(document), []).encode()
    return Decision(answer=Message(proxy.next_id(), request.request_id, OP_MSG, payload))


def op_reply_answer(request: Message, proxy: WireProxy, document: dict[str, Any]) -> Decision:
    """A Decision answering an OP_QUERY request with ``document`` in an OP_REPLY."""
    payload = op_reply(0, 0, 0, [bson.encode(document)])
    return Decision(answer=Message(proxy.next_id(), request.request_id, OP_REPLY, payload))


class WireProxy:
    """The relay: ``start()`` binds and serves from daemon threads, ``stop()`` closes every connection.

    Subclasses override ``handle_request``; the default forwards everything (dropping OP_MSG checksums is
    left to the subclass that re-encodes).
    """

    thread_name = "wire-proxy"

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
        thread = threading.Thread(target=self._accept_loop, name=f"{self.thread_name}-{self.port}", daemon=True)
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

    def next_id(self) -> int:
        with self._lock:
            self._request_id += 1
            return self._request_id

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            self._track(client)
            thread = threading.Thread(target=self._serve, args=(client, self.connections), daemon=True,
                                      name=f"{self.thread_name}-{self.port}-conn{self.connections}")
            thread.start()
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    # -------------------------------------------------------- one client connection

    def _serve(self, raw_client: socket.socket, number: int) -> None:
        client: socket.socket = raw_client
        conn = Connection(number, self)
        try:
            raw_client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._server_ctx is not None:
                client = self._server_ctx.wrap_socket(raw_client, server_side=True)
                self._track(client)
            conn.backend = self.connect_backend()
            self._track(conn.backend)
            # One request at a time, as drivers use a connection: read it, answer it here or relay it and
            # its reply (several replies while the backend flags moreToCome).
            while not self._stopping.is_set():
                request = read_message(client)
                self.op_codes[request.op_code] += 1
                decision = self.handle_request(conn, request)
                if decision.answer is not None:
                    client.sendall(decision.answer.encode())
                    continue
                assert decision.forward is not None
                conn.backend.sendall(decision.forward.encode())
                if not decision.expect_reply:
                    continue
                while True:
                    reply = read_message(conn.backend)
                    more = more_to_come(reply)
                    if decision.rewrite is not None:
                        reply = decision.rewrite(reply)
                    client.sendall(reply.encode())
                    if not more:
                        break
        except (ConnectionError, OSError, ProtocolError, ssl.SSLError) as exc:
            if not self._stopping.is_set() and not isinstance(exc, ConnectionError):
                log.debug("connection closed: %s", exc)
        finally:
            for sock in (client, raw_client, conn.backend):
                if sock is not None:
                    self._shutdown(sock)
                    self._untrack(sock)

    def connect_backend(self) -> socket.socket:
        sock = socket.create_connection(self.backend, timeout=10)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._backend_ctx is not None:
            sock = self._backend_ctx.wrap_socket(sock, server_hostname=self.backend[0])
        return sock

    def handle_request(self, conn: Connection, request: Message) -> Decision:
        """Override: what to do with ``request``. The default relays it unchanged."""
        if request.op_code == OP_COMPRESSED:
            raise ProtocolError("OP_COMPRESSED received although compression was never negotiated")
        expect = not (request.op_code == OP_MSG and struct.unpack_from("<I", request.payload)[0] & MORE_TO_COME)
        return Decision(forward=request, expect_reply=expect)


def serve_forever(proxy: WireProxy) -> None:
    """Start ``proxy``, print ``listening on host:port`` and serve until SIGTERM or SIGINT (the CLIs)."""
    import signal

    proxy.start()
    print(f"listening on {proxy.host}", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    while not stopped.wait(0.5):  # a timed wait lets the signal handlers run promptly
        pass
    proxy.stop()
