"""
Properties of every built-in ranking policy over random requests and folded states.

A scenario is a small catalogue (random categories, availability, creation times and
tags, some items updated twice), random clicks, purchases, views and impressions by a
few users, all folded into a real `State`; then a request over a random subset of the
catalogue plus items the state has never seen, with random scores, embeddings or none,
and a random k. What the filters should remove, and each item's category and counts,
are worked out from the events here, not read back from the state.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from eventstore import Event, State, project
from eventstore.schema import Clicked, ItemsShown, ItemUpdated, Purchased, Viewed
from plugins.base import PolicyInput, PolicyOutput
from plugins.policies import BlendPolicy, ExplorePolicy, MmrPolicy, RulesPolicy

T0 = 1764250000.0
CATALOGUE = [f"i-{k}" for k in range(12)]
UNKNOWN = ["new-1", "new-2", "new-3"]
USERS = ["u-1", "u-2"]
CATEGORIES = ["shoes", "hats", "bags"]
DIM = 4

fields = st.fixed_dictionaries(
    {},
    optional={
        "category": st.sampled_from(CATEGORIES),
        "available": st.booleans(),
        "created_at": st.floats(T0 - 30 * 86_400, T0 + 3600, allow_nan=False),
        "tags": st.lists(st.sampled_from(["sale", "new"]), max_size=2, unique=True),
        "flag": st.sampled_from([True, False, 1, 0]),
    },
)


categories = st.sampled_from([*CATEGORIES, *CATEGORIES, None])


@dataclass(frozen=True)
class Scenario:
    """A request and the facts the policies' output must agree with."""

    request: PolicyInput
    events: list[Event]

    @property
    def items(self) -> list[str]:
        return list(self.request.items)

    def last_field(self, item: str, key: str) -> Any:
        """The value ``key`` of ``item`` after every update (None if never given)."""
        value = None
        for e in self.events:
            if isinstance(e, ItemUpdated) and e.item == item and key in e.fields:
                value = e.fields[key]
        return value

    def bought(self, user: str) -> set[str]:
        return {e.item for e in self.events if isinstance(e, Purchased) and e.user == user}

    def impressions(self, item: str) -> int:
        return sum(e.items.count(item) for e in self.events if isinstance(e, ItemsShown))


@st.composite
def scenarios(draw: st.DrawFn, *, embeddings: bool | None = None) -> Scenario:
    """A folded state and a request over it (``embeddings``: force them on, off, or draw)."""
    n = draw(st.integers(1, len(CATALOGUE)))
    catalogue = CATALOGUE[:n]
    updates = draw(st.lists(st.tuples(st.sampled_from(catalogue), fields), max_size=2 * n))
    # most items get a category first (the cap needs some), later updates may change it
    first = [
        (name, {**draw(fields), **({"category": c} if (c := draw(categories)) else {})})
        for name in catalogue
    ]
    events: list[Event] = [
        ItemUpdated(id=f"u-{k}", ts=T0, item=name, fields=f)
        for k, (name, f) in enumerate(first + updates)
    ]
    acts = st.tuples(st.sampled_from(["click", "purchase", "view", "shown"]),
                     st.sampled_from(USERS), st.lists(st.sampled_from(catalogue), min_size=1,
                                                      max_size=3))  # fmt: skip
    for k, (kind, user, shown) in enumerate(draw(st.lists(acts, max_size=15))):
        ts = T0 + k
        if kind == "shown":
            events.append(ItemsShown(id=f"a-{k}", ts=ts, user=user, items=shown))
        else:
            cls = {"click": Clicked, "purchase": Purchased, "view": Viewed}[kind]
            events.append(cls(id=f"a-{k}", ts=ts, user=user, item=shown[0]))
    state = project(State(), events)

    items = draw(st.lists(st.sampled_from(catalogue + UNKNOWN), unique=True, max_size=16))
    size = len(items)
    scores = draw(arrays(np.float32, size, elements=st.floats(-10, 10, width=32)))
    with_emb = draw(st.booleans()) if embeddings is None else embeddings
    emb = (
        draw(arrays(np.float32, (size, DIM), elements=st.floats(-1, 1, width=32)))
        if with_emb
        else None
    )
    user = draw(st.sampled_from([*USERS, "stranger"]))
    request = PolicyInput(
        user=user,
        user_row=state.user_index.get(user, -1),
        items=items,
        scores=scores,
        rows=np.array([state.item_index.get(i, -1) for i in items], np.int64),
        state=state,
        k=draw(st.integers(1, 20)),
        context={"now": T0 + 86_400.0},
        embeddings=emb,
    )
    return Scenario(request, events)


def check_shape(out: PolicyOutput, n: int, key: str) -> list[int]:
    """The output is a permutation of a subset of range(n) with aligned scores and explain."""
    order = out.order.tolist()
    assert np.int64 == out.order.dtype
    assert np.float32 == out.scores.dtype
    assert len(set(order)) == len(order)
    assert all(0 <= i < n for i in order)
    assert len(order) == len(out.scores) == len(out.explain)
    assert all(set(e) == {key} for e in out.explain)
    return order


def non_increasing(values: np.ndarray) -> bool:
    return bool(np.all(values[:-1] >= values[1:]))


# --- blend ------------------------------------------------------------------------------

weights = st.floats(0, 5, allow_nan=False)


@settings(max_examples=150, deadline=None)
@given(scenarios(), weights, weights, weights, st.floats(1, 1e7))
def test_blend_keeps_every_item_sorted_by_its_blended_score(s, w_m, w_p, w_f, half_life):
    """All N items, scores non-increasing and equal to the explained blended score."""
    policy = BlendPolicy(w_model=w_m, w_popularity=w_p, w_freshness=w_f, half_life_s=half_life)

    out = policy.apply(s.request)

    order = check_shape(out, len(s.items), "blend")
    assert sorted(order) == list(range(len(s.items)))
    assert non_increasing(out.scores)
    assert [e["blend"]["score"] for e in out.explain] == out.scores.tolist()
    for e in out.explain:
        assert all(0.0 <= e["blend"][c] <= 1.0 for c in ("model", "popularity", "freshness"))


# --- mmr ----------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(scenarios(), st.floats(0, 1), st.none() | st.integers(1, 20))
def test_mmr_returns_a_permutation_with_the_tail_in_incoming_order(s, lambda_, top):
    """All N items; after the diversified head, the rest keep their incoming order."""
    out = MmrPolicy(lambda_=lambda_, top=top).apply(s.request)

    order = check_shape(out, len(s.items), "mmr")
    assert sorted(order) == list(range(len(s.items)))
    head = min(top or s.request.k, len(order)) if s.request.embeddings is not None else 0
    assert sorted(order[head:]) == order[head:]
    assert non_increasing(out.scores) or s.request.embeddings is None


@settings(max_examples=60, deadline=None)
@given(scenarios(embeddings=True))
def test_mmr_with_lambda_1_keeps_an_order_sorted_by_score(s):
    """Scores already best first: lambda_ = 1 changes nothing."""
    ranked = np.argsort(-s.request.scores, kind="stable")
    request = PolicyInput(
        user=s.request.user,
        user_row=s.request.user_row,
        items=[s.items[i] for i in ranked],
        scores=s.request.scores[ranked],
        rows=s.request.rows[ranked],
        state=s.request.state,
        k=s.request.k,
        context=s.request.context,
        embeddings=s.request.embeddings[ranked],
    )

    out = MmrPolicy(lambda_=1).apply(request)

    assert list(range(len(ranked))) == out.order.tolist()


# --- explore ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(scenarios(), st.floats(0, 1), st.integers(0, 4), st.integers(0, 2**32))
def test_explore_samples_only_eligible_items_into_its_slots(s, share, max_impressions, seed):
    """
    All N items; the first k - slots keep their place; explored items sit in the slots,
    were shown at most max_impressions times, and the others keep their incoming order.
    """
    policy = ExplorePolicy(share=share, max_impressions=max_impressions, seed=seed)

    out = policy.apply(s.request)

    order = check_shape(out, len(s.items), "explore")
    n, k = len(s.items), min(s.request.k, len(s.items))
    kept = k - policy.slots(k)
    assert sorted(order) == list(range(n))
    assert list(range(kept)) == order[:kept]
    explored = [p for p, e in enumerate(out.explain) if e["explore"]]
    assert all(kept <= p < k for p in explored)
    assert all(s.impressions(s.items[order[p]]) <= max_impressions for p in explored)
    others = [i for p, i in enumerate(order) if p not in explored]
    assert sorted(others) == others
    assert non_increasing(out.scores)


# --- rules ----------------------------------------------------------------------------------

rule_tables = st.lists(
    st.fixed_dictionaries(
        {
            "field": st.sampled_from(["category", "tags", "flag", "missing"]),
            "value": st.sampled_from([*CATEGORIES, "sale", "new", True, False, 1, 0]),
            "by": st.floats(0.01, 20),
        }
    ),
    max_size=3,
)


@st.composite
def rules_params(draw: st.DrawFn, items: list[str]) -> dict[str, Any]:
    """
    Filters, up to four pins (mostly of candidates) at distinct positions, boosts,
    buries, maybe a cap.
    """
    pinned = draw(st.lists(st.sampled_from([*items, "absent"]), unique=True, max_size=4))
    positions = draw(st.lists(st.integers(0, 12), min_size=len(pinned), max_size=len(pinned),
                              unique=True))  # fmt: skip
    return {
        "filter_unavailable": draw(st.booleans()),
        "filter_purchased": draw(st.booleans()),
        "pins": dict(zip(pinned, positions, strict=True)),
        "boost": draw(rule_tables),
        "bury": draw(rule_tables),
        "max_per_category": draw(st.none() | st.integers(1, 3)),
    }


def filtered(s: Scenario, params: dict[str, Any]) -> set[str]:
    """The candidates the filters must remove, from the events."""
    gone = set()
    if params["filter_unavailable"]:
        gone |= {i for i in s.items if s.last_field(i, "available") is False}
    if params["filter_purchased"]:
        gone |= s.bought(s.request.user) & set(s.items)
    return gone


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.data())
def test_rules_never_show_filtered_items_and_honour_pins(s, data):
    """
    Filtered items never appear; without a cap every other item does; each pin that is
    a candidate and not filtered sits at its position (or, past the end, after it).
    """
    params = data.draw(rules_params(s.items))

    out = RulesPolicy(**params).apply(s.request)

    order = check_shape(out, len(s.items), "rules")
    shown = [s.items[i] for i in order]
    gone = filtered(s, params)
    assert not gone & set(shown)
    if params["max_per_category"] is None:
        assert set(s.items) - gone == set(shown)
    for item, pos in params["pins"].items():
        if item in s.items and item not in gone:
            assert item in shown
            if pos < len(shown):
                assert item == shown[pos]
                assert {"pinned": pos}.items() <= out.explain[pos]["rules"].items()
    assert non_increasing(out.scores)


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.data(), st.integers(1, 3))
def test_rules_cap_each_category_in_the_top_k(s, data, cap):
    """
    In the top k, the unpinned items of a category number at most cap minus the pins of
    that category requested in the top k (pins are never moved for the cap).
    """
    params = {**data.draw(rules_params(s.items)), "max_per_category": cap}

    out = RulesPolicy(**params).apply(s.request)

    shown = [s.items[i] for i in out.order.tolist()]
    gone = filtered(s, params)
    pins = {i: p for i, p in params["pins"].items() if i in s.items and i not in gone}
    k = s.request.k
    pinned_top = Counter(s.last_field(i, "category") for i, p in pins.items() if p < k)
    unpinned_top = Counter(s.last_field(i, "category") for i in shown[:k] if i not in pins)
    for category, n in unpinned_top.items():
        if category is not None:
            assert n <= max(0, cap - pinned_top[category])


# --- experiment -------------------------------------------------------------------------


def experiment(mode: str, arms: list[dict[str, Any]], **more: Any) -> Any:
    """An experiment built through the registry, as the daemon builds it."""
    from pathlib import Path  # noqa: PLC0415

    from plugins.context import PluginContext  # noqa: PLC0415
    from plugins.registry import REGISTRY  # noqa: PLC0415

    (built,) = REGISTRY.policies(
        ["experiment"], {"experiment": {"name": "exp-1", "mode": mode, "arms": arms, **more}},
        context=PluginContext(data_dir=Path("/nonexistent")),
    )  # fmt: skip
    return built


@settings(max_examples=150, deadline=None)
@given(scenarios(), st.data())
def test_an_ab_arm_is_its_own_chain_and_filtered_items_never_appear(s, data):
    """
    A/B: the output is exactly what the user's arm's rules give (so its filters hold
    and its pins are honoured), whichever arm the hash picked; the record names it.
    """
    params = [data.draw(rules_params(s.items)), data.draw(rules_params(s.items))]
    arms = [{"name": n, "policies": ["rules"], "params": {"rules": p}}
            for n, p in zip(("control", "treat"), params, strict=True)]  # fmt: skip
    policy = experiment("ab", arms)

    out = policy.apply(s.request)

    arm = policy.arm_of(s.request.user)
    mine = RulesPolicy(**params[[a["name"] for a in arms].index(arm.name)]).apply(s.request)
    assert out.order.tolist() == mine.order.tolist()
    assert np.array_equal(out.scores, mine.scores)
    assert dict(out.record) == {"experiment": "exp-1", "arm": arm.name}
    assert all(e["experiment"] == {"name": "exp-1", "arm": arm.name} for e in out.explain)
    shown = {s.items[i] for i in out.order.tolist()}
    assert not shown & filtered(s, params[[a["name"] for a in arms].index(arm.name)])


@settings(max_examples=150, deadline=None)
@given(scenarios(), st.data(), st.integers(0, 2**32))
def test_interleaving_shows_the_union_of_both_arms_and_nothing_both_filtered(s, data, seed):
    """
    Interleave: a permutation of the union of the arms' items; an item filtered by both
    arms never appears; each position's team is an arm that ranked the item, and the
    recorded teams match the explain entries.
    """
    params = [data.draw(rules_params(s.items)), data.draw(rules_params(s.items))]
    arms = [{"name": n, "policies": ["rules"], "params": {"rules": p}}
            for n, p in zip(("left", "right"), params, strict=True)]  # fmt: skip
    policy = experiment("interleave", arms, seed=seed)

    out = policy.apply(s.request)

    order = out.order.tolist()
    assert len(set(order)) == len(order) == len(out.scores) == len(out.explain)
    each = [RulesPolicy(**p).apply(s.request).order.tolist() for p in params]
    assert set(order) == set(each[0]) | set(each[1])
    assert not {s.items[i] for i in order} & filtered(s, params[0]) & filtered(s, params[1])
    teams = out.record["teams"]
    assert len(teams) == min(len(order), 256)
    for position, (i, entry) in enumerate(zip(order, out.explain, strict=True)):
        team = "ab".index(teams[position])
        assert entry["experiment"]["team"] == arms[team]["name"]
        assert i in each[team]
    assert non_increasing(out.scores)
