r"""
``blend``: a weighted sum of the model's score, the item's popularity and its freshness.

.. math::

    s_i = w_m \, m_i + w_p \, p_i + w_f \, f_i

with every component in ``[0, 1]``, so the weights compare like with like:

- ``m``, the model: the incoming scores scaled by their minimum and maximum over the
  request (:func:`plugins.policies._common.minmax`; all equal gives 1). Raw model
  scores are dot products on a scale of their own, which changes with every model;
  min-max keeps their proportions within the request and puts them on the scale of
  the other two components.
- ``p``, popularity: ``log(1 + P_i) / max_j log(1 + P_j)`` over the candidates, where
  ``P_i`` is the item's popularity in the state (interactions, each decayed with the
  fold's half-life) decayed on to now. The logarithm tames the heavy tail of
  popularity (a hit item has thousands of times the interactions of a typical one),
  as the daemon's own popularity feature does. 0 for unknown items and when no
  candidate has any popularity.
- ``f``, freshness: ``2^(-age / half_life_s)`` of the item's ``created_at`` field (1 at
  creation, 1/2 one half-life later; an item created in the future counts as new),
  0 for items without one.

The candidates are sorted by ``s``, best first; ties keep the incoming order. "Now" is
:func:`plugins.policies._common.now_of`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from plugins.base import PolicyInput, PolicyOutput
from plugins.policies._common import check_number, check_unknown, column, minmax, now_of, output

__all__ = ["BlendPolicy"]

_KNOWN = ("w_model", "w_popularity", "w_freshness", "half_life_s")


class BlendPolicy:
    """
    Re-score each candidate as a weighted sum of model score, popularity and freshness.

    Args:
        w_model: weight of the min-max scaled model score (>= 0).
        w_popularity: weight of the log-scaled decayed popularity (>= 0).
        w_freshness: weight of the freshness ``2^(-age / half_life_s)`` (>= 0).
        half_life_s: age, in seconds, at which freshness halves (> 0).

    Raises:
        PluginError: a parameter is out of range or unknown.

    .. versionadded:: 0.1.0
    """

    name: ClassVar[str] = "blend"

    def __init__(
        self,
        *,
        w_model: float = 1.0,
        w_popularity: float = 0.2,
        w_freshness: float = 0.1,
        half_life_s: float = 7 * 86_400.0,
        **unknown: Any,
    ) -> None:
        check_unknown(self.name, unknown, _KNOWN)
        self.w_model = float(check_number(self.name, "w_model", w_model, lo=0))
        self.w_popularity = float(check_number(self.name, "w_popularity", w_popularity, lo=0))
        self.w_freshness = float(check_number(self.name, "w_freshness", w_freshness, lo=0))
        self.half_life_s = float(
            check_number(self.name, "half_life_s", half_life_s, lo=0, lo_open=True)
        )

    def __repr__(self) -> str:
        return (
            f"BlendPolicy(w_model={self.w_model}, w_popularity={self.w_popularity}, "
            f"w_freshness={self.w_freshness}, half_life_s={self.half_life_s})"
        )

    def apply(self, request: PolicyInput) -> PolicyOutput:
        """All candidates, sorted by the blended score."""
        n = len(request.items)
        if n == 0:
            return output(np.zeros(0), np.zeros(0), [])
        now = now_of(request)
        model = minmax(request.scores)
        pop = _popularity(request, now)
        fresh = _freshness(request, now, self.half_life_s)
        score = (self.w_model * model + self.w_popularity * pop + self.w_freshness * fresh).astype(
            np.float32
        )
        order = np.argsort(-score, kind="stable")
        explain = [
            {"blend": {"model": m, "popularity": p, "freshness": f, "score": s}}
            for m, p, f, s in zip(
                model[order].tolist(),
                pop[order].tolist(),
                fresh[order].tolist(),
                score[order].tolist(),
                strict=True,
            )
        ]
        return output(order, score[order], explain)


def _popularity(request: PolicyInput, now: float) -> np.ndarray:
    """
    ``log(1 + P) / max log(1 + P)`` of the candidates, float64 ``[N]`` in ``[0, 1]``.

    ``P`` is the state's decayed popularity taken on from its anchor time to ``now``
    with the fold's half-life (the only one it can be decayed with).
    """
    state, rows = request.state, request.rows
    pop = column(state, "pop", rows)
    age = np.maximum(now - column(state, "pop_ts", rows), 0.0)
    logp = np.log1p(pop * np.exp2(-age * state.inv_half_life))
    top = logp.max()
    return logp / top if top > 0 else np.zeros(len(rows))


def _freshness(request: PolicyInput, now: float, half_life_s: float) -> np.ndarray:
    """``2^(-max(now - created_at, 0) / half_life_s)``, float64 ``[N]``; 0 without created_at."""
    created = column(request.state, "created_at", request.rows)
    age = np.maximum(now - created, 0.0)
    return np.where(created != 0, np.exp2(-age / half_life_s), 0.0)
