"""
Maximal marginal relevance (MMR): greedy diverse selection of k of N candidates.

A pure JAX kernel, un-jitted so it composes with ``vmap``; callers jit it once at the
boundary with ``jax.jit(mmr_select, static_argnames=("k",))``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["mmr_select"]

#: Squared norms below this square are treated as zero vectors (similarity 0 to all).
_NORM_EPS = 1e-12


def _l2_normalise(x: jax.Array) -> jax.Array:
    """
    Rows of ``x`` scaled to unit L2 norm along the last axis; zero rows stay zero.

    ``rsqrt(max(|x|^2, eps^2))`` rather than ``x / |x|`` keeps the value and the
    gradient finite for all-zero rows.
    """
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * lax.rsqrt(jnp.maximum(sq, _NORM_EPS * _NORM_EPS))


def mmr_select(
    scores: jax.Array,
    embeddings: jax.Array,
    *,
    k: int,
    lambda_: float | jax.Array = 0.7,
    where: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""
    Greedy maximal marginal relevance: pick ``k`` relevant but mutually diverse items.

    For each row ``b``, with ``V`` the valid candidates (``where[b]``), ``s_c`` the
    score and ``sim(c, s) = <e_c / |e_c|, e_s / |e_s|>`` the cosine similarity of the
    embeddings (L2-normalised inside; an all-zero embedding has similarity 0 to
    everything), step ``t = 0 .. k-1`` selects

    .. math::

        c_t = \operatorname{argmax}_{c \in V \setminus \{c_0..c_{t-1}\}}
              \; \lambda s_c - (1 - \lambda) \max_{j < t} \operatorname{sim}(c, c_j)

    where the max-similarity term is 0 at ``t = 0``. Ties go to the lowest index.
    ``lambda_ = 1`` is plain top-k by score; ``lambda_ = 0`` ignores scores after
    the first pick.

    The loop is a ``lax.scan`` of static length ``k`` carrying a running
    ``max_sim[b, n]`` that each step updates with the similarity to the item just
    chosen, so the cost is ``O(k * N * d)``, not ``O(k^2 * N * d)``.

    Args:
        scores: ``[batch, num_candidates]`` relevance scores. Valid candidates must
            have non-NaN scores; masked positions may hold anything (NaN included).
        embeddings: ``[batch, num_candidates, dim]`` candidate embeddings; masked
            positions may hold anything.
        k: static number of selections, ``k >= 0``; may exceed ``num_candidates``.
        lambda_: trade-off ``λ`` in ``[0, 1]`` between relevance and diversity. A
            Python number is checked at trace time; an array is used as is.
        where: optional ``[batch, num_candidates]`` bool mask of real candidates;
            ``None`` means all are real. Masked (padding) candidates are never
            chosen and do not influence the result.

    Returns:
        ``(indices, mmr_values, valid)``, each ``[batch, k]``: the chosen candidate
        indices (``int32``) in selection order, the MMR objective of each choice at
        the step it was made (dtype of ``scores``), and whether the slot holds a
        real choice. When a row has fewer than ``k`` valid candidates, its trailing
        slots have ``valid = False``, ``index = -1`` and ``mmr_value = 0``.

    Raises:
        ValueError: at trace time, on mismatched shapes, a negative ``k``, or a
            Python ``lambda_`` outside ``[0, 1]``.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be [batch, num_candidates], got shape {scores.shape}")
    if embeddings.ndim != 3 or embeddings.shape[:2] != scores.shape:
        raise ValueError(
            f"embeddings must be [batch, num_candidates, dim] matching scores "
            f"{scores.shape}, got shape {embeddings.shape}"
        )
    if where is not None and where.shape != scores.shape:
        raise ValueError(f"where must have the shape of scores {scores.shape}, got {where.shape}")
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a static non-negative int, got {k!r}")
    if isinstance(lambda_, (int, float)) and not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda_ must lie in [0, 1], got {lambda_!r}")

    batch, _ = scores.shape
    dtype = jnp.result_type(scores.dtype, jnp.float32)
    valid = jnp.ones(scores.shape, bool) if where is None else where.astype(bool)

    # Zero out padding first so NaN/inf there never reaches an arithmetic result.
    rel = jnp.where(valid, scores, 0).astype(dtype)
    emb = _l2_normalise(jnp.where(valid[..., None], embeddings, 0).astype(dtype))
    lam = jnp.asarray(lambda_, dtype)
    rows = jnp.arange(batch)

    def step(
        carry: tuple[jax.Array, jax.Array], t: jax.Array
    ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]:
        chosen, max_sim = carry  # [B, N] bool, [B, N] float
        available = valid & ~chosen
        penalty = jnp.where(t == 0, jnp.zeros_like(max_sim), max_sim)
        mmr = lam * rel - (1 - lam) * penalty
        best = jnp.max(jnp.where(available, mmr, -jnp.inf), axis=-1, keepdims=True)
        # First available position attaining the best value: lowest-index tie-break,
        # and correct even when the best value is -inf.
        hit = available & (mmr == best)
        idx = jnp.argmax(hit, axis=-1).astype(jnp.int32)  # [B]
        ok = jnp.any(hit, axis=-1)  # [B]

        sim_last = jnp.einsum("bnd,bd->bn", emb, emb[rows, idx])
        new_max = jnp.where(t == 0, sim_last, jnp.maximum(max_sim, sim_last))
        max_sim = jnp.where(ok[:, None], new_max, max_sim)
        chosen = chosen | (ok[:, None] & (jnp.arange(rel.shape[1]) == idx[:, None]))

        out_idx = jnp.where(ok, idx, -1)
        out_val = jnp.where(ok, mmr[rows, idx], 0).astype(dtype)
        return (chosen, max_sim), (out_idx, out_val, ok)

    init = (jnp.zeros(scores.shape, bool), jnp.zeros(scores.shape, dtype))
    _, (indices, values, oks) = lax.scan(step, init, jnp.arange(k), length=k)
    # scan stacks along the step axis: [k, B] -> [B, k].
    return indices.T, values.T, oks.T
