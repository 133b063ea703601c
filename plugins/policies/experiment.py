"""
``experiment``: A/B tests and team-draft interleaving of ranking arms.

An experiment has a ``name`` and two or more ``arms``. Each arm is a ranking of its
own: a chain of ranking policies (with their own parameters, independent of the
daemon's ``[plugins.<name>]`` tables, so two arms may run ``mmr`` with different
``lambda_``) and, optionally, a model file of its own that re-scores the candidates
before its policies run.

``mode = "ab"``
    Each user is assigned to one arm by hashing the experiment's name with the
    user's stored id (the pseudonym, when ``pseudonymize`` runs): SHA-256, the first
    8 bytes as a fraction of 2^64, cut by the arms' shares. Nothing is stored for
    it, so the arm is the same across restarts and across hosts sharing the key, and
    a new experiment name reshuffles everyone independently of the last.
``mode = "interleave"``
    Two arms, both run on every request, merged by team-draft interleaving
    (Radlinski, Kurup and Joachims, CIKM 2008): in each round the team with fewer
    picks so far (a coin flip when even) adds its best item not yet shown. The
    merged list carries each item's team, so a click credits the arm that put the
    item there; a ranking is won by the arm whose items got more of its clicks.

Every answer records the experiment, the arm (A/B) or the teams of the shown
positions (interleaving) in its impression's ``context`` (`PolicyOutput.record`), so
clicks that carry the answer's ``ranking_id`` are attributed from the log alone:
:func:`experiment_report` (``rerankd experiments``) reads impressions and clicks and
reports, per experiment, per arm: impressions, clicks, clicked rankings, CTR with a
95% Wilson interval and a two-proportion z-test against the first arm; for
interleaving, wins, ties and a two-sided sign test. The report needs
``[ranking].record_impressions`` (the default) and clicks sent with their
``ranking_id``.

Place ``experiment`` last among the policies: a policy after it would reorder the
merged list and blur the attribution. Scores are carried by position (see
:mod:`plugins.policies._common`); each item's explain entry names its arm (or team).
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

import numpy as np

from eventstore.schema import Clicked, Event, ItemsShown
from plugins.base import PluginError, PolicyInput, PolicyOutput, RankingPolicy
from plugins.chain import run_policies
from plugins.context import PluginContext
from plugins.policies._common import (
    carried_scores,
    check_number,
    check_unknown,
    output,
    param_error,
)

if TYPE_CHECKING:
    from kernels.runtime import Ranker

__all__ = [
    "ExperimentPolicy",
    "assign",
    "experiment_report",
    "team_draft",
]

_NAME: Final = "experiment"
_KNOWN: Final = ("name", "mode", "arms", "seed")
_ARM_KNOWN: Final = ("name", "share", "policies", "params", "model")
_LABEL: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MODES: Final = ("ab", "interleave")
#: Keys of an impression's context that this policy writes.
EXPERIMENT_KEY: Final = "experiment"
ARM_KEY: Final = "arm"
TEAMS_KEY: Final = "teams"
ARMS_KEY: Final = "arms"


# --- assignment and interleaving (pure) ----------------------------------------------


def bucket(experiment: str, user: str) -> float:
    """The user's stable position in ``[0, 1)`` for ``experiment`` (SHA-256 of both)."""
    digest = hashlib.sha256(f"{experiment}\x00{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign(experiment: str, user: str, shares: Sequence[float]) -> int:
    """
    The arm (index into ``shares``) of ``user`` in ``experiment``.

    ``shares`` are positive weights, normalised here; the same inputs always give the
    same arm.
    """
    total = math.fsum(shares)
    point = bucket(experiment, user) * total
    edge = 0.0
    for arm, share in enumerate(shares):
        edge += share
        if point < edge:
            return arm
    return len(shares) - 1  # float rounding at the very top


def team_draft(a: Sequence[int], b: Sequence[int],
               coin: np.random.Generator) -> tuple[list[int], list[int]]:  # fmt: skip
    """
    Team-draft interleaving of rankings ``a`` and ``b`` (item indices, best first).

    Returns ``(merged, teams)``: every item of either ranking once, and for each
    position 0 if ranking ``a`` contributed it, 1 if ``b`` did. The team with fewer
    picks picks next; on a tie a coin flip decides; a team whose ranking is used up
    leaves the picks to the other.
    """
    chosen: set[int] = set()
    merged: list[int] = []
    teams: list[int] = []
    picks = [0, 0]
    at = [0, 0]
    lists = (a, b)
    while True:
        for t in (0, 1):
            seq = lists[t]
            while at[t] < len(seq) and seq[at[t]] in chosen:
                at[t] += 1
        left = [at[0] < len(a), at[1] < len(b)]
        if not (left[0] or left[1]):
            return merged, teams
        if not left[0]:
            team = 1
        elif not left[1]:
            team = 0
        elif picks[0] != picks[1]:
            team = 0 if picks[0] < picks[1] else 1
        else:
            team = int(coin.random() < 0.5)
        item = lists[team][at[team]]
        chosen.add(item)
        merged.append(item)
        teams.append(team)
        picks[team] += 1


# --- arms ----------------------------------------------------------------------------


class _ArmModel:
    """
    An arm's own model: re-scores the candidates with its user vector and item table.

    The score is the arm model's dot product plus the request's feature part
    (`PolicyInput.features`), so arms differ only in the model. The user's vector is
    encoded on every request (about a millisecond on a CPU): nothing about a user is
    cached here, so an erasure leaves nothing behind in the policy.
    """

    def __init__(self, path: Path, where: str) -> None:
        from kernels.modelfile import ModelFileError, load_model  # noqa: PLC0415 - jax: only when used
        from kernels.runtime import Ranker  # noqa: PLC0415

        try:
            loaded = load_model(path)
        except ModelFileError as e:
            raise PluginError(f"{where}: {e}") from e
        self.path = path
        self.ranker: Ranker = Ranker(loaded.params, loaded.config, batch_buckets=(1,))
        self.ranker.warmup(scorers=False)
        self.index = {item: i + 1 for i, item in enumerate(loaded.manifest.vocabulary)}

    def rescore(self, request: PolicyInput) -> tuple[PolicyInput, np.ndarray]:
        """The request re-scored and re-sorted by this model, and the order applied."""
        ranker, index = self.ranker, self.index
        table = ranker.item_table
        max_len = ranker.config.max_len
        seq = np.zeros((1, max_len), np.int32)
        if request.user_row >= 0:
            ids = request.state.item_ids
            mine = [index.get(ids[r], 0) for r in request.state.sequence(request.user_row).tolist()
                    if r < len(ids)]  # fmt: skip
            mine = [m for m in mine if m][-max_len:]
            if mine:
                seq[0, -len(mine):] = mine
        model_idx = np.fromiter((index.get(item, 0) for item in request.items), np.int64,
                                len(request.items))  # fmt: skip
        embeddings = table[model_idx]
        dot = embeddings @ ranker.encode(seq)[0] if seq.any() else np.zeros(len(model_idx))
        features = request.features if request.features is not None else 0.0
        scores = (dot + features).astype(np.float32)
        order = np.argsort(-scores, kind="stable")
        return replace(
            request, items=[request.items[i] for i in order.tolist()], scores=scores[order],
            rows=request.rows[order], embeddings=embeddings[order],
            features=None if request.features is None else request.features[order],
        ), order  # fmt: skip


@dataclass(frozen=True, slots=True)
class Arm:
    """One arm: its name, share of users (A/B), policies, and optional model."""

    name: str
    share: float
    policies: tuple[RankingPolicy, ...]
    model: _ArmModel | None = None

    def rank(self, request: PolicyInput) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """(order into ``request.items``, scores, explain entries) of this arm."""
        shuffle = None
        if self.model is not None:
            request, shuffle = self.model.rescore(request)
        chain = run_policies(self.policies, request)
        order = chain.kept if shuffle is None else shuffle[chain.kept]
        return order, np.asarray(chain.request.scores, np.float32), chain.explain


# --- the policy ----------------------------------------------------------------------


class ExperimentPolicy:
    """
    An A/B test or an interleaving of ranking arms (see the module docstring).

    Args:
        name: the experiment's name (letters, digits, ``._-``; at most 64): part of the
            assignment hash and of every record.
        mode: ``"ab"`` (default) or ``"interleave"`` (exactly two arms).
        arms: two or more tables ``{name, share = 1, policies = [], params = {},
            model = path}``; ``params`` holds one table per policy of the arm.
        seed: seed of the interleaving coin (>= 0); random when absent.
        context: the daemon's plugin context (builds the arms' policies).

    Raises:
        PluginError: a parameter is missing, unknown or out of range, an arm's policy
            or model fails to build; the message names ``[plugins.experiment]``'s key.

    .. versionadded:: 0.1.0
    """

    name: ClassVar[str] = _NAME

    def __init__(self, *, name: Any = None, mode: Any = "ab", arms: Any = None,
                 seed: Any = None, context: PluginContext | None = None,
                 **unknown: Any) -> None:  # fmt: skip
        check_unknown(_NAME, unknown, _KNOWN)
        self.experiment = _label("name", name)
        if mode not in _MODES:
            raise param_error(_NAME, "mode", f"must be one of {', '.join(_MODES)}", mode)
        self.mode: str = mode
        self.arms = _arms(arms, mode, context)
        self._shares = [arm.share for arm in self.arms]
        if seed is not None:
            seed = int(check_number(_NAME, "seed", seed, lo=0, integer=True))
        self._coin = np.random.default_rng(seed)
        self._coin_lock = threading.Lock()
        self._arm_names = ",".join(arm.name for arm in self.arms)

    def arm_of(self, user: str) -> Arm:
        """The arm ``user`` (a stored id) is served by in A/B mode."""
        return self.arms[assign(self.experiment, user, self._shares)]

    def warm_up(self, dim: int, *, max_candidates: int, k: int) -> None:
        """Warm up the arms' policies that compile something (MMR)."""
        for arm in self.arms:
            for policy in arm.policies:
                warm = getattr(policy, "warm_up", None)
                if warm is not None:
                    warm(dim, max_candidates=max_candidates, k=k)

    def apply(self, request: PolicyInput) -> PolicyOutput:
        """The arm's ranking (A/B) or the two arms interleaved, with the record to keep."""
        if self.mode == "ab":
            return self._ab(request)
        return self._interleave(request)

    def _ab(self, request: PolicyInput) -> PolicyOutput:
        arm = self.arm_of(request.user)
        order, scores, explain = arm.rank(request)
        tag = {"name": self.experiment, "arm": arm.name}
        return PolicyOutput(order, scores, [{**e, _NAME: tag} for e in explain],
                            {EXPERIMENT_KEY: self.experiment, ARM_KEY: arm.name})  # fmt: skip

    def _interleave(self, request: PolicyInput) -> PolicyOutput:
        first, second = self.arms
        order_a, _, _ = first.rank(request)
        order_b, _, _ = second.rank(request)
        with self._coin_lock:
            merged, teams = team_draft(order_a.tolist(), order_b.tolist(), self._coin)
        where = ({int(i): r for r, i in enumerate(order_a.tolist())},
                 {int(i): r for r, i in enumerate(order_b.tolist())})  # fmt: skip
        explain = [
            {_NAME: {"name": self.experiment, "team": self.arms[t].name,
                     "rank_in_arms": [where[0].get(i), where[1].get(i)]}}
            for i, t in zip(merged, teams, strict=True)
        ]  # fmt: skip
        out = output(np.asarray(merged, np.int64),
                     carried_scores(request.scores, len(merged)), explain)  # fmt: skip
        # one character per shown position, as the impression keeps up to 256 items
        record = {EXPERIMENT_KEY: self.experiment, ARMS_KEY: self._arm_names,
                  TEAMS_KEY: "".join("ab"[t] for t in teams[:256])}  # fmt: skip
        return replace(out, record=record)


def _label(key: str, value: Any) -> str:
    if not isinstance(value, str) or not _LABEL.fullmatch(value):
        rule = "must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        raise param_error(_NAME, key, rule, value)
    return value


def _arms(arms: Any, mode: str, context: PluginContext | None) -> tuple[Arm, ...]:
    if not isinstance(arms, list) or len(arms) < 2:
        raise param_error(_NAME, "arms", "must be a list of at least two arm tables", arms)
    if mode == "interleave" and len(arms) != 2:
        raise param_error(_NAME, "arms", "interleave takes exactly two arms", len(arms))
    built: list[Arm] = []
    for n, table in enumerate(arms):
        key = f"arms[{n}]"
        if not isinstance(table, Mapping):
            raise param_error(_NAME, key, "must be a table {name, share, policies, params, model}")
        check_unknown(_NAME, {f"{key}.{k}": v for k, v in table.items() if k not in _ARM_KNOWN},
                      [f"{key}.{k}" for k in _ARM_KNOWN])  # fmt: skip
        arm_name = _label(f"{key}.name", table.get("name"))
        if any(arm.name == arm_name for arm in built):
            raise param_error(_NAME, f"{key}.name", "must differ from the other arms'", arm_name)
        share = float(check_number(_NAME, f"{key}.share", table.get("share", 1.0), lo=0,
                                   lo_open=True))  # fmt: skip
        policies = _arm_policies(key, table, context)
        model = None
        if table.get("model") is not None:
            path = table["model"]
            if not isinstance(path, str) or not path:
                raise param_error(_NAME, f"{key}.model", "must be the path of a model file", path)
            model = _ArmModel(Path(path), f"[plugins.{_NAME}].{key}.model")
        built.append(Arm(arm_name, share, policies, model))
    return tuple(built)


def _arm_policies(key: str, table: Mapping[str, Any],
                  context: PluginContext | None) -> tuple[RankingPolicy, ...]:  # fmt: skip
    names = table.get("policies", [])
    if not isinstance(names, list) or not all(isinstance(x, str) and x for x in names):
        raise param_error(_NAME, f"{key}.policies", "must be a list of policy names", names)
    params = table.get("params", {})
    if not isinstance(params, Mapping) or not all(isinstance(v, Mapping) for v in params.values()):
        raise param_error(_NAME, f"{key}.params", "must be a table of tables, one per policy")
    stray = sorted(set(params) - set(names))
    if stray:
        raise param_error(_NAME, f"{key}.params.{stray[0]}", "names a policy the arm does not list")
    if not names:
        return ()
    if context is None or context.build_policies is None:
        raise param_error(_NAME, f"{key}.policies", "needs the daemon's plugin registry "
                          "(build the experiment through plugins.registry)")  # fmt: skip
    try:
        return context.build_policies(names, params)
    except PluginError as e:
        raise PluginError(f"[plugins.{_NAME}].{key}: {e}") from e


# --- the report ----------------------------------------------------------------------


@dataclass(slots=True)
class _Shown:
    experiment: str
    arm: str | None  # A/B
    teams: str | None  # interleaving: "ab..." per position
    arms: tuple[str, ...]
    items: dict[str, int]  # item -> position
    clicked: set[int]


def experiment_report(events: Iterable[Event]) -> dict[str, Any]:
    """
    Per experiment, what its impressions and the clicks attributed to them say.

    ``events`` in log order. An impression carrying an experiment in its ``context``
    (as the ``experiment`` policy records it) opens a ranking; a ``click`` with that
    ranking's ``ranking_id`` on one of its items, logged before or after the
    impression, is attributed to it (to the arm, or to the team that contributed the
    item); clicks without a known ranking_id, or on items the ranking did not show,
    are left out. Several clicks on one item of a ranking count once.

    Returns:
        ``{"experiments": [...]}``, one entry per experiment name, sorted by name; an
        A/B entry has per-arm ``impressions`` (rankings shown), ``clicks``,
        ``clicked`` (rankings with a click), ``ctr`` (clicked / impressions) and
        ``ctr_ci95`` (Wilson), and per arm after the first a ``vs_first`` comparison
        (``lift``, ``z``, ``p_value``, two-sided); an interleaving entry has
        ``impressions``, ``clicked``, ``wins`` per arm, ``ties``, ``preference``
        ((wins_a - wins_b) / clicked rankings) and ``p_value`` (two-sided sign test
        on the wins).
    """
    shown: dict[str, _Shown] = {}
    clicks: list[tuple[str, str]] = []  # (ranking_id, item), attributed once all are read
    for event in events:
        if isinstance(event, ItemsShown) and event.ranking_id is not None:
            record = _shown(event)
            if record is not None:
                shown[event.ranking_id] = record
        elif isinstance(event, Clicked) and event.ranking_id is not None:
            clicks.append((event.ranking_id, event.item))
    for ranking_id, item in clicks:
        # a click may be logged before its impression: impressions are flushed
        # a few milliseconds after the answer, and a client can be quicker
        ranking = shown.get(ranking_id)
        position = None if ranking is None else ranking.items.get(item)
        if ranking is not None and position is not None:
            ranking.clicked.add(position)
    return {"experiments": _summaries(shown.values())}


def _shown(event: ItemsShown) -> _Shown | None:
    context = event.context or {}
    name = context.get(EXPERIMENT_KEY)
    if not isinstance(name, str):
        return None
    arm, teams = context.get(ARM_KEY), context.get(TEAMS_KEY)
    arms = tuple(str(context.get(ARMS_KEY, "")).split(",")) if teams is not None else ()
    items: dict[str, int] = {}
    for position, item in enumerate(event.items):
        items.setdefault(item, position)
    if not isinstance(arm, str) and not isinstance(teams, str):
        return None
    return _Shown(name, arm if isinstance(arm, str) else None,
                  teams if isinstance(teams, str) else None, arms, items, set())  # fmt: skip


def _summaries(rankings: Iterable[_Shown]) -> list[dict[str, Any]]:
    """One entry per experiment name and mode (a name reused across modes gets two)."""
    groups: dict[tuple[str, str], list[_Shown]] = {}
    for ranking in rankings:
        mode = "ab" if ranking.arm is not None else "interleave"
        groups.setdefault((ranking.experiment, mode), []).append(ranking)
    out = []
    for name, mode in sorted(groups):
        group = groups[name, mode]
        summary = {"arms": _ab_summary(group)} if mode == "ab" else _interleave_summary(group)
        out.append({"name": name, "mode": mode, **summary})
    return out


def _ab_summary(rankings: list[_Shown]) -> list[dict[str, Any]]:
    counts: dict[str, list[int]] = {}  # arm -> [impressions, clicks, clicked rankings]
    for r in rankings:
        c = counts.setdefault(r.arm or "", [0, 0, 0])
        c[0] += 1
        c[1] += len(r.clicked)
        c[2] += bool(r.clicked)
    arms = []
    first: tuple[int, int] | None = None
    for arm, (n, clicks, clicked) in counts.items():
        row: dict[str, Any] = {"arm": arm, "impressions": n, "clicks": clicks,
                               "clicked": clicked, "ctr": round(clicked / n, 6),
                               "ctr_ci95": [round(x, 6) for x in wilson(clicked, n)]}  # fmt: skip
        if first is None:
            first = (clicked, n)
        else:
            row["vs_first"] = two_proportion_test(first[0], first[1], clicked, n)
        arms.append(row)
    return arms


def _interleave_summary(rankings: list[_Shown]) -> dict[str, Any]:
    arms = rankings[0].arms if rankings[0].arms and len(rankings[0].arms) == 2 else ("a", "b")
    wins, ties, clicked = [0, 0], 0, 0
    for r in rankings:
        if not r.clicked:
            continue
        clicked += 1
        teams = r.teams or ""
        credit = [0, 0]
        for position in r.clicked:
            if position < len(teams):
                credit["ab".index(teams[position])] += 1
        if credit[0] == credit[1]:
            ties += 1
        else:
            wins[0 if credit[0] > credit[1] else 1] += 1
    return {
        "arms": list(arms), "impressions": len(rankings), "clicked": clicked,
        "wins": {arms[0]: wins[0], arms[1]: wins[1]}, "ties": ties,
        "preference": round((wins[0] - wins[1]) / clicked, 6) if clicked else 0.0,
        "p_value": round(sign_test(wins[0], wins[1]), 6),
    }  # fmt: skip


# --- statistics ----------------------------------------------------------------------


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def two_proportion_test(s1: int, n1: int, s2: int, n2: int) -> dict[str, float]:
    """Second proportion against the first: relative lift, pooled z, two-sided p-value."""
    from scipy.stats import norm  # noqa: PLC0415 - scipy only for reports

    p1 = s1 / n1 if n1 else 0.0
    p2 = s2 / n2 if n2 else 0.0
    pooled = (s1 + s2) / (n1 + n2) if n1 + n2 else 0.0
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2)) if n1 and n2 else 0.0
    z = (p2 - p1) / se if se > 0 else 0.0
    return {"lift": round((p2 - p1) / p1, 6) if p1 else 0.0, "z": round(z, 6),
            "p_value": round(float(2 * norm.sf(abs(z))), 6)}  # fmt: skip


def sign_test(wins_a: int, wins_b: int) -> float:
    """Two-sided exact binomial (sign) test of ``wins_a`` against ``wins_b``; 1 with none."""
    from scipy.stats import binomtest  # noqa: PLC0415

    n = wins_a + wins_b
    return float(binomtest(wins_a, n, 0.5).pvalue) if n else 1.0
