"""Registers the migration's custom deadline reference (``atlas_migration.deadlines.RunParamHours``).

Airflow resolves a DAG's custom deadline reference through the plugins that declare it, in the scheduler
(when it creates a run and records its deadlines) and wherever the serialized DAG is read back; a DAG
whose reference no plugin declares fails to load. Importing ``atlas_migration.deadlines`` is cheap: it
pulls in the Task SDK's deadline classes and nothing of the migration's I/O.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from atlas_migration.deadlines import RunParamHours


class MigrationDeadlinesPlugin(AirflowPlugin):
    """``max_run_hours`` and the live push's cutover window, as deadline alerts (``atlas_migration.deadlines``)."""

    name = "migration_deadlines"
    deadline_references = [RunParamHours]
