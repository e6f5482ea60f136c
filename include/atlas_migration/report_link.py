"""The "Migration report" extra link on the ``validate`` task: a button in the task's UI that opens the run's
report page (``report_app``, mounted by ``plugins/migration_report.py``).

Airflow 3 computes an extra link in the worker when the task ends and keeps it as an XCom, so the link is
there for a failed validation too (the page then shows the mismatches). TaskFlow tasks share one operator
class, so the link is set on the ``validate`` task itself (``flow``), not declared for a class by a plugin.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperatorLink

from atlas_migration.report_view import run_page_path


def report_url(dag_id: str, run_id: str, base_url: str = "") -> str:
    """The report page of a run: under the api-server's ``[api] base_url`` when one is set, else a path on
    the same origin as the UI."""
    return base_url.rstrip("/") + run_page_path(dag_id, run_id)


class MigrationReportLink(BaseOperatorLink):
    """Opens the run's migration report."""

    name = "Migration report"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        from airflow.configuration import conf

        return report_url(ti_key.dag_id, ti_key.run_id, conf.get("api", "base_url", fallback="") or "")
