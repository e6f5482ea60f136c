"""The migration report's web app (FastAPI), mounted by the api-server through ``plugins/migration_report.py``.

Two server-rendered HTML pages, read from the metadata DB (never a worker's disk):

- ``/migration-report/runs/{dag_id}/{run_id}``: one run's report (verdict, routing decision, namespaces,
  mismatches, phase times, throughput, lag);
- ``/migration-report/migrations``: recent runs of ``mongo_to_atlas`` and the rehearsal trend.

Both sit behind Airflow's own authentication: the core API's ``requires_access_dag`` dependency (which
resolves the user with ``get_user``: the ``Authorization: Bearer`` JWT, or the UI's ``_token`` cookie when
the page is embedded in the UI) and authorises reading the DAG's runs. The pages read the validate task's
``validation_report`` XCom, the ``route`` decision, restore results and task instances; building and
rendering them is ``atlas_migration.report_view``.

This module imports FastAPI and the api-server's own modules, so only the api-server imports it, on the
first request to the app: every Airflow process (each task's too) loads ``plugins/``, and that must stay
cheap.
"""


from __future__ import annotations

from typing import Any

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from airflow.models.dagrun import DagRun
from airflow.models.taskinstance import TaskInstance
from airflow.models.xcom import XComModel
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import select

from atlas_migration import report_view

MIGRATION_DAG_ID = "mongo_to_atlas"
REHEARSAL_DAG_ID = "mongo_to_atlas_rehearsal"
RECENT_RUNS = 25
TREND_ENTRIES = 50
# (task id, XCom key) the run page reads: the report, the routing decision, the copy's results and a live
# strategy's catch-up result (its lag). Everything else in XCom is left alone.
REPORT_XCOM = ("validate", report_view.REPORT_XCOM_KEY)
DECISION_XCOM = ("route", "return_value")
RESTORE_TASK = "mongorestore.copy.restore"
CATCH_UP_TASKS = ("live_pull.catch_up", "compose.pull.catch_up", "aws_replica_set.pull.catch_up")

app = FastAPI(title="Migration report", description="Migration validation reports of mongo_to_atlas runs")


def _xcoms(session, dag_id: str, run_ids: list[str], task_ids: list[str], keys: list[str]) -> list[Any]:
    rows = session.execute(
        select(XComModel.run_id, XComModel.task_id, XComModel.map_index, XComModel.key, XComModel.value)
        .where(XComModel.dag_id == dag_id, XComModel.run_id.in_(run_ids), XComModel.task_id.in_(task_ids),
               XComModel.key.in_(keys))
        .order_by(XComModel.map_index)
    ).all()
    return [(row.run_id, row.task_id, row.map_index, row.key, XComModel.deserialize_value(row)) for row in rows]


def _flatten(values: list[Any]) -> list[dict[str, Any]]:
    """Restore results: each mapped instance returns a batch (a list) of per-collection results."""
    out: list[dict[str, Any]] = []
    for value in values:
        out.extend(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, dict))
    return out


@app.get("/runs/{dag_id}/{run_id}", response_class=HTMLResponse,
         dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.RUN))])
def run_page(dag_id: str, run_id: str, session: SessionDep) -> HTMLResponse:
    """One run's migration report."""
    run = session.execute(
        select(DagRun.state).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)
    ).first()
    if run is None:
        return HTMLResponse(report_view.render_run_page(report_view.build_run_page(
            dag_id=dag_id, run_id=run_id, run_state="not found", report=None, decision=None)), status_code=404)
    instances = session.execute(
        select(TaskInstance.task_id, TaskInstance.state, TaskInstance.start_date, TaskInstance.end_date)
        .where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)
    ).all()
    wanted_tasks = [REPORT_XCOM[0], DECISION_XCOM[0], RESTORE_TASK, *CATCH_UP_TASKS]
    found = _xcoms(session, dag_id, [run_id], wanted_tasks, [REPORT_XCOM[1], DECISION_XCOM[1]])
    by_task: dict[tuple[str, str], list[Any]] = {}
    for _, task_id, _, key, value in found:
        by_task.setdefault((task_id, key), []).append(value)
    catch_up = next((by_task[(t, "return_value")][-1] for t in CATCH_UP_TASKS if (t, "return_value") in by_task), None)
    page = report_view.build_run_page(
        dag_id=dag_id, run_id=run_id, run_state=str(run.state or "-"),
        report=(by_task.get(REPORT_XCOM) or [None])[-1], decision=(by_task.get(DECISION_XCOM) or [None])[-1],
        task_instances=[{"task_id": t.task_id, "state": t.state, "start_date": t.start_date,
                         "end_date": t.end_date} for t in instances],
        restored=_flatten(by_task.get((RESTORE_TASK, "return_value"), [])),
        catch_up=catch_up if isinstance(catch_up, dict) else None,
    )
    return HTMLResponse(report_view.render_run_page(page, migrations_href="../../migrations"))


def _can_read_runs(user, dag_id: str) -> bool:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager().is_authorized_dag(method="GET", access_entity=DagAccessEntity.RUN,
                                                details=DagDetails(id=dag_id), user=user)


@app.get("/migrations", response_class=HTMLResponse,
         dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=MIGRATION_DAG_ID))])
def migrations_page(request: Request, user: GetUserDep, session: SessionDep) -> HTMLResponse:
    """Recent migration runs and the rehearsal trend."""
    runs = session.execute(
        select(DagRun.run_id, DagRun.state, DagRun.start_date, DagRun.end_date)
        .where(DagRun.dag_id == MIGRATION_DAG_ID)
        .order_by(DagRun.run_after.desc()).limit(RECENT_RUNS)
    ).all()
    run_ids = [r.run_id for r in runs]
    # Keyed by task AND key: the validate task's small return value sits beside its report.
    values: dict[tuple[str, str, str], Any] = {}
    for run_id, task_id, _, key, value in _xcoms(session, MIGRATION_DAG_ID, run_ids,
                                                 [REPORT_XCOM[0], DECISION_XCOM[0]], [REPORT_XCOM[1], DECISION_XCOM[1]]):
        values[(run_id, task_id, key)] = value
    summaries = [report_view.summarise_run(
        {"run_id": r.run_id, "state": r.state, "start_date": r.start_date, "end_date": r.end_date},
        values.get((r.run_id, *REPORT_XCOM)) or values.get((r.run_id, REPORT_XCOM[0], "return_value")),
        values.get((r.run_id, *DECISION_XCOM))) for r in runs]
    trend: list[dict[str, Any]] = []
    trend_note = None
    # The trend belongs to another DAG: shown only to users who may read that DAG's runs too.
    if _can_read_runs(user, REHEARSAL_DAG_ID):
        rehearsal_runs = session.execute(
            select(DagRun.run_id).where(DagRun.dag_id == REHEARSAL_DAG_ID)
            .order_by(DagRun.run_after.desc()).limit(TREND_ENTRIES)
        ).scalars().all()
        trend = [value for *_, value in _xcoms(session, REHEARSAL_DAG_ID, list(rehearsal_runs), ["record_rehearsal"],
                                               ["return_value"]) if isinstance(value, dict)]
    else:
        trend_note = f"you may not read the runs of {REHEARSAL_DAG_ID}, so its trend is not shown"
    page = report_view.build_migrations_page(MIGRATION_DAG_ID, summaries, trend, trend_note)
    return HTMLResponse(report_view.render_migrations_page(page))
