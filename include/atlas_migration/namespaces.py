"""Namespace selection with mongodump/mongorestore ``--nsInclude``/``--nsExclude`` semantics.

A pattern is ``<db>.<collection>`` where ``*`` matches any run of characters (including dots, since
collection names may contain dots) and ``\\*`` / ``\\\\`` stand for a literal star / backslash. ``*`` alone
matches every namespace. Database names cannot contain dots, so the first dot separates database from
collection.

Some namespaces are never migrated, whatever the patterns say: the ``admin``, ``local`` and ``config``
databases (users, roles and cluster metadata are not restorable into Atlas) and ``system.*`` collections.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from atlas_migration.errors import ConfigurationError

SYSTEM_DATABASES = frozenset({"admin", "local", "config"})
# Databases this package writes its own bookkeeping to; never part of a migration.
INTERNAL_DATABASE_PREFIX = "__atlas_migration"


def split_namespace(namespace: str) -> tuple[str, str]:
    """Split ``db.coll.with.dots`` into ``("db", "coll.with.dots")``."""
    db, sep, coll = namespace.partition(".")
    if not sep or not db or not coll:
        raise ConfigurationError(f"'{namespace}' is not a namespace of the form <database>.<collection>")
    return db, coll


def is_never_migrated(db: str, coll: str | None = None) -> bool:
    """True for namespaces that no strategy moves to Atlas."""
    if db in SYSTEM_DATABASES or db.startswith(INTERNAL_DATABASE_PREFIX):
        return True
    return coll is not None and coll.startswith("system.")


def _pattern_to_regex(pattern: str) -> re.Pattern[str]:
    parts: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern) and pattern[i + 1] in "*\\":
            parts.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        parts.append(".*" if ch == "*" else re.escape(ch))
        i += 1
    return re.compile("".join(parts), re.DOTALL)


def validate_pattern(pattern: str, allow_any_db: bool = False) -> str:
    """Return the pattern stripped, or raise ``ConfigurationError`` explaining the expected syntax."""
    if not isinstance(pattern, str):
        raise ConfigurationError(f"namespace pattern {pattern!r} must be a string such as 'sales.orders' or 'sales.*'")
    text = pattern.strip()
    if text == "*":
        return text
    db, sep, coll = text.partition(".")
    if not text or not sep or not db or not coll:
        raise ConfigurationError(
            f"namespace pattern {pattern!r} is not of the form <database>.<collection>; "
            "use 'db.coll', 'db.*', '*.coll' or '*' (mongodump --nsInclude syntax)"
        )
    if any(c in db for c in '/\\ "$') and "*" not in db and not allow_any_db:
        raise ConfigurationError(f"namespace pattern {pattern!r}: database names cannot contain / \\ space \" or $")
    return text


@dataclass(frozen=True)
class NamespaceFilter:
    """Include/exclude patterns; an empty include list means every namespace."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def from_patterns(cls, include: list[str] | None, exclude: list[str] | None) -> NamespaceFilter:
        return cls(
            include=tuple(validate_pattern(p) for p in include or []),
            # An exclude may name a database the driver refuses (that is how such a database is skipped).
            exclude=tuple(validate_pattern(p, allow_any_db=True) for p in exclude or []),
        )

    @cached_property
    def _include_res(self) -> list[re.Pattern[str]]:
        return [_pattern_to_regex(p) for p in self.include]

    @cached_property
    def _exclude_res(self) -> list[re.Pattern[str]]:
        return [_pattern_to_regex(p) for p in self.exclude]

    def matches(self, db: str, coll: str) -> bool:
        """Whether ``db.coll`` is selected (system namespaces never are)."""
        if is_never_migrated(db, coll):
            return False
        ns = f"{db}.{coll}"
        if self._include_res and not any(r.fullmatch(ns) for r in self._include_res):
            return False
        return not any(r.fullmatch(ns) for r in self._exclude_res)

    def may_select_database(self, db: str) -> bool:
        """Whether some collection of ``db`` may be selected, when its collections cannot be listed: an
        include pattern whose database part matches it, and no exclude covering the whole database."""
        if is_never_migrated(db):
            return False
        included = not self.include or any(
            p == "*" or _pattern_to_regex(p.partition(".")[0]).fullmatch(db) for p in self.include)
        # "\x00" stands for any collection name: only "<db>.*"-like excludes match it.
        excluded = any(r.fullmatch(f"{db}.\x00") for r in self._exclude_res)
        return included and not excluded

    def unmatched_includes(self, namespaces: list[str]) -> list[str]:
        """Include patterns that select none of ``namespaces`` (almost always a typo worth refusing)."""
        return [
            p for p, r in zip(self.include, self._include_res, strict=True)
            if not any(r.fullmatch(ns) for ns in namespaces)
        ]
