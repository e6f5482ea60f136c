"""Failures no retry can fix end a task at once; transient ones keep the task's retries.

Both DAGs set ``retry_policy=CERTAIN_FAILURES`` in their ``default_args``, so every task (mapped, sensor,
teardown) gets it. It is Airflow's per-exception retry policy (``airflow.sdk.ExceptionRetryPolicy``,
evaluated by the task runner in the worker when a task raises): a rule whose exception matches answers
FAIL (the task fails now, whatever ``retries`` says); anything else falls through to the task's normal
retries (a server that cannot be reached, an Atlas 5xx, a catch-up that ran out of time).

Certain failures:
- invalid configuration (params, connections, patterns, an impossible strategy, an occupied target,
  names the driver refuses): ``ConfigurationError`` and friends, pymongo's own URI/config/name errors;
- refused credentials: ``CredentialsRefused`` (MongoDB AuthenticationFailed/Unauthorized at connect), a
  pymongo ``OperationFailure`` with those codes, an Atlas / Cloud Manager 401 or 403;
- history lost (the oplog rolled past the resume point), an event too large for the source to deliver,
  DDL the engine refuses, late writes after the cutover fence (they need an operator);
- a failed validation (the data differs: re-running validation does not change it).

Exception classes are named by dotted path and resolved only when a task fails (in the worker), so parsing
the DAG imports neither pymongo nor the engines.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import ExceptionRetryPolicy, RetryAction, RetryDecision, RetryRule

# MongoDB error codes: AuthenticationFailed, Unauthorized.
REFUSED_CREDENTIAL_CODES = frozenset({18, 13})
REFUSED_HTTP_STATUSES = frozenset({401, 403})

CERTAIN_FAILURE_CLASSES: tuple[tuple[str, str], ...] = (
    ("atlas_migration.errors.ConfigurationError", "invalid configuration"),
    ("atlas_migration.errors.ImpossibleStrategy", "the strategy cannot work for this source"),
    ("atlas_migration.errors.StrategyNotAvailable", "the strategy has no task group"),
    ("atlas_migration.errors.TargetNotEmpty", "the target holds data (see the message for what to do)"),
    ("atlas_migration.errors.CredentialsRefused", "the credentials were refused"),
    ("atlas_migration.errors.ValidationFailed", "validation found differences"),
    ("atlas_migration.engines.live.HistoryLost", "the oplog no longer holds the resume point"),
    ("atlas_migration.engines.live.EventTooLarge", "a change event too large for the source to deliver"),
    ("atlas_migration.engines.live.UnsafeDDL", "DDL the live pull does not apply"),
    ("atlas_migration.fence.LateWrites", "writes after the cutover fence need an operator"),
    ("pymongo.errors.ConfigurationError", "invalid connection configuration"),
    ("pymongo.errors.InvalidURI", "invalid connection string"),
    ("pymongo.errors.InvalidName", "a name the driver refuses"),
)


class _DeferredRule(RetryRule):
    """A ``RetryRule`` by dotted path that is not imported at DAG-parse time (``RetryRule`` checks the path
    by importing it, which would import pymongo and the engines whenever the DAG file is parsed); the class
    is resolved when a task fails."""

    def __post_init__(self) -> None:
        pass


class CertainFailuresPolicy(ExceptionRetryPolicy):
    """``ExceptionRetryPolicy`` over ``CERTAIN_FAILURE_CLASSES`` (FAIL), plus refused credentials that are
    told apart by code or HTTP status rather than by class; everything else: the task's own retries."""

    def __init__(self) -> None:
        super().__init__(rules=[_DeferredRule(exception=path, action=RetryAction.FAIL, reason=f"no retry can fix "
                                              f"this: {why}") for path, why in CERTAIN_FAILURE_CLASSES],
                         default=RetryAction.DEFAULT)

    def evaluate(self, exception: BaseException, try_number: int, max_tries: int,
                 context: Any = None) -> RetryDecision:
        if refused_credentials(exception):
            return RetryDecision.fail("no retry can fix this: the credentials were refused")
        return super().evaluate(exception, try_number, max_tries, context)


def refused_credentials(exception: BaseException) -> bool:
    """A pymongo error with AuthenticationFailed / Unauthorized, or an Atlas API 401 / 403."""
    module = type(exception).__module__
    if module.startswith("pymongo") and getattr(exception, "code", None) in REFUSED_CREDENTIAL_CODES:
        return True
    from_atlas = any(cls.__name__ == "AtlasApiError" for cls in type(exception).__mro__)
    return from_atlas and getattr(exception, "status", None) in REFUSED_HTTP_STATUSES


CERTAIN_FAILURES = CertainFailuresPolicy()


def default_args() -> dict[str, Any]:
    """``default_args`` for both DAGs: every task fails at once on a certain failure."""
    return {"retry_policy": CERTAIN_FAILURES}
