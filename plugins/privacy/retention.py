"""
``retention``: events older than ``max_age_days`` are deleted from the log.

The plugin itself only states the policy; the daemon carries it out. A privacy plugin
that has ``max_age_s`` and ``sweep_interval_s`` (the :class:`plugins.base.RetentionPlugin`
shape, this one or a third-party one) makes the daemon sweep every
``sweep_interval_s``, on its writer thread: it writes a snapshot of the state if the
newest one is older than the state, then deletes the events *received* (their
``ingest_ts``) more than ``max_age_s`` ago that the oldest kept snapshot covers, and the
dead letters received that long ago (``eventstore.store.Store.retain``). The state
keeps what the fold derived from the deleted events (a user's interests, an item's
popularity); the log no longer holds them. Several such plugins: the shortest age and
interval win.

On ingest the plugin drops interactions and impressions whose own ``ts`` is already
more than ``max_age_s`` old: they would be deleted at the next sweep anyway, and once
the originals are deleted the log's duplicate check no longer knows their ids, so a
feed's redelivery of an old event would otherwise be stored again. Catalogue events
(``item``) and ``forget`` are never dropped. The daemon reports drops as ``dropped``.

So an event is stored at most ``max_age_days`` after it arrived, plus up to one
``sweep_interval_s``, plus the time until a snapshot covers it (the sweep writes one
itself, so at most the next sweep).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Final

from eventstore.schema import Event, Interaction, ItemsShown
from plugins.params import check_number

__all__ = ["Retention"]

_NAME: Final = "retention"
_DAY_S: Final = 86_400.0
#: The events ``ingest`` may drop: those with a user that enter the fold's history.
_DATED: Final = frozenset((*Interaction.__subclasses__(), ItemsShown))


class Retention:
    """
    Delete events older than ``max_age_days`` (see the module docstring).

    Args:
        max_age_days: how long an event stays in the log after it arrived, in days
            (> 0; fractions allowed: 0.5 is twelve hours).
        sweep_interval_s: seconds between two sweeps (>= 0.1); a sweep also runs when
            the daemon starts and after a SIGHUP reload.

    Attributes:
        max_age_s: ``max_age_days`` in seconds.
        clock: the wall clock ``ingest`` compares event times with (tests replace it).

    Raises:
        PluginError: a bad parameter; the message names ``[plugins.retention].<key>``.
    """

    name: ClassVar[str] = _NAME

    def __init__(self, *, max_age_days: float, sweep_interval_s: float = 3600.0) -> None:
        days = check_number(_NAME, "max_age_days", max_age_days, lo=0, lo_open=True)
        self.max_age_s = float(days) * _DAY_S
        self.sweep_interval_s = float(
            check_number(_NAME, "sweep_interval_s", sweep_interval_s, lo=0.1)
        )
        self.clock: Callable[[], float] = time.time

    def __repr__(self) -> str:
        return (
            f"Retention(max_age_s={self.max_age_s:g}, sweep_interval_s={self.sweep_interval_s:g})"
        )

    def ingest(self, events: Sequence[Event]) -> list[Event]:
        """The events less the interactions and impressions already older than the age."""
        oldest = self.clock() - self.max_age_s
        return [e for e in events if e.ts >= oldest or type(e) not in _DATED]

    def user_id(self, user: str) -> str:
        """User ids are ``pseudonymize``'s business: unchanged."""
        return user

    def export(self, aggregates: Mapping[str, Any]) -> dict[str, Any]:
        """Aggregates are not events: unchanged."""
        return dict(aggregates)
