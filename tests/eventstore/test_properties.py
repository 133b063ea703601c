"""
Properties of the fold and the store, over random event sequences.

Few users and items, so events collide on them; timestamps out of order; a small
FoldConfig next to the default one, so rings wrap and category slots get evicted.
"""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING

from hypothesis import given, settings
from hypothesis import strategies as st

from eventstore import Event, FoldConfig, State, Store, fold, project
from eventstore.schema import (
    INTERACTION_TYPES,
    AddedToCart,
    Clicked,
    Disliked,
    Interaction,
    ItemsShown,
    ItemUpdated,
    Liked,
    Purchased,
    Rated,
    Skipped,
    UserForgotten,
    Viewed,
)

if TYPE_CHECKING:
    import random
    from collections.abc import Sequence

T0 = 1764250000.0
USERS = ["u-a", "u-b", "u-c"]
ITEMS = [f"i-{k}" for k in range(6)]
CATEGORIES = ["shoes", "hats", "bags", "coats"]
SMALL = FoldConfig(seq_len=4, categories_per_user=2, purchases_per_user=2, half_life_s=3600.0)
CONFIGS = st.sampled_from([SMALL, FoldConfig()])
_CLASSES = dict(zip(INTERACTION_TYPES, (Viewed, Clicked, AddedToCart, Purchased, Rated, Liked,
                                        Disliked, Skipped), strict=True))

# Event times: within a few days of T0, fractional, in any order (so some arrive "late").
times = st.floats(min_value=T0 - 3 * 86_400, max_value=T0 + 3 * 86_400, allow_nan=False)
users = st.sampled_from(USERS)
items = st.sampled_from(ITEMS)


@st.composite
def interactions(draw: st.DrawFn, user: str | None = None) -> tuple[str, dict[str, object]]:
    """(type, fields) of one interaction; ratings always carry a value."""
    kind = draw(st.sampled_from(INTERACTION_TYPES))
    value = draw(st.floats(min_value=0, max_value=5, allow_nan=False)) if kind == "rating" \
        else draw(st.none() | st.floats(min_value=0, max_value=600, allow_nan=False))
    return kind, {"user": user or draw(users), "item": draw(items), "ts": draw(times),
                  "value": value}


@st.composite
def item_updates(draw: st.DrawFn) -> tuple[str, dict[str, object]]:
    """(``"item"``, fields) with a category and some other catalogue fields."""
    fields = draw(st.fixed_dictionaries(
        {"category": st.sampled_from(CATEGORIES)},
        optional={"price": st.floats(min_value=0, max_value=1e4, allow_nan=False),
                  "tags": st.lists(st.sampled_from(["red", "new", "sale"]), max_size=2),
                  "available": st.booleans(),
                  "title": st.text(max_size=5)}))
    return "item", {"item": draw(items), "ts": draw(times), "fields": fields}


@st.composite
def impressions(draw: st.DrawFn) -> tuple[str, dict[str, object]]:
    """(``"impression"``, fields) showing 1-4 items."""
    return "impression", {"user": draw(users), "ts": draw(times),
                          "items": draw(st.lists(items, min_size=1, max_size=4))}


@st.composite
def forgets(draw: st.DrawFn) -> tuple[str, dict[str, object]]:
    """(``"forget"``, fields)."""
    return "forget", {"user": draw(users), "ts": draw(times)}


def build(specs: Sequence[tuple[str, dict[str, object]]], prefix: str = "e") -> list[Event]:
    """Events with unique ids ``<prefix>-<k>`` from (type, fields) specs."""
    out: list[Event] = []
    for k, (kind, fields) in enumerate(specs):
        eid = f"{prefix}-{k}"
        if kind == "item":
            out.append(ItemUpdated(id=eid, **fields))  # type: ignore[arg-type]
        elif kind == "impression":
            out.append(ItemsShown(id=eid, **fields))  # type: ignore[arg-type]
        elif kind == "forget":
            out.append(UserForgotten(id=eid, **fields))  # type: ignore[arg-type]
        else:
            out.append(_CLASSES[kind](id=eid, **fields))  # type: ignore[arg-type]
    return out


any_event = st.one_of(interactions(), interactions(), interactions(), item_updates(),
                      impressions(), forgets())
no_forget = st.one_of(interactions(), interactions(), item_updates(), impressions())
sequences = st.lists(any_event, max_size=60).map(build)
#: at least a dozen events: enough for rings to wrap and slots to be evicted under SMALL
long_sequences = st.lists(any_event, min_size=12, max_size=60).map(build)


@settings(max_examples=300, deadline=None)
@given(long_sequences, CONFIGS)
def test_snapshot_at_any_point_then_the_rest_equals_folding_everything(
        events: list[Event], config: FoldConfig) -> None:
    """project(events) == project(from_bytes(project(events[:k]).to_bytes()), events[k:]), all k."""
    expected = project(State(config), events).to_bytes()

    for k in range(len(events) + 1):
        prefix = project(State(config), events[:k]).to_bytes()
        resumed = project(State.from_bytes(prefix, config), events[k:])
        assert expected == resumed.to_bytes(), f"split at {k}"


@settings(max_examples=200, deadline=None)
@given(sequences, CONFIGS)
def test_state_bytes_round_trip(events: list[Event], config: FoldConfig) -> None:
    """from_bytes(to_bytes(s)).to_bytes() == to_bytes(s)."""
    state = project(State(config), events)
    state.offset = len(events)

    assert state.to_bytes() == State.from_bytes(state.to_bytes(), config).to_bytes()


@settings(max_examples=200, deadline=None)
@given(sequences, CONFIGS)
def test_every_folded_interaction_is_seen(events: list[Event], config: FoldConfig) -> None:
    """After folding, has_seen(user, item) holds for every interaction not followed by a forget."""
    state = project(State(config), events)

    missing = []
    for k, event in enumerate(events):
        if isinstance(event, Interaction) and not any(
                isinstance(later, UserForgotten) and later.user == event.user
                for later in events[k + 1:]):
            u, i = state.user_index[event.user], state.item_index[event.item]
            if not state.has_seen(u, i):
                missing.append(event.id)
    assert [] == missing


def contents(store: Store) -> tuple[list[str], bytes]:
    """
    The log's ids and the state's bytes with the offset header zeroed: duplicates
    use up offsets (they are strictly increasing, not dense), nothing else.
    """
    offset, store.state.offset = store.state.offset, 0
    try:
        return store.log.ids(), store.state.to_bytes()
    finally:
        store.state.offset = offset


@settings(max_examples=100, deadline=None)
@given(st.lists(no_forget, min_size=1, max_size=30).map(build), st.randoms(use_true_random=False),
       st.integers(min_value=1, max_value=12))
def test_duplicates_change_nothing(events: list[Event], rnd: random.Random, batch: int) -> None:
    """
    Appending a sequence again leaves the log ids and the state bytes unchanged and is
    all "duplicate"; appending it with duplicates interleaved after their first copy
    gives the same ids and state (up to the offset the state covers).
    """
    with_dups = list(events)
    for _ in range(len(events)):  # each copy goes somewhere after the original
        original = rnd.randrange(len(events))
        at = with_dups.index(events[original]) + 1
        with_dups.insert(rnd.randrange(at, len(with_dups) + 1), events[original])

    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        once = Store(a, synchronous="OFF", snapshot_every=0)
        for k in range(0, len(events), batch):
            once.append(events[k:k + batch])
        expected = (once.log.ids(), once.state.to_bytes())
        again = once.append(events)
        twice = (once.log.ids(), once.state.to_bytes())
        expected_contents = contents(once)
        once.close(snapshot=False)

        mixed = Store(b, synchronous="OFF", snapshot_every=0)
        for k in range(0, len(with_dups), batch):
            mixed.append(with_dups[k:k + batch])
        interleaved = contents(mixed)
        mixed.close(snapshot=False)

    assert ["duplicate"] * len(events) == again.status
    assert expected == twice
    assert expected_contents == interleaved


@st.composite
def per_user_streams(draw: st.DrawFn) -> dict[str, list[tuple[str, dict[str, object]]]]:
    """For each user, an ordered list of their own interactions."""
    return {user: draw(st.lists(interactions(user=user), max_size=15)) for user in USERS}


def interleave(streams: dict[str, list[Event]], order: list[str]) -> list[Event]:
    """Merge the streams, taking the next event of ``order[k]``'s stream at step k."""
    cursors = {user: iter(events) for user, events in streams.items()}
    return [next(cursors[user]) for user in order]


@settings(max_examples=200, deadline=None)
@given(per_user_streams(), st.lists(item_updates(), max_size=8), CONFIGS, st.data())
def test_a_users_state_does_not_depend_on_other_users(
        specs: dict[str, list[tuple[str, dict[str, object]]]],
        catalogue: list[tuple[str, dict[str, object]]], config: FoldConfig,
        data: st.DataObject) -> None:
    """Two interleavings that keep each user's own order give every user the same view."""
    head = build([*catalogue, *(("item", {"item": i, "ts": T0, "fields": {}}) for i in ITEMS)],
                 prefix="item")
    streams = {user: build(s, prefix=user) for user, s in specs.items()}
    labels = [user for user, events in streams.items() for _ in events]
    first = data.draw(st.permutations(labels), label="first")
    second = data.draw(st.permutations(labels), label="second")

    a = project(State(config), head + interleave(streams, first))
    b = project(State(config), head + interleave(streams, second))

    assert {u: a.user_view(u) for u in USERS} == {u: b.user_view(u) for u in USERS}


@settings(max_examples=150, deadline=None)
@given(st.lists(no_forget, max_size=30).map(build), st.lists(impressions(), min_size=1,
       max_size=30).map(lambda s: build(s, prefix="i")), CONFIGS)  # fmt: skip
def test_impression_runs_fold_as_event_by_event(
    before: list[Event], shown: list[Event], config: FoldConfig
) -> None:
    """The comprehension path for runs of impressions gives the event-by-event loop's state."""
    fast, slow = State(config), State(config)
    project(fast, before)
    project(slow, before)
    fold._fold_impressions_only(fast, shown)  # noqa: SLF001 - the two paths compared
    fold._fold_mixed(slow, shown)  # noqa: SLF001
    assert slow.to_bytes() == fast.to_bytes()
