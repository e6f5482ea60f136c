"""Deadline alerts: Airflow warns while a migration still has time, not after it ran out.

Two alerts are attached to both DAGs (``migration_deadlines``):

- ``max_run_hours`` (a run param; 0, the default, sets none): the run is still going that many hours after it
  was queued. The hours are read from the run's own conf when Airflow creates the run, through the custom
  reference ``RunParamHours`` (Airflow's own references take a fixed interval written in the DAG file, and
  the whole point of the param is that each run chooses it).
- The live push's cutover window: Atlas keeps a live migration ready for cutover for 120 hours, and the run
  is warned ``PUSH_WINDOW_WARNING_HOURS`` before it can run out. The window opens when the push starts,
  which is after the run was queued, so "queued + (120 h - warning)" is never later than the real warning
  time: the alert can come early, never late. It fires only for runs routed to the live push (the reference
  reads the run's ``strategy`` param and the routing decision is not known yet, so it fires for ``auto`` too,
  and the message says which case it is).

Airflow's scheduler records each deadline when it creates the run and, when one passes while the run is
still going, hands ``alert_deadline_missed`` to the triggerer, which logs a warning naming the run, the limit
and what to do. To be paged instead, swap the callback for a notifier (``AsyncCallback(SlackNotifier, ...)``)
in ``migration_deadlines``. The custom reference is registered by ``plugins/migration_deadlines.py``:
Airflow refuses to load a DAG whose reference no plugin declares.

Under ``airflow dags test`` the DAGs carry no deadline alerts: Airflow 3.3's ``dag.test()`` runs the loop on a
DAG serialized in memory, whose alerts are not the database ids ``DagRun.update_state`` looks them up by,
so a successful test run of a DAG with alerts crashes at its end. Nothing is lost there: ``dags test`` has no
scheduler loop to notice a missed deadline anyway. ``tests/api/test_deadline_alerts.py`` runs the real path.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import AsyncCallback, DeadlineAlert
from airflow.sdk.definitions.deadline import BaseDeadlineReference

log = logging.getLogger("atlas_migration.deadlines")

MAX_RUN_HOURS_PARAM = "max_run_hours"
MAX_RUN_HOURS_LIMIT = 24 * 365
PUSH_WINDOW_HOURS = 120  # Atlas live migration: the cutover must happen within 120 hours (strategies.live_push)
PUSH_WINDOW_WARNING_HOURS = 24
PUSH_STRATEGIES = ("live_push", "auto")
CALLBACK = "atlas_migration.deadlines.alert_deadline_missed"


def hours_from_conf(conf: Any, param: str) -> float | None:
    """The positive number of hours ``conf[param]`` holds, or None (absent, 0, or not a number)."""
    if not isinstance(conf, dict):
        return None
    value = conf.get(param)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return None
    return float(min(value, MAX_RUN_HOURS_LIMIT))


def deadline_after(start: datetime | None, conf: Any, *, param: str = "", hours: float = 0.0,
                   strategies: tuple[str, ...] = ()) -> datetime | None:
    """When an alert is due: ``start`` plus the hours of ``conf[param]`` (or the fixed ``hours``), or None.

    ``strategies``: the alert applies only to runs whose ``strategy`` param is one of them (a missing
    strategy is ``auto``, the param's default).
    """
    if start is None:
        return None
    if strategies:
        strategy = conf.get("strategy", "auto") if isinstance(conf, dict) else "auto"
        if strategy not in strategies:
            return None
    span = hours_from_conf(conf, param) if param else (hours if hours > 0 else None)
    return start + timedelta(hours=span) if span else None


@dataclass
class RunParamHours(BaseDeadlineReference):
    """The time the run was queued (or created) plus the hours its conf's ``param`` holds; no deadline when
    the param is absent or 0. With ``hours`` instead, a fixed span, for runs whose ``strategy`` is one of
    ``strategies`` (comma-separated; empty: every run)."""

    param: str = ""
    hours: float = 0.0
    strategies: str = ""

    required_kwargs = {"dag_id", "run_id"}

    def serialize_reference(self) -> dict[str, Any]:
        return {**super().serialize_reference(), "param": self.param, "hours": self.hours,
                "strategies": self.strategies}

    @classmethod
    def deserialize_reference(cls, reference_data: dict[str, Any]) -> RunParamHours:
        return cls(param=reference_data.get("param", ""), hours=float(reference_data.get("hours", 0.0)),
                   strategies=reference_data.get("strategies", ""))

    def _evaluate_with(self, *, session: Any, dag_id: str, run_id: str, **kwargs: Any) -> datetime | None:
        from airflow.models import DagRun
        from sqlalchemy import select

        run = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
        if run is None:
            return None
        start = run.queued_at or run.run_after or run.start_date
        strategies = tuple(s for s in self.strategies.split(",") if s)
        return deadline_after(start, run.conf, param=self.param, hours=self.hours, strategies=strategies)


def alert_line(message: str, context: dict[str, Any] | None) -> str:
    """The warning a missed deadline produces, naming the run (``context`` is what Airflow passes along)."""
    run = (context or {}).get("dag_run") or {}
    deadline = (context or {}).get("deadline") or {}
    return (f"Deadline alert for {run.get('dag_id', '?')} run {run.get('dag_run_id') or run.get('run_id', '?')} "
            f"(deadline {deadline.get('deadline_time', '?')}, state {run.get('state', '?')}): {message}")


async def alert_deadline_missed(*, message: str, context: dict[str, Any] | None = None, **_: Any) -> str:
    """Runs in the triggerer when a deadline passed with the run still going: a warning in the triggerer's
    log, and the same line as the callback's output (Airflow keeps it with the deadline's callback)."""
    line = alert_line(message, context)
    log.warning("%s", line)
    return line


def running_under_dags_test(argv: list[str] | None = None) -> bool:
    """Whether this process is ``airflow dags test`` (``airflow`` or ``python -m airflow``)."""
    argv = sys.argv if argv is None else argv
    return len(argv) >= 3 and "airflow" in argv[0] and argv[1:3] == ["dags", "test"]


def migration_deadlines(argv: list[str] | None = None) -> list[DeadlineAlert]:
    """The alerts both DAGs carry (see the module docstring); none under ``airflow dags test``."""
    if running_under_dags_test(argv):
        return []
    window_warning = PUSH_WINDOW_HOURS - PUSH_WINDOW_WARNING_HOURS
    return [
        DeadlineAlert(
            reference=RunParamHours(param=MAX_RUN_HOURS_PARAM),
            interval=timedelta(0),
            callback=AsyncCallback(CALLBACK, kwargs={"message": (
                "the run has reached its max_run_hours and is still going: look at the running task (a copy, a "
                "wait for lag or an approval) and decide whether to let it go on or to stop it")}),
            name="max_run_hours",
        ),
        DeadlineAlert(
            reference=RunParamHours(hours=window_warning, strategies=",".join(PUSH_STRATEGIES)),
            interval=timedelta(0),
            callback=AsyncCallback(CALLBACK, kwargs={"message": (
                f"the run has been going {window_warning} hours: if it runs a live migration (push), Atlas's "
                f"{PUSH_WINDOW_HOURS}-hour cutover window ends within {PUSH_WINDOW_WARNING_HOURS} hours; approve "
                "or run the cutover now, or the migration must start over")}),
            name="live_push_cutover_window",
        ),
    ]
