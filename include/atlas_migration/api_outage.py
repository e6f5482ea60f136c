"""Riding out an Atlas / Cloud Manager API outage while a live migration is being watched.

A live migration runs in Atlas (on the migration host), not in Airflow: the API being unreachable for a while
says nothing about the migration. The tasks that only *watch* it (``wait_for_sync``, ``wait_for_completion``,
``cutover_evidence``, the ``cutover`` sensor's reads) therefore retry transient
failures with a growing delay for up to ``api_outage_tolerance_seconds``, logging on every retry what failed
and for how long the API has been failing. Past the bound the task fails with a message that says the
migration is still running and how to resume watching it.

Transient: the service could not be reached (connection refused or reset, timeouts: ``status`` None), 5xx and
429 (the hook has already retried these a few times; this is the longer, outer layer). Not transient: 401,
403, 404 and other 4xx, a reply that breaks the contract (e.g. a 2xx that is not JSON), configuration
errors: retrying cannot mend them.

``next_step`` is the pure decision (plain data in, plain data out, no clock, no sleep); ``call_through_outage``
applies it to a blocking call, and ``LiveMigrationTrigger`` applies it in its event loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from airflow.sdk.exceptions import AirflowFailException

from atlas_migration.errors import MigrationError

DEFAULT_TOLERANCE_SECONDS = 15 * 60.0
FIRST_DELAY_SECONDS = 2.0
MAX_DELAY_SECONDS = 60.0

T = TypeVar("T")


class WatchInterrupted(MigrationError, AirflowFailException):
    """Watching stopped: the API failed for longer than the tolerance, or in a way retrying cannot mend. The
    task fails without Airflow retries (it has retried already); the live migration in Atlas is not touched."""


def is_transient(exc: BaseException) -> bool:
    """True for failures worth waiting out: unreachable service (``status`` None), 5xx, 429."""
    from atlas_migration.hooks.atlas import AtlasApiError

    if not isinstance(exc, AtlasApiError):
        return False  # a ConfigurationError, a bug: retrying changes nothing
    status = exc.status
    return status is None or status == 429 or status >= 500


@dataclass(frozen=True)
class OutagePolicy:
    """How long to wait out an outage, and how often to try meanwhile (delays double up to ``max_delay``)."""

    tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS
    first_delay: float = FIRST_DELAY_SECONDS
    max_delay: float = MAX_DELAY_SECONDS


@dataclass(frozen=True)
class Outage:
    """An outage in progress: ``since`` is when the first failing call started (epoch seconds)."""

    since: float
    failures: int = 0


@dataclass(frozen=True)
class OutageStep:
    """What to do after a failed call: retry after ``delay`` seconds, or give up with ``message``."""

    retry: bool
    delay: float
    outage: Outage
    message: str


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    minutes, rest = divmod(seconds, 60)
    if minutes >= 60:
        return f"{minutes // 60} h {minutes % 60:02d} min"
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def next_step(outage: Outage | None, *, error: str, transient: bool, call_started: float, now: float,
              policy: OutagePolicy, what: str, retry_after: float | None = None) -> OutageStep:
    """After a failed call: retry (with the delay) or give up (pure).

    ``outage`` is the outage in progress (None: the call before this one succeeded); ``call_started`` is
    when the failed call began, the outage's start if it is the first failure. ``error`` is the (redacted)
    failure text; ``retry_after`` what a 429/503 asked for. The delay doubles from ``first_delay`` to
    ``max_delay``, honours ``retry_after``, and never reaches past the tolerance: the last try is at the bound.
    """
    current = replace(outage or Outage(since=call_started), failures=(outage.failures if outage else 0) + 1)
    lasted = max(0.0, now - current.since)
    if not transient:
        return OutageStep(False, 0.0, current, f"{what} failed: {error} (not a transient failure: retrying "
                                                "cannot help)")
    remaining = policy.tolerance_seconds - lasted
    if remaining <= 0:
        return OutageStep(False, 0.0, current,
                          f"{what} has failed for {format_seconds(lasted)} ({current.failures} attempts), longer "
                          f"than api_outage_tolerance_seconds ({format_seconds(policy.tolerance_seconds)}); last "
                          f"error: {error}")
    delay = min(policy.max_delay, policy.first_delay * 2 ** (current.failures - 1))
    if retry_after is not None:
        delay = max(delay, retry_after)
    delay = max(0.0, min(delay, remaining))
    return OutageStep(True, delay, current,
                      f"{what} failed: {error}; the API has been failing for {format_seconds(lasted)} "
                      f"({current.failures} attempt{'s' if current.failures > 1 else ''}); retrying in "
                      f"{delay:.0f} s (giving up after {format_seconds(policy.tolerance_seconds)})")


def call_through_outage(call: Callable[[], T], *, policy: OutagePolicy, what: str, still_running: str,
                        log: logging.Logger, clock: Callable[[], float] = time.time,
                        sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()``, retried through a transient outage for up to ``policy.tolerance_seconds``.

    Gives up with ``WatchInterrupted`` (message: what failed, for how long, then ``still_running``: what
    the operator should know and do) past the bound or on a failure that is not transient.
    """
    outage: Outage | None = None
    while True:
        started = clock()
        try:
            result = call()
        except MigrationError as exc:  # AtlasApiError (redacted by the hook) or ConfigurationError
            step = next_step(outage, error=str(exc), transient=is_transient(exc), call_started=started,
                             now=clock(), policy=policy, what=what, retry_after=getattr(exc, "retry_after", None))
            if not step.retry:
                raise WatchInterrupted(f"{step.message}. {still_running}") from None
            log.warning("%s", step.message)
            outage = step.outage
            sleep(step.delay)
            continue
        if outage is not None:
            log.info("%s answers again after %s (%d failed attempts)", what,
                     format_seconds(clock() - outage.since), outage.failures)
        return result
