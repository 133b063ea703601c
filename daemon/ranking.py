"""
The ranking path: from (user, candidate ids) to an order; vectors encode off the loop.

`Ranking.rank_batch` serves a micro-batch of requests with one encode call (only for
users whose events changed since their vector was cached) and one score call. It
reads the state that the writer thread folds into; it never writes it.

Scores. With a model, ``score = <user vector, item embedding> + w · features``; a
user without history (or unknown) contributes a zero dot product, and so does an
item the model does not know, unless it has a cold-start vector: an item the state
knows that arrived after the model was trained gets one from the model items of its
category or tags, or from the most popular ones (`daemon._coldstart`, built in the
background by `Ranking.refresh_cold_start`, ``[ranking].cold_start``). Without a
model the score is the features alone. The features of a candidate, computed from
the state:

- ``popularity``: log(1 + the item's popularity decayed to now);
- ``interest``: the user's decayed interest in the item's category;
- ``freshness``: 2^(-age / half-life) of the item's ``created_at`` field (0 without one).

"Now", for these decays, is the wall clock or the newest event in the state,
whichever is earlier: a log of historical events (a public data set, a replay) then
ranks as it would have at its end, instead of decaying every score to zero, and a
live log, whose newest event is milliseconds old, ranks by the wall clock.

How. Candidate ids are looked up as bytes in a `daemon.candidates.Catalog`, and the
features, fused scores and top k of a whole batch come from compiled loops
(`daemon._rankloops`), on the event loop's thread. On an accelerator the scores and top
k come from the compiled JAX kernel instead (`kernels.runtime.Ranker.score`); user
vectors always do (`Ranker.encode`).

Thread safety. The writer thread may fold new events while a batch reads the state:
a read can see a user's row mid-update, which at worst gives one stale ranking; the
next event of that user invalidates the cached vector again. Acknowledged events are
always visible: ``ingest`` answers after the fold, so the next ``rank`` reads them.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemon._coldstart import ColdTable, build_cold_table
from daemon._rankloops import apply_cold_rows, features_batch, rank_batch_fused
from daemon.candidates import Catalog
from daemon.protocol import Rank
from eventstore import State
from kernels.runtime import Ranker
from plugins.base import PolicyInput, RankingPolicy
from plugins.chain import run_policies

__all__ = ["FEATURES", "EncodeJob", "RankedList", "Ranking"]

FEATURES = ("popularity", "interest", "freshness")


@dataclass(frozen=True, slots=True)
class RankedList:
    """One request's answer: item ids best first, their scores, and optional explanations."""

    items: list[str]
    scores: list[float]
    explain: list[dict[str, Any]] | None
    source: str  # "model" or "features": what the dot product came from
    #: what the policies asked to store with the impression record (PolicyOutput.record)
    record: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _Batch:
    """A batch of requests as flat arrays: request b owns candidates offsets[b] .. offsets[b+1]."""

    requests: Sequence[Rank]
    offsets: np.ndarray  # int64 [B + 1]
    user_rows: np.ndarray  # int64 [B], -1 for a user the state does not know
    rows: np.ndarray  # int32 [T], state rows, -1 unknown
    models: np.ndarray  # int32 [T], rows of ``table``: model indices, cold rows, 0 unknown
    features: np.ndarray  # float32 [T, F]
    state: State | None = None  # what the batch was prepared on (the ranking policies read it)
    now: float = 0.0  # the time the features were computed for
    table: np.ndarray | None = None  # the item table ``models`` index (None without a model)
    cold: ColdTable | None = None  # the cold-start table the batch used, if any
    #: the weights of ``features``' columns: FEATURES, then 1.0 for the online bias if any
    weights: np.ndarray | None = None
    #: ``table``'s model rows are the online step's, not the model's (`set_item_table`)
    moved: bool = False


@dataclass(slots=True)
class EncodeJob:
    """
    User vectors to encode: built on the event loop, run on the kernel thread.

    `Ranking.encode_job` and `Ranking.refresh_job` build it (the Python part: each
    user's sequence as model indices), `run` is the encoder call alone (JAX, which
    runs without the GIL), and `Ranking.store` caches the vectors. Why split: a job
    that also did its Python part on the kernel thread took the GIL back after every
    step, and with the loop busy each hand-off waits up to the interpreter's 5 ms
    switch interval (at 1,000 rank/s plus 5,000 events/s on 2 cores, a batch that
    encoded took 30 ms at p50, bench/soak).
    """

    ranker: Ranker
    state: State
    rows: list[int]  # user rows ...
    versions: list[int]  # ... and the n_events each vector is encoded for
    seqs: np.ndarray  # int32 [len(rows), max_len], left-padded model indices
    vectors: np.ndarray | None = None  # float32 [len(rows), d], set by run

    def run(self) -> None:
        """Encode (on the kernel thread): the model's batches at most, one call each."""
        ranker, seqs = self.ranker, self.seqs
        limit = ranker.batch_buckets[-1]
        parts = [ranker.encode(seqs[start : start + limit])
                 for start in range(0, len(seqs), limit)]  # fmt: skip
        self.vectors = parts[0] if len(parts) == 1 else np.concatenate(parts)


_NO_TABLE = np.zeros((1, 1), np.float32)
_NO_COLD = np.zeros(0, np.int32)  # no state row has a cold-start row


class Ranking:
    """
    Rank requests against the current state with an optional model.

    Args:
        state_of: returns the store's current state (it is replaced on erasure).
        ranker: the warmed-up kernels, or None to rank by features alone.
        vocabulary: the model's item ids; item ``vocabulary[i]`` has model index i + 1.
        weights: one weight per name in `FEATURES`.
        clock: seconds since the epoch (injectable for tests).
        policies: the ranking policies, run in order on every answer (see
            :meth:`_apply_policies`); replace the attribute to change them.
        cold_start: give the items the state knows and the model does not a
            cold-start vector (`daemon._coldstart`) once `refresh_cold_start` built
            them; the attribute may be changed later.
    """

    def __init__(
        self,
        state_of: Callable[[], State],
        *,
        ranker: Ranker | None,
        vocabulary: Sequence[str] = (),
        weights: Sequence[float] = (0.5, 1.0, 0.2),
        clock: Callable[[], float] = time.time,
        policies: Sequence[RankingPolicy] = (),
        cold_start: bool = True,
    ) -> None:
        self._state_of = state_of
        self.ranker = ranker
        self.policies: tuple[RankingPolicy, ...] = tuple(policies)
        self._vocabulary = vocabulary
        self._catalog = Catalog(vocabulary)
        self.weights = np.asarray(weights, np.float32)
        self._clock = clock
        self._vectors: dict[int, tuple[int, np.ndarray]] = {}
        self._state_seen: State | None = None
        self._pending_model: tuple[Ranker | None, Sequence[str], Sequence[float]] | None = None
        # the catalogue is grown by the rank path and the vector refresher (two threads)
        self._catalog_lock = threading.Lock()
        self._newest = (-math.inf, 0.0)  # (wall time of the check, newest event time)
        self.cold_start = cold_start
        # published whole by refresh_cold_start, read once per batch: never half-built
        self._cold: ColdTable | None = None
        # (the model it was learnt for, item biases [V + 1]): set_item_bias, read once per batch
        self._online: tuple[Ranker, np.ndarray] | None = None
        # (the model it was learnt for, its item table [V + 1, d] moved by the online
        # step): set_item_table, read once per batch
        self._online_table: tuple[Ranker, np.ndarray] | None = None
        self._index_of: tuple[Sequence[str], dict[str, int]] | None = None  # model_index's
        #: called with (the old vector, model indices of the items interacted with since)
        #: whenever a cached user vector is re-encoded: the online learning step's examples
        self.observer: Callable[[np.ndarray, np.ndarray], None] | None = None
        self.cache_hits = 0
        self.cache_misses = 0
        self.refreshed = 0  # vectors re-encoded by `refresh`, off the request path

    # ---------------------------------------------------------------- public

    def rank_batch(
        self, requests: Sequence[Rank], *, encoded: EncodeJob | None = None
    ) -> list[RankedList]:
        """
        Answer ``requests`` in order, with one encode and one score call at most.

        ``encoded``: the `encode_job` of these requests, run and stored just before
        (its users count as cache misses, not hits).
        """
        with self._catalog_lock:
            state = self._sync()
            batch = self._prepare(state, requests, self._current_cold(state))
        vectors = has_vector = None
        if self.ranker is not None:
            fresh = frozenset(encoded.rows) if encoded is not None else frozenset()
            vectors = self._user_vectors(state, batch.user_rows, fresh)
            has_vector = vectors.any(axis=1)
            if not self.ranker.host_scores:
                return self._score_on_device(batch, vectors, has_vector)
        return self._score_on_host(batch, vectors, has_vector)

    def _sync(self) -> State:
        """Swap in a pending model, reset after an erasure, and grow the catalogue (locked)."""
        if self._pending_model is not None:
            self._swap_model(*self._pending_model)
        state = self._state_of()
        if state is not self._state_seen:  # erasure rebuilt the state: rows renumbered
            self._vectors.clear()
            self._catalog = Catalog(self._vocabulary)
            self._state_seen = state
        self._catalog.sync(state.item_ids)
        return state

    def encode_job(self, requests: Sequence[Rank]) -> EncodeJob | None:
        """
        The encode that ranking ``requests`` needs (None when every vector is current).

        For the batcher: it runs the job on the kernel thread, hands it to `store`, and
        then ranks the batch on the loop with the vectors cached.
        """
        with self._catalog_lock:
            state = self._sync()
        ranker = self.ranker
        if ranker is None:
            return None
        index, n_events = state.user_index, state.n_events
        stale: dict[int, int] = {}
        for r in requests:
            u = index.get(r.user)
            if u is not None and u not in stale and self._stale(u, n_events):
                stale[u] = int(n_events[u])
        return self._job(state, stale, ranker) if stale else None

    def store(self, job: EncodeJob, *, refreshed: bool = False) -> int:
        """
        Cache the vectors of a job that has run; returns how many were stored.

        Nothing (0) when the model was swapped or the state rebuilt meanwhile (they would be
        the old model's, or of renumbered rows). A vector whose user had new events
        meanwhile is stored for the version it was encoded for: the next rank of that
        user encodes again.
        """
        current = job.ranker is self.ranker and job.state is self._state_seen
        if job.vectors is None or not current:
            return 0
        vectors = self._vectors
        for u, version, vec in zip(job.rows, job.versions, job.vectors, strict=True):
            vectors[u] = (version, vec)
        if refreshed:
            self.refreshed += len(job.rows)
        return len(job.rows)

    def _now(self, state: State, rows: np.ndarray) -> float:
        """
        min(wall clock, newest event time in the state).

        The newest time is a scan of every item, done at most once a second; the
        candidates' own times (``rows``) are checked on every call, so an event newer
        than the last scan counts at once.
        """
        wall = self._clock()
        checked, newest = self._newest
        if wall - checked >= 1.0:
            n = state.n_items
            newest = float(state.array("pop_ts")[:n].max()) if n else 0.0
            self._newest = (wall, newest)
        known = rows[rows >= 0]
        if len(known):
            newest = max(newest, float(state.array("pop_ts")[known].max()))
            self._newest = (self._newest[0], newest)
        return min(wall, newest) if newest > 0 else wall

    def popularity(self, state: State, rows: np.ndarray) -> np.ndarray:
        """
        float64 ``[N]``: the popularity of item rows ``rows`` decayed to now.

        The value whose log1p is the ``popularity`` feature: ``pop * 2^(-max(now -
        pop_ts, 0) / half-life)``, "now" as for ranking (`_now`). For the ``export`` op.
        """
        now = self._now(state, rows)
        pop, pop_ts = state.array("pop")[rows], state.array("pop_ts")[rows]
        age = np.maximum(now - pop_ts, 0.0)
        return np.maximum(pop * np.exp2(-age / state.config.half_life_s), 0.0)

    def needs_encode(self, requests: Sequence[Rank]) -> bool:
        """Whether ranking ``requests`` must encode a user vector (none cached, or stale)."""
        if self.ranker is None or self._pending_model is not None:
            return False
        state = self._state_of()
        if state is not self._state_seen:
            return True
        index, n_events = state.user_index, state.n_events
        return any(self._stale(u, n_events) for r in requests
                   if (u := index.get(r.user)) is not None)  # fmt: skip

    def _stale(self, u: int, n_events: np.ndarray) -> bool:
        """Whether user row ``u`` has events and no vector cached for the latest of them."""
        if not n_events[u]:
            return False
        cached = self._vectors.get(u)
        return cached is None or cached[0] != n_events[u]

    def refresh_job(self, user_rows: Sequence[int]) -> EncodeJob | None:
        """
        The re-encode of the cached vectors of ``user_rows`` that new events made stale.

        For the daemon's vector refresher, right after a fold (it runs the job on the
        kernel thread and hands it to `store` with ``refreshed=True``), so that a rank finds
        the vector ready instead of encoding it on the request path. None when there is
        nothing to encode.

        Only users with a vector in the cache (users ranked since the start or the last
        model swap) are refreshed: the event stream covers many users nobody is ranking
        for right now, and encoding each of them after every event would spend the CPU
        that the feeds and requests need (a user's first rank encodes their vector).
        """
        with self._catalog_lock:
            ranker = self.ranker
            state = self._state_of()
            if ranker is None or self._pending_model is not None or state is not self._state_seen:
                return None  # the next batch swaps the model or resets the cache first
            self._catalog.sync(state.item_ids)  # the rows of the items just folded
        n_events = state.n_events
        vectors = self._vectors
        stale = {u: int(n_events[u]) for u in user_rows
                 if u in vectors and self._stale(u, n_events)}  # fmt: skip
        return self._job(state, stale, ranker) if stale else None

    def refresh(self, user_rows: Sequence[int]) -> int:
        """`refresh_job`, run and stored in the calling thread; returns the vectors encoded."""
        job = self.refresh_job(user_rows)
        if job is None:
            return 0
        job.run()
        return self.store(job, refreshed=True)

    def forget_vectors(self) -> None:
        """Drop every cached user vector (after an erasure or a model reload)."""
        self._vectors.clear()

    def replace_model(
        self, ranker: Ranker | None, vocabulary: Sequence[str], weights: Sequence[float]
    ) -> None:
        """
        Serve with another model and weights from the next batch on.

        Safe from any thread: the swap itself happens at the start of the next batch,
        where nothing else reads the model; cached vectors are dropped then, since they
        came from the old model.
        """
        self._pending_model = (ranker, vocabulary, weights)

    def _swap_model(
        self, ranker: Ranker | None, vocabulary: Sequence[str], weights: Sequence[float]
    ) -> None:
        self._pending_model = None
        self.ranker = ranker
        self._vocabulary = vocabulary
        self._catalog = Catalog(vocabulary)
        self.weights = np.asarray(weights, np.float32)
        self._vectors.clear()
        self._cold = None  # the old model's: the next refresh_cold_start builds the new one's

    # ------------------------------------------------------------ cold start

    def refresh_cold_start(self, *, max_age_s: float = 60.0) -> bool:
        """
        Build and publish the cold-start vectors when they are missing or out of date.

        Off the request path (the daemon calls it every second on a thread of its own).
        A full build (`daemon._coldstart.build_cold_table`) when the model or the state
        changed, or when the last full build is older than ``max_age_s`` and events
        arrived since (categories, tags and popularity change); a build that places
        only the new items when the state knows items the last build did not. Returns
        whether it built one. With `cold_start` off it drops the table instead.
        """
        if not self.cold_start:
            self._cold = None
            return False
        with self._catalog_lock:
            ranker, state = self.ranker, self._state_of()
            if ranker is None or self._pending_model is not None or state is not self._state_seen:
                return False  # nothing to build for, or the next batch resets first
            self._catalog.sync(state.item_ids)
            model_of_row = self._catalog.model_of_row  # replaced by sync, never changed
        cold, now = self._cold, time.monotonic()
        previous = None
        if cold is not None and cold.model is ranker and cold.state is state and (
                cold.offset == state.offset or now - cold.built_at < max_age_s):  # fmt: skip
            if cold.n_rows == len(model_of_row):
                return False
            previous = cold  # the same model, state and groups: place the new items only
        # a full build starts from the online step's rows, if it moved the model's; a
        # build on ``previous`` keeps its rows, which set_item_table keeps up to date
        # (both run on one thread in the daemon)
        table = self._current_table()
        assert table is not None
        self._cold = build_cold_table(state, model_of_row, table, model=ranker, built_at=now,
                                      previous=previous)  # fmt: skip
        return True

    # ------------------------------------------------------------ online biases

    def set_item_bias(self, bias: np.ndarray | None, *, model: object = None) -> None:
        """
        Add ``bias[model index]`` to every candidate's score from the next batch on.

        From the online learning step (`daemon.online`): ``bias`` is float32 ``[V + 1]``
        for the model being served now, handed over whole and never changed afterwards;
        None removes it. A bias for another model (``model``, the `Ranker` it was learnt
        for, when given, or a table of another size), published as a swap lands, is
        ignored. Items the model does not know (cold-start rows included) get no bias.
        """
        ranker = self.ranker
        if bias is None or ranker is None or len(bias) != ranker.item_table.shape[0] or (
                model is not None and model is not ranker):  # fmt: skip
            self._online = None
            return
        self._online = (ranker, np.asarray(bias, np.float32))

    def set_item_table(self, table: np.ndarray | None, *, model: object = None) -> None:
        """
        Score the model's items against ``table`` instead of the model's own, from the next batch.

        From the online learning step (`daemon.online`): float32, the shape of the
        served model's item table, handed over whole and never changed afterwards; None
        goes back to the model's table. One learnt for another model (``model``, when
        given, or another shape) is ignored, as in `set_item_bias`.
        """
        ranker = self.ranker
        if table is None or ranker is None or table.shape != ranker.item_table.shape or (
                model is not None and model is not ranker):  # fmt: skip
            self._online_table = None
            return
        table = np.asarray(table, np.float32)
        self._online_table = (ranker, table)
        cold = self._cold
        if cold is not None and cold.model is ranker:  # its model rows, moved the same way
            rows = np.concatenate([table, cold.table[cold.first_cold :]])
            self._cold = dataclasses.replace(cold, table=rows)

    def cached_vector(self, user_row: int) -> np.ndarray | None:
        """The user vector last used for ``user_row`` (None when none is cached)."""
        cached = self._vectors.get(user_row)
        return None if cached is None else cached[1]

    def model_index(self, item: str) -> int:
        """The model's index of ``item`` (0 when the model does not know it)."""
        vocabulary, cached = self._vocabulary, self._index_of
        if cached is None or cached[0] is not vocabulary:
            cached = self._index_of = (vocabulary, {v: i + 1 for i, v in enumerate(vocabulary)})
        return cached[1].get(item, 0)

    def _current_bias(self) -> np.ndarray | None:
        online = self._online
        return online[1] if online is not None and online[0] is self.ranker else None

    def _moved_table(self) -> np.ndarray | None:
        """The online step's table for the model served now, if it published one."""
        online = self._online_table
        return online[1] if online is not None and online[0] is self.ranker else None

    def _current_table(self) -> np.ndarray | None:
        """The item table scores are taken against: the online step's, else the model's."""
        moved = self._moved_table()
        if moved is not None or self.ranker is None:
            return moved
        return self.ranker.item_table

    def _current_cold(self, state: State) -> ColdTable | None:
        """The published cold-start table, if it belongs to this model and state."""
        cold = self._cold
        if cold is None or not self.cold_start or cold.model is not self.ranker:
            return None
        return cold if cold.state is state else None

    # ------------------------------------------------------------ preparing

    def _prepare(self, state: State, requests: Sequence[Rank], cold: ColdTable | None) -> _Batch:
        sizes = [len(r.candidates) for r in requests]
        offsets = np.zeros(len(requests) + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        total = int(offsets[-1])
        rows = np.empty(total, np.int32)
        models = np.empty(total, np.int32)
        for b, request in enumerate(requests):
            t0, t1 = offsets[b], offsets[b + 1]
            rows[t0:t1], models[t0:t1] = self._catalog.lookup(request.candidates)
        index = state.user_index
        user_rows = np.fromiter((index.get(r.user, -1) for r in requests), np.int64, len(requests))
        bias = self._current_bias()
        features = np.empty((total, len(FEATURES) + (bias is not None)), np.float32)
        # arrays fetched after the catalogue's sync: they are at least as long as the rows it knows
        columns = (state.array(n) for n in ("pop", "pop_ts", "created_at", "category",
                                            "cat_idx", "cat_w", "cat_ts"))  # fmt: skip
        now = self._now(state, rows)
        features_batch(rows, offsets, user_rows, *columns, state.K, now,
                       state.config.half_life_s, features)  # fmt: skip
        table = cold.table if cold is not None else self._current_table()
        moved = self._moved_table() is not None
        weights = self.weights
        if bias is not None:  # model indices only: before the cold rows take their places
            features[:, len(FEATURES)] = bias[np.minimum(models, len(bias) - 1)] * (models > 0)
            weights = np.append(weights, np.float32(1.0))
        # called for every batch, so that the start's warm-up batch compiles it too
        apply_cold_rows(rows, models, _NO_COLD if cold is None else cold.index_of_row)
        return _Batch(requests, offsets, user_rows, rows, models, features, state, now, table,
                      cold, weights, moved)  # fmt: skip

    # --------------------------------------------------------------- vectors

    def _user_vectors(
        self, state: State, user_rows: np.ndarray, fresh: frozenset[int] = frozenset()
    ) -> np.ndarray:
        """
        ``[B, d]``: cached where the user has had no event since, encoded otherwise.

        ``fresh``: user rows whose vectors were encoded for this batch (misses).
        """
        assert self.ranker is not None
        dim = self.ranker.config.vector_dim
        out = np.zeros((len(user_rows), dim), np.float32)
        stale: dict[int, int] = {}  # user row -> version, for users needing an encode
        n_events = state.n_events
        for k, u in enumerate(user_rows.tolist()):
            if u < 0 or n_events[u] == 0:
                continue
            version = int(n_events[u])
            cached = self._vectors.get(u)
            if cached is not None and cached[0] == version:
                out[k] = cached[1]
                if u in fresh:
                    self.cache_misses += 1
                else:
                    self.cache_hits += 1
            else:
                stale[u] = version
                self.cache_misses += 1
        if stale:
            self._encode(state, stale, self.ranker)
            for k, u in enumerate(user_rows.tolist()):
                if u in stale:
                    out[k] = self._vectors[u][1]
        return out

    def _encode(self, state: State, stale: dict[int, int], ranker: Ranker) -> None:
        job = self._job(state, stale, ranker)
        job.run()
        self.store(job)

    def _job(self, state: State, stale: dict[int, int], ranker: Ranker) -> EncodeJob:
        """The encode of ``stale`` (user row -> version): each user's sequence as model indices."""
        rows = list(stale)
        max_len = ranker.config.max_len
        seqs = np.zeros((len(rows), max_len), np.int32)
        model_of_row = self._catalog.model_of_row
        observer = self.observer
        for r, u in enumerate(rows):
            items = state.sequence(u)
            items = items[items < len(model_of_row)]  # rows newer than the catalogue: skipped
            old = self._vectors.get(u) if observer is not None else None
            if observer is not None and old is not None and stale[u] > old[0]:
                # the interactions folded since the old vector was encoded, with that vector
                new = model_of_row[items[len(items) - min(stale[u] - old[0], len(items)) :]]
                observer(old[1], new[new > 0])
            seq = model_of_row[items]
            seq = seq[seq > 0][-max_len:]
            if len(seq):
                seqs[r, -len(seq) :] = seq
        return EncodeJob(ranker, state, rows, [stale[u] for u in rows], seqs)

    # --------------------------------------------------------------- scoring

    def _score_on_host(
        self, batch: _Batch, vectors: np.ndarray | None, has_vector: np.ndarray | None
    ) -> list[RankedList]:
        """Scores and top k of the whole batch in one compiled pass (CPU, or no model)."""
        b = len(batch.requests)
        if vectors is None or has_vector is None or batch.table is None:
            table, vectors, has_vector = _NO_TABLE, np.zeros((b, 1), np.float32), np.zeros(b, bool)
        else:
            table = batch.table  # the model's rows, plus the cold-start rows if any
        total = len(batch.rows)
        # the policies see every candidate: the request's k applies after them
        ks = np.fromiter((total if self.policies else r.k or total for r in batch.requests),
                         np.int64, b)  # fmt: skip
        scores = np.empty(total, np.float32)
        order = np.empty(total, np.int64)
        counts = np.empty(b, np.int64)
        code = rank_batch_fused(table, vectors, has_vector, batch.models, batch.offsets, ks,
                                batch.features, batch.weights, scores, order, counts)  # fmt: skip
        if code != 0:
            msg = "a model index outside the model's item table"
            raise RuntimeError(msg)
        out = []
        for k in range(b):
            t0, t1 = int(batch.offsets[k]), int(batch.offsets[k + 1])
            top = order[t0 : t0 + counts[k]]
            out.append(self._answer(batch, k, scores[t0:t1], top, has_vector=bool(has_vector[k])))
        return out

    def _score_on_device(
        self, batch: _Batch, vectors: np.ndarray, has_vector: np.ndarray
    ) -> list[RankedList]:
        """
        Scores and top k from the compiled JAX kernel (an accelerator holds the table).

        The device's table is the model's, compiled for its shape: cold-start rows are
        not on it. A cold candidate goes to the kernel as unknown (index 0), and its dot
        product with the user's vector is added here on the host, from the batch's
        table; requests with one are then ordered here (a stable sort) instead of by
        the kernel's top k.
        """
        assert self.ranker is not None
        offsets = batch.offsets
        sizes = np.diff(offsets)
        rows, cols = len(batch.requests), int(sizes.max(initial=1))
        idx = np.zeros((rows, cols), np.int32)
        where = np.zeros((rows, cols), bool)
        feats = np.zeros((rows, cols, len(FEATURES)), np.float32)
        for k in range(rows):
            t0, t1 = offsets[k], offsets[k + 1]
            idx[k, : t1 - t0] = batch.models[t0:t1]
            where[k, : t1 - t0] = True
            feats[k, : t1 - t0] = batch.features[t0:t1, : len(FEATURES)]
        cold_idx, is_cold = idx, np.zeros((rows, cols), bool)
        if batch.cold is not None:
            is_cold = idx >= batch.cold.first_cold
            idx = np.where(is_cold, 0, idx)
        scored = self.ranker.score(vectors, idx, where=where, features=feats)
        model_table = self.ranker.item_table
        out = []
        for k, request in enumerate(batch.requests):
            n = int(sizes[k])
            scores = scored.scores[k, :n]
            top = scored.top_idx[k]
            cold = np.flatnonzero(is_cold[k, :n]) if has_vector[k] else ()
            biased = batch.features.shape[1] > len(FEATURES)
            moved = batch.moved and bool(has_vector[k])
            if len(cold) or biased or moved:
                assert batch.table is not None
                scores = scores.copy()
                scores[cold] += batch.table[cold_idx[k, cold]] @ vectors[k]
                if biased:  # the online bias, which the device's kernel does not know
                    scores += batch.features[offsets[k] : offsets[k + 1], len(FEATURES)]
                if moved:  # the online step's change to the rows the kernel scored
                    known = idx[k, :n]
                    change = batch.table[known] - model_table[known]
                    scores += np.where(known > 0, change @ vectors[k], np.float32(0))
                order = np.argsort(-scores, kind="stable")[: None if self.policies else request.k]
            elif request.k is not None and request.k <= len(top) and not self.policies:
                order = top[: request.k][top[: request.k] >= 0]  # same order as a stable sort
            else:
                order = np.argsort(-scores, kind="stable")[: None if self.policies else request.k]
            out.append(self._answer(batch, k, scores, order, has_vector=bool(has_vector[k])))
        return out

    def _answer(
        self, batch: _Batch, k: int, scores: np.ndarray, order: np.ndarray, *, has_vector: bool
    ) -> RankedList:
        request = batch.requests[k]
        if self.policies:
            return self._apply_policies(batch, k, scores, order, has_vector=has_vector)
        items = request.candidates.pick(order)
        explain = None
        if request.explained:
            t0 = int(batch.offsets[k])
            explain = [
                self._explain_one(batch, t0 + int(i), float(scores[i]), has_vector=has_vector)
                for i in order
            ]
        source = "model" if has_vector else "features"
        rounded = scores[order].astype(np.float64).round(6).tolist()
        return RankedList(items, rounded, explain, source)

    def _apply_policies(
        self, batch: _Batch, k: int, scores: np.ndarray, order: np.ndarray, *, has_vector: bool
    ) -> RankedList:
        """
        Run the ranking policies, in order, on the model's full order; then cut to k.

        Each policy sees the previous one's items, scores and embeddings; its explain
        entries are merged into each item's, after the model's own parts
        (`plugins.chain.run_policies`).
        """
        request = batch.requests[k]
        assert batch.state is not None
        t0 = int(batch.offsets[k])
        picked = t0 + order  # positions in the batch's flat arrays, best first
        embeddings = (batch.table[batch.models[picked]]
                      if batch.table is not None and has_vector else None)  # fmt: skip
        items = request.candidates.pick(order)
        policy_in = PolicyInput(
            user=request.user, user_row=int(batch.user_rows[k]), items=items,
            scores=scores[order].astype(np.float32), rows=batch.rows[picked].astype(np.int64),
            state=batch.state, k=request.k or len(items),
            context={**(request.context or {}), "now": batch.now}, embeddings=embeddings,
            features=batch.features[picked] @ batch.weights,
        )  # fmt: skip
        chain = run_policies(self.policies, policy_in)
        picked = picked[chain.kept]
        final = chain.request
        cut = request.k if request.k is not None else len(final.items)
        final_scores = final.scores[:cut].astype(np.float64).round(6).tolist()
        explain = None
        if request.explained:
            explain = [
                {**self._explain_one(batch, int(t), float(scores[int(t) - t0]),
                                     has_vector=has_vector),
                 "policies": chain.explain[j], "position": j}
                for j, t in enumerate(picked[:cut].tolist())
            ]  # fmt: skip
        source = "model" if has_vector else "features"
        return RankedList(list(final.items[:cut]), final_scores, explain, source, chain.record)

    def _explain_one(
        self, batch: _Batch, t: int, score: float, *, has_vector: bool
    ) -> dict[str, Any]:
        """
        One candidate's score parts.

        ``cold_start`` names the rule of the item's cold-start vector
        (`daemon._coldstart.COLD_KINDS`) when it has one, and is absent otherwise.
        """
        assert batch.weights is not None
        names = FEATURES + ("online_bias",) * (batch.features.shape[1] - len(FEATURES))
        parts = {name: round(float(batch.weights[f] * batch.features[t, f]), 6)
                 for f, name in enumerate(names)}  # fmt: skip
        m = int(batch.models[t])
        cold = batch.cold.kind(m) if batch.cold is not None and m else None
        model = score - sum(parts.values()) if has_vector and m else 0.0
        entry: dict[str, Any] = {"model": round(model, 6), **parts,
                                 "known_to_model": bool(m) and cold is None}  # fmt: skip
        if cold is not None:
            entry["cold_start"] = cold
        return entry
