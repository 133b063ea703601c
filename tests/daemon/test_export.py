"""`daemon._export.item_aggregates` and `Ranking.popularity` on a real folded state."""

from __future__ import annotations

import math

import pytest

from daemon._cli_socket import render_export
from daemon._export import item_aggregates
from daemon.protocol import Rank
from daemon.ranking import Ranking
from eventstore import State, project
from eventstore.schema import Clicked, ItemsShown, ItemUpdated

T = 1_764_250_000.0
WEEK = 604_800.0  # the default half-life


def folded() -> State:
    """old: 2 clicks a half-life before new's 1; 4 impressions of old; quiet: none."""
    state = State()
    project(state, [
        ItemUpdated(id="i0", ts=T - WEEK, item="quiet", fields={"category": "c"}),
        Clicked(id="c1", ts=T - WEEK, user="u1", item="old"),
        Clicked(id="c2", ts=T - WEEK, user="u2", item="old"),
        Clicked(id="c3", ts=T, user="u1", item="new"),
        *(ItemsShown(id=f"s{n}", ts=T, user="u3", items=["old"]) for n in range(4)),
    ])  # fmt: skip
    return state


def test_popularity_is_decayed_to_the_newest_event() -> None:
    """With the wall clock later, "now" is the newest event: old's 2 clicks weigh 1."""
    state = folded()
    ranking = Ranking(lambda: state, ranker=None, clock=lambda: T + 10 * WEEK)
    page = item_aggregates(state, ranking.popularity, offset=0, limit=10)
    assert {"quiet": 0.0, "old": 1.0, "new": 1.0} == {
        it["item"]: it["popularity"] for it in page["items"]
    }


def test_popularity_is_the_rank_feature_before_its_log() -> None:
    """log1p(popularity) is the popularity feature the ranking scores by."""
    state = folded()
    ranking = Ranking(lambda: state, ranker=None, weights=(1.0, 0.0, 0.0), clock=lambda: T)
    page = item_aggregates(state, ranking.popularity, offset=0, limit=10)
    [ranked] = ranking.rank_batch([Rank(user="x", candidates=["quiet", "old", "new"])])
    scores = dict(zip(ranked.items, ranked.scores, strict=True))
    for it in page["items"]:
        assert math.log1p(it["popularity"]) == pytest.approx(scores[it["item"]], abs=1e-6)


def test_counts_and_ctr_per_item_in_row_order() -> None:
    """Counts from the state; ctr = clicks / impressions, 0 without impressions."""
    state = folded()
    page = item_aggregates(state, Ranking(lambda: state, ranker=None).popularity,
                           offset=0, limit=10)  # fmt: skip
    rows = [(it["item"], it["impressions"], it["clicks"], it["interactions"], it["ctr"])
            for it in page["items"]]  # fmt: skip
    assert [("quiet", 0, 0, 0, 0.0), ("old", 4, 2, 2, 0.5), ("new", 0, 1, 1, 0.0)] == rows
    assert (3, None) == (page["total"], page["next_offset"])


@pytest.mark.parametrize(("offset", "limit", "items", "next_offset"), [
    (0, 1, ["quiet"], 1),
    (1, 1, ["old"], 2),
    (1, 5, ["old", "new"], None),
    (3, 5, [], None),
    (99, 1, [], None),
])  # fmt: skip
def test_pages(offset: int, limit: int, items: list[str], next_offset: int | None) -> None:
    """A page is rows offset .. offset + limit - 1; next_offset is None after the last."""
    state = folded()
    page = item_aggregates(state, Ranking(lambda: state, ranker=None).popularity,
                           offset=offset, limit=limit)  # fmt: skip
    assert (items, 3, next_offset) == ([it["item"] for it in page["items"]], page["total"],
                                       page["next_offset"])  # fmt: skip


def test_render_export_is_a_table_with_a_footer() -> None:
    """Readable export: one row per item, then the page's place and the noise applied."""
    answer = {"items": [{"item": "a", "impressions": 10.5, "clicks": 2.0, "interactions": 3.25,
                         "popularity": 1.5, "ctr": 0.190476}],
              "total": 5, "next_offset": 1,
              "noise": {"mechanism": "laplace", "epsilon": 0.5, "sensitivity": 1.0}}  # fmt: skip
    assert [
        "item  impressions  clicks  interactions  popularity       ctr",
        "a            10.5     2.0          3.25         1.5  0.190476",
        (
            "1 of 5 items; the next page starts at --offset 1; laplace noise, epsilon 0.5, "
            "sensitivity 1.0"
        ),
    ] == render_export(answer).splitlines()
