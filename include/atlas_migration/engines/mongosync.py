"""The live pull's mongosync engine: what to send mongosync and when, around the hook's REST calls.

- ``commit_decision``: whether a ``/progress`` reply allows committing with a lag at most N seconds.
- ``resolve_version`` / ``plan_write_blocking``: the mongosync release in use (declared in the connection
  or inferred from ``/progress``) and where write blocking is set for it (``/start`` or startup config).
- ``namespace_filters``: converts the DAG's mongodump-style patterns (``db.coll``, ``db.*``, ``*.coll``,
  wildcards) into mongosync's ``includeNamespaces`` / ``excludeNamespaces`` filters selecting exactly the
  same namespaces.
- ``decide_start``, ``commit_with_fence``, ``check_after_commit``: the pull's start, and its cutover behind
  the fence (``atlas_migration.fence``), with the hook and clients passed in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

from atlas_migration.connection_forms import (
    read_extra,
)
from atlas_migration.errors import ConfigurationError, MigrationError
from atlas_migration.fence import LateWrites
from atlas_migration.hooks.mongosync import (
    COMMIT_LAG_LIMIT_SECONDS,
    COMMITTED,
    COMMITTING,
    CONN_TYPE,
    INFO_COLLECTION_COPY,
    INITIALIZING,
    RUNNING,
    WRITE_BLOCKING_OPTIONS,
    MongosyncHook,
    MongosyncProgress,
)
from atlas_migration.namespaces import (
    INTERNAL_DATABASE_PREFIX,
    SYSTEM_DATABASES,
    validate_pattern,
)


@dataclass(frozen=True)
class CommitDecision:
    """Whether to call ``/commit`` now, and why (the reason is written for the task log)."""

    commit: bool
    reason: str
    state: str
    lag_seconds: float | None
    already_committed: bool = False


def commit_decision(progress: MongosyncProgress | dict[str, Any], max_lag_seconds: float) -> CommitDecision:
    """Commit only when mongosync is RUNNING, reports ``canCommit`` and a lag of at most ``max_lag_seconds``.

    ``canCommit`` already implies the initial copy is over and the lag is under mongosync's own 30 s limit;
    ``max_lag_seconds`` lets the DAG ask for less, since the commit lasts about as long as the lag (writes
    to the source must be stopped during that time).
    """
    if isinstance(max_lag_seconds, bool) or not isinstance(max_lag_seconds, int | float) or max_lag_seconds < 0:
        raise ConfigurationError(f"max_lag_seconds must be a number >= 0, not {max_lag_seconds!r}")
    p = progress if isinstance(progress, MongosyncProgress) else MongosyncProgress.from_reply(progress)
    lag = p.lag_time_seconds
    if p.state in (COMMITTING, COMMITTED):
        return CommitDecision(False, f"mongosync is already {p.state}: the commit was sent before", p.state, lag,
                              already_committed=True)
    if p.state != RUNNING:
        return CommitDecision(False, f"mongosync is {p.state}; /commit is only allowed while RUNNING", p.state, lag)
    if not p.can_commit:
        why = ("the initial collection copy is still running" if p.info == INFO_COLLECTION_COPY
               else f"lag {lag:.0f} s is above mongosync's {COMMIT_LAG_LIMIT_SECONDS} s limit"
               if lag is not None and lag > COMMIT_LAG_LIMIT_SECONDS else "mongosync reports canCommit=false")
        return CommitDecision(False, f"not ready to commit: {why}", p.state, lag)
    if lag is None:
        return CommitDecision(False, "not ready to commit: /progress reports no lag (lag.overallLagSeconds or "
                                     "lagTimeSeconds)", p.state, lag)
    if lag > max_lag_seconds:
        return CommitDecision(False, f"not ready to commit: lag {lag:.0f} s is above the {max_lag_seconds:g} s "
                                     "threshold", p.state, lag)
    return CommitDecision(True, f"ready to commit: canCommit=true, lag {lag:.0f} s <= {max_lag_seconds:g} s",
                          p.state, lag)


# --------------------------------------------------------------------------------------------------
# Versions and write blocking
# --------------------------------------------------------------------------------------------------

# The connection's extras may declare the mongosync release in use and, from 1.20, its write-blocking
# startup configuration (mongosync's API has no version endpoint): {"version": "1.22",
# "write_blocking": "sourceAndDestination"}.
VERSION_EXTRA = "version"
WRITE_BLOCKING_EXTRA = "write_blocking"
WRITE_BLOCK_FIELD_REMOVED = (1, 20)  # enableUserWriteBlocking leaves /start; startup configuration instead
WRITE_BLOCK_STRINGS = (1, 12)  # "sourceAndDestination"/"none" strings; true/false before (and still accepted)
DEFAULT_WRITE_BLOCKING = "destinationOnly"  # mongosync's default since 1.11
# mongosync's own databases (renamed in 1.20); writes there are not the application's.
MONGOSYNC_INTERNAL_DATABASES = frozenset({
    "mongosync_reserved_for_internal_use", "mongosync_reserved_for_verification_src_metadata",
    "mongosync_reserved_for_verification_dst_metadata", "__mdb_internal_mongosync",
    "__mdb_internal_mongosync_verifier_src", "__mdb_internal_mongosync_verifier_dst"})


def parse_version(text: Any) -> tuple[int, int]:
    """``"1.19"`` or ``"1.19.2"`` -> ``(1, 19)``. A number is refused (1.2 and 1.20 are the same float)."""
    if not isinstance(text, str):
        raise ConfigurationError(f"the mongosync version must be a string such as \"1.22\", not {text!r} (as a "
                                 "number 1.2 and 1.20 cannot be told apart)")
    parts = text.strip().lstrip("v").split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise ConfigurationError(f"mongosync version {text!r} is not MAJOR.MINOR (e.g. \"1.22\")")
    return int(parts[0]), int(parts[1])


def _v(version: tuple[int, int] | None) -> str:
    return "?" if version is None else f"{version[0]}.{version[1]}"


@dataclass(frozen=True)
class MongosyncVersion:
    """The mongosync release in use, as a range: exact when declared, a range when inferred."""

    low: tuple[int, int] | None  # None: no lower bound known
    high: tuple[int, int] | None  # None: no upper bound known
    how: str  # "declared in the connection's extras" | "inferred from /progress"

    def at_least(self, version: tuple[int, int]) -> bool | None:
        """True/False when the range decides it, None when it straddles ``version``."""
        if self.low is not None and self.low >= version:
            return True
        if self.high is not None and self.high < version:
            return False
        return None

    def describe(self) -> str:
        if self.low == self.high and self.low is not None:
            return f"{_v(self.low)} ({self.how})"
        if self.high is None:
            return f"{_v(self.low)} or later ({self.how})"
        if self.low is None:
            return f"{_v(self.high)} or earlier ({self.how})"
        return f"{_v(self.low)} to {_v(self.high)} ({self.how})"


def infer_version(progress: dict[str, Any]) -> MongosyncVersion:
    """What a ``progress`` object's fields say about the release (contracts README, section 3): ``ceaStage``
    1.22+, the ``lag`` object 1.21+, ``estimatedOplogTimeRemaining``/``warnings`` 1.19+, the INITIALIZING
    state 1.20+; none of them: 1.18 or earlier."""
    body = progress.get("progress", progress)
    how = "inferred from /progress"
    initializing = (1, 20) if body.get("state") == INITIALIZING else None
    if "ceaStage" in body:
        return MongosyncVersion((1, 22), None, how)
    if isinstance(body.get("lag"), dict):
        return MongosyncVersion((1, 21), None, how)
    if "estimatedOplogTimeRemaining" in body or "warnings" in body:
        return MongosyncVersion(initializing or (1, 19), (1, 20), how)
    if initializing:
        return MongosyncVersion((1, 20), (1, 20), how)
    return MongosyncVersion(None, (1, 18), how)


def resolve_version(declared: Any, progress: dict[str, Any]) -> MongosyncVersion:
    """The declared version (checked against what ``/progress`` shows), else the inferred range."""
    inferred = infer_version(progress)
    if declared in (None, ""):
        return inferred
    exact = parse_version(declared)
    if (inferred.low is not None and exact < inferred.low) or (inferred.high is not None and exact > inferred.high):
        raise ConfigurationError(f"the mongosync connection declares version {declared}, but its /progress reply "
                                 f"has the fields of {inferred.describe()}: correct the connection's extras")
    return MongosyncVersion(exact, exact, "declared in the connection's extras")


@dataclass(frozen=True)
class WriteBlockingPlan:
    """How source writes are stopped at commit with this mongosync.

    ``start_field``: the ``enableUserWriteBlocking`` value for ``/start`` (None: not sent);
    ``source_blocked``: mongosync blocks user writes on the source at ``/commit`` (dual write blocking).
    """

    start_field: str | bool | None
    source_blocked: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"enableUserWriteBlocking": self.start_field, "source_blocked": self.source_blocked,
                "reason": self.reason}


def plan_write_blocking(version: MongosyncVersion, *, block: bool, block_reason: str, mode: str,
                        startup: Any = None) -> WriteBlockingPlan:
    """Follow the write-blocking contract of ``version``.

    ``block``/``block_reason``: ``fence.decide_write_block`` for the source (``source_write_block`` ``mode``);
    ``startup``: the connection's ``write_blocking`` extra, mongosync's startup configuration from 1.20.
    Up to 1.19 dual blocking is asked for in ``/start`` (``"sourceAndDestination"``, or ``true`` before
    1.12); from 1.20 the field is never sent and the declared startup configuration decides. Anything that
    cannot be decided safely raises ``ConfigurationError`` before ``/start``.
    """
    if startup is not None and startup not in WRITE_BLOCKING_OPTIONS:
        raise ConfigurationError(f"the mongosync connection's write_blocking extra is {startup!r}; it must be one of "
                                 f"{', '.join(WRITE_BLOCKING_OPTIONS)} (mongosync's startup configuration, 1.20+)")
    removed = version.at_least(WRITE_BLOCK_FIELD_REMOVED)
    if removed is None and (block or startup is not None):
        raise ConfigurationError(
            f"cannot tell whether mongosync {version.describe()} takes enableUserWriteBlocking in /start (up to "
            "1.19) or from its startup configuration (1.20+): declare the release in the mongosync connection's "
            "extras, e.g. {\"version\": \"1.22\", \"write_blocking\": \"sourceAndDestination\"}. Nothing was started")
    if removed:
        effective = startup or DEFAULT_WRITE_BLOCKING
        if effective == "sourceAndDestination":
            if not block:
                raise ConfigurationError(
                    "mongosync's startup configuration blocks writes on the source at /commit (write_blocking "
                    f"sourceAndDestination), but {block_reason}. Restart mongosync with destinationOnly, or make "
                    "source write blocking possible. Nothing was started")
            return WriteBlockingPlan(None, True, f"mongosync {version.describe()} blocks source writes at /commit "
                                                 "(startup configuration sourceAndDestination)")
        if block and mode == "require":
            raise ConfigurationError(
                f"source_write_block=require, but mongosync {version.describe()} takes write blocking from its "
                f"startup configuration, declared as {startup or 'not set (default destinationOnly)'}: restart "
                "mongosync with --enableUserWriteBlocking sourceAndDestination and declare write_blocking: "
                "sourceAndDestination in the connection's extras. Nothing was started")
        why = (f"mongosync's startup configuration is {effective}" if block
               else block_reason)
        return WriteBlockingPlan(None, False, f"source writes are not blocked by mongosync: {why}; commit needs the "
                                              "operator's statement and the fence check")
    if startup is not None:
        raise ConfigurationError(f"the mongosync connection declares write_blocking={startup!r}, a startup option "
                                 f"from 1.20, but mongosync {version.describe()} takes it in /start: remove the extra")
    if block:
        strings = version.at_least(WRITE_BLOCK_STRINGS)
        return WriteBlockingPlan("sourceAndDestination" if strings else True, True,
                                 f"/start asks mongosync {version.describe()} for dual write blocking ({block_reason})")
    return WriteBlockingPlan(None, False, f"source writes are not blocked: {block_reason}")


def late_write_selector(namespaces: Any) -> Callable[[str, str | None], bool]:
    """The namespaces whose writes count as late: the migrated ones, and whole-database events of a
    database that is not mongosync's or this package's own."""
    def selected(db: str, coll: str | None) -> bool:
        if db in MONGOSYNC_INTERNAL_DATABASES or db.startswith(INTERNAL_DATABASE_PREFIX):
            return False
        return True if coll is None else namespaces.matches(db, coll)

    return selected


# --------------------------------------------------------------------------------------------------
# Namespace patterns -> mongosync filters
# --------------------------------------------------------------------------------------------------

_STAR = object()  # a wildcard token in a parsed pattern
_Token = Any  # a one-character string or _STAR


def _parse_pattern(pattern: str) -> list[_Token]:
    """Tokens of a mongodump-style pattern: ``*`` is a wildcard, ``\\*`` and ``\\\\`` are literal."""
    tokens: list[_Token] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern) and pattern[i + 1] in "*\\":
            tokens.append(pattern[i + 1])
            i += 2
            continue
        tokens.append(_STAR if ch == "*" else ch)
        i += 1
    return tokens


def _regex_escape(text: str) -> str:
    # Backslash before every ASCII non-word character: literal in PCRE ($regex) and in Go's RE2 alike,
    # whereas Python's re.escape output is not guaranteed to be read the same by both.
    return "".join(f"\\{c}" if c.isascii() and not (c.isalnum() or c == "_") else c for c in text)


@dataclass(frozen=True)
class _Side:
    """One side (database or collection) of a filter: a literal name, a regex, or everything."""

    tokens: tuple[_Token, ...]

    @property
    def everything(self) -> bool:
        return bool(self.tokens) and all(t is _STAR for t in self.tokens)

    @property
    def literal(self) -> str | None:
        return None if any(t is _STAR for t in self.tokens) else "".join(self.tokens)

    def regex(self) -> str:
        parts: list[str] = []
        for token in self.tokens:
            if token is _STAR:
                if parts[-1:] != [".*"]:  # consecutive stars match what one star matches
                    parts.append(".*")
            else:
                parts.append(_regex_escape(token))
        return "^" + "".join(parts) + "$"


def _regex_filter(pattern: str) -> dict[str, str]:
    # "s": let "." match every character, as "*" does in mongodump patterns.
    return {"pattern": pattern, "options": "s"}


def _pattern_cases(tokens: list[_Token]) -> list[tuple[_Side, _Side]]:
    """(database side, collection side) pairs whose union selects exactly what the pattern selects.

    Database names contain no dot, so a namespace ``d.c`` splits at its first dot. A pattern splits at its
    first literal dot into ``D.C``. Either no star of ``D`` spans the namespace's first dot (then ``d``
    matches ``D`` and ``c`` matches ``C``), or exactly one star of ``D``, say ``D = L*R``, spans it (then
    ``d`` matches ``L*`` and ``c`` matches ``*R.C``). One case per star keeps the union exact.
    """
    dot = tokens.index(".")
    db, coll = tokens[:dot], tokens[dot + 1:]
    cases = [(_Side(tuple(db)), _Side(tuple(coll)))]
    for k, token in enumerate(db):
        if token is _STAR:
            cases.append((_Side((*db[:k], _STAR)), _Side((_STAR, *db[k + 1:], ".", *coll))))
    return cases


@dataclass(frozen=True)
class NamespaceFilters:
    """mongosync ``includeNamespaces`` / ``excludeNamespaces`` (empty include = every namespace)."""

    include_namespaces: list[dict[str, Any]]
    exclude_namespaces: list[dict[str, Any]]

    def start_fields(self) -> dict[str, Any]:
        """The ``/start`` body fields, omitting empty lists (mongosync then syncs everything)."""
        out: dict[str, Any] = {}
        if self.include_namespaces:
            out["includeNamespaces"] = self.include_namespaces
        if self.exclude_namespaces:
            out["excludeNamespaces"] = self.exclude_namespaces
        return out


def _build_filters(cases: Iterable[tuple[_Side, _Side]]) -> list[dict[str, Any]]:
    """Group cases by database side: one filter per database name or regex (mongosync ORs filters)."""
    groups: dict[tuple[str, str], list[_Side]] = {}
    for db_side, coll_side in cases:
        key = ("database", db_side.literal) if db_side.literal is not None else ("databaseRegex", db_side.regex())
        groups.setdefault(key, []).append(coll_side)
    filters: list[dict[str, Any]] = []
    for (kind, value), colls in groups.items():
        entry: dict[str, Any] = {"database": value} if kind == "database" else {"databaseRegex": _regex_filter(value)}
        if not any(c.everything for c in colls):
            literals = list(dict.fromkeys(c.literal for c in colls if c.literal is not None))
            regexes = list(dict.fromkeys(c.regex() for c in colls if c.literal is None))
            if not regexes:
                entry["collections"] = literals
            else:
                # A filter takes collections OR collectionsRegex: fold the names into the regex.
                alternatives = [f"^{_regex_escape(name)}$" for name in literals] + regexes
                pattern = alternatives[0] if len(alternatives) == 1 else "|".join(f"(?:{a})" for a in alternatives)
                entry["collectionsRegex"] = _regex_filter(pattern)
        filters.append(entry)
    return filters


def _never_migrated_reason(db_side: _Side, coll_side: _Side) -> str | None:
    db = db_side.literal
    if db is not None and (db in SYSTEM_DATABASES or db.startswith(INTERNAL_DATABASE_PREFIX)):
        return f"database '{db}' is never migrated"
    coll = coll_side.literal
    if coll is not None and coll.startswith("system."):
        return f"'system.*' collections ({coll}) are never migrated"
    return None


def namespace_filters(include_patterns: Sequence[str] | None,
                      exclude_patterns: Sequence[str] | None = None) -> NamespaceFilters:
    """Convert mongodump-style ``--nsInclude`` / ``--nsExclude`` patterns into mongosync filters.

    The filters select exactly the namespaces ``NamespaceFilter`` selects: ``db.coll`` becomes
    ``{"database": "db", "collections": ["coll"]}``, ``db.*`` becomes ``{"database": "db"}``, wildcards
    become anchored ``databaseRegex`` / ``collectionsRegex`` filters, and ``*`` (everything) becomes no
    include filter at all. mongosync applies the include filters first, then removes what an exclude filter
    matches, which is the DAG's rule too. This package's own bookkeeping databases are always excluded.

    Refused with ``ConfigurationError``: an include pattern that can only name namespaces no strategy
    migrates (``admin``/``local``/``config``, ``system.*``): it would select nothing here, while mongosync
    would be asked to sync a system namespace it refuses; and an exclude pattern of ``*``, which leaves
    nothing to migrate.
    """
    include_cases: list[tuple[_Side, _Side]] = []
    include_everything = False
    for raw in include_patterns or []:
        pattern = validate_pattern(raw)
        if pattern == "*":
            include_everything = True
            continue
        cases = _pattern_cases(_parse_pattern(pattern))
        if any(db.everything and coll.everything for db, coll in cases):
            include_everything = True
            continue
        kept = [c for c in cases if _never_migrated_reason(*c) is None]
        if not kept:
            raise ConfigurationError(
                f"include pattern {raw!r} cannot be expressed for mongosync: {_never_migrated_reason(*cases[0])} "
                "(mongosync does not sync system namespaces); remove the pattern"
            )
        include_cases.extend(kept)

    exclude_cases: list[tuple[_Side, _Side]] = []
    for raw in exclude_patterns or []:
        pattern = validate_pattern(raw)
        cases = [] if pattern == "*" else _pattern_cases(_parse_pattern(pattern))
        if pattern == "*" or any(db.everything and coll.everything for db, coll in cases):
            raise ConfigurationError(f"exclude pattern {raw!r} excludes every namespace: nothing would be migrated")
        # Excluding a namespace that is never migrated anyway changes nothing; leave it out of the filter.
        exclude_cases.extend(c for c in cases if _never_migrated_reason(*c) is None)

    include = [] if include_everything else _build_filters(include_cases)
    exclude = _build_filters(exclude_cases)
    exclude.append({"databaseRegex": {"pattern": "^" + _regex_escape(INTERNAL_DATABASE_PREFIX), "options": ""}})
    return NamespaceFilters(include_namespaces=include, exclude_namespaces=exclude)


# --------------------------------------------------------------------------------------------------
# The live pull's mongosync steps (called from strategies.live_pull; clients and hook passed in)
# --------------------------------------------------------------------------------------------------

class CutoverRefused(LateWrites, AirflowFailException):
    """``fence.LateWrites`` that Airflow does not retry: the operator must stop the writers and state it again
    (a retry minutes later would commit on a statement that was not true)."""


def _late_writes_error(message: str, late: Any) -> CutoverRefused:
    return CutoverRefused(message, late)


FENCE_DB = INTERNAL_DATABASE_PREFIX  # this package's bookkeeping database on the target (never synced)
FENCE_COLLECTION = "mongosync_fence"
AFTER_COMMIT_WATCH_SECONDS = 2.0


@dataclass(frozen=True)
class StartDecision:
    """What ``/start`` is sent and why: the release in use and the write-blocking plan."""

    version: MongosyncVersion
    plan: WriteBlockingPlan

    @property
    def write_blocking_in_start(self) -> bool:
        return not self.version.at_least(WRITE_BLOCK_FIELD_REMOVED)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version.describe(), "write_blocking": self.plan.to_dict()}


def decide_start(hook: MongosyncHook, progress: MongosyncProgress, source_client: Any, *, mode: str,
                 cutover: str) -> StartDecision:
    """Before ``/start``: the release (declared or inferred), whether the source can and should be blocked
    (``fence.read_write_block_support`` on the SOURCE connection, ``source_write_block`` = ``mode``), and
    refuse a cutover that would have to guess that writes stopped."""
    from atlas_migration.fence import cutover_problems, decide_write_block, read_write_block_support

    # Stored plainly (Airflow 3's form, JSON connections) or as extra__mongosync__<name> (Airflow 2's form).
    extras = hook.extras
    version = resolve_version(read_extra(extras, CONN_TYPE, VERSION_EXTRA), progress.raw)
    support = read_write_block_support(source_client)
    block, why = decide_write_block(mode, support)
    plan = plan_write_blocking(version, block=block, block_reason=why, mode=mode,
                               startup=read_extra(extras, CONN_TYPE, WRITE_BLOCKING_EXTRA))
    problems = cutover_problems(cutover, plan.source_blocked)
    if problems:
        raise ConfigurationError(" ".join(problems) + ". Nothing was started")
    return StartDecision(version, plan)


def save_fence(target_client: Any, key: str, fence: Any) -> None:
    """Keep the fence on the target, so a retried task (or the check after COMMITTED) finds it."""
    from pymongo import WriteConcern

    collection = target_client[FENCE_DB].get_collection(FENCE_COLLECTION, write_concern=WriteConcern("majority"))
    collection.replace_one({"_id": key}, {"_id": key, **fence.to_dict()}, upsert=True)


def load_fence(target_client: Any, key: str) -> Any:
    from atlas_migration.fence import Fence

    doc = target_client[FENCE_DB][FENCE_COLLECTION].find_one({"_id": key})
    return None if doc is None else Fence.from_dict(doc)


def commit_with_fence(hook: MongosyncHook, source_client: Any, *, source_blocked: bool, max_lag_seconds: float,
                      quiet_seconds: float, selected: Callable[[str, str | None], bool],
                      keep: Callable[[Any], None]) -> dict[str, Any]:
    """``/commit``, following the contract: "Without source write blocking, mongosync does not stop
    application writes: stop writes to the source, then /commit, then wait for COMMITTED".

    With source write blocking mongosync blocks the source itself at ``/commit``; the fence is the source's
    op time after it. Without it (the operator has stated that writes stopped), the fence is placed first
    and checked: majority-committed, then ``quiet_seconds`` of watching the source; a write after it raises
    ``LateWrites`` and ``/commit`` is NOT sent (the sync keeps running, nothing is lost). ``keep(fence)``
    stores the fence before anything else happens.
    """
    from atlas_migration.fence import (
        Fence,
        count_late_writes,
        fence_op_time,
        late_writes_message,
        take_fence,
        wait_majority_committed,
    )

    decision = commit_decision(hook.progress(), max_lag_seconds)
    if decision.already_committed:
        return {"committed": True, "reason": decision.reason}
    if not decision.commit:
        raise MigrationError(f"mongosync cannot commit now: {decision.reason}. Retry this task once it can.")
    if source_blocked:
        hook.commit()
        ts = fence_op_time(source_client)  # mongosync has blocked user writes: nothing is acknowledged after this
        fence = Fence(op_time=[ts.time, ts.inc], blocked=True, how="write_block",
                      taken_at=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()))
        keep(fence)
        return {"committed": False, "reason": decision.reason, "fence": fence.to_dict()}
    fence = take_fence(source_client, block=False)
    keep(fence)
    wait_majority_committed(source_client, fence)
    late = count_late_writes(source_client, fence, quiet_seconds, selected=selected,
                             ignore_databases=MONGOSYNC_INTERNAL_DATABASES)
    if late:
        fence.late_writes = dict(late)
        keep(fence)
        raise _late_writes_error(late_writes_message(late, fence, what="mongosync commit"), late)
    hook.commit()
    return {"committed": False, "reason": decision.reason, "fence": fence.to_dict()}


def check_after_commit(source_client: Any, fence: Any, *, selected: Callable[[str, str | None], bool],
                       seconds: float = AFTER_COMMIT_WATCH_SECONDS) -> dict[str, Any]:
    """After COMMITTED: no application write may have reached the source after the fence. mongosync applies
    nothing after its commit point, so such a write may be missing from the destination: raise
    ``LateWrites`` with the count and the namespaces."""
    from atlas_migration.fence import count_late_writes

    late = count_late_writes(source_client, fence, seconds, selected=selected,
                             ignore_databases=MONGOSYNC_INTERNAL_DATABASES)
    fence.late_writes = dict(late)
    if late:
        total = sum(late.values())
        listing = ", ".join(f"{ns} ({n})" for ns, n in sorted(late.items(), key=lambda kv: (-kv[1], kv[0]))[:20])
        raise _late_writes_error(
            f"mongosync committed, but {total} application write(s) reached the source after the cutover fence "
            f"(op time {fence.op_time}, {fence.how.replace('_', ' ')}): {listing}. mongosync applies nothing after "
            "its commit point, so these writes MAY BE MISSING from Atlas. Do not move applications yet: compare "
            "these namespaces between source and Atlas and copy the missing writes", late)
    return {"fence": fence.to_dict(), "late_writes_after_commit": 0}
