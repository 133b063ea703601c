"""
Online learning between retrains: small SGD steps on item biases and embeddings.

The offline model is retrained now and then (``rerankd train --log``, the systemd
timer); between retrains the daemon can nudge it with what users do. Each interaction
of a user whose vector the ranking had cached (the vector its last answer used,
before the interaction) is one training example, handed over when the ranking
re-encodes that vector after the fold (:attr:`daemon.ranking.Ranking.observer`): the
item it went to against ``negatives`` items drawn uniformly, with a softmax over

    logit(i) = <user vector, item embedding_i + change_i> + bias_i

and one SGD step on the biases of those items (``learning_rate``) and, with
``embedding_learning_rate`` above 0, on the change to their rows of the item table
(the table scores are taken against; the encoder's input embeddings stay the
model's). ``l2`` takes a share of every bias and change off at each step, so old news
fades.

Published to the ranking path as new arrays, swapped at the start of the next batch
(:meth:`daemon.ranking.Ranking.set_item_bias`, :meth:`~daemon.ranking.Ranking.set_item_table`),
never edited in place while a batch reads them. A moved table is a full copy of the
model's (``V + 1`` by ``d`` floats) at every step that learnt something, and the
learner keeps the change as another: for a catalogue of millions of items that is
hundreds of megabytes, written once a second off the request path.

Measured with ``rerankd replay --online`` (README, "Model quality"); off by default
(``[online].enabled = false``).
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

#: Examples per gradient chunk in a step: bounds its [chunk, 1 + negatives, d] arrays.
_CHUNK = 512


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OnlineOptions:
    """
    ``[online]``: the online learning step (module docstring).

    Args:
        enabled: run the step in the daemon (off by default: see README, "Model
            quality", for what it measured).
        learning_rate: SGD step size on the biases.
        negatives: items drawn uniformly per example for the softmax.
        l2: share of every bias (and embedding change) taken off at each step
            (decay towards 0).
        embedding_learning_rate: SGD step size on the item embeddings the scores are
            taken against; 0 moves the biases only.
        max_examples: examples a step learns from at most: the newest; those it
            leaves out are counted (``dropped``). Bounds a step's time under load.
        interval_s: seconds between steps; a step publishes new biases.
        seed: seeds the negatives.
    """

    enabled: bool = False
    learning_rate: float = 0.05
    negatives: int = 100
    l2: float = 1e-4
    embedding_learning_rate: float = 0.005
    max_examples: int = 1000
    interval_s: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            msg = "learning_rate must be > 0"
            raise ValueError(msg)
        if self.negatives < 1:
            msg = "negatives must be >= 1"
            raise ValueError(msg)
        if not self.embedding_learning_rate >= 0:
            msg = "embedding_learning_rate must be >= 0"
            raise ValueError(msg)
        if self.max_examples < 1:
            msg = "max_examples must be >= 1"
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
        #: the change to the item table learnt so far (None: biases only)
        self._delta: np.ndarray | None = None
        self.examples = 0
        self.steps = 0
        self.dropped = 0  # examples left out by max_examples

    def describe(self) -> dict[str, Any]:
        """The learner's options, as a dict."""
        return dataclasses.asdict(self.options)

    def attach(self, ranking: Ranking) -> None:
        """Learn from ``ranking``'s re-encodes, for its current model (from its own table)."""
        self._ranking = ranking
        ranking.observer = self.observe
        ranker = self.model = ranking.ranker
        table = np.asarray(ranker.item_table, np.float32) if ranker is not None else None
        self._table = table
        rows = 1 if table is None else table.shape[0]
        self._bias = np.zeros(rows, np.float32)
        learns_embeddings = table is not None and self.options.embedding_learning_rate > 0
        self._delta = np.zeros_like(table) if learns_embeddings else None
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
                most = self.options.max_examples
                if len(self._buffer) > 2 * most:  # trimmed now and then, not at every call
                    self.dropped += len(self._buffer) - most
                    del self._buffer[:-most]

    def step(self) -> int:
        """One SGD step on the buffered examples; returns how many it used."""
        with self._lock:
            examples, self._buffer = self._buffer, []
        most = self.options.max_examples
        if len(examples) > most:
            self.dropped += len(examples) - most
            examples = examples[-most:]
        if not examples or self._table is None:
            return 0
        o = self.options
        vectors = np.stack([v for v, _ in examples]).astype(np.float32)
        items = np.fromiter((i for _, i in examples), np.int64, len(examples))
        rows = self._table.shape[0]
        negs = self._rng.integers(1, rows, size=(len(items), o.negatives))
        cands = np.concatenate([items[:, None], negs], axis=1)
        self._bias *= 1.0 - o.l2
        if self._delta is not None:
            self._delta *= 1.0 - o.l2
        for k in range(0, len(items), _CHUNK):  # bounds the [chunk, 1 + negatives, d] rows
            self._sgd(vectors[k : k + _CHUNK], cands[k : k + _CHUNK])
        self._bias[0] = 0.0
        if self._delta is not None:
            self._delta[0] = 0.0
        self.examples += len(items)
        self.steps += 1
        return len(items)

    def _sgd(self, vectors: np.ndarray, cands: np.ndarray) -> None:
        """Add one chunk's gradient step to the biases (and the embedding changes)."""
        o = self.options
        assert self._table is not None
        embeddings = self._table[cands]  # [b, 1 + negatives, d], the positive first
        if self._delta is not None:
            embeddings += self._delta[cands]
        logits = np.einsum("bd,bcd->bc", vectors, embeddings) + self._bias[cands]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        p[:, 0] -= 1.0  # d loss / d logit: softmax minus the one-hot of the positive
        p[:, 1:][cands[:, 1:] == cands[:, :1]] = 0.0  # a negative that is the positive: no push
        np.add.at(self._bias, cands, -o.learning_rate * p)
        if self._delta is not None:  # d logit / d an item's row: the user's vector
            rows, inverse = np.unique(cands.ravel(), return_inverse=True)
            # per row: the sum of p * vector over its entries, one dimension at a time
            # (np.bincount; np.add.at on [n, d] rows took half as long again)
            grads = np.einsum("bc,bd->dbc", p, vectors).reshape(vectors.shape[1], -1)
            sums = np.stack([np.bincount(inverse, weights=g, minlength=len(rows)) for g in grads],
                            axis=1)  # fmt: skip
            self._delta[rows] -= (o.embedding_learning_rate * sums).astype(np.float32)

    def step_and_publish(self) -> int:
        """:meth:`step`, then :meth:`publish` if it learnt anything; how many examples it used."""
        used = self.step()
        if used:
            self.publish()
        return used

    def publish(self) -> None:
        """Hand the ranking a copy of the biases (and item table), to use from its next batch."""
        if self._ranking is None:
            return
        # for the model learnt on: one swapped in meanwhile ignores them
        self._ranking.set_item_bias(self._bias.copy(), model=self.model)
        if self._delta is not None and self._table is not None:
            self._ranking.set_item_table(self._table + self._delta, model=self.model)

    @property
    def bias(self) -> np.ndarray:
        """The current item biases, indexed by model item index (index 0 is padding)."""
        return self._bias

    @property
    def table_change(self) -> np.ndarray | None:
        """What the step added to the model's item table so far (None: biases only)."""
        return self._delta

    def items_moved(self, threshold: float = 1e-6) -> Sequence[int]:
        """The model indices of the items whose bias is further than ``threshold`` from 0."""
        return np.flatnonzero(np.abs(self._bias) > threshold).tolist()
