"""Certain failures fail at once; transient ones keep their retries (Airflow's per-exception retry policy)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import structlog
from airflow.sdk import RetryAction

from atlas_migration.engines.live import HistoryLost
from atlas_migration.errors import (
    ConfigurationError,
    MigrationError,
    SourceCredentialsRefused,
    SourceUnreachable,
    TargetNotEmpty,
    ValidationFailed,
)
from atlas_migration.hooks.atlas import AtlasApiError
from atlas_migration.retry_policy import CERTAIN_FAILURES


def decide(exc: BaseException) -> RetryAction:
    return CERTAIN_FAILURES.evaluate(exc, try_number=1, max_tries=4).action


@pytest.mark.parametrize("exc", [
    HistoryLost("the oplog rolled past the resume point"),
    ConfigurationError("bad param"),
    TargetNotEmpty("shop.orders holds data"),
    ValidationFailed("shop.orders differs"),
    SourceCredentialsRefused("source refused the credentials"),
    AtlasApiError("unauthorized", status=401),
    AtlasApiError("forbidden", status=403),
])
def test_certain_failures_fail_at_once(exc):
    assert decide(exc) is RetryAction.FAIL


def test_refused_credentials_from_the_driver_fail_at_once():
    from pymongo.errors import InvalidURI, OperationFailure

    assert decide(OperationFailure("Authentication failed.", code=18)) is RetryAction.FAIL
    assert decide(InvalidURI("bad uri")) is RetryAction.FAIL
    assert decide(OperationFailure("interrupted", code=11601)) is RetryAction.DEFAULT


@pytest.mark.parametrize("exc", [
    SourceUnreachable("cannot reach source within 10s"),
    AtlasApiError("service unavailable", status=503),
    AtlasApiError("unreachable", status=None),
    MigrationError("the target did not catch up within 60 s"),
    ConnectionResetError("reset"),
])
def test_transient_failures_keep_their_retries(exc):
    assert decide(exc) is RetryAction.DEFAULT


@pytest.fixture(scope="module")
def dags():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder="dags")
    assert not bag.import_errors
    return bag.dags


def test_every_task_of_both_dags_carries_the_policy(dags):
    for dag_id in ("mongo_to_atlas", "mongo_to_atlas_rehearsal"):
        tasks = dags[dag_id].tasks
        assert tasks and all(t.retry_policy is CERTAIN_FAILURES for t in tasks), dag_id


def _failed_try(task, exc: BaseException) -> str:
    """What Airflow's task runner decides when ``task`` raises ``exc`` on its first of several tries."""
    from airflow.sdk.execution_time.task_runner import _handle_current_task_failed

    ti = SimpleNamespace(task=task, try_number=1, end_date=None, rendered_map_index=None,
                         _failure_metrics_emitted=True, stats_tags={},
                         _ti_context_from_server=SimpleNamespace(max_tries=task.retries + 1, should_retry=True))
    _, state = _handle_current_task_failed(ti, exc, structlog.get_logger("test"))  # the runner logs with structlog
    return state.value


def test_history_lost_in_catch_up_is_not_retried(dags):
    catch_up = dags["mongo_to_atlas"].get_task("live_pull.catch_up")
    assert catch_up.retries >= 1  # it has retries, for what retries can fix...
    assert _failed_try(catch_up, MigrationError("the target did not catch up")) == "up_for_retry"
    # ...but not for a lost oplog history: it fails on the first try.
    assert _failed_try(catch_up, HistoryLost("the resume point is no longer in the oplog")) == "failed"
