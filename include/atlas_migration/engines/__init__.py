"""Engines: what moves the data, called by the strategies' tasks.

Live sync: ``live`` (the native engine: initial copy, change-stream catch-up, verifier) and ``mongosync``
(the pull's decisions around mongosync's REST calls: start, commit behind the fence). Files:
``file_import`` (JSON / CSV / TSV parsing and loading).

Dump/restore, through a mongodump-layout directory:

- ``dump_layout``: the on-disk layout mongodump writes (``<root>/<db>/<coll>.bson[.gz]`` and
  ``<coll>.metadata.json[.gz]``), read and written with plain file I/O.
- ``native``: a built-in engine streaming raw BSON with pymongo, used when the Database Tools are absent.
- ``mongotools``: argv builders and a runner for mongodump/mongorestore when they are on ``PATH``.

Both engines read and write the same layout, so a dump made by one can be restored by the other (except
time-series collections, see ``native``).
"""
