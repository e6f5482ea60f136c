"""The migration flow, wired once and used by both DAGs (``mongo_to_atlas`` and its scheduled rehearsal).

    inspect_source -> route -> choose_strategy (branch) -> <one task group per strategy>
                   -> validate (after whichever group ran) -> report
    rehearsal only:   check_scratch (setup) -> inspect_source ...
                      report -> record_rehearsal (always) -> cleanup_scratch (teardown, always)

Call ``migration_flow`` inside a ``@dag`` function. Only ``airflow.sdk`` and this package's light modules
are imported here: DAG files are parsed often.
"""

from __future__ import annotations

from airflow.sdk import TriggerRule, get_current_context, setup, task, teardown

from atlas_migration import tasks as steps
from atlas_migration.approval import approval_notes
from atlas_migration.report_link import MigrationReportLink
from atlas_migration.strategies.aws_replica_set import aws_replica_set_group
from atlas_migration.strategies.compose import compose_group, report_notes
from atlas_migration.strategies.file_import import file_import_group
from atlas_migration.strategies.live_pull import live_pull_group
from atlas_migration.strategies.live_push import live_push_group
from atlas_migration.strategies.mongorestore import mongorestore_group

# Strategies with a task group in the flow; routing to any other fails with a clear error.
AVAILABLE_STRATEGIES = frozenset({"mongorestore", "live_pull", "live_push", "compose", "aws_replica_set",
                                  "file_import"})


def _paths(params, dag, run_id) -> steps.RunPaths:
    return steps.run_paths(params, dag.dag_id, run_id)


def strategy_notes(decision: dict, ti) -> list[str]:
    """Lines the strategy's group left for the report (read from its XCom).

    Here, above the strategy modules, rather than in ``tasks``: the Compose group's tasks are built on
    ``tasks`` (through ``strategies.mongorestore``), so ``tasks`` importing ``compose`` for its notes made a circle."""
    notes: list[str] = []
    strategy = decision.get("strategy")
    if strategy == "compose":
        notes += report_notes(ti.xcom_pull(task_ids="compose.preflight", default=None))
    for task_id in steps.APPROVAL_TASKS.get(strategy or "", ()):
        notes += approval_notes(ti.xcom_pull(task_ids=task_id, default=None))
    for task_id in steps.CUTOVER_TASKS.get(strategy or "", ()):
        notes += steps.fence_notes(ti.xcom_pull(task_ids=task_id, default=None))
    return notes


def migration_flow(*, rehearsal: bool = False) -> None:
    @task
    def inspect_source(params=None, dag=None, run_id=None) -> dict:
        return steps.inspect(params, _paths(params, dag, run_id))

    @task
    def route(profile: dict, params=None, run_id=None) -> dict:
        return steps.route(params, profile, AVAILABLE_STRATEGIES, run_id=run_id or "")

    @task.branch
    def choose_strategy(decision: dict) -> str | None:
        return steps.branch(decision)

    @task(trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS)
    def validate(profile: dict, decision: dict, params=None, dag=None, run_id=None, ti=None) -> dict:
        return steps.validate(params, profile, decision, _paths(params, dag, run_id),
                              notes=strategy_notes(decision, ti), notes_source=ti)

    @task
    def report(profile: dict, decision: dict, result: dict) -> dict:
        return steps.report(profile, decision, result)

    profile = inspect_source()
    if rehearsal:

        @setup
        def check_scratch(params=None) -> list[str]:
            return steps.check_scratch(params)

        scratch = check_scratch()
        scratch >> profile
    decision = route(profile)
    groups = [mongorestore_group(profile), live_pull_group(profile), live_push_group(profile),
              compose_group(profile), aws_replica_set_group(profile), file_import_group(profile)]
    choose_strategy(decision) >> groups
    result = validate(profile, decision)
    # A "Migration report" button on validate (TaskFlow tasks share one class: set on this task only).
    result.operator.operator_extra_links = [MigrationReportLink()]
    groups >> result
    final = report(profile, decision, result)

    if rehearsal:

        @task(trigger_rule=TriggerRule.ALL_DONE)
        def record_rehearsal(params=None, dag=None, run_id=None) -> dict:
            context = get_current_context()
            return steps.record_rehearsal(params, _paths(params, dag, run_id), context["ti"],
                                          context["dag_run"])

        @teardown
        def cleanup_scratch(params=None) -> list[str]:
            return steps.cleanup_scratch(params)

        recorded = record_rehearsal()
        final >> recorded
        # The teardown of check_scratch: it runs once the rehearsal is over, whatever its outcome, and does
        # not decide the run's state (record_rehearsal does).
        cleanup = cleanup_scratch()
        recorded >> cleanup
        cleanup.as_teardown(setups=scratch.operator)
