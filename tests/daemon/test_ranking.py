"""`daemon.ranking.Ranking` on a real folded state, without a model (features only)."""

from __future__ import annotations

from daemon.protocol import Rank
from daemon.ranking import Ranking
from eventstore import State, project
from eventstore.schema import Clicked, ItemUpdated, Purchased

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


def test_device_and_host_paths_rank_alike() -> None:
    """The JAX kernel path (an accelerator's) and the compiled host loops give one answer."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from kernels.runtime import Ranker  # noqa: PLC0415
    from kernels.sasrec import SasrecConfig, init_params  # noqa: PLC0415

    config = SasrecConfig(num_items=40, max_len=8, dim=16, num_blocks=1)
    params = {k: np.asarray(v) for k, v in init_params(jax.random.key(3), config).items()}
    vocabulary = [f"m{i}" for i in range(40)]
    state = State()
    project(state, [Clicked(id=f"c{n}", ts=T - n, user=f"u{n % 4}", item=f"m{(n * 7) % 45}")
                    for n in range(60)])  # fmt: skip
    answers = []
    for host in (True, False):
        device = jax.devices("cpu")[0] if host else None
        ranker = Ranker(params, config, feature_weights=(0.5, 1.0, 0.2), batch_buckets=(1, 4),
                        candidate_buckets=(64,), host_scores=host, device=device)  # fmt: skip
        ranker.warmup()
        ranking = Ranking(lambda: state, ranker=ranker, vocabulary=vocabulary, clock=lambda: T)
        requests = [Rank(user=f"u{u}", candidates=[f"m{(u * 5 + j) % 45}" for j in range(30)], k=k)
                    for u, k in ((0, 5), (1, None), (2, 30), (9, 3))]  # fmt: skip
        answers.append(ranking.rank_batch(requests))
    for on_host, on_device in zip(*answers, strict=True):
        assert on_host.items == on_device.items
        assert on_host.source == on_device.source
        np.testing.assert_allclose(on_host.scores, on_device.scores, rtol=1e-4, atol=1e-4)
    assert {"model", "features"} == {a.source for a in answers[0]}


def test_a_new_event_counts_at_once_on_an_old_log() -> None:
    """An event newer than the log's last scan moves "now" at once, not a second later."""
    old = T - 100 * WEEK
    state = State()
    project(state, [Clicked(id=f"c{n}", ts=old, user=f"v{n}", item="a") for n in range(3)])
    now = [T]
    ranking = Ranking(lambda: state, ranker=None, weights=(1.0, 0.0, 0.0), clock=lambda: now[0])
    assert ["a", "b"] == ranking.rank_batch([Rank(user="u", candidates=["a", "b"])])[0].items
    project(state, [Purchased(id="p1", ts=T, user="w", item="b")])
    now[0] = T + 0.01  # well within the once-a-second scan
    assert ["b", "a"] == ranking.rank_batch([Rank(user="u", candidates=["a", "b"])])[0].items
