"""A local mongosync: its REST API and state machine, really synchronising two MongoDB deployments.

It implements section 3 of ``/work/shared/contracts/README.md`` (the mongosync API) so that a client that
passes here works against a real ``mongosync``: the same paths (``/api/v1/...``), methods, bodies, state
machine and ``{"success": false, "error", "errorDescription"}`` refusals. The data really moves: a
background thread runs the project's live-sync engine (``atlas_migration.engines.live.LiveSync``) from
``cluster0`` to ``cluster1`` (or back, after ``/reverse``).

Running it
----------
In-thread (tests)::

    with MongosyncServer(source_uri, target_uri) as server:
        server.api_url                     # http://127.0.0.1:<free port>/api/v1
        server.force_lag(45)               # /progress reports 45 s of lag (canCommit false)
        server.inject_failure("SyncFailed", "disk full")

As a process (demo, DAG tests)::

    python -m devtools.mongosync_server --port 27182 --cluster0 URI --cluster1 URI [--initializing-seconds S]
        [--settings '{"round_seconds": 0.2}'] [--version 1.19|1.20|1.21|1.22]
        [--enableUserWriteBlocking sourceAndDestination|destinationOnly|none] [--enableCappedCollectionHandling]

``--version`` (default 1.22) picks the release imitated, as the contracts README lists the changes: up to
1.19 ``/start`` takes ``enableUserWriteBlocking`` (strings or true/false); from 1.20 that field is refused
and write blocking is the ``--enableUserWriteBlocking`` startup option (default destinationOnly), the
INITIALIZING state appears (before 1.20 the API answers 503 until both clusters are reached), and a capped
collection created during the sync fails the migration unless ``--enableCappedCollectionHandling`` was
given; ``/progress`` has ``estimatedOplogTimeRemaining`` and ``warnings`` from 1.19, the ``lag`` object
from 1.21, ``ceaStage`` from 1.22; 1.22's ``/start`` also takes ``skipDiskSpaceCheck``. From 1.19 a 4.4
source or a 6.0 destination is refused.

It prints ``listening on http://127.0.0.1:<port>`` once ready (the API is under ``/api/v1``); ``--port 0``
picks a free port. SIGTERM stops it (the sync is left at its last checkpoint).

What is faithful
----------------
- Endpoints: ``POST /start /pause /resume /commit /reverse`` with a JSON object body (``{}`` when the
  endpoint takes no parameter; other bodies are refused) and ``GET /progress``. Replies ``{"success": true}``
  or ``{"success": false, "error", "errorDescription"}`` (HTTP 400 for a refused request, 404/405 for an
  unknown path or method, 500 when the sync itself failed).
- States: INITIALIZING (connecting to both clusters, both must be replica sets or sharded clusters) ->
  IDLE -start-> RUNNING (info "collection copy", then "change event application") <-pause/resume-> PAUSED;
  RUNNING -commit-> COMMITTING ("waiting for commit to complete": the engine applies the change events up
  to the commit point and none after it, builds the deferred indexes, verifies) -> COMMITTED ("commit
  completed", ``canWrite`` true), by itself;
  COMMITTED -reverse-> REVERSING -> RUNNING in the other direction, only when started ``reversible``.
  ``canCommit`` is true only in change event application with a lag of at most 30 s.
- ``/start`` rules from the mongosync reference: only in IDLE; ``source``/``destination`` required and
  one each of ``cluster0``/``cluster1``; ``buildIndexes`` one of afterDataCopy, beforeDataCopy,
  excludeHashed, excludeHashedAfterCopy, never; ``reversible`` needs ``enableUserWriteBlocking``
  ``"sourceAndDestination"`` (or ``true``) and refuses ``buildIndexes: never``; ``verification`` is
  ``{enabled: bool}`` (enabled by default); ``sharding`` is refused (it is for a replica-set source and a
  sharded destination); unknown fields are refused rather than ignored (a misspelt filter would otherwise
  sync everything). Source versions 4.4.29+, 5.0.29+, 6.0.24+, 7.0.18+, 8.0.5+, destination 6.0+ (from
  1.19: sources 5.0+, destinations 7.0+).
- The commit point, as mongosync has it: ``/commit`` does NOT wait for application writes to stop. With
  dual write blocking (``sourceAndDestination``) it first blocks user writes on the source
  (``setUserWriteBlockMode {global: true}`` through the source client), then reads the source's op time;
  without it the commit point is the source's op time when ``/commit`` is answered. The worker is parked
  between two change-stream rounds before the point is read and then applies every event at or before the
  point and none after it (``LiveSync.drain_to``): a write the source acknowledges after the commit point
  never reaches the destination, exactly the loss the contract warns about.
- Dual write blocking requested (in ``/start`` up to 1.19, at startup from 1.20) against a source that
  cannot block writes (older than 6.0, no ``setUserWriteBlockMode`` command, or a user without the
  privilege) is refused at ``/start`` (``WriteBlockingUnsupported``), as the reference says it cannot be
  set for such sources. The probe sends the command without its required ``global`` field, which changes
  nothing on a server that has the command.
- Filters: ``[{database | databaseRegex, collections? | collectionsRegex?}]``, regexes ``{pattern,
  options}`` with options from ``imsx`` evaluated like ``$regex`` (unanchored search); the include filters
  apply first, then the exclude filters remove what they match. They become the engine's namespace filter.
- Pause stops the engine at a safe point (between partitions, between change-stream rounds) and discards
  it; resume builds a new engine that continues from the checkpoints stored on the destination, as
  mongosync resumes "based on resume data stored on the destination cluster". The engine keeps its state
  in ``mongosync_reserved_for_internal_use`` on the destination, the database mongosync itself uses.
- ``/progress`` carries every field of the contract: ``state, canCommit, canWrite, info, lagTimeSeconds,
  lag {overallLagSeconds, crudLagSeconds, ddlLagSeconds}, collectionCopy {estimatedTotalBytes,
  estimatedCopiedBytes}, directionMapping {Source, Destination}`` ("cluster0: host:port"),
  ``source/destination {pingLatencyMs}`` (measured), ``verification {source, destination}``, ``warnings``,
  plus ``mongosyncID``/``coordinatorID`` as the reference documents.

Where it differs (the engine is not mongosync)
----------------------------------------------
- ``/reverse`` copies the collections back in full (REVERSING: plan and empty the old source; then
  RUNNING: copy, then change event application) instead of copying only metadata.
- Verification compares document counts and index names per namespace at commit (mongosync hashes
  documents); a mismatch fails the migration. Its ``phase`` values are this server's own: "disabled",
  "waiting for commit", "verifying", "completed", "failed".
- ``buildIndexes`` is validated and reported in ``/__test__/state`` but does not change what the engine
  does (it builds every index).
- Destination write blocking during the sync (the default ``destinationOnly``, and ``sourceAndDestination``)
  is not imitated: writes to the destination are not refused before ``canWrite``, because the engine has
  no ``bypassWriteBlockingMode`` user to write through a block (and SecantusDB has no
  ``setUserWriteBlockMode``). Only the source block at ``/commit`` is sent. A reverse after a dual-blocked
  commit leaves the old source blocked, as this server never unblocks it.
- The 1.22 disk-space check (``InsufficientDestinationDiskSpace``) is not made; ``skipDiskSpaceCheck`` is
  only validated. ``ceaStage`` values ("draining backlog", "applying new events") and the
  ``estimatedOplogTimeRemaining`` format (a Go duration string from the source's oplog window minus the
  lag) are this server's own; the reference names the fields only.
- Verification compares counts as they are when it runs, not at the commit point: without source write
  blocking, a write after the commit point makes it fail (``VerificationFailed``). The reference does not
  say the real verifier looks past the commit point (the contract says such writes are lost), so this is
  stricter, never kinder; tests of lost writes disable verification (``verification: {enabled: false}``).
- ``info`` is null in INITIALIZING, IDLE and REVERSING, where none of the four documented values applies.

Error names: the mongosync reference documents the ``error``/``errorDescription`` fields but not the
names, so these are this server's (``ERRORS`` below): ``InvalidStateTransition`` (call not allowed in the
current state), ``CommitNotReady`` (``/commit`` while ``canCommit`` is false), ``NotReversible``
(``/reverse`` of a sync not started reversible), ``InvalidRequest`` (malformed body, unknown field, bad
filter or option), ``WriteBlockingUnsupported`` (dual write blocking against a source that cannot block),
``UnsupportedServerVersion``, ``UnsupportedClusterType``, ``SyncFailed`` (the engine
failed; the sync is over), ``VerificationFailed``, ``NotFound``, ``MethodNotAllowed``, ``InternalError``.

Test knobs (``Settings`` fields; ``PATCH /__test__/settings`` or ``update_settings``)
-----------------------------------------------------------------------------------
``commit_lag_limit_seconds`` (30, mongosync's rule), ``initializing_seconds`` (time spent in INITIALIZING
before connecting), ``forced_lag_seconds`` (None, or the lag /progress reports whatever the engine says),
``round_seconds`` (length of one change-stream round between safe points), ``max_await_ms`` (the engine's
getMore wait), ``commit_drain_timeout_seconds`` (the drain to the commit point), ``batch_size``,
``partition_docs``, ``pause_timeout_seconds``, ``ping_interval_seconds``, ``lag_probe_seconds`` (how
often ``LiveSync.lag()`` is asked, in a thread beside the worker; each change-stream round also reports
its lag).

Admin endpoints (under ``/__test__``, which mongosync never uses)
-----------------------------------------------------------------
``GET /__test__/state`` (phase, options, sync id, partitions, copied documents, verification, error);
``GET|PATCH /__test__/settings``; ``POST /__test__/lag {"seconds": 45 | null}`` (force the reported lag);
``POST /__test__/fail {"error", "errorDescription"}`` (the sync fails at its next safe point, as if the
engine had failed; at once when no sync is running); ``POST|DELETE /__test__/faults`` (``{"path":
"/commit", "method"?, "count": 1, "status": 400, "error", "errorDescription"}`` or ``"raw": "<text>"``
for a non-JSON reply: the next matching API calls are answered that way, state untouched);
``GET|DELETE /__test__/requests`` (request log).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import re
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from devtools.http_service import DispatchingHandler, LoopbackHttpService

# ``python -m devtools.mongosync_server`` from the repository root: the package lives in include/ (on
# PYTHONPATH for Airflow and pytest, not necessarily here).
if importlib.util.find_spec("atlas_migration") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "include"))

from atlas_migration.namespaces import SYSTEM_DATABASES, NamespaceFilter  # noqa: E402
from atlas_migration.redaction import redact  # noqa: E402

API_PREFIX = "/api/v1"
ADMIN_PREFIX = "/__test__"
CLUSTERS = ("cluster0", "cluster1")
STATE_DB = "mongosync_reserved_for_internal_use"  # where mongosync keeps its resume data on the destination

INITIALIZING, IDLE, RUNNING, PAUSED = "INITIALIZING", "IDLE", "RUNNING", "PAUSED"
COMMITTING, COMMITTED, REVERSING = "COMMITTING", "COMMITTED", "REVERSING"
INFO_COPY = "collection copy"
INFO_CEA = "change event application"
INFO_COMMITTING = "waiting for commit to complete"
INFO_COMMITTED = "commit completed"

ERR_INVALID_STATE = "InvalidStateTransition"
ERR_COMMIT_NOT_READY = "CommitNotReady"
ERR_NOT_REVERSIBLE = "NotReversible"
ERR_INVALID_REQUEST = "InvalidRequest"
ERR_UNSUPPORTED_VERSION = "UnsupportedServerVersion"
ERR_UNSUPPORTED_CLUSTER = "UnsupportedClusterType"
ERR_SYNC_FAILED = "SyncFailed"
ERR_VERIFICATION_FAILED = "VerificationFailed"
ERR_NOT_FOUND = "NotFound"
ERR_METHOD_NOT_ALLOWED = "MethodNotAllowed"
ERR_INTERNAL = "InternalError"
ERR_WRITE_BLOCKING_UNSUPPORTED = "WriteBlockingUnsupported"
ERRORS = (ERR_INVALID_STATE, ERR_COMMIT_NOT_READY, ERR_NOT_REVERSIBLE, ERR_INVALID_REQUEST, ERR_UNSUPPORTED_VERSION,
          ERR_UNSUPPORTED_CLUSTER, ERR_SYNC_FAILED, ERR_VERIFICATION_FAILED, ERR_NOT_FOUND, ERR_METHOD_NOT_ALLOWED,
          ERR_INTERNAL, ERR_WRITE_BLOCKING_UNSUPPORTED)

# The mongosync releases this server imitates (``--version``); what changes between them (contracts README):
# 1.19 adds estimatedOplogTimeRemaining and warnings to /progress; 1.20 removes enableUserWriteBlocking from
# /start (write blocking becomes a startup option), adds the INITIALIZING state and the
# --enableCappedCollectionHandling startup flag; 1.21 adds the lag object (lagTimeSeconds deprecated);
# 1.22 adds skipDiskSpaceCheck to /start and ceaStage to /progress.
VERSIONS = ("1.19", "1.20", "1.21", "1.22")
DEFAULT_VERSION = "1.22"
CAPPED_NOT_ENABLED = ("a capped collection was created on the source but capped collection handling is not "
                      "enabled; restart mongosync with --enableCappedCollectionHandling")
# setUserWriteBlockMode without its required ``global`` field: a server that has the command refuses the
# request with a parse error and changes nothing; one that lacks it answers CommandNotFound.
_COMMAND_NOT_FOUND, _UNAUTHORIZED = 59, 13

BUILD_INDEXES_OPTIONS = ("afterDataCopy", "beforeDataCopy", "excludeHashed", "excludeHashedAfterCopy", "never")
WRITE_BLOCKING_OPTIONS = ("sourceAndDestination", "destinationOnly", "none")
WRITE_BLOCKING = {True: "sourceAndDestination", False: "none", "sourceAndDestination": "sourceAndDestination",
                  "destinationOnly": "destinationOnly", "none": "none"}
START_FIELDS = frozenset({"source", "destination", "buildIndexes", "includeNamespaces", "excludeNamespaces",
                          "reversible", "enableUserWriteBlocking", "verification", "sharding"})


def version_tuple(version: str) -> tuple[int, int]:
    """``"1.20"`` -> ``(1, 20)``; refuses a release this server does not imitate."""
    if version not in VERSIONS:
        raise ValueError(f"mongosync version {version!r} is not one of {', '.join(VERSIONS)}")
    major, minor = version.split(".")
    return int(major), int(minor)


def start_fields(version: str) -> frozenset[str]:
    """The ``/start`` body fields ``version`` accepts."""
    fields_ = set(START_FIELDS)
    if version_tuple(version) >= (1, 20):
        fields_.discard("enableUserWriteBlocking")
    if version_tuple(version) >= (1, 22):
        fields_.add("skipDiskSpaceCheck")
    return frozenset(fields_)
# Minimum source patch release per major.minor line, and the destination floor (contract, section 3).
MIN_SOURCE_VERSIONS = {(4, 4): (4, 4, 29), (5, 0): (5, 0, 29), (6, 0): (6, 0, 24), (7, 0): (7, 0, 18),
                       (8, 0): (8, 0, 5)}
MIN_DESTINATION_VERSION = (6, 0, 0)

ENDPOINT_STATES = {  # which state each state-changing endpoint needs
    "/start": (IDLE,), "/pause": (RUNNING,), "/resume": (PAUSED,), "/commit": (RUNNING,),
    "/reverse": (COMMITTED,),
}

log = logging.getLogger(__name__)


class Refusal(Exception):
    """A ``success: false`` reply."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status


class _Stop(Exception):
    """Raised at a safe point to leave the worker (pause or shutdown); never a failure."""


# --------------------------------------------------------------------------------------------------
# Settings and start options
# --------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """Test knobs; see the module docstring."""

    commit_lag_limit_seconds: float = 30.0
    initializing_seconds: float = 0.0
    forced_lag_seconds: float | None = None
    round_seconds: float = 0.5
    max_await_ms: int = 200
    commit_drain_timeout_seconds: float = 120.0
    batch_size: int = 1000
    partition_docs: int = 50_000
    pause_timeout_seconds: float = 60.0
    ping_interval_seconds: float = 2.0
    lag_probe_seconds: float = 5.0

    def update(self, changes: dict[str, Any]) -> None:
        known = {f.name: f for f in fields(self)}
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
        for name, value in changes.items():
            if isinstance(value, bool) or (value is not None and not isinstance(value, int | float)):
                raise ValueError(f"setting {name} must be a number")
            if value is None and name != "forced_lag_seconds":
                raise ValueError(f"setting {name} cannot be null")
            setattr(self, name, value)


@dataclass(frozen=True)
class StartOptions:
    """A validated ``/start`` body."""

    source: str
    destination: str
    build_indexes: str = "afterDataCopy"
    include: tuple[dict[str, Any], ...] = ()
    exclude: tuple[dict[str, Any], ...] = ()
    reversible: bool = False
    write_blocking: str = "destinationOnly"
    verification_enabled: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["include"], out["exclude"] = list(self.include), list(self.exclude)
        return out


def _regex_flags(options: str, where: str) -> int:
    flags = 0
    for letter in options:
        flag = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}.get(letter)
        if flag is None:
            raise Refusal(ERR_INVALID_REQUEST, f"{where}.options: unsupported regular expression option "
                                               f"{letter!r} (use i, m, s, x)")
        flags |= flag
    return flags


def _validate_regex(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or set(value) - {"pattern", "options"} or not isinstance(value.get("pattern"), str):
        raise Refusal(ERR_INVALID_REQUEST, f"{where} must be {{\"pattern\": <string>, \"options\": <string>}}")
    options = value.get("options", "")
    if not isinstance(options, str):
        raise Refusal(ERR_INVALID_REQUEST, f"{where}.options must be a string")
    try:
        re.compile(value["pattern"], _regex_flags(options, where))
    except re.error as exc:
        raise Refusal(ERR_INVALID_REQUEST, f"{where}.pattern is not a valid regular expression: {exc}") from None
    return {"pattern": value["pattern"], "options": options}


def validate_filters(value: Any, name: str) -> tuple[dict[str, Any], ...]:
    """Check ``includeNamespaces``/``excludeNamespaces`` and return them normalised."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise Refusal(ERR_INVALID_REQUEST, f"{name} must be an array of filters")
    out = []
    for i, item in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise Refusal(ERR_INVALID_REQUEST, f"{where} must be a document")
        unknown = sorted(set(item) - {"database", "databaseRegex", "collections", "collectionsRegex"})
        if unknown:
            raise Refusal(ERR_INVALID_REQUEST, f"{where}: unknown field(s) {', '.join(unknown)}")
        if ("database" in item) == ("databaseRegex" in item):
            raise Refusal(ERR_INVALID_REQUEST, f"{where} must have exactly one of database and databaseRegex")
        if "collections" in item and "collectionsRegex" in item:
            raise Refusal(ERR_INVALID_REQUEST, f"{where} may have collections or collectionsRegex, not both")
        entry: dict[str, Any] = {}
        if "database" in item:
            db = item["database"]
            if not isinstance(db, str) or not db or "." in db:
                raise Refusal(ERR_INVALID_REQUEST, f"{where}.database must be a database name")
            if db in SYSTEM_DATABASES or db == STATE_DB:
                raise Refusal(ERR_INVALID_REQUEST, f"{where}: database '{db}' cannot be filtered: mongosync does "
                                                   "not sync system databases")
            entry["database"] = db
        else:
            entry["databaseRegex"] = _validate_regex(item["databaseRegex"], f"{where}.databaseRegex")
        if "collections" in item:
            colls = item["collections"]
            if not isinstance(colls, list) or not all(isinstance(c, str) and c for c in colls):
                raise Refusal(ERR_INVALID_REQUEST, f"{where}.collections must be an array of collection names")
            entry["collections"] = list(colls)
        if "collectionsRegex" in item:
            entry["collectionsRegex"] = _validate_regex(item["collectionsRegex"], f"{where}.collectionsRegex")
        out.append(entry)
    return tuple(out)


def parse_start(body: dict[str, Any], version: str = DEFAULT_VERSION,
                startup_write_blocking: str | None = None) -> StartOptions:
    """Validate a ``/start`` body against the mongosync reference of ``version`` (see the module docstring).

    From 1.20 write blocking is not a ``/start`` field: ``startup_write_blocking`` (the
    ``--enableUserWriteBlocking`` startup option, default destinationOnly) stands in for it.
    """
    if "enableUserWriteBlocking" in body and version_tuple(version) >= (1, 20):
        raise Refusal(ERR_INVALID_REQUEST, f"unknown /start parameter enableUserWriteBlocking: mongosync {version} "
                                           "sets write blocking in its startup configuration "
                                           "(--enableUserWriteBlocking), not in /start (removed in 1.20)")
    unknown = sorted(set(body) - start_fields(version))
    if unknown:
        raise Refusal(ERR_INVALID_REQUEST, f"unknown /start parameter(s): {', '.join(unknown)}")
    if not isinstance(body.get("skipDiskSpaceCheck", False), bool):
        raise Refusal(ERR_INVALID_REQUEST, "skipDiskSpaceCheck must be a boolean")
    source, destination = body.get("source"), body.get("destination")
    if source is None or destination is None:
        raise Refusal(ERR_INVALID_REQUEST, "source and destination are required (\"cluster0\" / \"cluster1\")")
    if source not in CLUSTERS or destination not in CLUSTERS or source == destination:
        raise Refusal(ERR_INVALID_REQUEST, f"source and destination must be cluster0 and cluster1 (one each), not "
                                           f"{source!r} and {destination!r}")
    if "sharding" in body:
        raise Refusal(ERR_INVALID_REQUEST, "the sharding option is only for a replica-set source and a sharded "
                                           "destination; both clusters here are replica sets")
    build_indexes = body.get("buildIndexes", "afterDataCopy")
    if build_indexes not in BUILD_INDEXES_OPTIONS:
        raise Refusal(ERR_INVALID_REQUEST, f"buildIndexes must be one of {', '.join(BUILD_INDEXES_OPTIONS)}, not "
                                           f"{build_indexes!r}")
    reversible = body.get("reversible", False)
    if not isinstance(reversible, bool):
        raise Refusal(ERR_INVALID_REQUEST, "reversible must be a boolean")
    blocking_raw = body.get("enableUserWriteBlocking", startup_write_blocking or "destinationOnly")
    if isinstance(blocking_raw, bool):
        blocking = WRITE_BLOCKING[blocking_raw]
    elif isinstance(blocking_raw, str) and blocking_raw in WRITE_BLOCKING:
        blocking = WRITE_BLOCKING[blocking_raw]
    else:
        raise Refusal(ERR_INVALID_REQUEST, "enableUserWriteBlocking must be \"sourceAndDestination\", "
                                           "\"destinationOnly\", \"none\", true or false")
    if reversible and build_indexes == "never":
        raise Refusal(ERR_INVALID_REQUEST, "reversible cannot be true when buildIndexes is \"never\"")
    if reversible and blocking != "sourceAndDestination":
        raise Refusal(ERR_INVALID_REQUEST, "a reversible sync needs enableUserWriteBlocking set to "
                                           "\"sourceAndDestination\"" + (" (or true)" if version_tuple(version) < (1, 20)
                                                                          else " in mongosync's startup configuration"))
    verification = body.get("verification", {})
    if not isinstance(verification, dict) or set(verification) - {"enabled"} \
            or not isinstance(verification.get("enabled", True), bool):
        raise Refusal(ERR_INVALID_REQUEST, "verification must be {\"enabled\": <boolean>}")
    return StartOptions(
        source=source, destination=destination, build_indexes=build_indexes,
        include=validate_filters(body.get("includeNamespaces"), "includeNamespaces"),
        exclude=validate_filters(body.get("excludeNamespaces"), "excludeNamespaces"),
        reversible=reversible, write_blocking=blocking,
        verification_enabled=verification.get("enabled", True),
    )


def filter_matches(entry: dict[str, Any], db: str, coll: str) -> bool:
    """Whether one mongosync filter selects ``db.coll`` (regexes are unanchored searches, as ``$regex``)."""
    if "database" in entry:
        if entry["database"] != db:
            return False
    else:
        rx = entry["databaseRegex"]
        if not re.search(rx["pattern"], db, _regex_flags(rx.get("options", ""), "databaseRegex")):
            return False
    if "collections" in entry:
        return coll in entry["collections"]
    if "collectionsRegex" in entry:
        rx = entry["collectionsRegex"]
        return bool(re.search(rx["pattern"], coll, _regex_flags(rx.get("options", ""), "collectionsRegex")))
    return True


@dataclass(frozen=True)
class MongosyncNamespaceFilter(NamespaceFilter):
    """The engine's ``NamespaceFilter`` answering with mongosync's include-then-exclude filter semantics.

    ``include``/``exclude`` hold the filters as canonical JSON strings, so the engine's stored config still
    pins a sync to the filters it was started with (a resume with other filters is refused).
    """

    include_filters: tuple[dict[str, Any], ...] = field(default=(), compare=False)
    exclude_filters: tuple[dict[str, Any], ...] = field(default=(), compare=False)

    @classmethod
    def from_filters(cls, include: tuple[dict[str, Any], ...], exclude: tuple[dict[str, Any], ...]
                     ) -> MongosyncNamespaceFilter:
        def canonical(items: tuple[dict[str, Any], ...]) -> tuple[str, ...]:
            return tuple(json.dumps(item, sort_keys=True) for item in items)

        return cls(include=canonical(include), exclude=canonical(exclude), include_filters=include,
                   exclude_filters=exclude)

    def matches(self, db: str, coll: str) -> bool:
        if db in SYSTEM_DATABASES or db == STATE_DB or coll.startswith("system."):
            return False
        if self.include_filters and not any(filter_matches(f, db, coll) for f in self.include_filters):
            return False
        return not any(filter_matches(f, db, coll) for f in self.exclude_filters)

    def unmatched_includes(self, namespaces: list[str]) -> list[str]:
        # mongosync accepts filters naming databases that do not exist (yet): they sync what appears later.
        return []


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def version_problem(version: str, role: str, mongosync_version: str = DEFAULT_VERSION) -> str | None:
    """Why ``version`` cannot be mongosync's ``role`` ("source"/"destination"), or None. From 1.19 on,
    4.4 sources and 6.0 destinations are no longer supported."""
    v = _version_tuple(version)
    dropped = version_tuple(mongosync_version) >= (1, 19)
    if role == "destination":
        floor_dst = (7, 0, 0) if dropped else MIN_DESTINATION_VERSION
        if v >= floor_dst:
            return None
        return f"the destination runs MongoDB {version}; {floor_dst[0]}.{floor_dst[1]} or later is needed"
    if dropped and v[:2] == (4, 4):
        return (f"the source runs MongoDB {version}; mongosync {mongosync_version} supports sources from 5.0 "
                "(5.0.29+, 6.0.24+, 7.0.18+, 8.0.5+)")
    floor = MIN_SOURCE_VERSIONS.get(v[:2])
    if floor is None:
        if v > max(MIN_SOURCE_VERSIONS.values()):
            return None
        return f"the source runs MongoDB {version}; supported are 4.4.29+, 5.0.29+, 6.0.24+, 7.0.18+ and 8.0.5+"
    if v < floor:
        return f"the source runs MongoDB {version}; {'.'.join(map(str, floor))} or later of that release is needed"
    return None


def _hosts(uri: str) -> str:
    """``host:port[,host:port]`` of a MongoDB URI (no credentials, no options)."""
    from pymongo.uri_parser import parse_uri

    try:
        nodes = parse_uri(uri, validate=False, warn=True).get("nodelist") or []
    except Exception:  # noqa: BLE001 - e.g. an SRV URI that does not resolve here: show the host part only
        rest = uri.split("://", 1)[-1].rsplit("@", 1)[-1]
        return rest.split("/", 1)[0].split("?", 1)[0]
    return ",".join(f"{host}:{port}" for host, port in nodes)


# --------------------------------------------------------------------------------------------------
# The state machine and the worker running the engine
# --------------------------------------------------------------------------------------------------


@dataclass
class Fault:
    """An injected reply for the next ``count`` calls matching ``path`` (and ``method``)."""

    path: str
    count: int = 1
    method: str | None = None
    status: int = 400
    error: str = ERR_INTERNAL
    errorDescription: str = "injected failure"  # noqa: N815 - the wire name
    raw: str | None = None


class MongosyncCore:
    """mongosync's state machine; ``handle`` answers one API call, a worker thread moves the data."""

    def __init__(self, cluster0: str, cluster1: str, settings: Settings | None = None,
                 engine_factory: Callable[..., Any] | None = None, *, version: str = DEFAULT_VERSION,
                 write_blocking: str | None = None, capped_collection_handling: bool = False) -> None:
        import pymongo

        version_tuple(version)  # refuses a release this server does not imitate
        if version_tuple(version) < (1, 20) and (write_blocking is not None or capped_collection_handling):
            raise ValueError(f"--enableUserWriteBlocking and --enableCappedCollectionHandling are startup options "
                             f"from mongosync 1.20 on; {version} takes enableUserWriteBlocking in /start")
        if write_blocking is not None and write_blocking not in WRITE_BLOCKING_OPTIONS:
            raise ValueError(f"--enableUserWriteBlocking must be one of {', '.join(WRITE_BLOCKING_OPTIONS)}")
        self.version = version
        self.startup_write_blocking = write_blocking
        self.capped_collection_handling = capped_collection_handling
        self.uris = {"cluster0": cluster0, "cluster1": cluster1}
        self.secrets = [p for p in (_password(cluster0), _password(cluster1)) if p]
        self.settings = settings or Settings()
        if engine_factory is None:
            from atlas_migration.engines.live import LiveSync

            engine_factory = LiveSync
        self.engine_factory = engine_factory
        self.mongosync_id = "mongosync-" + uuid.uuid4().hex[:12]
        self.clients = {name: pymongo.MongoClient(uri, serverSelectionTimeoutMS=10_000)
                        for name, uri in self.uris.items()}
        self._ping_clients = {name: pymongo.MongoClient(uri, serverSelectionTimeoutMS=2_000, connectTimeoutMS=2_000)
                              for name, uri in self.uris.items()}
        self._lock = threading.RLock()
        self._api_lock = threading.Lock()  # one state-changing call at a time, as mongosync serialises them
        self._pause_requested = threading.Event()
        self._commit_requested = threading.Event()
        self._worker_parked = threading.Event()  # the worker stopped between two rounds for the commit
        self._commit_point_ready = threading.Event()
        self._shutdown = threading.Event()
        self._worker: threading.Thread | None = None
        self.requests: deque[dict[str, Any]] = deque(maxlen=1000)
        self.faults: list[Fault] = []
        self._pings: dict[str, int | None] = {"cluster0": None, "cluster1": None}
        self._pinged_at = 0.0
        self._reset_sync_fields()
        self.state = INITIALIZING
        self._init_thread = threading.Thread(target=self._initialize, name="mongosync-init", daemon=True)
        self._init_thread.start()

    def _reset_sync_fields(self) -> None:
        self.options: StartOptions | None = None
        self.sync_id: str | None = None
        self.direction = ("cluster0", "cluster1")
        self.reversals = 0
        self.phase = "idle"  # idle | copy | cea | commit | committed | reversing
        self.info: str | None = None
        self.can_write = False
        self.total_bytes = 0
        self.copied: dict[str, tuple[int, int]] = {}  # partition id -> (documents, bytes)
        self.partitions_total = 0
        self.partitions_skipped = 0  # found already copied by a resumed worker (the engine's checkpoints)
        self.lag_seconds: float | None = None
        self.events_applied = 0
        self.verification: dict[str, Any] = {"phase": "disabled", "total": 0, "scanned": 0, "mismatches": []}
        self.fatal: tuple[str, str] | None = None
        self.injected_failure: tuple[str, str] | None = None
        self.warnings: list[str] = []
        self.commit_point: Any = None  # the source op time /commit stopped at (a bson Timestamp)
        self.source_write_blocked = False  # setUserWriteBlockMode {global: true} sent to the source at /commit
        self.backlog_drained = False  # change event application has caught up once (1.22 ceaStage)
        self.oplog_window_seconds: float | None = None
        self._capped_at_start: set[tuple[str, str]] = set()
        self._capped_checked_at = 0.0

    # ---- initialisation --------------------------------------------------------------------------

    def _initialize(self) -> None:
        """INITIALIZING -> IDLE once both clusters answer and are replica sets (or sharded clusters)."""
        deadline = time.monotonic() + self.settings.initializing_seconds
        while time.monotonic() < deadline and not self._shutdown.is_set():
            time.sleep(0.05)
        while not self._shutdown.is_set():
            problems: list[str] = []
            for name in CLUSTERS:
                try:
                    hello = self.clients[name].admin.command("hello")
                except Exception as exc:  # noqa: BLE001 - keep trying, as mongosync does while initializing
                    problems.append(f"{name}: cannot connect: {self._redact(str(exc))[:200]}")
                    continue
                if not hello.get("setName") and hello.get("msg") != "isdbgrid":
                    with self._lock:
                        self.fatal = (ERR_UNSUPPORTED_CLUSTER, f"{name} ({_hosts(self.uris[name])}) is a standalone "
                                      "server: mongosync needs replica sets or sharded clusters (change streams)")
                    return
            if not problems:
                with self._lock:
                    self.warnings = []
                    self.state = IDLE
                return
            with self._lock:
                self.warnings = problems
            self._shutdown.wait(1.0)

    # ---- helpers ---------------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        return redact(text, self.secrets)

    def _reported_lag(self) -> float | None:
        forced = self.settings.forced_lag_seconds
        return forced if forced is not None else self.lag_seconds

    def can_commit(self) -> bool:
        lag = self._reported_lag()
        return (self.state == RUNNING and self.phase == "cea" and self.fatal is None and lag is not None
                and lag <= self.settings.commit_lag_limit_seconds)

    def _require_state(self, endpoint: str) -> None:
        allowed = ENDPOINT_STATES[endpoint]
        if self.fatal is not None:
            error, description = self.fatal
            raise Refusal(error, f"the migration has failed, {endpoint} is not possible: {description}")
        if self.state not in allowed:
            verb = endpoint.lstrip("/")
            raise Refusal(ERR_INVALID_STATE, f"cannot {verb} while mongosync is in the {self.state} state; "
                                             f"{endpoint} is only allowed in the {' or '.join(allowed)} state")

    @staticmethod
    def _no_parameters(endpoint: str, body: dict[str, Any]) -> None:
        if body:
            raise Refusal(ERR_INVALID_REQUEST, f"{endpoint} takes no request body parameters (send {{}}), got "
                                               f"{', '.join(sorted(body))}")

    # ---- endpoints -------------------------------------------------------------------------------

    def start(self, body: dict[str, Any]) -> None:
        with self._api_lock:
            with self._lock:
                self._require_state("/start")
            options = parse_start(body, self.version, self.startup_write_blocking)
            for role, name in (("source", options.source), ("destination", options.destination)):
                version = self.clients[name].admin.command("buildInfo").get("version", "0")
                problem = version_problem(version, role, self.version)
                if problem:
                    raise Refusal(ERR_UNSUPPORTED_VERSION, f"{name}: {problem}")
            if options.write_blocking == "sourceAndDestination":
                problem = self._write_block_problem(options.source)
                if problem:
                    where = ("enableUserWriteBlocking is \"sourceAndDestination\" in mongosync's startup "
                             "configuration" if version_tuple(self.version) >= (1, 20)
                             else "/start asks for enableUserWriteBlocking \"sourceAndDestination\"")
                    raise Refusal(ERR_WRITE_BLOCKING_UNSUPPORTED,
                                  f"{where}, but writes cannot be blocked on the source {options.source}: {problem}. "
                                  "Dual write blocking needs a MongoDB 6.0+ source and a user allowed to run "
                                  "setUserWriteBlockMode; use destinationOnly (and stop writes to the source "
                                  "yourself before /commit) otherwise")
            capped = self._capped_namespaces(options) if self._watch_capped() else set()
            with self._lock:
                self._capped_at_start = capped
                self.options = options
                self.sync_id = "sync-" + uuid.uuid4().hex[:16]
                self.direction = (options.source, options.destination)
                self.verification["phase"] = "waiting for commit" if options.verification_enabled else "disabled"
                self.state, self.phase, self.info = RUNNING, "copy", INFO_COPY
                self._spawn("forward")

    def pause(self, body: dict[str, Any]) -> None:
        self._no_parameters("/pause", body)
        with self._api_lock:
            with self._lock:
                self._require_state("/pause")
                worker = self._worker
                self._pause_requested.set()
            if worker is not None:
                worker.join(self.settings.pause_timeout_seconds)
                if worker.is_alive():
                    raise Refusal(ERR_INTERNAL, f"the sync did not reach a safe point to pause within "
                                                f"{self.settings.pause_timeout_seconds:.0f} s; retry /pause", 500)
            with self._lock:
                self._pause_requested.clear()
                if self.fatal is not None:  # failed on its way to the safe point
                    error, description = self.fatal
                    raise Refusal(error, f"the migration failed while pausing: {description}", 500)
                self.state = PAUSED

    def resume(self, body: dict[str, Any]) -> None:
        self._no_parameters("/resume", body)
        with self._api_lock, self._lock:
            self._require_state("/resume")
            self.state = RUNNING
            self._spawn("forward")

    def commit(self, body: dict[str, Any]) -> None:
        """RUNNING -> COMMITTING: fix the commit point, then let the worker drain exactly to it.

        As mongosync does: with dual write blocking the source's user writes are blocked first, so the
        commit point follows every write the source will ever acknowledge; without it the commit point is
        the source's current op time, and writes after it are never applied (the application must have
        stopped writing before /commit). The worker is parked between two change-stream rounds before the
        point is read, so nothing it applied lies after the point.
        """
        self._no_parameters("/commit", body)
        with self._api_lock:
            with self._lock:
                self._require_state("/commit")
                if not self.can_commit():
                    lag = self._reported_lag()
                    why = ("the initial collection copy has not finished" if self.phase == "copy"
                           else f"lagTimeSeconds is {lag:.0f}, above {self.settings.commit_lag_limit_seconds:.0f}"
                           if lag is not None else "the lag is not known yet")
                    raise Refusal(ERR_COMMIT_NOT_READY, f"cannot commit: canCommit is false ({why}); wait until "
                                                        "/progress reports canCommit: true")
                self.state, self.info = COMMITTING, INFO_COMMITTING
                self._commit_point_ready.clear()
                self._commit_requested.set()
                worker = self._worker
            deadline = time.monotonic() + self.settings.pause_timeout_seconds
            while not self._worker_parked.wait(0.05):
                if worker is None or not worker.is_alive() or time.monotonic() >= deadline:
                    self._abandon_commit()
                    with self._lock:
                        fatal = self.fatal
                    if fatal is not None:
                        raise Refusal(fatal[0], f"the migration failed while committing: {fatal[1]}", 500)
                    raise Refusal(ERR_INTERNAL, "the sync did not reach a point to commit at; retry /commit", 500)
            try:
                point, blocked = self._take_commit_point()
            except Exception as exc:  # noqa: BLE001 - the commit does not happen; the sync goes on
                self._abandon_commit()
                raise Refusal(ERR_INTERNAL, self._redact(f"cannot commit: the commit point could not be taken on "
                                                         f"the source: {type(exc).__name__}: {exc}")[:1000], 500) from None
            with self._lock:
                self.commit_point, self.source_write_blocked = point, blocked
            self._commit_point_ready.set()

    def _abandon_commit(self) -> None:
        with self._lock:
            self.commit_point = None
            if self.state == COMMITTING:
                self.state, self.info = RUNNING, INFO_CEA
        self._commit_requested.clear()
        self._commit_point_ready.set()

    def _take_commit_point(self) -> tuple[Any, bool]:
        """(the source's op time to commit at, whether user writes were blocked on the source first)."""
        assert self.options is not None
        source = self.clients[self.direction[0]]
        blocked = False
        if self.options.write_blocking == "sourceAndDestination":
            source.admin.command("setUserWriteBlockMode", 1, **{"global": True})
            blocked = True
        hello = source.admin.command("hello")
        point = ((hello.get("lastWrite") or {}).get("opTime") or {}).get("ts") or hello.get("operationTime")
        if point is None:
            raise RuntimeError("the source reports no op time (hello has neither lastWrite nor operationTime)")
        return point, blocked

    def _write_block_problem(self, cluster: str) -> str | None:
        """Why ``setUserWriteBlockMode`` cannot be used on ``cluster``, or None. Probed without effect: the
        command without its required ``global`` field is refused by a server that has it (a parse error)
        and answered CommandNotFound by one that does not."""
        from pymongo.errors import OperationFailure, PyMongoError

        client = self.clients[cluster]
        try:
            version = client.admin.command("buildInfo").get("version", "0")
        except PyMongoError as exc:
            return f"buildInfo failed ({type(exc).__name__})"
        if _version_tuple(version)[:2] < (6, 0):
            return f"it runs MongoDB {version}, and setUserWriteBlockMode exists from 6.0"
        try:
            client.admin.command("setUserWriteBlockMode", 1)
        except OperationFailure as exc:
            if exc.code == _COMMAND_NOT_FOUND:
                return f"the server has no setUserWriteBlockMode command (MongoDB {version}, CommandNotFound)"
            if exc.code == _UNAUTHORIZED:
                return "the user lacks the setUserWriteBlockMode privilege"
            return None
        except PyMongoError as exc:
            return f"setUserWriteBlockMode could not be checked ({type(exc).__name__})"
        return None  # accepted without ``global``: present (and lenient)

    def _watch_capped(self) -> bool:
        return version_tuple(self.version) >= (1, 20) and not self.capped_collection_handling

    def _capped_namespaces(self, options: StartOptions) -> set[tuple[str, str]]:
        """The selected capped collections on the source now."""
        source = self.clients[self.direction[0] if self.options else options.source]
        selected = MongosyncNamespaceFilter.from_filters(options.include, options.exclude)
        found: set[tuple[str, str]] = set()
        for db in source.list_database_names():
            if db in SYSTEM_DATABASES or db == STATE_DB:
                continue
            for info in source[db].list_collections():
                if (info.get("options") or {}).get("capped") and selected.matches(db, info["name"]):
                    found.add((db, info["name"]))
        return found

    def _check_capped(self) -> None:
        """1.20+: a capped collection created during the sync fails the migration unless mongosync was
        started with --enableCappedCollectionHandling (checked every 2 s)."""
        if not self._watch_capped() or self.options is None or time.monotonic() - self._capped_checked_at < 2.0:
            return
        self._capped_checked_at = time.monotonic()
        new = sorted(self._capped_namespaces(self.options) - self._capped_at_start)
        if new:
            raise Refusal(ERR_SYNC_FAILED, f"{CAPPED_NOT_ENABLED} ({', '.join(f'{d}.{c}' for d, c in new)})", 500)

    def reverse(self, body: dict[str, Any]) -> None:
        self._no_parameters("/reverse", body)
        with self._api_lock, self._lock:
            self._require_state("/reverse")
            assert self.options is not None
            if not self.options.reversible:
                raise Refusal(ERR_NOT_REVERSIBLE, "cannot reverse: the sync was not started with reversible: true "
                                                  "and enableUserWriteBlocking: \"sourceAndDestination\"")
            self.reversals += 1
            self.direction = (self.direction[1], self.direction[0])
            self.copied, self.total_bytes, self.partitions_total, self.partitions_skipped = {}, 0, 0, 0
            self.lag_seconds, self.can_write = None, False
            if self.options.verification_enabled:
                self.verification = {"phase": "waiting for commit", "total": 0, "scanned": 0, "mismatches": []}
            self.state, self.phase, self.info = REVERSING, "reversing", None
            self._spawn("reverse")

    def progress(self) -> dict[str, Any]:
        self._refresh_pings()
        with self._lock:
            if self.fatal is not None:
                error, description = self.fatal
                raise Refusal(error, description, 500)
            lag = self._reported_lag()
            lag_int = None if lag is None else int(round(lag))
            copied = sum(b for _, b in self.copied.values())
            total = max(self.total_bytes, copied)
            source, destination = self.direction
            verification = self._verification_block(lag_int)
            reply: dict[str, Any] = {
                "state": self.state,
                "canCommit": self.can_commit(),
                "canWrite": self.can_write,
                "info": self.info,
                "lagTimeSeconds": lag_int,
                "collectionCopy": {"estimatedTotalBytes": total, "estimatedCopiedBytes": copied},
                "directionMapping": {"Source": f"{source}: {_hosts(self.uris[source])}",
                                     "Destination": f"{destination}: {_hosts(self.uris[destination])}"},
                "source": {"pingLatencyMs": self._pings[source]},
                "destination": {"pingLatencyMs": self._pings[destination]},
                "verification": verification,
                "mongosyncID": self.mongosync_id,
                "coordinatorID": self.mongosync_id,
            }
            version = version_tuple(self.version)
            if version >= (1, 19):
                reply["estimatedOplogTimeRemaining"] = self._oplog_time_remaining(lag)
                reply["warnings"] = list(self.warnings)
            if version >= (1, 21):
                reply["lag"] = {"overallLagSeconds": lag_int, "crudLagSeconds": lag_int, "ddlLagSeconds": lag_int}
            if version >= (1, 22):
                reply["ceaStage"] = (None if self.info != INFO_CEA
                                     else "applying new events" if self.backlog_drained else "draining backlog")
            return reply

    def _oplog_time_remaining(self, lag: float | None) -> str | None:
        """How long the source's oplog still holds the oldest event not yet applied, as a Go duration."""
        if self.oplog_window_seconds is None:
            return None
        remaining = max(0, int(self.oplog_window_seconds - (lag or 0)))
        hours, rest = divmod(remaining, 3600)
        minutes, seconds = divmod(rest, 60)
        return f"{hours}h{minutes}m{seconds}s" if hours else f"{minutes}m{seconds}s" if minutes else f"{seconds}s"

    def _verification_block(self, lag: int | None) -> dict[str, Any]:
        v = self.verification
        side = {"phase": v["phase"]}
        if v["phase"] != "disabled":
            side.update({"lagTimeSeconds": lag, "totalCollectionCount": v["total"],
                         "scannedCollectionCount": v["scanned"]})
        return {"source": dict(side), "destination": dict(side)}

    def _refresh_pings(self) -> None:
        now = time.monotonic()
        if now - self._pinged_at < self.settings.ping_interval_seconds:
            return
        self._pinged_at = now
        for name, client in self._ping_clients.items():
            started = time.perf_counter()
            try:
                client.admin.command("ping")
                self._pings[name] = max(0, int(round((time.perf_counter() - started) * 1000)))
            except Exception:  # noqa: BLE001 - unreachable right now: report no latency
                self._pings[name] = None

    # ---- test knobs ------------------------------------------------------------------------------

    def inject_failure(self, error: str, description: str) -> None:
        with self._lock:
            worker_running = self._worker is not None and self._worker.is_alive()
            if worker_running:
                self.injected_failure = (error, description)
            else:
                self.fatal = (error, description)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "state": self.state, "phase": self.phase, "info": self.info, "syncId": self.sync_id,
                "direction": list(self.direction), "reversals": self.reversals,
                "options": self.options.to_dict() if self.options else None,
                "partitions": {"total": self.partitions_total, "copied": len(self.copied),
                               "skippedAsCopied": self.partitions_skipped},
                "copiedDocuments": sum(d for d, _ in self.copied.values()),
                "copiedBytes": sum(b for _, b in self.copied.values()), "totalBytes": self.total_bytes,
                "engineLagSeconds": self.lag_seconds, "eventsApplied": self.events_applied,
                "verification": dict(self.verification), "fatal": list(self.fatal) if self.fatal else None,
                "workerAlive": bool(self._worker and self._worker.is_alive()), "settings": asdict(self.settings),
                "version": self.version, "startupWriteBlocking": self.startup_write_blocking,
                "cappedCollectionHandling": self.capped_collection_handling,
                "commitPoint": None if self.commit_point is None else [self.commit_point.time, self.commit_point.inc],
                "sourceWriteBlocked": self.source_write_blocked,
            }

    # ---- the worker ------------------------------------------------------------------------------

    def _spawn(self, mode: str) -> None:
        self._pause_requested.clear()
        self._commit_requested.clear()
        self._worker = threading.Thread(target=self._run, args=(mode,), name=f"mongosync-{mode}", daemon=True)
        self._worker.start()

    def _safe_point(self) -> None:
        """Where the worker may stop: an injected failure, a pause or a shutdown takes effect here."""
        with self._lock:
            failure, self.injected_failure = self.injected_failure, None
        if failure is not None:
            raise Refusal(*failure, status=500)
        if self._pause_requested.is_set() or self._shutdown.is_set():
            raise _Stop()

    def _engine(self) -> Any:
        assert self.options is not None and self.sync_id is not None
        source, destination = self.direction
        engine = self.engine_factory(
            self.clients[source], self.clients[destination],
            sync_id=self.sync_id if self.reversals == 0 else f"{self.sync_id}-reverse-{self.reversals}",
            namespaces=MongosyncNamespaceFilter.from_filters(self.options.include, self.options.exclude),
            state_db=STATE_DB, batch_size=self.settings.batch_size, partition_docs=self.settings.partition_docs,
            copy_order="id_range",  # mongosync's own partitions are _id ranges
            log=log,
        )
        engine.max_await_ms = self.settings.max_await_ms
        return engine

    def _run(self, mode: str) -> None:
        prober_stop = threading.Event()
        try:
            engine = self._engine()
            engine.start()
            threading.Thread(target=self._probe_lag, args=(engine, prober_stop), name="mongosync-lag",
                             daemon=True).start()
            self._safe_point()
            if self.phase in ("copy", "reversing"):
                self._initial_copy(engine, drop=mode == "reverse")
            self._apply_changes(engine)
        except _Stop:
            return
        except Refusal as exc:  # an injected failure
            with self._lock:
                self.fatal = (exc.error, exc.description)
        except Exception as exc:  # noqa: BLE001 - any engine failure ends the migration, reported by /progress
            log.exception("mongosync worker failed")
            with self._lock:
                self.fatal = (ERR_SYNC_FAILED, self._redact(f"{type(exc).__name__}: {exc}")[:2000])
        finally:
            prober_stop.set()

    def _probe_lag(self, engine: Any, stop: threading.Event) -> None:
        """``engine.lag()`` every ``lag_probe_seconds`` beside the worker: it counts the source's oplog
        entries past the applied point, which takes seconds on a long oplog, so it must not hold up the
        copy or a pause. Between probes, each change-stream round reports its own lag."""
        while not stop.is_set():
            try:
                info = engine.lag()
            except Exception as exc:  # noqa: BLE001 - the state may not exist yet, or a cluster is away
                log.debug("lag probe failed: %s", exc)
            else:
                with self._lock:
                    if not stop.is_set() and self.phase in ("copy", "cea"):
                        self.lag_seconds = info.lag_seconds
            if version_tuple(self.version) >= (1, 19):
                window = engine.oplog_window_hours()
                with self._lock:
                    self.oplog_window_seconds = None if window is None else window * 3600
            stop.wait(self.settings.lag_probe_seconds)

    def _initial_copy(self, engine: Any, *, drop: bool) -> None:
        partitions = engine.plan_partitions()
        total = self._estimate_bytes(engine, partitions)
        with self._lock:
            self.partitions_total, self.total_bytes = len(partitions), total
        self._safe_point()
        # Reverse: the old source still holds the data this sync is about to copy back; a fresh copy
        # replaces it (prepare_targets never drops twice: once prepared, a resumed sync skips this).
        engine.prepare_targets(drop=drop)
        with self._lock:
            if self.state == REVERSING:
                self.state, self.phase, self.info = RUNNING, "copy", INFO_COPY
        for partition in partitions:
            self._safe_point()
            result = engine.copy_partition(partition)
            with self._lock:
                self.copied[result.partition] = (result.documents, result.bytes)
                self.partitions_skipped += int(result.already_done)
        self._safe_point()
        engine.finish_initial_copy()
        with self._lock:
            self.phase, self.info = "cea", INFO_CEA

    def _estimate_bytes(self, engine: Any, partitions: list[Any]) -> int:
        source = engine.source
        total = 0
        for db, coll in sorted({(p.db, p.collection) for p in partitions}):
            try:
                total += int(source[db].command("collStats", coll).get("size") or 0)
            except Exception:  # noqa: BLE001 - no collStats (privileges): the copy's own count stands in
                continue
        return total

    def _apply_changes(self, engine: Any) -> None:
        while True:
            self._safe_point()
            if self._commit_requested.is_set():
                # Park between two rounds; /commit reads the commit point now and hands it over.
                self._worker_parked.set()
                try:
                    while not self._commit_point_ready.wait(0.05):
                        self._safe_point()
                finally:
                    self._worker_parked.clear()
                with self._lock:
                    point = self.commit_point
                if point is None:  # the commit was abandoned: keep applying events
                    continue
                self._commit(engine, point)
                return
            self._check_capped()
            result = engine.catch_up(max_seconds=self.settings.round_seconds)
            with self._lock:
                self.events_applied += result.events_applied
                if result.lag_seconds is not None:
                    self.lag_seconds = result.lag_seconds
                    self.backlog_drained = self.backlog_drained or result.lag_seconds == 0.0

    def _commit(self, engine: Any, point: Any) -> None:
        """Apply every event up to the commit point and none after it, build the deferred indexes, verify."""
        result = engine.drain_to(point, timeout=self.settings.commit_drain_timeout_seconds)
        with self._lock:
            self.events_applied += result.events_applied
            self.lag_seconds = 0.0
        # Updates whose lookup came back empty are re-read (mongosync does not drop them either), then
        # mongosync builds the remaining indexes before COMMITTED (the engine's cutover step does the same,
        # without the cutover's wait for writes to stop, which mongosync does not do).
        engine.apply_rechecks()
        engine._align_with_source()
        assert self.options is not None
        if self.options.verification_enabled:
            self._verify(engine)
        with self._lock:
            # The lag prober may have reported the source's progress meanwhile: committed means no lag.
            self.state, self.phase, self.info, self.can_write = COMMITTED, "committed", INFO_COMMITTED, True
            self.lag_seconds = 0.0

    def _verify(self, engine: Any) -> None:
        """Document counts and index names of every migrated namespace, source against destination."""
        from atlas_migration.engines.native import index_specs_for_restore

        source, destination = engine.source, engine.target
        namespaces = [(db, info["name"]) for db in sorted(source.list_database_names())
                      for info in source[db].list_collections()
                      if info.get("type") != "view" and engine.namespaces.matches(db, info["name"])]
        with self._lock:
            self.verification.update(phase="verifying", total=len(namespaces), scanned=0, mismatches=[])
        mismatches = []
        for db, coll in namespaces:
            src, dst = source[db][coll], destination[db][coll]
            counts = src.count_documents({}), dst.count_documents({})
            indexes = ({s["name"] for s in index_specs_for_restore(src.list_indexes())},
                       {s["name"] for s in index_specs_for_restore(dst.list_indexes())})
            if counts[0] != counts[1]:
                mismatches.append(f"{db}.{coll}: {counts[0]} documents on the source, {counts[1]} on the destination")
            if indexes[0] != indexes[1]:
                mismatches.append(f"{db}.{coll}: indexes {sorted(indexes[0])} on the source, {sorted(indexes[1])} "
                                  "on the destination")
            with self._lock:
                self.verification["scanned"] += 1
        with self._lock:
            self.verification.update(phase="failed" if mismatches else "completed", mismatches=mismatches)
        if mismatches:
            raise Refusal(ERR_VERIFICATION_FAILED, "verification found differences: " + "; ".join(mismatches[:20]),
                          500)

    # ---- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        self._shutdown.set()
        worker = self._worker
        if worker is not None:
            worker.join(30)
        self._init_thread.join(5)
        for client in (*self.clients.values(), *self._ping_clients.values()):
            client.close()

    # ---- dispatch --------------------------------------------------------------------------------

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.path == path and (fault.method is None or fault.method == method) and fault.count > 0:
                    fault.count -= 1
                    if fault.count == 0:
                        self.faults.remove(fault)
                    return fault
        return None

    def handle(self, method: str, path: str, raw_body: bytes) -> tuple[int, Any]:
        """One API call: (HTTP status, JSON body)."""
        endpoint = path[len(API_PREFIX):] if path.startswith(API_PREFIX + "/") else None
        handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "/start": self.start, "/pause": self.pause, "/resume": self.resume, "/commit": self.commit,
            "/reverse": self.reverse,
        }
        try:
            if endpoint is None or (endpoint not in handlers and endpoint != "/progress"):
                raise Refusal(ERR_NOT_FOUND, f"no such endpoint: {path}", 404)
            expected = "GET" if endpoint == "/progress" else "POST"
            if method != expected:
                raise Refusal(ERR_METHOD_NOT_ALLOWED, f"{endpoint} takes {expected}, not {method}", 405)
            with self._lock:
                starting = self.state == INITIALIZING and self.fatal is None
            if starting and version_tuple(self.version) < (1, 20):
                # Before 1.20 there is no INITIALIZING state: the API is not up until both clusters answer.
                return 503, f"mongosync {self.version} is still connecting to the clusters"
            fault = self.take_fault(method, endpoint)
            if fault is not None:
                if fault.raw is not None:
                    return fault.status, fault.raw
                raise Refusal(fault.error, fault.errorDescription, fault.status)
            if endpoint == "/progress":
                return 200, {"success": True, "progress": self.progress()}
            try:
                body = json.loads(raw_body) if raw_body else None
            except ValueError:
                body = None
            if not isinstance(body, dict):
                raise Refusal(ERR_INVALID_REQUEST, "the request body must be a JSON object; send {} for an "
                                                   "endpoint without parameters")
            with self._lock:
                if self.state == INITIALIZING and self.fatal is None:
                    raise Refusal(ERR_INVALID_STATE, f"mongosync is still INITIALIZING: {endpoint} is not possible "
                                                     "yet; wait until /progress reports IDLE")
            handlers[endpoint](body)
            return 200, {"success": True}
        except Refusal as exc:
            return exc.status, {"success": False, "error": exc.error,
                                "errorDescription": self._redact(exc.description)}
        except Exception as exc:  # noqa: BLE001 - a bug here must still answer in mongosync's shape
            log.exception("mongosync server: %s %s failed", method, path)
            return 500, {"success": False, "error": ERR_INTERNAL,
                         "errorDescription": self._redact(f"{type(exc).__name__}: {exc}")[:1000]}


def _password(uri: str) -> str | None:
    netloc = uri.split("://", 1)[-1].split("/", 1)[0]
    if "@" not in netloc:
        return None
    userinfo = netloc.rsplit("@", 1)[0]
    from urllib.parse import unquote_plus

    return unquote_plus(userinfo.split(":", 1)[1]) if ":" in userinfo else None


# --------------------------------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------------------------------


class _Handler(DispatchingHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mongosync"
    sys_version = ""
    core: MongosyncCore

    def _dispatch(self) -> None:
        raw = self.read_body()
        path = urlsplit(self.path).path
        if path.startswith(ADMIN_PREFIX):
            status, body = self._admin(path[len(ADMIN_PREFIX):], raw)
        else:
            status, body = self.core.handle(self.command, path, raw)
            self.core.requests.append({"method": self.command, "path": path, "status": status,
                                       "error": body.get("error") if isinstance(body, dict) else None})
        self._send(status, body)

    def _send(self, status: int, body: Any) -> None:
        if isinstance(body, str):
            payload, content_type = body.encode(), "text/plain; charset=utf-8"
        else:
            payload, content_type = (b"" if body is None else json.dumps(body).encode()), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    def _admin(self, sub: str, raw: bytes) -> tuple[int, Any]:
        core = self.core
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return 400, {"error": "body is not JSON"}
        try:
            if sub == "/state" and self.command == "GET":
                return 200, core.snapshot()
            if sub == "/settings":
                if self.command in ("PATCH", "POST"):
                    with core._lock:
                        core.settings.update(body)
                return 200, asdict(core.settings)
            if sub == "/lag" and self.command == "POST":
                with core._lock:
                    core.settings.update({"forced_lag_seconds": body.get("seconds")})
                return 200, {"forced_lag_seconds": core.settings.forced_lag_seconds}
            if sub == "/fail" and self.command == "POST":
                core.inject_failure(str(body.get("error") or ERR_SYNC_FAILED),
                                    str(body.get("errorDescription") or "injected failure"))
                return 200, core.snapshot()
            if sub == "/faults":
                if self.command == "DELETE":
                    with core._lock:
                        core.faults.clear()
                    return 204, None
                items = body if isinstance(body, list) else [body]
                with core._lock:
                    core.faults.extend(Fault(**item) for item in items)
                    return 200, [asdict(f) for f in core.faults]
            if sub == "/requests":
                if self.command == "DELETE":
                    core.requests.clear()
                    return 204, None
                return 200, list(core.requests)
        except (TypeError, ValueError) as exc:
            return 400, {"error": str(exc)}
        return 404, {"error": f"unknown admin endpoint {ADMIN_PREFIX}{sub}"}


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


class MongosyncServer(LoopbackHttpService):
    """The stand-in on ``host:port`` (0 = a free port); ``start()`` serves from a daemon thread."""

    thread_name = "mongosync-server"

    def __init__(self, cluster0: str, cluster1: str, *, host: str = "127.0.0.1", port: int = 0,
                 settings: Settings | None = None, engine_factory: Callable[..., Any] | None = None,
                 version: str = DEFAULT_VERSION, write_blocking: str | None = None,
                 capped_collection_handling: bool = False) -> None:
        self.core = MongosyncCore(cluster0, cluster1, settings, engine_factory, version=version,
                                  write_blocking=write_blocking, capped_collection_handling=capped_collection_handling)
        super().__init__(type("MongosyncHandler", (_Handler,), {"core": self.core}), host, port)

    @property
    def api_url(self) -> str:
        return self.url + API_PREFIX

    @property
    def settings(self) -> Settings:
        return self.core.settings

    def close(self) -> None:
        self.core.close()

    # Programmatic versions of the admin endpoints.

    def state(self) -> dict[str, Any]:
        return self.core.snapshot()

    def force_lag(self, seconds: float | None) -> None:
        self.update_settings(forced_lag_seconds=seconds)

    def update_settings(self, **changes: Any) -> None:
        with self.core._lock:
            self.core.settings.update(changes)

    def inject_failure(self, error: str = ERR_SYNC_FAILED, description: str = "injected failure") -> None:
        self.core.inject_failure(error, description)

    def add_fault(self, path: str, **kwargs: Any) -> None:
        with self.core._lock:
            self.core.faults.append(Fault(path=path, **kwargs))

    def requests(self, path_contains: str = "") -> list[dict[str, Any]]:
        return [r for r in list(self.core.requests) if path_contains in r["path"]]

    def wait_for_state(self, *states: str, timeout: float = 30.0) -> str:
        """Block until the state is one of ``states``; raises TimeoutError (with the last state) otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            with self.core._lock:
                state, fatal = self.core.state, self.core.fatal
            if state in states:
                return state
            if fatal is not None:
                raise RuntimeError(f"mongosync failed while in {state}: {fatal[0]}: {fatal[1]}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"mongosync still {state} after {timeout:.0f} s (wanted {', '.join(states)})")
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=27182, help="mongosync's default 27182; 0 picks a free port")
    parser.add_argument("--cluster0", required=True, help="MongoDB URI of cluster0")
    parser.add_argument("--cluster1", required=True, help="MongoDB URI of cluster1")
    parser.add_argument("--initializing-seconds", type=float, default=0.0)
    parser.add_argument("--version", default=DEFAULT_VERSION, choices=VERSIONS,
                        help="the mongosync release to imitate (its /start fields and /progress fields)")
    parser.add_argument("--enableUserWriteBlocking", dest="write_blocking", choices=WRITE_BLOCKING_OPTIONS,
                        help="1.20+: write blocking (startup configuration; default destinationOnly)")
    parser.add_argument("--enableCappedCollectionHandling", dest="capped", action="store_true",
                        help="1.20+: allow capped collections created during the sync")
    parser.add_argument("--settings", help="JSON object of Settings fields")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(initializing_seconds=args.initializing_seconds)
    if args.settings:
        settings.update(json.loads(args.settings))
    try:
        server = MongosyncServer(args.cluster0, args.cluster1, host=args.host, port=args.port, settings=settings,
                                 version=args.version, write_blocking=args.write_blocking,
                                 capped_collection_handling=args.capped)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"listening on {server.url}", flush=True)
    server.serve_until_interrupted()


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # SIGTERM: leave through the finally above
    main()
