"""What the approver of a live pull's manual cutover sees (pure): the evidence, the timeout, and no approval at
all with ``cutover=auto``."""

from __future__ import annotations

from atlas_migration.strategies.live_pull import (
    MONGOSYNC_APPROVAL,
    NATIVE_APPROVAL,
    mongosync_commit_request,
    native_cutover_request,
)

NOW = 1_790_000_000.0
FACTS = {"lag_seconds": 3.0, "pending_estimate": 42, "oplog_window_hours": 30.5, "rechecks_pending": 7,
         "verifier": {"partitions": {"compared": 5, "total": 8}, "mismatches": {"open": 1, "resolved": 4}},
         "block": True, "block_reason": "user writes will be BLOCKED on the source (setUserWriteBlockMode)"}


def test_auto_cutover_asks_nobody() -> None:
    request = native_cutover_request({"cutover": "auto"}, FACTS, NOW)
    assert not request.required and request.what == NATIVE_APPROVAL and "cutover=auto" in request.reason
    assert not mongosync_commit_request({"cutover": "auto"}, {}, False, NOW).required


def test_native_request_shows_the_evidence_and_the_timeout() -> None:
    request = native_cutover_request({"cutover": "manual", "approval_timeout_seconds": 7200,
                                      "max_cutover_lag_seconds": 10}, FACTS, NOW)
    assert request.required and request.subject == "Approve the live-pull cutover"
    assert request.timeout_seconds == 7200 and request.asked_at == NOW
    body = request.body
    for shown in ("| Lag | 3 s (cutover threshold 10 s) |", "| Oplog entries not yet applied | 42 |",
                  "| Oplog span now | 30.50 h", "| Verifier | 5 of 8 partitions compared, 1 open mismatch(es)",
                  "| Rechecks queued | 7 |", "BLOCKED on the source",
                  "**If approved:** the run catches up again until the lag is under 10 s",
                  "**Times out:** after 2 h 00 min", "approval_timeout_seconds = 7,200 s"):
        assert shown in body, (shown, body)
    assert request.evidence["verifier_open_mismatches"] == 1 and request.evidence["lag_seconds"] == 3.0


def test_native_request_without_write_blocking_says_the_approval_is_the_statement() -> None:
    request = native_cutover_request({"cutover": "manual"}, {**FACTS, "block": False,
                                                             "block_reason": "writes are not blocked"}, NOW)
    assert "your approval is the statement that application writes have STOPPED" in request.body
    assert request.timeout_seconds == 120 * 3600  # the param's default when the run does not set it


def test_mongosync_request_shows_progress_and_who_blocks_writes() -> None:
    progress = {"state": "RUNNING", "canCommit": True, "lagTimeSeconds": 2,
                "verification": {"source": {"phase": "stream hashing"}, "destination": {"phase": "stream hashing"}}}
    request = mongosync_commit_request({"cutover": "manual", "approval_timeout_seconds": 600,
                                        "quiet_period_seconds": 3}, progress, False, NOW)
    assert request.required and request.what == MONGOSYNC_APPROVAL
    for shown in ("| mongosync | state RUNNING, canCommit true |", "| Lag | 2 s (commit threshold",
                  "| Embedded verifier | source stream hashing, destination stream hashing |",
                  "| Source writes at commit | not blocked |", "watches the source for 3 s",
                  "**Times out:** after 10 min 00 s"):
        assert shown in request.body, (shown, request.body)
    blocked = mongosync_commit_request({"cutover": "manual"}, progress, True, NOW)
    assert "mongosync blocks writes on the source at commit" in blocked.body
