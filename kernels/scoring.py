"""
Candidate scoring: user vectors against candidates, fused with item features; top k.

Pure JAX kernels, un-jitted so they compose with ``vmap``; `kernels.runtime` jits them
once per shape bucket. The two serving entry points differ only in where the
user-item dot products are computed:

- `fuse_top_k` takes them already computed (``[B, N]``): the CPU path, where the
  runtime computes them on the host (see `kernels.runtime` for why);
- `gather_score_top_k` takes the item table and candidate indices, gathers and dots
  inside the kernel: the accelerator path, where the table stays on the device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "candidate_scores",
    "fuse_scores",
    "fuse_top_k",
    "gather_score_top_k",
    "top_k_candidates",
]


def fuse_scores(
    dots: jax.Array,
    *,
    features: jax.Array | None = None,
    weights: jax.Array | None = None,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""
    Fused candidate scores ``[B, N]`` float32 from the model's dot products.

    .. math::

        s_{bn} = \text{dots}_{bn} + \sum_f w_f \, x_{bnf}

    with optional ``features x [B, N, F]`` (e.g. decayed popularity, freshness, a bias
    column) and ``weights w [F]``. Positions where ``where [B, N]`` is False score
    ``-inf``.
    """
    scores = dots.astype(jnp.float32)
    if features is not None:
        if weights is None:
            msg = "weights: required when features are given"
            raise ValueError(msg)
        scores = scores + features.astype(jnp.float32) @ weights.astype(jnp.float32)
    if where is not None:
        scores = jnp.where(where, scores, -jnp.inf)
    return scores


def candidate_scores(
    user_vecs: jax.Array,
    cand_emb: jax.Array,
    *,
    features: jax.Array | None = None,
    weights: jax.Array | None = None,
    where: jax.Array | None = None,
) -> jax.Array:
    r"""
    `fuse_scores` of the dot products of users and gathered candidate embeddings.

    ``<u_b, e_bn>`` for ``user_vecs u [B, d]`` and ``cand_emb e [B, N, d]``; the result
    is ``[B, N]`` float32, ``-inf`` where masked.
    """
    dots = jnp.einsum("bd,bnd->bn", user_vecs, cand_emb, preferred_element_type=jnp.float32)
    return fuse_scores(dots, features=features, weights=weights, where=where)


def top_k_candidates(
    scores: jax.Array, *, k: int, where: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    r"""
    The ``k`` best positions of each row of ``scores [B, N]``.

    Returns ``(values [B, k], indices [B, k])``, best first, ties to the lowest index.

    Slots beyond the row's number of valid positions (``where``, or finite scores)
    hold index ``-1`` and value ``-inf``, so a padded position never reaches a result.
    """
    if not 1 <= k <= scores.shape[-1]:
        msg = f"k: must be in [1, {scores.shape[-1]}] (the candidate count), got {k}"
        raise ValueError(msg)
    valid = scores > -jnp.inf if where is None else where & (scores > -jnp.inf)
    values, indices = lax.top_k(jnp.where(valid, scores, -jnp.inf), k)
    # A valid score is > -inf, so a -inf among the picks is exactly an invalid slot
    # (cheaper than gathering `valid` at the picked indices, which XLA's CPU does slowly).
    picked_valid = values > -jnp.inf
    return values, jnp.where(picked_valid, indices, -1)


def fuse_top_k(
    dots: jax.Array,
    *,
    k: int,
    features: jax.Array | None = None,
    weights: jax.Array | None = None,
    where: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """
    `fuse_scores` then `top_k_candidates`.

    Returns ``(scores [B, N], top values [B, k], top indices [B, k])``; indices are
    positions in the candidate list, ``-1`` for none.
    """
    scores = fuse_scores(dots, features=features, weights=weights, where=where)
    values, indices = top_k_candidates(scores, k=k, where=where)
    return scores, values, indices


def gather_score_top_k(
    item_table: jax.Array,
    user_vecs: jax.Array,
    cand_idx: jax.Array,
    *,
    k: int,
    features: jax.Array | None = None,
    weights: jax.Array | None = None,
    where: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """
    Score + top-k from item indices, gathering the embeddings in the kernel.

    ``cand_idx [B, N]`` are rows of ``item_table
    [V + 1, d]`` (row 0, the padding row, is all zeros, so a candidate the model does
    not know scores by its features alone). Out-of-range indices are clamped, never
    read out of bounds; mask them with ``where``. Returns as `fuse_top_k`.
    """
    cand_emb = jnp.take(item_table, cand_idx, axis=0, mode="clip")
    dots = jnp.einsum("bd,bnd->bn", user_vecs, cand_emb, preferred_element_type=jnp.float32)
    return fuse_top_k(dots, k=k, features=features, weights=weights, where=where)
