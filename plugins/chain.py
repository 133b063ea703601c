"""
Running ranking policies one after another: :func:`run_policies`.

The daemon runs the configured policies on every answer this way, and a policy that
holds policies of its own (an experiment arm) runs them the same way, so the two can
never disagree on what a chain means: each policy sees the previous one's items,
scores, rows, embeddings and features (the items it dropped are gone), its explain
entries are merged into each item's, and its ``record`` into the answer's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from plugins.base import PolicyInput, PolicyOutput, RankingPolicy

__all__ = ["ChainResult", "run_policies"]


@dataclass(frozen=True, slots=True)
class ChainResult:
    """
    What a chain of policies made of a request.

    ``request`` is the last policy's view (items, scores, rows, embeddings, features,
    best first); ``kept[j]`` is the index, in the chain's input, of final item j;
    ``explain[j]`` merges every policy's entry for it; ``record`` merges the outputs'
    records.
    """

    request: PolicyInput
    kept: np.ndarray  # int64 [M]
    explain: list[dict[str, Any]]
    record: dict[str, Any]

    def output(self) -> PolicyOutput:
        """The chain as one policy's output (order, scores, explain and record)."""
        return PolicyOutput(self.kept, np.asarray(self.request.scores, np.float32),
                            self.explain, self.record)  # fmt: skip


def run_policies(policies: Sequence[RankingPolicy], request: PolicyInput) -> ChainResult:
    """
    Apply ``policies`` in order to ``request``.

    Raises:
        ValueError: a policy's order is not a permutation of a subset of its input
            (out of range or repeated indices), or its scores or explain entries do
            not match the order's length. A policy's own exceptions propagate.
    """
    kept = np.arange(len(request.items), dtype=np.int64)
    notes: list[dict[str, Any]] = [{} for _ in request.items]
    record: dict[str, Any] = {}
    for policy in policies:
        out = policy.apply(request)
        order = np.asarray(out.order, np.int64)
        _check(policy, order, out, len(request.items))
        notes = [{**notes[i], **entry} for i, entry in zip(order.tolist(), out.explain,
                                                           strict=True)]  # fmt: skip
        kept = kept[order]
        record.update(out.record)
        request = replace(
            request, items=[request.items[i] for i in order.tolist()],
            scores=np.asarray(out.scores, np.float32), rows=request.rows[order],
            embeddings=None if request.embeddings is None else request.embeddings[order],
            features=None if request.features is None else request.features[order],
        )  # fmt: skip
    return ChainResult(request, kept, notes, record)


def _check(policy: RankingPolicy, order: np.ndarray, out: PolicyOutput, n: int) -> None:
    name = getattr(policy, "name", type(policy).__name__)
    if order.ndim != 1 or (len(order) and (order.min() < 0 or order.max() >= n)):
        msg = f"policy {name!r}: order must index its {n} input items"
        raise ValueError(msg)
    if len(np.unique(order)) != len(order):
        msg = f"policy {name!r}: order repeats an item"
        raise ValueError(msg)
    if len(out.scores) != len(order) or len(out.explain) != len(order):
        msg = f"policy {name!r}: scores and explain must have one entry per ordered item"
        raise ValueError(msg)
