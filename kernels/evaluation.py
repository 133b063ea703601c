"""
Offline evaluation of a sequential ranker: leave-one-out splits and two protocols.

Leave-one-out (the SASRec paper's split). Per user, in time order: the last item is
the *test* item, the one before it the *validation* item, the rest *training*. Users
with fewer than three interactions are not evaluated; all their items are training.
The model's input for validation is the training items, for the test the training
items plus the validation item (the newest ``max_len`` of them).

Protocols (see ``../shared/datasets/README.md``):

- ``sampled-100``: the test item is ranked against 100 items drawn uniformly, with
  replacement, from the items the user never interacted with (any of train,
  validation or test: never one of the user's items).
- ``full``: the test item is ranked against every item the user has not
  interacted with.

Ranks use :mod:`kernels.metrics`' pessimistic tie rule. Per user: HR@k, NDCG@k, the
reciprocal rank and the top ``k`` items; over users: coverage@k (the share of the
catalogue that appears in anyone's top k), ILD@k (mean pairwise ``1 - cosine`` of the
model's item embeddings in each top k) and novelty@k (mean self-information
``-log2 p(i)`` of the top-k items, where ``p(i)`` is the share of users whose model
input holds ``i``; an item in nobody's input counts as held by one user, so the
value stays finite).

Item ids here are the model's indices ``1 .. V``; 0 is padding. The jitted parts
(scoring, ranking) are pure; sampling and the per-user exclusion masks are numpy on
the host, seeded.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from kernels.metrics import cosine_distances, intra_list_diversity, rank_of_target
from kernels.sasrec import SasrecConfig, encode_users, item_table

__all__ = [
    "PROTOCOLS",
    "LeaveOneOut",
    "ProtocolResult",
    "evaluate",
    "leave_one_out",
    "left_padded",
    "sample_negatives",
    "sampled_validator",
]

Protocol = Literal["sampled-100", "full"]
PROTOCOLS: tuple[Protocol, ...] = ("sampled-100", "full")
Params = dict[str, jax.Array]

#: Users with fewer interactions are training data only (SASRec's rule).
MIN_EVALUATED = 3
#: Negatives per user in the sampled protocol.
SAMPLED_NEGATIVES = 100


def left_padded(rows: Sequence[np.ndarray], length: int) -> np.ndarray:
    """``[len(rows), length]`` int32: each row's newest ``length`` items, left-padded with 0."""
    out = np.zeros((len(rows), length), np.int32)
    for r, row in enumerate(rows):
        tail = row[-length:]
        if len(tail):
            out[r, -len(tail) :] = tail
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class LeaveOneOut:
    """
    A leave-one-out split in the layout of :func:`kernels.train.fit`.

    ``train_inputs``/``train_targets`` ``[N, L]``: one row per user with two or more
    training items (inputs are items ``0 .. n-2`` of the training part, targets items
    ``1 .. n-1``, the newest ``L`` slots). For the ``U`` evaluated users:
    ``users [U]`` their positions in the input sequences, ``val_inputs [U, L]`` /
    ``val_targets [U]`` and ``test_inputs [U, L]`` / ``test_targets [U]``. ``seen`` is
    every item of each evaluated user (train, validation and test), as CSR:
    ``seen_indices[seen_indptr[u]:seen_indptr[u + 1]]``.
    """

    train_inputs: np.ndarray
    train_targets: np.ndarray
    users: np.ndarray
    val_inputs: np.ndarray
    val_targets: np.ndarray
    test_inputs: np.ndarray
    test_targets: np.ndarray
    seen_indptr: np.ndarray
    seen_indices: np.ndarray

    def seen_of(self, u: int) -> np.ndarray:
        """The items evaluated user ``u`` (a row index, not a user position) interacted with."""
        return self.seen_indices[self.seen_indptr[u] : self.seen_indptr[u + 1]]


def leave_one_out(sequences: Sequence[np.ndarray], max_len: int) -> LeaveOneOut:
    """
    Split each user's item sequence (oldest first, ids ``1 .. V``) as the module says.

    Raises:
        ValueError: ``max_len`` below 1, or an item id below 1.

    """
    if max_len < 1:
        msg = f"max_len: must be at least 1, got {max_len}"
        raise ValueError(msg)
    train_rows: list[np.ndarray] = []
    users, val_in, val_t, test_in, test_t, seen = [], [], [], [], [], []
    for u, raw in enumerate(sequences):
        seq = np.asarray(raw, np.int32)
        if len(seq) and int(seq.min()) < 1:
            msg = f"sequences[{u}]: item ids must be at least 1 (0 is padding)"
            raise ValueError(msg)
        train = seq
        if len(seq) >= MIN_EVALUATED:
            train = seq[:-2]
            users.append(u)
            val_in.append(train)
            val_t.append(int(seq[-2]))
            test_in.append(seq[:-1])
            test_t.append(int(seq[-1]))
            seen.append(np.unique(seq))
        if len(train) >= 2:  # an input and a target
            train_rows.append(train[-(max_len + 1) :])
    indptr = np.zeros(len(seen) + 1, np.int64)
    np.cumsum([len(s) for s in seen], out=indptr[1:])
    return LeaveOneOut(
        train_inputs=left_padded([r[:-1] for r in train_rows], max_len),
        train_targets=left_padded([r[1:] for r in train_rows], max_len),
        users=np.asarray(users, np.int64),
        val_inputs=left_padded(val_in, max_len),
        val_targets=np.asarray(val_t, np.int32),
        test_inputs=left_padded(test_in, max_len),
        test_targets=np.asarray(test_t, np.int32),
        seen_indptr=indptr,
        seen_indices=np.concatenate(seen).astype(np.int32) if seen else np.zeros(0, np.int32),
    )


def sample_negatives(
    rng: np.random.Generator,
    seen_indptr: np.ndarray,
    seen_indices: np.ndarray,
    *,
    num_items: int,
    count: int = SAMPLED_NEGATIVES,
) -> np.ndarray:
    """
    ``[U, count]`` int32: per user, items drawn uniformly with replacement.

    They are drawn from ``1 .. num_items`` minus that user's ``seen`` items (rejection
    sampling).

    Raises:
        ValueError: a user has interacted with every item (nothing to sample).

    """
    n_users = len(seen_indptr) - 1
    sizes = np.diff(seen_indptr)
    if n_users and int(sizes.max()) >= num_items:
        msg = "a user has interacted with every item: no negative can be sampled"
        raise ValueError(msg)
    owner = np.repeat(np.arange(n_users, dtype=np.int64), sizes)
    seen_keys = np.sort(owner * (num_items + 1) + seen_indices)
    out = rng.integers(1, num_items + 1, size=(n_users, count), dtype=np.int64)
    rows = np.arange(n_users, dtype=np.int64)[:, None]
    bad = np.isin(rows * (num_items + 1) + out, seen_keys)
    while bad.any():
        out[bad] = rng.integers(1, num_items + 1, size=int(bad.sum()), dtype=np.int64)
        bad = np.isin(rows * (num_items + 1) + out, seen_keys)
    return out.astype(np.int32)


@dataclasses.dataclass(frozen=True, slots=True)
class ProtocolResult:
    """
    Per-user outcomes of one protocol, and the catalogue-level figures.

    The per-user outcomes are ``ranks [U]`` (1-based, of the test item among its
    candidates), ``top [U, k]`` (item ids in rank order; 0 where fewer than ``k`` items
    could be ranked) and ``ild [U]``. :meth:`summary` gives the means.
    """

    protocol: str
    k: int
    ranks: np.ndarray
    top: np.ndarray
    ild: np.ndarray
    num_items: int
    item_users: np.ndarray  # [V + 1] users whose model input holds each item

    @property
    def hits(self) -> np.ndarray:
        """``[U]``: 1.0 where the test item ranks within the top ``k``, else 0.0."""
        return (self.ranks <= self.k).astype(np.float64)

    @property
    def ndcg(self) -> np.ndarray:
        """``[U]``: ``1 / log2(rank + 1)`` where the test item is in the top ``k``, else 0."""
        return np.where(self.ranks <= self.k, 1.0 / np.log2(self.ranks + 1.0), 0.0)

    def novelty(self) -> float:
        """Mean self-information of the top-k items (module docstring)."""
        users = max(1, len(self.ranks))
        p = np.maximum(self.item_users, 1) / users
        info = -np.log2(np.minimum(p, 1.0))
        listed = self.top[self.top > 0]
        return float(info[listed].mean()) if listed.size else 0.0

    def summary(self) -> dict[str, float | int | str]:
        """The protocol, the user count, the means over users, coverage@k and novelty@k."""
        k = self.k
        covered = np.unique(self.top[self.top > 0])
        return {
            "protocol": self.protocol,
            "users": len(self.ranks),
            f"hr@{k}": float(self.hits.mean()) if len(self.ranks) else 0.0,
            f"ndcg@{k}": float(self.ndcg.mean()) if len(self.ranks) else 0.0,
            "mrr": float((1.0 / self.ranks).mean()) if len(self.ranks) else 0.0,
            f"coverage@{k}": len(covered) / self.num_items,
            f"ild@{k}": float(self.ild.mean()) if len(self.ranks) else 0.0,
            f"novelty@{k}": self.novelty(),
        }


@functools.partial(jax.jit, static_argnames=("config", "k"))
def _sampled_block(
    params: Params, inputs: jax.Array, candidates: jax.Array, *, config: SasrecConfig, k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Ranks of column 0, top-k candidate ids and ILD@k for ``candidates [B, C]``."""
    users = encode_users(params, inputs, config=config)
    table = item_table(params)
    scores = jnp.einsum("bd,bcd->bc", users, table[candidates])
    ranks = rank_of_target(scores, jnp.zeros(candidates.shape[0], jnp.int32))
    _, pos = jax.lax.top_k(scores, k)
    top = jnp.take_along_axis(candidates, pos, axis=1)
    return ranks, top, intra_list_diversity(table[top], k=k, distance_fn=cosine_distances)


@functools.partial(jax.jit, static_argnames=("config", "k"))
def _full_block(
    params: Params, inputs: jax.Array, where: jax.Array, targets: jax.Array, *,
    config: SasrecConfig, k: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """Ranks of ``targets`` among the items ``where`` allows, top-k ids and ILD@k."""
    users = encode_users(params, inputs, config=config)
    table = item_table(params)
    scores = users @ table.T
    ranks = rank_of_target(scores, targets, where=where)
    _, top = jax.lax.top_k(jnp.where(where, scores, -jnp.inf), k)
    real = jnp.take_along_axis(where, top, axis=1)  # fewer than k rankable items: 0 fills
    top = jnp.where(real, top, 0)
    ild = intra_list_diversity(table[top], k=k, where=real, distance_fn=cosine_distances)
    return ranks, top, ild


def sampled_validator(
    config: SasrecConfig,
    seen_indptr: np.ndarray,
    seen_indices: np.ndarray,
    *,
    seed: int = 0,
    k: int = 10,
    batch_size: int = 256,
) -> Callable[[Params, np.ndarray, np.ndarray], tuple[float, float]]:
    """
    A validation function under ``sampled-100`` for :func:`kernels.train.fit`.

    ``validate(params, inputs [U, L], targets [U]) -> (NDCG@k, HR@k)``: each user's
    target against 100 negatives drawn once, here, from the items outside the user's
    ``seen`` set (CSR, one row per validation user): the same candidates every epoch,
    so epochs differ only by the model.
    """
    negatives = sample_negatives(np.random.default_rng(seed), seen_indptr, seen_indices,
                                 num_items=config.num_items)  # fmt: skip

    def validate(params: Params, inputs: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
        ranks = []
        cands = np.concatenate([np.asarray(targets)[:, None], negatives], axis=1)
        for start in range(0, len(cands), batch_size):
            stop = min(start + batch_size, len(cands))
            r, _, _ = _sampled_block(params, _pad(np.asarray(inputs[start:stop]), batch_size),
                                     _pad(cands[start:stop], batch_size),
                                     config=config, k=k)  # fmt: skip
            ranks.append(np.asarray(r)[: stop - start])
        rank = np.concatenate(ranks)
        hit = rank <= k
        return float(np.where(hit, 1.0 / np.log2(rank + 1.0), 0.0).mean()), float(hit.mean())

    return validate


def _pad(a: np.ndarray, rows: int) -> np.ndarray:
    missing = rows - a.shape[0]
    return a if missing == 0 else np.concatenate([a, np.zeros((missing, *a.shape[1:]), a.dtype)])


def _item_users(split: LeaveOneOut, num_items: int) -> np.ndarray:
    """Per item, the evaluated users whose test input holds it."""
    counts = np.zeros(num_items + 1, np.int64)
    for row in split.test_inputs:
        counts[np.unique(row[row > 0])] += 1
    return counts


def evaluate(
    params: Params,
    config: SasrecConfig,
    split: LeaveOneOut,
    *,
    protocol: Protocol,
    seed: int = 0,
    k: int = 10,
    batch_size: int = 256,
    max_users: int | None = None,
) -> ProtocolResult:
    """
    Rank each evaluated user's test item under ``protocol`` (module docstring).

    ``max_users`` evaluates a random subset of that many users (seeded), as the SASRec
    code does above 10,000 users; None evaluates all. The same ``seed`` draws the same
    users and negatives.

    Raises:
        ValueError: an unknown protocol, or a split whose inputs are not ``config.max_len`` wide.

    """
    if protocol not in PROTOCOLS:
        msg = f"protocol: must be one of {', '.join(PROTOCOLS)}, got {protocol!r}"
        raise ValueError(msg)
    if split.test_inputs.shape[1] != config.max_len:
        msg = (f"split: inputs are {split.test_inputs.shape[1]} wide, the model's max_len is "
               f"{config.max_len}")  # fmt: skip
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    n = len(split.test_targets)
    chosen = np.arange(n)
    if max_users is not None and n > max_users:
        chosen = np.sort(rng.choice(n, size=max_users, replace=False))
    num_items = config.num_items
    indptr = split.seen_indptr
    lengths = np.diff(indptr)[chosen]
    sub_indptr = np.zeros(len(chosen) + 1, np.int64)
    np.cumsum(lengths, out=sub_indptr[1:])
    sub_seen = (np.concatenate([split.seen_of(int(u)) for u in chosen]) if len(chosen)
                else np.zeros(0, np.int32))  # fmt: skip
    inputs, targets = split.test_inputs[chosen], split.test_targets[chosen]
    negatives = (sample_negatives(rng, sub_indptr, sub_seen, num_items=num_items)
                 if protocol == "sampled-100" else None)  # fmt: skip
    ranks, tops, ilds = [], [], []
    for start in range(0, len(chosen), batch_size):
        stop = min(start + batch_size, len(chosen))
        x = _pad(inputs[start:stop], batch_size)
        if negatives is not None:
            cands = np.concatenate([targets[start:stop, None], negatives[start:stop]], axis=1)
            r, t, d = _sampled_block(params, x, _pad(cands, batch_size), config=config, k=k)
        else:
            where = np.ones((batch_size, num_items + 1), bool)
            where[:, 0] = False
            for b in range(stop - start):
                where[b, sub_seen[sub_indptr[start + b] : sub_indptr[start + b + 1]]] = False
                where[b, targets[start + b]] = True
            y = _pad(targets[start:stop], batch_size)
            r, t, d = _full_block(params, x, where, y, config=config, k=k)
        rows = stop - start
        ranks.append(np.asarray(r)[:rows])
        tops.append(np.asarray(t)[:rows])
        ilds.append(np.asarray(d)[:rows])
    return ProtocolResult(
        protocol=protocol,
        k=k,
        ranks=np.concatenate(ranks) if ranks else np.zeros(0, np.int32),
        top=np.concatenate(tops) if tops else np.zeros((0, k), np.int32),
        ild=np.concatenate(ilds) if ilds else np.zeros(0, np.float32),
        num_items=num_items,
        item_users=_item_users(split, num_items),
    )


def ndcg_at(rank: int, k: int = 10) -> float:
    """NDCG@k of one list with its single relevant item at ``rank`` (1-based)."""
    return 1.0 / math.log2(rank + 1) if rank <= k else 0.0
