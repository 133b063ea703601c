"""
The exceptions of the event store.

``eventstore`` imports nothing of ours, so its errors have their own root,
:class:`StoreError`; the daemon's ``DaemonError`` family wraps them at the boundary.
Every exception formats its own message from structured fields and keeps those
fields as attributes, so callers can react to ``field`` and ``rule`` without
parsing text.
"""

from __future__ import annotations

__all__ = [
    "CorruptSnapshotError",
    "EventRejectedError",
    "SchemaVersionError",
    "StoreError",
    "StoreFullError",
]


class StoreError(Exception):
    """Root of every error raised by :mod:`eventstore`."""


class EventRejectedError(StoreError, ValueError):
    """
    An input is not a valid event.

    The message is always ``"<field>: <rule>"`` (for example ``"user: required for
    type click"``), and never contains the rejected value itself: it may hold
    personal data.

    Args:
        field: the offending field, dotted (``context.page``), or ``"event"`` /
            ``"json"`` when the whole input is at fault.
        rule: what the field must satisfy.
        index: position of the event inside a list input, else ``None``.
    """

    def __init__(self, field: str, rule: str, *, index: int | None = None) -> None:
        self.field = field
        self.rule = rule
        self.index = index
        super().__init__(self.reason)

    @property
    def reason(self) -> str:
        """The ``"<field>: <rule>"`` text, without the list index."""
        return f"{self.field}: {self.rule}"

    def __str__(self) -> str:
        if self.index is None:
            return self.reason
        return f"[{self.index}] {self.reason}"


class SchemaVersionError(StoreError):
    """The log file was written by a newer rerankd than this one."""

    def __init__(self, path: str, found: int, known: int) -> None:
        self.path = path
        self.found = found
        self.known = known
        msg = (
            f"{path}: log schema version {found} is newer than this rerankd knows "
            f"({known}); upgrade rerankd or restore a log written by this version"
        )
        super().__init__(msg)


class CorruptSnapshotError(StoreError):
    """A snapshot file failed its checksum or structure check."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class StoreFullError(StoreError):
    """SQLite could not write: disk full, read-only file system or I/O error."""

    def __init__(self, path: str, cause: str) -> None:
        self.path = path
        self.cause = cause
        super().__init__(f"{path}: cannot write the event log ({cause}); nothing was appended")
