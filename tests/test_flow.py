"""flow.strategy_notes: the report lines a strategy's group left in XCom (pure: a stand-in task instance)."""

from __future__ import annotations

from typing import Any

from atlas_migration.flow import strategy_notes


class RecordingTI:
    """Answers ``xcom_pull`` from a dict and records which task ids were asked for."""

    def __init__(self, xcoms: dict[str, Any]) -> None:
        self.xcoms = xcoms
        self.pulled: list[str] = []

    def xcom_pull(self, task_ids: str, default: Any = None) -> Any:
        self.pulled.append(task_ids)
        return self.xcoms.get(task_ids, default)


def test_compose_notes_say_which_path_preflight_chose_and_why():
    ti = RecordingTI({"compose.preflight": {"path": "restore", "reasons": ["no oplog access", "FALLBACK: dump"]}})
    assert strategy_notes({"strategy": "compose"}, ti) == [
        "Compose path: restore", "no oplog access", "FALLBACK: dump"]
    # The pull path's approval and cutover tasks are read too (nothing there: a restore has neither).
    assert ti.pulled == ["compose.preflight", "compose.pull.await_cutover_approval",
                         "compose.pull.await_mongosync_approval", "compose.pull.cutover",
                         "compose.pull.mongosync_check_fence"]


def test_a_live_cutover_fence_is_reported_and_a_dump_strategy_reads_nothing():
    fence = {"op_time": [1_700_000_000, 3], "blocked": True, "how": "write_block",
             "taken_at": "2026-11-01T12:00:00+00:00", "late_writes": {"app.orders": 2}}
    ti = RecordingTI({"live_push.cutover": {"fence": fence}})
    notes = strategy_notes({"strategy": "live_push"}, ti)
    assert notes[0].startswith("Cutover fence: ") and "Writes were BLOCKED" in notes[1]
    assert notes[2] == "Late writes after the fence: app.orders (2)"
    assert ti.pulled == ["live_push.approve_cutover", "live_push.cutover"]

    nothing = RecordingTI({})
    assert strategy_notes({"strategy": "mongorestore"}, nothing) == [] and nothing.pulled == []


def test_the_cutover_approver_is_reported_before_the_fence():
    approval = {"required": True, "approved": True, "what": "cutover", "approved_by": "ops-oncall",
                "approved_by_id": "ops-oncall", "responded_at": "2026-11-01T11:58:00+00:00",
                "asked_at": "2026-11-01 11:50:00 UTC"}
    ti = RecordingTI({"live_push.approve_cutover": approval})
    assert strategy_notes({"strategy": "live_push"}, ti) == [
        "The cutover was approved by ops-oncall at 2026-11-01T11:58:00+00:00 (asked at 2026-11-01 11:50:00 UTC) "
        "in Airflow's Required Actions"]
    auto = RecordingTI({"live_push.approve_cutover": {"required": False, "what": "cutover",
                                                       "reason": "cutover=auto: no approval"}})
    assert strategy_notes({"strategy": "live_push"}, auto) == ["The cutover needed no approval (cutover=auto: no "
                                                                "approval)"]
