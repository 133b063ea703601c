"""
Online learning between retrains: small SGD steps on item biases from the feedback.

The offline model is retrained now and then (``rerankd train --log``, the systemd
timer); between retrains the daemon can nudge it with what users do. Each interaction
of a user whose vector the ranking had cached (the vector its last answer used,
before the interaction) is one training example, handed over when the ranking
re-encodes that vector after the fold (:attr:`daemon.ranking.Ranking.observer`): the
item it went to against ``negatives`` items drawn uniformly, with a softmax over

    logit(i) = <user vector, item embedding_i> + bias_i

and one SGD step on the biases of those items (``learning_rate``, with ``l2`` decay
of every bias towards 0 each step so old news fades). Only biases: moving the item
embeddings too would need a second item table on the ranking path (and on an
accelerator's device), for a gain the bias measurement gives no reason to expect.
The biases are published to the ranking path as one new array, swapped at
the start of the next batch (:meth:`daemon.ranking.Ranking.set_item_bias`), never
edited in place while a batch reads them.

Measured with ``rerankd replay --online`` (README, "Model quality"): see there whether
it helps; it is off by default (``[online].enabled = false``).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from daemon.ranking import Ranking

__all__ = ["OnlineLearner", "OnlineOptions"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OnlineOptions:
    """
    ``[online]``: the online learning step (module docstring).

    Args:
        enabled: run the step in the daemon (off by default: see README, "Model
            quality", for what it measured).
        learning_rate: SGD step size on the biases.
        negatives: items drawn uniformly per example for the softmax.
        l2: share of every bias taken off at each step (decay towards 0).
        interval_s: seconds between steps; a step publishes new biases.
        seed: seeds the negatives.
    """

    enabled: bool = False
    learning_rate: float = 0.05
    negatives: int = 100
    l2: float = 1e-4
    interval_s: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            msg = "learning_rate must be > 0"
            raise ValueError(msg)
        if self.negatives < 1:
            msg = "negatives must be >= 1"
            raise ValueError(msg)
        if not 0.0 <= self.l2 < 1.0:
            msg = "l2 must be in [0, 1)"
            raise ValueError(msg)
        if not self.interval_s > 0:
            msg = "interval_s must be > 0"
            raise ValueError(msg)
        if self.seed < 0:
            msg = "seed must be >= 0"
            raise ValueError(msg)


class OnlineLearner:
    """
    Item-bias SGD on (user vector, item) examples; see the module docstring.

    Thread safety: :meth:`observe` may be called from the thread that folds events
    while :meth:`step` runs on another; the buffer is swapped under a lock, and the
    biases are only ever written by :meth:`step` and published as a copy.
    """

    def __init__(self, options: OnlineOptions) -> None:
        self.options = options
        self._rng = np.random.default_rng(options.seed)
        self._lock = threading.Lock()
        self._buffer: list[tuple[np.ndarray, int]] = []
        self._ranking: Ranking | None = None
        #: the model (a kernels.runtime.Ranker) the biases are for; re-attach after a swap
        self.model: Any = None
        self._table: np.ndarray | None = None
        self._bias = np.zeros(1, np.float32)
        self.examples = 0
        self.steps = 0

    def describe(self) -> dict[str, Any]:
        """The learner's options, as a dict."""
        return dataclasses.asdict(self.options)

    def attach(self, ranking: Ranking) -> None:
        """Learn from ``ranking``'s re-encodes, for its current model (biases start at 0)."""
        self._ranking = ranking
        ranking.observer = self.observe
        ranker = self.model = ranking.ranker
        table = np.asarray(ranker.item_table, np.float32) if ranker is not None else None
        self._table = table
        rows = 1 if table is None else table.shape[0]
        self._bias = np.zeros(rows, np.float32)
        with self._lock:
            self._buffer.clear()

    def observe(self, vector: np.ndarray, items: np.ndarray) -> None:
        """
        Examples: a user's vector before the interactions, and their items' model indices.

        The ranking calls it (:attr:`daemon.ranking.Ranking.observer`) when it re-encodes
        a cached vector after a fold: the daemon's vector refresher, or a rank.
        """
        if self._table is None:
            return
        rows = self._table.shape[0]
        kept = [int(i) for i in items if 0 < i < rows]
        if kept:
            with self._lock:
                self._buffer.extend((vector, i) for i in kept)

    def step(self) -> int:
        """One SGD step on the buffered examples; returns how many it used."""
        with self._lock:
            examples, self._buffer = self._buffer, []
        if not examples or self._table is None:
            return 0
        o = self.options
        vectors = np.stack([v for v, _ in examples]).astype(np.float32)
        items = np.fromiter((i for _, i in examples), np.int64, len(examples))
        rows = self._table.shape[0]
        negs = self._rng.integers(1, rows, size=(len(items), o.negatives))
        cands = np.concatenate([items[:, None], negs], axis=1)
        logits = np.einsum("bd,bcd->bc", vectors, self._table[cands]) + self._bias[cands]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        p[:, 0] -= 1.0  # d loss / d logit: softmax minus the one-hot of the positive
        p[:, 1:][negs == items[:, None]] = 0.0  # a negative that is the positive: no push
        self._bias *= 1.0 - o.l2
        np.add.at(self._bias, cands, -o.learning_rate * p)
        self._bias[0] = 0.0
        self.examples += len(items)
        self.steps += 1
        return len(items)

    def publish(self) -> None:
        """Hand the ranking a copy of the biases, to use from its next batch."""
        if self._ranking is not None:
            self._ranking.set_item_bias(self._bias.copy())

    @property
    def bias(self) -> np.ndarray:
        """The current item biases, indexed by model item index (index 0 is padding)."""
        return self._bias

    def items_moved(self, threshold: float = 1e-6) -> Sequence[int]:
        """The model indices of the items whose bias is further than ``threshold`` from 0."""
        return np.flatnonzero(np.abs(self._bias) > threshold).tolist()
