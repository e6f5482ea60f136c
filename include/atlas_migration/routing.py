"""``choose_strategy``: MongoDB's guidance for importing into Atlas, as a pure function.

The table (from "Migrate or Import Data" in the Atlas docs), checked in this order:

| rule | source | strategy |
|---|---|---|
| shared_tier | Atlas shared / multi-tenant tier (M0, Flex, M2/M5): no oplog access | mongorestore |
| unsupported_version | a release series MongoDB no longer supports for migration (before 4.4, rapid releases) | mongorestore |
| compose | a Compose "single shard" sharded cluster | compose |
| cloud_manager | monitored by Cloud Manager, 6.0.17+ / 7.0.13+, replica set or sharded | live_push |
| no_oplog | standalone, or the oplog / change streams cannot be read (or could not be verified) | mongorestore |
| below_live_minimum | a supported series below the live-pull patch minimum (4.4.29, 5.0.29, 6.0.24, 7.0.18, 8.0.5) | mongorestore |
| aws_replica_set | a replica set running on AWS | aws_replica_set |
| default | not managed, oplog readable | live_pull |

Before the table: a run that names files (``source_files``) is a file import (rule ``source_files``). After
it: a live choice that the target cannot receive (``target_problems``, on the facts ``target_inspection``
gathers: an Atlas shared, Flex or serverless tier, a target older than the source, or below a live path's
version) becomes mongorestore (rule ``target_restricted``), and a forced live strategy is refused with the
reason. This module is part of the pure core: it imports no module that talks to a server.

Ops Manager push is deprecated for sources on 5.0 and earlier and not supported on 6.0+, and Cloud Manager
push needs 6.0.17+/7.0.13+: such sources fall through to the pull rules, and the decision says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Protocol

from atlas_migration.errors import ImpossibleStrategy, StrategyNotAvailable
from atlas_migration.profile import SourceProfile, parse_version


class Strategy(StrEnum):
    MONGORESTORE = "mongorestore"
    LIVE_PULL = "live_pull"
    LIVE_PUSH = "live_push"
    COMPOSE = "compose"
    AWS_REPLICA_SET = "aws_replica_set"
    FILE_IMPORT = "file_import"


AUTO = "auto"
# Oldest patch per release series that mongosync (and so Atlas live migration) accepts as a source.
LIVE_MIGRATION_MINIMUMS = {(4, 4): (4, 4, 29), (5, 0): (5, 0, 29), (6, 0): (6, 0, 24), (7, 0): (7, 0, 18), (8, 0): (8, 0, 5)}
# Atlas push live migration: source and destination on 6.0.17+ or 7.0.13+ (and later majors).
PUSH_MINIMUMS = {(6, 0): (6, 0, 17), (7, 0): (7, 0, 13), (8, 0): (8, 0, 0)}
SHORT_OPLOG_WINDOW_HOURS = 24.0


def meets_minimum(version: tuple[int, ...] | None, minimums: dict[tuple[int, int], tuple[int, ...]]) -> bool:
    """True when ``version`` is at or above the minimum of its release series, or of a newer series than
    any listed. Series between listed ones (rapid releases such as 6.1) are not supported."""
    if not version or len(version) < 2:
        return False
    series = version[:2]
    if series in minimums:
        return tuple(version) >= minimums[series]
    return series > max(minimums)


def series_supported(version: tuple[int, ...]) -> bool:
    """A release series live migration accepts at all (some patch of it meets the minimums)."""
    return len(version) >= 2 and (version[:2] in LIVE_MIGRATION_MINIMUMS or version[:2] > max(LIVE_MIGRATION_MINIMUMS))


def _fmt(minimums: dict[tuple[int, int], tuple[int, ...]]) -> str:
    return ", ".join(".".join(map(str, v)) for v in minimums.values())


@dataclass
class RoutingDecision:
    strategy: str
    rule: str
    reasons: list[str]
    warnings: list[str] = field(default_factory=list)
    requested: str = AUTO

    def to_dict(self) -> dict:
        return asdict(self)

    def explain(self) -> str:
        how = "chosen automatically" if self.requested == AUTO else f"requested (strategy={self.requested})"
        lines = [f"strategy: {self.strategy} ({how}; rule '{self.rule}')"]
        lines += [f"  because: {r}" for r in self.reasons]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _oplog_unusable(profile: SourceProfile) -> str | None:
    if profile.topology == "standalone":
        return ("the source is a standalone server, which has no oplog; convert it to a single-node replica "
                "set for a live migration, or use mongorestore")
    if profile.oplog_readable is False:
        reason = profile.unknown.get("oplog_access", "the connection's user cannot read the oplog or open change streams")
        return f"the oplog cannot be read: {reason}"
    if profile.oplog_readable is None:
        reason = profile.unknown.get("oplog_readable", "not checked")
        return f"oplog access could not be verified ({reason})"
    return None


def _auto(profile: SourceProfile) -> tuple[Strategy, str, list[str]]:
    version = profile.version_tuple
    notes: list[str] = []
    if profile.hosting == "atlas_shared_tier":
        return Strategy.MONGORESTORE, "shared_tier", [
            "the source is an Atlas shared / multi-tenant tier (M0, Flex, M2/M5), which gives no oplog access "
            "and restricts commands; mongorestore is the only path"]
    if version is not None and not series_supported(version):
        return Strategy.MONGORESTORE, "unsupported_version", [
            f"MongoDB {profile.version} is a release series that live migration does not support (supported: "
            f"{', '.join('.'.join(map(str, s)) for s in LIVE_MIGRATION_MINIMUMS)} and later); a version that is no "
            "longer supported is imported with mongorestore"]
    if profile.hosting == "compose" and profile.topology == "sharded":
        return Strategy.COMPOSE, "compose", [
            f"the source is a Compose sharded cluster ({len(profile.shards) or 'unknown number of'} shard(s) behind mongos); "
            "MongoDB's 'Migrate from Compose' procedure applies"]
    if profile.managed_by == "cloud_manager":
        if not meets_minimum(version, PUSH_MINIMUMS):
            notes.append(f"monitored by Cloud Manager, but push needs {_fmt(PUSH_MINIMUMS)} or later and the source "
                         f"runs {profile.version or 'an unknown version'}: using the pull rules instead")
        elif profile.topology not in ("replica_set", "sharded"):
            notes.append(f"monitored by Cloud Manager, but push needs a replica set or sharded cluster "
                         f"(topology: {profile.topology}): using the pull rules instead")
        else:
            return Strategy.LIVE_PUSH, "cloud_manager", [
                f"the source is monitored by Cloud Manager and runs {profile.version}: Cloud Manager pushes the data "
                "to Atlas with a link token, with no firewall opening on the source"]
    elif profile.managed_by == "ops_manager":
        notes.append("managed by Ops Manager: push from Ops Manager is deprecated for 5.0 and earlier and not "
                     "supported on 6.0+, so the pull rules apply (or add Cloud Manager monitoring to push)")
    unusable = _oplog_unusable(profile)
    if unusable:
        return Strategy.MONGORESTORE, "no_oplog", [*notes, unusable]
    if version is not None and not meets_minimum(version, LIVE_MIGRATION_MINIMUMS):
        return Strategy.MONGORESTORE, "below_live_minimum", [*notes,
            f"MongoDB {profile.version} is below the live-pull minimum of its series "
            f"({_fmt(LIVE_MIGRATION_MINIMUMS)}): upgrade the source's patch release to migrate live, or import "
            "with mongorestore (chosen)"]
    if profile.hosting == "aws" and profile.topology == "replica_set":
        return Strategy.AWS_REPLICA_SET, "aws_replica_set", [*notes,
            f"the source is a replica set running on AWS ({profile.hosting_evidence or 'declared'}); the network "
            "(VPC peering, routes, security groups, access list) is prepared for the pull: the DAG's workers read the "
            "source and write to Atlas (Atlas connects to nothing)"]
    return Strategy.LIVE_PULL, "default", [*notes,
        f"not managed by Cloud Manager, {profile.topology.replace('_', ' ')} with a readable oplog: the data is "
        "pulled live and the cutover waits until the target has caught up"]


def override_problems(strategy: Strategy, profile: SourceProfile) -> list[str]:
    """Why ``strategy`` cannot work for this source (empty when it can)."""
    version = profile.version_tuple
    problems: list[str] = []
    if strategy in (Strategy.LIVE_PULL, Strategy.AWS_REPLICA_SET, Strategy.LIVE_PUSH):
        if profile.hosting == "atlas_shared_tier":
            problems.append("Atlas shared / multi-tenant tiers give no oplog access")
        if profile.topology == "standalone":
            problems.append("a standalone server has no oplog (convert it to a single-node replica set first)")
        if version is not None and not meets_minimum(version, LIVE_MIGRATION_MINIMUMS):
            problems.append(f"MongoDB {profile.version} is below the live-migration minimums ({_fmt(LIVE_MIGRATION_MINIMUMS)})")
    if strategy in (Strategy.LIVE_PULL, Strategy.AWS_REPLICA_SET) and profile.topology != "standalone":
        unusable = _oplog_unusable(profile)
        if unusable:
            problems.append(unusable)
    if strategy == Strategy.LIVE_PUSH:
        if profile.managed_by != "cloud_manager":
            problems.append("push needs the source monitored by Cloud Manager (declare it with source_managed_by or "
                            "the connection extra migration.managed_by); Ops Manager push is not supported on 6.0+")
        if not meets_minimum(version, PUSH_MINIMUMS):
            problems.append(f"push needs MongoDB {_fmt(PUSH_MINIMUMS)} or later; the source runs {profile.version or 'an unknown version'}")
    if strategy == Strategy.COMPOSE:
        if profile.hosting != "compose":
            problems.append("the source is not a Compose deployment (declare it with source_hosting=compose)")
        if profile.topology != "sharded":
            problems.append(f"the Compose path needs a sharded cluster behind mongos (topology: {profile.topology})")
    if strategy == Strategy.AWS_REPLICA_SET:
        if profile.topology != "replica_set":
            problems.append(f"the AWS path needs a replica set (topology: {profile.topology})")
        if profile.hosting != "aws":
            problems.append("the source was not found on AWS (host names or EC2 lookup); declare source_hosting=aws")
    return problems


def _warnings(strategy: Strategy, profile: SourceProfile) -> list[str]:
    warnings: list[str] = []
    if strategy == Strategy.MONGORESTORE and profile.topology in ("replica_set", "sharded"):
        warnings.append("mongorestore copies a point in time: writes made to the source after the dump starts are "
                        "not migrated; stop application writes first, or use a live migration")
    if (strategy in (Strategy.LIVE_PULL, Strategy.AWS_REPLICA_SET, Strategy.COMPOSE)
            and profile.oplog_window_hours is not None and profile.oplog_window_hours < SHORT_OPLOG_WINDOW_HOURS):
        warnings.append(f"the source oplog window is {profile.oplog_window_hours:.1f} h; if the initial copy takes longer, "
                        "the live sync loses its place: enlarge the oplog first")
    if any(c.type == "timeseries" for c in profile.collections):
        warnings.append("time series collections are copied as measurements and re-bucketed by the target")
    warnings.append("users and roles are not migrated (Atlas manages them); admin, local, config and system.* are skipped")
    return warnings


# What the target can receive (the facts come from ``target_inspection``; the rules are decided here).
RESTRICTED_KINDS = ("shared", "flex", "serverless")
LIVE_STRATEGIES = ("live_pull", "live_push", "compose", "aws_replica_set")
PULL_TARGET_MINIMUM = (6, 0)  # mongosync destination minimum (Atlas pull runs mongosync)
PUSH_TARGET_MINIMUMS = {(6, 0): (6, 0, 17), (7, 0): (7, 0, 13), (8, 0): (8, 0, 0)}


class TargetFacts(Protocol):
    """What routing reads of the target: ``target_inspection.TargetProfile`` has these (routing takes any
    object that does, so that it needs nothing from the module that talks to the target)."""

    version: str | None
    tier: str | None

    @property
    def tier_kind(self) -> str | None: ...


def target_problems(strategy: str, source_version: str | None, target: TargetFacts | None) -> list[str]:
    """Why the target cannot receive ``strategy`` (empty when it can, or when nothing is known)."""
    if target is None or strategy not in LIVE_STRATEGIES:
        return []
    problems: list[str] = []
    kind = target.tier_kind
    if kind in RESTRICTED_KINDS:
        problems.append(f"the target is an Atlas {target.tier} ({kind}) cluster, which takes data only through "
                        "self-managed tools (mongorestore, file import), not live migration")
    t = parse_version(target.version)
    s = parse_version(source_version)
    if t and s and t[:2] < s[:2]:
        problems.append(f"the target runs MongoDB {target.version}, older than the source's {source_version}")
    if t:
        if strategy == "live_push":
            if not meets_minimum(t, PUSH_TARGET_MINIMUMS):
                problems.append(f"the target runs MongoDB {target.version}; live migration (push) needs a target on "
                                "6.0.17+, 7.0.13+ or 8.0+")
        elif t[:2] < PULL_TARGET_MINIMUM:
            problems.append(f"the target runs MongoDB {target.version}; live pull (mongosync) needs a target on 6.0+")
    return problems


def choose_strategy(profile: SourceProfile, requested: str = AUTO,
                    target: TargetFacts | None = None) -> RoutingDecision:
    """Pick the import strategy; an override that cannot work raises ``ImpossibleStrategy``.

    ``target`` (a ``TargetProfile``, optional) adds what the target can take."""
    if requested in (None, "", AUTO):
        strategy, rule, reasons = _auto(profile)
        blocked = target_problems(str(strategy), profile.version, target)
        if blocked:
            reasons = [*reasons, f"but {'; '.join(blocked)}: so mongorestore, which such a target accepts "
                       f"(the source-side rule '{rule}' chose '{strategy}')"]
            strategy, rule = Strategy.MONGORESTORE, "target_restricted"
        return RoutingDecision(str(strategy), rule, reasons, _warnings(strategy, profile), AUTO)
    try:
        strategy = Strategy(requested)
    except ValueError:
        raise ImpossibleStrategy(
            f"unknown strategy {requested!r}; choose one of: auto, {', '.join(s.value for s in Strategy)}"
        ) from None
    problems = override_problems(strategy, profile) + target_problems(str(strategy), profile.version, target)
    if strategy == Strategy.FILE_IMPORT:
        problems.append("file_import imports files: name them in source_files (this run names a source deployment)")
    if problems:
        auto_choice = choose_strategy(profile, AUTO, target).strategy
        raise ImpossibleStrategy(
            f"strategy '{strategy}' cannot migrate source '{profile.conn_id}': " + "; ".join(problems)
            + f". Use strategy=auto (it would choose '{auto_choice}')."
        )
    auto_choice = _auto(profile)[0]
    reasons = [f"operator override; the automatic choice would be '{auto_choice}'"]
    return RoutingDecision(str(strategy), "override", reasons, _warnings(strategy, profile), str(strategy))


def choose_for_files(requested: str = AUTO, file_count: int = 0,
                     target: TargetFacts | None = None) -> RoutingDecision:
    """A run that names files: the file import, whatever the target's tier (it takes self-managed imports)."""
    if requested not in (None, "", AUTO, Strategy.FILE_IMPORT.value):
        raise ImpossibleStrategy(f"strategy '{requested}' needs a source deployment, but this run names files "
                                 "(source_files): use strategy=auto or file_import, or clear source_files")
    reasons = [f"the run names {file_count} file(s) in source_files instead of a source deployment: they are "
               "imported as mongoimport would (Atlas takes JSON and CSV files through self-managed tools)"]
    if target is not None and target.tier_kind in ("shared", "flex", "serverless"):
        reasons.append(f"the target is an Atlas {target.tier} cluster, which accepts imports through self-managed tools")
    return RoutingDecision(Strategy.FILE_IMPORT.value, "source_files", reasons,
                           ["users, roles and indexes are not part of a file import; create indexes on the target"],
                           AUTO if requested in (None, "", AUTO) else requested)


def ensure_available(decision: RoutingDecision, available: set[str] | frozenset[str]) -> None:
    """Fail clearly when the chosen strategy's task group is not part of this DAG."""
    if decision.strategy not in available:
        raise StrategyNotAvailable(
            f"routing chose '{decision.strategy}' (rule '{decision.rule}': {' '.join(decision.reasons)}), but the "
            f"'{decision.strategy}' task group is not built in this release (available: {', '.join(sorted(available))}). "
            "Nothing was written to the target. Re-run with an available strategy, e.g. strategy=mongorestore "
            "with application writes stopped."
        )
