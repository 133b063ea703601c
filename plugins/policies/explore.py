r"""
``explore``: Thompson sampling gives a share of the top k to new and rarely shown items.

Each candidate shown at most ``max_impressions`` times is eligible. Its click-through
rate has the Beta posterior

.. math::

    \theta_i \sim \operatorname{Beta}(c_i + a, \; \max(n_i - c_i, 0) + b)

with ``n_i`` its impressions and ``c_i`` its clicks in the state (an item the state
does not know has none), ``a = prior_a`` and ``b = prior_b``. Per request one
``θ`` is drawn for every eligible candidate.

Of the top ``k`` positions, the last ``round(share * k)`` are exploration slots. The
incoming order keeps the first ones; the exploration slots go to the eligible
candidates not already above them, highest ``θ`` first; every other candidate follows
in incoming order. When fewer candidates are eligible than there are slots, the
incoming order fills the rest. So ``share = 1`` ranks the whole top k by Thompson
sampling, and ``share = 0`` changes nothing.

Why Thompson sampling: it spends exploration where the posterior is still wide (new
items, items with few impressions) and stops spending it on items whose click rate is
known to be poor, with no tuning beyond the prior. Its regret grows logarithmically in
the number of rounds, against linearly for uniform random exploration.

Caveats: the state counts every click on an item, not only clicks on impressions (a
click from search counts too), so ``c_i`` may exceed ``n_i`` (the ``max`` above keeps
``b > 0``); and impressions are counted for every shown position alike (no position
bias correction).

Scores: position p carries the p-th best incoming score (see
:mod:`plugins.policies._common`). The generator is seeded by ``seed`` (random
without one) and is advanced under a lock, so a seeded policy is reproducible for a
given sequence of requests.
"""

from __future__ import annotations

import math
import threading
from typing import Any, ClassVar, Final

import numpy as np

from plugins.base import PolicyInput, PolicyOutput
from plugins.policies._common import (
    carried_scores,
    check_number,
    check_unknown,
    column,
    output,
)

__all__ = ["ExplorePolicy"]

_NAME: Final = "explore"
_KNOWN: Final = ("share", "prior_a", "prior_b", "max_impressions", "seed")


class ExplorePolicy:
    """
    Thompson-sampling exploration in a share of the top-k slots.

    Args:
        share: fraction of the top k given to exploration, in ``[0, 1]``.
        prior_a: Beta prior pseudo-clicks (> 0).
        prior_b: Beta prior pseudo-non-clicks (> 0).
        max_impressions: items shown at most this many times are eligible (>= 0).
        seed: seed of the numpy generator (>= 0); random when absent.

    Raises:
        PluginError: a parameter is out of range or unknown.

    .. versionadded:: 0.1.0
    """

    name: ClassVar[str] = _NAME

    def __init__(
        self,
        *,
        share: float = 0.1,
        prior_a: float = 1.0,
        prior_b: float = 1.0,
        max_impressions: int = 100,
        seed: int | None = None,
        **unknown: Any,
    ) -> None:
        check_unknown(_NAME, unknown, _KNOWN)
        self.share = float(check_number(_NAME, "share", share, lo=0, hi=1))
        self.prior_a = float(check_number(_NAME, "prior_a", prior_a, lo=0, lo_open=True))
        self.prior_b = float(check_number(_NAME, "prior_b", prior_b, lo=0, lo_open=True))
        self.max_impressions = int(
            check_number(_NAME, "max_impressions", max_impressions, lo=0, integer=True)
        )
        if seed is not None:
            check_number(_NAME, "seed", seed, lo=0, integer=True)
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"ExplorePolicy(share={self.share}, prior_a={self.prior_a}, "
            f"prior_b={self.prior_b}, max_impressions={self.max_impressions}, "
            f"seed={self.seed})"
        )

    def slots(self, k: int) -> int:
        """How many of the top ``k`` positions are exploration slots (half rounds up)."""
        return math.floor(self.share * k + 0.5)

    def apply(self, request: PolicyInput) -> PolicyOutput:
        """All candidates; the exploration slots of the top k hold the sampled items."""
        n = len(request.items)
        k = min(request.k, n)
        kept = k - self.slots(k)  # positions that keep the incoming order
        impressions = column(request.state, "impressions", request.rows).astype(np.float64)
        clicks = column(request.state, "clicks", request.rows).astype(np.float64)
        eligible = impressions <= self.max_impressions
        eligible[:kept] = False
        pool = np.flatnonzero(eligible)
        alpha = clicks[pool] + self.prior_a
        beta = np.maximum(impressions[pool] - clicks[pool], 0.0) + self.prior_b
        with self._lock:
            theta = self._rng.beta(alpha, beta) if len(pool) else np.zeros(0)
        best = np.argsort(-theta, kind="stable")[: k - kept]
        picked = pool[best]
        rest = np.ones(n, bool)
        rest[:kept] = False
        rest[picked] = False
        order = np.concatenate([np.arange(kept), picked, np.flatnonzero(rest)])
        explain: list[dict[str, Any]] = [{"explore": {}} for _ in range(n)]
        for pos, t, a, b in zip(
            range(kept, kept + len(picked)),
            theta[best].tolist(),
            alpha[best].tolist(),
            beta[best].tolist(),
            strict=False,
        ):
            explain[pos]["explore"] = {"explored": True, "sampled": t, "alpha": a, "beta": b}
        return output(order, carried_scores(request.scores, n), explain)
