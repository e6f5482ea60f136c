"""Operator approvals keyed by DAG run, for the steps a human must allow (a live migration's cutover).

An approval is an Airflow Variable named ``<prefix>__<dag_id>__<run_id>`` (by default
``atlas_migration_cutover__<dag_id>__<run_id>``) whose value is ``approved``; ``rejected`` stops the run.
Operators set it from the UI (Admin > Variables), the CLI or the REST API::

    airflow variables set 'atlas_migration_cutover__mongo_to_atlas__manual__2026-01-05T10:00:00+00:00' approved
    curl -X POST "$AIRFLOW/api/v2/variables" -H "Authorization: Bearer $TOKEN" \\
         -H 'Content-Type: application/json' -d '{"key": "<the key>", "value": "approved"}'

The key holds the run id as it is, so it can be typed from what the UI shows; the waiting sensor logs the exact
key and commands on every poke. A Variable (not XCom, not a param) because it can be written from outside the
run while the run waits, by anyone allowed to edit Variables, and it leaves a trace in the audit log.

``approval_sensor`` builds the waiting task: a reschedule-mode sensor, so a run that waits for hours or days
holds no worker slot between pokes. It is generic (the live-push and live-pull paths share it): what is being
approved, when no approval is needed, and what to check while waiting are the caller's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from airflow.sdk.exceptions import AirflowFailException, AirflowSensorTimeout

log = logging.getLogger("atlas_migration")

VARIABLE_PREFIX = "atlas_migration_cutover"
APPROVED = "approved"
REJECTED = "rejected"
# Airflow stores Variable keys in a 250-character column.
MAX_KEY_LENGTH = 250

Getter = Callable[[str], Any]


class ApprovalRejected(AirflowFailException):
    """An operator set the approval Variable to ``rejected`` (fails the task without retries)."""


def approval_key(dag_id: str, run_id: str, *, prefix: str = VARIABLE_PREFIX) -> str:
    """``<prefix>__<dag_id>__<run_id>``: one key per run, so approving one run never approves another."""
    if not dag_id or not run_id:
        raise ValueError("an approval key needs both the DAG id and the run id")
    key = f"{prefix}__{dag_id}__{run_id}"
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"approval key for run {run_id!r} is {len(key)} characters; Airflow keeps at most "
                         f"{MAX_KEY_LENGTH}")
    return key


@dataclass(frozen=True)
class ApprovalState:
    """What the Variable says: ``approved``, ``rejected`` or ``pending`` (absent or any other value)."""

    key: str
    status: str
    value: str | None

    @property
    def approved(self) -> bool:
        return self.status == APPROVED


def _variable_getter() -> Getter:
    from airflow.sdk import Variable

    return lambda key: Variable.get(key, default=None)


def read_approval(dag_id: str, run_id: str, *, prefix: str = VARIABLE_PREFIX, get: Getter | None = None) -> ApprovalState:
    """Read the run's approval. ``get`` replaces the Variable lookup (tests, other stores)."""
    key = approval_key(dag_id, run_id, prefix=prefix)
    raw = (get or _variable_getter())(key)
    value = None if raw is None else str(raw).strip()
    normalised = (value or "").lower()
    if normalised == APPROVED:
        return ApprovalState(key, APPROVED, value)
    if normalised == REJECTED:
        return ApprovalState(key, REJECTED, value)
    return ApprovalState(key, "pending", value)


def is_approved(dag_id: str, run_id: str, *, prefix: str = VARIABLE_PREFIX, get: Getter | None = None) -> bool:
    """True once the run's Variable holds ``approved`` (case and surrounding spaces ignored)."""
    return read_approval(dag_id, run_id, prefix=prefix, get=get).approved


def approval_instructions(key: str, what: str) -> list[str]:
    """How to approve or reject, with the exact key (logged on every poke)."""
    return [
        f"to approve the {what}: airflow variables set '{key}' {APPROVED}",
        f"  or REST: POST /api/v2/variables {{\"key\": \"{key}\", \"value\": \"{APPROVED}\"}}"
        f" (update: PATCH /api/v2/variables/{quote(key, safe='')})",
        f"  or UI: Admin > Variables > add '{key}' = {APPROVED}",
        f"to stop the run instead, set it to '{REJECTED}'",
    ]


def waited_seconds(context: Mapping[str, Any], now: float | None = None) -> float:
    """Seconds since the sensor's first poke, across reschedules (the start the sensor's own timeout uses)."""
    ti = context["ti"]
    first = ti.get_first_reschedule_date(context)
    if first is None:
        return 0.0
    return max(0.0, (time.time() if now is None else now) - first.timestamp())


def approval_sensor(
    *,
    task_id: str,
    what: str = "cutover",
    prefix: str = VARIABLE_PREFIX,
    poke_interval: float = 60.0,
    timeout: float = 7 * 24 * 3600.0,
    required_if: Callable[[Mapping[str, Any]], bool] | None = None,
    timeout_from_params: Callable[[Mapping[str, Any]], float | None] | None = None,
    while_waiting: Callable[[Mapping[str, Any]], None] | None = None,
):
    """A reschedule-mode sensor task that succeeds once the run's approval Variable says ``approved``.

    - ``required_if(params)``: False means no approval is needed for this run (the sensor succeeds at once
      and says so); default: always required.
    - ``timeout_from_params(params)``: a run-time limit in seconds (a DAG param), checked on every poke;
      ``timeout`` is the static backstop Airflow enforces.
    - ``while_waiting(context)``: called on every poke before the Variable is read; raise to end the wait
      (e.g. the thing to approve has failed meanwhile) and log what the operator should know.

    Returns the decorated task: call it inside a DAG or task group and order it with ``>>``. Its XCom is
    ``{"required", "approved", "key"}``.
    """
    from airflow.sdk import PokeReturnValue, get_current_context, task

    @task.sensor(task_id=task_id, mode="reschedule", poke_interval=poke_interval, timeout=timeout)
    def await_approval() -> PokeReturnValue:
        context = get_current_context()
        params = context["params"]
        key = approval_key(context["dag"].dag_id, context["run_id"], prefix=prefix)
        if required_if is not None and not required_if(params):
            log.info("no approval needed for the %s in this run", what)
            return PokeReturnValue(is_done=True, xcom_value={"required": False, "approved": True, "key": key})
        if while_waiting is not None:
            while_waiting(context)
        state = read_approval(context["dag"].dag_id, context["run_id"], prefix=prefix)
        if state.status == REJECTED:
            raise ApprovalRejected(f"the {what} was rejected by an operator (Variable '{key}' = '{state.value}'); "
                                   "the run stops here")
        if state.approved:
            log.info("the %s was approved (Variable '%s')", what, key)
            return PokeReturnValue(is_done=True, xcom_value={"required": True, "approved": True, "key": key})
        waited = waited_seconds(context)
        limit = timeout_from_params(params) if timeout_from_params else None
        if limit is not None and waited > limit:
            raise AirflowSensorTimeout(f"no approval of the {what} within {limit:,.0f} s (Variable '{key}' "
                               f"{'is ' + repr(state.value) if state.value else 'was never set'})")
        if state.value:
            log.warning("Variable '%s' holds %r, which is neither '%s' nor '%s': still waiting", key, state.value,
                        APPROVED, REJECTED)
        log.info("waiting for an operator to approve the %s (%.0f s so far)\n%s", what, waited,
                 "\n".join(f"    {line}" for line in approval_instructions(key, what)))
        return PokeReturnValue(is_done=False)

    return await_approval
