"""
The ``export`` op's answer: per-item aggregates over a page of the state's item rows.

Each item's impressions, clicks and interactions (counts from the state), its
popularity decayed to now (as the ranking's ``popularity`` feature sees it:
`daemon.ranking.Ranking.popularity`) and its click-through rate, clicks / impressions
(0 without impressions). Item ids only: nothing here is per user.

The answer is exact; what leaves the daemon is what the privacy plugins' ``export``
makes of it (``noise`` adds Laplace noise), which `daemon.service.Service` applies on
the kernel thread, where this runs too.

Reading while the writer thread folds: the item count is read first and the state
grows its arrays before it appends an id, so every row of the page is backed; a count
may be one event older than another of the same item, as in any read of the live state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import numpy as np

if TYPE_CHECKING:
    from eventstore import State

__all__ = ["item_aggregates"]

#: Decimals kept of a float aggregate (popularity, CTR).
_DECIMALS: Final = 6


def item_aggregates(
    state: State, popularity: Callable[[State, np.ndarray], np.ndarray], *, offset: int,
    limit: int,
) -> dict[str, Any]:  # fmt: skip
    """
    The aggregates of item rows ``offset .. offset + limit - 1`` of ``state``.

    Args:
        state: the live state.
        popularity: the decayed popularity of item rows (`Ranking.popularity`).
        offset: the first row (past the end: an empty page).
        limit: most items in the page.

    Returns:
        ``{"items": [{"item", "impressions", "clicks", "interactions", "popularity",
        "ctr"}, ...], "total": <items in the state>, "next_offset": <the next page's
        offset, or None after the last page>}``.
    """
    total = state.n_items
    start, stop = min(offset, total), min(offset + limit, total)
    rows = np.arange(start, stop, dtype=np.int64)
    impressions = state.array("impressions")[start:stop].astype(np.int64)
    clicks = state.array("clicks")[start:stop].astype(np.int64)
    interactions = state.array("interactions")[start:stop].tolist()
    ctr = np.divide(clicks, impressions, out=np.zeros(len(rows)), where=impressions > 0)
    columns = zip(
        state.item_ids[start:stop], impressions.tolist(), clicks.tolist(), interactions,
        np.round(popularity(state, rows), _DECIMALS).tolist(), np.round(ctr, _DECIMALS).tolist(),
        strict=True,
    )  # fmt: skip
    items = [{"item": item, "impressions": shown, "clicks": clicked, "interactions": acted,
              "popularity": pop, "ctr": rate}
             for item, shown, clicked, acted, pop, rate in columns]  # fmt: skip
    return {"items": items, "total": total, "next_offset": stop if stop < total else None}
