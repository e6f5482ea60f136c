"""Dump/restore engines: move collections through a mongodump-layout directory.

- ``dump_layout``: the on-disk layout mongodump writes (``<root>/<db>/<coll>.bson[.gz]`` and
  ``<coll>.metadata.json[.gz]``), read and written with plain file I/O.
- ``native``: a built-in engine streaming raw BSON with pymongo, used when the Database Tools are absent.
- ``mongotools``: argv builders and a runner for mongodump/mongorestore when they are on ``PATH``.

Both engines read and write the same layout, so a dump made by one can be restored by the other (except
time-series collections, see ``native``).
"""
