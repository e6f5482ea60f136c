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


def batches_for_mapping(items: Sequence[T], what: str, max_parallel: int = 0) -> list[list[T]]:
    """``items`` as at most ``max_map_length`` batches, and at most ``max_parallel`` when that is set (the run's
    ``max_parallel_copies``; 0: no bound of its own); says so in the log when a batch holds more than one.

    Fewer mapped task instances is how a run bounds its load on the source whatever the fleet of workers:
    a task instance works through its batch one item at a time, so no more than ``max_parallel`` copies
    read at once. (``max_active_tis_per_dagrun`` and pools are fixed when the DAG is parsed; this is a
    per-run choice.)
    """
    limit = max_map_length()
    bound = min(limit, max_parallel) if max_parallel > 0 else limit
    batches = map_batches(items, bound)
    if len(items) > bound:
        why = (f"max_parallel_copies={max_parallel}" if bound < limit
               else f"Airflow's max_map_length ({limit})")
        log.info("%d %s exceed %s: %d mapped task instances of %d-%d %s each",
                 len(items), what, why, len(batches), min(map(len, batches)), max(map(len, batches)), what)
    return batches


def max_parallel_copies(params: dict) -> int:
    """The run's ``max_parallel_copies`` param, checked (0 when absent: no bound)."""
    from atlas_migration.params import MigrationParams

    return MigrationParams.parse(params).max_parallel_copies


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
