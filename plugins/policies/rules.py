"""
``rules``: business rules. Filter, boost and bury, cap categories, pin.

In this order:

1. Filter. Items whose ``available`` field is ``false`` (``filter_unavailable``) and
   items among the user's remembered purchases (``filter_purchased``; the state keeps
   the last ``purchases_per_user`` of them) are removed and never appear.
2. Boost and bury. Each rule ``{field, value, by}`` adds ``by`` (boost) or subtracts it
   (bury) from the score of every item whose ``field`` equals ``value`` (for a list
   field such as ``tags``: contains it); ``category`` reads the state's category
   column. When any item matched, the items are sorted by the adjusted score, ties
   in incoming order; otherwise the incoming order stands. ``by`` is in the units of
   the incoming scores (after ``blend``: a fraction of the ``[0, 1]`` scale).
3. Category cap. With ``max_per_category = c``, the top ``k`` (the request's k) holds
   at most ``c`` items of any one category; the items over the cap move below
   position k, in their order. When the list is too short to reach past position k
   without them, they are dropped: the cap is a hard rule. Pinned items in the top
   k count towards their category's cap, but are never moved for it (pins win).
   Items without a category are not capped.
4. Pins. ``pins = {item = position}`` (0 is the top) puts each pinned item that is
   among the candidates and not filtered at its position. A position past the end of
   the list puts the item as far down as the in-range pins allow.

Scores: position p carries the p-th best of the kept items' adjusted scores (see
:mod:`plugins.policies._common`). Explain entries are ``{"rules": {...}}`` with
``pinned`` (the requested position), ``boosted``/``buried`` (the total ``by``) and
``score`` (the adjusted score) or ``capped`` (moved below the top k), as they apply.
Filtered items have no entry (they are gone). Put ``rules`` last, so that filters and
pins hold in the response.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import numpy as np

from plugins.base import PolicyInput, PolicyOutput
from plugins.policies._common import (
    carried_scores,
    check_bool,
    check_number,
    check_unknown,
    column,
    field_values,
    output,
    param_error,
)

__all__ = ["RulesPolicy"]

_NAME: Final = "rules"
_KNOWN: Final = (
    "filter_unavailable",
    "filter_purchased",
    "pins",
    "boost",
    "bury",
    "max_per_category",
)
_RULE_KEYS: Final = ("field", "value", "by")
_DICT_LOOKUP_FROM: Final = 4  # pins above this many: one id -> index dict, not list.index


@dataclass(frozen=True, slots=True)
class _FieldRule:
    """One boost (``delta > 0``) or bury (``delta < 0``) rule."""

    field: str
    value: str | float  # bool and int are numbers to the type checker
    delta: float
    matcher: Callable[[list[Any]], list[bool]]


class RulesPolicy:
    """
    Business rules: filters, boost and bury by item field, a category cap, pins.

    Args:
        filter_unavailable: remove items whose ``available`` field is ``false``.
        filter_purchased: remove items the user purchased (the last
            ``purchases_per_user`` purchases the state remembers).
        pins: ``{item id: position}``, positions 0-based and distinct.
        boost: a list of ``{field, value, by}`` tables, ``by > 0`` added to the score.
        bury: the same, ``by`` subtracted.
        max_per_category: at most this many items per category in the top k (off
            when absent).

    Raises:
        PluginError: a parameter is malformed, out of range or unknown.

    .. versionadded:: 0.1.0
    """

    name: ClassVar[str] = _NAME

    def __init__(
        self,
        *,
        filter_unavailable: bool = True,
        filter_purchased: bool = True,
        pins: Mapping[str, int] | None = None,
        boost: Sequence[Mapping[str, Any]] = (),
        bury: Sequence[Mapping[str, Any]] = (),
        max_per_category: int | None = None,
        **unknown: Any,
    ) -> None:
        check_unknown(_NAME, unknown, _KNOWN)
        self.filter_unavailable = check_bool(_NAME, "filter_unavailable", filter_unavailable)
        self.filter_purchased = check_bool(_NAME, "filter_purchased", filter_purchased)
        self.pins = _check_pins(pins or {})
        self.rules = (*_check_rules("boost", boost, 1.0), *_check_rules("bury", bury, -1.0))
        self.max_per_category = (
            None
            if max_per_category is None
            else int(check_number(_NAME, "max_per_category", max_per_category, lo=1, integer=True))
        )

    def __repr__(self) -> str:
        return (
            f"RulesPolicy(filter_unavailable={self.filter_unavailable}, "
            f"filter_purchased={self.filter_purchased}, pins={len(self.pins)}, "
            f"rules={len(self.rules)}, max_per_category={self.max_per_category})"
        )

    def apply(self, request: PolicyInput) -> PolicyOutput:
        """The kept candidates, boosted, buried, capped and pinned."""
        n = len(request.items)
        keep = self._keep(request)
        adjusted = np.where(
            np.isnan(request.scores), -np.inf, np.asarray(request.scores, np.float64)
        )
        boost, bury = self._boost_bury(request)
        touched = (boost > 0) | (bury > 0)
        seq = np.flatnonzero(keep)
        if touched[seq].any():
            adjusted = adjusted + boost - bury
            seq = seq[np.argsort(-adjusted[seq], kind="stable")]
        pin_idx, pin_pos = self._present_pins(request.items, keep)
        pinned = np.zeros(n, bool)
        pinned[pin_idx] = True
        rest = seq[~pinned[seq]]
        capped = np.zeros(n, bool)
        if self.max_per_category is not None:
            rest, capped = self._cap(request, rest, pin_idx, pin_pos)
        order = _place(rest, pin_idx, pin_pos)
        explain: list[dict[str, Any]] = [{"rules": {}} for _ in range(len(order))]
        moved = np.flatnonzero(touched[order] | capped[order])
        for k, i in zip(moved.tolist(), order[moved].tolist(), strict=True):
            explain[k]["rules"] = _moved(boost[i], bury[i], adjusted[i], capped=capped[i])
        requested = dict(zip(pin_idx.tolist(), pin_pos.tolist(), strict=True))
        for k in np.flatnonzero(pinned[order]).tolist():
            explain[k]["rules"]["pinned"] = requested[int(order[k])]
        return output(order, carried_scores(adjusted[order], len(order)), explain)

    def _keep(self, request: PolicyInput) -> np.ndarray:
        """Mask ``[N]`` of the candidates that pass the filters."""
        keep = np.ones(len(request.items), bool)
        if self.filter_unavailable:
            available = field_values(request.state, request.rows, "available")
            keep &= np.array([v is not False for v in available], bool)
        u = request.user_row
        if self.filter_purchased and u >= 0:
            p = request.state.P
            bought = request.state.array("bought")[u * p : (u + 1) * p]
            bought = bought[bought >= 0]
            keep &= ~(request.rows[:, None] == bought[None, :]).any(axis=1)
        return keep

    def _boost_bury(self, request: PolicyInput) -> tuple[np.ndarray, np.ndarray]:
        """float64 ``[N]`` twice: the sums of the boosts and of the buries matching each item."""
        boost, bury = np.zeros(len(request.items)), np.zeros(len(request.items))
        for rule in self.rules:
            hit = _matches(rule, request)
            if rule.delta > 0:
                boost += np.where(hit, rule.delta, 0.0)
            else:
                bury -= np.where(hit, rule.delta, 0.0)
        return boost, bury

    def _present_pins(
        self, items: Sequence[str], keep: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(candidate indices, requested positions) of the pins present and kept."""
        if not self.pins:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        if len(self.pins) > _DICT_LOOKUP_FROM:
            index: dict[str, int] = {}
            for k, item in enumerate(items):
                index.setdefault(item, k)
            found = [(index[i], p) for i, p in self.pins.items() if i in index]
        else:
            found = [(k, p) for i, p in self.pins.items() if (k := _index(items, i)) >= 0]
        found = [(k, p) for k, p in found if keep[k]]
        idx = np.array([k for k, _ in found], np.int64)
        pos = np.array([p for _, p in found], np.int64)
        return idx, pos

    def _cap(
        self, request: PolicyInput, rest: np.ndarray, pin_idx: np.ndarray, pin_pos: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """
        (``rest`` reordered or shortened so the cap holds in the top k, capped mask).

        ``rest`` fills the top k slots the pins leave free, in order. An item is
        admitted while fewer than ``cap - pinned[c]`` earlier items of its category
        ``c`` were (``pinned[c]``: pins of ``c`` placed in the top k); the first free-slot
        count of admitted items form the head, everything else follows in order.
        """
        cap, k = self.max_per_category, request.k
        cats = column(request.state, "category", request.rows, fill=-1).astype(np.int64)
        pinned_top = cats[pin_idx[pin_pos < k]]
        slots = max(k - len(pinned_top), 0)
        rc = cats[rest]
        allowance = cap - _counts_of(rc, pinned_top[pinned_top >= 0])
        admitted = (rc < 0) | (_rank_in_group(rc) < allowance)
        capped = np.zeros(len(request.items), bool)
        adm = np.flatnonzero(admitted)
        if len(adm) < slots:  # the over-cap items would land in the top k: drop them
            return rest[admitted], capped
        head = adm[:slots]
        if slots:  # skipped on the way to the last head item: moved below the top k
            capped[rest[np.flatnonzero(~admitted[: head[-1]])]] = True
        in_head = np.zeros(len(rest), bool)
        in_head[head] = True
        return np.concatenate([rest[in_head], rest[~in_head]]), capped


def _place(rest: np.ndarray, pin_idx: np.ndarray, pin_pos: np.ndarray) -> np.ndarray:
    """
    The final order: ``rest`` with the pins put in.

    Each pin goes to its position when that is inside the list; the pins past the end
    go to the last free slots (in position order); ``rest`` fills the others, in order.
    """
    m = len(rest) + len(pin_idx)
    order = np.full(m, -1, np.int64)
    inside = pin_pos < m
    order[pin_pos[inside]] = pin_idx[inside]
    free = np.flatnonzero(order < 0)
    beyond = pin_idx[~inside][np.argsort(pin_pos[~inside], kind="stable")]
    cut = len(free) - len(beyond)
    order[free[cut:]] = beyond
    order[free[:cut]] = rest
    return order


def _rank_in_group(groups: np.ndarray) -> np.ndarray:
    """int64 ``[M]``: how many earlier entries of ``groups`` have the same value."""
    if not len(groups):
        return np.zeros(0, np.int64)
    by_group = np.argsort(groups, kind="stable")
    sorted_groups = groups[by_group]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    lengths = np.diff(np.r_[starts, len(groups)])
    ranks = np.arange(len(groups)) - np.repeat(starts, lengths)
    out = np.empty(len(groups), np.int64)
    out[by_group] = ranks
    return out


def _counts_of(values: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """int64 ``[M]``: how often each entry of ``values`` occurs in ``pool``."""
    if not len(pool):
        return np.zeros(len(values), np.int64)
    uniq, counts = np.unique(pool, return_counts=True)
    at = np.clip(np.searchsorted(uniq, values), 0, len(uniq) - 1)
    return np.where(uniq[at] == values, counts[at], 0)


def _matches(rule: _FieldRule, request: PolicyInput) -> np.ndarray:
    """Mask ``[N]`` of the candidates whose ``rule.field`` equals (or contains) its value."""
    if rule.field == "category":
        cat = request.state.category_index.get(rule.value) if isinstance(rule.value, str) else None
        if cat is None:
            return np.zeros(len(request.items), bool)
        return np.asarray(column(request.state, "category", request.rows, fill=-1) == cat)
    return np.array(rule.matcher(field_values(request.state, request.rows, rule.field)), bool)


def _value_matcher(want: str | float) -> Callable[[list[Any]], list[bool]]:
    """
    A function from field values to "equals ``want``, or is a list that contains it".

    Chosen once per rule, each a single comprehension (this runs per candidate on the
    request path). ``true == 1`` in Python, so a boolean rule matches only ``true`` or
    ``false`` and a number rule never matches a boolean.
    """
    if isinstance(want, bool):
        return lambda vs: [
            v is want or (v.__class__ is list and any(x is want for x in v)) for v in vs
        ]
    if isinstance(want, str):
        return lambda vs: [v == want or (v.__class__ is list and want in v) for v in vs]
    return lambda vs: [
        (v == want and v.__class__ is not bool)
        or (v.__class__ is list and any(x == want and x.__class__ is not bool for x in v))
        for v in vs
    ]


def _moved(
    boost: np.floating, bury: np.floating, adjusted: np.floating, *, capped: np.bool_
) -> dict[str, Any]:
    """The explain fields of an item that boosts, buries or the cap moved (plain floats)."""
    out: dict[str, Any] = {}
    if boost:
        out["boosted"] = float(boost)
    if bury:
        out["buried"] = float(bury)
    if boost or bury:
        out["score"] = float(adjusted)
    if capped:
        out["capped"] = True
    return out


def _index(items: Sequence[str], item: str) -> int:
    """The first index of ``item`` in ``items``, -1 when absent."""
    try:
        return items.index(item)
    except ValueError:
        return -1


def _check_pins(pins: Any) -> dict[str, int]:
    """``pins`` as ``{item id: position}`` with distinct positions >= 0."""
    if not isinstance(pins, Mapping):
        raise param_error(_NAME, "pins", "must be a table of item id = position", pins)
    seen: dict[int, str] = {}
    for item, pos in pins.items():
        if not isinstance(item, str) or not item:
            raise param_error(_NAME, "pins", "item ids must be non-empty strings", item)
        check_number(_NAME, f"pins.{item}", pos, lo=0, integer=True)
        if pos in seen:
            raise param_error(
                _NAME, f"pins.{item}", f"position {pos} is already taken by another pin"
            )
        seen[pos] = item
    return dict(pins)


def _check_rules(key: str, rules: Any, sign: float) -> list[_FieldRule]:
    """``rules`` (a list of ``{field, value, by}`` tables) as field rules with signed deltas."""
    if isinstance(rules, str | Mapping) or not isinstance(rules, Sequence):
        raise param_error(_NAME, key, "must be a list of {field, value, by} tables", rules)
    out = []
    for n, rule in enumerate(rules):
        where = f"{key}[{n}]"
        if not isinstance(rule, Mapping):
            raise param_error(_NAME, where, "must be a table {field, value, by}", rule)
        check_unknown(
            _NAME, {f"{where}.{k}": v for k, v in rule.items() if k not in _RULE_KEYS}, _RULE_KEYS
        )
        for k in _RULE_KEYS:
            if k not in rule:
                raise param_error(_NAME, f"{where}.{k}", "is required")
        field, value = rule["field"], rule["value"]
        if not isinstance(field, str) or not field:
            raise param_error(_NAME, f"{where}.field", "must be a non-empty string", field)
        if not isinstance(value, str | int | float):  # bool is an int
            raise param_error(_NAME, f"{where}.value", "must be a string, number or boolean", value)
        by = check_number(_NAME, f"{where}.by", rule["by"], lo=0, lo_open=True)
        out.append(_FieldRule(field, value, sign * float(by), _value_matcher(value)))
    return out
