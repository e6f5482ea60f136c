"""Airflow hooks: how this package reaches the services a migration talks to.

- ``mongo``: ``MongoEndpoint`` and ``endpoint_from_connection``, a source or target deployment read from a
  Mongo provider ``mongo`` connection.
- ``atlas``: ``AtlasAdminHook`` (Atlas Administration API v2) and ``CloudManagerHook`` (Cloud Manager /
  Ops Manager API), for the live migration (push) and the AWS network preparation.
- ``mongosync``: ``MongosyncHook``, the REST API of a standalone mongosync.

Hooks do I/O only; what to do with what they return is decided in the pure core, the engines and the
strategies.
"""
