"""In which order the live initial copy reads a collection: by ``_id`` range, or whole in natural order.

Pure functions on plain data (an ``explain`` reply, a stored checkpoint); ``LiveSync`` does the I/O.

A partition plan of ``_id`` ranges lets several workers copy one collection at once, and each range resumes
after the last ``_id`` it copied. That is cheap when the server walks the ``_id`` index to the range's first
key. A server whose query planner answers an ``_id`` range with a collection scan (its explain's winning plan
holds a ``COLLSCAN``) reads the whole collection once per range, and sorts each range too: N ranges cost N
scans. There the copy reads the collection once, in natural (record) order, as one partition, as mongosync
reads large collections. Such a partition checkpoints by record position where the server reports one
(``$_requestResumeToken``: a ``postBatchResumeToken`` of ``{$recordId: ...}`` per batch, resumed with
``$_resumeAfter``). A record id belongs to one node's storage, so a position is only reused on the node, and
in the election term, that produced it; anywhere else the partition is copied again from its first record,
its documents already on the target being skipped (the change stream replays whatever changed since).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

COPY_ORDERS = ("auto", "id_range", "natural")
DEFAULT_COPY_ORDER = "auto"


def winning_plan_stages(explain: Mapping[str, Any]) -> list[str]:
    """Every ``stage`` name in the winning plan of an ``explain`` reply (``queryPlanner`` verbosity).

    Walks ``queryPlanner.winningPlan`` whole, so the classic tree (``inputStage``/``inputStages``), the
    slot-based engine's ``queryPlan`` and a mongos reply (``winningPlan.shards[].winningPlan``) all count;
    rejected plans do not.
    """
    planner = explain.get("queryPlanner")
    if not isinstance(planner, Mapping):
        return []
    return list(_stages(planner.get("winningPlan")))


def _stages(node: Any) -> Iterator[str]:
    if isinstance(node, Mapping):
        stage = node.get("stage")
        if isinstance(stage, str):
            yield stage
        for key, value in node.items():
            if key != "rejectedPlans":
                yield from _stages(value)
    elif isinstance(node, list):
        for item in node:
            yield from _stages(item)


def ranges_scan_the_collection(explain: Mapping[str, Any]) -> bool:
    """Whether the server answers an ``_id`` range query with a collection scan (True: copy in natural order)."""
    return "COLLSCAN" in winning_plan_stages(explain)


def id_range_explain_command(collection: str, lower: Any, upper: Any) -> dict[str, Any]:
    """The ``explain`` of the query a range partition's copy runs (``queryPlanner``: plans, never executes)."""
    return {
        "explain": {"find": collection, "filter": {"_id": {"$gte": lower, "$lt": upper}}, "sort": {"_id": 1}},
        "verbosity": "queryPlanner",
    }


def natural_find_command(collection: str, batch_size: int, *, request_positions: bool,
                         resume_after: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A ``find`` reading the whole collection in natural order, with majority read concern.

    ``request_positions``: ask for a ``postBatchResumeToken`` per batch (``$_requestResumeToken``, which needs
    the ``$natural`` hint); ``resume_after``: such a token, to continue with the record after it.
    """
    command: dict[str, Any] = {"find": collection, "filter": {}, "hint": {"$natural": 1}, "batchSize": batch_size,
                               "readConcern": {"level": "majority"}}
    if request_positions:
        command["$_requestResumeToken"] = True
        if resume_after is not None:
            command["$_resumeAfter"] = dict(resume_after)
    elif resume_after is not None:
        raise ValueError("resume_after needs request_positions: the server resumes only a scan that reports them")
    return command


def reusable_position(stored_token: Any, stored_node: Any, current_node: str | None) -> bool:
    """Whether a saved record position can be resumed from: the same node, in the same term, reports it."""
    return stored_token is not None and current_node is not None and stored_node == current_node
