"""`daemon.ranking.Ranking` on a real folded state, without a model (features only)."""

from __future__ import annotations

from daemon.protocol import Rank
from daemon.ranking import Ranking
from eventstore import State, project
from eventstore.schema import Clicked, ItemUpdated

T = 1_764_250_000.0
WEEK = 604_800.0  # the default half-life


def test_freshness_comes_from_created_at() -> None:
    """Freshness is 2^(-age / half-life) of created_at, and 0 for an item without one."""
    state = State()
    project(state, [
        ItemUpdated(id="i1", ts=T, item="new", fields={"created_at": T}),
        ItemUpdated(id="i2", ts=T, item="old", fields={"created_at": T - 2 * WEEK}),
        ItemUpdated(id="i3", ts=T, item="none", fields={"title": "no date"}),
    ])  # fmt: skip
    ranking = Ranking(lambda: state, ranker=None, weights=(0.0, 0.0, 1.0), clock=lambda: T)
    [ranked] = ranking.rank_batch([Rank(user="u", candidates=["none", "old", "new"])])
    assert (["new", "old", "none"], [1.0, 0.25, 0.0]) == (ranked.items, ranked.scores)


def test_created_at_update_changes_freshness() -> None:
    """A later item event with a new created_at is what ranking reads next."""
    state = State()
    project(state, [ItemUpdated(id="i1", ts=T, item="a", fields={"created_at": T - WEEK})])
    ranking = Ranking(lambda: state, ranker=None, weights=(0.0, 0.0, 1.0), clock=lambda: T)
    assert [0.5] == ranking.rank_batch([Rank(user="u", candidates=["a"])])[0].scores
    project(state, [ItemUpdated(id="i2", ts=T, item="a", fields={"created_at": T})])
    assert [1.0] == ranking.rank_batch([Rank(user="u", candidates=["a"])])[0].scores


def test_popularity_orders_unknown_user() -> None:
    """For a user the state has never seen, more clicked items rank first."""
    state = State()
    clicks = [Clicked(id=f"c{n}", ts=T, user=f"v{n}", item="hot" if n % 3 else "warm")
              for n in range(9)]  # fmt: skip
    project(state, clicks)
    ranking = Ranking(lambda: state, ranker=None, weights=(1.0, 0.0, 0.0), clock=lambda: T)
    [ranked] = ranking.rank_batch([Rank(user="stranger", candidates=["cold", "warm", "hot"])])
    assert ["hot", "warm", "cold"] == ranked.items
    assert ranked.scores[-1] == 0.0
