"""Progress lines for long steps: counts, throughput and an ETA, at most once per interval.

Long copies are watched from the task log in the Airflow UI; a line every few seconds tells an operator
the task is alive, how fast it goes and when it should end, without flooding the log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

DEFAULT_INTERVAL_SECONDS = 10.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Thread-safe counter that logs ``label: done/total docs (pct), rate, MB, ETA`` periodically."""

    def __init__(
        self,
        label: str,
        total_documents: int | None,
        log: logging.Logger,
        *,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = total_documents if total_documents and total_documents > 0 else None
        self.log = log
        self.interval = interval
        self.clock = clock
        self.started = self.last_logged = clock()
        self.documents = 0
        self.bytes = 0
        self._lock = threading.Lock()

    def add(self, documents: int, nbytes: int = 0) -> None:
        with self._lock:
            self.documents += documents
            self.bytes += nbytes
            now = self.clock()
            if now - self.last_logged < self.interval:
                return
            self.last_logged = now
            line = self.line(now)
        self.log.info("%s", line)

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = max(now - self.started, 1e-9)
        rate = self.documents / elapsed
        text = f"{self.label}: {self.documents:,}"
        if self.total:
            text += f"/{self.total:,} docs ({min(100.0, 100.0 * self.documents / self.total):.0f}%)"
        else:
            text += " docs"
        text += f", {rate:,.0f} docs/s, {self.bytes / 1e6:,.1f} MB in {_duration(elapsed)}"
        if self.total and rate > 0 and self.documents < self.total:
            text += f", ETA {_duration((self.total - self.documents) / rate)}"
        return text

    def finish(self) -> str:
        line = self.line() + " (done)"
        self.log.info("%s", line)
        return line
