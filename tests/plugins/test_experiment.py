"""
The ``experiment`` policy: stable assignment, team-draft interleaving, the report, and
a simulation in which interleaving finds the better ranker with fewer impressions
than an A/B test.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventstore import State
from eventstore.schema import Clicked, ItemsShown, Viewed
from plugins.base import PluginError, PolicyInput
from plugins.context import PluginContext
from plugins.policies.experiment import (
    ExperimentPolicy,
    assign,
    experiment_report,
    sign_test,
    team_draft,
    two_proportion_test,
    wilson,
)
from plugins.registry import REGISTRY

T0 = 1764250000.0


def build(params: dict[str, Any]) -> ExperimentPolicy:
    """The experiment as the daemon builds it: through the registry, with a context."""
    (policy,) = REGISTRY.policies(["experiment"], {"experiment": params},
                                  context=PluginContext(data_dir=Path("/nonexistent")))  # fmt: skip
    assert isinstance(policy, ExperimentPolicy)
    return policy


def two_arms(mode: str = "ab", **more: Any) -> dict[str, Any]:
    return {"name": "exp-1", "mode": mode, "arms": [
        {"name": "control"},
        {"name": "boosted", "policies": ["rules"],
         "params": {"rules": {"pins": {"c": 0}}}},
    ], **more}  # fmt: skip


def request(items: list[str], user: str = "u-1") -> PolicyInput:
    n = len(items)
    return PolicyInput(user=user, user_row=-1, items=items,
                       scores=np.arange(n, 0, -1, dtype=np.float32),
                       rows=np.full(n, -1, np.int64), state=State(), k=n)  # fmt: skip


# --- assignment ------------------------------------------------------------------------


def test_assignment_is_stable_across_instances_and_independent_of_the_call_order():
    users = [f"p:{k:032x}" for k in range(2_000)]
    first = build(two_arms())
    arms = [first.arm_of(u).name for u in users]
    again = build(two_arms())  # a restart, or another host
    assert [again.arm_of(u).name for u in reversed(users)] == arms[::-1]
    assert set(arms) == {"control", "boosted"}


@pytest.mark.parametrize("shares", [(0.5, 0.5), (0.2, 0.3, 0.5), (1, 9)])
def test_assignment_proportions_are_within_binomial_tolerance(shares):
    """20,000 users: each arm's count within 4.5 standard deviations of its share."""
    n = 20_000
    counts = Counter(assign("exp-shares", f"user-{k}", shares) for k in range(n))
    total = sum(shares)
    for arm, share in enumerate(shares):
        p = share / total
        assert abs(counts[arm] - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)), (arm, counts)


def test_two_experiments_assign_independently():
    """Another name reshuffles: arm agreement is what independence predicts (~50%)."""
    n = 20_000
    same = sum(assign("exp-a", f"u{k}", (1, 1)) == assign("exp-b", f"u{k}", (1, 1))
               for k in range(n))  # fmt: skip
    assert abs(same - n / 2) <= 4.5 * math.sqrt(n / 4)


def test_the_ab_answer_is_the_arms_chain_with_the_arm_recorded():
    policy = build(two_arms())
    users = {policy.arm_of(f"u{k}").name: f"u{k}" for k in range(50)}
    out_control = policy.apply(request(["a", "b", "c"], users["control"]))
    out_boosted = policy.apply(request(["a", "b", "c"], users["boosted"]))
    assert out_control.order.tolist() == [0, 1, 2]
    assert out_boosted.order.tolist() == [2, 0, 1]  # the arm's rules pinned c first
    assert dict(out_boosted.record) == {"experiment": "exp-1", "arm": "boosted"}
    assert out_boosted.explain[0]["rules"]["pinned"] == 0
    assert out_boosted.explain[0]["experiment"] == {"name": "exp-1", "arm": "boosted"}


# --- parameters ------------------------------------------------------------------------

BAD = [
    ({"mode": "ab", "arms": [{"name": "a"}, {"name": "b"}]}, "[plugins.experiment].name: must be"),
    ({**two_arms(), "name": "bad name"}, "[plugins.experiment].name: must be 1 to 64"),
    ({**two_arms(), "mode": "split"}, "[plugins.experiment].mode: must be one of ab, interleave"),
    ({**two_arms(), "arms": [{"name": "a"}]}, "[plugins.experiment].arms: must be a list of at"),
    ({**two_arms("interleave"), "arms": [{"name": "a"}, {"name": "b"}, {"name": "c"}]},
     "[plugins.experiment].arms: interleave takes exactly two arms"),
    ({**two_arms(), "arms": [{"name": "a"}, {"name": "a"}]},
     "[plugins.experiment].arms[1].name: must differ from the other arms'"),
    ({**two_arms(), "arms": [{"name": "a", "share": 0}, {"name": "b"}]},
     "[plugins.experiment].arms[0].share: must be > 0, got 0"),
    ({**two_arms(), "arms": [{"name": "a", "colour": 1}, {"name": "b"}]},
     "[plugins.experiment].arms[0].colour: unknown key"),
    ({**two_arms(), "arms": [{"name": "a", "policies": "rules"}, {"name": "b"}]},
     "[plugins.experiment].arms[0].policies: must be a list of policy names"),
    ({**two_arms(), "arms": [{"name": "a", "params": {"mmr": {}}}, {"name": "b"}]},
     "[plugins.experiment].arms[0].params.mmr: names a policy the arm does not list"),
    ({**two_arms(), "arms": [{"name": "a", "policies": ["rules"],
                              "params": {"rules": {"pins": {"x": -1}}}}, {"name": "b"}]},
     "[plugins.experiment].arms[0]: [plugins.rules].pins"),
    ({**two_arms(), "arms": [{"name": "a", "policies": ["nope"]}, {"name": "b"}]},
     "[plugins.experiment].arms[0]: unknown plugin 'nope'"),
    ({**two_arms(), "arms": [{"name": "a", "model": "/nonexistent/m.safetensors"},
                             {"name": "b"}]},
     "[plugins.experiment].arms[0].model:"),
    ({**two_arms(), "seed": -1}, "[plugins.experiment].seed: must be >= 0"),
    ({**two_arms(), "colour": 1}, "[plugins.experiment].colour: unknown key"),
]  # fmt: skip


@pytest.mark.parametrize(("params", "message"), BAD)
def test_bad_parameters_name_the_key_and_the_rule(params, message):
    with pytest.raises(PluginError) as caught:
        build(params)
    assert message in str(caught.value)


def test_an_experiment_inside_an_arm_is_refused():
    params = {**two_arms(), "arms": [{"name": "a", "policies": ["experiment"]}, {"name": "b"}]}
    with pytest.raises(PluginError, match="'experiment' would contain itself"):
        build(params)


# --- team draft -------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 30), unique=True, max_size=20),
       st.lists(st.integers(0, 30), unique=True, max_size=20), st.integers(0, 2**32))  # fmt: skip
def test_team_draft_properties(a, b, seed):
    """
    The merged list holds every item of either ranking once; a team only contributes
    items of its own ranking, each the best of its ranking not already shown; while
    both rankings have items left, the teams' picks differ by at most one.
    """
    merged, teams = team_draft(a, b, np.random.default_rng(seed))
    assert sorted(merged) == sorted(set(a) | set(b))
    picks = [0, 0]
    for position, (item, team) in enumerate(zip(merged, teams, strict=True)):
        mine = (a, b)[team]
        shown = set(merged[:position])
        assert item == next(x for x in mine if x not in shown)
        left = [any(x not in shown for x in seq) for seq in (a, b)]
        picks[team] += 1
        if all(left):
            assert abs(picks[0] - picks[1]) <= 1


def test_team_draft_of_one_ranking_with_itself_keeps_it():
    merged, teams = team_draft([3, 1, 2], [3, 1, 2], np.random.default_rng(0))
    assert merged == [3, 1, 2]
    assert sorted(Counter(teams).values()) == [1, 2]


def test_interleaving_coin_is_fair():
    """Over 4,000 draws of two disjoint rankings, team a opens about half of the lists."""
    coin = np.random.default_rng(7)
    first = [team_draft([0], [1], coin)[1][0] for _ in range(4_000)]
    assert abs(sum(first) - 2_000) <= 4.5 * math.sqrt(1_000)


# --- the report ---------------------------------------------------------------------------


def shown(rid: str, user: str, items: list[str], **context: Any) -> ItemsShown:
    return ItemsShown(id=f"imp-{rid}", ts=T0, user=user, items=items, ranking_id=rid,
                      context=context)  # fmt: skip


def click(rid: str | None, item: str, n: int = 0) -> Clicked:
    return Clicked(id=f"c-{rid}-{item}-{n}", ts=T0 + 1, user="u", item=item, ranking_id=rid)


def test_ab_report_counts_attributed_clicks_per_arm():
    events = [
        click("r4", "b"),  # logged before its impression: still attributed
        shown("r1", "u1", ["a", "b"], experiment="e", arm="control"),
        shown("r2", "u2", ["a", "b"], experiment="e", arm="control"),
        shown("r3", "u3", ["a", "b"], experiment="e", arm="treat"),
        shown("r4", "u4", ["a", "b"], experiment="e", arm="treat"),
        shown("r5", "u5", ["a", "b"]),  # no experiment
        click("r1", "a"), click("r1", "b"),  # two clicks, one clicked ranking
        click("r1", "a", 2),  # the same item again: counted once
        click("r3", "a"),
        click("r2", "zzz"),  # an item r2 did not show
        click(None, "a"), click("r-unknown", "a"), click("r5", "a"),
        Viewed(id="v1", ts=T0, user="u", item="a", ranking_id="r2"),  # not a click
    ]  # fmt: skip
    (report,) = experiment_report(events)["experiments"]
    assert report["name"] == "e"
    assert report["mode"] == "ab"
    control, treat = report["arms"]
    assert (control["arm"], control["impressions"], control["clicks"], control["clicked"]) == (
        "control", 2, 2, 1)
    assert (treat["arm"], treat["impressions"], treat["clicks"], treat["clicked"]) == (
        "treat", 2, 2, 2)
    assert control["ctr"] == 0.5
    assert treat["ctr"] == 1.0
    assert treat["vs_first"]["lift"] == 1.0
    # pooled p = 3/4, se = sqrt(3/16 * (1/2 + 1/2)) = 0.4330; z = 0.5 / se = 1.1547
    assert treat["vs_first"]["z"] == pytest.approx(1.154701, abs=1e-6)
    assert treat["vs_first"]["p_value"] == pytest.approx(0.248213, abs=1e-6)


def test_interleaving_report_credits_clicks_to_the_contributing_team():
    events = [
        shown("r1", "u1", ["x", "y", "z"], experiment="i", arms="left,right", teams="abb"),
        shown("r2", "u2", ["x", "y", "z"], experiment="i", arms="left,right", teams="bab"),
        shown("r3", "u3", ["x", "y", "z"], experiment="i", arms="left,right", teams="abb"),
        shown("r4", "u4", ["x", "y", "z"], experiment="i", arms="left,right", teams="aba"),
        click("r1", "x"),  # left
        click("r2", "x"), click("r2", "y"), click("r2", "z"),  # right 2, left 1: right
        click("r3", "x"), click("r3", "y"),  # 1 - 1: a tie
    ]  # fmt: skip
    (report,) = experiment_report(events)["experiments"]
    assert report["mode"] == "interleave"
    assert report["impressions"] == 4
    assert report["clicked"] == 3
    assert report["wins"] == {"left": 1, "right": 1}
    assert report["ties"] == 1
    assert report["preference"] == 0.0
    assert report["p_value"] == 1.0


def test_statistics_match_hand_computation():
    # sign test, 9 wins against 1: 2 * (C(10,9) + C(10,10)) / 2^10
    assert sign_test(9, 1) == pytest.approx(2 * 11 / 1024)
    assert sign_test(0, 0) == 1.0
    # Wilson, 0 of 10: (0, z^2/(n + z^2))
    lo, hi = wilson(0, 10)
    assert lo == 0.0
    assert hi == pytest.approx(1.959964**2 / (10 + 1.959964**2))
    assert two_proportion_test(5, 10, 5, 10) == {"lift": 0.0, "z": 0.0, "p_value": 1.0}


# --- interleaving against A/B: a simulation ----------------------------------------------

N_CANDIDATES, K_SHOWN = 50, 10
EXAMINE = 1 / np.arange(1, K_SHOWN + 1) ** 0.8  # position bias: who looks that far down


def _queries(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per ranking: each candidate's relevance to this user, and how much the user clicks."""
    return rng.beta(0.3, 3.0, (n, N_CANDIDATES)), rng.uniform(0.1, 1.0, (n, 1))


def _rank(relevance: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """A ranker that sees relevance through Gaussian noise (less noise: a better ranker)."""
    noisy = relevance + rng.normal(0, noise, relevance.shape)
    return np.argsort(-noisy, axis=-1)[:, :K_SHOWN]


def _clicks(relevance: np.ndarray, propensity: np.ndarray, shown: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:  # fmt: skip
    p = np.take_along_axis(relevance, shown, -1) * propensity * EXAMINE[: shown.shape[1]]
    return rng.random(p.shape) < p


def _ab_detects(n: int, rng: np.random.Generator, better: float, worse: float) -> bool:
    """n rankings per arm; detected when the report's z-test says so at 95%, right way."""
    rel_a, prop_a = _queries(n, rng)
    rel_b, prop_b = _queries(n, rng)
    clicked_a = int(_clicks(rel_a, prop_a, _rank(rel_a, better, rng), rng).any(axis=1).sum())
    clicked_b = int(_clicks(rel_b, prop_b, _rank(rel_b, worse, rng), rng).any(axis=1).sum())
    test = two_proportion_test(clicked_b, n, clicked_a, n)
    return test["p_value"] < 0.05 and clicked_a > clicked_b


def _interleaving_detects(n: int, rng: np.random.Generator, better: float, worse: float) -> bool:
    """n interleaved rankings, through the policy's team draft and the report."""
    relevance, propensity = _queries(n, rng)
    a, b = _rank(relevance, better, rng), _rank(relevance, worse, rng)
    events: list[Any] = []
    for k in range(n):
        merged, teams = team_draft(a[k].tolist(), b[k].tolist(), rng)
        top = np.asarray(merged[:K_SHOWN])
        items = [f"i{i}" for i in top.tolist()]
        events.append(shown(f"r{k}", f"u{k}", items, experiment="sim", arms="A,B",
                            teams="".join("ab"[t] for t in teams[:K_SHOWN])))  # fmt: skip
        hits = _clicks(relevance[k : k + 1], propensity[k : k + 1], top[None], rng)[0]
        events += [click(f"r{k}", items[p]) for p in np.flatnonzero(hits).tolist()]
    (report,) = experiment_report(events)["experiments"]
    return report["p_value"] < 0.05 and report["wins"]["A"] > report["wins"]["B"]


def _impressions_needed(detects: Any, seed: int, reps: int = 40) -> int:
    """The fewest rankings (on a x√2 grid) at which ``detects`` succeeds in >= 80% of reps."""
    rng = np.random.default_rng(seed)
    for step in range(30):
        n = round(100 * 2 ** (step / 2))
        if sum(detects(n, rng) for _ in range(reps)) >= 0.8 * reps:
            return n
    msg = "never detected"
    raise AssertionError(msg)


def test_interleaving_detects_the_better_ranker_with_fewer_impressions_than_ab(record_property):
    """
    Ranker A sees relevance with noise 0.05, ranker B with 0.15: A is truly better.
    At 95% confidence and 80% power, interleaving needs fewer rankings than an A/B
    test's two arms together (A/B's n is per arm, so it is doubled).
    """
    ab = 2 * _impressions_needed(functools.partial(_ab_detects, better=0.05, worse=0.15), 1)
    inter = _impressions_needed(
        functools.partial(_interleaving_detects, better=0.05, worse=0.15), 2)
    ratio = ab / inter
    record_property("ab_impressions", ab)
    record_property("interleaving_impressions", inter)
    print(f"\nimpressions for 80% power at 95%: A/B {ab}, interleaving {inter}, "  # noqa: T201
          f"ratio {ratio:.2f}")  # fmt: skip
    assert inter < ab
