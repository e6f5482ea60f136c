"""The live-push path without Airflow runs: pure decisions (pre-flight, cutover, the cutover window), the
trigger and its operator against the in-thread Atlas stand-in, the cutover's approval request, and the
stand-in's data copy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from atlas_migration.approval import TooLateToAsk
from atlas_migration.hooks.atlas import (
    ApiConnectionConfig,
    AtlasAdminHook,
    LiveMigrationDestination,
    LiveMigrationRequest,
    LiveMigrationSource,
)
from atlas_migration.profile import SourceProfile
from atlas_migration.strategies import live_push
from atlas_migration.strategies.live_push import (
    CUTOVER_WINDOW_SECONDS,
    SHARED_CUTOVER_PARAMS,
    LivePushParams,
    cutover_decision,
    cutover_window,
    live_push_params,
    preflight_problems,
    visibility_problems,
)
from atlas_migration.triggers.live_migration import (
    TRIGGER_CLASSPATH,
    LiveMigrationFailed,
    LiveMigrationTrigger,
    WaitForLiveMigrationOperator,
    watch_outcome,
)
from devtools.atlas_api_server import AtlasApiServer, ClusterSpec, DeploymentSpec, Scenario, SourceProjectSpec

SOURCE_PROJECT = "6507f1f77bcf86cd79943904"
TARGET_PROJECT = "6507f1f77bcf86cd79943902"
MIGRATION_HOST = "migration-host-0.example.net"
PUBLIC_KEY, PRIVATE_KEY = "lp-public", "lp-private-Zq9!secret"

# ---------------------------------------------------------------- parameters


def test_params_have_the_documented_defaults_titles_and_section():
    params = live_push_params()
    for name, param in params.items():
        assert param.schema.get("section") == "Live push", name
        assert param.schema.get("title") and param.description, name
    assert params["atlas_conn_id"].value == "atlas_api"
    assert params["cloud_manager_conn_id"].value == "cloud_manager_api"
    assert params["hostname_schema_type"].schema["enum"] == ["PUBLIC", "PRIVATE_LINK", "VPC_PEERING"]
    assert params["access_list_ips"].schema["type"] == "array"
    assert {"link_timeout_seconds", "validation_timeout_seconds", "sync_timeout_seconds",
            "completion_timeout_seconds"} <= set(params)
    # Without the shared Cutover section (another group's), the push never cuts over unasked.
    parsed = LivePushParams.parse({name: p.value for name, p in params.items()})
    assert parsed.cutover == "manual" and parsed.max_cutover_lag_seconds == 10


def test_cutover_params_are_the_shared_sections_and_atlas_params_match_the_aws_path():
    """One DAG, one params namespace: the push reads the live strategies' "Cutover" section instead of
    defining a second ``cutover`` param, and its Atlas params are the AWS path's, value for value."""
    from atlas_migration.strategies.aws_replica_set import aws_params
    from atlas_migration.strategies.live_pull import live_pull_params

    mine, pull, aws = live_push_params(), live_pull_params(), aws_params()
    assert not set(mine) & set(SHARED_CUTOVER_PARAMS)
    assert set(SHARED_CUTOVER_PARAMS) <= set(pull)
    assert sorted(pull["cutover"].schema["enum"]) == ["auto", "manual"]
    parsed = LivePushParams.parse({name: p.value for name, p in {**pull, **mine}.items()})
    assert parsed.cutover == pull["cutover"].value and parsed.quiet_period_seconds == pull["quiet_period_seconds"].value
    for name in set(mine) & set(aws):
        assert mine[name].value == aws[name].value, name
        assert {k: v for k, v in mine[name].schema.items() if k != "section"} == \
               {k: v for k, v in aws[name].schema.items() if k != "section"}, name


def test_params_parse_refuses_wrong_types():
    from atlas_migration.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="max_cutover_lag_seconds"):
        LivePushParams.parse({"max_cutover_lag_seconds": "ten"})
    with pytest.raises(ConfigurationError, match="access_list_ips"):
        LivePushParams.parse({"access_list_ips": [1, 2]})
    assert LivePushParams.parse({"access_list_ips": "10.0.0.1"}).access_list_ips == ("10.0.0.1",)
    assert LivePushParams.parse({"rehearsal_db_prefix": "rehearsal__"}).rehearsal is True


# ---------------------------------------------------------------- pre-flight


def good_params(**changes) -> LivePushParams:
    base = LivePushParams(source_project_id=SOURCE_PROJECT, source_cluster_name="rs0", target_project_id=TARGET_PROJECT,
                          target_cluster_name="Cluster0", migration_host=MIGRATION_HOST,
                          access_list_ips=("10.1.2.3", "10.20.0.0/24"))
    return replace(base, **changes)


def good_profile(**changes) -> SourceProfile:
    profile = SourceProfile(conn_id="mongo_source", hosts=["db0:27017"], version="7.0.14", topology="replica_set",
                            managed_by="cloud_manager", oplog_readable=True)
    for key, value in changes.items():
        setattr(profile, key, value)
    return profile


def good_cluster(**changes) -> dict:
    return {"name": "Cluster0", "mongoDBVersion": "8.0.4", "paused": False, **changes}


def good_projects(version: str = "7.0.14", hosts: tuple[str, ...] = (MIGRATION_HOST,)) -> list[dict]:
    return [{"name": "on-prem", "projectId": SOURCE_PROJECT, "migrationHosts": list(hosts),
             "deployments": [{"name": "rs0", "mongoDBVersion": version, "managed": True, "tlsEnabled": False}]}]


def test_a_sound_setup_has_no_problems():
    assert preflight_problems(good_profile(), good_cluster(), good_projects(), good_params()) == []
    # Not linked yet: the source's visibility is checked after linking, not here.
    assert preflight_problems(good_profile(), good_cluster(), None, good_params()) == []


@pytest.mark.parametrize("change, expected", [
    ({"source_project_id": ""}, "source_project_id must be the 24-hex id"),
    ({"source_project_id": "not-hex"}, "source_project_id must be the 24-hex id"),
    ({"source_cluster_name": ""}, "source_cluster_name is empty"),
    ({"target_cluster_name": ""}, "target_cluster_name is empty"),
    ({"target_project_id": "123"}, "target_project_id '123' is not a 24-hex"),
    ({"migration_host": ""}, "migration_host is empty"),
    ({"hostname_schema_type": "PRIVATE_LINK"}, "PRIVATE_LINK needs private_link_id"),
    ({"hostname_schema_type": "SOMETHING"}, "hostname_schema_type 'SOMETHING' is not one of"),
    ({"access_list_ips": ("10.0.0.300",)}, "'10.0.0.300' is not an IP address or CIDR block"),
    ({"cutover": "sometimes"}, "cutover 'sometimes' is not one of"),
    ({"rehearsal": True}, "a live push cannot be rehearsed"),
])
def test_each_parameter_problem(change, expected):
    problems = preflight_problems(good_profile(), good_cluster(), good_projects(), good_params(**change))
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.parametrize("change, expected", [
    ({"managed_by": None}, "not declared as monitored by Cloud Manager"),
    ({"managed_by": "ops_manager"}, "not declared as monitored by Cloud Manager"),
    ({"version": "6.0.16"}, "the source runs MongoDB 6.0.16; push needs 6.0.17, 7.0.13, 8.0.0 or later"),
    ({"version": "7.0.12"}, "the source runs MongoDB 7.0.12"),
    ({"version": "6.1.0"}, "the source runs MongoDB 6.1.0"),
    ({"version": None}, "the source runs MongoDB an unknown version"),
    ({"topology": "standalone"}, "push needs a replica set or a sharded cluster (the source is standalone)"),
])
def test_each_source_problem(change, expected):
    problems = preflight_problems(good_profile(**change), good_cluster(), good_projects(), good_params())
    assert len(problems) == 1 and expected in problems[0], problems


def test_auto_cutover_needs_the_source_change_stream():
    unreadable = good_profile(oplog_readable=False, unknown={"oplog_access": "not authorized on local"})
    problems = preflight_problems(unreadable, good_cluster(), good_projects(), good_params(cutover="auto"))
    assert len(problems) == 1 and "cutover=auto confirms that application writes have stopped" in problems[0]
    assert "not authorized on local" in problems[0]
    # manual: the operator's approval stands in for the evidence
    assert preflight_problems(unreadable, good_cluster(), good_projects(), good_params(cutover="manual")) == []


@pytest.mark.parametrize("version", ["6.0.17", "7.0.13", "8.0.0", "8.2.1"])
def test_versions_at_the_minimums_pass(version):
    assert preflight_problems(good_profile(version=version), good_cluster(mongoDBVersion=version),
                              good_projects(version=version), good_params()) == []


@pytest.mark.parametrize("cluster, group, expected", [
    (None, TARGET_PROJECT, f"destination cluster 'Cluster0' does not exist in Atlas project {TARGET_PROJECT}"),
    (good_cluster(mongoDBVersion="7.0.5"), TARGET_PROJECT, "runs MongoDB 7.0.5; live migration needs"),
    (good_cluster(paused=True), TARGET_PROJECT, "is paused: resume it first"),
    (good_cluster(), "", "no destination project"),
])
def test_each_destination_problem(cluster, group, expected):
    problems = preflight_problems(good_profile(), cluster, good_projects(), good_params(), group_id=group)
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.parametrize("projects, expected", [
    ([], f"Cloud Manager project {SOURCE_PROJECT} is not among the projects Atlas can migrate from (available: none)"),
    ([{**good_projects()[0], "projectId": "6507f1f77bcf86cd79949999"}],
     "(available: on-prem (6507f1f77bcf86cd79949999))"),
    ([{**good_projects()[0], "deployments": [{"name": "other"}]}], "deployment 'rs0' is not listed in Cloud Manager "
                                                                    "project 'on-prem' (deployments: other)"),
    (good_projects(version="6.0.5"), "Cloud Manager reports 'rs0' on MongoDB 6.0.5"),
    (good_projects(hosts=("other-host",)), f"migration host '{MIGRATION_HOST}' is not provisioned"),
])
def test_each_visibility_problem(projects, expected):
    problems = preflight_problems(good_profile(), good_cluster(), projects, good_params())
    assert len(problems) == 1 and expected in problems[0], problems
    assert visibility_problems(projects, good_params()) == problems


def test_every_problem_is_reported_at_once():
    problems = preflight_problems(good_profile(version="5.0.3", topology="standalone"), None, [],
                                  good_params(migration_host=""))
    assert len(problems) == 5, problems


# ---------------------------------------------------------------- cutover decisions and the window

NOW = 1_800_000_000.0


def migration(status="WORKING", ready=True, lag: int | None = 4) -> dict:
    body = {"_id": "65aa00000000000000000001", "status": status, "readyForCutover": ready}
    if lag is not None:
        body["lagTimeSeconds"] = lag
    return body


@pytest.mark.parametrize("mig, mode, approved, action, reason", [
    (migration("FAILED", False, None), "auto", False, "fail", "FAILED"),
    (migration("EXPIRED", False, None), "manual", True, "fail", "EXPIRED: the 120-hour cutover window passed"),
    (migration("COMPLETE", False, None), "auto", False, "done", "is COMPLETE"),
    (migration("NEW", False, None), "auto", False, "wait", "the initial sync has not started"),
    (migration("WORKING", False, 300), "auto", False, "wait", "does not report readyForCutover yet"),
    (migration("WORKING", True, None), "auto", False, "done", "cutover of live migration"),
    (migration("WORKING", True, 4), "manual", False, "wait", "waiting for an operator's approval"),
    (migration("WORKING", True, 4), "manual", True, "cutover", "approved by an operator"),
    (migration("WORKING", True, 25), "manual", True, "wait", "lag 25 s is above max_cutover_lag_seconds (10 s)"),
    (migration("WORKING", True, 25), "auto", False, "wait", "lag 25 s is above"),
    (migration("WORKING", True, 10), "auto", False, "cutover", "cutover=auto"),
])
def test_cutover_decision(mig, mode, approved, action, reason):
    decision = cutover_decision(mig, good_params(cutover=mode), NOW, approved=approved, ready_since=NOW - 3600)
    assert decision.action == action and reason in decision.reason, decision


def test_cutover_window_runs_down_with_sharper_warnings():
    start = NOW - CUTOVER_WINDOW_SECONDS
    assert cutover_window(None, NOW).warning is None
    early = cutover_window(NOW - 3600, NOW)
    assert early.warning is None and "119 h 00 min left" in early.note
    # ready_since = start + x leaves x seconds of the window at NOW.
    assert cutover_window(start + 25 * 3600, NOW).warning is None
    assert "less than 24 h left (23 h 00 min)" in cutover_window(start + 23 * 3600, NOW).warning
    assert "less than 6 h left (5 h 00 min)" in cutover_window(start + 5 * 3600, NOW).warning
    assert "LESS THAN 1 HOUR LEFT (30 min 00 s)" in cutover_window(start + 30 * 60, NOW).warning
    assert "has run out" in cutover_window(start - 10, NOW).warning
    # The decision carries the warning while it waits.
    decision = cutover_decision(migration(), good_params(cutover="manual"), NOW, ready_since=start + 1800)
    assert decision.action == "wait" and decision.warnings and "LESS THAN 1 HOUR LEFT" in decision.warnings[0]


# ---------------------------------------------------------------- the trigger


@pytest.mark.parametrize("mig, wait_for, outcome", [
    (migration("NEW", False, None), "ready", None),
    (migration("WORKING", False, 90), "ready", None),
    (migration("WORKING", True, 30), "ready", None),  # ready, but the lag is above the threshold
    (migration("WORKING", True, 10), "ready", "ready"),
    (migration("WORKING", True, 10), "complete", None),
    (migration("COMPLETE", False, None), "complete", "complete"),
    (migration("FAILED", False, None), "complete", "failed"),
    (migration("EXPIRED", False, None), "ready", "expired"),
])
def test_watch_outcome(mig, wait_for, outcome):
    assert watch_outcome(mig, wait_for, 10) == outcome


def test_trigger_serializes_to_its_classpath_and_round_trips_without_secrets():
    from airflow.sdk.module_loading import import_string

    trigger = LiveMigrationTrigger(atlas_conn_id="atlas_api", group_id=TARGET_PROJECT,
                                   migration_id="65aa00000000000000000001", wait_for="ready", max_lag_seconds=10,
                                   poll_interval=5, deadline=NOW, ready_since=None)
    classpath, kwargs = trigger.serialize()
    assert classpath == TRIGGER_CLASSPATH == "atlas_migration.triggers.live_migration.LiveMigrationTrigger"
    assert set(kwargs) == {"atlas_conn_id", "group_id", "migration_id", "wait_for", "max_lag_seconds",
                           "poll_interval", "deadline", "ready_since", "outage_tolerance"}
    json.dumps(kwargs)  # plain JSON: nothing but ids and numbers
    again = import_string(classpath)(**kwargs)
    assert again.serialize() == (classpath, kwargs)


def stand_in_scenario(**changes) -> Scenario:
    scenario = Scenario(api_keys={PUBLIC_KEY: PRIVATE_KEY}, require_link=False, validation_seconds=0,
                        migration_new_seconds=10, migration_initial_lag_seconds=100,
                        migration_lag_decay_per_second=10, migration_ready_lag_seconds=10)
    scenario.update(changes)
    return scenario


@pytest.fixture
def server(monkeypatch) -> Iterator[AtlasApiServer]:
    with AtlasApiServer(stand_in_scenario()) as srv:
        s = srv.scenario
        monkeypatch.setenv("AIRFLOW_CONN_ATLAS_API", json.dumps({
            "conn_type": "mongodb_atlas", "host": srv.url, "login": PUBLIC_KEY, "password": PRIVATE_KEY,
            "extra": {"org_id": s.atlas_org_id, "project_id": s.atlas_project_id}}))
        yield srv


def create_migration(server: AtlasApiServer) -> str:
    request = LiveMigrationRequest(
        source=LiveMigrationSource(cluster_name="rs0", group_id=server.scenario.source_projects[0].project_id),
        destination=LiveMigrationDestination(cluster_name="Cluster0", group_id=server.scenario.atlas_project_id),
        migration_host=MIGRATION_HOST)
    hook = AtlasAdminHook("atlas_api")
    try:
        return hook.create_live_migration(request)["_id"]
    finally:
        hook.close()


def trigger_for(server: AtlasApiServer, migration_id: str, **kwargs) -> LiveMigrationTrigger:
    settings = {"wait_for": "ready", "max_lag_seconds": 10, "poll_interval": 0.05, **kwargs}
    return LiveMigrationTrigger(atlas_conn_id="atlas_api", group_id=server.scenario.atlas_project_id,
                                migration_id=migration_id, **settings)


def test_trigger_polls_until_ready(server):
    migration_id = create_migration(server)

    async def scenario() -> dict:
        pending = asyncio.ensure_future(anext(trigger_for(server, migration_id).run()))
        await asyncio.sleep(0.5)
        assert not pending.done(), "the migration is NEW: the trigger must keep polling"
        server.advance(12)  # WORKING, lag about 80 s: still not ready
        await asyncio.sleep(0.3)
        assert not pending.done()
        server.advance(100)  # lag at the floor: ready for cutover
        return (await asyncio.wait_for(pending, 10)).payload

    event = asyncio.run(scenario())
    assert event["outcome"] == "ready" and event["migration"]["readyForCutover"] is True
    assert event["ready_since"] is not None and "is ready for cutover" in event["message"]


@pytest.mark.parametrize("changes, advance, outcome, text", [
    ({"migration_outcome": "FAILED", "migration_fail_after_seconds": 5}, 6, "failed", "FAILED"),
    ({"cutover_window_seconds": 60}, 200, "expired", "EXPIRED: the 120-hour cutover window"),
])
def test_trigger_reports_failed_and_expired(server, changes, advance, outcome, text):
    server.update_scenario(**changes)
    migration_id = create_migration(server)
    server.advance(advance)
    event = asyncio.run(anext(trigger_for(server, migration_id, wait_for="complete").run())).payload
    assert event["outcome"] == outcome and text in event["message"]


def test_trigger_times_out_and_reports_api_errors_without_secrets(server, monkeypatch):
    migration_id = create_migration(server)
    event = asyncio.run(anext(trigger_for(server, migration_id, deadline=time.time() - 1).run())).payload
    assert event["outcome"] == "timeout" and "the wait timeout (status NEW" in event["message"]

    conn = json.loads(os.environ["AIRFLOW_CONN_ATLAS_API"])
    monkeypatch.setenv("AIRFLOW_CONN_ATLAS_API", json.dumps({**conn, "password": "wrong-Pa55-secret"}))
    event = asyncio.run(anext(trigger_for(server, migration_id).run())).payload
    assert event["outcome"] == "error" and "HTTP 401" in event["message"]
    assert "wrong-Pa55-secret" not in json.dumps(event) and PRIVATE_KEY not in json.dumps(event)


def operator(server: AtlasApiServer, migration_id: str, wait_for: str = "ready") -> WaitForLiveMigrationOperator:
    return WaitForLiveMigrationOperator(task_id=f"wait_{wait_for}", atlas_conn_id="atlas_api",
                                        group_id=server.scenario.atlas_project_id, migration_id=migration_id,
                                        wait_for=wait_for, max_lag_seconds="10", poll_interval="2",
                                        timeout_seconds="120")


def test_operator_defers_to_the_trigger_unless_already_there(server):
    from airflow.sdk.exceptions import TaskDeferred

    migration_id = create_migration(server)
    with pytest.raises(TaskDeferred) as deferred:
        operator(server, migration_id).execute(context={})
    classpath, kwargs = deferred.value.trigger.serialize()
    assert classpath == TRIGGER_CLASSPATH and deferred.value.method_name == "execute_complete"
    assert kwargs["migration_id"] == migration_id and kwargs["max_lag_seconds"] == 10.0 and kwargs["poll_interval"] == 2

    server.advance(200)  # ready already: no deferral
    result = operator(server, migration_id).execute(context={})
    assert result["outcome"] == "ready" and result["migration"]["id"] == migration_id


def test_operator_fails_without_retries_on_a_failed_event(server):
    from airflow.sdk.exceptions import AirflowFailException

    op = operator(server, "65aa00000000000000000001", wait_for="complete")
    with pytest.raises(LiveMigrationFailed, match="EXPIRED") as failed:
        op.execute_complete(context={}, event={"outcome": "expired", "message": "live migration x EXPIRED: ..."})
    assert isinstance(failed.value, AirflowFailException)
    # A "ready" event does not satisfy a wait for completion.
    with pytest.raises(LiveMigrationFailed):
        op.execute_complete(context={}, event={"outcome": "ready", "message": "ready"})
    done = op.execute_complete(context={}, event={"outcome": "complete", "migration": {"status": "COMPLETE"},
                                                  "observed_at": NOW, "ready_since": None, "message": "ok"})
    assert done["outcome"] == "complete"


def test_poke_cutover_fences_the_source_then_cuts_over(server, monkeypatch):
    from atlas_migration.strategies import live_push

    migration_id = create_migration(server)
    params = {"atlas_conn_id": "atlas_api", "target_cluster_name": "Cluster0", "cutover": "auto",
              "max_cutover_lag_seconds": 10, "quiet_period_seconds": 1, "cutover_timeout_seconds": 60}
    started = {"migration_id": migration_id, "group_id": server.scenario.atlas_project_id}
    checked, approval, synced = {"write_block": True}, {"approved": True}, {"ready_since": None}
    fence = {"op_time": [100, 1], "blocked": True, "how": "write_block", "taken_at": "t", "late_writes": {}}
    outcomes: list = []

    def fence_source_writes(p, checked_arg):
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(live_push, "fence_source_writes", fence_source_writes)

    def poke(waited: float = 0.0):
        return live_push.poke_cutover(params, checked, started, synced, approval, waited)

    assert poke().done is False  # NEW: not ready, the source is not fenced yet
    server.advance(200)  # ready, lag at the floor
    outcomes.append(LiveMigrationFailed("3 application write(s) reached the source after the cutover fence"))
    with pytest.raises(LiveMigrationFailed, match="after the cutover fence"):
        poke()
    assert server.requests("/cutover") == []  # late writes: Atlas is never asked to cut over
    server.add_fault(400, method="PUT", path_regex="/cutover$", error_code="LIVE_MIGRATION_NOT_READY_FOR_CUTOVER")
    outcomes.append(fence)
    assert poke().done is False  # refused by Atlas: re-check at the next poke
    outcomes.append(fence)
    result = poke()
    assert result.done and result.value["cutover_requested_at"] and result.value["fence"] == fence
    assert [r["status"] for r in server.requests("/cutover")] == [400, 202]
    assert poke().done and not outcomes  # under way: done without fencing again


# ---------------------------------------------------------------- the cutover's approval request

HOUR = 3600.0


def ask(mig: dict | None = None, *, ready_for: float = HOUR, write_block: bool = True, **changes):
    return live_push.cutover_approval_request(migration() if mig is None else mig,
                                              good_params(cutover="manual", **changes), NOW,
                                              ready_since=NOW - ready_for, write_block=write_block)


def test_the_approval_body_shows_the_evidence_when_asked():
    request = ask(migration(lag=4), ready_for=2 * HOUR + 5 * 60, write_block=True, approval_timeout_seconds=6 * HOUR)
    assert request.required and request.what == "cutover" and request.asked_at == NOW
    assert request.subject == "Approve the cutover of live migration 65aa00000000000000000001 into 'Cluster0'"
    body = request.body
    assert body.startswith("### Cutover of Atlas live migration `65aa00000000000000000001`")
    assert "Evidence read from Atlas at 2027-01-15 08:00 UTC" in body
    assert "| Migration status | status WORKING, readyForCutover true, lag 4 s |" in body
    assert "| Lag | 4 s (the cutover needs at most 10 s) |" in body
    assert "| Ready for cutover since | 2027-01-15 05:55 UTC (2 h 05 min ago) |" in body
    assert "| Cutover window | cutover window: 117 h 55 min left (Atlas expires the migration at about" in body
    assert "| Source writes at cutover | BLOCKED by the run at cutover" in body
    assert "| If approved now | ready for cutover with lag 4 s (<= 10 s), approved by an operator |" in body
    assert "**Warnings**" not in body
    assert ("**Times out:** after 6 h 00 min (at about 2027-01-15 14:00:00 UTC), bounded by the approval timeout "
            "(approval_timeout_seconds = 21,600 s)") in body
    assert request.evidence["lag_seconds"] == 4 and request.evidence["window_remaining_seconds"] == 117 * 3600 + 55 * 60
    assert request.evidence["ready_for_seconds"] == 2 * 3600 + 5 * 60 and request.evidence["warnings"] == []


def test_the_body_carries_the_decisions_warnings_and_what_approving_states():
    request = ask(migration(lag=40), ready_for=CUTOVER_WINDOW_SECONDS - 5 * HOUR, write_block=False)
    assert "**Warnings**\n- cutover window: less than 6 h left (5 h 00 min)" in request.body
    assert "| If approved now | lag 40 s is above max_cutover_lag_seconds (10 s) |" in request.body
    assert "NOT blocked by the run: approving states that application writes to the source have stopped" in request.body
    assert request.evidence["source_writes_blocked"] is False


def test_the_window_left_minus_the_margin_bounds_the_timeout():
    # 5 h of the window left, a 1 h margin: the 120 h approval timeout param gives way to 4 h.
    request = ask(ready_for=CUTOVER_WINDOW_SECONDS - 5 * HOUR)
    assert request.timeout_seconds == 4 * HOUR
    assert request.timeout_explanation == ("the 120-hour cutover window: 5 h 00 min left, minus a safety margin of "
                                           "1 h 00 min")
    # A cutover that may take longer than an hour widens the margin.
    longer = ask(ready_for=CUTOVER_WINDOW_SECONDS - 5 * HOUR, cutover_timeout_seconds=2 * HOUR, quiet_period_seconds=60)
    assert longer.timeout_seconds == 5 * HOUR - (2 * HOUR + 60)
    # Far from the window's end, the param decides.
    assert ask(approval_timeout_seconds=600).timeout_seconds == 600


def test_too_late_to_ask_fails_instead_of_asking():
    with pytest.raises(TooLateToAsk, match="too late to ask for approval of the cutover.*Cut over from the Atlas UI"):
        ask(ready_for=CUTOVER_WINDOW_SECONDS - HOUR - 30)


@pytest.mark.parametrize("status, reason", [("FAILED", "FAILED"), ("EXPIRED", "EXPIRED: the 120-hour cutover window")])
def test_a_failed_or_expired_migration_is_not_put_to_an_operator(status, reason):
    with pytest.raises(LiveMigrationFailed, match=f"not asking for approval: .*{reason}"):
        ask(migration(status, False, None))


def test_no_approval_for_auto_or_for_a_cutover_already_under_way():
    auto = live_push.cutover_approval_request({}, good_params(cutover="auto"), NOW, ready_since=None, write_block=True)
    assert not auto.required and "cutover=auto" in auto.reason
    under_way = ask(migration("WORKING", True, None))
    assert not under_way.required and "under way" in under_way.reason


def test_the_body_escapes_table_breakers():
    request = ask(migration(lag=4), source_cluster_name="rs|0")
    assert "`rs|0`" in request.body  # prose keeps it; only table cells need the escape
    assert live_push._md_cell("a|b\nc") == "a\\|b c"


# ---------------------------------------------------------------- the stand-in moves data at cutover


def test_stand_in_copies_the_source_at_cutover(source, target):
    """The stand-in's approximation of the push (devtools.atlas_api_server, "Moving data")."""
    from devtools.atlas_api_server import copy_deployment
    from devtools.sample_data import seed_sample_dataset
    from tests.helpers import assert_namespaces_identical, user_namespaces

    with source.client() as src, target.client() as dst:
        seed_sample_dataset(src, scale=0.005)
        dst.leftover.things.insert_one({"_id": 1})
        summary = copy_deployment(source.uri, target.uri, drop_destination_data=True)
        namespaces = user_namespaces(src)
        assert "leftover" not in dst.list_database_names(), "dropDestinationData drops the destination first"
        assert user_namespaces(dst) == namespaces
        assert_namespaces_identical(src, dst, namespaces)
        assert summary.startswith(f"copied {len(namespaces)} namespace(s)")


def test_stand_in_migration_completes_only_after_the_copy(source, target):
    with source.client() as src:
        src.shop.orders.insert_many([{"_id": i} for i in range(50)])
    scenario = stand_in_scenario(
        source_projects=[SourceProjectSpec(project_id=SOURCE_PROJECT, migration_hosts=[MIGRATION_HOST],
                                           deployments=[DeploymentSpec(name="rs0", local_uri=source.uri)])],
        clusters=[ClusterSpec(name="Cluster0", local_uri=target.uri)], migration_cutover_seconds=0)
    with AtlasApiServer(scenario) as srv:
        request = {"source": {"clusterName": "rs0", "groupId": SOURCE_PROJECT, "managedAuthentication": True,
                              "ssl": False},
                   "destination": {"clusterName": "Cluster0", "groupId": scenario.atlas_project_id,
                                   "hostnameSchemaType": "PUBLIC"},
                   "migrationHosts": [MIGRATION_HOST], "dropDestinationData": False}
        hook = AtlasAdminHook("x", config=ApiConnectionConfig(
            conn_id="x", base_url=srv.url, org_id=scenario.atlas_org_id, project_id=scenario.atlas_project_id,
            public_key=PUBLIC_KEY, private_key=PRIVATE_KEY))
        try:
            record_id = hook.create_live_migration(request)["_id"]
            srv.advance(300)
            with target.client() as dst:
                assert "shop" not in dst.list_database_names(), "no data moves before the cutover"
            hook.cutover_live_migration(record_id)
            deadline = time.monotonic() + 30
            while hook.get_live_migration(record_id)["status"] != "COMPLETE":
                assert time.monotonic() < deadline, srv.state.snapshot()["migrations"]
                time.sleep(0.1)
        finally:
            hook.close()
        record = srv.state.snapshot()["migrations"][record_id]
        assert record["copy_status"] == "done" and record["copy_detail"].startswith("copied 1 namespace(s), 50")
    with target.client() as dst:
        assert dst.shop.orders.count_documents({}) == 50


# ---------------------------------------------------------------- keeping a running migration alive (issue 11.7)

RECORD_KEY = "atlas_migration_live_push__mongo_to_atlas__manual__1"


def created(mid: str = "65aa00000000000000000001") -> dict:
    return {"state": "created", "migration_id": mid, "group_id": TARGET_PROJECT, "created_at": NOW}


@pytest.mark.parametrize("record, status, action, reason", [
    (None, None, "create", "no live migration has been created for this run yet"),
    ({"state": "not_created"}, None, "create", "no live migration"),
    (created(), "WORKING", "reuse", "reconnecting to live migration 65aa00000000000000000001"),
    (created(), "NEW", "reuse", "reconnecting"),
    (created(), "COMPLETE", "reuse", "reconnecting"),
    (created(), "FAILED", "create", "earlier live migration 65aa00000000000000000001 is FAILED: starting a new one"),
    (created(), "EXPIRED", "create", "is EXPIRED: starting a new one"),
    (created(), "MISSING", "refuse", "Atlas does not know live migration 65aa00000000000000000001"),
    ({"state": "creating", "requested_at": NOW}, None, "refuse", "did not learn whether Atlas created it"),
    ({"state": "created"}, None, "refuse", "holds no usable live-push record"),
])
def test_start_decision_never_runs_two_migrations(record, status, action, reason):
    decision = live_push.start_decision(record, status, RECORD_KEY)
    assert decision.action == action and reason in decision.reason
    if action == "refuse":
        assert f"airflow variables set '{RECORD_KEY}'" in decision.reason  # the way out, with the exact key


@pytest.mark.parametrize("status, never_sent, unknown", [
    (None, True, False), (None, False, True), (429, False, False), (400, False, False), (409, False, False),
    (502, False, False), (503, False, False), (504, False, False), (500, False, True), (200, False, True),
])
def test_post_outcome_unknown(status, never_sent, unknown):
    assert live_push.post_outcome_unknown(status, never_sent) is unknown


@pytest.mark.parametrize("record, status, abandon_by, remove, reason", [
    (None, None, None, True, "no live migration was created"),
    ({"state": "not_created"}, None, None, True, "no live migration was created"),
    (created(), "COMPLETE", None, True, "is COMPLETE"),
    (created(), "FAILED", None, True, "is FAILED"),
    (created(), "EXPIRED", None, True, "is EXPIRED"),
    (created(), "WORKING", None, False, "is still WORKING in Atlas; removing the link would stop it"),
    (created(), "NEW", None, False, "is still NEW"),
    (created(), None, None, False, "could not be read; it may still be running"),
    ({"state": "creating"}, None, None, False, "may have reached Atlas"),
    (created(), "WORKING", "param on_failure=abandon", True, "an operator abandoned live migration"),
    ({"state": "creating"}, None, "Variable 'k' = abandon", True, "abandoned the live migration this run may have"),
])
def test_cleanup_decision_keeps_a_running_migration(record, status, abandon_by, remove, reason):
    decision = live_push.cleanup_decision(record, status, abandon_by)
    assert decision.remove_link is remove and reason in decision.reason


def test_abandon_comes_from_the_param_or_the_runs_variable():
    lp = live_push
    assert lp.abandon_requested(good_params(), None, "k") is None
    assert lp.abandon_requested(good_params(), "approved", "k") is None
    assert lp.abandon_requested(good_params(), " Abandon ", "k") == "Variable 'k' = abandon"
    assert lp.abandon_requested(good_params(on_failure="abandon"), None, "k") == "param on_failure=abandon"
    assert lp.param_problems(good_params(on_failure="drop")) == [
        "on_failure 'drop' is not one of keep_migration, abandon"]
    params = live_push_params()
    assert params["on_failure"].value == "keep_migration"
    assert params["api_outage_tolerance_seconds"].value == 900
    parsed = LivePushParams.parse({"api_outage_tolerance_seconds": 30, "on_failure": "abandon"})
    assert parsed.api_outage_tolerance_seconds == 30 and parsed.on_failure == "abandon"


def test_trigger_rides_out_an_outage_and_gives_up_past_the_tolerance(server):
    migration_id = create_migration(server)
    server.advance(200)  # ready
    server.start_outage(1.5)
    started = time.monotonic()
    event = asyncio.run(anext(trigger_for(server, migration_id, outage_tolerance=60).run())).payload
    assert event["outcome"] == "ready", event
    assert time.monotonic() - started >= 1.5
    during = [r for r in server.requests("/liveMigrations/") if r.get("outage")]
    assert during and all(r["status"] == 503 for r in during)

    server.start_outage(30, mode="reset")  # connections dropped without an answer
    event = asyncio.run(anext(trigger_for(server, migration_id, outage_tolerance=1).run())).payload
    assert event["outcome"] == "error"
    assert "longer than api_outage_tolerance_seconds (1 s)" in event["message"]
    assert f"The live migration {migration_id} is still running in Atlas" in event["message"]
    assert "clear this task" in event["message"]


def test_operator_defers_through_an_outage_at_its_first_read(server):
    from airflow.sdk.exceptions import TaskDeferred

    migration_id = create_migration(server)
    server.start_outage(30)
    with pytest.raises(TaskDeferred) as deferred:
        operator(server, migration_id).execute(context={})
    _, kwargs = deferred.value.trigger.serialize()
    assert kwargs["migration_id"] == migration_id and kwargs["outage_tolerance"] == 900.0
    server.state.outage = None
    server.add_fault(404, method="GET", path_regex="/liveMigrations/")  # not transient: no deferral
    with pytest.raises(LiveMigrationFailed, match=f"HTTP 404.*The live migration {migration_id} is still running"):
        operator(server, migration_id).execute(context={})


class DictVariables:
    """Stands in for Airflow Variables (``RunRecord``'s get/put)."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def record(self, key: str = RECORD_KEY):
        return live_push.RunRecord(key, self.values.get, self.values.__setitem__)


def push_params(server: AtlasApiServer, **changes) -> dict:
    return {"atlas_conn_id": "atlas_api", "cloud_manager_conn_id": "cloud_manager_api",
            "source_project_id": server.scenario.source_projects[0].project_id, "source_cluster_name": "rs0",
            "target_cluster_name": "Cluster0", "migration_host": MIGRATION_HOST, "api_outage_tolerance_seconds": 5,
            **changes}


@pytest.fixture
def cloud_manager_conn(server, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_CLOUD_MANAGER_API", json.dumps({
        "conn_type": "mongodb_cloud_manager", "host": server.url, "login": PUBLIC_KEY, "password": PRIVATE_KEY,
        "extra": {"org_id": server.scenario.cloud_manager_org_id}}))


def test_start_migration_reconnects_instead_of_starting_a_second_one(server):
    lp, variables = live_push, DictVariables()
    params, checked, facts = push_params(server), {"group_id": server.scenario.atlas_project_id}, {"managed": True}

    first = lp.start_migration(params, checked, facts, variables.record())
    again = lp.start_migration(params, checked, facts, variables.record())
    assert first["reconnected"] is False and again["reconnected"] is True
    assert again["migration_id"] == first["migration_id"] and again["group_id"] == checked["group_id"]
    assert created_posts(server) == [201]
    assert json.loads(variables.values[RECORD_KEY])["migration_id"] == first["migration_id"]

    server.update_scenario(migration_outcome="FAILED", migration_fail_after_seconds=0)
    server.state.migrations[first["migration_id"]].fail_after = 0  # the first one fails in Atlas
    third = lp.start_migration(params, checked, facts, variables.record())
    assert third["migration_id"] != first["migration_id"]
    assert json.loads(variables.values[RECORD_KEY])["ended"] == [first["migration_id"]]


def test_start_migration_after_an_uncertain_post_refuses_to_post_again(server, monkeypatch):
    from atlas_migration.hooks.atlas import RetryPolicy

    monkeypatch.setattr(RetryPolicy, "backoff", lambda self, attempt: 0.0)  # the hook's retries, without the waits
    lp, variables = live_push, DictVariables()
    params, checked, facts = push_params(server), {"group_id": server.scenario.atlas_project_id}, {"managed": True}

    # 503 x6: the hook's retries run out; the gateway answered, so nothing was created: a retry may POST.
    server.add_fault(503, count=6, method="POST", path_regex="/liveMigrations$")
    with pytest.raises(Exception, match="HTTP 503"):
        lp.start_migration(params, checked, facts, variables.record())
    assert json.loads(variables.values[RECORD_KEY])["state"] == "not_created"
    # 500 on a POST: Atlas may have created it. The record stays "creating" and the next attempt refuses.
    server.add_fault(500, method="POST", path_regex="/liveMigrations$")
    with pytest.raises(LiveMigrationFailed, match="possibly after Atlas created it"):
        lp.start_migration(params, checked, facts, variables.record())
    with pytest.raises(LiveMigrationFailed, match="did not learn whether Atlas created it"):
        lp.start_migration(params, checked, facts, variables.record())
    assert created_posts(server)[-1] == 500  # no POST after the refusal


def created_posts(server: AtlasApiServer) -> list[int]:
    """Statuses of the create-migration POSTs (not counting the Digest challenge each first call gets)."""
    return [r["status"] for r in server.requests("/liveMigrations", method="POST")
            if r["path"].endswith("/liveMigrations") and r["status"] != 401]


def link(server: AtlasApiServer) -> None:
    from atlas_migration.hooks.atlas import CloudManagerHook

    atlas, cloud_manager = AtlasAdminHook("atlas_api"), CloudManagerHook("cloud_manager_api")
    try:
        cloud_manager.create_migration_link(atlas.create_link_token())
    finally:
        atlas.close()
        cloud_manager.close()


@pytest.mark.parametrize("abandon", [None, "param", "variable"])
def test_cleanup_keeps_the_link_of_a_running_migration_unless_abandoned(server, cloud_manager_conn, abandon, caplog):
    lp, variables = live_push, DictVariables()
    params = push_params(server, on_failure="abandon" if abandon == "param" else "keep_migration")
    link(server)
    started = lp.start_migration(params, {"group_id": server.scenario.atlas_project_id}, {"managed": True},
                                 variables.record())
    server.advance(200)  # WORKING, ready for cutover; then a task of the run fails (the caller's business)

    with caplog.at_level(logging.INFO, logger="atlas_migration"):
        result = lp.cleanup_link(params, variables.record(), None,
                                 abandon_value="abandon" if abandon == "variable" else None,
                                 abandon_variable="atlas_migration_abandon__mongo_to_atlas__manual__1")
    state = server.state.snapshot()
    if abandon is None:
        assert result["link_removed"] is False and result["migration_status"] == "WORKING"
        assert state["migration_links"] and not any(t["revoked"] for t in state["link_tokens"])
        text = caplog.text
        assert f"live migration {started['migration_id']} is still WORKING in Atlas" in text
        assert "airflow variables set 'atlas_migration_abandon__mongo_to_atlas__manual__1' abandon" in text
        # The setup re-runs when a task is cleared: it keeps the SYNCED link instead of making a new one.
        tokens_before = len(state["link_tokens"])
        server.advance(60)
        relinked = lp.create_link(params, variables.record())
        assert relinked["reused"] is True and len(server.state.snapshot()["link_tokens"]) == tokens_before
    else:
        assert result["link_removed"] is True and "an operator abandoned" in result["reason"]
        assert state["migration_links"] == {} and all(t["revoked"] for t in state["link_tokens"])


def test_poke_cutover_reads_through_an_outage_and_stops_past_the_tolerance(server, monkeypatch):
    from atlas_migration.api_outage import WatchInterrupted
    from atlas_migration.hooks.atlas import RetryPolicy

    monkeypatch.setattr(RetryPolicy, "backoff", lambda self, attempt: 0.0)  # the hook's own retries: instant
    fence = {"op_time": [100, 1], "blocked": True, "how": "write_block", "taken_at": "t", "late_writes": {}}
    monkeypatch.setattr(live_push, "fence_source_writes", lambda p, checked: fence)
    migration_id = create_migration(server)
    server.advance(200)
    started = {"migration_id": migration_id, "group_id": server.scenario.atlas_project_id}
    params = {"atlas_conn_id": "atlas_api", "target_cluster_name": "Cluster0", "cutover": "auto",
              "quiet_period_seconds": 1, "api_outage_tolerance_seconds": 30}

    def poke(**changes):
        return live_push.poke_cutover({**params, **changes}, {"write_block": True}, started,
                                      {"ready_since": None}, {"approved": True}, 0.0)

    server.start_outage(1.5)  # longer than the hook's own (instant) retries: the outage layer waits it out
    assert poke().done and [r["status"] for r in server.requests("/cutover")][-1] == 202
    assert len([r for r in server.requests("/liveMigrations/", method="GET") if r.get("outage")]) >= 6
    server.start_outage(60, mode="reset")
    with pytest.raises(WatchInterrupted, match=f"longer than api_outage_tolerance_seconds .*The live migration "
                                               f"{migration_id} is still running in Atlas"):
        poke(api_outage_tolerance_seconds=1)
