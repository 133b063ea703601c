"""The online learning step: item-bias SGD, and the biases on both ranking paths."""

from __future__ import annotations

from pathlib import Path

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


def test_the_daemon_learns_item_biases_online_when_enabled(tmp_path: Path) -> None:
    """A real daemon with [online] on: clicks on one item raise its online_bias."""
    import time  # noqa: PLC0415

    from daemons import Daemon, poll  # noqa: PLC0415

    from kernels.modelfile import save_model  # noqa: PLC0415

    params = {k: np.asarray(v) for k, v in init_params(jax.random.key(3), CONFIG).items()}
    model = tmp_path / "model.safetensors"
    save_model(model, params, CONFIG, vocabulary=VOCABULARY)
    daemon = Daemon(tmp_path, (
        "max_candidates = 32\n[ranking]\n"
        f'model_path = "{model}"\nmax_batch = 4\nbatch_buckets = [1, 4]\n'
        "candidate_buckets = [8, 32]\nrecord_impressions = false\n"
        "[online]\nenabled = true\ninterval_s = 0.1\nlearning_rate = 0.5\n"
    ))  # fmt: skip
    now = time.time()
    candidates = [f"m{i}" for i in range(10)]
    try:
        daemon.wait_for("READY=1")
        with daemon.client() as client:
            for n in range(12):
                user = f"u{n % 3}"
                client.request("rank", user=user, candidates=candidates)  # caches the vector
                client.request("ingest", events=[{"id": f"e{n}", "type": "click", "user": user,
                                                  "item": "m7", "ts": now - 100 + n}])  # fmt: skip

            def bias() -> float:
                answer = client.request("explain", user="u0", candidates=["m7"])
                return float(answer["explain"][0].get("online_bias", 0.0))

            assert poll(bias, lambda b: b > 0, timeout_s=20) > 0, "no online bias for m7"
            online = client.request("stats")["online"]
            assert online["examples"] >= 1  # clicks after a rank cached the user's vector
            assert online["steps"] >= 1
    finally:
        daemon.close()
