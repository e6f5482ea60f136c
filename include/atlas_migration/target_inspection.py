"""What the Atlas target can take: its version, topology and tier, read into a ``TargetProfile``.

Facts come from the target server (``buildInfo``, ``hello``) and its tier from, in order: the Atlas Admin API
(``GET /api/atlas/v2/groups/{groupId}/clusters/{clusterName}``) when the run names an Atlas connection that
exists and a ``target_cluster_name``; else the target connection's ``migration`` extra
(``{"tier": "FLEX"}``, ``"M0"``, ``"M10"``, ``"SERVERLESS"``...).

The rules live in the pure core, ``routing.target_problems``, which reads the ``TargetProfile`` built here
(routing imports nothing from this module): a shared tier (M0, M2, M5), Flex or serverless target takes data
only through self-managed tools (mongorestore, file import): every live strategy is refused with that
reason, and ``auto`` routes to mongorestore. A target older than the source (major.minor), or one below the
version a live path needs (push: 6.0.17+/7.0.13+; pull and mongosync: 6.0+), is refused for live strategies
the same way.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any

log = logging.getLogger("atlas_migration")
SHARED_TIERS = ("M0", "M2", "M5")


@dataclass
class TargetProfile:
    conn_id: str
    version: str | None = None
    topology: str = "unknown"
    tier: str | None = None  # M0, M10, FLEX, SERVERLESS...
    tier_source: str = ""  # atlas_api | declared | ""
    unknown: dict[str, str] = field(default_factory=dict)

    @property
    def tier_kind(self) -> str | None:
        return tier_kind(self.tier)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TargetProfile | None:
        if not data:
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def summary(self) -> str:
        tier = f"{self.tier} ({self.tier_source})" if self.tier else "unknown tier"
        return f"target {self.conn_id}: MongoDB {self.version or 'unknown'}, {self.topology}, {tier}"


def tier_kind(tier: str | None) -> str | None:
    """shared | flex | serverless | dedicated | None (unknown)."""
    if not tier:
        return None
    value = tier.strip().upper()
    if value in SHARED_TIERS or value in ("TENANT", "SHARED"):
        return "shared"
    if value == "FLEX":
        return "flex"
    if value == "SERVERLESS":
        return "serverless"
    return "dedicated"


def tier_from_cluster(cluster: dict[str, Any]) -> str | None:
    """The tier a cluster description names: ``providerName`` FLEX / SERVERLESS / TENANT (with the backing
    instance size M0/M2/M5), else the electable instance size (M10...)."""
    for spec in cluster.get("replicationSpecs") or []:
        for region in spec.get("regionConfigs") or []:
            provider = str(region.get("providerName") or "").upper()
            size = (region.get("electableSpecs") or {}).get("instanceSize")
            if provider in ("FLEX", "SERVERLESS"):
                return provider
            if provider == "TENANT":
                return str(size or "TENANT").upper()
            if size:
                return str(size).upper()
    return None


def inspect_target(client, conn_id: str, facts: dict[str, Any], cluster: dict[str, Any] | None = None,
                   cluster_error: str | None = None) -> TargetProfile:
    from pymongo.errors import PyMongoError

    profile = TargetProfile(conn_id)
    try:
        profile.version = client.admin.command("buildInfo").get("version")
    except PyMongoError as exc:
        profile.unknown["version"] = f"buildInfo refused: {type(exc).__name__}"
    try:
        hello = client.admin.command("hello")
        profile.topology = ("sharded" if hello.get("msg") == "isdbgrid" else
                            "replica_set" if hello.get("setName") else "standalone")
    except PyMongoError as exc:
        profile.unknown["topology"] = f"hello refused: {type(exc).__name__}"
    if cluster is not None:
        profile.tier, profile.tier_source = tier_from_cluster(cluster), "atlas_api"
        if not profile.version and cluster.get("mongoDBVersion"):
            profile.version = cluster["mongoDBVersion"]
    elif facts.get("tier"):
        profile.tier, profile.tier_source = str(facts["tier"]).upper(), "declared"
    else:
        profile.unknown["tier"] = cluster_error or "no Atlas connection/cluster name and no migration.tier extra"
    return profile
