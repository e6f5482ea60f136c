"""Wait for mongosync without holding a worker slot: a trigger polling ``/progress`` and a deferrable operator.

``MongosyncProgressTrigger`` runs in the triggerer and polls ``GET /progress`` until a condition holds:

- ``until="can_commit"``: RUNNING, ``canCommit`` true and ``lagTimeSeconds`` at most ``max_lag_seconds``
  (``commit_decision``); a sync that is already COMMITTING/COMMITTED also ends the wait (someone committed,
  e.g. an earlier try of the same task);
- ``until="committed"``: COMMITTED with ``canWrite`` true (the destination may take writes).

It yields one event: ``{"status": "success", "progress": {...}, "reason": ...}``, or ``"error"`` (mongosync
answered ``success: false``, e.g. a failed migration, or is IDLE so no sync will ever get there, or stayed
unreachable for ``max_consecutive_errors`` polls), or ``"timeout"``. The trigger lives in the importable
package (the triggerer does not load the DAG folder) and its kwargs hold only the mongosync URL, which
carries no credential (mongosync's API has none): the operator resolves the Airflow connection on the worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
from airflow.sdk import BaseOperator
from airflow.triggers.base import BaseTrigger, TriggerEvent

from atlas_migration.engines.mongosync import commit_decision
from atlas_migration.errors import ConfigurationError, MigrationError
from atlas_migration.hooks.mongosync import (
    COMMITTED,
    COMMITTING,
    IDLE,
    MongosyncError,
    MongosyncHook,
    MongosyncProgress,
    normalize_base_url,
)
from atlas_migration.redaction import redact

CLASSPATH = "atlas_migration.triggers.mongosync.MongosyncProgressTrigger"
UNTIL_CAN_COMMIT = "can_commit"
UNTIL_COMMITTED = "committed"
CONDITIONS = (UNTIL_CAN_COMMIT, UNTIL_COMMITTED)
MET, WAIT, FAIL = "met", "wait", "fail"


def evaluate(progress: MongosyncProgress, until: str, max_lag_seconds: float) -> tuple[str, str]:
    """(``MET`` | ``WAIT`` | ``FAIL``, reason) for one ``/progress`` reply; shared by trigger and operator."""
    if until not in CONDITIONS:
        raise ConfigurationError(f"until={until!r} is not one of {', '.join(CONDITIONS)}")
    if progress.state == IDLE:
        return FAIL, "mongosync is IDLE: no sync has been started (call /start first)"
    if until == UNTIL_COMMITTED:
        if progress.state == COMMITTED and progress.can_write:
            return MET, "committed: the destination accepts writes (canWrite=true)"
        if progress.state in (COMMITTING, COMMITTED):
            return WAIT, f"{progress.state}, canWrite={str(progress.can_write).lower()}"
        return WAIT, f"{progress.state}: waiting for a commit"
    decision = commit_decision(progress, max_lag_seconds)
    if decision.commit or decision.already_committed:
        return MET, decision.reason
    return WAIT, decision.reason


class MongosyncProgressTrigger(BaseTrigger):
    """Poll mongosync's ``/progress`` until ``until`` holds (see the module docstring)."""

    def __init__(self, base_url: str, *, until: str = UNTIL_CAN_COMMIT, max_lag_seconds: float = 5.0,
                 poll_interval: float = 10.0, timeout_seconds: float | None = 24 * 3600.0,
                 max_consecutive_errors: int = 12, request_timeout: float = 30.0) -> None:
        super().__init__()
        if until not in CONDITIONS:
            raise ConfigurationError(f"until={until!r} is not one of {', '.join(CONDITIONS)}")
        if poll_interval <= 0 or max_consecutive_errors < 1:
            raise ConfigurationError("poll_interval must be > 0 and max_consecutive_errors >= 1")
        self.base_url = normalize_base_url(base_url)  # refuses URLs carrying credentials
        self.until = until
        self.max_lag_seconds = max_lag_seconds
        self.poll_interval = poll_interval
        self.timeout_seconds = timeout_seconds
        self.max_consecutive_errors = max_consecutive_errors
        self.request_timeout = request_timeout

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return CLASSPATH, {
            "base_url": self.base_url, "until": self.until, "max_lag_seconds": self.max_lag_seconds,
            "poll_interval": self.poll_interval, "timeout_seconds": self.timeout_seconds,
            "max_consecutive_errors": self.max_consecutive_errors, "request_timeout": self.request_timeout,
        }

    async def _poll(self, client: httpx.AsyncClient) -> MongosyncProgress:
        """One ``GET /progress``; ``MongosyncError`` with ``error`` set for a ``success: false`` reply."""
        response = await client.get(self.base_url + "/progress")
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if not isinstance(payload, dict) or "success" not in payload:
            # Not mongosync speaking (restarting, a proxy in front): transient, counted rather than fatal.
            raise httpx.HTTPError(f"HTTP {response.status_code} without mongosync's JSON reply")
        if payload.get("success") is not True:
            raise MongosyncError(f"mongosync /progress: {payload.get('error')}: "
                                 f"{redact(str(payload.get('errorDescription')))}",
                                 error=payload.get("error"), error_description=payload.get("errorDescription"),
                                 endpoint="/progress", status=response.status_code)
        return MongosyncProgress.from_reply(payload)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        started = time.monotonic()
        errors = 0
        last_line = ""
        base = {"until": self.until, "base_url": self.base_url}
        async with httpx.AsyncClient(timeout=self.request_timeout) as client:
            while True:
                try:
                    progress = await self._poll(client)
                    errors = 0
                except MongosyncError as exc:
                    yield TriggerEvent({**base, "status": "error", "error": exc.error,
                                        "errorDescription": exc.error_description, "reason": str(exc)})
                    return
                except (httpx.HTTPError, OSError) as exc:
                    errors += 1
                    self.log.warning("mongosync /progress failed (%d of %d in a row): %s", errors,
                                     self.max_consecutive_errors, redact(str(exc)) or type(exc).__name__)
                    if errors >= self.max_consecutive_errors:
                        yield TriggerEvent({**base, "status": "error", "error": None, "errorDescription": None,
                                            "reason": f"mongosync unreachable for {errors} polls in a row: "
                                                      f"{type(exc).__name__}"})
                        return
                else:
                    verdict, reason = evaluate(progress, self.until, self.max_lag_seconds)
                    line = progress.line()
                    if line != last_line:  # one line per change, not one per poll
                        self.log.info("%s: %s", line, reason)
                        last_line = line
                    if verdict == MET:
                        yield TriggerEvent({**base, "status": "success", "reason": reason,
                                            "progress": progress.summary()})
                        return
                    if verdict == FAIL:
                        yield TriggerEvent({**base, "status": "error", "error": None, "errorDescription": None,
                                            "reason": reason, "progress": progress.summary()})
                        return
                elapsed = time.monotonic() - started
                if self.timeout_seconds is not None and elapsed >= self.timeout_seconds:
                    yield TriggerEvent({**base, "status": "timeout",
                                        "reason": f"condition {self.until!r} not reached after {elapsed:.0f} s"})
                    return
                await asyncio.sleep(self.poll_interval)


class MongosyncWaitOperator(BaseOperator):
    """Wait, deferred, until mongosync reaches ``until`` (``can_commit`` or ``committed``).

    Checks ``/progress`` once on the worker first, so a condition that already holds costs no deferral.
    Returns the progress summary (small, for XCom); raises ``MongosyncError`` on an error event and
    ``MigrationError`` on a timeout.
    """

    template_fields = ("mongosync_conn_id", "until", "max_lag_seconds")
    ui_color = "#e8f4ea"

    def __init__(self, *, mongosync_conn_id: str = MongosyncHook.default_conn_name, until: str = UNTIL_CAN_COMMIT,
                 max_lag_seconds: float = 5.0, poll_interval: float = 10.0,
                 wait_timeout_seconds: float | None = 24 * 3600.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if until not in CONDITIONS:
            raise ConfigurationError(f"until={until!r} is not one of {', '.join(CONDITIONS)}")
        self.mongosync_conn_id = mongosync_conn_id
        self.until = until
        self.max_lag_seconds = max_lag_seconds
        self.poll_interval = poll_interval
        self.wait_timeout_seconds = wait_timeout_seconds

    def execute(self, context: Any) -> dict[str, Any] | None:
        hook = MongosyncHook(self.mongosync_conn_id)
        progress = hook.progress()
        verdict, reason = evaluate(progress, self.until, float(self.max_lag_seconds))
        self.log.info("%s: %s", progress.line(), reason)
        if verdict == MET:
            return progress.summary()
        if verdict == FAIL:
            raise MongosyncError(f"mongosync will not reach {self.until!r}: {reason}", endpoint="/progress")
        trigger = MongosyncProgressTrigger(
            hook.base_url, until=self.until, max_lag_seconds=float(self.max_lag_seconds),
            poll_interval=self.poll_interval, timeout_seconds=self.wait_timeout_seconds)
        # The trigger enforces the timeout itself (with a clear event); Airflow's deferral timeout is a backstop.
        backstop = None if self.wait_timeout_seconds is None else timedelta(seconds=self.wait_timeout_seconds + 300)
        self.defer(trigger=trigger, method_name="execute_complete", timeout=backstop)  # raises TaskDeferred

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        status = event.get("status")
        if status == "success":
            self.log.info("mongosync reached %r: %s", event.get("until"), event.get("reason"))
            return event["progress"]
        if status == "error":
            raise MongosyncError(f"mongosync: {event.get('reason')}", error=event.get("error"),
                                 error_description=event.get("errorDescription"), endpoint="/progress")
        raise MigrationError(f"mongosync: {event.get('reason') or status}")
