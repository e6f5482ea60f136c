"""Exceptions with messages written for the operator reading the task log.

Every message names what was wrong and what to do; none contains a credential (see ``redaction``).
"""

from __future__ import annotations


class MigrationError(Exception):
    """Base class for every error this package raises on purpose."""


class ConfigurationError(MigrationError):
    """A parameter, connection or pattern is malformed or missing."""


class SourceUnreachable(MigrationError):
    """The source deployment could not be reached or authenticated against."""


class TargetUnreachable(MigrationError):
    """The target (Atlas) deployment could not be reached or authenticated against."""


class ImpossibleStrategy(MigrationError):
    """A strategy override that cannot work for this source (e.g. live pull without oplog access)."""


class StrategyNotAvailable(MigrationError):
    """Routing chose a strategy whose task group this release does not contain."""


class TargetNotEmpty(MigrationError):
    """A target namespace already holds data and ``drop_target`` is false."""


class DumpFormatError(MigrationError):
    """A dump directory or file does not follow the mongodump layout."""


class ToolFailed(MigrationError):
    """An external tool (mongodump/mongorestore) exited with an error."""


class ValidationFailed(MigrationError):
    """Source and target differ; the message lists every mismatching namespace."""


class CredentialsRefused(MigrationError):
    """A server or service refused the configured credentials: no retry can fix that."""


class SourceCredentialsRefused(SourceUnreachable, CredentialsRefused):
    """The source refused the connection's credentials (AuthenticationFailed / Unauthorized)."""


class TargetCredentialsRefused(TargetUnreachable, CredentialsRefused):
    """The target refused the connection's credentials (AuthenticationFailed / Unauthorized)."""
