"""
Ranking metrics: rank, HR@k, NDCG@k and MRR of one relevant item per list; ILD@k.

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

Intra-list diversity.
    :func:`intra_list_diversity` needs no target: it reads the items' features
    (embeddings, or category indicator rows) in rank order, ``[..., list_size, dim]``,
    and the pairwise distance is injected (:func:`cosine_distances`,
    :func:`jaccard_distances`, or any ``[..., n, dim] -> [..., n, n]`` function).

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
from jax import lax

if TYPE_CHECKING:
    from collections.abc import Callable

    from jax import Array
    from jax.typing import ArrayLike

__all__ = [
    "cosine_distances",
    "hit_rate_metric",
    "intra_list_diversity",
    "jaccard_distances",
    "mean_over_valid_rows",
    "mrr_metric",
    "ndcg_metric",
    "rank_of_target",
    "target_is_valid",
]

#: Squared norms below this square count as zero vectors (cosine similarity 0 to all),
#: as in :func:`kernels.diversity.mmr_select`.
_NORM_EPS = 1e-12


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


# ----------------------------------------------------------------------------- diversity


def cosine_distances(features: ArrayLike) -> Array:
    r"""
    Pairwise cosine distance between the rows of each list.

    ``D[..., i, j] = 1 - <x_i, x_j> / (|x_i| |x_j|)``, clipped to ``[0, 2]``; an all-zero
    row has cosine 0 to every row (itself included), so distance 1, as in
    :func:`kernels.diversity.mmr_select`.

    Args:
        features: float ``[..., n, dim]``, e.g. the item embeddings of a ranked list.

    Returns:
        float32 ``[..., n, n]``, symmetric.

    """
    x = jnp.asarray(features, jnp.float32)
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    # rsqrt of a floored square keeps value and gradient finite for zero rows
    unit = x * lax.rsqrt(jnp.maximum(sq, _NORM_EPS * _NORM_EPS))
    cos = jnp.einsum("...id,...jd->...ij", unit, unit)
    return jnp.clip(1.0 - cos, 0.0, 2.0)


def jaccard_distances(features: ArrayLike) -> Array:
    r"""
    Pairwise Jaccard distance between the sets that indicator rows encode.

    Row ``i`` is the set ``A_i = {c : x_{i,c} != 0}`` (e.g. multi-hot genre flags);
    ``D[..., i, j] = 1 - |A_i \cap A_j| / |A_i \cup A_j|``, and 0 when both sets are
    empty (two items without categories are not told apart). With one-hot rows (one
    category per item) this is the categorical distance: 0 for the same category, 1
    for different ones.

    Args:
        features: ``[..., n, num_categories]``, non-zero where the item has the
            category (any numeric or bool dtype).

    Returns:
        float32 ``[..., n, n]`` in ``[0, 1]``, symmetric.

    """
    member = (jnp.asarray(features) != 0).astype(jnp.float32)
    inter = jnp.einsum("...ic,...jc->...ij", member, member)
    size = jnp.sum(member, axis=-1)
    union = size[..., :, None] + size[..., None, :] - inter
    return jnp.where(union > 0, 1.0 - inter / jnp.maximum(union, 1.0), 0.0)


def intra_list_diversity(
    features: ArrayLike,
    *,
    k: int,
    where: ArrayLike | None = None,
    distance_fn: Callable[[Array], Array] = cosine_distances,
) -> Array:
    r"""
    ILD@k per list: the mean pairwise distance among the list's top ``k`` items.

    With ``P`` the valid positions among the first ``k`` (``p < k`` and ``where[p]``)
    and ``n = |P|``,

    .. math::

        \mathrm{ILD@k} = \frac{2}{n (n - 1)} \sum_{i < j;\; i, j \in P} d(x_i, x_j)

    and 0 when ``n < 2`` (one item has no pair), never NaN. The list is taken in the
    order given (rank order: position 0 is the top), so pass the features of the
    items *as ranked*, e.g. ``embeddings[order]``.

    Args:
        features: ``[..., list_size, dim]`` per-item features in rank order: item
            embeddings for :func:`cosine_distances`, category indicator rows for
            :func:`jaccard_distances`.
        k: static cutoff, a positive int; lists shorter than ``k`` use all positions.
        where: optional bool ``[..., list_size]``, True at real items (False at
            padding); masked positions never influence the result, whatever their
            features (NaN included).
        distance_fn: ``[..., n, dim] -> [..., n, n]`` pairwise distances; only the
            off-diagonal entries are read.

    Returns:
        float32 ``[...]``: one ILD@k per list; average with :func:`mean_over_valid_rows`.

    Raises:
        ValueError: at trace time, for a bad ``k`` or mismatched shapes.

    Example:
        >>> import jax.numpy as jnp
        >>> genres = jnp.array([[[1, 0], [1, 0], [0, 1]]])  # two dramas, one comedy
        >>> ild = intra_list_diversity(genres, k=3, distance_fn=jaccard_distances)
        >>> round(float(ild[0]), 4)  # pairs: 0, 1, 1
        0.6667
        >>> intra_list_diversity(genres, k=2, distance_fn=jaccard_distances).tolist()
        [0.0]

    .. versionadded:: 0.1.0
    """
    _check_k(k)
    x = jnp.asarray(features)
    if x.ndim < 2:  # a list axis and a feature axis
        raise ValueError(f"features must be [..., list_size, dim], got shape {x.shape}")
    valid = jnp.ones(x.shape[:-1], bool) if where is None else jnp.asarray(where, bool)
    if valid.shape != x.shape[:-1]:
        raise ValueError(f"where shape {valid.shape} must equal features.shape[:-1] {x.shape[:-1]}")
    x, valid = x[..., :k, :], valid[..., :k]
    # zero the padding first so that NaN there never reaches an arithmetic result
    dist = distance_fn(jnp.where(valid[..., None], x, jnp.zeros((), x.dtype)))
    n = valid.shape[-1]
    pair = valid[..., :, None] & valid[..., None, :] & ~jnp.eye(n, dtype=bool)
    total = jnp.sum(jnp.where(pair, dist, 0.0), axis=(-2, -1))
    count = jnp.sum(pair, axis=(-2, -1), dtype=jnp.int32)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0).astype(jnp.float32)
