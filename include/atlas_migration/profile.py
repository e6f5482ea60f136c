"""``SourceProfile``: everything the router and the engines need to know about a source deployment.

Small and JSON-serialisable (it travels through XCom). A fact that could not be read is ``None`` and its
reason is recorded in ``unknown`` (restricted users and managed services refuse some commands; inspection
records that instead of failing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

TOPOLOGIES = ("standalone", "replica_set", "sharded", "unknown")
MANAGERS = ("cloud_manager", "ops_manager")
HOSTINGS = ("atlas_shared_tier", "compose", "aws", "other")


@dataclass
class CollectionInfo:
    """One namespace of the source inventory."""

    db: str
    name: str
    type: str  # collection | capped | view | timeseries
    documents: int | None = None  # estimated (metadata) count; validation uses exact counts
    size_bytes: int | None = None
    indexes: list[dict[str, Any]] = field(default_factory=list)  # relaxed Extended JSON
    options: dict[str, Any] = field(default_factory=dict)  # relaxed Extended JSON

    @property
    def namespace(self) -> str:
        return f"{self.db}.{self.name}"


@dataclass
class SourceProfile:
    conn_id: str
    hosts: list[str]
    version: str | None = None
    fcv: str | None = None
    topology: str = "unknown"
    set_name: str | None = None
    members: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    oplog_readable: bool | None = None
    oplog_window_hours: float | None = None
    managed_by: str | None = None  # cloud_manager | ops_manager | None (not managed)
    hosting: str | None = None  # atlas_shared_tier | compose | aws | other | None (unknown)
    hosting_evidence: str = ""
    collections: list[CollectionInfo] = field(default_factory=list)
    unknown: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    inspected_at: str = ""
    # Namespaces the driver (pymongo) refuses to address: {"db", "collection" (None: the whole database,
    # whose collections cannot even be listed), "reason"}. Planning refuses the selected ones by name.
    refused_names: list[dict[str, Any]] = field(default_factory=list)

    @property
    def version_tuple(self) -> tuple[int, ...] | None:
        return parse_version(self.version)

    @property
    def total_documents(self) -> int:
        return sum(c.documents or 0 for c in self.collections if c.type != "view")

    @property
    def total_bytes(self) -> int:
        return sum(c.size_bytes or 0 for c in self.collections if c.type != "view")

    @property
    def databases(self) -> list[str]:
        return sorted({c.db for c in self.collections})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SourceProfile:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["collections"] = [CollectionInfo(**c) for c in data.get("collections", [])]
        return cls(**values)

    def summary_lines(self) -> list[str]:
        """What an operator wants to read first, one fact per line."""

        def show(name: str, value: Any) -> str:
            if value is None and name in self.unknown:
                return f"unknown ({self.unknown[name]})"
            return "n/a" if value is None else str(value)

        window = None if self.oplog_window_hours is None else f"{self.oplog_window_hours:.1f} h"
        lines = [
            f"source connection : {self.conn_id} ({', '.join(self.hosts)})",
            f"version / FCV     : {show('version', self.version)} / {show('fcv', self.fcv)}",
            f"topology          : {self.topology}"
            + (f" (set {self.set_name}, {len(self.members)} members)" if self.set_name else "")
            + (f" ({len(self.shards)} shards)" if self.shards else ""),
            f"oplog readable    : {show('oplog_readable', self.oplog_readable)}; window {show('oplog_window_hours', window)}",
            f"managed by        : {self.managed_by or 'not managed (Cloud Manager / Ops Manager not declared)'}",
            f"hosting           : {show('hosting', self.hosting)}"
            + (f" [{self.hosting_evidence}]" if self.hosting_evidence else ""),
            f"inventory         : {len(self.databases)} databases, {len(self.collections)} namespaces, "
            f"~{self.total_documents:,} documents, {self.total_bytes / 1e6:,.1f} MB",
        ]
        lines += [f"note              : {n}" for n in self.notes]
        lines += [f"name refused      : {describe_refused(r)}" for r in self.refused_names]
        return lines


def describe_refused(entry: dict[str, Any]) -> str:
    """``database 'bad db' (why)`` or ``namespace 'db.a/../x' (why)``."""
    if entry.get("collection") is None:
        return f"database {entry['db']!r} ({entry['reason']})"
    return f"namespace {entry['db'] + '.' + entry['collection']!r} ({entry['reason']})"


def parse_version(version: str | None) -> tuple[int, ...] | None:
    """``"7.0.13-ent"`` -> ``(7, 0, 13)``; None when absent or unparseable."""
    if not version:
        return None
    parts: list[int] = []
    for piece in version.split("-", 1)[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) if parts else None
