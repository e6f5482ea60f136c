"""Airflow plugin: the migration report in the UI, served by the api-server from the metadata DB.

It mounts the report app (``atlas_migration.report_app``, a FastAPI app) at ``/migration-report`` and adds a
"Migration report" tab on every DAG run page (Airflow 3.3 offers no per-DAG filter: other DAGs' runs show a
page saying there is no migration report) and a "Migrations" nav entry. Pages and their authentication are
described in ``atlas_migration.report_app``.

Every Airflow process loads ``plugins/`` (each task process too, for macros and listeners), and only the
api-server serves the pages: so this module imports nothing heavy, and the app is built on its first
request (``LazyReportApp``).
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin

from atlas_migration.report_view import URL_PREFIX  # plain data and functions: cheap to import


class LazyReportApp:
    """An ASGI app that imports and builds the report app on its first request (see the module docstring)."""

    def __init__(self) -> None:
        self._app: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self._app is None:
            from atlas_migration.report_app import app

            self._app = app
        await self._app(scope, receive, send)


class MigrationReportPlugin(AirflowPlugin):
    """Registers the report app and its entries in the UI."""

    name = "migration_report"
    fastapi_apps = [{"app": LazyReportApp(), "url_prefix": URL_PREFIX, "name": "Migration report"}]
    external_views = [
        {
            "name": "Migration report",
            # Relative (no leading slash): the UI resolves it against its own base URL.
            "href": URL_PREFIX.lstrip("/") + "/runs/{DAG_ID}/{RUN_ID}",
            "destination": "dag_run",
            "url_route": "migration_report",
        },
        {
            "name": "Migrations",
            "href": URL_PREFIX.lstrip("/") + "/migrations",
            "destination": "nav",
            "category": "browse",
            "url_route": "migrations",
        },
    ]
