"""
Which event ids the log holds: an in-memory hash index, exact after verification.

Why not a UNIQUE index in SQLite: event ids are often random (UUIDs), so every new id
lands on a random page of a B-tree that outgrows the page cache. At a million events
each 1000-event commit dirtied about 1000 index pages (4.8 MB of WAL) and appends
slowed from 9 ms to 23-56 ms a batch. Here the log's table is append-only with no
secondary index, and this index answers "is this id logged?" from memory:

* keys are 64-bit hashes of the ids (CPython's SipHash of the string), values the
  log offsets holding them;
* new entries go to a dict; every ``MERGE_EVERY`` entries the dict is merged into two
  sorted numpy arrays (hashes, offsets), so a lookup is a dict probe plus a binary
  search, for a whole batch at once;
* a hash hit is only a *candidate*: the caller reads the ids at the candidate offsets
  from the log and compares the strings, so a hash collision can never make a new
  event look like a duplicate.

It costs 16 bytes an event (plus the dict between merges), forgets the events
retention deletes (`IdIndex.forget_below`), and is rebuilt from the log when the log
is opened for writing (about 1 s per million events here), because ``hash(str)`` is
randomised per process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Final

import numpy as np

__all__ = ["IdIndex"]

MERGE_EVERY: Final = 1 << 18  # ~25 MB of dict at most; merges copy the arrays, so rarely


class IdIndex:
    """
    Exact membership of event ids, backed by a verifier over the log.

    Args:
        lookup: ``lookup(offsets) -> {offset: id}``, reading the ids stored at
            ``offsets`` (missing offsets are simply absent).
        hash_fn: the 64-bit hash (tests pass a colliding one).
        merge_every: dict entries that trigger a merge into the sorted arrays.
    """

    def __init__(self, lookup: Callable[[list[int]], dict[int, str]], *,
                 hash_fn: Callable[[str], int] = hash, merge_every: int = MERGE_EVERY) -> None:
        self._lookup = lookup
        self._hash = hash_fn
        self._merge_every = merge_every
        self._keys = np.empty(0, dtype=np.int64)
        self._offsets = np.empty(0, dtype=np.int64)
        self._recent: dict[int, int] = {}
        self._overflow: list[tuple[int, int]] = []  # hash collisions inside _recent
        # what _recent and _overflow hold, as int64 [n, 2] arrays (hash, offset), one per
        # add: the merge then starts from arrays instead of walking the dict in Python
        self._pending: list[np.ndarray] = []

    @classmethod
    def from_log(cls, lookup: Callable[[list[int]], dict[int, str]],
                 hashes: list[int], offsets: list[int], **kwargs: object) -> IdIndex:
        """
        An index over a whole log at once: one sort instead of dict inserts and merges
        (0.2 µs an event instead of 1). ``hashes`` must come from the same ``hash_fn``.
        """
        index = cls(lookup, **kwargs)  # type: ignore[arg-type]
        keys = np.array(hashes, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        index._keys = keys[order]
        index._offsets = np.array(offsets, dtype=np.int64)[order]
        return index

    def __len__(self) -> int:
        return len(self._keys) + len(self._recent) + len(self._overflow)

    def add(self, pairs: Iterable[tuple[str, int]]) -> None:
        """Record that each (id, offset) is now in the log."""
        hash_fn = self._hash
        items = [(hash_fn(event_id), offset) for event_id, offset in pairs]
        if not items:
            return
        self._pending.append(np.array(items, dtype=np.int64))
        recent = self._recent
        before = len(recent)
        if recent.keys().isdisjoint([h for h, _ in items]):
            recent.update(items)  # the common case, at C speed
            if len(recent) == before + len(items):
                self._maybe_merge()
                return
            for h, _ in items:  # two new ids of this batch share a hash: undo, go slow
                recent.pop(h, None)
        for h, offset in items:
            if h in recent:
                self._overflow.append((h, offset))
            else:
                recent[h] = offset
        self._maybe_merge()

    def _maybe_merge(self) -> None:
        if len(self._recent) >= self._merge_every:
            self._merge()

    def _merge(self) -> None:
        """
        Move the dict level into the sorted arrays.

        From the arrays `add` kept, never from the dict: walking 262,144 dict entries
        in Python held the GIL for about 50 ms (the writer thread's, so the event loop
        stalled for as long) at every merge, one every 44 s at 6,000 events/s.
        """
        pairs = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        new_keys, new_offsets = pairs[:, 0], pairs[:, 1]
        order = np.argsort(new_keys, kind="stable")
        new_keys, new_offsets = new_keys[order], new_offsets[order]
        at = np.searchsorted(self._keys, new_keys)
        self._keys = np.insert(self._keys, at, new_keys)
        self._offsets = np.insert(self._offsets, at, new_offsets)
        self._recent = {}
        self._overflow = []
        self._pending = []

    def forget_below(self, offset: int) -> int:
        """
        Drop the entries of offsets below ``offset`` (their events were deleted).

        Retention calls it, so that the index of a log that deletes old events stays
        as small as the log instead of growing by 16 bytes an event forever. Merges
        the dict level first (the arrays are copied once either way). Returns how
        many entries were dropped.
        """
        if self._pending:
            self._merge()
        keep = self._offsets >= offset
        dropped = len(keep) - int(np.count_nonzero(keep))
        if dropped:
            self._keys = self._keys[keep]  # boolean indexing copies: the old arrays go
            self._offsets = self._offsets[keep]
        return dropped

    def logged(self, ids: Sequence[str]) -> set[int]:
        """Positions ``k`` of ``ids`` whose id is already in the log (verified)."""
        hashes = [self._hash(i) for i in ids]
        candidates: dict[int, list[int]] = {}  # k -> candidate offsets
        get = self._recent.get
        for k, o in enumerate([get(h) for h in hashes]):
            if o is not None:
                candidates[k] = [o]
        for h, o in self._overflow:
            for k, hk in enumerate(hashes):
                if hk == h:
                    candidates.setdefault(k, []).append(o)
        keys = self._keys
        if len(keys):
            # sorted needles let searchsorted reuse each search's bounds: 3x faster
            wanted = np.array(hashes, dtype=np.int64)
            order = np.argsort(wanted)
            needles = wanted[order]
            lo = np.searchsorted(keys, needles)
            hit = keys[np.minimum(lo, len(keys) - 1)] == needles
            for j in np.flatnonzero(hit).tolist():
                start = end = int(lo[j])
                while end < len(keys) and keys[end] == needles[j]:
                    end += 1
                k = int(order[j])
                candidates.setdefault(k, []).extend(self._offsets[start:end].tolist())
        if not candidates:
            return set()
        stored = self._lookup(sorted({o for offs in candidates.values() for o in offs}))
        return {k for k, offs in candidates.items() if any(stored.get(o) == ids[k] for o in offs)}
