"""
The real-time experiment behind ``rerankd replay``.

Does folding events in as they happen rank better than a state frozen at a cut-off?

Split. Per user, in order, the last ``holdout`` share of the interactions (at least
one; ``floor(holdout * n)`` otherwise) is held out; the rest is the history. Item
events (MovieLens genres) and every history interaction are folded into a
:class:`eventstore.State` first, in the data set's order.

Candidates. Each held-out interaction is ranked among its item and ``negatives``
items drawn uniformly, with replacement, from the items the model knows that the
user never interacted with (seeded; the same candidates in every mode). Held-out
interactions with an item the model does not know are skipped (counted).

Modes, all through the daemon's ranking path (:class:`daemon.ranking.Ranking`: user
vector from the state's recent items, dot product plus popularity / category
interest / freshness features, with the configured default weights):

- ``frozen``: every held-out interaction is ranked against the cut-off state.
- ``live``: held-out interactions are taken in time order (the data set's order on
  ties), in runs in which no user comes twice; each run is ranked, then folded in,
  and the daemon's vector refresher re-encodes its users, so every interaction is
  ranked with its user's state folded up to the moment before it -- the daemon's
  path: fold, refresh the user vector, rank. Other users' interactions of the same
  run are folded after it (they are simultaneous; they move item popularity only).
- ``online`` (when asked): ``live`` plus :class:`daemon.online.OnlineLearner`'s SGD
  steps on item biases after each round (from the vectors the refresh replaced),
  published before the next.

Per mode: NDCG@10 and HR@10 of the held-out item, and the relative lift of live (and
online) over frozen.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from daemon.protocol import Rank
from daemon.ranking import Ranking
from eventstore import FoldConfig, State, project
from eventstore.schema import Event, Interaction

if TYPE_CHECKING:
    from daemon.online import OnlineLearner
    from daemon.quality import Dataset

__all__ = ["HeldOut", "ReplaySplit", "replay", "split_for_replay"]

K: Final = 10
#: Requests per ranking call.
_BLOCK: Final = 256
#: The daemon's default feature weights (daemon/config.py, [ranking].weights).
DEFAULT_WEIGHTS: Final = (0.5, 1.0, 0.2)


@dataclasses.dataclass(frozen=True, slots=True)
class HeldOut:
    """One held-out interaction: its event, its position among the user's held-out ones."""

    event: Interaction
    round: int


@dataclasses.dataclass(frozen=True, slots=True)
class ReplaySplit:
    """The history to fold first, and the held-out interactions in order."""

    history: list[Event]
    held_out: list[HeldOut]
    users: int


def split_for_replay(events: Sequence[Event], holdout: float) -> ReplaySplit:
    """
    Split ``events`` as the module docstring says.

    Raises:
        ValueError: ``holdout`` outside (0, 1).

    """
    if not 0.0 < holdout < 1.0:
        msg = f"holdout: must be between 0 and 1 (exclusive), got {holdout}"
        raise ValueError(msg)
    per_user: dict[str, int] = {}
    for event in events:
        if isinstance(event, Interaction):
            per_user[event.user] = per_user.get(event.user, 0) + 1
    cut = {user: n - max(1, int(holdout * n)) for user, n in per_user.items()}
    seen: dict[str, int] = {}
    history: list[Event] = []
    held: list[HeldOut] = []
    for event in events:
        if not isinstance(event, Interaction):
            history.append(event)
            continue
        k = seen.get(event.user, 0)
        seen[event.user] = k + 1
        if k < cut[event.user]:
            history.append(event)
        else:
            held.append(HeldOut(event, k - cut[event.user]))
    return ReplaySplit(history, held, len(per_user))


def _candidates(
    split: ReplaySplit, data: Dataset, vocabulary: Sequence[str], negatives: int, seed: int
) -> tuple[list[int], np.ndarray]:
    """
    The held-out interactions that can be ranked, and their candidates.

    The interactions are their positions in ``split.held_out``; the candidates are
    ``[N, 1 + negatives]`` model indices (column 0 the item).
    """
    from kernels.evaluation import sample_negatives  # noqa: PLC0415 - jax

    index = {item: i + 1 for i, item in enumerate(vocabulary)}
    items_of: dict[str, set[int]] = {}
    for event in split.history:
        if isinstance(event, Interaction) and event.item in index:
            items_of.setdefault(event.user, set()).add(index[event.item])
    for h in split.held_out:
        if h.event.item in index:
            items_of.setdefault(h.event.user, set()).add(index[h.event.item])
    rankable = [n for n, h in enumerate(split.held_out) if h.event.item in index]
    seen = [np.fromiter(items_of[split.held_out[n].event.user], np.int32) for n in rankable]
    indptr = np.zeros(len(seen) + 1, np.int64)
    np.cumsum([len(s) for s in seen], out=indptr[1:])
    flat = np.concatenate(seen) if seen else np.zeros(0, np.int32)
    rng = np.random.default_rng(seed)
    negs = sample_negatives(rng, indptr, flat, num_items=len(vocabulary), count=negatives)
    targets = np.asarray([index[split.held_out[n].event.item] for n in rankable], np.int32)
    del data
    return rankable, np.concatenate([targets[:, None], negs], axis=1)


def _ranks(ranking: Ranking, requests: list[Rank], targets: list[str]) -> np.ndarray:
    """The 1-based rank of each request's target in the ranking's answer."""
    out = np.empty(len(requests), np.int64)
    for start in range(0, len(requests), _BLOCK):
        answers = ranking.rank_batch(requests[start : start + _BLOCK])
        for j, answer in enumerate(answers):
            out[start + j] = answer.items.index(targets[start + j]) + 1
    return out


def _figures(ranks: np.ndarray) -> dict[str, float]:
    if not len(ranks):
        return {"ndcg@10": 0.0, "hr@10": 0.0}
    hit = ranks <= K
    ndcg = np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0)
    return {"ndcg@10": float(ndcg.mean()), "hr@10": float(hit.mean())}


def _lift(new: float, old: float) -> float | None:
    return None if old == 0 else new / old - 1.0


def replay(
    data: Dataset,
    model_path: str | Path,
    *,
    holdout: float = 0.2,
    negatives: int = 100,
    seed: int = 0,
    online: OnlineLearner | None = None,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
) -> dict[str, Any]:
    """
    Run the frozen and live modes (and online, with ``online``) and report them.

    Returns a JSON-able dict: ``frozen``/``live``/``online`` with ``ndcg@10`` and
    ``hr@10``, ``lift`` (live over frozen, relative) and ``online_lift`` (online over
    live), ``held_out``, ``skipped`` (items the model does not know), ``users``,
    ``seconds``; ``after_first``: frozen and live figures and the lift over only the
    held-out interactions that are not their user's first held-out one (for a user's
    first, the live state is the cut-off state: both modes rank it alike).

    Raises:
        ValueError: the data set has no events (a log), or an option is out of range.
        kernels.modelfile.ModelFileError: the model file cannot be used.

    """
    from kernels.modelfile import load_model  # noqa: PLC0415 - jax
    from kernels.runtime import Ranker  # noqa: PLC0415

    started = time.perf_counter()
    if data.events is None:
        msg = "dataset: replay needs a data set file (--dataset), not a log"
        raise ValueError(msg)
    if negatives < 1:
        msg = f"negatives: must be at least 1, got {negatives}"
        raise ValueError(msg)
    model = load_model(model_path)
    config, vocabulary = model.manifest.config, model.manifest.vocabulary
    split = split_for_replay(data.events, holdout)
    rankable, cands = _candidates(split, data, vocabulary, negatives, seed)
    held = [split.held_out[n] for n in rankable]
    requests = [Rank(user=h.event.user, candidates=[vocabulary[c - 1] for c in row])
                for h, row in zip(held, cands, strict=True)]  # fmt: skip
    targets = [h.event.item for h in held]

    def fresh_state() -> State:
        fold = FoldConfig(seq_len=max(config.max_len, FoldConfig().seq_len))
        return project(State(fold), split.history)

    ranker = Ranker(model.params, config, feature_weights=weights)
    ranker.warmup(scorers=not ranker.host_scores)  # as the daemon does: compiled once

    def ranking_on(state: State) -> Ranking:
        return Ranking(lambda: state, ranker=ranker, vocabulary=vocabulary, weights=weights)

    frozen = _ranks(ranking_on(fresh_state()), requests, targets)
    modes = {"frozen": frozen, "live": _live(fresh_state(), ranking_on, held, requests, targets)}
    if online is not None:
        modes["online"] = _live(fresh_state(), ranking_on, held, requests, targets, online=online)
    report: dict[str, Any] = {name: _figures(ranks) for name, ranks in modes.items()}
    report["lift"] = {
        m: _lift(report["live"][m], report["frozen"][m]) for m in ("ndcg@10", "hr@10")
    }
    later = np.asarray([h.round > 0 for h in held], bool)
    after = {name: _figures(modes[name][later]) for name in ("frozen", "live")}
    report["after_first"] = {
        **after,
        "held_out": int(later.sum()),
        "lift": {m: _lift(after["live"][m], after["frozen"][m]) for m in ("ndcg@10", "hr@10")},
    }
    if online is not None:
        report["online_lift"] = {m: _lift(report["online"][m], report["live"][m])
                                 for m in ("ndcg@10", "hr@10")}  # fmt: skip
        report["online_options"] = online.describe()
    trained = model.manifest.extra or {}
    report |= {
        "dataset": data.name,
        # a model trained on everything has seen the held-out part: both modes flatter it
        "model_holdout": trained.get("holdout"),
        "holdout": holdout,
        "negatives": negatives,
        "held_out": len(held),
        "skipped": len(split.held_out) - len(held),
        "users": split.users,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return report


def _live(
    state: State,
    ranking_on: Any,
    held: list[HeldOut],
    requests: list[Rank],
    targets: list[str],
    *,
    online: OnlineLearner | None = None,
) -> np.ndarray:
    """Rank in time order, folding each batch in after it (module docstring)."""
    ranking: Ranking = ranking_on(state)
    if online is not None:
        online.attach(ranking)
    ranks = np.empty(len(held), np.int64)
    for members in _time_batches(held):
        ranks[members] = _ranks(ranking, [requests[m] for m in members],
                                [targets[m] for m in members])  # fmt: skip
        project(state, [held[m].event for m in members])
        # the daemon's vector refresher re-encodes the users just folded (the online
        # step learns from the vectors it replaces), then the step runs and publishes
        index = state.user_index
        ranking.refresh(sorted({index[requests[m].user] for m in members}))
        if online is not None:
            online.step()
            online.publish()
    return ranks


def _time_batches(held: list[HeldOut]) -> list[list[int]]:
    """
    The held-out interactions in time order, cut into runs in which no user comes twice.

    Ties in time keep the data set's order, and a run holds at most ``_BLOCK``: ranking
    a run together and then folding it gives each interaction its own user's state up to
    the moment before it.
    """
    order = sorted(range(len(held)), key=lambda m: (held[m].event.ts, m))
    batches: list[list[int]] = []
    current: list[int] = []
    users: set[str] = set()
    for m in order:
        user = held[m].event.user
        if user in users or len(current) >= _BLOCK:
            batches.append(current)
            current, users = [], set()
        current.append(m)
        users.add(user)
    if current:
        batches.append(current)
    return batches
