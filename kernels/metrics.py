"""
Ranking metrics for one relevant item per list: rank, HR@k, NDCG@k, MRR.

Every function is pure and un-jitted (callers ``jax.jit`` at the boundary, with
``k`` in ``static_argnames``), works on ``scores`` of shape ``[..., list_size]``
(usually ``[batch, list_size]``) and ``target_index`` of shape ``[...]`` (usually
``[batch]``), and composes with ``jax.vmap``.

Conventions
-----------
Masks.
    ``where`` (bool, same shape as ``scores``) marks the valid positions; ``None``
    means all are valid. Masked positions never influence a result, whatever their
    scores (NaN and infinities included).

Ties (pessimistic).
    ``rank = 1 + #{valid j != t : score_j >= score_t}``: every other valid item that
    scores at least as high as the target is counted as ahead of it. A model that
    gives every item the same score therefore ranks the target last, so it gets
    HR@k = NDCG@k = 0 for ``k`` below the number of valid items, never 1.

NaN scores.
    A NaN score at a valid position is treated as ``-inf``: a NaN target is ranked
    below every other valid item (the pessimistic tie rule puts it last).

Rows without a valid target.
    A row whose ``target_index`` is out of ``[0, list_size)`` or points at a masked
    position (which includes every all-masked row) gets rank ``list_size + 1`` and
    metric value ``0.0`` -- never NaN. Such rows usually should not count towards a
    mean: pass ``row_where=target_is_valid(target_index, where=where)`` to
    :func:`mean_over_valid_rows`.

Evaluation protocols
--------------------
Sampled negatives (SASRec's "sampled-100").
    Put the held-out item in column 0 and 100 sampled negatives in columns 1..100,
    so ``scores`` is ``[batch, 101]`` and ``target_index`` is all zeros. Pass a
    ``where`` mask only if some rows have fewer negatives (padding).

Full ranking.
    Score every item of the vocabulary (``[batch, num_items]``) and pass the true
    item's id as ``target_index``, with a ``where`` mask that is False at the items
    the user has already interacted with (and at padding ids) but True at the
    target, even when the target was seen before.

Example:
    >>> import jax.numpy as jnp
    >>> scores = jnp.array([[0.9, 0.3, 0.5], [0.1, 0.2, 0.3]])
    >>> rank_of_target(scores, jnp.array([0, 0])).tolist()
    [1, 3]
    >>> hit_rate_metric(scores, jnp.array([0, 0]), k=2).tolist()
    [1.0, 0.0]

"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp

if TYPE_CHECKING:
    from jax import Array
    from jax.typing import ArrayLike

__all__ = [
    "hit_rate_metric",
    "mean_over_valid_rows",
    "mrr_metric",
    "ndcg_metric",
    "rank_of_target",
    "target_is_valid",
]


def _check_shapes(scores: Array, target_index: Array, where: Array | None) -> None:
    """Raise at trace time if the shapes do not fit ``[..., list_size]`` / ``[...]``."""
    if scores.ndim < 1 or scores.shape[-1] < 1:
        raise ValueError(f"scores need a non-empty list axis, got shape {scores.shape}")
    if target_index.shape != scores.shape[:-1]:
        raise ValueError(
            f"target_index shape {target_index.shape} must equal scores.shape[:-1] "
            f"{scores.shape[:-1]}",
        )
    if where is not None and where.shape != scores.shape:
        raise ValueError(f"where shape {where.shape} must equal scores shape {scores.shape}")


def _check_k(k: int) -> None:
    """Raise at trace time if the cutoff ``k`` is not a positive Python int."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int (static), got {k!r}")


def _valid_and_rank(
    scores: ArrayLike,
    target_index: ArrayLike,
    where: ArrayLike | None,
) -> tuple[Array, Array]:
    """``(target_is_valid, rank)``, both of shape ``[...]``; see the module docstring."""
    scores = jnp.asarray(scores)
    target_index = jnp.asarray(target_index)
    where = None if where is None else jnp.asarray(where, dtype=bool)
    _check_shapes(scores, target_index, where)
    list_size = scores.shape[-1]
    valid = jnp.ones(scores.shape, dtype=bool) if where is None else where

    in_range = (target_index >= 0) & (target_index < list_size)
    t = jnp.clip(target_index, 0, list_size - 1).astype(jnp.int32)
    target_valid = in_range & jnp.take_along_axis(valid, t[..., None], axis=-1)[..., 0]

    if jnp.issubdtype(scores.dtype, jnp.floating):
        scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
    target_score = jnp.take_along_axis(scores, t[..., None], axis=-1)
    others = valid & (jnp.arange(list_size) != t[..., None])
    ahead = others & (scores >= target_score)
    rank = 1 + jnp.sum(ahead, axis=-1, dtype=jnp.int32)
    rank = jnp.where(target_valid, rank, jnp.int32(list_size + 1))
    return target_valid, rank


def target_is_valid(
    target_index: ArrayLike,
    *,
    where: ArrayLike | None = None,
    list_size: int | None = None,
) -> Array:
    """
    Whether each row's target is a valid position.

    ``valid[r] = 0 <= target_index[r] < list_size and where[r, target_index[r]]``.

    Args:
        target_index: int ``[batch]``, the target's column in each row.
        where: optional bool ``[batch, list_size]`` mask of valid positions.
        list_size: the number of columns; needed only when ``where`` is None.

    Returns:
        bool ``[batch]``; use it as ``row_where`` for :func:`mean_over_valid_rows`.

    """
    target_index = jnp.asarray(target_index)
    if where is None:
        if list_size is None:
            raise ValueError("target_is_valid needs where or list_size")
        return (target_index >= 0) & (target_index < list_size)
    where = jnp.asarray(where, dtype=bool)
    return _valid_and_rank(jnp.zeros(where.shape, jnp.float32), target_index, where)[0]


def rank_of_target(
    scores: ArrayLike,
    target_index: ArrayLike,
    *,
    where: ArrayLike | None = None,
) -> Array:
    """
    1-based rank of the target among the valid positions of each row.

    ``rank[r] = 1 + #{j valid, j != t : scores[r, j] >= scores[r, t]}`` with
    ``t = target_index[r]`` (pessimistic ties: equal scores rank ahead of the target;
    NaN scores count as ``-inf``). Rows without a valid target get ``list_size + 1``.

    Args:
        scores: float ``[batch, list_size]``.
        target_index: int ``[batch]``, the target's column in each row.
        where: optional bool ``[batch, list_size]``, True at valid positions.

    Returns:
        int32 ``[batch]`` in ``[1, list_size + 1]``.

    """
    return _valid_and_rank(scores, target_index, where)[1]


def hit_rate_metric(
    scores: ArrayLike,
    target_index: ArrayLike,
    *,
    k: int,
    where: ArrayLike | None = None,
) -> Array:
    """
    HR@k per row (recall@k with a single relevant item).

    ``HR@k[r] = 1 if rank[r] <= k else 0`` with ``rank`` from :func:`rank_of_target`;
    0 for rows without a valid target.

    Args:
        scores: float ``[batch, list_size]``.
        target_index: int ``[batch]``.
        k: static cutoff, a positive int.
        where: optional bool ``[batch, list_size]``, True at valid positions.

    Returns:
        float32 ``[batch]`` of 0.0 / 1.0.

    """
    _check_k(k)
    valid, rank = _valid_and_rank(scores, target_index, where)
    return jnp.where(valid & (rank <= k), 1.0, 0.0).astype(jnp.float32)


def ndcg_metric(
    scores: ArrayLike,
    target_index: ArrayLike,
    *,
    k: int,
    where: ArrayLike | None = None,
) -> Array:
    """
    NDCG@k per row with a single relevant item.

    ``NDCG@k[r] = 1 / log2(rank[r] + 1) if rank[r] <= k else 0``; the ideal DCG is
    ``1 / log2(2) = 1``, so no normalisation is left. 0 for rows without a valid
    target.

    Args:
        scores: float ``[batch, list_size]``.
        target_index: int ``[batch]``.
        k: static cutoff, a positive int.
        where: optional bool ``[batch, list_size]``, True at valid positions.

    Returns:
        float32 ``[batch]`` in ``[0, 1]``.

    """
    _check_k(k)
    valid, rank = _valid_and_rank(scores, target_index, where)
    gain = 1.0 / jnp.log2(rank.astype(jnp.float32) + 1.0)
    return jnp.where(valid & (rank <= k), gain, 0.0).astype(jnp.float32)


def mrr_metric(
    scores: ArrayLike,
    target_index: ArrayLike,
    *,
    where: ArrayLike | None = None,
) -> Array:
    """
    Reciprocal rank per row (its batch mean is MRR).

    ``RR[r] = 1 / rank[r]``; 0 for rows without a valid target.

    Args:
        scores: float ``[batch, list_size]``.
        target_index: int ``[batch]``.
        where: optional bool ``[batch, list_size]``, True at valid positions.

    Returns:
        float32 ``[batch]`` in ``[0, 1]``.

    """
    valid, rank = _valid_and_rank(scores, target_index, where)
    return jnp.where(valid, 1.0 / rank.astype(jnp.float32), 0.0).astype(jnp.float32)


def mean_over_valid_rows(values: ArrayLike, *, row_where: ArrayLike | None = None) -> Array:
    """
    Mean of ``values`` over the rows where ``row_where`` is True.

    ``mean = sum_r [row_where[r]] * values[r] / max(1, #{r : row_where[r]})``.
    Invalid rows never contribute, even when they hold NaN or inf; with no valid row
    the result is 0.0, not NaN. NaN in a valid row does propagate.

    Args:
        values: float ``[batch]`` (any shape; the mean is over all its elements).
        row_where: optional bool of the same shape as ``values``; None means all rows.

    Returns:
        float32 scalar.

    """
    values = jnp.asarray(values, dtype=jnp.float32)
    if row_where is None:
        row_where = jnp.ones(values.shape, dtype=bool)
    row_where = jnp.asarray(row_where, dtype=bool)
    if row_where.shape != values.shape:
        raise ValueError(
            f"row_where shape {row_where.shape} must equal values shape {values.shape}",
        )
    total = jnp.sum(jnp.where(row_where, values, 0.0))
    count = jnp.sum(row_where, dtype=jnp.int32)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)
