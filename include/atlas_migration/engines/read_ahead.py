"""Read-ahead: iterate a source cursor in a background thread while the caller writes what it already has.

A copy that reads a batch and then writes it leaves the source idle while the target writes, and the
target idle while the source answers the next getMore. ``ReadAhead`` keeps up to ``depth`` items read
ahead in a bounded queue, so the two overlap and memory stays bounded (``depth`` batches at most).

Only the background thread touches the iterable (a pymongo cursor is not shared between threads); the
caller gets the items in order, and an exception raised while reading is raised in the caller when it
reaches that point, as a plain loop would. Leaving the ``with`` block stops the thread (it finishes the
read in progress, if any) before anything else, such as the cursor, is closed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_ITEM, _END, _ERROR = "item", "end", "error"
_PUT_POLL_SECONDS = 0.1


class ReadAhead(Generic[T]):
    """``with ReadAhead(items, depth=2) as ahead: for item in ahead: ...`` (the order of ``items`` kept)."""

    def __init__(self, items: Iterable[T], *, depth: int = 2, name: str = "read-ahead") -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self._queue: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(items,), name=name, daemon=True)
        self._thread.start()

    def _read(self, items: Iterable[T]) -> None:
        try:
            for item in items:
                if not self._put(_ITEM, item):
                    return
        except Exception as exc:  # handed to the caller, who raises it where a plain loop would have
            self._put(_ERROR, exc)
            return
        self._put(_END, None)

    def _put(self, kind: str, value: object) -> bool:
        """Queue one entry, waiting while the queue is full; False once the caller has stopped reading."""
        while not self._stop.is_set():
            try:
                self._queue.put((kind, value), timeout=_PUT_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[T]:
        while True:
            kind, value = self._queue.get()
            if kind == _END:
                return
            if kind == _ERROR:
                raise value  # type: ignore[misc]
            yield value  # type: ignore[misc]

    def close(self) -> None:
        """Stop reading ahead and wait for the thread (a read in progress ends first)."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
