"""
User and item state in compact arrays, and its canonical byte form.

The state is a cache of the log: :mod:`eventstore.fold` writes it, nothing else
does. It lives in flat numpy arrays (one row per user or item) so that a user
costs well under 1 KiB at L = 50 and the kernels can read whole columns without
copying.

Layout per user (L = seq_len, K = categories_per_user, P = purchases_per_user):

=============  ==========  ==================================================
column         type        meaning
=============  ==========  ==================================================
seq_item       int32[L]    ring of the last L item indices
seq_type       uint8[L]    event-type code of each
seq_ts         uint32[L]   whole seconds since 2000-01-01 of each
seq_head       uint16      next write position in the ring
n_events       uint32      interactions folded so far
counts         uint32[9]   events per type (8 interactions + impressions)
last_ts        float64     latest event time seen for the user
cat_idx        int32[K]    category-interest slots (-1 = empty)
cat_w          float32[K]  decayed interest per slot, scaled to ``cat_ts``
cat_ts         float64     anchor time of ``cat_w`` (interest at T = w * 2**(-(T-cat_ts)/h))
bought         int32[P]    ring of the last P purchased item indices (-1 = empty)
bought_head    uint8       next write position in it
seen           uint8[128]  1024-bit Bloom filter of every item interacted with
=============  ==========  ==================================================

Per item: decayed popularity (``pop`` as of ``pop_ts``), impressions, clicks,
interactions, a CRC of the id (stable across processes, for the Bloom filter), the
category index, the ``created_at`` field as a number (0 when absent, so that ranking
reads it from an array instead of the metadata dict) and free-form metadata fields.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any, Final

import msgspec
import numpy as np

from eventstore._config import FoldConfig
from eventstore.schema import EVENT_TYPES

__all__ = ["SEEN_BITS", "SEQ_EPOCH", "State"]

SEQ_EPOCH: Final = 946_684_800  # 2000-01-01: sequence times are whole seconds since then
SEEN_BITS: Final = 1024
SEEN_BYTES: Final = SEEN_BITS // 8
N_COUNTS: Final = 9  # the 8 interaction types and impressions
FORMAT: Final = "rerankd-state/2"  # 2: the created_at item column

# name -> (numpy dtype, row width attribute or int). Order is the byte order of to_bytes().
_USER_COLUMNS: Final = (
    ("seq_item", "int32", "L"), ("seq_type", "uint8", "L"), ("seq_ts", "uint32", "L"),
    ("seq_head", "uint16", 1), ("n_events", "uint32", 1), ("counts", "uint32", N_COUNTS),
    ("last_ts", "float64", 1), ("cat_idx", "int32", "K"), ("cat_w", "float32", "K"),
    ("cat_ts", "float64", 1), ("bought", "int32", "P"), ("bought_head", "uint8", 1),
    ("seen", "uint8", SEEN_BYTES),
)
_ITEM_COLUMNS: Final = (
    ("pop", "float64", 1), ("pop_ts", "float64", 1), ("impressions", "uint32", 1),
    ("clicks", "uint32", 1), ("interactions", "uint32", 1), ("crc", "uint32", 1),
    ("category", "int32", 1), ("created_at", "float64", 1),
)
_EMPTY_MINUS_ONE: Final = frozenset({"cat_idx", "bought", "seq_item", "category"})
_header_encoder: Final = msgspec.json.Encoder(order="sorted")


class State:
    """
    All derived state: id maps, per-user and per-item arrays, item metadata.

    Args:
        config: the fold configuration (fixes the row widths).
        users: initial capacity in users; grows by doubling.
        items: initial capacity in items; grows by doubling.
    """

    def __init__(self, config: FoldConfig | None = None, *, users: int = 1024,
                 items: int = 1024) -> None:
        self.config = config or FoldConfig()
        self.L = self.config.seq_len
        self.K = self.config.categories_per_user
        self.P = self.config.purchases_per_user
        self.inv_half_life = 1.0 / self.config.half_life_s
        #: interest weight per event-type code (interaction codes only)
        self.weight_by_code = [self.config.weights[t] for t in EVENT_TYPES[:8]]
        self.offset = 0  # the last log offset folded into this state
        self.user_ids: list[str | None] = []
        self.user_index: dict[str, int] = {}
        self.item_ids: list[str] = []
        self.item_index: dict[str, int] = {}
        self.category_ids: list[str] = []
        self.category_index: dict[str, int] = {}
        self.item_fields: dict[int, dict[str, Any]] = {}
        self._column_cache: dict[tuple[str, ...], tuple[np.ndarray, ...]] = {}
        self._user_cap = 0
        self._item_cap = 0
        self._grow_users(max(users, 16))
        self._grow_items(max(items, 16))

    # --- sizes and growth -----------------------------------------------------

    def _width(self, width: str | int) -> int:
        return getattr(self, width) if isinstance(width, str) else width

    def _grow(self, columns: tuple[tuple[str, str, Any], ...], old: int, new: int) -> None:
        self._column_cache.clear()
        for name, dtype, width in columns:
            w = self._width(width)
            fill = -1 if name in _EMPTY_MINUS_ONE else 0
            arr = np.full(new * w, fill, dtype=dtype)
            if old:
                arr[: old * w] = getattr(self, f"_{name}")[: old * w]
            setattr(self, f"_{name}", arr)
            # the fold's fast scalar access path (see module docstring)
            setattr(self, name, memoryview(arr))

    def _grow_users(self, new: int) -> None:
        self._grow(_USER_COLUMNS, self._user_cap, new)
        self._user_cap = new

    def _grow_items(self, new: int) -> None:
        self._grow(_ITEM_COLUMNS, self._item_cap, new)
        self._item_cap = new

    def columns(self, names: tuple[str, ...]) -> tuple[np.ndarray, ...]:
        """The arrays of ``names``, cached until the next growth (the fold's per-run view)."""
        cols = self._column_cache.get(names)
        if cols is None:
            cols = self._column_cache[names] = tuple(self.array(n) for n in names)
        return cols

    def array(self, name: str) -> np.ndarray:
        """The numpy array behind column ``name`` (rows beyond the used count are padding)."""
        return getattr(self, f"_{name}")

    @property
    def n_users(self) -> int:
        """Users ever seen (forgotten ones keep an empty row)."""
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        """Items ever seen."""
        return len(self.item_ids)

    def bytes_per_user(self) -> int:
        """Array bytes one user row takes (the id map comes on top)."""
        return sum(np.dtype(d).itemsize * self._width(w) for _, d, w in _USER_COLUMNS)

    # --- id maps ----------------------------------------------------------------

    def user_slot(self, user: str) -> int:
        """The dense index of ``user``, creating it when new."""
        u = self.user_index.get(user)
        if u is None:
            u = len(self.user_ids)
            if u == self._user_cap:
                self._grow_users(self._user_cap * 2)
            self.user_ids.append(user)
            self.user_index[user] = u
        return u

    def item_slot(self, item: str) -> int:
        """The dense index of ``item``, creating it when new (no restart needed)."""
        i = self.item_index.get(item)
        if i is None:
            i = len(self.item_ids)
            if i == self._item_cap:
                self._grow_items(self._item_cap * 2)
            self.item_ids.append(item)
            self.item_index[item] = i
            self.crc[i] = zlib.crc32(item.encode())
        return i

    def category_slot(self, category: str) -> int:
        """The dense index of an item category, creating it when new."""
        c = self.category_index.get(category)
        if c is None:
            c = len(self.category_ids)
            self.category_ids.append(category)
            self.category_index[category] = c
        return c

    def drop_user(self, user: str) -> bool:
        """Erase every trace of ``user`` from the state; ``False`` if unknown."""
        u = self.user_index.pop(user, None)
        if u is None:
            return False
        self.user_ids[u] = None
        for name, _, width in _USER_COLUMNS:
            w = self._width(width)
            self.array(name)[u * w:(u + 1) * w] = -1 if name in _EMPTY_MINUS_ONE else 0
        return True

    # --- reading ------------------------------------------------------------------

    def recent(self, u: int) -> Iterator[tuple[int, int, int]]:
        """(item index, type code, seconds since SEQ_EPOCH) of user row ``u``, newest first."""
        n = min(self.n_events[u], self.L)
        head = self.seq_head[u]
        base = u * self.L
        for k in range(1, n + 1):
            p = base + (head - k) % self.L
            yield self.seq_item[p], self.seq_type[p], self.seq_ts[p]

    def sequence(self, u: int) -> np.ndarray:
        """The user's last min(n, L) item indices, oldest first (the model's input)."""
        return np.array([i for i, _, _ in self.recent(u)][::-1], dtype=np.int32)

    def has_seen(self, u: int, i: int) -> bool:
        """Whether user row ``u`` probably interacted with item ``i`` (Bloom filter)."""
        base = u * SEEN_BYTES
        return all(self.seen[base + (b >> 3)] >> (b & 7) & 1 for b in seen_bits(self.crc[i]))

    def user_view(self, user: str) -> dict[str, Any] | None:
        """
        The state of ``user`` with raw item ids, for the ``user`` op and for tests.

        Decayed weights are given as of the user's latest event time, so the view is
        a pure function of the state.
        """
        u = self.user_index.get(user)
        if u is None:
            return None
        weights = self.config.weights
        recent = [{"item": self.item_ids[i], "type": EVENT_TYPES[t], "ts": SEQ_EPOCH + s}
                  for i, t, s in self.recent(u)]
        item_interest: dict[str, float] = {}
        now = self.last_ts[u]
        for entry in recent:
            age = now - entry["ts"]
            decay = 2.0 ** (-max(age, 0.0) / self.config.half_life_s)
            item = entry["item"]
            item_interest[item] = item_interest.get(item, 0.0) + weights.get(entry["type"], 0.0) * decay
        k = self.K
        decay = 2.0 ** (-(now - self.cat_ts[u]) / self.config.half_life_s) if self.cat_ts[u] else 0.0
        categories = {self.category_ids[c]: self.cat_w[s] * decay
                      for s in range(u * k, (u + 1) * k) if (c := self.cat_idx[s]) >= 0}
        counts = {EVENT_TYPES[t]: self.counts[u * N_COUNTS + t] for t in range(N_COUNTS)
                  if self.counts[u * N_COUNTS + t]}
        bought = [self.item_ids[i] for s in range(u * self.P, (u + 1) * self.P)
                  if (i := self.bought[s]) >= 0]
        return {"recent": recent, "item_interest": item_interest,
                "category_interest": categories, "counts": counts,
                "purchased": bought, "events": self.n_events[u], "last_ts": now}

    def item_view(self, item: str) -> dict[str, Any] | None:
        """Popularity (decayed to ``pop_ts``), counters and metadata of ``item``."""
        i = self.item_index.get(item)
        if i is None:
            return None
        cat = self.category[i]
        return {"popularity": self.pop[i], "popularity_ts": self.pop_ts[i],
                "impressions": self.impressions[i], "clicks": self.clicks[i],
                "interactions": self.interactions[i],
                "category": self.category_ids[cat] if cat >= 0 else None,
                "fields": self.item_fields.get(i, {})}

    def summary(self, *, top: int = 10) -> dict[str, Any]:
        """Counts, the most popular items (decayed to the latest event) and memory per user."""
        n = self.n_items
        live_users = len(self.user_index)
        pop = self._pop[:n]
        ts = self._pop_ts[:n]
        latest = float(ts.max()) if n else 0.0
        now_pop = pop * np.exp2((ts - latest) / self.config.half_life_s) if n else pop
        best = np.argsort(-now_pop, kind="stable")[:top]
        interactions = int(self._n_events[: self.n_users].sum())
        return {
            "offset": self.offset, "users": live_users, "items": n,
            "categories": len(self.category_ids), "interactions": interactions,
            "impressions": int(self._impressions[:n].sum()),
            "bytes_per_user": self.bytes_per_user(), "seq_len": self.L,
            "top_items": [{"item": self.item_ids[i], "popularity": round(float(now_pop[i]), 3),
                           "title": self.item_fields.get(int(i), {}).get("title")}
                          for i in best],
        }

    # --- canonical bytes (snapshots) -------------------------------------------------

    def to_bytes(self) -> bytes:
        """
        The canonical serialization: equal states give equal bytes, whatever their
        capacity. Layout: 8-byte little-endian header length, the JSON header, then
        each column's used rows in the order of the column tables.
        """
        header = {
            "format": FORMAT, "config": self.config.as_dict(),
            "fingerprint": self.config.fingerprint(), "offset": self.offset,
            "users": self.user_ids, "items": self.item_ids, "categories": self.category_ids,
            "item_fields": [[i, self.item_fields[i]] for i in sorted(self.item_fields)],
        }
        head = _header_encoder.encode(header)
        parts = [len(head).to_bytes(8, "little"), head]
        for columns, n in ((_USER_COLUMNS, self.n_users), (_ITEM_COLUMNS, self.n_items)):
            for name, _, width in columns:
                parts.append(self.array(name)[: n * self._width(width)].tobytes())
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes, config: FoldConfig) -> State:
        """
        Rebuild a state from :meth:`to_bytes` output made under ``config``.

        Raises:
            ValueError: the bytes are not a state, or were made under another config.
        """
        size = int.from_bytes(data[:8], "little")
        header = msgspec.json.decode(data[8: 8 + size])
        if header.get("format") != FORMAT:
            msg = f"format: expected {FORMAT}, got {header.get('format')!r}"
            raise ValueError(msg)
        if header["fingerprint"] != config.fingerprint():
            msg = "config: the snapshot was made under another fold configuration"
            raise ValueError(msg)
        users, items = header["users"], header["items"]
        state = cls(config, users=len(users), items=len(items))
        state.offset = header["offset"]
        state.user_ids = users
        state.user_index = {u: k for k, u in enumerate(users) if u is not None}
        state.item_ids = items
        state.item_index = {it: k for k, it in enumerate(items)}
        state.category_ids = header["categories"]
        state.category_index = {c: k for k, c in enumerate(state.category_ids)}
        state.item_fields = {i: f for i, f in header["item_fields"]}
        pos = 8 + size
        for columns, n in ((_USER_COLUMNS, len(users)), (_ITEM_COLUMNS, len(items))):
            for name, dtype, width in columns:
                count = n * state._width(width)
                nbytes = count * np.dtype(dtype).itemsize
                chunk = np.frombuffer(data, dtype=dtype, count=count, offset=pos)
                state.array(name)[:count] = chunk
                pos += nbytes
        if pos != len(data):
            msg = f"length: {len(data) - pos} unexpected trailing bytes"
            raise ValueError(msg)
        return state


def seen_bits(crc: int) -> tuple[int, int, int]:
    """The three Bloom-filter bit positions of an item, from its id's CRC-32."""
    # eventstore._foldkernel._set_seen sets the same bits; the property tests compare
    h2 = (crc * 0x9E3779B1) & 0xFFFFFFFF  # a second, independent-enough hash
    return crc & (SEEN_BITS - 1), (crc >> 10) & (SEEN_BITS - 1), h2 >> 22
