"""The online learning step: item-bias SGD, and the biases on both ranking paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from daemon.online import OnlineLearner, OnlineOptions
from daemon.protocol import Rank
from daemon.ranking import Ranking
from eventstore import State, project
from eventstore.schema import Clicked, Viewed
from kernels.runtime import Ranker
from kernels.sasrec import SasrecConfig, init_params

T = 1_764_250_000.0
CONFIG = SasrecConfig(num_items=40, max_len=8, dim=16, num_blocks=1)
VOCABULARY = [f"m{i}" for i in range(40)]


def _ranking(*, host: bool = True) -> tuple[Ranking, State]:
    params = {k: np.asarray(v) for k, v in init_params(jax.random.key(3), CONFIG).items()}
    state = State()
    project(state, [Clicked(id=f"c{n}", ts=T - n, user=f"u{n % 4}", item=f"m{(n * 7) % 40}")
                    for n in range(60)])  # fmt: skip
    ranker = Ranker(params, CONFIG, feature_weights=(0.5, 1.0, 0.2), batch_buckets=(1, 4),
                    candidate_buckets=(64,), host_scores=host,
                    device=jax.devices("cpu")[0] if host else None)  # fmt: skip
    ranker.warmup()
    return Ranking(lambda: state, ranker=ranker, vocabulary=VOCABULARY, clock=lambda: T), state


def _rank(ranking: Ranking, user: str = "u1") -> tuple[list[str], list[float]]:
    [answer] = ranking.rank_batch([Rank(user=user, candidates=[f"m{i}" for i in range(0, 40, 3)])])
    return answer.items, answer.scores


@pytest.mark.parametrize("host", [True, False], ids=["host", "device"])
def test_a_published_bias_adds_to_the_score_of_its_item(host: bool) -> None:  # noqa: FBT001
    ranking, _ = _ranking(host=host)
    items, scores = _rank(ranking)
    before = dict(zip(items, scores, strict=True))
    last = items[-1]
    bias = np.zeros(41, np.float32)
    bias[ranking.model_index(last)] = 100.0
    bias[ranking.model_index(items[0])] = -0.5
    ranking.set_item_bias(bias)
    items, scores = _rank(ranking)
    after = dict(zip(items, scores, strict=True))
    assert items[0] == last  # lifted to the top
    assert after[last] == pytest.approx(before[last] + 100.0, abs=1e-3)
    for item, score in after.items():
        expected = before[item] + float(bias[ranking.model_index(item)])
        assert score == pytest.approx(expected, abs=1e-3)
    [explained] = ranking.rank_batch([Rank(user="u1", candidates=[last], explain=True)])
    assert explained.explain is not None
    assert explained.explain[0]["online_bias"] == pytest.approx(100.0)
    ranking.set_item_bias(None)
    assert dict(zip(*_rank(ranking), strict=True)) == pytest.approx(before, abs=1e-4)


def test_a_bias_for_another_table_size_is_ignored() -> None:
    ranking, _ = _ranking()
    before = _rank(ranking)
    ranking.set_item_bias(np.ones(7, np.float32))
    assert _rank(ranking) == before


def _interact(ranking: Ranking, state: State, learner: OnlineLearner, user: str, item: str,  # noqa: PLR0917
              n: int = 0) -> None:  # fmt: skip
    """The daemon's path: rank (caches the vector), fold, refresh, step, publish."""
    _rank(ranking, user)
    project(state, [Viewed(id=f"v{user}{n}", ts=T + n, user=user, item=item)])
    ranking.refresh([state.user_index[user]])
    learner.step()
    learner.publish()


def test_sgd_step_raises_the_positive_and_lowers_the_negatives() -> None:
    ranking, state = _ranking()
    learner = OnlineLearner(OnlineOptions(enabled=True, learning_rate=0.5, negatives=20, l2=0.0))
    learner.attach(ranking)
    _interact(ranking, state, learner, "u2", "m5")
    bias = learner.bias
    target = ranking.model_index("m5")
    assert bias[target] > 0
    others = np.delete(bias, target)
    assert np.all(others <= 0)
    assert others.min() < 0
    # softmax minus one-hot sums to zero: without decay the step moves no mass in total
    assert float(bias.sum()) == pytest.approx(0.0, abs=1e-5)
    assert learner.examples == 1


def test_the_example_uses_the_vector_from_before_the_interaction() -> None:
    ranking, state = _ranking()
    seen: list[tuple[np.ndarray, list[int]]] = []
    learner = OnlineLearner(OnlineOptions(enabled=True))
    learner.attach(ranking)
    ranking.observer = lambda vec, items: seen.append((vec.copy(), items.tolist()))
    _rank(ranking, "u1")
    before = ranking.cached_vector(state.user_index["u1"])
    assert before is not None
    project(state, [Viewed(id="a", ts=T, user="u1", item="m5"),
                    Viewed(id="b", ts=T, user="u1", item="zz-unknown"),
                    Viewed(id="c", ts=T, user="u1", item="m9")])  # fmt: skip
    ranking.refresh([state.user_index["u1"]])
    [(vector, items)] = seen
    np.testing.assert_array_equal(vector, before)
    assert items == [ranking.model_index("m5"), ranking.model_index("m9")]


def test_an_interaction_without_a_cached_vector_or_known_item_teaches_nothing() -> None:
    ranking, state = _ranking()
    learner = OnlineLearner(OnlineOptions(enabled=True))
    learner.attach(ranking)
    project(state, [Viewed(id="v1", ts=T, user="u3", item="m5")])  # no vector cached
    ranking.refresh([state.user_index["u3"]])
    _interact(ranking, state, learner, "u3", "not-in-model")
    assert learner.examples == 0
    assert not np.any(learner.bias)


def test_repeated_feedback_moves_its_item_up_the_ranking() -> None:
    """Publish after each step: an item users keep choosing climbs."""
    ranking, state = _ranking()
    items, _ = _rank(ranking)
    chosen = items[-1]
    learner = OnlineLearner(OnlineOptions(enabled=True, learning_rate=0.5))
    learner.attach(ranking)
    for n in range(30):
        _interact(ranking, state, learner, f"u{n % 4}", chosen, n)
    items, _ = _rank(ranking)
    assert items.index(chosen) <= 2


def _online_daemon(tmp_path: Path, online: str) -> Any:
    """A `rerankd run` (not started yet: wait for READY=1) with [online] on plus ``online``."""
    from daemons import Daemon  # noqa: PLC0415

    from kernels.modelfile import save_model  # noqa: PLC0415

    params = {k: np.asarray(v) for k, v in init_params(jax.random.key(3), CONFIG).items()}
    model = tmp_path / "model.safetensors"
    save_model(model, params, CONFIG, vocabulary=VOCABULARY)
    return Daemon(tmp_path, (
        "max_candidates = 32\n[ranking]\n"
        f'model_path = "{model}"\nmax_batch = 4\nbatch_buckets = [1, 4]\n'
        "candidate_buckets = [8, 32]\nrecord_impressions = false\n"
        "[online]\nenabled = true\ninterval_s = 0.1\n" + online
    ))  # fmt: skip


def _click_m7(client: Any) -> None:
    """Twelve clicks on m7 by u0-u2, each after a rank that cached the user's vector."""
    import time  # noqa: PLC0415

    now = time.time()
    for n in range(12):
        user = f"u{n % 3}"
        client.request("rank", user=user, candidates=[f"m{i}" for i in range(10)])
        client.request("ingest", events=[{"id": f"e{n}", "type": "click", "user": user,
                                          "item": "m7", "ts": now - 100 + n}])  # fmt: skip


def test_the_daemon_learns_item_biases_online_when_enabled(tmp_path: Path) -> None:
    """A real daemon with [online] on: clicks on one item raise its online_bias."""
    from daemons import poll  # noqa: PLC0415

    daemon = _online_daemon(tmp_path, "learning_rate = 0.5\n")
    try:
        daemon.wait_for("READY=1")
        with daemon.client() as client:
            _click_m7(client)

            def bias() -> float:
                answer = client.request("explain", user="u0", candidates=["m7"])
                return float(answer["explain"][0].get("online_bias", 0.0))

            assert poll(bias, lambda b: b > 0, timeout_s=20) > 0, "no online bias for m7"
            online = client.request("stats")["online"]
            assert online["examples"] >= 1  # clicks after a rank cached the user's vector
            assert online["steps"] >= 1
    finally:
        daemon.close()


# ------------------------------------------------------------ item embeddings


def test_the_embedding_step_follows_the_softmax_gradient() -> None:
    """The table change after one step is -rate times d(cross-entropy)/d(row), numerically."""
    ranking, _ = _ranking()
    options = OnlineOptions(enabled=True, learning_rate=1e-9, negatives=5, l2=0.0,
                            embedding_learning_rate=1e-3, seed=11)  # fmt: skip
    learner = OnlineLearner(options)
    learner.attach(ranking)
    assert ranking.ranker is not None
    table = ranking.ranker.item_table.astype(np.float64)
    vector = np.random.default_rng(5).normal(size=table.shape[1]).astype(np.float32)
    positive = 7
    learner.observe(vector, np.asarray([positive]))
    # the learner's negatives, drawn as it draws them
    negs = np.random.default_rng(options.seed).integers(1, table.shape[0], size=(1, 5))[0]
    assert positive not in negs  # this seed draws no collision with the positive
    cands = np.concatenate([[positive], negs])

    def loss(t: np.ndarray) -> float:
        logits = t[cands] @ vector.astype(np.float64)
        return float(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[0])

    expected = np.zeros_like(table)
    eps = 1e-4
    for row in set(cands.tolist()):
        for j in range(table.shape[1]):
            up, down = table.copy(), table.copy()
            up[row, j] += eps
            down[row, j] -= eps
            expected[row, j] = -1e-3 * (loss(up) - loss(down)) / (2 * eps)
    assert learner.step() == 1
    change = learner.table_change
    assert change is not None
    np.testing.assert_allclose(change, expected, atol=2e-7)
    assert np.any(change[positive] != 0)
    # the positive moves towards the vector, the negatives away from it
    assert float(change[positive] @ vector) > 0
    assert all(float(change[n] @ vector) < 0 for n in negs)


def test_without_an_embedding_rate_the_table_stays_the_model_s() -> None:
    ranking, state = _ranking()
    learner = OnlineLearner(OnlineOptions(enabled=True, learning_rate=0.5,
                                          embedding_learning_rate=0.0))  # fmt: skip
    learner.attach(ranking)
    _interact(ranking, state, learner, "u2", "m5")
    assert learner.examples == 1
    assert learner.table_change is None
    assert ranking._current_table() is ranking.ranker.item_table  # noqa: SLF001


@pytest.mark.parametrize("host", [True, False], ids=["host", "device"])
def test_a_published_item_table_moves_the_scores_by_the_dot_product(host: bool) -> None:  # noqa: FBT001
    ranking, state = _ranking(host=host)
    items, scores = _rank(ranking)
    before = dict(zip(items, scores, strict=True))
    assert ranking.ranker is not None
    vector = ranking.cached_vector(state.user_index["u1"])
    assert vector is not None
    change = np.zeros_like(ranking.ranker.item_table)
    last, first = items[-1], items[0]
    change[ranking.model_index(last)] = 50.0 * vector / float(vector @ vector)  # +50
    change[ranking.model_index(first)] = np.random.default_rng(1).normal(size=vector.shape)
    ranking.set_item_table(ranking.ranker.item_table + change)
    items, scores = _rank(ranking)
    after = dict(zip(items, scores, strict=True))
    assert items[0] == last
    for item, score in after.items():
        expected = before[item] + float(change[ranking.model_index(item)] @ vector)
        assert score == pytest.approx(expected, abs=1e-3)
    ranking.set_item_table(np.ones((3, 2), np.float32))  # another model's shape: ignored
    assert dict(zip(*_rank(ranking), strict=True)) == pytest.approx(before, abs=1e-4)


@pytest.mark.parametrize("host", [True, False], ids=["host", "device"])
def test_the_published_table_and_the_cold_start_rows_work_together(host: bool) -> None:  # noqa: FBT001
    """
    With cold-start rows in use, a published table moves the model's items and leaves
    the new item's cold vector as it was; a cold-start build keeps the moved rows.
    """
    ranking, state = _ranking(host=host)
    project(state, [Clicked(id=f"n{n}", ts=T + n, user=f"u{n % 4}", item="new-item")
                    for n in range(5)])  # fmt: skip
    candidates = ["new-item", "m3", "m6", "m9"]

    def scores() -> dict[str, float]:
        [answer] = ranking.rank_batch([Rank(user="u1", candidates=candidates)])
        return dict(zip(answer.items, answer.scores, strict=True))

    scores()  # syncs the catalogue with the state
    assert ranking.refresh_cold_start()
    before = scores()
    assert ranking.ranker is not None
    vector = ranking.cached_vector(state.user_index["u1"])
    assert vector is not None
    change = np.zeros_like(ranking.ranker.item_table)
    change[ranking.model_index("m6")] = 3.0 * vector / float(vector @ vector)  # +3
    ranking.set_item_table(ranking.ranker.item_table + change)
    after = scores()
    assert after["m6"] == pytest.approx(before["m6"] + 3.0, abs=1e-3)
    for item in ("new-item", "m3", "m9"):
        assert after[item] == pytest.approx(before[item], abs=1e-4)
    project(state, [Clicked(id="n9", ts=T + 9, user="u2", item="newer-item")])
    candidates.append("newer-item")
    scores()
    assert ranking.refresh_cold_start()  # places newer-item only, on the moved rows
    again = scores()
    assert again["m6"] == pytest.approx(after["m6"], abs=1e-3)


def test_a_cold_start_build_after_a_published_table_starts_from_its_rows() -> None:
    ranking, state = _ranking()
    project(state, [Clicked(id="n0", ts=T, user="u1", item="new-item")])
    assert ranking.ranker is not None
    moved = ranking.ranker.item_table + np.float32(0.25)
    ranking.set_item_table(moved)
    _rank(ranking)  # syncs the catalogue with the state
    assert ranking.refresh_cold_start()
    cold = ranking._cold  # noqa: SLF001
    assert cold is not None
    assert cold.size == 1
    np.testing.assert_array_equal(cold.table[: cold.first_cold], moved)


def test_the_daemon_moves_item_embeddings_online_when_asked(tmp_path: Path) -> None:
    """
    A real daemon with [online].embedding_learning_rate: clicks on m7 by three users
    move m7's row of the table, which shows in another user's model score for it
    (the online bias, at a negligible rate, stays 0).
    """
    import time  # noqa: PLC0415

    from daemons import poll  # noqa: PLC0415

    daemon = _online_daemon(tmp_path, "learning_rate = 1e-9\nembedding_learning_rate = 0.5\n")
    try:
        daemon.wait_for("READY=1")
        with daemon.client() as client:
            client.request("ingest", events=[{"id": "w0", "type": "view", "user": "u9",
                                              "item": "m1", "ts": time.time() - 200}])  # fmt: skip

            def m7_for_u9() -> tuple[float, float]:
                [entry] = client.request("explain", user="u9", candidates=["m7"])["explain"]
                return float(entry["model"]), float(entry.get("online_bias", 0.0))

            model_before, _ = poll(m7_for_u9, lambda got: got[0] != 0.0, timeout_s=20)
            _click_m7(client)
            model_after, bias = poll(m7_for_u9, lambda got: abs(got[0] - model_before) > 1e-3,
                                     timeout_s=20)  # fmt: skip
            assert abs(model_after - model_before) > 1e-3, "m7's row did not move"
            assert abs(bias) < 1e-6
            online = client.request("stats")["online"]
            assert online["examples"] >= 1
    finally:
        daemon.close()


def test_a_step_learns_from_the_newest_max_examples_and_counts_the_rest() -> None:
    ranking, _ = _ranking()
    learner = OnlineLearner(OnlineOptions(enabled=True, max_examples=10, learning_rate=0.5,
                                          embedding_learning_rate=0.0))  # fmt: skip
    learner.attach(ranking)
    vector = np.ones(CONFIG.dim, np.float32)
    for n in range(35):  # 25 of item 3, then the newest 10 of item 9
        learner.observe(vector, np.asarray([3 if n < 25 else 9]))
    assert learner.step() == 10
    assert (learner.examples, learner.dropped) == (10, 25)
    assert learner.bias[9] > 0
    assert learner.bias[3] <= 0  # only ever a negative, if drawn
    with pytest.raises(ValueError, match="max_examples"):
        OnlineOptions(max_examples=0)


def test_what_the_step_learnt_for_a_model_swapped_out_meanwhile_is_not_served() -> None:
    """A publish that lands after a swap to a model of the same shape changes nothing."""
    ranking, state = _ranking()
    learner = OnlineLearner(OnlineOptions(enabled=True, learning_rate=0.5))
    learner.attach(ranking)
    assert ranking.ranker is not None
    params = {k: np.asarray(v) for k, v in init_params(jax.random.key(4), CONFIG).items()}
    other = Ranker(params, CONFIG, feature_weights=(0.5, 1.0, 0.2), batch_buckets=(1, 4),
                   candidate_buckets=(64,), host_scores=True,
                   device=jax.devices("cpu")[0])  # fmt: skip
    other.warmup()
    ranking.replace_model(other, VOCABULARY, (0.5, 1.0, 0.2))
    before = _rank(ranking)  # the swap happens at this batch
    assert ranking.ranker is other
    _rank(ranking, "u2")
    project(state, [Viewed(id="late", ts=T + 1, user="u2", item="m5")])
    learner.observe(np.ones(CONFIG.dim, np.float32), np.asarray([5]))
    assert learner.step_and_publish() == 1  # learnt for the old model, published late
    assert ranking._current_bias() is None  # noqa: SLF001
    assert ranking._current_table() is other.item_table  # noqa: SLF001
    assert _rank(ranking) == before
    learner.attach(ranking)  # what the daemon's loop does next: learn for the new one
    learner.observe(np.ones(CONFIG.dim, np.float32), np.asarray([5]))
    assert learner.step_and_publish() == 1
    assert ranking._current_bias() is not None  # noqa: SLF001
    assert ranking._current_table() is not other.item_table  # noqa: SLF001
