"""
Candidate ids as bytes, and the catalogue that maps them to state rows and model indices.

A rank request carries hundreds of candidate ids. Turning each into a Python ``str``
and looking it up in a dict cost more than everything else on the rank path (see
`daemon._rankloops`), so the ids stay the bytes they arrived in: `Candidates` holds
the request's JSON array and the offsets of each id inside it, and `Catalog` finds
their rows with a compiled hash table. Only the ids of the answer become strings.

The fast form needs ids of printable ASCII without JSON escapes, which is what ids
nearly always are; any other array (non-ASCII, escapes, or not an array of strings
at all) is decoded by msgspec instead, which also gives the error for a bad one, and
its ids are re-encoded as UTF-8 into the same layout. Both forms answer the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import msgspec
import numpy as np

from daemon._rankloops import (
    NEEDS_SLOW_PATH,
    TOO_MANY,
    catalog_insert,
    catalog_lookup,
    catalog_rehash,
    parse_string_array,
)

__all__ = ["CandidateError", "Candidates", "Catalog"]

_list_of_str: Final = msgspec.json.Decoder(list[str])


class CandidateError(ValueError):
    """The candidates array breaks a rule; ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class Candidates:
    """
    The candidate ids of one request: ``buf[starts[i]:ends[i]]`` is id ``i`` in UTF-8.

    Build one with `parse` (from a request's JSON bytes) or `from_ids`.
    """

    __slots__ = ("_ids", "buf", "ends", "starts")

    def __init__(self, buf: bytes, starts: np.ndarray, ends: np.ndarray) -> None:
        self.buf = buf
        self.starts = starts
        self.ends = ends
        self._ids: list[str] | None = None

    @classmethod
    def parse(cls, raw: bytes | memoryview, *, max_count: int, max_id_bytes: int) -> Candidates:
        """
        The ids of the JSON array ``raw``.

        Raises `CandidateError` ("too_many_candidates", or "bad_request" naming the
        rule) when there are more than ``max_count``, an id is empty or longer than
        ``max_id_bytes`` bytes, or ``raw`` is not an array of strings.
        """
        buf = np.frombuffer(raw, np.uint8)
        room = min(max_count + 1, len(buf) // 2 + 1)
        starts = np.empty(room, np.int32)
        ends = np.empty(room, np.int32)
        n = parse_string_array(buf, starts, ends)
        if n == NEEDS_SLOW_PATH:
            try:
                ids = _list_of_str.decode(raw)
            except msgspec.ValidationError:
                raise CandidateError(
                    "bad_request", "candidates: expected a list of strings"
                ) from None
            except (msgspec.DecodeError, UnicodeDecodeError):
                raise CandidateError("bad_request", "candidates: malformed JSON") from None
            out = cls.from_ids(ids)
        elif n == TOO_MANY or n > max_count:
            raise CandidateError(
                "too_many_candidates", f"candidates: at most {max_count} ids per request"
            )
        else:
            out = cls(bytes(raw), starts[:n], ends[:n])
        out._check(max_count, max_id_bytes)
        return out

    @classmethod
    def from_ids(cls, ids: Sequence[str]) -> Candidates:
        """Candidates from strings (tests, clients, and arrays the fast parser declines)."""
        encoded = [i.encode() for i in ids]
        lengths = np.fromiter(map(len, encoded), np.int32, len(encoded))
        ends = np.cumsum(lengths, dtype=np.int32)
        out = cls(b"".join(encoded), ends - lengths, ends)
        out._ids = list(ids)
        return out

    def _check(self, max_count: int, max_id_bytes: int) -> None:
        if len(self) > max_count:
            raise CandidateError(
                "too_many_candidates", f"candidates: at most {max_count} ids per request"
            )
        if len(self):
            lengths = self.ends - self.starts
            if lengths.min() < 1 or lengths.max() > max_id_bytes:
                raise CandidateError(
                    "bad_request", f"candidates: every id must be 1 to {max_id_bytes} bytes"
                )

    def __len__(self) -> int:
        return len(self.starts)

    def id(self, i: int) -> str:
        """Id ``i`` as a string."""
        if self._ids is not None:
            return self._ids[i]
        return self.buf[self.starts[i] : self.ends[i]].decode()

    def ids(self) -> list[str]:
        """Every id as a string (decoded once, then kept)."""
        if self._ids is None:
            buf = self.buf
            self._ids = [
                buf[s:e].decode()
                for s, e in zip(self.starts.tolist(), self.ends.tolist(), strict=True)
            ]
        return self._ids

    def pick(self, positions: np.ndarray) -> list[str]:
        """The ids at ``positions``, in that order."""
        if self._ids is not None:
            ids = self._ids
            return [ids[p] for p in positions.tolist()]
        buf = self.buf
        starts, ends = self.starts[positions].tolist(), self.ends[positions].tolist()
        return [buf[s:e].decode() for s, e in zip(starts, ends, strict=True)]


class Catalog:
    """
    Item id -> (state row, model index), for ids as bytes.

    Holds every item of the state (`sync` adds the rows the state gained since) and
    every item of the model's vocabulary (model index ``i + 1`` for ``vocabulary[i]``;
    0 means the model does not know the item, -1 as a state row that the state does not).
    ``model_of_row`` maps state rows to model indices, for encoding user histories.
    Not thread-safe: the rank path is its only user, one batch at a time.
    """

    def __init__(self, vocabulary: Sequence[str] = ()) -> None:
        self._table = np.zeros(1024, np.int32)
        self._hash = np.zeros(512, np.uint64)
        self._start = np.zeros(512, np.int64)
        self._len = np.zeros(512, np.int32)
        self._row = np.zeros(512, np.int32)
        self._model = np.zeros(512, np.int32)
        self._arena = np.zeros(1 << 14, np.uint8)
        self._counts = np.zeros(2, np.int64)  # entries, arena bytes used
        self.state_rows = 0
        self.model_of_row = np.zeros(0, np.int32)
        if vocabulary:
            self._add(
                vocabulary, rows=None, models=np.arange(1, len(vocabulary) + 1, dtype=np.int32)
            )

    def __len__(self) -> int:
        return int(self._counts[0])

    def sync(self, item_ids: Sequence[str]) -> None:
        """Add the state's items from row `state_rows` to ``len(item_ids)``."""
        first, last = self.state_rows, len(item_ids)
        if last <= first:
            return
        rows = np.arange(first, last, dtype=np.int32)
        models = self._add(item_ids[first:last], rows=rows, models=None)
        self.model_of_row = np.concatenate([self.model_of_row, models])
        self.state_rows = last

    def lookup(self, cands: Candidates) -> tuple[np.ndarray, np.ndarray]:
        """``(rows int32 [N], models int32 [N])`` of the candidates."""
        n = len(cands)
        rows = np.empty(n, np.int32)
        models = np.empty(n, np.int32)
        catalog_lookup(self._table, self._hash, self._start, self._len, self._row, self._model,
                       self._arena, np.frombuffer(cands.buf, np.uint8), cands.starts, cands.ends,
                       rows, models)  # fmt: skip
        return rows, models

    def _add(
        self, ids: Sequence[str], *, rows: np.ndarray | None, models: np.ndarray | None
    ) -> np.ndarray:
        cands = Candidates.from_ids(ids)
        n = len(cands)
        self._reserve(n, len(cands.buf))
        keep = np.full(n, -1, np.int32)
        rows = keep if rows is None else rows
        models = keep if models is None else models
        out_model = np.empty(n, np.int32)
        catalog_insert(self._table, self._hash, self._start, self._len, self._row, self._model,
                       self._arena, self._counts, np.frombuffer(cands.buf, np.uint8), cands.starts,
                       cands.ends, rows, models, out_model)  # fmt: skip
        return out_model

    def _reserve(self, keys: int, key_bytes: int) -> None:
        """Room for ``keys`` more entries of ``key_bytes`` in all, the table at most half full."""
        entries, used = (int(x) for x in self._counts)
        need = entries + keys
        if need > len(self._hash):
            size = _next_power_of_two(need)
            for name in ("_hash", "_start", "_len", "_row", "_model"):
                old = getattr(self, name)
                new = np.zeros(size, old.dtype)
                new[:entries] = old[:entries]
                setattr(self, name, new)
        if used + key_bytes > len(self._arena):
            arena = np.zeros(_next_power_of_two(used + key_bytes), np.uint8)
            arena[:used] = self._arena[:used]
            self._arena = arena
        if 2 * need > len(self._table):
            self._table = np.zeros(_next_power_of_two(2 * need), np.int32)
            catalog_rehash(self._table, self._hash, entries)


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()
