"""One module per import strategy, each building its task group of the ``mongo_to_atlas`` DAG and declaring
its own params:

- ``live_push``: live migration (push) through the Atlas Admin API, for Cloud / Ops Manager managed sources.
- ``live_pull``: live migration (pull), native engine or mongosync.
- ``mongorestore``: dump and restore, per collection, views last.
- ``compose``: a Compose "single shard" sharded cluster (pull through mongos, or dump and restore).
- ``aws_replica_set``: network preparation on AWS with boto3, then the pull.
- ``file_import``: JSON / CSV / TSV files into the target.

Strategies wire tasks; their task bodies call the engines, the hooks and ``atlas_migration.tasks``. The pure
core (profile, routing, planning, namespaces, params, validation) imports none of them.
"""
