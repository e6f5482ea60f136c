"""atlas_migration: inspect a MongoDB deployment, choose MongoDB's recommended import strategy, move the
data into MongoDB Atlas and prove it arrived.

The pure core (no I/O of its own; plain functions on plain data):
- ``profile``: the ``SourceProfile`` dataclasses (what we know about a source, JSON-safe for XCom).
- ``routing``: ``choose_strategy``, the pure decision table from MongoDB's guidance.
- ``params``: the DAG's parameters, parsed and checked into ``MigrationParams``.
- ``namespaces``: ``--nsInclude``/``--nsExclude`` pattern matching and what is never migrated.
- ``planning``: the ``CopyPlan`` of namespaces to move.
- ``validation``: per-namespace comparison and the JSON/Markdown report.

At the edges, in the shape of Airflow's provider packages:
- ``hooks/``: the source and target deployments (``mongo``), the Atlas Admin and Cloud Manager APIs
  (``atlas``), mongosync's REST API (``mongosync``).
- ``triggers/``: waits that run in the triggerer (an Atlas live migration, mongosync's progress).
- ``engines/``: what moves the data (dump/restore layouts, the native live sync, mongosync's steps, files).
- ``strategies/``: one module per task group (live push, live pull, mongorestore, Compose, AWS replica set,
  file import), each with its own params.
- ``inspection`` / ``target_inspection``: read the source and the target into profiles.
- ``dag_params``: the trigger form (every ``Param``: the core's and each strategy's).
- ``tasks``: the Airflow task bodies the DAG calls; ``flow``: the task graph both DAGs share.

The pure core (profile, routing, planning, namespaces, params, validation, errors, redaction) imports
no hook, trigger, strategy, task or engine module, and no module imports itself back through a circle
(``tests/test_import_graph.py``).
"""

__version__ = "0.1.0"
