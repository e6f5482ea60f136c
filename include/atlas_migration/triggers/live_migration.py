"""Watching an Atlas live migration without holding a worker: ``LiveMigrationTrigger`` and its operator.

``WaitForLiveMigrationOperator`` checks the migration once; unless it is already where it should be, it
defers to ``LiveMigrationTrigger``, which polls ``GET /groups/{groupId}/liveMigrations/{id}`` in the
triggerer and fires one event when the migration is

- ``ready``: WORKING, ``readyForCutover`` and ``lagTimeSeconds`` at or under the threshold (``wait_for="ready"``);
- ``complete``: COMPLETE;
- ``failed`` / ``expired``: FAILED, or EXPIRED (the 120-hour cutover window passed without a cutover);
- ``timeout``: the deadline passed first; ``error``: the API failed in a way retrying cannot mend (401, 403,
  404, a contract error), or kept failing transiently (unreachable, 5xx, 429) for longer than
  ``outage_tolerance`` seconds (``atlas_migration.api_outage``: every retry is logged with what failed and for
  how long). Either way the migration itself is untouched: the message says so and how to resume watching.

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

from atlas_migration.api_outage import (
    DEFAULT_TOLERANCE_SECONDS,
    Outage,
    OutagePolicy,
    format_seconds,
    is_transient,
    next_step,
)
from atlas_migration.errors import MigrationError

TRIGGER_CLASSPATH = "atlas_migration.triggers.live_migration.LiveMigrationTrigger"
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
    return (f"could not read live migration {migration_id}: {error or 'unknown error'}. {resume_hint(migration_id)}")


def resume_hint(migration_id: str) -> str:
    """What an operator reads when watching stopped because of the API (not because of the migration)."""
    return (f"The live migration {migration_id} is still running in Atlas: this run did not stop it and keeps the "
            "organization link. Once the API answers again (or the error above is fixed), clear this task (with its "
            "downstream tasks) to resume watching; the cleared tasks reconnect to the same migration")


class LiveMigrationTrigger(BaseTrigger):
    """Polls one live migration until ``watch_outcome`` has an answer or ``deadline`` (epoch seconds) passes."""

    def __init__(self, *, atlas_conn_id: str, group_id: str, migration_id: str, wait_for: str = "ready",
                 max_lag_seconds: float | None = None, poll_interval: float = 60.0, deadline: float | None = None,
                 ready_since: float | None = None, outage_tolerance: float = DEFAULT_TOLERANCE_SECONDS) -> None:
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
        self.outage_tolerance = max(0.0, float(outage_tolerance))

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return TRIGGER_CLASSPATH, {
            "atlas_conn_id": self.atlas_conn_id, "group_id": self.group_id, "migration_id": self.migration_id,
            "wait_for": self.wait_for, "max_lag_seconds": self.max_lag_seconds, "poll_interval": self.poll_interval,
            "deadline": self.deadline, "ready_since": self.ready_since, "outage_tolerance": self.outage_tolerance,
        }

    def _hook(self):
        from atlas_migration.hooks.atlas import AtlasAdminHook, RetryPolicy

        # One quick retry in the hook (a blip); the outage layer in ``run`` does the long waiting and logs it.
        return AtlasAdminHook(self.atlas_conn_id, retry=RetryPolicy(max_retries=1))

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
        from atlas_migration.hooks.atlas import AtlasApiError

        hook = await asyncio.to_thread(self._hook)
        last_log = 0.0
        policy = OutagePolicy(tolerance_seconds=self.outage_tolerance)
        # Counted from this trigger's first failure: its kwargs are fixed at deferral, so an outage start kept
        # there would be stale after a triggerer restart days later.
        outage: Outage | None = None
        last_seen: dict[str, Any] | None = None
        what = "the Atlas API"
        try:
            while True:
                call_started = time.time()
                try:
                    # The hook reads its connection on first use and retries 429/5xx itself: in a thread.
                    migration = await asyncio.to_thread(hook.get_live_migration, self.migration_id,
                                                        group_id=self.group_id)
                except (AtlasApiError, MigrationError) as exc:  # messages are redacted by the hook
                    now = time.time()
                    step = next_step(outage, error=str(exc), transient=is_transient(exc), call_started=call_started,
                                     now=now, policy=policy, what=what, retry_after=getattr(exc, "retry_after", None))
                    if not step.retry:
                        yield self._event("error", None, step.message)
                        return
                    if self.deadline is not None and now >= self.deadline:
                        yield self._event("timeout", last_seen)
                        return
                    self.log.warning("%s", step.message)
                    outage = step.outage
                    await asyncio.sleep(step.delay)
                    continue
                now = time.time()
                if outage is not None:
                    self.log.info("%s answers again after %s (%d failed attempts)", what,
                                  format_seconds(now - outage.since), outage.failures)
                    outage = None
                last_seen = migration
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
    outage_tolerance: float = DEFAULT_TOLERANCE_SECONDS

    @classmethod
    def parse(cls, max_lag_seconds: Any, poll_interval: Any, timeout_seconds: Any,
              outage_tolerance: Any = DEFAULT_TOLERANCE_SECONDS) -> WatchSettings:
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
                   number("poll_interval", poll_interval) or 1.0, number("timeout_seconds", timeout_seconds) or 0.0,
                   number("outage_tolerance_seconds", outage_tolerance) or 0.0)


class WaitForLiveMigrationOperator(BaseOperator):
    """Wait, deferred, until a live migration is ready for cutover (``wait_for="ready"``) or COMPLETE.

    Returns a small summary (``outcome``, ``migration`` status fields, ``ready_since``, ``observed_at``);
    FAILED, EXPIRED, a timeout or an API error (after riding out transient failures for
    ``outage_tolerance_seconds``) fail the task with the reason (no retries: clearing it re-checks the
    migration, which is safe).
    """

    template_fields = ("atlas_conn_id", "group_id", "migration_id", "max_lag_seconds", "poll_interval",
                       "timeout_seconds", "outage_tolerance_seconds")
    ui_color = "#d6eaf8"

    def __init__(self, *, atlas_conn_id: str, group_id: Any, migration_id: Any, wait_for: str = "ready",
                 max_lag_seconds: Any = None, poll_interval: Any = 60, timeout_seconds: Any = 7 * 24 * 3600,
                 outage_tolerance_seconds: Any = DEFAULT_TOLERANCE_SECONDS, **kwargs: Any) -> None:
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
        self.outage_tolerance_seconds = outage_tolerance_seconds

    def _settings(self) -> WatchSettings:
        lag = self.max_lag_seconds if self.wait_for == "ready" else None
        return WatchSettings.parse(lag, self.poll_interval, self.timeout_seconds, self.outage_tolerance_seconds)

    def execute(self, context: Any) -> dict[str, Any]:
        from atlas_migration.hooks.atlas import AtlasAdminHook, RetryPolicy

        settings = self._settings()
        hook = AtlasAdminHook(self.atlas_conn_id, retry=RetryPolicy(max_retries=1))  # the trigger waits longer
        try:
            migration = hook.get_live_migration(str(self.migration_id), group_id=str(self.group_id))
        except MigrationError as exc:
            if not is_transient(exc):
                raise LiveMigrationFailed(outcome_message("error", None, wait_for=self.wait_for,
                                                          migration_id=str(self.migration_id),
                                                          error=str(exc))) from None
            # The API is down: the trigger waits the outage out (and logs it).
            self.log.warning("reading live migration %s failed (%s); deferring to the trigger, which retries for "
                             "up to %.0f s", self.migration_id, exc, settings.outage_tolerance)
            migration = {}
        finally:
            hook.close()
        now = time.time()
        ready_since = now if migration.get("readyForCutover") else None
        outcome = watch_outcome(migration, self.wait_for, settings.max_lag_seconds) if migration else None
        if outcome:
            return self._finish({"outcome": outcome, "migration": summarise(migration), "observed_at": now,
                                 "ready_since": ready_since,
                                 "message": outcome_message(outcome, migration, wait_for=self.wait_for,
                                                            migration_id=str(self.migration_id))})
        self.log.info("live migration %s: %s; deferring to LiveMigrationTrigger until it is %s (poll every %.0f s, "
                      "give up after %.0f s, ride out API outages of up to %.0f s)", self.migration_id,
                      describe(migration) if migration else "status not read",
                      "ready for cutover" if self.wait_for == "ready" else "COMPLETE", settings.poll_interval,
                      settings.timeout_seconds, settings.outage_tolerance)
        trigger = LiveMigrationTrigger(
            atlas_conn_id=self.atlas_conn_id, group_id=str(self.group_id), migration_id=str(self.migration_id),
            wait_for=self.wait_for, max_lag_seconds=settings.max_lag_seconds, poll_interval=settings.poll_interval,
            deadline=now + settings.timeout_seconds, ready_since=ready_since,
            outage_tolerance=settings.outage_tolerance)
        # Airflow's own deferral timeout is a backstop a little after the trigger's deadline, which reports
        # the last status it saw (an outage near the deadline may hold the last read up to the tolerance).
        backstop = settings.timeout_seconds + max(60.0, 3 * settings.poll_interval) + settings.outage_tolerance
        self.defer(trigger=trigger, method_name="execute_complete", timeout=timedelta(seconds=backstop))

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        return self._finish(event)

    def _finish(self, event: dict[str, Any]) -> dict[str, Any]:
        outcome = event.get("outcome")
        wanted = ("ready", "complete") if self.wait_for == "ready" else ("complete",)
        if outcome not in wanted:
            raise LiveMigrationFailed(event.get("message") or f"live migration {self.migration_id}: {outcome}")
        self.log.info("%s", event.get("message"))
        return {k: event.get(k) for k in ("outcome", "migration", "observed_at", "ready_since")}
