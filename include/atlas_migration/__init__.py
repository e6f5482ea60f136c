"""atlas_migration: inspect a MongoDB deployment, choose MongoDB's recommended import strategy, move the
data into MongoDB Atlas and prove it arrived.

Modules, one per concern:
- ``profile``: the ``SourceProfile`` dataclasses (what we know about a source, JSON-safe for XCom).
- ``inspection``: reads a live deployment into a ``SourceProfile``.
- ``routing``: ``choose_strategy``, the pure decision table from MongoDB's guidance.
- ``params``: the DAG's parameters, parsed and checked into ``MigrationParams``.
- ``dag_params``: the trigger form (every ``Param``: the core's and each strategy's).
- ``namespaces``: ``--nsInclude``/``--nsExclude`` pattern matching and what is never migrated.
- ``hooks``: connections to the source and target (the Mongo provider's ``mongo`` connection type).
- ``planning``: the ``CopyPlan`` of namespaces to move.
- ``engines``: dump/restore engines (MongoDB Database Tools, and a built-in raw-BSON engine).
- ``staging``: optional S3 staging of dumps.
- ``validation``: per-namespace comparison and the JSON/Markdown report.
- ``tasks``: the Airflow task bodies the DAG calls.
- ``flow``: the task graph both DAGs share.

The pure core (profile, routing, planning, namespaces, params, validation, errors, redaction) imports
no hook, trigger, strategy, task or engine module, and no module imports itself back through a circle
(``tests/test_import_graph.py``).
"""

__version__ = "0.1.0"
