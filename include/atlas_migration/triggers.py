"""Watching an Atlas live migration without holding a worker: ``LiveMigrationTrigger`` and its operator.

``WaitForLiveMigrationOperator`` checks the migration once; unless it is already where it should be, it
defers to ``LiveMigrationTrigger``, which polls ``GET /groups/{groupId}/liveMigrations/{id}`` in the
triggerer and fires one event when the migration is

- ``ready``: WORKING, ``readyForCutover`` and ``lagTimeSeconds`` at or under the threshold (``wait_for="ready"``);
- ``complete``: COMPLETE;
- ``failed`` / ``expired``: FAILED, or EXPIRED (the 120-hour cutover window passed without a cutover);
- ``timeout``: the deadline passed first; ``error``: the API call failed for good (after the hook's retries).

The triggerer does not load the DAG folder: this module lives in the importable package, and the trigger's
serialized kwargs are ids and numbers only (the Airflow connection id, never a key or a token). The hook's
blocking HTTP calls (with its retry and redaction rules) run in a worker thread, so the triggerer's event
loop is never blocked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException
from airflow.triggers.base import BaseTrigger, TriggerEvent

from atlas_migration.errors import MigrationError

TRIGGER_CLASSPATH = "atlas_migration.triggers.LiveMigrationTrigger"
WAIT_FOR = ("ready", "complete")
OUTCOMES = ("ready", "complete", "failed", "expired", "timeout", "error")
# A progress line at most this often while polling (every poll would flood the triggerer's log).
PROGRESS_LOG_SECONDS = 300.0


class LiveMigrationFailed(MigrationError, AirflowFailException):
    """The live migration cannot go on (FAILED, EXPIRED, refused, timed out): the task fails without retries."""


def summarise(migration: dict[str, Any]) -> dict[str, Any]:
    """The fields worth keeping from a migration object (small, no secrets)."""
    return {"id": migration.get("_id"), "status": migration.get("status"),
            "readyForCutover": bool(migration.get("readyForCutover")),
            "lagTimeSeconds": migration.get("lagTimeSeconds")}


def describe(migration: dict[str, Any]) -> str:
    lag = migration.get("lagTimeSeconds")
    return (f"status {migration.get('status')}, readyForCutover {str(bool(migration.get('readyForCutover'))).lower()}"
            + (f", lag {lag} s" if lag is not None else ""))


def watch_outcome(migration: dict[str, Any], wait_for: str, max_lag_seconds: float | None) -> str | None:
    """The event a migration object calls for, or None to keep polling (pure)."""
    status = migration.get("status")
    if status == "FAILED":
        return "failed"
    if status == "EXPIRED":
        return "expired"
    if status == "COMPLETE":
        return "complete"
    if wait_for == "ready" and status == "WORKING" and migration.get("readyForCutover"):
        lag = migration.get("lagTimeSeconds")
        # No lag once a cutover is under way (Atlas reports it only before the cutover): ready then too.
        if lag is None or max_lag_seconds is None or float(lag) <= max_lag_seconds:
            return "ready"
    return None


def outcome_message(outcome: str, migration: dict[str, Any] | None, *, wait_for: str, migration_id: str,
                    deadline: float | None = None, error: str | None = None) -> str:
    """The sentence the operator reads in the task log for an event."""
    state = describe(migration) if migration else "no status read"
    if outcome == "ready":
        return f"live migration {migration_id} is ready for cutover ({state})"
    if outcome == "complete":
        return f"live migration {migration_id} is COMPLETE"
    if outcome == "failed":
        return (f"Atlas reports live migration {migration_id} FAILED ({state}). The API gives no reason: see the "
                "project's Live Migration page in the Atlas UI, fix the cause, and start a new migration")
    if outcome == "expired":
        return (f"live migration {migration_id} EXPIRED: the 120-hour cutover window passed without a cutover. "
                "Atlas stopped syncing; start a new migration and cut over within the window")
    if outcome == "timeout":
        goal = "ready for cutover" if wait_for == "ready" else "COMPLETE"
        by = "the deadline" if deadline is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(deadline))
        return (f"live migration {migration_id} was not {goal} by {by}, the wait timeout ({state}); Atlas keeps it "
                "running: raise the wait timeout and re-run this task, or watch it in the Atlas UI")
    return f"could not read live migration {migration_id}: {error or 'unknown error'}"


class LiveMigrationTrigger(BaseTrigger):
    """Polls one live migration until ``watch_outcome`` has an answer or ``deadline`` (epoch seconds) passes."""

    def __init__(self, *, atlas_conn_id: str, group_id: str, migration_id: str, wait_for: str = "ready",
                 max_lag_seconds: float | None = None, poll_interval: float = 60.0, deadline: float | None = None,
                 ready_since: float | None = None) -> None:
        super().__init__()
        if wait_for not in WAIT_FOR:
            raise ValueError(f"wait_for must be one of {', '.join(WAIT_FOR)}, got {wait_for!r}")
        self.atlas_conn_id = atlas_conn_id
        self.group_id = group_id
        self.migration_id = migration_id
        self.wait_for = wait_for
        self.max_lag_seconds = max_lag_seconds
        self.poll_interval = max(0.1, float(poll_interval))
        self.deadline = deadline
        self.ready_since = ready_since

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return TRIGGER_CLASSPATH, {
            "atlas_conn_id": self.atlas_conn_id, "group_id": self.group_id, "migration_id": self.migration_id,
            "wait_for": self.wait_for, "max_lag_seconds": self.max_lag_seconds, "poll_interval": self.poll_interval,
            "deadline": self.deadline, "ready_since": self.ready_since,
        }

    def _hook(self):
        from atlas_migration.atlas_api import AtlasAdminHook

        return AtlasAdminHook(self.atlas_conn_id)

    def _event(self, outcome: str, migration: dict[str, Any] | None, error: str | None = None) -> TriggerEvent:
        return TriggerEvent({
            "outcome": outcome,
            "migration": summarise(migration) if migration else None,
            "message": outcome_message(outcome, migration, wait_for=self.wait_for, migration_id=self.migration_id,
                                       deadline=self.deadline, error=error),
            "observed_at": time.time(),
            "ready_since": self.ready_since,
        })

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from atlas_migration.atlas_api import AtlasApiError

        hook = await asyncio.to_thread(self._hook)
        last_log = 0.0
        try:
            while True:
                try:
                    # The hook reads its connection on first use and retries 429/5xx itself: in a thread.
                    migration = await asyncio.to_thread(hook.get_live_migration, self.migration_id,
                                                        group_id=self.group_id)
                except (AtlasApiError, MigrationError) as exc:  # messages are redacted by the hook
                    yield self._event("error", None, str(exc))
                    return
                now = time.time()
                if migration.get("readyForCutover") and self.ready_since is None:
                    self.ready_since = now  # the 120-hour cutover window starts about here
                outcome = watch_outcome(migration, self.wait_for, self.max_lag_seconds)
                if outcome:
                    yield self._event(outcome, migration)
                    return
                if self.deadline is not None and now >= self.deadline:
                    yield self._event("timeout", migration)
                    return
                if now - last_log >= PROGRESS_LOG_SECONDS:
                    self.log.info("live migration %s: %s; waiting until %s", self.migration_id, describe(migration),
                                  "ready for cutover" if self.wait_for == "ready" else "COMPLETE")
                    last_log = now
                await asyncio.sleep(self.poll_interval)
        finally:
            # Closing the session only drops pooled sockets: quick, and safe even when the loop is shutting down.
            hook.close()


@dataclass(frozen=True)
class WatchSettings:
    """The operator's numeric settings after templating (rendered templates arrive as strings)."""

    max_lag_seconds: float | None
    poll_interval: float
    timeout_seconds: float

    @classmethod
    def parse(cls, max_lag_seconds: Any, poll_interval: Any, timeout_seconds: Any) -> WatchSettings:
        def number(name: str, value: Any, allow_none: bool = False) -> float | None:
            if value in (None, "", "None") and allow_none:
                return None
            try:
                result = float(value)
            except (TypeError, ValueError):
                raise MigrationError(f"{name} must be a number, got {value!r}") from None
            if result < 0:
                raise MigrationError(f"{name} must not be negative, got {value!r}")
            return result

        return cls(number("max_lag_seconds", max_lag_seconds, allow_none=True),
                   number("poll_interval", poll_interval) or 1.0, number("timeout_seconds", timeout_seconds) or 0.0)


class WaitForLiveMigrationOperator(BaseOperator):
    """Wait, deferred, until a live migration is ready for cutover (``wait_for="ready"``) or COMPLETE.

    Returns a small summary (``outcome``, ``migration`` status fields, ``ready_since``, ``observed_at``);
    FAILED, EXPIRED, a timeout or an API error fail the task with the reason (no retries: re-running it
    re-checks the migration, which is safe).
    """

    template_fields = ("atlas_conn_id", "group_id", "migration_id", "max_lag_seconds", "poll_interval",
                       "timeout_seconds")
    ui_color = "#d6eaf8"

    def __init__(self, *, atlas_conn_id: str, group_id: Any, migration_id: Any, wait_for: str = "ready",
                 max_lag_seconds: Any = None, poll_interval: Any = 60, timeout_seconds: Any = 7 * 24 * 3600,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if wait_for not in WAIT_FOR:
            raise ValueError(f"wait_for must be one of {', '.join(WAIT_FOR)}, got {wait_for!r}")
        self.atlas_conn_id = atlas_conn_id
        self.group_id = group_id
        self.migration_id = migration_id
        self.wait_for = wait_for
        self.max_lag_seconds = max_lag_seconds
        self.poll_interval = poll_interval
        self.timeout_seconds = timeout_seconds

    def _settings(self) -> WatchSettings:
        lag = self.max_lag_seconds if self.wait_for == "ready" else None
        return WatchSettings.parse(lag, self.poll_interval, self.timeout_seconds)

    def execute(self, context: Any) -> dict[str, Any]:
        from atlas_migration.atlas_api import AtlasAdminHook

        settings = self._settings()
        hook = AtlasAdminHook(self.atlas_conn_id)
        try:
            migration = hook.get_live_migration(str(self.migration_id), group_id=str(self.group_id))
        finally:
            hook.close()
        now = time.time()
        ready_since = now if migration.get("readyForCutover") else None
        outcome = watch_outcome(migration, self.wait_for, settings.max_lag_seconds)
        if outcome:
            return self._finish({"outcome": outcome, "migration": summarise(migration), "observed_at": now,
                                 "ready_since": ready_since,
                                 "message": outcome_message(outcome, migration, wait_for=self.wait_for,
                                                            migration_id=str(self.migration_id))})
        self.log.info("live migration %s: %s; deferring to LiveMigrationTrigger until it is %s (poll every %.0f s, "
                      "give up after %.0f s)", self.migration_id, describe(migration),
                      "ready for cutover" if self.wait_for == "ready" else "COMPLETE", settings.poll_interval,
                      settings.timeout_seconds)
        trigger = LiveMigrationTrigger(
            atlas_conn_id=self.atlas_conn_id, group_id=str(self.group_id), migration_id=str(self.migration_id),
            wait_for=self.wait_for, max_lag_seconds=settings.max_lag_seconds, poll_interval=settings.poll_interval,
            deadline=now + settings.timeout_seconds, ready_since=ready_since)
        # Airflow's own deferral timeout is a backstop a little after the trigger's deadline, which reports
        # the last status it saw.
        self.defer(trigger=trigger, method_name="execute_complete",
                   timeout=timedelta(seconds=settings.timeout_seconds + max(60.0, 3 * settings.poll_interval)))

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        return self._finish(event)

    def _finish(self, event: dict[str, Any]) -> dict[str, Any]:
        outcome = event.get("outcome")
        wanted = ("ready", "complete") if self.wait_for == "ready" else ("complete",)
        if outcome not in wanted:
            raise LiveMigrationFailed(event.get("message") or f"live migration {self.migration_id}: {outcome}")
        self.log.info("%s", event.get("message"))
        return {k: event.get(k) for k in ("outcome", "migration", "observed_at", "ready_since")}
