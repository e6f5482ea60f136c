"""The cutover fence: the one point after which no application write may reach the source, the same for
every live path (native pull, mongosync, push, and the pull tasks Compose and AWS share).

A live migration can only promise "nothing lost" if it knows *when* writes stopped. Waiting for a few
quiet seconds does not know it: a slow batch job that writes once a minute looks quiet. So cutover takes a
**fence**, an op time on the source, and proves two things about it:

1. every write acknowledged at or before the fence is on the target (the engine drains its change stream
   up to the fence, after waiting until the fence is majority-committed, so no rolled-back write is
   applied and no committed one is missed), and
2. no application write lands after it: with source write blocking (MongoDB 6.0+,
   ``setUserWriteBlockMode``) the server refuses them; without it an operator states that writes have
   stopped, and the engine keeps watching the source's change stream for a grace period. A write after the
   fence fails the cutover with the namespaces and the count of late writes (the sync keeps running, so
   nothing is lost; stop the writers and cut over again).

``source_write_block`` decides which: ``auto`` blocks when the source supports it and the user may,
``require`` fails the pre-flight otherwise, ``off`` never blocks (the operator's statement is then
required, so ``cutover=auto`` is refused). Unblocking for a rollback is
``db.adminCommand({setUserWriteBlockMode: 1, global: false})`` on the source (README, "Cutover").

Pure decisions (``write_block_support``, ``decide_write_block``, ``cutover_problems``) take plain data;
the functions that talk to the source take a pymongo client and import nothing heavy at module level.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from atlas_migration.errors import ConfigurationError, MigrationError

log = logging.getLogger("atlas_migration")

WRITE_BLOCK_MODES = ("auto", "require", "off")
# setUserWriteBlockMode exists from MongoDB 6.0 (FCV 6.0).
MIN_WRITE_BLOCK_VERSION = (6, 0)
WRITE_BLOCK_PRIVILEGE = "setUserWriteBlockMode"
DEFAULT_GRACE_SECONDS = 5.0


class LateWrites(MigrationError):
    """Application writes reached the source after the fence: cutting over now would lose them."""

    def __init__(self, message: str, late: Mapping[str, int]) -> None:
        super().__init__(message)
        self.late = dict(late)


# ------------------------------------------------------------------------------------- pure decisions
@dataclass(frozen=True)
class WriteBlockSupport:
    """Whether this package can block user writes on the source, and why (or why not)."""

    available: bool
    reason: str


def _version_tuple(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    parts: list[int] = []
    for piece in str(text).split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or None


def write_block_support(*, version: str | None, fcv: str | None, topology: str | None,
                        privileged: bool | None) -> WriteBlockSupport:
    """Can ``setUserWriteBlockMode`` fence this source? ``privileged``: the connection's user holds the
    ``setUserWriteBlockMode`` action on the cluster (None: could not be read)."""
    if topology == "standalone":
        return WriteBlockSupport(False, "a standalone source has no live migration")
    parsed = _version_tuple(fcv) or _version_tuple(version)
    if parsed is None:
        return WriteBlockSupport(False, "the source's version and feature compatibility version are unknown")
    if parsed[:2] < MIN_WRITE_BLOCK_VERSION:
        which = f"feature compatibility version {fcv}" if fcv else f"MongoDB {version}"
        return WriteBlockSupport(False, f"setUserWriteBlockMode needs MongoDB 6.0+ (the source runs {which})")
    if privileged is False:
        return WriteBlockSupport(False, "the source user lacks the setUserWriteBlockMode privilege (grant it on "
                                        "the cluster resource through a custom role with the action "
                                        "setUserWriteBlockMode, or use root)")
    if privileged is None:
        return WriteBlockSupport(False, "the source user's privileges could not be read, so blocking writes "
                                        "cannot be relied on")
    return WriteBlockSupport(True, f"MongoDB {version or fcv} and the user may run setUserWriteBlockMode")


def decide_write_block(mode: str, support: WriteBlockSupport) -> tuple[bool, str]:
    """(block writes at cutover?, why). ``require`` without support raises ``ConfigurationError``."""
    if mode not in WRITE_BLOCK_MODES:
        raise ConfigurationError(f"source_write_block={mode!r} is not one of {', '.join(WRITE_BLOCK_MODES)}")
    if mode == "off":
        return False, "source_write_block=off: writes are not blocked; cutover needs the operator's statement " \
                      "that application writes have stopped, and late writes are watched for"
    if support.available:
        return True, f"source_write_block={mode}: user writes are blocked on the source at cutover ({support.reason})"
    if mode == "require":
        raise ConfigurationError(f"source_write_block=require, but writes cannot be blocked on the source: "
                                 f"{support.reason}. Nothing was written")
    return False, (f"source_write_block=auto: writes cannot be blocked on the source ({support.reason}); cutover "
                   "needs the operator's statement that application writes have stopped")


def cutover_problems(cutover: str, block: bool) -> list[str]:
    """Why this cutover mode cannot be safe: without write blocking, nobody but an operator can say writes
    have stopped, so an automatic cutover would guess."""
    if cutover == "auto" and not block:
        return ["cutover=auto needs source write blocking (source_write_block auto or require, MongoDB 6.0+ "
                "and the setUserWriteBlockMode privilege): without it only an operator can state that "
                "application writes have stopped. Use cutover=manual, or make write blocking available"]
    return []


# ------------------------------------------------------------------------------------------ the fence
@dataclass
class Fence:
    """The cutover point on the source. ``op_time`` is ``[seconds, increment]``."""

    op_time: list[int]
    blocked: bool  # True: the source refuses user writes from here on
    how: str  # "write_block" | "operator_statement"
    taken_at: str
    late_writes: dict[str, int] = field(default_factory=dict)  # namespace -> writes seen after the fence

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fence:
        return cls(op_time=[int(x) for x in data["op_time"]], blocked=bool(data["blocked"]), how=str(data["how"]),
                   taken_at=str(data["taken_at"]), late_writes=dict(data.get("late_writes") or {}))

    @property
    def timestamp(self):
        from bson import Timestamp

        return Timestamp(self.op_time[0], self.op_time[1])

    def describe(self) -> str:
        if self.blocked:
            return f"writes blocked on the source (setUserWriteBlockMode) at op time {self.op_time}"
        return f"operator stated writes stopped; fence at the source's last write, op time {self.op_time}"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def user_may_block_writes(client) -> bool | None:
    """Does the connection's user hold ``setUserWriteBlockMode`` on the cluster? None when unreadable.

    ``connectionStatus`` with ``showPrivileges`` lists the authenticated users' privileges; with no
    authenticated user (auth disabled) every command is allowed."""
    from pymongo.errors import PyMongoError

    try:
        info = client.admin.command("connectionStatus", showPrivileges=True).get("authInfo") or {}
    except PyMongoError:
        return None
    if not info.get("authenticatedUsers"):
        return True
    for privilege in info.get("authenticatedUserPrivileges") or []:
        resource = privilege.get("resource") or {}
        if resource.get("cluster") and WRITE_BLOCK_PRIVILEGE in (privilege.get("actions") or []):
            return True
        if resource.get("anyResource") and "anyAction" in (privilege.get("actions") or []):
            return True
    return False


def read_write_block_support(client) -> WriteBlockSupport:
    """``write_block_support`` from the live server: version, FCV, topology and the user's privileges."""
    from pymongo.errors import PyMongoError

    try:
        hello = client.admin.command("hello")
        version = client.admin.command("buildInfo").get("version")
    except PyMongoError as exc:
        return WriteBlockSupport(False, f"the source could not be asked ({type(exc).__name__})")
    topology = "sharded" if hello.get("msg") == "isdbgrid" else ("replica_set" if hello.get("setName")
                                                                  else "standalone")
    fcv = None
    try:
        reply = client.admin.command("getParameter", featureCompatibilityVersion=1)
        fcv = (reply.get("featureCompatibilityVersion") or {}).get("version")
    except PyMongoError:
        fcv = None
    return write_block_support(version=version, fcv=fcv, topology=topology, privileged=user_may_block_writes(client))


def set_user_write_block(client, enabled: bool) -> None:
    """Block (or unblock) user writes on the whole source deployment. Idempotent."""
    from pymongo.errors import OperationFailure

    try:
        client.admin.command("setUserWriteBlockMode", 1, **{"global": bool(enabled)})
    except OperationFailure as exc:
        raise MigrationError(f"setUserWriteBlockMode {{global: {enabled}}} was refused by the source (code "
                             f"{exc.code}: {str(exc.details.get('errmsg') if exc.details else exc)[:200]})") from None


def source_op_times(client):
    """(latest write, majority-committed write) op times of the source, from ``hello`` (Timestamps).

    A mongos reports no ``lastWrite``: its ``operationTime`` (the cluster time) stands in for both."""
    reply = client.admin.command("hello")
    last_write = reply.get("lastWrite") or {}
    latest = (last_write.get("opTime") or {}).get("ts")
    majority = (last_write.get("majorityOpTime") or {}).get("ts")
    fallback = reply.get("operationTime")
    return latest or fallback, majority or latest or fallback


def fence_op_time(client):
    """A point in the source's oplog after every write acknowledged so far.

    ``appendOplogNote`` writes a no-op entry and answers with its op time; where it is not available (or
    not permitted), the latest write's op time from ``hello`` is the fence."""
    from pymongo.errors import OperationFailure

    try:
        reply = client.admin.command("appendOplogNote", data={"atlas_migration": "cutover fence"})
        if reply.get("operationTime") is not None:
            return reply["operationTime"]
    except OperationFailure:
        pass
    latest, _ = source_op_times(client)
    if latest is None:
        raise MigrationError("the source reports no op time (hello has neither lastWrite nor operationTime): "
                             "cannot place the cutover fence")
    return latest


def take_fence(client, *, block: bool, block_client=None) -> Fence:
    """Place the fence now: block user writes first when ``block``, then read the op time that every
    acknowledged write precedes. ``block_client`` is where applications write, when that is not where the
    change stream is read (a mongos in front of the shard whose oplog the stream follows)."""
    if block:
        set_user_write_block(block_client if block_client is not None else client, True)
        log.info("cutover fence: user writes are now BLOCKED on the source (setUserWriteBlockMode). To roll back, "
                 "run db.adminCommand({setUserWriteBlockMode: 1, global: false}) on the source")
    ts = fence_op_time(client)
    fence = Fence(op_time=[ts.time, ts.inc], blocked=block, how="write_block" if block else "operator_statement",
                  taken_at=_now())
    log.info("cutover fence placed: %s", fence.describe())
    return fence


def wait_majority_committed(client, fence: Fence, timeout: float = 120.0, poll: float = 0.2) -> None:
    """Wait until the fence's op time is majority-committed on the source (a write acknowledged with w:1
    and not yet replicated could still be rolled back; one at or before a majority point cannot)."""
    target = fence.timestamp
    deadline = time.monotonic() + timeout
    while True:
        _, majority = source_op_times(client)
        if majority is not None and majority >= target:
            return
        if time.monotonic() >= deadline:
            raise MigrationError(f"the cutover fence (op time {fence.op_time}) was not majority-committed on the "
                                 f"source within {timeout:.0f} s (majority point {majority}): check the source's "
                                 "replica set health, then cut over again")
        time.sleep(poll)


def count_late_writes(client, fence: Fence, seconds: float, *, selected: Callable[[str, str | None], bool],
                      ignore_databases: frozenset[str] = frozenset()) -> Counter[str]:
    """Watch the source's change stream from just after the fence for ``seconds``: every event on a selected
    namespace is a late write (namespace -> count). Used where the engine applying events is not ours
    (mongosync, Atlas push)."""
    from bson import Timestamp

    late: Counter[str] = Counter()
    start = Timestamp(fence.op_time[0], fence.op_time[1] + 1)
    pipeline = [{"$match": {"ns.db": {"$nin": sorted({"admin", "local", "config", *ignore_databases})}}},
                {"$project": {"fullDocument": 0, "updateDescription": 0}}]
    with client.watch(pipeline, start_at_operation_time=start, max_await_time_ms=500) as stream:
        # The watch starts once the stream is open (opening it can take longer than the whole watch on a
        # loaded server). It ends when the stream has delivered everything up to the source's op time read
        # at the deadline: an empty batch from a getMore issued after that read, or an event past it. A
        # clock alone would report a clean fence without having read the writes it was meant to find.
        deadline = time.monotonic() + seconds
        end: Timestamp | None = None
        read_end = False
        while True:
            if not read_end and time.monotonic() >= deadline:
                end, read_end = source_op_times(client)[0], True
            change = stream.try_next()
            if change is None:
                if read_end:
                    break
                continue
            ns = change.get("ns") or {}
            db, coll = ns.get("db"), ns.get("coll")
            if db and selected(db, coll):
                late[f"{db}.{coll}" if coll else db] += 1  # after the fence: late, whenever it came
            if end is not None and change["clusterTime"] > end:
                break  # the stream is past the op time read at the deadline
    return late


def late_writes_message(late: Mapping[str, int], fence: Fence, *, what: str) -> str:
    total = sum(late.values())
    listing = ", ".join(f"{ns} ({n})" for ns, n in sorted(late.items(), key=lambda kv: (-kv[1], kv[0]))[:20])
    return (f"{what} refused: {total} application write(s) reached the source after the cutover fence (op time "
            f"{fence.op_time}, {fence.how.replace('_', ' ')}): {listing}. Writes have NOT stopped. The sync keeps "
            "running, so nothing is lost: stop every application writing to the source, then state it again and "
            "re-run the cutover (clear this task)")


__all__ = [
    "DEFAULT_GRACE_SECONDS",
    "Fence",
    "LateWrites",
    "WRITE_BLOCK_MODES",
    "WriteBlockSupport",
    "count_late_writes",
    "cutover_problems",
    "decide_write_block",
    "fence_op_time",
    "late_writes_message",
    "read_write_block_support",
    "set_user_write_block",
    "source_op_times",
    "take_fence",
    "user_may_block_writes",
    "wait_majority_committed",
    "write_block_support",
]
