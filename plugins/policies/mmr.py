r"""
``mmr``: diversity by maximal marginal relevance over the candidates' embeddings.

The first ``top`` positions are chosen greedily by :func:`kernels.diversity.mmr_select`,

.. math::

    c_t = \operatorname{argmax}_c \; \lambda r_c - (1 - \lambda) \max_{j < t} \cos(e_c, e_{c_j})

and the other candidates follow in the order they came in. The relevance ``r`` is the
incoming scores scaled to ``[0, 1]`` by their minimum and maximum over the request
(:func:`plugins.policies._common.minmax`): the similarity term is a cosine, so without
the scaling ``lambda_`` would mean something different for every model and every
request. ``lambda_ = 1`` keeps the order of the scores; smaller values trade relevance
for diversity.

Shapes are bucketed (candidates padded to a power of two, at least 16, with a
``where`` mask; the number of selections, from the requested ``top``, rounded up to a
power of two, since greedy selection's first picks do not depend on how many more
follow), so the kernel compiles once per bucket pair and embedding width, not once per
request size. :meth:`MmrPolicy.warm_up` runs the buckets before the first request.

Scores: position p carries the p-th best incoming score (see
:mod:`plugins.policies._common`); a later policy that sorts by score keeps the
diversified order. Put ``mmr`` after policies that compute new scores (``blend``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Final

import jax
import numpy as np

from kernels.diversity import mmr_select
from plugins.base import PolicyInput, PolicyOutput
from plugins.policies._common import (
    carried_scores,
    check_number,
    check_unknown,
    minmax,
    output,
)

__all__ = ["MmrPolicy"]

#: jitted once; each (candidate bucket, selection bucket, width) compiles once
_mmr_select: Final = jax.jit(mmr_select, static_argnames=("k",))
_MIN_BUCKET: Final = 16


def _bucket(n: int, *, floor: int = 1) -> int:
    """The power of two at or above ``max(n, floor)``."""
    return 1 << (max(n, floor) - 1).bit_length()


class MmrPolicy:
    """
    Maximal-marginal-relevance diversity over item embeddings.

    Without embeddings in the request (``embeddings`` is None) the order is left
    unchanged and each explain entry says so.

    Args:
        lambda_: relevance weight ``λ`` in ``[0, 1]``; 1 keeps the order of the scores.
        top: how many positions to diversify; default the request's ``k``.

    Raises:
        PluginError: a parameter is out of range or unknown.

    .. versionadded:: 0.1.0
    """

    name: ClassVar[str] = "mmr"

    def __init__(self, *, lambda_: float = 0.7, top: int | None = None, **unknown: Any) -> None:
        check_unknown(self.name, unknown, ("lambda_", "top"))
        self.lambda_ = float(check_number(self.name, "lambda_", lambda_, lo=0, hi=1))
        self.top = (
            None if top is None else int(check_number(self.name, "top", top, lo=1, integer=True))
        )

    def __repr__(self) -> str:
        return f"MmrPolicy(lambda_={self.lambda_}, top={self.top})"

    def apply(self, request: PolicyInput) -> PolicyOutput:
        """The first ``top`` positions diversified, the rest in incoming order."""
        n = len(request.items)
        if request.embeddings is None or n == 0:
            return _unchanged(request.scores, n)
        wanted = self.top or request.k
        top = min(wanted, n)
        relevance = minmax(request.scores)
        chosen, values = self._select(relevance, request.embeddings, wanted)
        rest = np.ones(n, bool)
        rest[chosen] = False
        order = np.concatenate([chosen, np.flatnonzero(rest)])
        moved = order - np.arange(n)  # old position - new position
        rel = relevance[order].tolist()
        explain = [
            {"mmr": {"relevance": r, "mmr": v, "moved": m}}
            for r, v, m in zip(rel, values.tolist(), moved[:top].tolist(), strict=False)
        ]
        explain += [
            {"mmr": {"relevance": r, "moved": m}}
            for r, m in zip(rel[top:], moved[top:].tolist(), strict=True)
        ]
        return output(order, carried_scores(request.scores, n), explain)

    def warm_up(self, dim: int, *, max_candidates: int, k: int) -> int:
        """
        Compile the kernel for every candidate bucket up to ``max_candidates``.

        Each bucket of up to ``max_candidates`` candidates with ``dim``-wide embeddings
        and this policy's ``top`` (or ``k``) runs once on zeros, so that no request
        waits for a compile. Other ``k`` values (without ``top``) or widths still
        compile on first use.

        Returns:
            The number of shapes run.

        .. versionadded:: 0.1.0
        """
        sizes = _buckets_up_to(_bucket(max_candidates, floor=_MIN_BUCKET))
        for size in sizes:
            self._select(np.zeros(size), np.zeros((size, dim), np.float32), self.top or k)
        return len(sizes)

    def _select(
        self, relevance: np.ndarray, embeddings: np.ndarray, wanted: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """
        The first ``wanted`` MMR picks (indices, objective values), at most one per item.

        The selection count is bucketed from ``wanted`` (not from ``min(wanted, N)``), so
        a shape depends on the candidate bucket and the requested top alone.
        """
        n, dim = embeddings.shape
        size = _bucket(n, floor=_MIN_BUCKET)
        scores = np.zeros((1, size), np.float32)
        scores[0, :n] = relevance
        emb = np.zeros((1, size, dim), np.float32)
        # a non-finite embedding would poison every similarity; treat it as unknown (0)
        emb[0, :n] = np.nan_to_num(embeddings, nan=0.0, posinf=0.0, neginf=0.0)
        where = np.zeros((1, size), bool)
        where[0, :n] = True
        idx, val, _ = _mmr_select(
            scores, emb, k=min(_bucket(wanted), size), lambda_=self.lambda_, where=where
        )
        # to numpy before slicing: a slice of a jax array is one more dispatched op
        top = min(wanted, n)
        idx, val = np.asarray(idx), np.asarray(val)
        return idx[0, :top].astype(np.int64), val[0, :top].astype(np.float64)


def _buckets_up_to(largest: int) -> list[int]:
    """The candidate buckets ``_MIN_BUCKET, 2 * _MIN_BUCKET, ..., largest``."""
    return [_MIN_BUCKET << s for s in range((largest // _MIN_BUCKET).bit_length())]


def _unchanged(scores: np.ndarray, n: int) -> PolicyOutput:
    """The incoming order, each entry saying that nothing was diversified."""
    explain = [{"mmr": {"skipped": "no embeddings"}} for _ in range(n)]
    return output(np.arange(n), np.asarray(scores, np.float32)[:n], explain)
