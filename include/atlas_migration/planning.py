"""``CopyPlan``: which namespaces a run moves, in which order, and whether the target can take them.

Pure functions over the ``SourceProfile``, apart from ``find_occupied_targets`` which reads the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TypeVar

from atlas_migration.errors import ConfigurationError, TargetNotEmpty
from atlas_migration.namespaces import NamespaceFilter
from atlas_migration.profile import SourceProfile, describe_refused

T = TypeVar("T")

# Airflow's default [core] max_map_length: a task whose return value maps more items fails after it ran.
DEFAULT_MAX_MAP_LENGTH = 1024


@dataclass(frozen=True)
class NamespaceItem:
    """One unit of copy work (a mapped task)."""

    db: str
    collection: str
    type: str
    documents: int = 0
    size_bytes: int = 0
    target_db: str = ""

    @property
    def namespace(self) -> str:
        return f"{self.db}.{self.collection}"

    @property
    def target_namespace(self) -> str:
        return f"{self.target_db or self.db}.{self.collection}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CopyPlan:
    collections: list[NamespaceItem] = field(default_factory=list)  # largest first: long tasks start early
    views: list[NamespaceItem] = field(default_factory=list)  # created after every collection
    skipped: list[str] = field(default_factory=list)

    @property
    def all_items(self) -> list[NamespaceItem]:
        return [*self.collections, *self.views]

    def describe(self) -> list[str]:
        docs = sum(i.documents for i in self.collections)
        size = sum(i.size_bytes for i in self.collections)
        lines = [f"{len(self.collections)} collections (~{docs:,} documents, {size / 1e6:,.1f} MB) and "
                 f"{len(self.views)} views to migrate"]
        lines += [f"  {i.namespace} [{i.type}] ~{i.documents:,} docs"
                  + (f" -> {i.target_namespace}" if i.target_db else "") for i in self.all_items]
        if self.skipped:
            lines.append(f"  not selected: {', '.join(self.skipped)}")
        return lines


def build_copy_plan(profile: SourceProfile, selection: NamespaceFilter, target_db_prefix: str = "") -> CopyPlan:
    """Select namespaces from the inventory. An include pattern matching nothing is an error (a typo would
    otherwise silently migrate nothing)."""
    refuse_driver_refused_names(profile, selection)
    names = [c.namespace for c in profile.collections]
    if missing := selection.unmatched_includes(names):
        raise ConfigurationError(
            f"include pattern(s) {', '.join(repr(p) for p in missing)} match no namespace of source "
            f"'{profile.conn_id}' (it has: {', '.join(names[:20]) or 'none'}{' ...' if len(names) > 20 else ''})"
        )
    plan = CopyPlan()
    plan.skipped += [describe_refused(r) for r in profile.refused_names]
    for info in profile.collections:
        if not selection.matches(info.db, info.name):
            plan.skipped.append(info.namespace)
            continue
        item = NamespaceItem(info.db, info.name, info.type, info.documents or 0, info.size_bytes or 0,
                             f"{target_db_prefix}{info.db}" if target_db_prefix else "")
        (plan.views if info.type == "view" else plan.collections).append(item)
    plan.collections.sort(key=lambda i: (-i.size_bytes, -i.documents, i.namespace))
    if not plan.collections and not plan.views:
        raise ConfigurationError(f"nothing to migrate: no namespace of source '{profile.conn_id}' is selected")
    return plan


def refuse_driver_refused_names(profile: SourceProfile, selection: NamespaceFilter) -> None:
    """Refuse, by name and reason, every selected namespace whose name the driver refuses (before anything is
    written); the excluded ones are left out of the plan."""
    selected = [r for r in profile.refused_names
                if (selection.may_select_database(r["db"]) if r.get("collection") is None
                    else selection.matches(r["db"], r["collection"]))]
    if not selected:
        return
    hints = [f"{r['db']}.*" if r.get("collection") is None else f"{r['db']}.{r['collection']}" for r in selected]
    raise ConfigurationError(
        f"{len(selected)} namespace(s) of source '{profile.conn_id}' have names the MongoDB driver (pymongo) refuses, "
        "so no strategy can read or write them:\n" + "\n".join(f"  - {describe_refused(r)}" for r in selected)
        + "\nNothing was written. Rename them on the source, or exclude them with exclude_namespaces: "
        + ", ".join(repr(h) for h in hints))


def find_occupied_targets(target_client, items: list[NamespaceItem]) -> list[str]:
    """Target namespaces that already exist with data (or as a view), which a restore would overwrite."""
    occupied: list[str] = []
    by_db: dict[str, list[NamespaceItem]] = {}
    for item in items:
        by_db.setdefault(item.target_db or item.db, []).append(item)
    for db_name, db_items in sorted(by_db.items()):
        db = target_client[db_name]
        existing = {c["name"]: c.get("type", "collection") for c in db.list_collections()}
        for item in db_items:
            kind = existing.get(item.collection)
            if kind is None:
                continue
            if kind == "view" or db[item.collection].find_one({}, {"_id": 1}) is not None:
                occupied.append(item.target_namespace)
    return occupied


def refuse_occupied_targets(occupied: list[str], target_conn_id: str) -> None:
    """Refuse a target that holds data, saying what to do next: most often an earlier run of this DAG wrote
    it and failed part-way (a source, target or worker killed mid-copy)."""
    if occupied:
        raise TargetNotEmpty(
            f"{len(occupied)} target namespace(s) on '{target_conn_id}' already hold data: {', '.join(occupied)}. "
            "Nothing was written by this run. If an earlier run wrote them and failed part-way (a server or "
            "worker killed mid-copy), either clear and retry that run's failed task within the same run "
            "(Airflow UI: the failed run > the failed task > Clear, with downstream tasks; the live pull resumes "
            "from the checkpoints it keeps on the target and a mongorestore task replaces its own collection), or "
            "start a new run with drop_target=true, which replaces exactly these namespaces. To keep them as they "
            "are, exclude them with exclude_namespaces."
        )


def map_batches(items: Sequence[T], limit: int = DEFAULT_MAX_MAP_LENGTH) -> list[list[T]]:
    """Cut ``items`` into at most ``limit`` batches, one mapped task instance each.

    Up to ``limit`` items, each batch holds one item (one task per collection, partition or byte range, as the
    UI shows them). Beyond it, items are dealt round-robin: the lists arrive largest first, so every batch
    gets a share of the large and the small ones and no single task instance holds all the big collections.
    A batch's items keep their relative order; every item is in exactly one batch.
    """
    if limit < 1:
        raise ConfigurationError(f"max_map_length must be at least 1, not {limit}")
    count = min(len(items), limit)
    batches: list[list[T]] = [[] for _ in range(count)]
    for i, item in enumerate(items):
        batches[i % count].append(item)
    return batches
