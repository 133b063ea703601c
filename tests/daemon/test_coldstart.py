"""
Cold-start vectors (`daemon._coldstart`) and how `daemon.ranking.Ranking` scores with
them, on a real folded state and a tiny model whose item embeddings are unit vectors,
so that every expected vector and score is arithmetic on the page.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import pytest

from daemon._coldstart import build_cold_table
from daemon.candidates import Catalog
from daemon.protocol import Rank
from daemon.ranking import Ranking
from eventstore import State, project
from eventstore.schema import Clicked, ItemUpdated, Viewed
from kernels.runtime import Ranker
from kernels.sasrec import SasrecConfig, init_params
from plugins.base import PolicyInput, PolicyOutput

T = 1_764_250_000.0
VOCABULARY = ("m1", "m2", "m3", "m4")
#: e(m1) .. e(m4) are the unit vectors of R^4; row 0 is padding.
EMBEDDINGS = np.vstack([np.zeros(4), np.eye(4)]).astype(np.float32)


def _events() -> list[Any]:
    """
    The catalogue: m1 and m2 in category a, m3 in b with tag z, m4 with tag x; the cold
    items n-a (category a), n-t (tags x and z), n-c (category c: no model item has
    it) and n-0 (no metadata, clicked once). Popularity: m1 1, m2 1, m3 3, m4 1.
    """
    items = [("m1", {"category": "a"}), ("m2", {"category": "a"}),
             ("m3", {"category": "b", "tags": ["z"]}), ("m4", {"tags": ["x"]}),
             ("n-a", {"category": "a"}), ("n-t", {"tags": ["x", "z"]}),
             ("n-c", {"category": "c"})]  # fmt: skip
    events: list[Any] = [ItemUpdated(id=f"i-{item}", ts=T, item=item, fields=fields)
                         for item, fields in items]  # fmt: skip
    events += [Viewed(id=f"v-{item}", ts=T, user="u", item=item) for item in ("m1", "m2")]
    clicked = ("m3", "m3", "m3", "m4", "n-0")
    events += [Clicked(id=f"c{n}", ts=T, user=f"o{n}", item=item) for n, item in enumerate(clicked)]
    return events


@pytest.fixture(name="state")
def fixture_state() -> State:
    state = State()
    project(state, _events())
    return state


def _ranker(
    vocabulary: Sequence[str] = VOCABULARY, embeddings: np.ndarray = EMBEDDINGS, *,
    host: bool = True,
) -> Ranker:  # fmt: skip
    config = SasrecConfig(num_items=len(vocabulary), max_len=4, dim=4, num_blocks=1, dropout=0.0)
    params = {k: np.asarray(v) for k, v in init_params(jax.random.key(0), config).items()}
    params["item_emb"] = embeddings
    ranker = Ranker(params, config, feature_weights=(0.0, 0.0, 0.0), batch_buckets=(1, 2),
                    candidate_buckets=(8,), host_scores=host,
                    device=jax.devices("cpu")[0] if host else None)  # fmt: skip
    ranker.warmup(scorers=not host)
    return ranker


def _ranking(state: State, ranker: Ranker, **kwargs: Any) -> Ranking:
    """A ranking of score = the dot product alone (feature weights 0)."""
    return Ranking(lambda: state, ranker=ranker, vocabulary=VOCABULARY, weights=(0.0, 0.0, 0.0),
                   clock=lambda: T, **kwargs)  # fmt: skip


def _explained(ranking: Ranking, candidates: list[str]) -> dict[str, tuple[float, dict[str, Any]]]:
    """item -> (score, explain entry) of user u's ranking of ``candidates``."""
    [ranked] = ranking.rank_batch([Rank(user="u", candidates=candidates, explain=True)])
    assert ranked.explain is not None
    return {item: (score, entry) for item, score, entry
            in zip(ranked.items, ranked.scores, ranked.explain, strict=True)}  # fmt: skip


def _cold_vectors(state: State) -> dict[str, tuple[str, list[float]]]:
    """cold item -> (rule, vector), as built for the model over VOCABULARY."""
    catalog = Catalog(VOCABULARY)
    catalog.sync(state.item_ids)
    cold = build_cold_table(state, catalog.model_of_row, EMBEDDINGS, model=None, built_at=0.0)
    out = {}
    for row, index in enumerate(cold.index_of_row.tolist()):
        if index:
            out[state.item_ids[row]] = (cold.kind(index), cold.table[index].tolist())
    return out


def test_a_new_item_in_a_category_gets_the_category_mean(state: State) -> None:
    """n-a, in category a with m1 and m2: (e1 + e2) / 2."""
    assert ("category", [0.5, 0.5, 0.0, 0.0]) == _cold_vectors(state)["n-a"]


def test_a_new_item_with_tags_gets_the_mean_of_the_model_items_sharing_one(state: State) -> None:
    """n-t, tags x and z, no category: m4 has x, m3 has z: (e3 + e4) / 2."""
    assert ("tags", [0.0, 0.0, 0.5, 0.5]) == _cold_vectors(state)["n-t"]


def test_without_usable_metadata_the_popularity_vector(state: State) -> None:
    """
    n-0 (no metadata) and n-c (a category no model item has): the popularity-weighted
    mean (1 e1 + 1 e2 + 3 e3 + 1 e4) / 6; m1 and m2 count u's views.
    """
    vectors = _cold_vectors(state)
    expected = ("popularity", pytest.approx([1 / 6, 1 / 6, 3 / 6, 1 / 6]))
    assert (expected, expected) == (vectors["n-0"], vectors["n-c"])
    assert {"n-a", "n-t", "n-0", "n-c"} == set(vectors)  # the model's items get none


def test_the_cold_vector_scores_and_orders_the_new_item(state: State) -> None:
    """
    With score = <u, e>, n-a scores (s1 + s2) / 2 and n-t (s3 + s4) / 2, so each lands
    between its two model items; explain says which rule made the vector.
    """
    ranking = _ranking(state, _ranker())
    assert ranking.rank_batch([Rank(user="u", candidates=["m1"])])[0].source == "model"
    assert ranking.refresh_cold_start()
    got = _explained(ranking, ["n-a", "n-t", "m1", "m2", "m3", "m4"])
    s = {item: got[item][0] for item in ("m1", "m2", "m3", "m4")}
    assert pytest.approx((s["m1"] + s["m2"]) / 2, abs=1e-5) == got["n-a"][0]
    assert pytest.approx((s["m3"] + s["m4"]) / 2, abs=1e-5) == got["n-t"][0]
    entry = got["n-a"][1]
    assert (False, "category") == (entry["known_to_model"], entry["cold_start"])
    assert pytest.approx(got["n-a"][0], abs=1e-5) == entry["model"]
    assert "cold_start" not in got["m1"][1]
    order = list(got)
    low, high = sorted((order.index("m1"), order.index("m2")))
    assert low <= order.index("n-a") <= high


def test_cold_start_off_ranks_the_new_item_by_its_features(state: State) -> None:
    """cold_start=False: nothing is built, n-a gets no dot product (score 0 here)."""
    ranking = _ranking(state, _ranker(), cold_start=False)
    ranking.rank_batch([Rank(user="u", candidates=["m1"])])
    assert not ranking.refresh_cold_start()
    score, entry = _explained(ranking, ["n-a", "m1"])["n-a"]
    assert (0.0, {"model": 0.0, "popularity": 0.0, "interest": 0.0, "freshness": 0.0,
                  "known_to_model": False}) == (score, entry)  # fmt: skip


def test_a_retrained_model_that_knows_the_item_replaces_its_cold_vector(state: State) -> None:
    """After a swap to a model whose vocabulary has n-a, n-a scores by its own row."""
    ranking = _ranking(state, _ranker())
    ranking.rank_batch([Rank(user="u", candidates=["m1"])])
    ranking.refresh_cold_start()
    assert "category" == _explained(ranking, ["n-a", "m1"])["n-a"][1]["cold_start"]
    retrained = np.vstack([EMBEDDINGS, [[0.0, 0.0, 0.0, 2.0]]]).astype(np.float32)
    vocabulary = (*VOCABULARY, "n-a")
    ranking.replace_model(_ranker(vocabulary, retrained), vocabulary, (0.0, 0.0, 0.0))
    got = _explained(ranking, ["n-a", "m4", "n-t"])  # the swap happens in this batch
    assert (True, False) == (got["n-a"][1]["known_to_model"], "cold_start" in got["n-a"][1])
    assert pytest.approx(2 * got["m4"][0], abs=1e-5) == got["n-a"][0]
    assert "cold_start" not in got["n-t"][1]  # the old table is gone with the old model
    assert ranking.refresh_cold_start()
    got = _explained(ranking, ["n-a", "n-t"])
    assert ("cold_start" not in got["n-a"][1], "tags") == (True, got["n-t"][1]["cold_start"])


def test_the_device_path_adds_the_cold_dot_products_too(state: State) -> None:
    """The JAX kernel path (an accelerator's) gives the host path's answer with cold items."""
    answers = []
    for host in (True, False):
        ranking = _ranking(state, _ranker(host=host))
        ranking.rank_batch([Rank(user="u", candidates=["m1"])])
        ranking.refresh_cold_start()
        requests = [Rank(user="u", candidates=["n-0", "m1", "n-a", "m3", "n-t", "m4"], k=k)
                    for k in (None, 3)]  # fmt: skip
        answers.append(ranking.rank_batch(requests))
    for on_host, on_device in zip(*answers, strict=True):
        assert on_host.items == on_device.items
        np.testing.assert_allclose(on_host.scores, on_device.scores, rtol=1e-5, atol=1e-5)
    assert answers[0][0].scores[answers[0][0].items.index("n-a")] != 0.0


class _Spy:
    """A ranking policy that keeps the order and remembers what it saw."""

    name = "spy"

    def __init__(self) -> None:
        self.seen: PolicyInput | None = None

    def apply(self, request: PolicyInput) -> PolicyOutput:
        self.seen = request
        n = len(request.items)
        return PolicyOutput(np.arange(n), request.scores, [{} for _ in range(n)])


def test_policies_see_the_cold_vector_as_the_items_embedding(state: State) -> None:
    """A policy (MMR, say) gets n-a's cold vector, (e1 + e2) / 2, in its embeddings."""
    spy = _Spy()
    ranking = _ranking(state, _ranker(), policies=[spy])
    ranking.rank_batch([Rank(user="u", candidates=["m1"])])
    ranking.refresh_cold_start()
    ranking.rank_batch([Rank(user="u", candidates=["n-a", "m3"])])
    assert spy.seen is not None
    assert spy.seen.embeddings is not None
    embedding = dict(zip(spy.seen.items, spy.seen.embeddings.tolist(), strict=True))
    assert {"n-a": [0.5, 0.5, 0.0, 0.0], "m3": [0.0, 0.0, 1.0, 0.0]} == embedding


def test_a_build_for_new_items_keeps_the_old_rows_and_places_the_new(state: State) -> None:
    """
    An item that arrives after a build gets its vector from a build for new items
    (``previous``), the same as a full build gives it; the earlier rows stay as they were.
    """
    catalog = Catalog(VOCABULARY)
    catalog.sync(state.item_ids)
    first = build_cold_table(state, catalog.model_of_row, EMBEDDINGS, model=None, built_at=1.0)
    project(state, [ItemUpdated(id="i-n-b", ts=T, item="n-b", fields={"category": "b"})])
    catalog.sync(state.item_ids)
    then = build_cold_table(state, catalog.model_of_row, EMBEDDINGS, model=None, built_at=2.0,
                            previous=first)  # fmt: skip
    full = build_cold_table(state, catalog.model_of_row, EMBEDDINGS, model=None, built_at=2.0)
    row = state.item_index["n-b"]
    assert ("category", [0.0, 0.0, 1.0, 0.0]) == (
        then.kind(int(then.index_of_row[row])),
        then.table[then.index_of_row[row]].tolist(),
    )
    assert np.array_equal(first.table, then.table[: len(first.table)])
    assert np.array_equal(first.index_of_row, then.index_of_row[: first.n_rows])
    assert np.array_equal(full.table, then.table)
    assert 1.0 == then.built_at  # the time of the full build it extends
