"""Mapped task lists that Airflow accepts: batches within the worker's ``[core] max_map_length``.

Airflow fails a task whose return value maps more than ``max_map_length`` items (1,024 by default), and
it fails it after the task body ran: for the live pull that is after the start point was recorded and
the target prepared. Every task that returns a list for ``.expand`` returns ``batches_for_mapping(...)``
instead, so a 2,000-collection restore or a pull planned into 5,000 partitions maps at most
``max_map_length`` task instances, each working through its share. Read at task run time, never at parse.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

from atlas_migration.planning import DEFAULT_MAX_MAP_LENGTH, map_batches

T = TypeVar("T")
log = logging.getLogger("atlas_migration")


def max_map_length() -> int:
    """This worker's ``[core] max_map_length`` (Airflow checks the returned list against the same setting)."""
    from airflow.configuration import conf

    return conf.getint("core", "max_map_length", fallback=DEFAULT_MAX_MAP_LENGTH)


def batches_for_mapping(items: Sequence[T], what: str) -> list[list[T]]:
    """``items`` as at most ``max_map_length`` batches; says so in the log when a batch holds more than one."""
    limit = max_map_length()
    batches = map_batches(items, limit)
    if len(items) > limit:
        log.info("%d %s exceed Airflow's max_map_length (%d): %d mapped task instances of %d-%d %s each",
                 len(items), what, limit, len(batches), min(map(len, batches)), max(map(len, batches)), what)
    return batches


def flatten_batches(pulled: object) -> list:
    """The results of a batched mapped task, pulled from XCom (one list per task instance), as one list."""
    if not pulled:
        return []
    if not isinstance(pulled, list):
        pulled = [pulled]
    flat: list = []
    for entry in pulled:
        if isinstance(entry, list):
            flat += [r for r in entry if r]
        elif entry:
            flat.append(entry)
    return flat
