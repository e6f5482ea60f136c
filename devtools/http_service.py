"""The plumbing every local contract server shares: a ``ThreadingHTTPServer`` on loopback, served from a
daemon thread (``start``/``stop``, or a ``with`` block) or in-line (``serve_forever``, for ``python -m``)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

# shutdown() waits for the serving loop's next poll: a short interval keeps stop() in the milliseconds.
POLL_INTERVAL = 0.05


class DispatchingHandler(BaseHTTPRequestHandler):
    """Routes every method to ``_dispatch`` with the body read, and keeps stderr quiet (each stand-in logs
    requests itself, readable under ``/__test__/requests``)."""

    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid 40 ms stalls

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature from the base class
        return

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        raise NotImplementedError

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()


class LoopbackHttpService:
    """Subclasses build their handler class and call ``super().__init__(handler, host, port)``."""

    thread_name = "http-service"

    def __init__(self, handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1", port: int = 0) -> None:
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> Self:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": POLL_INTERVAL},
                                        name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=POLL_INTERVAL)

    def serve_until_interrupted(self) -> None:
        """Serve in-line (``python -m``) until Ctrl-C or SIGTERM, then release everything."""
        try:
            self.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self.httpd.server_close()
            self.close()

    def close(self) -> None:
        """What a subclass must release after the server stops (background engines, files)."""

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread:
            self._thread.join(timeout=5)
        self.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
