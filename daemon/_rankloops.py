"""
Compiled loops of the rank path: ids to rows, features, fused scores, top k.

Candidate ids go from the request's JSON bytes to catalogue rows; then the features,
fused scores and the top k of every request of a batch come out of one pass.

Why these are numba loops and not Python or numpy, measured on the 2-core development
machine for one request of 500 candidates (``bench/bench_daemon.py``, in-process
profile): decoding the ids into 500 ``str`` objects took 18 µs, checking their
lengths 37, looking them up in a dict 39 (fresh strings must be hashed), computing the
three features with numpy 90 (a dozen array operations of 500 elements, each with
its fixed cost), and the fused scores plus a compiled top-k call about 60 — about
250 µs of the GIL per request, which capped the daemon near 1,400 rank/s. Here the
ids are read straight from the request's bytes (msgspec hands them over as
``msgspec.Raw``), looked up in an open-addressing hash table over their UTF-8 bytes,
and features, scores and the top k come out of one pass per request, in a few
microseconds.

They keep the GIL (no ``nogil``): they run on the event loop's thread and last
microseconds, and a thread that lets the GIL go must queue to take it back behind the
writer and kernel threads. With a thread that kept asking for the GIL, 20 calls of a
short loop took 88 µs at the median with ``nogil`` against 43 µs without
(a micro-benchmark, in the commit message); in the 3-minute soak
(``bench/soak``, 1,000 rank/s and 5,000 events/s on 2 cores) a rank batch took 4.8 ms
on average instead of 6.2.

No library maps byte strings to indices without making Python objects first (a dict
needs ``str`` keys; pandas' hash tables take object arrays), so the table is written
here: FNV-1a hashes, linear probing, a power-of-two table at most half full, and
entries whose bytes live in one arena. Keys are compared byte for byte, so a hash
collision costs a probe, never a wrong answer.

Feature definitions match `daemon.ranking` (its docstring is the reference); the
tests check these loops against a plain numpy version of them.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = [
    "NEEDS_SLOW_PATH",
    "TOO_MANY",
    "apply_cold_rows",
    "catalog_insert",
    "catalog_lookup",
    "catalog_rehash",
    "features_batch",
    "parse_string_array",
    "rank_batch_fused",
]

#: `parse_string_array` results besides a count: the array is not a plain list of
#: printable-ASCII strings without escapes (decode it the slow way), or it has more
#: strings than there is room for.
NEEDS_SLOW_PATH, TOO_MANY = -1, -2

_FNV_OFFSET = np.uint64(14695981039346656037)
_FNV_PRIME = np.uint64(1099511628211)
_QUOTE, _BACKSLASH, _COMMA, _OPEN, _CLOSE = 34, 92, 44, 91, 93
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}


# ------------------------------------------------------------------ parsing


@njit(cache=True)
def _skip_ws(buf, i):  # noqa: ANN001, ANN202
    n = buf.shape[0]
    while i < n and (buf[i] == 32 or buf[i] == 9 or buf[i] == 10 or buf[i] == 13):
        i += 1
    return i


@njit(cache=True)
def parse_string_array(buf, starts, ends) -> int:  # noqa: ANN001, C901, PLR0911
    """
    Offsets of the strings of the JSON array in ``buf`` (uint8), between the quotes.

    Returns the count, `NEEDS_SLOW_PATH` when the array holds anything but strings of
    printable ASCII without escapes (the caller then decodes it with msgspec), or
    `TOO_MANY` when there are more than ``len(starts)`` strings. ``buf`` is known to
    be valid JSON (msgspec checked it).
    """
    n = buf.shape[0]
    i = _skip_ws(buf, 0)
    if i >= n or buf[i] != _OPEN:
        return NEEDS_SLOW_PATH
    i = _skip_ws(buf, i + 1)
    if i < n and buf[i] == _CLOSE:
        return 0
    count = 0
    while True:
        if i >= n or buf[i] != _QUOTE:
            return NEEDS_SLOW_PATH
        i += 1
        start = i
        while i < n:
            c = buf[i]
            if c == _QUOTE:
                break
            if c == _BACKSLASH or c < 32 or c > 126:
                return NEEDS_SLOW_PATH
            i += 1
        if i >= n:
            return NEEDS_SLOW_PATH
        if count >= starts.shape[0]:
            return TOO_MANY
        starts[count] = start
        ends[count] = i
        count += 1
        i = _skip_ws(buf, i + 1)
        if i < n and buf[i] == _COMMA:
            i = _skip_ws(buf, i + 1)
            continue
        if i < n and buf[i] == _CLOSE:
            return count
        return NEEDS_SLOW_PATH


# -------------------------------------------------------------- hash table


@njit(cache=True, inline="always")
def _fnv1a(buf, start, end):  # noqa: ANN001, ANN202
    h = _FNV_OFFSET
    for i in range(start, end):
        h = (h ^ np.uint64(buf[i])) * _FNV_PRIME
    return h


@njit(cache=True)
def _find(table, ent_hash, ent_start, ent_len, arena, buf, start, end, h):  # noqa: ANN001, ANN202, PLR0917
    """(slot, entry): the entry holding the key, or -1 and the empty slot where it would go."""
    mask = table.shape[0] - 1
    slot = np.int64(h & np.uint64(mask))
    length = end - start
    while True:
        e = table[slot] - 1
        if e < 0:
            return slot, -1
        if ent_hash[e] == h and ent_len[e] == length:
            a = ent_start[e]
            same = True
            for j in range(length):
                if arena[a + j] != buf[start + j]:
                    same = False
                    break
            if same:
                return slot, e
        slot = (slot + 1) & mask


@njit(cache=True)
def catalog_insert(  # noqa: PLR0917
    table, ent_hash, ent_start, ent_len, ent_row, ent_model, arena, counts,  # noqa: ANN001
    buf, starts, ends, rows, models, out_model,  # noqa: ANN001
) -> None:  # fmt: skip
    """
    Insert or update keys ``buf[starts[i]:ends[i]]``.

    ``rows[i]`` / ``models[i]`` set the entry's state row / model index unless -1.
    ``counts`` is ``[entries, arena bytes used]``; the caller has made room for every
    key. ``out_model[i]`` receives each key's model index afterwards.
    """
    for i in range(starts.shape[0]):
        start, end = starts[i], ends[i]
        h = _fnv1a(buf, start, end)
        slot, e = _find(table, ent_hash, ent_start, ent_len, arena, buf, start, end, h)
        if e < 0:
            e = counts[0]
            counts[0] += 1
            a = counts[1]
            for j in range(end - start):
                arena[a + j] = buf[start + j]
            counts[1] += end - start
            ent_hash[e], ent_start[e], ent_len[e] = h, a, end - start
            ent_row[e], ent_model[e] = -1, 0
            table[slot] = e + 1
        if rows[i] >= 0:
            ent_row[e] = rows[i]
        if models[i] >= 0:
            ent_model[e] = models[i]
        out_model[i] = ent_model[e]


@njit(cache=True)
def catalog_rehash(table, ent_hash, n_entries) -> None:  # noqa: ANN001
    """Place entries ``0 .. n_entries - 1`` into the empty ``table`` by their hashes."""
    mask = table.shape[0] - 1
    for e in range(n_entries):
        slot = np.int64(ent_hash[e] & np.uint64(mask))
        while table[slot] != 0:
            slot = (slot + 1) & mask
        table[slot] = e + 1


@njit(cache=True)
def catalog_lookup(  # noqa: PLR0917
    table, ent_hash, ent_start, ent_len, ent_row, ent_model, arena,  # noqa: ANN001
    buf, starts, ends, out_rows, out_models,  # noqa: ANN001
) -> None:  # fmt: skip
    """State row (-1: unknown) and model index (0: unknown) of each key."""
    for i in range(starts.shape[0]):
        start, end = starts[i], ends[i]
        h = _fnv1a(buf, start, end)
        _, e = _find(table, ent_hash, ent_start, ent_len, arena, buf, start, end, h)
        if e < 0:
            out_rows[i], out_models[i] = -1, 0
        else:
            out_rows[i], out_models[i] = ent_row[e], ent_model[e]


@njit(cache=True)
def apply_cold_rows(rows, models, cold_of_row) -> None:  # noqa: ANN001
    """
    ``models[t] = cold_of_row[rows[t]]`` where ``models[t]`` is 0 and the row has one.

    In place: candidates the model does not know (model index 0) with a state row that
    ``cold_of_row`` covers take their cold-start row (`daemon._coldstart`; 0: none).
    Measured for 500 candidates on the (busy) development machine: about 1 µs with the
    call, where the same with numpy masks took about 10 µs per batch.
    """
    n = cold_of_row.shape[0]
    for t in range(rows.shape[0]):
        r = rows[t]
        if models[t] == 0 and 0 <= r < n:
            models[t] = cold_of_row[r]


# ------------------------------------------------------- features and scores


@njit(cache=True, fastmath=_FASTMATH)
def _features_one(  # noqa: ANN202, PLR0917
    rows, t0, t1, user, pop, pop_ts, created, category, cat_idx, cat_w, cat_ts,  # noqa: ANN001
    n_slots, now, half_life, out,  # noqa: ANN001
):  # fmt: skip
    """Features of candidates ``t0 .. t1 - 1`` (state rows ``rows``) for user row ``user``."""
    n_items = min(pop.shape[0], pop_ts.shape[0], created.shape[0], category.shape[0])
    decay = 0.0
    if user >= 0 and cat_ts[user] != 0.0:
        decay = 2.0 ** (-max(now - cat_ts[user], 0.0) / half_life)
    for t in range(t0, t1):
        r = rows[t]
        out[t, 0] = 0.0
        out[t, 1] = 0.0
        out[t, 2] = 0.0
        if r < 0 or r >= n_items:
            continue
        decayed = pop[r] * 2.0 ** (-max(now - pop_ts[r], 0.0) / half_life)
        out[t, 0] = np.log1p(max(decayed, 0.0))
        if decay != 0.0:
            c = category[r]
            acc = np.float32(0.0)
            for s in range(user * n_slots, (user + 1) * n_slots):
                if cat_idx[s] >= 0 and cat_idx[s] == c:
                    acc += cat_w[s] * np.float32(decay)
            out[t, 1] = acc
        if created[r] != 0.0:
            out[t, 2] = 2.0 ** (-max(now - created[r], 0.0) / half_life)


@njit(cache=True)
def features_batch(  # noqa: PLR0917
    rows, offsets, users, pop, pop_ts, created, category, cat_idx, cat_w, cat_ts,  # noqa: ANN001
    n_slots, now, half_life, out,  # noqa: ANN001
) -> None:  # fmt: skip
    """``out [T, 3]``: features of every request's candidates (request b owns offsets[b]..)."""
    for b in range(users.shape[0]):
        _features_one(rows, offsets[b], offsets[b + 1], users[b], pop, pop_ts, created,
                      category, cat_idx, cat_w, cat_ts, n_slots, now, half_life, out)  # fmt: skip


@njit(cache=True, fastmath=_FASTMATH)
def rank_batch_fused(  # noqa: C901, PLR0917
    table, vectors, has_vector, models, offsets, ks, features, weights,  # noqa: ANN001
    scores, order, counts,  # noqa: ANN001
) -> int:  # fmt: skip
    """
    Fused scores and the top k of every request of a batch, in one pass.

    Request ``b`` owns candidates ``offsets[b] .. offsets[b+1] - 1``: ``score = <vectors[b],
    table[models[t]]> + weights · features[t]``, the dot product only where
    ``has_vector[b]`` and ``models[t] > 0``. ``scores[t]`` receives every score;
    ``order[offsets[b]:]`` the request's best ``counts[b] = min(ks[b], n)`` positions
    (relative to its first candidate), best first, ties in candidate order (a stable
    sort). Returns 0, or 1 when a model index is outside the table.
    """
    dim = table.shape[1]
    n_features = weights.shape[0]
    for b in range(offsets.shape[0] - 1):
        t0, t1 = offsets[b], offsets[b + 1]
        for t in range(t0, t1):
            acc = np.float32(0.0)
            for f in range(n_features):
                acc += weights[f] * features[t, f]
            m = models[t]
            if m < 0 or m >= table.shape[0]:
                return 1
            if has_vector[b] and m > 0:
                for j in range(dim):
                    acc += table[m, j] * vectors[b, j]
            scores[t] = acc
        n = t1 - t0
        k = min(ks[b], n)
        counts[b] = k
        if k == 0:
            continue
        seg = scores[t0:t1]
        if 4 * k >= n:  # most of the list: a full stable sort
            idx = np.argsort(-seg, kind="mergesort")
            for j in range(k):
                order[t0 + j] = idx[j]
            continue
        # a short list: insertion into a sorted top k (earlier candidates win ties)
        filled = 0
        for j in range(n):
            s = seg[j]
            if filled == k and not s > seg[order[t0 + k - 1]]:
                continue
            pos = filled if filled < k else k - 1
            while pos > 0 and s > seg[order[t0 + pos - 1]]:
                order[t0 + pos] = order[t0 + pos - 1]
                pos -= 1
            order[t0 + pos] = j
            filled = min(filled + 1, k)
    return 0
