"""
The built-in ranking policies on hand-made states: what each one does to an order.

Every state is built by folding real events (`eventstore.project`), never by writing
its arrays.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from itertools import count
from typing import Any

import numpy as np
import pytest

from eventstore import Event, State, project
from eventstore.schema import Clicked, ItemsShown, ItemUpdated, Purchased, Viewed
from plugins.base import PluginError, PolicyInput, PolicyOutput, RankingPolicy
from plugins.policies import BlendPolicy, ExplorePolicy, MmrPolicy, RulesPolicy, mmr

T0 = 1764250000.0
NOW = T0 + 10_000.0
_ids = count()


def item(name: str, ts: float = T0, **fields: Any) -> ItemUpdated:
    return ItemUpdated(id=f"e-{next(_ids)}", ts=ts, item=name, fields=fields)


def fold(events: Sequence[Event], state: State | None = None) -> State:
    return project(state or State(), events)


def request(
    state: State,
    items: Sequence[str],
    *,
    scores: Sequence[float] | None = None,
    k: int = 10,
    user: str = "u-1",
    embeddings: np.ndarray | None = None,
    now: float = NOW,
) -> PolicyInput:
    """A request for ``items``; scores default to strictly decreasing (incoming order)."""
    n = len(items)
    s = np.arange(n, 0, -1, dtype=np.float32) if scores is None else np.asarray(scores, np.float32)
    rows = np.array([state.item_index.get(i, -1) for i in items], np.int64)
    return PolicyInput(
        user=user,
        user_row=state.user_index.get(user, -1),
        items=list(items),
        scores=s,
        rows=rows,
        state=state,
        k=k,
        context={"now": now},
        embeddings=embeddings,
    )


def ids(req: PolicyInput, out: PolicyOutput) -> list[str]:
    return [req.items[i] for i in out.order.tolist()]


# --- parameters ---------------------------------------------------------------------

BAD_PARAMS = [
    (MmrPolicy, {"lambda_": 1.5}, "[plugins.mmr].lambda_: must be between 0 and 1, got 1.5"),
    (MmrPolicy, {"lambda_": "0.5"}, "[plugins.mmr].lambda_: must be a number, got '0.5'"),
    (MmrPolicy, {"lambda_": True}, "[plugins.mmr].lambda_: must be a number, got True"),
    (MmrPolicy, {"lambda_": math.nan}, "[plugins.mmr].lambda_: must be finite, got nan"),
    (MmrPolicy, {"top": 0}, "[plugins.mmr].top: must be >= 1, got 0"),
    (MmrPolicy, {"top": 2.5}, "[plugins.mmr].top: must be an integer, got 2.5"),
    (MmrPolicy, {"lamda": 0.5}, "[plugins.mmr].lamda: unknown key; known: lambda_, top"),
    (BlendPolicy, {"w_model": -1}, "[plugins.blend].w_model: must be >= 0, got -1"),
    (BlendPolicy, {"w_popularity": "x"}, "[plugins.blend].w_popularity: must be a number"),
    (BlendPolicy, {"w_freshness": math.inf}, "[plugins.blend].w_freshness: must be finite"),
    (BlendPolicy, {"half_life_s": 0}, "[plugins.blend].half_life_s: must be > 0, got 0"),
    (BlendPolicy, {"half_life": 60}, "[plugins.blend].half_life: unknown key"),
    (RulesPolicy, {"filter_unavailable": "yes"}, "[plugins.rules].filter_unavailable: must be"),
    (RulesPolicy, {"filter_purchased": 1}, "[plugins.rules].filter_purchased: must be true or"),
    (RulesPolicy, {"pins": ["a"]}, "[plugins.rules].pins: must be a table"),
    (RulesPolicy, {"pins": {"a": -1}}, "[plugins.rules].pins.a: must be >= 0, got -1"),
    (RulesPolicy, {"pins": {"a": 1.0}}, "[plugins.rules].pins.a: must be an integer"),
    (RulesPolicy, {"pins": {"a": 1, "b": 1}}, "[plugins.rules].pins.b: position 1 is already"),
    (RulesPolicy, {"boost": "sale"}, "[plugins.rules].boost: must be a list"),
    (RulesPolicy, {"boost": ["sale"]}, "[plugins.rules].boost[0]: must be a table"),
    (RulesPolicy, {"boost": [{"field": "c", "value": "x"}]}, "[plugins.rules].boost[0].by: is"),
    (
        RulesPolicy,
        {"bury": [{"field": "c", "value": "x", "by": 0}]},
        "[plugins.rules].bury[0].by: must be > 0, got 0",
    ),
    (
        RulesPolicy,
        {"bury": [{"field": "", "value": "x", "by": 1}]},
        "[plugins.rules].bury[0].field: must be a non-empty string",
    ),
    (
        RulesPolicy,
        {"boost": [{"field": "c", "value": ["x"], "by": 1}]},
        "[plugins.rules].boost[0].value: must be a string, number or boolean",
    ),
    (
        RulesPolicy,
        {"boost": [{"field": "c", "value": "x", "by": 1, "weight": 2}]},
        "[plugins.rules].boost[0].weight: unknown key; known: by, field, value",
    ),
    (RulesPolicy, {"max_per_category": 0}, "[plugins.rules].max_per_category: must be >= 1"),
    (RulesPolicy, {"pin": {}}, "[plugins.rules].pin: unknown key"),
    (ExplorePolicy, {"share": 1.5}, "[plugins.explore].share: must be between 0 and 1, got 1.5"),
    (ExplorePolicy, {"prior_a": 0}, "[plugins.explore].prior_a: must be > 0, got 0"),
    (ExplorePolicy, {"prior_b": -1.0}, "[plugins.explore].prior_b: must be > 0"),
    (ExplorePolicy, {"max_impressions": -1}, "[plugins.explore].max_impressions: must be >= 0"),
    (ExplorePolicy, {"seed": -3}, "[plugins.explore].seed: must be >= 0, got -3"),
    (ExplorePolicy, {"seed": "abc"}, "[plugins.explore].seed: must be an integer"),
    (ExplorePolicy, {"epsilon": 0.1}, "[plugins.explore].epsilon: unknown key"),
]


@pytest.mark.parametrize(("cls", "params", "message"), BAD_PARAMS)
def test_bad_parameters_raise_a_plugin_error_naming_the_key_and_the_rule(cls, params, message):
    """A bad or unknown key raises PluginError whose message starts [plugins.<name>].<key>."""
    with pytest.raises(PluginError) as info:
        cls(**params)

    assert str(info.value).startswith(message)


@pytest.mark.parametrize("cls", [MmrPolicy, BlendPolicy, RulesPolicy, ExplorePolicy])
def test_every_policy_builds_from_an_empty_table_and_meets_the_protocol(cls):
    """Defaults are valid; the instance is a RankingPolicy named after its table."""
    policy = cls()

    assert isinstance(policy, RankingPolicy)
    assert policy.name in {"mmr", "blend", "rules", "explore"}


@pytest.mark.parametrize("cls", [MmrPolicy, BlendPolicy, RulesPolicy, ExplorePolicy])
def test_every_policy_answers_an_empty_request_with_an_empty_order(cls):
    """No candidates in, no candidates out (and no error)."""
    out = cls().apply(request(State(), [], embeddings=np.zeros((0, 4), np.float32)))

    assert (0, 0, 0) == (len(out.order), len(out.scores), len(out.explain))


# --- mmr --------------------------------------------------------------------------------


def clustered(n_clusters: int = 5, per_cluster: int = 10, dim: int = 16, seed: int = 0):
    """
    Items in tight clusters around orthogonal centres; scores put cluster 0 on top.

    Returns (item ids, scores, embeddings, cluster of each item), best score first.
    """
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:n_clusters]
    cluster = np.repeat(np.arange(n_clusters), per_cluster)
    emb = centres[cluster] + 0.05 * rng.normal(size=(len(cluster), dim))
    # cluster 0 scores 10..9.1, the others 9..8.15: the top 10 is all cluster 0, but the
    # other clusters' best items are nearly as relevant
    rank = np.tile(np.arange(per_cluster), n_clusters)
    scores = np.where(cluster == 0, 10.0 - 0.1 * rank, 9.0 - 0.1 * cluster - 0.05 * rank)
    best_first = np.argsort(-scores, kind="stable")
    items = [f"i-{k}" for k in range(len(cluster))]
    return (
        items,
        scores[best_first].astype(np.float32),
        emb[best_first].astype(np.float32),
        cluster[best_first],
    )


def mean_cosine_distance(emb: np.ndarray) -> float:
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = unit @ unit.T
    n = len(emb)
    return float((1 - sim)[~np.eye(n, dtype=bool)].mean())


def test_mmr_raises_the_intra_list_diversity_of_the_top_10_on_clustered_items():
    """Top 10 all from one cluster: after MMR its mean pairwise cosine distance is higher."""
    items, scores, emb, cluster = clustered()
    req = request(State(), items, scores=scores, k=10, embeddings=emb)

    out = MmrPolicy().apply(req)

    before = mean_cosine_distance(emb[:10])
    after = mean_cosine_distance(emb[out.order[:10]])
    assert after > before + 0.3
    assert len(set(cluster[out.order[:10]].tolist())) >= 4
    assert {0} == set(cluster[:10].tolist())


def test_mmr_with_lambda_1_keeps_the_model_order():
    """lambda_ = 1 is top-k by relevance: the incoming order, scores unchanged."""
    items, scores, emb, _ = clustered()
    req = request(State(), items, scores=scores, k=10, embeddings=emb)

    out = MmrPolicy(lambda_=1).apply(req)

    assert list(range(len(items))) == out.order.tolist()
    assert scores.tolist() == out.scores.tolist()


def test_mmr_picks_what_a_plain_greedy_mmr_picks_on_min_max_scaled_scores():
    """The policy's padding and bucketing give the greedy MMR of the scaled scores."""
    rng = np.random.default_rng(3)
    n, top, lam = 37, 7, 0.6
    scores = rng.normal(size=n).astype(np.float32)
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    req = request(State(), [f"i-{k}" for k in range(n)], scores=scores, k=top, embeddings=emb)

    out = MmrPolicy(lambda_=lam).apply(req)

    rel = (scores.astype(float) - scores.min()) / (scores.max() - scores.min())
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    chosen: list[int] = []
    for _ in range(top):
        penalty = (unit @ unit[chosen].T).max(axis=1) if chosen else np.zeros(n)
        value = lam * rel - (1 - lam) * penalty
        value[chosen] = -np.inf
        chosen.append(int(np.argmax(value)))
    rest = [k for k in range(n) if k not in chosen]
    assert chosen + rest == out.order.tolist()


def test_mmr_diversifies_only_the_first_top_positions():
    """With top = 3, positions 3.. hold the other items in incoming order."""
    items, scores, emb, cluster = clustered()
    req = request(State(), items, scores=scores, k=20, embeddings=emb)

    out = MmrPolicy(lambda_=0.5, top=3).apply(req)

    head = out.order[:3].tolist()
    assert 3 == len(set(cluster[head].tolist()))
    assert [k for k in range(len(items)) if k not in head] == out.order[3:].tolist()
    assert all("mmr" in e["mmr"] for e in out.explain[:3])
    assert not any("mmr" in e["mmr"] for e in out.explain[3:])


def test_mmr_explains_relevance_objective_and_how_far_each_item_moved():
    """moved = old position - new position; relevance is the min-max scaled score."""
    items, scores, emb, _ = clustered()
    req = request(State(), items, scores=scores, k=10, embeddings=emb)

    out = MmrPolicy().apply(req)

    for new, (old, entry) in enumerate(zip(out.order.tolist(), out.explain, strict=True)):
        assert old - new == entry["mmr"]["moved"]
        expected = (scores[old] - scores.min()) / (scores.max() - scores.min())
        assert entry["mmr"]["relevance"] == pytest.approx(expected)
    assert out.explain[0]["mmr"]["mmr"] == pytest.approx(0.7)


def test_mmr_without_embeddings_leaves_the_order_and_says_why():
    """embeddings None: incoming order and scores, each entry marked skipped."""
    req = request(State(), ["a", "b", "c"], scores=[3.0, 1.0, 2.0], embeddings=None)

    out = MmrPolicy().apply(req)

    assert [0, 1, 2] == out.order.tolist()
    assert [3.0, 1.0, 2.0] == out.scores.tolist()
    assert [{"mmr": {"skipped": "no embeddings"}}] * 3 == out.explain


def test_mmr_scores_are_carried_by_position():
    """The output scores are the incoming ones sorted: later policies keep MMR's order."""
    items, scores, emb, _ = clustered()
    req = request(State(), items, scores=scores, k=10, embeddings=emb)

    out = MmrPolicy().apply(req)

    assert sorted(scores.tolist(), reverse=True) == out.scores.tolist()
    assert out.order[:10].tolist() != list(range(10))


def test_mmr_warm_up_compiles_every_bucket_a_request_then_uses():
    """After warm_up, requests of 1..100 candidates with that top compile nothing new."""
    # JAX's jit cache is the one witness of a compile
    cache_size = getattr(mmr._mmr_select, "_cache_size", None)  # noqa: SLF001
    if cache_size is None:
        pytest.skip("this JAX has no jit cache counter")
    policy = MmrPolicy(top=5)
    rng = np.random.default_rng(0)

    assert 4 == policy.warm_up(3, max_candidates=100, k=10)  # buckets 16, 32, 64, 128
    before = cache_size()
    for n in (1, 5, 16, 17, 40, 64, 100):
        req = request(State(), [f"i-{j}" for j in range(n)], scores=rng.normal(size=n), k=n,
                      embeddings=rng.normal(size=(n, 3)).astype(np.float32))  # fmt: skip
        assert min(5, n) == len(MmrPolicy(top=5, lambda_=0.3).apply(req).order[:5])

    assert before == cache_size()


# --- blend ------------------------------------------------------------------------------

HOUR = 3600.0


def blend_state(clicks_on_a: int = 3, ages_h: Sequence[float] = (5, 1, 2)) -> State:
    """
    Items a (clicked), b (viewed), c and d, created ``ages_h`` hours before NOW (a, b, c;
    by default b one half-life ago and c two); d has no created_at.
    """
    events: list[Event] = [
        item(name, created_at=NOW - age * HOUR) for name, age in zip("abc", ages_h, strict=True)
    ]
    events += [item("d")]
    events += [Clicked(id=f"c-a-{k}", ts=T0 + k, user="u-9", item="a") for k in range(clicks_on_a)]
    events += [Viewed(id="v-b", ts=T0, user="u-9", item="b")]
    return fold(events)


def test_blend_freshness_halves_at_each_half_life():
    """created_at one half-life ago scores 1/2, two 1/4, none 0 (freshness alone)."""
    state = blend_state()
    req = request(state, ["a", "b", "c", "d"], k=4)

    out = BlendPolicy(w_model=0, w_popularity=0, w_freshness=1, half_life_s=HOUR).apply(req)

    fresh = {
        req.items[i]: e["blend"]["freshness"] for i, e in zip(out.order, out.explain, strict=True)
    }
    assert {"a": 2.0**-5, "b": 0.5, "c": 0.25, "d": 0.0} == fresh
    assert [0.5, 0.25, 2.0**-5, 0.0] == out.scores.tolist()
    assert ["b", "c", "a", "d"] == ids(req, out)


@pytest.mark.parametrize("zero", ["w_model", "w_popularity", "w_freshness"])
def test_blend_a_zero_weight_removes_its_component_exactly(zero):
    """Changing only the zero-weighted input leaves every score bit for bit the same."""
    weights = {"w_model": 0.7, "w_popularity": 0.4, "w_freshness": 0.3, zero: 0}
    policy = BlendPolicy(half_life_s=HOUR, **weights)
    items = ["a", "b", "c", "d"]
    base = request(blend_state(), items, scores=[0.1, 0.9, 0.5, 0.3], k=4)
    changed = {
        "w_model": request(blend_state(), items, scores=[5.0, -1.0, 2.0, 7.0], k=4),
        "w_popularity": request(blend_state(clicks_on_a=40), items, scores=base.scores, k=4),
        "w_freshness": request(blend_state(ages_h=(3, 7, 1)), items, scores=base.scores, k=4),
    }[zero]

    out_base, out_changed = policy.apply(base), policy.apply(changed)

    def by_item(req, out):
        return dict(zip(ids(req, out), out.scores.tolist(), strict=True))

    assert by_item(base, out_base) == by_item(changed, out_changed)


@pytest.mark.parametrize("weight", ["w_model", "w_popularity", "w_freshness"])
def test_blend_a_nonzero_weight_makes_its_component_count(weight):
    """The same change as above moves the scores once the weight is not zero."""
    policy = BlendPolicy(half_life_s=HOUR, **{weight: 1.0})
    items = ["a", "b", "c", "d"]
    base = request(blend_state(), items, scores=[0.1, 0.9, 0.5, 0.3], k=4)
    changed = {
        "w_model": request(blend_state(), items, scores=[5.0, -1.0, 2.0, 7.0], k=4),
        "w_popularity": request(blend_state(clicks_on_a=40), items, scores=base.scores, k=4),
        "w_freshness": request(blend_state(ages_h=(3, 7, 1)), items, scores=base.scores, k=4),
    }[weight]

    assert policy.apply(base).scores.tolist() != policy.apply(changed).scores.tolist()


def test_blend_is_the_weighted_sum_of_its_components():
    """score = w_m * minmax(model) + w_p * log1p(P) / max log1p(P) + w_f * 2^(-age/h)."""
    state = blend_state()
    items = ["a", "b", "c", "d", "unknown"]
    model = [2.0, 4.0, 0.0, 1.0, 3.0]
    req = request(state, items, scores=model, k=5)

    out = BlendPolicy(w_model=0.5, w_popularity=2.0, w_freshness=3.0, half_life_s=HOUR).apply(req)

    week = 7 * 86_400.0  # the fold's default half-life, which popularity decays with
    pop = {
        "a": sum(2 ** (-(NOW - (T0 + k)) / week) for k in range(3)),
        "b": 2 ** (-(NOW - T0) / week),
    }
    log_pop = {i: math.log1p(pop.get(i, 0.0)) for i in items}
    fresh = {"a": 2.0**-5, "b": 0.5, "c": 0.25, "d": 0.0, "unknown": 0.0}
    expected = {
        i: 0.5 * m / 4.0 + 2.0 * log_pop[i] / max(log_pop.values()) + 3.0 * fresh[i]
        for i, m in zip(items, model, strict=True)
    }
    got = dict(zip(ids(req, out), out.scores.tolist(), strict=True))
    assert expected == pytest.approx(got, rel=1e-6)
    assert sorted(expected, key=lambda i: -expected[i]) == ids(req, out)


def test_blend_takes_now_from_the_candidates_newest_event_without_a_context_now():
    """No context "now" and a historical log: freshness is taken at the newest event."""
    state = fold([item("a", created_at=T0 - HOUR), Viewed(id="v", ts=T0, user="u", item="a")])
    req = request(state, ["a"], k=1)
    req = dataclasses.replace(req, context={})

    out = BlendPolicy(w_model=0, w_popularity=0, w_freshness=1, half_life_s=HOUR).apply(req)

    assert [0.5] == out.scores.tolist()


# --- rules ------------------------------------------------------------------------------


def shop() -> State:
    """Ten items in three categories; e is unavailable, g was and is again; u-1 bought c."""
    cats = {"a": "shoes", "b": "shoes", "c": "shoes", "d": "hats", "e": "hats", "f": "hats"}
    cats |= {"g": "bags", "h": "bags", "i": "bags", "j": "shoes"}
    events: list[Event] = [
        item(i, category=c, tags=["sale"] if i in "bh" else []) for i, c in cats.items()
    ]
    events += [item("e", available=False), item("g", available=False), item("g", available=True)]
    events += [item("h", price=1, flag=True), item("i", flag=1)]
    events += [Purchased(id="p-1", ts=T0, user="u-1", item="c")]
    return fold(events)


SHOP = list("abcdefghij")


def test_rules_filter_unavailable_and_purchased_items():
    """e (available = false) and c (bought by u-1) are gone; g is available again."""
    req = request(shop(), SHOP, user="u-1")

    out = RulesPolicy().apply(req)

    assert ["a", "b", "d", "f", "g", "h", "i", "j"] == ids(req, out)


def test_rules_filter_purchases_only_of_the_requesting_user():
    """Another user still gets c; filter_purchased = false keeps it for u-1 too."""
    state = shop()

    other = RulesPolicy().apply(req := request(state, SHOP, user="u-2"))
    kept = RulesPolicy(filter_purchased=False).apply(req1 := request(state, SHOP, user="u-1"))

    assert "c" in ids(req, other)
    assert "c" in ids(req1, kept)


def test_rules_without_filters_keep_everything_in_order():
    """Both filters off and no other rule: the incoming order and scores."""
    req = request(shop(), SHOP, user="u-1")

    out = RulesPolicy(filter_unavailable=False, filter_purchased=False).apply(req)

    assert SHOP == ids(req, out)
    assert req.scores.tolist() == out.scores.tolist()
    assert [{"rules": {}}] * 10 == out.explain


def test_rules_pin_items_to_positions():
    """j to the top and a to position 3; a pinned but filtered item is not shown."""
    req = request(shop(), SHOP, user="u-1")

    out = RulesPolicy(pins={"j": 0, "a": 3, "e": 1, "zz": 2}).apply(req)

    assert ["j", "b", "d", "a", "f", "g", "h", "i"] == ids(req, out)
    assert {"pinned": 0} == out.explain[0]["rules"]
    assert {"pinned": 3} == out.explain[3]["rules"]


def test_rules_pins_past_the_end_go_last():
    """A pin past the end of the list lands in the last slot."""
    req = request(shop(), ["a", "b", "d"], user="u-1")

    out = RulesPolicy(pins={"a": 50}).apply(req)

    assert ["b", "d", "a"] == ids(req, out)


def test_rules_boost_by_category_and_bury_by_a_list_field():
    """Bags up by 4.5 (above d, 7), sale-tagged items (b, h) down by 10."""
    req = request(shop(), SHOP, user="u-1")

    out = RulesPolicy(
        boost=[{"field": "category", "value": "bags", "by": 4.5}],
        bury=[{"field": "tags", "value": "sale", "by": 10}],
    ).apply(req)

    # incoming scores: a 10, b 9, d 7, f 5, g 4, h 3, i 2, j 1 (c and e filtered)
    # adjusted: a 10, b -1, d 7, f 5, g 8.5, h -2.5, i 6.5, j 1
    assert ["a", "g", "d", "i", "f", "j", "b", "h"] == ids(req, out)
    explain = dict(zip(ids(req, out), out.explain, strict=True))
    assert {"boosted": 4.5, "score": 8.5} == explain["g"]["rules"]
    assert {"boosted": 4.5, "buried": 10.0, "score": -2.5} == explain["h"]["rules"]
    assert {} == explain["a"]["rules"]
    assert [10, 8.5, 7, 6.5, 5, 1, -1, -2.5] == out.scores.tolist()


def test_rules_boolean_rules_match_only_booleans():
    """flag = true matches h (true), not i (1); a number rule 1 matches i, not h."""
    req = request(shop(), SHOP, user="u-1")

    by_bool = RulesPolicy(boost=[{"field": "flag", "value": True, "by": 100}]).apply(req)
    by_number = RulesPolicy(boost=[{"field": "flag", "value": 1, "by": 100}]).apply(req)

    assert "h" == ids(req, by_bool)[0]
    assert "i" == ids(req, by_number)[0]
    assert "a" == ids(req, by_bool)[1]


def test_rules_cap_items_per_category_in_the_top_k():
    """At most 2 shoes in the top 5: the third shoe moves below position 5, marked capped."""
    req = request(shop(), SHOP, user="u-2", k=5)  # u-2 bought nothing; e unavailable

    out = RulesPolicy(max_per_category=2).apply(req)

    # incoming a b c d f g h i j: shoes a b c j, hats d f, bags g h i
    assert ["a", "b", "d", "f", "g", "c", "h", "i", "j"] == ids(req, out)
    assert {"capped": True} == out.explain[5]["rules"]


def test_rules_cap_drops_over_cap_items_when_the_list_cannot_reach_past_k():
    """Four shoes, cap 1, k 3: only one shoe can be shown; the others are dropped."""
    req = request(shop(), ["a", "b", "c", "j", "d"], user="u-2", k=3)

    out = RulesPolicy(max_per_category=1).apply(req)

    assert ["a", "d"] == ids(req, out)


def test_rules_cap_counts_pins_in_the_top_k():
    """Shoe j pinned at 0 uses the single shoe allowance of the top 3."""
    req = request(shop(), SHOP, user="u-2", k=3)

    out = RulesPolicy(max_per_category=1, pins={"j": 0}).apply(req)

    assert ["j", "d", "g"] == ids(req, out)[:3]


# --- explore ----------------------------------------------------------------------------


def shown(state: State, counts: dict[str, tuple[int, int]]) -> State:
    """Fold ``{item: (impressions, clicks)}`` into ``state`` as impressions and clicks."""
    events: list[Event] = []
    for name, (n_shown, n_clicked) in counts.items():
        events += [
            ItemsShown(id=f"s-{next(_ids)}", ts=T0, user="u-9", items=[name])
            for _ in range(n_shown)
        ]
        events += [
            Clicked(id=f"c-{next(_ids)}", ts=T0, user="u-9", item=name) for _ in range(n_clicked)
        ]
    return fold(events, state)


def test_explore_gives_the_last_share_of_the_top_k_to_sampled_items():
    """k 10, share 0.3: positions 0-6 keep their order, 7-9 are explored eligible items."""
    items = [f"i-{k}" for k in range(30)]
    state = shown(fold([item(i) for i in items]), dict.fromkeys(items[:20], (500, 20)))
    req = request(state, items, k=10)

    out = ExplorePolicy(share=0.3, seed=1).apply(req)

    assert list(range(7)) == out.order[:7].tolist()
    explored = out.order[7:10].tolist()
    assert all(k >= 20 for k in explored)  # only the 10 items shown at most 100 times
    assert [True] * 3 == [e["explore"].get("explored", False) for e in out.explain[7:10]]
    assert not any(e["explore"] for e in out.explain[:7] + out.explain[10:])
    samples = [e["explore"]["sampled"] for e in out.explain[7:10]]
    assert sorted(samples, reverse=True) == samples
    rest = [k for k in range(30) if k not in range(7) and k not in explored]
    assert rest == out.order[10:].tolist()


def test_explore_with_share_0_changes_nothing():
    """No exploration slots: the incoming order, no explored entries."""
    items = [f"i-{k}" for k in range(12)]
    req = request(fold([item(i) for i in items]), items, k=10)

    out = ExplorePolicy(share=0).apply(req)

    assert list(range(12)) == out.order.tolist()
    assert [{"explore": {}}] * 12 == out.explain


@pytest.mark.parametrize(
    ("share", "k", "slots"), [(0.1, 20, 2), (0.1, 5, 1), (0.1, 4, 0), (1, 7, 7)]
)
def test_explore_slot_count_is_share_times_k_rounded_half_up(share, k, slots):
    """round(share * k), halves up."""
    assert slots == ExplorePolicy(share=share).slots(k)


def test_explore_with_a_seed_is_reproducible():
    """Two policies with the same seed explore the same items for the same requests."""
    items = [f"i-{k}" for k in range(40)]
    req = request(fold([item(i) for i in items]), items, k=20)
    one, two = ExplorePolicy(share=0.5, seed=7), ExplorePolicy(share=0.5, seed=7)

    first = [one.apply(req).order.tolist() for _ in range(3)]
    second = [two.apply(req).order.tolist() for _ in range(3)]

    assert first == second
    assert first[0] != first[1]  # the generator advances between requests


def test_explore_posterior_uses_clicks_and_impressions_from_the_state():
    """alpha = clicks + prior_a, beta = impressions - clicks + prior_b."""
    items = ["a", "b"]
    state = shown(fold([item(i) for i in items]), {"a": (9, 4), "b": (3, 0)})
    req = request(state, items, k=2)

    out = ExplorePolicy(share=1, prior_a=2, prior_b=3, seed=0).apply(req)

    params = {req.items[i]: e["explore"] for i, e in zip(out.order, out.explain, strict=True)}
    assert (6.0, 8.0) == (params["a"]["alpha"], params["a"]["beta"])
    assert (2.0, 6.0) == (params["b"]["alpha"], params["b"]["beta"])


def simulate(choose, ctr: np.ndarray, rounds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """
    A one-slot bandit over a real state: each round ``choose(state)`` names the item shown,
    an impression is folded in, and a click with the item's true CTR.

    Returns (expected regret per round, index shown per round).
    """
    rng = np.random.default_rng(seed)
    items = [f"i-{k}" for k in range(len(ctr))]
    state = fold([item(i) for i in items])
    regret, picks = np.zeros(rounds), np.zeros(rounds, np.int64)
    for t in range(rounds):
        k = choose(state, items)
        events: list[Event] = [ItemsShown(id=f"s-{t}", ts=T0 + t, user="u-1", items=[items[k]])]
        if rng.random() < ctr[k]:
            events.append(Clicked(id=f"c-{t}", ts=T0 + t, user="u-1", item=items[k]))
        project(state, events)
        regret[t], picks[t] = ctr.max() - ctr[k], k
    return regret, picks


def test_thompson_sampling_finds_the_best_item_with_sublinear_regret():
    """
    20 items, one with CTR 0.3 and the rest 0.02-0.1: ranking by Thompson sampling (share 1,
    top slot shown) shows the best item more and more, and its cumulative regret is a
    fraction of a uniform random explorer's, flattening while the random one grows linearly.
    """
    ctr = np.random.default_rng(11).uniform(0.02, 0.1, size=20)
    ctr[13] = 0.3
    rounds = 1500
    policy = ExplorePolicy(share=1, max_impressions=10**9, seed=5)
    uniform = np.random.default_rng(5)

    def thompson(state, items):
        return int(policy.apply(request(state, items, k=1)).order[0])

    def random_pick(state, items):  # noqa: ARG001 - the same signature as thompson
        return int(uniform.integers(len(items)))

    ts_regret, ts_picks = simulate(thompson, ctr, rounds, seed=1)
    random_regret, _ = simulate(random_pick, ctr, rounds, seed=1)

    third = rounds // 3
    best_share = [float((ts_picks[s : s + third] == 13).mean()) for s in range(0, rounds, third)]
    assert best_share[0] < best_share[1] < best_share[2]
    assert best_share[2] > 0.8
    assert ts_regret.sum() < 0.5 * random_regret.sum()
    # sublinear: the last third adds far less regret than the first; random adds the same
    assert ts_regret[-third:].sum() < 0.3 * ts_regret[:third].sum()
    assert random_regret[-third:].sum() > 0.8 * random_regret[:third].sum()
