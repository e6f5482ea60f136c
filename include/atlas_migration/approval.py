"""Operator approvals of a run's irreversible step (a live migration's cutover), through Airflow's
human-in-the-loop ``ApprovalOperator`` (apache-airflow-providers-standard 1.21, Airflow 3.3).

How it runs: a small upstream task reads the state of what is to be approved and returns an approval
*request* (``ApprovalRequest.to_dict()``: whether an approval is needed at all, the subject, a Markdown body
with the evidence as it stood when the question was asked, and the response timeout). ``RunApprovalOperator``
takes that request, writes it as the task's HITL detail and parks the task in the ``awaiting_input`` state:
no worker slot, no poking. An operator answers in the UI (the run's Required Actions) or through
``PATCH /api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/hitlDetails``; Airflow
records who answered and when, and the task resumes:

- ``Approve``: the task succeeds; its XCom holds the approver (``approved_by``, from ``responded_by``) and the
  time, which the migration report shows and the task log states.
- ``Reject``: the task fails (``ApprovalRejected``, no retries), naming who rejected; the run stops there.
- No answer within the response timeout: the scheduler's ``awaiting_input`` sweep resumes the task with a
  timeout event and it fails (``ApprovalTimedOut``) saying which bound ran out. ``airflow dags test`` has no
  scheduler and so no sweep: there an unanswered approval waits until the command is stopped.

Why not the Airflow Variable this module used before: anyone who could set Variables (or an environment
variable, or a secrets backend) could pre-approve a run, nothing recorded who approved, and a re-run with the
same run id was approved in advance. A HITL answer can only be given to the waiting task instance, by an
authenticated user, and is recorded with the user.

The response timeout is the smallest of the approval timeout param and every deadline the caller names (the
cutover window left, the oplog headroom), each minus its safety margin (``bounded_response_timeout``), so an
unanswered approval fails clearly while there is still time to act. Whatever the approval said, the step it
approves re-checks the state before acting: the evidence in the body is what was true when it was asked.

Every cutover approval uses it: the live push's ``approve_cutover`` and the live pull's
``await_cutover_approval`` (native engine) and ``await_mongosync_approval`` (mongosync), each fed by an evidence
task before it.

Also here: ``run_variable_key`` (the per-run Variable layout other modules keep their run records under) and
``waited_seconds`` (how long a reschedule-mode sensor has been waiting).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator
from airflow.sdk.exceptions import AirflowFailException

log = logging.getLogger("atlas_migration")

# Airflow stores Variable keys in a 250-character column.
MAX_KEY_LENGTH = 250
# Below this, asking a human is pointless: nobody reads, decides and answers in less.
MIN_RESPONSE_SECONDS = 60.0


class ApprovalRejected(AirflowFailException):
    """An operator answered ``Reject`` (fails the task without retries)."""


class ApprovalTimedOut(AirflowFailException):
    """Nobody answered within the response timeout (fails the task without retries)."""


class TooLateToAsk(AirflowFailException):
    """A deadline is too close to give a human time to answer (fails the task without retries)."""


def run_variable_key(dag_id: str, run_id: str, *, prefix: str) -> str:
    """``<prefix>__<dag_id>__<run_id>``: one Variable per run (the live push's migration record and abandon
    decision), so one run's record never serves another."""
    if not prefix or not dag_id or not run_id:
        raise ValueError("a per-run Variable key needs a prefix, the DAG id and the run id")
    key = f"{prefix}__{dag_id}__{run_id}"
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"Variable key for run {run_id!r} is {len(key)} characters; Airflow keeps at most "
                         f"{MAX_KEY_LENGTH}")
    return key


def waited_seconds(context: Mapping[str, Any], now: float | None = None) -> float:
    """Seconds since a reschedule-mode sensor's first poke, across reschedules (the start its timeout uses)."""
    ti = context["ti"]
    first = ti.get_first_reschedule_date(context)
    if first is None:
        return 0.0
    return max(0.0, (time.time() if now is None else now) - first.timestamp())


# ---------------------------------------------------------------- pure: the response timeout


def format_duration(seconds: float) -> str:
    """``2 h 05 min``, ``4 min 10 s``, ``42 s`` (negative values read as 0)."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes = rest // 60
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {seconds % 60:02d} s" if minutes else f"{seconds} s"


@dataclass(frozen=True)
class Deadline:
    """Something that runs out while the approval waits: ``remaining_seconds`` until it does, and the
    ``margin_seconds`` the approved step needs before it (an approval later than that is too late)."""

    what: str
    remaining_seconds: float
    margin_seconds: float

    @property
    def usable_seconds(self) -> float:
        return self.remaining_seconds - self.margin_seconds


@dataclass(frozen=True)
class ResponseTimeout:
    """How long the approval may wait, and which bound decided it."""

    seconds: float
    bound_by: str
    explanation: str

    @property
    def too_late(self) -> bool:
        return self.seconds < MIN_RESPONSE_SECONDS


def bounded_response_timeout(approval_timeout_seconds: float, deadlines: Sequence[Deadline] = ()
                             ) -> ResponseTimeout:
    """The approval's response timeout (pure): the ``approval_timeout_seconds`` param, shortened by every
    deadline to its ``remaining_seconds - margin_seconds``. ``too_late`` when less than
    ``MIN_RESPONSE_SECONDS`` is left (the caller fails instead of asking)."""
    best = ResponseTimeout(float(approval_timeout_seconds), "approval_timeout_seconds",
                           f"the approval timeout (approval_timeout_seconds = {approval_timeout_seconds:,.0f} s)")
    for deadline in deadlines:
        usable = deadline.usable_seconds
        if usable < best.seconds:
            best = ResponseTimeout(max(0.0, usable), deadline.what,
                                   f"{deadline.what}: {format_duration(deadline.remaining_seconds)} left, minus a "
                                   f"safety margin of {format_duration(deadline.margin_seconds)}")
    return best


# ---------------------------------------------------------------- the request and the answer


@dataclass(frozen=True)
class ApprovalRequest:
    """What the upstream task hands to ``RunApprovalOperator`` (JSON-safe through XCom; never a secret).

    ``required`` False: no approval is needed in this run (``cutover=auto``), the operator succeeds at once and
    says ``reason``. ``evidence`` is the facts behind ``body`` as plain data, kept for the report."""

    required: bool
    what: str
    subject: str = ""
    body: str = ""
    timeout_seconds: float | None = None
    timeout_explanation: str = ""
    asked_at: float = 0.0
    reason: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ApprovalRequest:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def timeout_line(request: ApprovalRequest) -> str:
    """The Markdown line of the body that says when the approval times out and why (pure)."""
    if request.timeout_seconds is None:
        return "**Times out:** never (no response timeout)"
    return (f"**Times out:** after {format_duration(request.timeout_seconds)} (at about "
            f"{_utc(request.asked_at + request.timeout_seconds)}), bounded by {request.timeout_explanation}. "
            "Unanswered, the task fails.")


def approval_record(request: ApprovalRequest, event: Mapping[str, Any]) -> dict[str, Any]:
    """The task's XCom after an answer (pure): who answered, when, and what they were shown."""
    user = event.get("responded_by_user") or {}
    responded_at = event.get("responded_at")
    return {
        "required": True,
        "approved": list(event.get("chosen_options") or []) == [ApprovalOperator.APPROVE],
        "what": request.what,
        "approved_by": user.get("name"),
        "approved_by_id": user.get("id"),
        "responded_at": responded_at.isoformat() if hasattr(responded_at, "isoformat") else responded_at,
        "asked_at": _utc(request.asked_at) if request.asked_at else None,
        "timeout_seconds": request.timeout_seconds,
        "evidence": dict(request.evidence),
    }


def approval_notes(record: Mapping[str, Any] | None) -> list[str]:
    """Report lines about an approval task's XCom (pure): who approved and when, or that none was needed."""
    if not record:
        return []
    what = record.get("what") or "cutover"
    if not record.get("required"):
        return [f"The {what} needed no approval ({record.get('reason') or 'cutover=auto'})"]
    who = record.get("approved_by") or "an unknown user"
    ident = record.get("approved_by_id")
    return [f"The {what} was approved by {who}{f' (user id {ident})' if ident and ident != who else ''} at "
            f"{record.get('responded_at')} (asked at {record.get('asked_at')}) in Airflow's Required Actions"]


class RunApprovalOperator(ApprovalOperator):
    """An ``ApprovalOperator`` whose subject, body and response timeout come from an ``ApprovalRequest`` built
    at run time by an upstream task (pass its output as ``request``): a static body could not show the evidence
    as it stands when the question is asked, and the timeout depends on the run's deadlines.

    Rejecting fails the task (``ApprovalRejected``), a timeout fails it (``ApprovalTimedOut``); both name who or
    what. Approving returns ``approval_record``. A request with ``required`` False succeeds without parking.
    """

    template_fields = (*ApprovalOperator.template_fields, "request")

    def __init__(self, *, request: Any, what: str = "cutover", **kwargs: Any) -> None:
        # The subject is replaced by the request's at run time; this one names the task in the UI until then.
        kwargs.setdefault("subject", f"Approve the {what}")
        # fail_on_reject: a rejected cutover must stop the run, not only skip the next task (the teardown that
        # follows would otherwise see an "upstream skipped" run that looks finished).
        super().__init__(fail_on_reject=True, **kwargs)
        self.request = request
        self.what = what

    def _request(self) -> ApprovalRequest:
        if not isinstance(self.request, Mapping):
            raise AirflowFailException(f"{self.task_id}: expected an approval request from the upstream task, got "
                                       f"{type(self.request).__name__}")
        return ApprovalRequest.from_dict(self.request)

    def execute(self, context: Any) -> Any:
        request = self._request()
        if not request.required:
            log.info("no approval needed for the %s in this run: %s", request.what, request.reason)
            return {"required": False, "approved": True, "what": request.what, "reason": request.reason}
        self.subject = request.subject or self.subject
        self.body = request.body
        self.response_timeout = (timedelta(seconds=request.timeout_seconds) if request.timeout_seconds is not None
                                 else None)
        # The timeout is enforced by the scheduler's awaiting_input sweep; ``airflow dags test`` runs no
        # scheduler, so there an unanswered request waits until the command is stopped.
        log.info("asking for approval of the %s (answer in the run's Required Actions, or PATCH .../taskInstances/"
                 "%s/%s/hitlDetails with {\"chosen_options\": [\"Approve\"]} or [\"Reject\"]); %s\n%s",
                 request.what, self.task_id, context["ti"].map_index,
                 timeout_line(request).replace("**", ""), request.body)
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        request = self._request()
        if "error" in event:
            if event.get("error_type") == "timeout":
                raise ApprovalTimedOut(
                    f"nobody approved the {request.what} within {format_duration(request.timeout_seconds or 0)} "
                    f"(bounded by {request.timeout_explanation}); the run stops here. Start a new approval by "
                    f"clearing task {self.task_id} while there is time left")
            raise AirflowFailException(f"the approval of the {request.what} failed: {event.get('error')}")
        # Validates the answer against the options and records it in the HITL summary.
        HITLOperator.execute_complete(self, context=context, event=event)
        record = approval_record(request, event)
        if not record["approved"]:
            raise ApprovalRejected(f"the {request.what} was REJECTED by {record['approved_by'] or 'an unknown user'} "
                                   f"at {record['responded_at']}; the run stops here")
        log.info("the %s was approved by %s (user id %s) at %s", request.what, record["approved_by"],
                 record["approved_by_id"], record["responded_at"])
        return record
