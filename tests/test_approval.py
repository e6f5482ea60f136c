"""Approvals through Airflow's human-in-the-loop operator, without servers: the response-timeout bound, the
request and the record it leaves, the report lines, and what the operator does with each kind of answer
(``execute_complete`` is called with the events the api-server and the scheduler's sweep send)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from atlas_migration.approval import (
    MIN_RESPONSE_SECONDS,
    ApprovalRejected,
    ApprovalRequest,
    ApprovalTimedOut,
    Deadline,
    RunApprovalOperator,
    approval_notes,
    approval_record,
    bounded_response_timeout,
    run_variable_key,
    timeout_line,
)

RUN_ID = "manual__2026-01-05T10:00:00+00:00"
HOUR = 3600.0


def test_run_variable_key_is_per_run_and_needs_a_prefix():
    key = run_variable_key("mongo_to_atlas", RUN_ID, prefix="atlas_migration_live_push")
    assert key == f"atlas_migration_live_push__mongo_to_atlas__{RUN_ID}"
    assert key != run_variable_key("mongo_to_atlas", "manual__other", prefix="atlas_migration_live_push")
    with pytest.raises(ValueError):
        run_variable_key("mongo_to_atlas", RUN_ID, prefix="")
    with pytest.raises(ValueError, match="at most 250"):
        run_variable_key("d" * 200, "r" * 60, prefix="p")


def test_the_approval_timeout_param_bounds_the_wait_when_the_deadlines_are_far():
    timeout = bounded_response_timeout(2 * HOUR, [Deadline("the cutover window", 100 * HOUR, HOUR)])
    assert (timeout.seconds, timeout.bound_by) == (2 * HOUR, "approval_timeout_seconds")
    assert not timeout.too_late


def test_the_closest_deadline_minus_its_margin_bounds_the_wait():
    timeout = bounded_response_timeout(120 * HOUR, [
        Deadline("the 120-hour cutover window", 30 * HOUR, HOUR),
        Deadline("the oplog headroom", 10 * HOUR, 2 * HOUR),
    ])
    assert (timeout.seconds, timeout.bound_by) == (8 * HOUR, "the oplog headroom")
    assert timeout.explanation == "the oplog headroom: 10 h 00 min left, minus a safety margin of 2 h 00 min"


@pytest.mark.parametrize("remaining, too_late", [(HOUR + MIN_RESPONSE_SECONDS, False),
                                                 (HOUR + MIN_RESPONSE_SECONDS - 1, True), (HOUR / 2, True)])
def test_too_late_once_the_margin_leaves_less_than_a_minute(remaining, too_late):
    timeout = bounded_response_timeout(120 * HOUR, [Deadline("the cutover window", remaining, HOUR)])
    assert timeout.too_late is too_late
    assert timeout.seconds >= 0


def request(**changes) -> ApprovalRequest:
    base = ApprovalRequest(required=True, what="cutover", subject="Approve the cutover", body="evidence",
                           timeout_seconds=600, timeout_explanation="the approval timeout", asked_at=1_767_607_200.0,
                           evidence={"lag_seconds": 3})
    return ApprovalRequest.from_dict({**base.to_dict(), **changes})


def test_timeout_line_says_when_and_why():
    assert timeout_line(request()) == ("**Times out:** after 10 min 00 s (at about 2026-01-05 10:10:00 UTC), bounded "
                                       "by the approval timeout. Unanswered, the task fails.")
    assert "never" in timeout_line(request(timeout_seconds=None))


def test_the_request_survives_xcom_and_ignores_unknown_keys():
    original = request()
    assert ApprovalRequest.from_dict({**original.to_dict(), "later_field": 1}) == original


def answer(option: str, *, name: str = "Ada Operator", user_id: str = "ada") -> dict:
    return {"chosen_options": [option], "params_input": {}, "timedout": False,
            "responded_at": datetime(2026, 1, 5, 10, 4, 30, tzinfo=UTC),
            "responded_by_user": {"id": user_id, "name": name}}


def test_the_record_names_the_approver_and_the_time():
    record = approval_record(request(), answer("Approve"))
    assert record["approved"] is True and record["approved_by"] == "Ada Operator"
    assert record["approved_by_id"] == "ada" and record["responded_at"] == "2026-01-05T10:04:30+00:00"
    assert record["asked_at"] == "2026-01-05 10:00:00 UTC" and record["evidence"] == {"lag_seconds": 3}
    assert approval_record(request(), answer("Reject"))["approved"] is False


def test_report_notes():
    record = approval_record(request(), answer("Approve"))
    assert approval_notes(record) == ["The cutover was approved by Ada Operator (user id ada) at "
                                      "2026-01-05T10:04:30+00:00 (asked at 2026-01-05 10:00:00 UTC) in Airflow's "
                                      "Required Actions"]
    assert approval_notes({"required": False, "what": "cutover", "reason": "cutover=auto"}) == [
        "The cutover needed no approval (cutover=auto)"]
    assert approval_notes(None) == []


def operator(req: ApprovalRequest | dict | str | None = None) -> RunApprovalOperator:
    return RunApprovalOperator(task_id="approve_cutover", request=(req or request()).to_dict()
                               if isinstance(req, ApprovalRequest | None) else req)


def test_an_approval_returns_the_record():
    result = operator().execute_complete(context={}, event=answer("Approve"))
    assert result["approved"] is True and result["approved_by"] == "Ada Operator"


def test_a_rejection_fails_naming_who_rejected():
    with pytest.raises(ApprovalRejected, match="the cutover was REJECTED by Ada Operator at 2026-01-05T10:04:30"):
        operator().execute_complete(context={}, event=answer("Reject"))


def test_the_sweeps_timeout_event_fails_naming_the_bound():
    event = {"error": "The Human-in-the-loop response timeout has passed without a response.", "error_type": "timeout"}
    with pytest.raises(ApprovalTimedOut, match=r"nobody approved the cutover within 10 min 00 s \(bounded by the "
                                               r"approval timeout\)"):
        operator().execute_complete(context={}, event=event)


def test_an_answer_outside_the_options_is_refused():
    with pytest.raises(ValueError, match="not in"):
        operator().execute_complete(context={}, event=answer("Maybe"))


def test_no_approval_needed_succeeds_without_parking():
    not_needed = ApprovalRequest(required=False, what="cutover", reason="cutover=auto")
    # execute() would write a HITL detail through the task's supervisor and park; here it must return at once.
    assert operator(not_needed).execute(context={}) == {"required": False, "approved": True, "what": "cutover",
                                                        "reason": "cutover=auto"}


def test_a_request_that_is_not_a_mapping_is_refused():
    with pytest.raises(Exception, match="expected an approval request"):
        operator("not a request").execute(context={})


def test_the_operator_is_airflows_approval_operator_with_two_options_and_no_default():
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    op = operator()
    assert isinstance(op, ApprovalOperator)
    # No defaults: a timeout must fail, never fall back to an answer nobody gave.
    assert op.options == ["Approve", "Reject"] and op.defaults is None and op.fail_on_reject is True
    assert "request" in op.template_fields
