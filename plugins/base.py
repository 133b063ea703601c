"""
The two plugin protocols of DESIGN.md: privacy plugins and ranking policies.

Privacy plugins see events before they are stored and data before it leaves the
daemon; ranking policies see one request's candidates with the model's scores and
return the new order. Both are plain classes built from their config table
(``[plugins.<name>]``) by the registry (:mod:`plugins.registry`), which also finds
third-party ones through the entry-point group ``rerankd.plugins``.

A plugin must not log or raise messages that carry user ids or event contents: its
errors reach the logs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from eventstore.schema import Event
    from eventstore.state import State

__all__ = [
    "PluginError",
    "PolicyInput",
    "PolicyOutput",
    "PrivacyPlugin",
    "RankingPolicy",
    "RetentionPlugin",
]


class PluginError(ValueError):
    """A plugin's configuration is wrong; the message names the key and the rule."""


@runtime_checkable
class PrivacyPlugin(Protocol):
    """
    Runs on the ingest side, in the configured order, before anything is stored.

    ``ingest`` returns the events to store: the same ones, changed (ids mapped,
    fields masked) or fewer (dropped). ``user_id`` maps a user id that arrives in a
    socket request (``rank``, ``user``, ``forget``, ``explain``) the way ``ingest``
    maps the ``user`` of an event, so that callers keep using raw ids. ``export``
    sees aggregates before they leave the daemon (``stats``, ``export``) and may
    change them (noise).
    """

    name: str

    def ingest(self, events: Sequence[Event]) -> list[Event]:
        """The events to store, in order (mapped, masked, or fewer)."""
        ...

    def user_id(self, user: str) -> str:
        """The id under which ``user`` is stored (identity unless the plugin maps ids)."""
        ...

    def export(self, aggregates: Mapping[str, Any]) -> dict[str, Any]:
        """Aggregates as they may leave the daemon."""
        ...


@runtime_checkable
class RetentionPlugin(PrivacyPlugin, Protocol):
    """
    A privacy plugin that asks the daemon to delete old events from its log.

    The daemon finds it by this shape, not by name: every ``sweep_interval_s`` it
    deletes the events that arrived more than ``max_age_s`` ago once a snapshot covers
    them (``eventstore.store.Store.retain``). With several, the shortest of each wins.
    The built-in one is ``retention`` (:mod:`plugins.privacy.retention`).
    """

    max_age_s: float
    sweep_interval_s: float


@dataclass(frozen=True, slots=True)
class PolicyInput:
    """
    One rank request as a policy sees it, after the model and after earlier policies.

    ``items``, ``scores`` and ``embeddings`` are aligned (row k is item k), best first
    by the previous stage. ``rows`` are the items' rows in ``state`` (-1: an item the
    state does not know). ``user_row`` is -1 for an unknown user.
    """

    user: str
    user_row: int
    items: Sequence[str]
    scores: np.ndarray  # float32 [N]
    rows: np.ndarray  # int64 [N]
    state: State
    k: int
    context: Mapping[str, Any] = field(default_factory=dict)
    embeddings: np.ndarray | None = None  # float32 [N, d] when the model has them
    #: float32 [N]: the part of each score that is not the model's (its weighted
    #: features); ``scores - features`` is the model's dot product. None when unknown.
    features: np.ndarray | None = None


@dataclass(frozen=True, slots=True)
class PolicyOutput:
    """
    A policy's answer: the new order, its scores, what the policy did to each item.

    ``order`` indexes the input's items (a permutation of a subset: items may be
    dropped, none repeated), ``scores`` are the new scores in that order, and
    ``explain`` has one entry per ordered item saying what the policy did to it
    (e.g. ``{"mmr": {"relevance": 0.8, "redundancy": 0.3}}``).

    ``record`` holds flat facts about the whole answer that the daemon stores with the
    answer's impression record (its ``context``), for later analysis: the experiment
    and arm a request was served by, for instance. Keys of later policies win.
    """

    order: np.ndarray  # int64 [M], M <= N
    scores: np.ndarray  # float32 [M]
    explain: list[dict[str, Any]]
    record: Mapping[str, str | int | float | bool] = field(default_factory=dict)


@runtime_checkable
class RankingPolicy(Protocol):
    """Re-orders one request's candidates; policies run in the configured order."""

    name: str

    def apply(self, request: PolicyInput) -> PolicyOutput:
        """The new order of ``request.items`` (see :class:`PolicyOutput`)."""
        ...
