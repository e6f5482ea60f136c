"""Replaying a change stream ``update`` event from its ``updateDescription``, where that is exact.

An update event describes its change as paths: ``updatedFields`` (path -> new value), ``removedFields`` and
``truncatedArrays`` (arrays cut to ``newSize``). Replayed as ``$set`` / ``$unset`` / ``$push`` with ``$slice``
on the target's copy of the document, the change leaves that document as the source left it, without reading
the document from the source again (what ``fullDocument: "updateLookup"`` costs the source for every event,
and the whole document on the wire for a one-field change).

A path is replayed only when it names one field path without doubt. A dot separates components and a numeric
component is an array index, but since MongoDB 5.0 a field name may itself contain a dot or be all digits
(``{"a": {"1": x}}``), so ``a.1`` can mean two things:

- MongoDB 6.1+ lists the paths that are of that kind in ``disambiguatedPaths``; on a stream opened with
  ``showExpandedEvents`` the key is there, empty when nothing is ambiguous. An event that lists a path is not
  replayed from its description; every other path means what its dots say.
- Without ``disambiguatedPaths`` (older servers, or no expanded events) only top-level fields (a path without
  a dot) are taken as they are: the document root is never an array.
- A component starting with ``$`` would be read by the update as an operator (``$``, ``$[]``), and an empty
  component is not a field: never replayed from the description.

``update_from_description`` returns ``None`` for those, and the caller reads the document from the source
instead (the lookup). Whatever else the target refuses (a path through a value that a later event changed,
paths that conflict) is refused by the server, and the caller falls back to the lookup too: nothing here
guesses what the target holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bson import SON

# The key of an update operator whose value is a path -> value document, in the order they are applied.
SET, UNSET, PUSH = "$set", "$unset", "$push"


def _plain_path(path: Any, *, dotted_ok: bool) -> bool:
    if not isinstance(path, str) or not path:
        return False
    parts = path.split(".")
    if len(parts) > 1 and not dotted_ok:
        return False
    return all(part and not part.startswith("$") for part in parts)


def update_from_description(description: Mapping[str, Any] | None) -> SON | None:
    """The update operators that replay ``description`` (an update event's ``updateDescription``) exactly,
    an empty ``SON`` when it changes nothing, or ``None`` when a path in it cannot be replayed without doubt
    (see the module docstring). ``updatedFields`` becomes the ``$set`` document itself, so raw BSON values
    reach the target byte for byte."""
    if not isinstance(description, Mapping):
        return None
    updated = description.get("updatedFields")
    removed = description.get("removedFields")
    truncated = description.get("truncatedArrays")
    if updated is None or removed is None:
        return None
    if not isinstance(updated, Mapping) or not isinstance(removed, list | tuple):
        return None
    if truncated is not None and not isinstance(truncated, list | tuple):
        return None
    expanded = "disambiguatedPaths" in description
    if expanded:
        ambiguous = description.get("disambiguatedPaths")
        if not isinstance(ambiguous, Mapping) or len(ambiguous) > 0:
            return None
    update = SON()
    if len(updated):
        if not all(_plain_path(path, dotted_ok=expanded) for path in updated):
            return None
        update[SET] = updated
    if removed:
        if not all(_plain_path(path, dotted_ok=expanded) for path in removed):
            return None
        update[UNSET] = SON((path, "") for path in removed)
    if truncated:
        push = SON()
        for entry in truncated:
            if not isinstance(entry, Mapping):
                return None
            path, size = entry.get("field"), entry.get("newSize")
            if (not _plain_path(path, dotted_ok=expanded) or isinstance(size, bool) or not isinstance(size, int)
                    or size < 0 or path in push):
                return None
            push[path] = SON([("$each", []), ("$slice", size)])
        update[PUSH] = push
    return update


__all__ = ["PUSH", "SET", "UNSET", "update_from_description"]
