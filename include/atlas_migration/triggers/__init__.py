"""Triggers, and the deferrable operators that hand work to them, for waits that should not hold a worker.

- ``live_migration``: ``LiveMigrationTrigger`` / ``WaitForLiveMigrationOperator``, watching an Atlas live
  migration (push) through the Admin API, riding out API outages.
- ``mongosync``: ``MongosyncProgressTrigger`` / ``MongosyncWaitOperator``, polling mongosync's ``/progress``.

Triggers run in the triggerer, away from the DAG folder: each is imported by the classpath it serializes.
"""
