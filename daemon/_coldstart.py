"""
Cold-start vectors: an embedding for each item the state knows and the model does not.

An item that reached the state after the model was trained (through an ``item`` event
or a first interaction) has no row in the model's item table: without a stand-in it
gets a zero dot product and ranks by its features alone until the next retrain. Here
it gets a vector built from the model items it resembles, by the first rule that
applies:

1. ``category``: the mean embedding of the model items in the item's category (the
   ``category`` field of ``item`` events, `eventstore.State.category`), when the
   model knows at least one item of that category;
2. ``tags``: else the mean embedding of the model items that share a tag with it (the
   ``tags`` field, which the state keeps in ``State.item_fields``), an item counted
   once per tag it shares (so the sum of the per-tag sums over the sum of the
   per-tag counts), when there is one;
3. ``popularity``: else the mean embedding of the model's `TOP_POPULAR` most popular
   items, weighted by their decayed popularity (the quantity behind the
   ``popularity`` feature). Its dot product with a user's vector says how much the
   user likes what is popular now, which is what a new item with no metadata has
   going for it. Without any popular model item (no interaction yet) the item gets
   no vector and ranks by its features, as before.

Means are float64 averages of the model's rows, stored as float32. Only model items
count: the other cold items have no embedding to average.

Publication. `build_cold_table` returns a `ColdTable`: the model's item table with the
cold rows appended (``[V + 1 + C, d]``) and the map from state rows to those rows.
It is built off the request path and published by one attribute assignment
(`daemon.ranking.Ranking.refresh_cold_start`); a batch reads the attribute once and
scores with that table and that map, so it never sees a half-built one. The table is
tied to the model and the state it was built from: a batch on another model (after a
swap) or another state (after an erasure rebuilt it) ignores it.

Cost. A full build computes every category's mean and the popularity vector from all
the model's rows; a build for new items only (``previous``) reuses those, places the
new rows and copies the table once. Measured on the 2-core development machine while
it was busy with other work, for 100,000 items (95,000 in the model, d = 64, 200
categories, 5,000 cold): a full build 140-200 ms, of which the tag index (one pass in
Python over the model items' fields, made only when a cold item needs it) is about
100 ms; a build for 10 new items 3 ms. The daemon makes a full build when the model
or the state changes and at most once a minute otherwise, builds for new items in
between, and does both on a thread of their own, so that encodes on the kernel
thread never queue behind a build.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from eventstore import State

__all__ = ["COLD_KINDS", "TOP_POPULAR", "ColdTable", "build_cold_table"]

#: How many of the most popular model items make the popularity vector.
TOP_POPULAR: Final = 50
#: What each cold row came from, by its code in `ColdTable.kinds`.
COLD_KINDS: Final = ("category", "tags", "popularity")
_CATEGORY, _TAGS, _POPULARITY = range(3)


@dataclass(frozen=True, slots=True, eq=False)
class ColdTable:
    """
    A model's item table extended with cold-start rows, and which state rows use them.

    Attributes:
        model: the object identifying the model the rows came from (the `Ranker`).
        state: the state whose rows ``index_of_row`` maps.
        table: float32 ``[V + 1 + C, d]``: the model's rows (0 is padding), then the
            ``C`` cold rows.
        index_of_row: int32 ``[n_rows]``: state row -> its row in ``table``
            (``first_cold`` or more), 0 for a row without one.
        kinds: int8 ``[C]``: each cold row's rule, an index into `COLD_KINDS`.
        first_cold: V + 1, the first cold row of ``table``.
        offset: the state's log offset at the last full build (one without
            ``previous``, see `build_cold_table`).
        built_at: the time of that build (`build_cold_table`'s ``built_at``).
        groups: the category means and popularity vector it used (reused by a build
            for new items, see `build_cold_table`).
    """

    model: Any
    state: State
    table: np.ndarray
    index_of_row: np.ndarray
    kinds: np.ndarray
    first_cold: int
    offset: int
    built_at: float
    groups: _Groups = field(repr=False)

    @property
    def n_rows(self) -> int:
        """State rows covered: rows beyond are scored without a cold vector."""
        return len(self.index_of_row)

    @property
    def size(self) -> int:
        """C, the number of cold rows."""
        return len(self.kinds)

    def kind(self, model_index: int) -> str | None:
        """The rule behind table row ``model_index``; None for a model row."""
        if model_index < self.first_cold:
            return None
        return COLD_KINDS[int(self.kinds[model_index - self.first_cold])]


def build_cold_table(
    state: State, model_of_row: np.ndarray, item_table: np.ndarray, *, model: Any,
    built_at: float, previous: ColdTable | None = None,
) -> ColdTable:  # fmt: skip
    """
    The cold-start table of ``state`` for a model (see the module docstring for the rules).

    Args:
        state: the folded state (read only; the writer may fold meanwhile).
        model_of_row: int32 ``[n]``: state row -> model index (0: unknown to the model),
            for the state's first ``n`` rows (`daemon.candidates.Catalog.model_of_row`).
        item_table: float32 ``[V + 1, d]``, the model's item embeddings (row 0: padding).
        model: what identifies the model (kept in the table, see `ColdTable.model`).
        built_at: the time to record as `ColdTable.built_at`.
        previous: a table built earlier for the same model and state: its rows are
            kept as they are and only the state rows it did not cover are placed, with
            its category means and popularity vector (and its ``offset`` and
            ``built_at`` are kept). None: a full build, everything computed anew.
    """
    first = item_table.shape[0]
    if previous is None:
        offset = state.offset  # read first: what is folded during the build counts as new
        groups = _Groups(state, model_of_row, item_table)
        start, table, index, kinds = 0, item_table, np.zeros(0, np.int32), np.zeros(0, np.int8)
    else:
        groups, offset, built_at = previous.groups, previous.offset, previous.built_at
        start, table = previous.n_rows, previous.table
        index, kinds = previous.index_of_row, previous.kinds
    new = np.flatnonzero(model_of_row[start:] == 0) + start
    vectors, new_kinds = groups.place(new)
    has = new_kinds >= 0
    new_index = np.zeros(len(model_of_row) - start, np.int32)
    at = first + len(kinds)
    new_index[new[has] - start] = np.arange(at, at + int(has.sum()), dtype=np.int32)
    if has.any():
        table = np.concatenate([table, vectors[has]])
    return ColdTable(model, state, table, np.concatenate([index, new_index]),
                     np.concatenate([kinds, new_kinds[has]]), first, offset, built_at,
                     groups)  # fmt: skip


class _Groups:
    """
    What cold vectors are made of, for one model and state (used by one thread at a time).

    The mean embedding of each category with model items and the popularity vector,
    computed at construction; the tag index (tag -> model indices) and each tag's
    sum, on first need.
    """

    def __init__(self, state: State, model_of_row: np.ndarray, item_table: np.ndarray) -> None:
        self.state = state
        self.item_table = item_table
        self.known_rows = np.flatnonzero(model_of_row > 0)
        self.known_models = model_of_row[self.known_rows]
        self.categories, self.category_means = self._category_means()
        self.popularity = self._popularity()
        self._tag_index: dict[str, list[int]] | None = None
        self._tag_sums: dict[str, tuple[np.ndarray, int]] = {}

    def place(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """
        (float32 ``[len(rows), d]`` vectors, int8 kinds) of cold state rows ``rows``.

        A kind is -1 where no rule applies (the vector is then zeros).
        """
        vectors = np.zeros((len(rows), self.item_table.shape[1]), np.float32)
        kinds = np.full(len(rows), -1, np.int8)
        if not len(rows) or not len(self.known_rows):
            return vectors, kinds
        cats = self.state.array("category")[rows]
        if len(self.categories):
            slot = np.minimum(np.searchsorted(self.categories, cats), len(self.categories) - 1)
            found = (cats >= 0) & (self.categories[slot] == cats)
            vectors[found] = self.category_means[slot[found]]
            kinds[found] = _CATEGORY
        fields = self.state.item_fields
        for k in np.flatnonzero(kinds < 0).tolist():
            tags = _tags(fields.get(int(rows[k])))
            vector = self._tag_mean(tags) if tags else None
            if vector is not None:
                vectors[k], kinds[k] = vector, _TAGS
        if self.popularity is not None:
            rest = kinds < 0
            vectors[rest], kinds[rest] = self.popularity, _POPULARITY
        return vectors, kinds

    def _category_means(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted categories with model items, float32 ``[G, d]`` their mean embeddings)."""
        cats = self.state.array("category")[self.known_rows]
        pick = cats >= 0
        order = np.argsort(cats[pick], kind="stable")
        cats = cats[pick][order]
        if not len(cats):
            return cats, np.zeros((0, self.item_table.shape[1]), np.float32)
        starts = np.flatnonzero(np.r_[True, cats[1:] != cats[:-1]])
        counts = np.diff(np.r_[starts, len(cats)])
        rows = self.item_table[self.known_models[pick][order]]
        sums = np.add.reduceat(rows, starts, axis=0, dtype=np.float64)
        return cats[starts], (sums / counts[:, None]).astype(np.float32)

    def _popularity(self) -> np.ndarray | None:
        """
        The popularity-weighted mean of the `TOP_POPULAR` most popular model items.

        Weights are the items' popularity decayed to the newest of their event times:
        decaying them all to a later "now" multiplies every weight by one factor, which
        a weighted mean does not see. None without a popular model item.
        """
        if not len(self.known_rows):
            return None
        pop = self.state.array("pop")[self.known_rows]
        pop_ts = self.state.array("pop_ts")[self.known_rows]
        decay = np.exp2(-(pop_ts.max() - pop_ts) / self.state.config.half_life_s)
        weight = np.maximum(pop * decay, 0.0)
        top = np.argsort(-weight, kind="stable")[:TOP_POPULAR]
        top = top[weight[top] > 0]
        if not len(top):
            return None
        rows = self.item_table[self.known_models[top]].astype(np.float64)
        return (weight[top] @ rows / weight[top].sum()).astype(np.float32)

    def _tag_mean(self, tags: set[str]) -> np.ndarray | None:
        """The mean of the model items sharing a tag in ``tags``, counted once per tag."""
        total = np.zeros(self.item_table.shape[1], np.float64)
        count = 0
        for tag in tags:
            tag_sum, tag_count = self._tag_sum(tag)
            total += tag_sum
            count += tag_count
        return (total / count).astype(np.float32) if count else None

    def _tag_sum(self, tag: str) -> tuple[np.ndarray, int]:
        """(float64 sum of the embeddings of the model items tagged ``tag``, their count)."""
        if tag not in self._tag_sums:
            models = self._tags_index().get(tag, [])
            total = self.item_table[models].sum(axis=0, dtype=np.float64)
            self._tag_sums[tag] = (total, len(models))
        return self._tag_sums[tag]

    def _tags_index(self) -> dict[str, list[int]]:
        """Tag -> the model indices of the model items carrying it (one pass, on first need)."""
        if self._tag_index is None:
            fields = self.state.item_fields
            index: dict[str, list[int]] = {}
            for r, m in zip(self.known_rows.tolist(), self.known_models.tolist(), strict=True):
                tags = (fields.get(r) or {}).get("tags")
                for tag in tags or ():
                    index.setdefault(tag, []).append(m)
            self._tag_index = index
        return self._tag_index


def _tags(fields: dict[str, Any] | None) -> set[str]:
    tags: Sequence[Any] = (fields or {}).get("tags") or ()
    return {t for t in tags if isinstance(t, str)}
