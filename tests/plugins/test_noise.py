"""
``noise``: Laplace noise on exported per-item aggregates, and its post-processing.

The statistical tests draw with a fixed seed, so they are deterministic: they check
that the noise *is* Laplace(0, sensitivity / ε), and that the same test rejects a
Laplace of twice the scale (so it is able to fail).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

from plugins.base import PluginError, PrivacyPlugin
from plugins.context import PluginContext
from plugins.privacy.noise import NOISED, Noise
from plugins.registry import Registry

#: Exact values far above any draw, so clamping at 0 never fires.
LARGE = 1_000_000
#: Items per statistical export: 4 noised numbers each, 80,000 draws.
ITEMS = 20_000


def item(name: str, impressions: float, clicks: float, interactions: float = 0,
         popularity: float = 0.0) -> dict[str, Any]:  # fmt: skip
    """One item of an ``export`` answer, with its exact CTR."""
    ctr = clicks / impressions if impressions else 0.0
    return {"item": name, "impressions": impressions, "clicks": clicks,
            "interactions": interactions, "popularity": popularity, "ctr": ctr}  # fmt: skip


def large_export(n: int = ITEMS) -> dict[str, Any]:
    return {"items": [item(f"i-{k}", LARGE, LARGE, LARGE, float(LARGE)) for k in range(n)],
            "total": n, "next_offset": None}  # fmt: skip


def draws(plugin: Noise) -> np.ndarray:
    """The noise of one large export: noised minus exact, every noised field pooled."""
    noised = plugin.export(large_export())["items"]
    return np.array([[it[k] for k in NOISED] for it in noised], np.float64).ravel() - LARGE


# ---------------------------------------------------------------- the distribution


@pytest.mark.parametrize(("epsilon", "sensitivity", "seed"), [
    (0.5, 1.0, 11),  # scale 2
    (2.0, 1.0, 12),  # scale 0.5
    (1.0, 3.0, 13),  # scale 3: sensitivity scales the noise too
])  # fmt: skip
def test_the_noise_is_laplace_with_scale_sensitivity_over_epsilon(
    epsilon: float, sensitivity: float, seed: int
) -> None:
    """
    Over 80,000 draws the noise passes a Kolmogorov-Smirnov test against
    Laplace(0, sensitivity / ε) at p > 0.01, and its mean absolute value (the scale,
    for a Laplace) is within 2 % of it.
    """
    scale = sensitivity / epsilon
    noise = draws(Noise(epsilon=epsilon, sensitivity=sensitivity, seed=seed))
    assert ITEMS * len(NOISED) == len(noise)
    assert stats.kstest(noise, "laplace", args=(0.0, scale)).pvalue > 0.01
    assert abs(np.abs(noise).mean() / scale - 1) < 0.02
    assert abs(np.median(noise)) < 0.02 * scale


@pytest.mark.parametrize(("epsilon", "seed"), [(0.5, 11), (2.0, 12)])
def test_the_test_rejects_twice_the_scale(epsilon: float, seed: int) -> None:
    """The same draws fail the KS test against Laplace with twice the scale."""
    noise = draws(Noise(epsilon=epsilon, seed=seed))
    assert stats.kstest(noise, "laplace", args=(0.0, 2 / epsilon)).pvalue < 0.01


def test_the_fields_and_items_get_independent_noise() -> None:
    """No two noised fields of the large export are correlated (|r| < 0.03)."""
    noise = draws(Noise(epsilon=1.0, seed=14)).reshape(ITEMS, len(NOISED))
    r = np.corrcoef(noise, rowvar=False)
    assert np.abs(r[np.triu_indices(len(NOISED), 1)]).max() < 0.03
    assert abs(np.corrcoef(noise[:-1, 0], noise[1:, 0])[0, 1]) < 0.03


def test_a_seed_repeats_the_draws_and_exports_differ() -> None:
    """Two plugins of one seed draw alike; two exports of one plugin draw anew."""
    answer = large_export(50)
    first, again = Noise(seed=5), Noise(seed=5)
    one = first.export(answer)
    assert one == again.export(answer)
    assert one["items"] != first.export(answer)["items"]
    assert one["items"] != Noise(seed=6).export(answer)["items"]


# ------------------------------------------------------------------ post-processing


def test_noised_counts_are_clamped_at_zero_and_rounded() -> None:
    """Zero counts with large noise: never below 0, some above; 3 decimals at most."""
    plugin = Noise(epsilon=0.1, seed=21)
    answer = plugin.export({"items": [item(f"i-{k}", 0, 0) for k in range(200)]})
    values = np.array([[it[k] for k in NOISED] for it in answer["items"]])
    assert values.min() == 0.0
    assert (values > 0).mean() > 0.3  # about half the draws are positive
    assert np.array_equal(values, np.round(values, 3))


def test_ctr_is_recomputed_from_the_noised_counts_and_clipped() -> None:
    """ctr = noised clicks / noised impressions, in [0, 1]; 0 when impressions are 0."""
    plugin = Noise(epsilon=0.2, seed=22)
    answer = plugin.export({"items": [item(f"i-{k}", 3, 2) for k in range(500)]})
    for noised in answer["items"]:
        shown, clicked, ctr = noised["impressions"], noised["clicks"], noised["ctr"]
        expected = min(clicked / shown, 1.0) if shown > 0 else 0.0
        assert round(expected, 6) == ctr
    ctrs = [it["ctr"] for it in answer["items"]]
    assert (0.0, 1.0) == (min(ctrs), max(ctrs))  # both clips fire at this much noise


def test_the_answer_says_what_was_applied_and_keeps_the_rest() -> None:
    """The noise entry names the mechanism and parameters; other keys and ids stay."""
    exact = {"items": [item("a", 10, 1, 12, 3.5)], "total": 7, "next_offset": 1}
    answer = Noise(epsilon=0.5, sensitivity=2.0, seed=1).export(exact)
    assert {"mechanism": "laplace", "epsilon": 0.5, "sensitivity": 2.0} == answer["noise"]
    assert (7, 1, "a") == (answer["total"], answer["next_offset"], answer["items"][0]["item"])
    assert exact == {"items": [item("a", 10, 1, 12, 3.5)], "total": 7, "next_offset": 1}


def test_an_empty_page_is_noised_to_an_empty_page() -> None:
    """No items: no draws, the noise entry all the same."""
    answer = Noise(seed=1).export({"items": [], "total": 0, "next_offset": None})
    assert ([], "laplace") == (answer["items"], answer["noise"]["mechanism"])


def test_stats_pass_unchanged() -> None:
    """Aggregates without an items list (the stats op's counters) are left alone."""
    counters = {"users": 3, "items": 2, "events": {"accepted": 9}, "rank_latency_ms": {}}
    assert counters == Noise(seed=1).export(counters)


def test_events_and_user_ids_pass_unchanged(make_event: Any) -> None:
    """ingest and user_id are identities: noise applies to what leaves, not what is kept."""
    events = [make_event("click", 1), make_event("view", 2)]
    plugin = Noise()
    assert (events, "u-1") == (plugin.ingest(events), plugin.user_id("u-1"))
    assert isinstance(plugin, PrivacyPlugin)


# ------------------------------------------------------------- parameters, registry


SEED_RULE = f"must be an integer between 0 and {2**63 - 1}"


@pytest.mark.parametrize(("params", "message"), [
    ({"epsilon": 0}, "[plugins.noise].epsilon: must be > 0, got 0"),
    ({"epsilon": -1.5}, "[plugins.noise].epsilon: must be > 0, got -1.5"),
    ({"epsilon": "1"}, "[plugins.noise].epsilon: must be a number, got '1'"),
    ({"epsilon": float("inf")}, "[plugins.noise].epsilon: must be finite, got inf"),
    ({"sensitivity": 0.0}, "[plugins.noise].sensitivity: must be > 0, got 0.0"),
    ({"sensitivity": True}, "[plugins.noise].sensitivity: must be a number, got True"),
    ({"seed": 1.5}, f"[plugins.noise].seed: {SEED_RULE}, got 1.5"),
    ({"seed": -1}, f"[plugins.noise].seed: {SEED_RULE}, got -1"),
])  # fmt: skip
def test_bad_parameters_name_the_key_and_rule(params: dict[str, Any], message: str) -> None:
    """Each bad value is refused with [plugins.noise].<key> and the rule."""
    with pytest.raises(PluginError) as caught:
        Noise(**params)
    assert message == str(caught.value)


def test_defaults() -> None:
    """ε = 1, sensitivity 1, no seed: scale 1, drawn from the operating system's entropy."""
    plugin = Noise()
    assert (1.0, 1.0, None, 1.0) == (plugin.epsilon, plugin.sensitivity, plugin.seed,
                                     plugin.scale)  # fmt: skip


def test_the_registry_finds_noise_through_its_entry_point(tmp_path: Path) -> None:
    """`noise` is an entry point of rerankd and builds as a privacy plugin from its table."""
    registry = Registry()
    info = {i.name: (i.value, i.distribution) for i in registry.info()}
    built = registry.build("noise", {"epsilon": 0.25, "seed": 3}, kind="privacy",
                           context=PluginContext(data_dir=tmp_path))  # fmt: skip
    assert ("plugins.privacy.noise:Noise", "rerankd") == info["noise"]
    assert (Noise, 4.0) == (type(built), built.scale)
    assert {"epsilon": 1.0, "sensitivity": 1.0, "seed": None} == registry.defaults("noise")


def test_an_unknown_key_is_refused_by_the_registry(tmp_path: Path) -> None:
    """A key Noise does not take is refused before it runs, listing the known ones."""
    with pytest.raises(PluginError) as caught:
        Registry().build("noise", {"eps": 1}, kind="privacy",
                         context=PluginContext(data_dir=tmp_path))  # fmt: skip
    expected = "[plugins.noise].eps: unknown key; known: epsilon, seed, sensitivity"
    assert expected == str(caught.value)
