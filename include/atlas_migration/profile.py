"""``SourceProfile``: everything the router and the engines need to know about a source deployment.

Small and JSON-serialisable (it travels through XCom). A fact that could not be read is ``None`` and its
reason is recorded in ``unknown`` (restricted users and managed services refuse some commands; inspection
records that instead of failing).

A sharded source has no oplog of its own: every shard (a replica set) keeps its own, and a live migration
must read every one of them before any drops the writes it still needs. So its window is the SMALLEST of the
shards' windows, each measured on the shard (mongosync and Atlas live migration size the oplog per shard the
same way). ``parse_shard_host``, ``smallest_shard_window`` and ``apply_shard_windows`` are the pure part of
that: inspection measures, these decide, and tests build sharded profiles through the same code.
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
class ShardOplog:
    """One shard of a sharded source: its ``listShards`` name and hosts, and its oplog window as measured on
    the shard's own replica set (``window_hours``), or why it could not be measured (``reason``)."""

    name: str
    hosts: list[str]
    replica_set: str | None = None  # None: listShards gave no "<set>/" prefix (not a replica set)
    window_hours: float | None = None
    reason: str = ""
    since_initiation: bool = False  # the oldest entry is the set's initiation: the span is an age, not a window

    def describe(self) -> str:
        where = f"{self.replica_set}/{','.join(self.hosts)}" if self.replica_set else ",".join(self.hosts)
        window = f"{self.window_hours:.1f} h" if self.window_hours is not None else f"unknown ({self.reason})"
        if self.since_initiation:
            window += " (nothing dropped since the replica set was initiated)"
        return f"{self.name} [{where}]: {window}"


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
    # Sharded sources: each shard's oplog window (``oplog_window_hours`` is the smallest), the balancer
    # (``{"mode": "full"|"off", "in_balancer_round": bool}``) and the shard keys of sharded collections
    # (``{"namespace", "key", "unique"}``, key in relaxed Extended JSON), when readable.
    shard_oplogs: list[ShardOplog] = field(default_factory=list)
    balancer: dict[str, Any] | None = None
    shard_keys: list[dict[str, Any]] = field(default_factory=list)
    oplog_readable: bool | None = None
    oplog_window_hours: float | None = None
    # True when the oplog still holds the replica set's initiation entry (for a sharded source: every shard's
    # does): nothing was ever dropped, so ``oplog_window_hours`` is the oplog's age, not yet its window.
    oplog_since_initiation: bool | None = None
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
        values["shard_oplogs"] = [ShardOplog(**s) for s in data.get("shard_oplogs", [])]
        return cls(**values)

    def summary_lines(self) -> list[str]:
        """What an operator wants to read first, one fact per line."""

        def show(name: str, value: Any) -> str:
            if value is None and name in self.unknown:
                return f"unknown ({self.unknown[name]})"
            return "n/a" if value is None else str(value)

        window = None if self.oplog_window_hours is None else f"{self.oplog_window_hours:.1f} h"
        if window and self.oplog_since_initiation:
            window += " (its age: nothing dropped since the replica set was initiated)"
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
        lines += [f"shard oplog       : {shard.describe()}" for shard in self.shard_oplogs]
        if self.balancer is not None or "balancer" in self.unknown:
            lines.append(f"balancer          : {show('balancer', self.balancer and describe_balancer(self.balancer))}")
        if self.shard_keys:
            lines.append("shard keys        : " + "; ".join(f"{k['namespace']} {k['key']}" for k in self.shard_keys))
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


def describe_balancer(balancer: dict[str, Any]) -> str:
    """``full`` / ``off``, plus whether a balancing round (chunk migration) is under way."""
    return f"{balancer.get('mode', '?')}{' (in a balancing round)' if balancer.get('in_balancer_round') else ''}"


# ---------------------------------------------------------------- sharded sources (pure)


def parse_shard_host(host: str) -> tuple[str | None, list[str]]:
    """A ``listShards`` ``host`` string -> (replica-set name, ["host:port", ...]).

    ``"rs0/h1:27018,h2:27018"`` is a replica-set shard; ``"h1:27018"`` (no prefix) a shard that is not a
    replica set (MongoDB 3.6+ refuses those, but old metadata may hold one). Raises ``ValueError`` naming
    what is wrong: a string without hosts, an empty set name or host, more than one ``/``."""
    text = (host or "").strip()
    if not text:
        raise ValueError("the shard's host string is empty")
    set_name: str | None = None
    if "/" in text:
        set_name, _, text = text.partition("/")
        set_name = set_name.strip()
        if not set_name:
            raise ValueError(f"shard host string {host!r} has an empty replica-set name before '/'")
        if "/" in text:
            raise ValueError(f"shard host string {host!r} has more than one '/'")
    hosts = [h.strip() for h in text.split(",")]
    if not text.strip() or any(not h for h in hosts):
        raise ValueError(f"shard host string {host!r} names an empty host")
    return set_name, hosts


def smallest_shard_window(shards: list[ShardOplog]) -> tuple[float | None, str]:
    """The sharded source's oplog window and why: (the smallest shard window, "decided by shard X") or
    (None, the reason naming every shard whose window is unknown). One unknown shard leaves the whole window
    unknown: guessing from the others could let that shard's oplog roll over during the copy. A shard whose
    oplog has dropped nothing since its set was initiated decides only when every shard's has: its span is
    its age, and another shard's full oplog is the real bound."""
    if not shards:
        return None, "listShards returned no shards"
    unknown = [s for s in shards if s.window_hours is None]
    if unknown:
        return None, "; ".join(f"shard {s.name}: {s.reason or 'window not measured'}" for s in unknown)
    bounded = [s for s in shards if not s.since_initiation]
    smallest = min(bounded or shards, key=lambda s: (s.window_hours, s.name))
    others = len(shards) - 1
    why = (f"the smallest of {len(shards)} shard oplog windows, shard {smallest.name}"
           if others else f"the oplog window of the only shard, {smallest.name}")
    if bounded and len(bounded) < len(shards):
        young = ", ".join(s.name for s in shards if s.since_initiation)
        why += f" (not counting {young}, whose oplog has dropped nothing since its set was initiated)"
    return smallest.window_hours, why


def apply_shard_windows(profile: SourceProfile, shards: list[ShardOplog]) -> None:
    """Record each shard's window in ``profile`` and set ``oplog_window_hours`` to the smallest (with a note
    naming the shard that decided), or leave it unknown with the reason naming the unreadable shard(s)."""
    profile.shard_oplogs = list(shards)
    profile.shards = [s.name for s in shards]
    window, why = smallest_shard_window(shards)
    profile.oplog_window_hours = window
    profile.oplog_since_initiation = bool(shards) and all(s.since_initiation for s in shards)
    if window is None:
        profile.unknown["oplog_window_hours"] = f"not every shard's oplog window could be read: {why}"
    else:
        profile.unknown.pop("oplog_window_hours", None)
        profile.notes.append(f"oplog window {window:.1f} h: {why}")
