"""
The fold: ``state = apply(state, event)``, deterministic.

Inside the fold there is no clock, no randomness, no I/O and no logging: every time
comes from the event, and the result depends only on the state and the event. So
replaying the log rebuilds the state byte for byte, and a snapshot is just another
input to the fold (:func:`project` continues from it).

The state is a mutable array store (see :mod:`eventstore.state`), not a frozen value:
copying ~1 KiB per user on every event would cost more than the rest of the hot path.
``apply`` mutates it in place and returns it; only the fold writes to it.

Interactions (nearly all events) are folded by a compiled kernel
(:mod:`eventstore._foldkernel`), a run of consecutive ones per call; the rare types
(impressions, item metadata, erasure) by the plain functions below.

Decay: a decayed quantity ``x`` is kept as its value at a reference time ``t_ref``.
An event at ``t`` with weight ``w`` does ``x = x * 2**(-(t - t_ref)/h) + w`` and moves
``t_ref`` to ``t`` when ``t >= t_ref``; an older event adds ``w * 2**(-(t_ref - t)/h)``
and leaves ``t_ref``. Either way the value equals the sum of ``w_k * 2**(-(t_ref -
t_k)/h)`` up to rounding, whatever order the events arrived in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import singledispatch
from typing import Final

import numpy as np

from eventstore._foldkernel import fold_interactions
from eventstore.schema import (
    EVENT_TYPES,
    Event,
    Interaction,
    ItemsShown,
    ItemUpdated,
    Rated,
    UserForgotten,
)
from eventstore.state import State

__all__ = ["apply", "project"]

_IMPRESSION: Final = EVENT_TYPES.index("impression")
_RATING: Final = Rated.code
_KERNEL_TYPES: Final = frozenset({*Interaction.__subclasses__(), ItemsShown})
#: the state columns fold_interactions takes, in its argument order
_KERNEL_COLUMNS: Final = (
    "seq_item", "seq_type", "seq_ts", "seq_head", "n_events", "counts", "last_ts",
    "cat_idx", "cat_w", "cat_ts", "bought", "bought_head", "seen",
    "pop", "pop_ts", "clicks", "interactions", "impressions", "crc", "category",
)


def apply(state: State, event: Event) -> State:
    """Fold one event into ``state`` and return it."""
    _apply(event, state)
    return state


def project(state: State, events: Iterable[Event]) -> State:
    """
    Fold ``events`` into ``state`` in order (a loop over :func:`apply`).

    Runs of consecutive interactions and impressions go to the compiled kernel in one
    call; the other event types (rare) are dispatched one by one.
    """
    dispatch = _apply.dispatch
    cache: dict[type, Callable[[Event, State], None]] = {}
    run: list[Interaction | ItemsShown] = []
    for event in events:
        cls = type(event)
        if cls in _KERNEL_TYPES:
            run.append(event)  # type: ignore[arg-type]
            continue
        if run:
            _fold_run(state, run)
            run = []
        fn = cache.get(cls)
        if fn is None:
            fn = cache[cls] = dispatch(cls)
        fn(event, state)
    if run:
        _fold_run(state, run)
    return state


@singledispatch
def _apply(event: Event, state: State) -> None:  # noqa: ARG001 - dispatch signature
    msg = f"type: no fold rule for {type(event).__name__}"
    raise TypeError(msg)


@_apply.register
def _interaction(event: Interaction, s: State) -> None:
    _fold_run(s, [event])


@_apply.register
def _shown(event: ItemsShown, s: State) -> None:
    _fold_run(s, [event])


def _fold_run(s: State, run: list[Interaction | ItemsShown]) -> None:
    """
    Map ids to dense indices in event order (growing the arrays first), then fold the
    run in the kernel. An impression of m items becomes m rows of code 8; its first
    row carries weight 1 (count the impression once for the user), the others 0.
    """
    shown = sum(type(e) is ItemsShown for e in run)
    if not shown:
        _fold_interactions_only(s, run)  # type: ignore[arg-type]
    elif shown == len(run):
        _fold_impressions_only(s, run)  # type: ignore[arg-type]
    else:
        _fold_mixed(s, run)


def _fold_mixed(s: State, run: list[Interaction | ItemsShown]) -> None:
    """:func:`_fold_run` for a run of interactions and impressions, event by event."""
    user_index, item_index = s.user_index, s.item_index
    by_code = s.weight_by_code
    neutral = s.config.rating_neutral
    users: list[int] = []
    items: list[int] = []
    codes: list[int] = []
    times: list[float] = []
    weights: list[float] = []
    for event in run:
        u = user_index.get(event.user)
        if u is None:
            u = s.user_slot(event.user)
        if type(event) is ItemsShown:
            first = 1.0
            for item in event.items:
                i = item_index.get(item)
                items.append(s.item_slot(item) if i is None else i)
                weights.append(first)
                first = 0.0
            n = len(event.items)
            users += [u] * n
            codes += [_IMPRESSION] * n
            times += [event.ts] * n
            continue
        i = item_index.get(event.item)  # type: ignore[union-attr]
        items.append(s.item_slot(event.item) if i is None else i)  # type: ignore[union-attr]
        users.append(u)
        code = event.code
        codes.append(code)
        times.append(event.ts)
        weights.append(by_code[code] * (event.value - neutral) if code == _RATING  # type: ignore[union-attr, operator]
                       else by_code[code])
    _kernel(s, users, items, codes, times, weights)


def _fold_impressions_only(s: State, run: list[ItemsShown]) -> None:
    """
    :func:`_fold_run` for a run of impressions only (the daemon's own groups), with
    comprehensions instead of a loop: about half the time per impression, which the
    writer thread spends holding the GIL. Users first, then items, as in
    :func:`_fold_interactions_only`, so new ids get the same indices as the loop gives.
    """
    get = s.user_index.get
    run_users = [get(e.user) for e in run]
    if None in run_users:
        run_users = [s.user_slot(e.user) if u is None else u
                     for u, e in zip(run_users, run, strict=True)]
    get = s.item_index.get
    shown = [item for e in run for item in e.items]
    items = [get(i) for i in shown]
    if None in items:
        items = [s.item_slot(i) if x is None else x for x, i in zip(items, shown, strict=True)]
    sizes = [len(e.items) for e in run]
    users = [u for u, n in zip(run_users, sizes, strict=True) for _ in range(n)]
    times = [e.ts for e, n in zip(run, sizes, strict=True) for _ in range(n)]
    weights = [1.0 if k == 0 else 0.0 for n in sizes for k in range(n)]
    _kernel(s, users, items, [_IMPRESSION] * len(items), times, weights)


def _fold_interactions_only(s: State, run: list[Interaction]) -> None:
    """
    :func:`_fold_run` for a run without impressions, with comprehensions instead of a
    loop. Users and items are separate index spaces, so resolving all users first
    and then all items creates each in the same order as the loop would.
    """
    get = s.user_index.get
    users = [get(e.user) for e in run]
    if None in users:
        users = [s.user_slot(e.user) if u is None else u for u, e in zip(users, run, strict=True)]
    get = s.item_index.get
    items = [get(e.item) for e in run]
    if None in items:
        items = [s.item_slot(e.item) if i is None else i for i, e in zip(items, run, strict=True)]
    by_code = s.weight_by_code
    codes = [e.code for e in run]
    if _RATING in codes:
        neutral = s.config.rating_neutral
        weights = [by_code[e.code] * (e.value - neutral) if e.code == _RATING  # type: ignore[operator]
                   else by_code[e.code] for e in run]
    else:
        weights = [by_code[c] for c in codes]
    _kernel(s, users, items, codes, [e.ts for e in run], weights)


def _kernel(s: State, users: list[int], items: list[int], codes: list[int],  # noqa: PLR0913, PLR0917
            times: list[float], weights: list[float]) -> None:
    fold_interactions(
        np.array(users, dtype=np.int64), np.array(items, dtype=np.int64),
        np.array(codes, dtype=np.int64), np.array(times, dtype=np.float64),
        np.array(weights, dtype=np.float64), *s.columns(_KERNEL_COLUMNS),
        s.L, s.K, s.P, s.inv_half_life)


@_apply.register
def _item(event: ItemUpdated, s: State) -> None:
    i = s.item_slot(event.item)
    fields = s.item_fields.setdefault(i, {})
    fields.update(event.fields)
    category = fields.get("category")
    if isinstance(category, str):
        s.category[i] = s.category_slot(category)
    created = fields.get("created_at")  # the decoder checked it is a number
    if isinstance(created, int | float) and not isinstance(created, bool):
        s.created_at[i] = float(created)


@_apply.register
def _forget(event: UserForgotten, s: State) -> None:
    s.drop_user(event.user)
