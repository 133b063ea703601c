"""The fold's arithmetic, with expected values written as arithmetic."""

from __future__ import annotations

import pytest

from eventstore import FoldConfig, State, apply, project
from eventstore.schema import (
    AddedToCart,
    Clicked,
    ItemUpdated,
    Purchased,
    Rated,
    Viewed,
)

T0 = 1_764_000_000.0
H = 3600.0  # the half-life used below


@pytest.fixture(name="state")
def fixture_state() -> State:
    state = State(FoldConfig(half_life_s=H, seq_len=3, categories_per_user=2,
                             purchases_per_user=2))
    project(state, [ItemUpdated(id=f"it-{c}", ts=T0, item=f"i-{c}", fields={"category": c})
                    for c in ("a", "b", "c", "d")])
    return state


def test_popularity_halves_per_half_life(state: State) -> None:
    """Two interactions one half-life apart: 1 * 1/2 + 1, dated at the later one."""
    project(state, [Clicked(id="1", ts=T0, user="u", item="x"),
                    Viewed(id="2", ts=T0 + H, user="v", item="x")])
    view = state.item_view("x")
    assert (1 * 0.5 + 1, T0 + H, 1, 2) == (view["popularity"], view["popularity_ts"],
                                            view["clicks"], view["interactions"])


def test_popularity_of_a_late_event_is_decayed_into_the_present(state: State) -> None:
    """An older event arriving later adds its decayed weight; the reference time stays."""
    project(state, [Viewed(id="1", ts=T0 + H, user="u", item="x"),
                    Viewed(id="2", ts=T0, user="u", item="x")])
    view = state.item_view("x")
    assert (1 + 0.5, T0 + H) == (view["popularity"], view["popularity_ts"])


def test_category_interest_decays_and_adds(state: State) -> None:
    """view (weight 1) then click (weight 2) one half-life later: 1/2 + 2."""
    project(state, [Viewed(id="1", ts=T0, user="u", item="i-a"),
                    Clicked(id="2", ts=T0 + H, user="u", item="i-a")])
    assert {"a": 1 * 0.5 + 2} == state.user_view("u")["category_interest"]


def test_interest_survives_reanchoring(state: State) -> None:
    """100 half-lives apart (past the 2**64 rescale): the old weight has all but vanished."""
    project(state, [Viewed(id="1", ts=T0, user="u", item="i-a"),
                    Clicked(id="2", ts=T0 + 100 * H, user="u", item="i-a")])
    interest = state.user_view("u")["category_interest"]["a"]
    assert 2 + 2.0**-100 == pytest.approx(interest, rel=1e-6)


def test_rating_weighs_relative_to_neutral(state: State) -> None:
    """rating 5 with neutral 2.5 and weight 1 counts 2.5; rating 1 counts -1.5."""
    project(state, [Rated(id="1", ts=T0, user="u", item="i-a", value=5.0),
                    Rated(id="2", ts=T0, user="u", item="i-b", value=1.0)])
    assert {"a": 2.5, "b": -1.5} == state.user_view("u")["category_interest"]


def test_weakest_category_slot_is_evicted_by_a_stronger_newcomer(state: State) -> None:
    """K = 2: a click (2) evicts a view (1); a later view (1) is weaker than both and dropped."""
    project(state, [Viewed(id="1", ts=T0, user="u", item="i-a"),
                    AddedToCart(id="2", ts=T0, user="u", item="i-b"),
                    Clicked(id="3", ts=T0, user="u", item="i-c"),
                    Viewed(id="4", ts=T0, user="u", item="i-d")])
    assert {"b": 3.0, "c": 2.0} == state.user_view("u")["category_interest"]


def test_sequence_ring_keeps_the_last_l_newest_first(state: State) -> None:
    """L = 3: after five events the view holds the last three, newest first."""
    project(state, [Viewed(id=str(k), ts=T0 + k, user="u", item=f"x{k}") for k in range(5)])
    view = state.user_view("u")
    assert (["x4", "x3", "x2"], 5, {"view": 5}) == (
        [r["item"] for r in view["recent"]], view["events"], view["counts"])
    u = state.user_index["u"]
    assert [state.item_index[f"x{k}"] for k in (2, 3, 4)] == state.sequence(u).tolist()


def test_purchases_ring_and_seen_filter(state: State) -> None:
    """P = 2 keeps the last two purchases; every interacted item is in the seen filter."""
    project(state, [Purchased(id=str(k), ts=T0, user="u", item=f"p{k}") for k in range(3)])
    u = state.user_index["u"]
    assert ["p2", "p1"] == sorted(state.user_view("u")["purchased"], reverse=True)
    assert all(state.has_seen(u, state.item_index[f"p{k}"]) for k in range(3))


def test_apply_equals_project(state: State) -> None:
    """Folding one event at a time gives the same bytes as folding the run at once."""
    events = [Clicked(id=str(k), ts=T0 + 7 * k, user=f"u{k % 3}", item=f"i-{'abcd'[k % 4]}")
              for k in range(20)]
    one_by_one = State(state.config)
    together = State(state.config)
    for event in events:
        apply(one_by_one, event)
    project(together, events)
    assert together.to_bytes() == one_by_one.to_bytes()
