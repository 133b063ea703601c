"""Ranking metrics: hand-computed tables, a brute-force float64 reference, masks, jit, vmap."""

from __future__ import annotations

import doctest
import functools
import math
import secrets
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.typing import ArrayLike

from kernels import metrics
from kernels.metrics import (
    cosine_distances,
    hit_rate_metric,
    intra_list_diversity,
    jaccard_distances,
    mean_over_valid_rows,
    mrr_metric,
    ndcg_metric,
    rank_of_target,
    target_is_valid,
)

#: float32 metrics against the float64 reference: 1/log2 and 1/rank in float32.
RTOL = 1e-6
ATOL = 1e-7

ArrayLikeT = ArrayLike
KernelT = Callable[..., jax.Array]

NAN = float("nan")
INF = float("inf")


# --------------------------------------------------------------------------- reference


def reference_rank(scores: list[float], t: int, valid: list[bool]) -> int:
    """Brute force: 1 + #valid others scoring >= the target (NaN as -inf); n+1 if no target."""
    n = len(scores)
    if not (0 <= t < n) or not valid[t]:
        return n + 1
    as_f = [-math.inf if math.isnan(s) else float(s) for s in scores]
    return 1 + sum(1 for j in range(n) if j != t and valid[j] and as_f[j] >= as_f[t])


def reference_metrics(
    scores: list[float],
    t: int,
    valid: list[bool],
    k: int,
) -> tuple[int, float, float, float]:
    """Brute force ``(rank, HR@k, NDCG@k, RR)`` in float64 for one row."""
    n = len(scores)
    rank = reference_rank(scores, t, valid)
    if rank == n + 1:
        return rank, 0.0, 0.0, 0.0
    hit = 1.0 if rank <= k else 0.0
    ndcg = 1.0 / math.log2(rank + 1) if rank <= k else 0.0
    return rank, hit, ndcg, 1.0 / rank


def random_case(
    seed: int,
    batch: int,
    list_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores with many ties and some NaN, masks with all-masked rows, targets some invalid."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(batch, list_size)).astype(np.float32) / 2
    scores[rng.random(scores.shape) < 0.05] = np.nan
    where = rng.random((batch, list_size)) < 0.8
    where[rng.random(batch) < 0.1, :] = False
    target = rng.integers(0, list_size, size=batch)
    out_of_range = rng.random(batch) < 0.05
    target[out_of_range] = rng.choice([-1, list_size], size=int(out_of_range.sum()))
    return scores, target, where


def _rows(scores: np.ndarray, target: np.ndarray, where: np.ndarray, k: int) -> np.ndarray:
    """The reference applied row by row: float64 ``[batch, 4]`` of (rank, HR, NDCG, RR)."""
    return np.array(
        [
            reference_metrics(
                [float(x) for x in scores[r]],
                int(target[r]),
                [bool(v) for v in where[r]],
                k,
            )
            for r in range(scores.shape[0])
        ],
        dtype=np.float64,
    )


def _all(scores: ArrayLikeT, target: ArrayLikeT, where: ArrayLikeT | None, k: int) -> np.ndarray:
    """The kernels' ``[batch, 4]`` of (rank, HR, NDCG, RR), as float64 numpy."""
    return np.stack(
        [
            np.asarray(rank_of_target(scores, target, where=where), dtype=np.float64),
            np.asarray(hit_rate_metric(scores, target, k=k, where=where), dtype=np.float64),
            np.asarray(ndcg_metric(scores, target, k=k, where=where), dtype=np.float64),
            np.asarray(mrr_metric(scores, target, where=where), dtype=np.float64),
        ],
        axis=-1,
    )


# ------------------------------------------------------------------------ hand-computed

RANK_TABLE = [
    # (scores, target, where, expected rank)
    pytest.param([3.0, 2.0, 1.0], 0, None, 1, id="best"),
    pytest.param([3.0, 2.0, 1.0], 2, None, 1 + 2, id="worst"),
    pytest.param([1.0, 2.0, 3.0, 0.5], 1, None, 1 + 1, id="one-above"),
    pytest.param([2.0, 2.0, 1.0], 0, None, 1 + 1, id="tie-counts-against-target"),
    pytest.param([2.0, 2.0, 1.0], 1, None, 1 + 1, id="tie-either-index"),
    pytest.param([5.0, 5.0, 5.0, 5.0], 2, None, 1 + 3, id="all-tied-last"),
    pytest.param([1.0, 9.0, 8.0], 0, [True, False, True], 1 + 1, id="mask-hides-one"),
    pytest.param([1.0, 9.0, 8.0], 0, [True, False, False], 1, id="mask-hides-all-others"),
    pytest.param([NAN, 1.0, 2.0], 0, None, 1 + 2, id="nan-target-last"),
    pytest.param([1.0, NAN, 2.0], 0, None, 1 + 1, id="nan-other-below"),
    pytest.param([-INF, -INF, 0.0], 0, None, 1 + 2, id="neg-inf-ties"),
    pytest.param([1.0, 2.0, 3.0], 0, [False, True, True], 3 + 1, id="masked-target"),
    pytest.param([1.0, 2.0, 3.0], 3, None, 3 + 1, id="target-past-end"),
    pytest.param([1.0, 2.0, 3.0], -1, None, 3 + 1, id="negative-target"),
    pytest.param([1.0, 2.0, 3.0], 0, [False, False, False], 3 + 1, id="all-masked"),
]


@pytest.mark.parametrize(("scores", "target", "where", "expected"), RANK_TABLE)
def test_rank_of_target_table(
    scores: list[float],
    target: int,
    where: list[bool] | None,
    expected: int,
) -> None:
    """rank_of_target matches hand-computed ranks (pessimistic ties, NaN last, sentinel n+1)."""
    w = None if where is None else jnp.array([where])
    actual = rank_of_target(jnp.array([scores]), jnp.array([target]), where=w)
    assert [expected] == actual.tolist()


METRIC_TABLE = [
    # (scores, target, k, expected HR@k, expected NDCG@k, expected RR)
    pytest.param([3.0, 2.0, 1.0], 0, 1, 1.0, 1 / math.log2(1 + 1), 1 / 1, id="rank1-k1"),
    pytest.param([3.0, 2.0, 1.0], 1, 1, 0.0, 0.0, 1 / 2, id="rank2-k1"),
    pytest.param([3.0, 2.0, 1.0], 1, 2, 1.0, 1 / math.log2(2 + 1), 1 / 2, id="rank2-k2"),
    pytest.param([4.0, 3.0, 2.0, 1.0], 2, 3, 1.0, 1 / math.log2(3 + 1), 1 / 3, id="rank3-k3"),
    pytest.param([4.0, 3.0, 2.0, 1.0], 3, 3, 0.0, 0.0, 1 / 4, id="rank4-k3"),
    pytest.param([4.0, 3.0, 2.0, 1.0], 3, 10, 1.0, 1 / math.log2(4 + 1), 1 / 4, id="k>n"),
    pytest.param([1.0, 1.0], 0, 1, 0.0, 0.0, 1 / 2, id="tie-pessimistic"),
]


@pytest.mark.parametrize(
    ("scores", "target", "k", "hit", "ndcg", "rr"),
    METRIC_TABLE,
)
def test_metric_table(  # noqa: PLR0917 - pytest passes one column per expected metric
    scores: list[float],
    target: int,
    k: int,
    hit: float,
    ndcg: float,
    rr: float,
) -> None:
    """HR@k, NDCG@k and RR match values written as arithmetic."""
    s, t = jnp.array([scores]), jnp.array([target])
    actual = (
        hit_rate_metric(s, t, k=k).tolist(),
        ndcg_metric(s, t, k=k).tolist(),
        mrr_metric(s, t).tolist(),
    )
    expected = ([hit], [ndcg], [rr])
    np.testing.assert_allclose(expected, actual, rtol=RTOL, atol=ATOL)


def test_mean_over_valid_rows_table() -> None:
    """The mean skips invalid rows, even NaN ones: (1 + 0.5) / 2."""
    values = jnp.array([1.0, NAN, 0.5, INF])
    row_where = jnp.array([True, False, True, False])
    assert (1 + 0.5) / 2 == float(mean_over_valid_rows(values, row_where=row_where))


def test_mean_over_valid_rows_default_is_plain_mean() -> None:
    """Without row_where the result is the plain mean of all rows."""
    assert (1 + 0 + 0.5) / 3 == pytest.approx(
        float(mean_over_valid_rows(jnp.array([1.0, 0.0, 0.5]))),
        rel=RTOL,
    )


def test_mean_over_no_valid_rows_is_zero() -> None:
    """With no valid row the mean is 0.0, not NaN."""
    actual = mean_over_valid_rows(jnp.array([NAN, 1.0]), row_where=jnp.array([False, False]))
    assert 0.0 == float(actual)


def test_mean_propagates_nan_in_valid_rows() -> None:
    """NaN in a valid row is not hidden: the mean is NaN."""
    assert math.isnan(float(mean_over_valid_rows(jnp.array([NAN, 1.0]))))


# ---------------------------------------------------------------- brute-force reference


@pytest.mark.parametrize(
    ("seed", "batch", "list_size", "k"),
    [(0, 64, 5, 1), (1, 64, 8, 3), (2, 32, 101, 10), (3, 16, 257, 20), (4, 200, 2, 5)],
)
def test_matches_brute_force_with_ties_and_masks(
    seed: int,
    batch: int,
    list_size: int,
    k: int,
) -> None:
    """Rank, HR@k, NDCG@k and RR equal the float64 brute force within RTOL/ATOL."""
    scores, target, where = random_case(seed, batch, list_size)
    expected = _rows(scores, target, where, k)
    actual = _all(jnp.asarray(scores), jnp.asarray(target), jnp.asarray(where), k)
    np.testing.assert_allclose(expected, actual, rtol=RTOL, atol=ATOL)


def test_matches_brute_force_on_fresh_continuous_scores() -> None:
    """On never-seen-before normal scores (fresh seed each run) the kernels match brute force."""
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(128, 64)).astype(np.float32)
    where = rng.random(scores.shape) < 0.9
    target = rng.integers(0, 64, size=128)
    expected = _rows(scores, target, where, 10)
    actual = _all(jnp.asarray(scores), jnp.asarray(target), jnp.asarray(where), 10)
    np.testing.assert_allclose(expected, actual, rtol=RTOL, atol=ATOL, err_msg=f"seed={seed}")


# ----------------------------------------------------------------------- all-masked rows


def test_all_masked_rows_are_zero_not_nan() -> None:
    """All-masked rows get rank n+1 and metrics 0.0; other rows are unaffected."""
    scores = jnp.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    where = jnp.array([[False, False, False], [True, True, True]])
    target = jnp.array([2, 0])
    expected = np.array([[3 + 1, 0.0, 0.0, 0.0], [1, 1.0, 1 / math.log2(1 + 1), 1 / 1]])
    np.testing.assert_allclose(expected, _all(scores, target, where, 2), rtol=RTOL, atol=ATOL)


def test_all_masked_batch_mean_is_zero() -> None:
    """A batch of only all-masked rows averages to 0.0 over its (no) valid rows."""
    scores = jnp.zeros((4, 6))
    where = jnp.zeros((4, 6), dtype=bool)
    target = jnp.zeros(4, dtype=jnp.int32)
    row_where = target_is_valid(target, where=where)
    values = ndcg_metric(scores, target, k=3, where=where)
    actual = mean_over_valid_rows(values, row_where=row_where)
    assert (0.0, [False] * 4) == (float(actual), row_where.tolist())


def test_target_is_valid_without_mask_checks_range() -> None:
    """Without a mask a target is valid exactly when it is inside [0, list_size)."""
    assert [False, True, True, False] == target_is_valid(
        jnp.array([-1, 0, 2, 3]),
        list_size=3,
    ).tolist()


# ------------------------------------------------------------------------------ padding


@pytest.mark.parametrize("fill", [NAN, INF, -INF, 1e30, 0.0])
def test_masked_scores_never_matter(fill: float) -> None:
    """Overwriting the scores at masked positions (NaN, ±inf, huge) changes no result."""
    scores, target, where = random_case(7, 64, 16)
    in_range = (target >= 0) & (target < 16)
    where[np.arange(64)[in_range], target[in_range]] = True  # most targets valid: has teeth
    before = _all(jnp.asarray(scores), jnp.asarray(target), jnp.asarray(where), 4)
    changed = np.where(where, scores, np.float32(fill))
    after = _all(jnp.asarray(changed), jnp.asarray(target), jnp.asarray(where), 4)
    np.testing.assert_array_equal(before, after)


def test_padding_columns_never_matter() -> None:
    """Appending masked padding columns with high scores leaves every metric unchanged."""
    scores, target, where = random_case(8, 32, 10)
    padded = np.concatenate([scores, np.full((32, 6), 99.0, np.float32)], axis=1)
    padded_where = np.concatenate([where, np.zeros((32, 6), dtype=bool)], axis=1)
    before = _all(jnp.asarray(scores), jnp.asarray(target), jnp.asarray(where), 3)
    after = _all(jnp.asarray(padded), jnp.asarray(target), jnp.asarray(padded_where), 3)
    # The sentinel rank n+1 moves with n; the metrics must not.
    sentinel = before[:, 0] == 10 + 1
    np.testing.assert_array_equal(np.where(sentinel, 16 + 1, before[:, 0]), after[:, 0])
    np.testing.assert_array_equal(before[:, 1:], after[:, 1:])


def test_permuting_columns_keeps_rank() -> None:
    """Permuting the columns (and moving the target with them) leaves every rank unchanged."""
    scores, target, where = random_case(9, 64, 12)
    perm = np.random.default_rng(9).permutation(12)
    inverse = np.argsort(perm)
    before = rank_of_target(scores, target, where=where)
    after = rank_of_target(scores[:, perm], inverse[target], where=where[:, perm])
    assert before.tolist() == after.tolist()


# --------------------------------------------------------------------------- protocols


def test_constant_scores_score_zero_on_sampled_100() -> None:
    """Sampled-100 (target in column 0) with constant scores: rank 101, HR@10 = NDCG@10 = 0."""
    scores = jnp.full((8, 1 + 100), 0.25)
    target = jnp.zeros(8, dtype=jnp.int32)
    expected = np.tile([1 + 100, 0.0, 0.0, 1 / 101], (8, 1))
    np.testing.assert_allclose(expected, _all(scores, target, None, 10), rtol=RTOL, atol=ATOL)


def test_constant_scores_hr1_is_zero_with_two_valid_items() -> None:
    """Constant scores over two valid items give HR@1 = 0, not 1 (pessimistic ties)."""
    actual = hit_rate_metric(
        jnp.ones((1, 5)), jnp.array([3]), k=1, where=jnp.array([[False, True, False, True, False]])
    )
    assert [0.0] == actual.tolist()


def test_full_ranking_ignores_seen_items_but_keeps_target() -> None:
    """Full ranking: seen items scored above the target are masked out, the target stays."""
    scores = jnp.array([[0.9, 0.8, 0.7, 0.1, 0.6]])  # items 0, 1 were seen; target is 2
    where = jnp.array([[False, False, True, True, True]])
    assert [1] == rank_of_target(scores, jnp.array([2]), where=where).tolist()


# ------------------------------------------------------------------------ jit, vmap, grad

KERNELS = [
    pytest.param(rank_of_target, id="rank"),
    pytest.param(functools.partial(hit_rate_metric, k=3), id="hr@3"),
    pytest.param(functools.partial(ndcg_metric, k=3), id="ndcg@3"),
    pytest.param(mrr_metric, id="mrr"),
]


@pytest.mark.parametrize("fn", KERNELS)
def test_jit_equals_eager(fn: KernelT) -> None:
    """jax.jit(f) gives exactly the eager result (masks, ties, NaN, invalid targets)."""
    scores, target, where = (jnp.asarray(a) for a in random_case(11, 64, 9))
    expected = fn(scores, target, where=where)
    actual = jax.jit(fn)(scores, target, where=where)
    np.testing.assert_array_equal(expected, actual)


def test_jit_with_static_k() -> None:
    """ndcg_metric jits with k in static_argnames and equals the eager result."""
    scores, target, where = (jnp.asarray(a) for a in random_case(12, 16, 9))
    jitted = jax.jit(ndcg_metric, static_argnames="k")
    np.testing.assert_array_equal(
        ndcg_metric(scores, target, k=2, where=where),
        jitted(scores, target, k=2, where=where),
    )


def test_mean_jit_equals_eager() -> None:
    """jax.jit(mean_over_valid_rows) equals the eager mean, also with no valid rows."""
    values = jnp.array([0.5, NAN, 1.0])
    for row_where in (jnp.array([True, False, True]), jnp.zeros(3, dtype=bool)):
        expected = mean_over_valid_rows(values, row_where=row_where)
        actual = jax.jit(mean_over_valid_rows)(values, row_where=row_where)
        assert float(expected) == float(actual)


@pytest.mark.parametrize("fn", KERNELS)
def test_vmap_over_rows_equals_batched(fn: KernelT) -> None:
    """vmap of the per-row call (shapes [list_size], []) equals the batched call."""
    scores, target, where = (jnp.asarray(a) for a in random_case(13, 32, 7))
    expected = fn(scores, target, where=where)
    actual = jax.vmap(lambda s, t, w: fn(s, t, where=w))(scores, target, where)
    np.testing.assert_array_equal(expected, actual)


@pytest.mark.parametrize("fn", KERNELS)
def test_vmap_over_extra_axis(fn: KernelT) -> None:
    """vmap over a leading axis of [batch, list_size] blocks equals the per-block calls."""
    blocks = [random_case(20 + i, 8, 6) for i in range(3)]
    scores, target, where = (jnp.asarray(np.stack(a)) for a in zip(*blocks, strict=True))
    expected = np.stack([fn(scores[i], target[i], where=where[i]) for i in range(3)])
    actual = jax.vmap(lambda s, t, w: fn(s, t, where=w))(scores, target, where)
    np.testing.assert_array_equal(expected, actual)


def test_grad_is_zero_not_nan() -> None:
    """Metrics are piecewise constant: grad wrt scores is finite and zero, never NaN."""
    scores, target, where = (jnp.asarray(a) for a in random_case(14, 16, 5))
    scores = jnp.nan_to_num(scores)

    def loss(s: jax.Array) -> jax.Array:
        return mean_over_valid_rows(ndcg_metric(s, target, k=2, where=where))

    np.testing.assert_array_equal(np.zeros(scores.shape, np.float32), jax.grad(loss)(scores))


# ------------------------------------------------------------------------- static misuse


@pytest.mark.parametrize("k", [0, -1, 2.0, True])
def test_bad_k_raises(k: object) -> None:
    """A non-positive or non-int cutoff is rejected at trace time."""
    with pytest.raises(ValueError, match="k must be a positive int"):
        ndcg_metric(jnp.ones((2, 3)), jnp.zeros(2, dtype=jnp.int32), k=k)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("scores_shape", "target_shape", "where_shape", "match"),
    [
        ((2, 3), (3,), None, "target_index shape"),
        ((2, 3), (2,), (2, 4), "where shape"),
        ((2, 0), (2,), None, "non-empty list axis"),
    ],
)
def test_bad_shapes_raise(
    scores_shape: tuple[int, ...],
    target_shape: tuple[int, ...],
    where_shape: tuple[int, ...] | None,
    match: str,
) -> None:
    """Mismatched shapes are rejected with a message naming the argument."""
    where = None if where_shape is None else jnp.ones(where_shape, dtype=bool)
    with pytest.raises(ValueError, match=match):
        rank_of_target(jnp.ones(scores_shape), jnp.zeros(target_shape, jnp.int32), where=where)


def test_doctests_pass() -> None:
    """The module's docstring examples run and print what they claim."""
    result = doctest.testmod(metrics)
    assert (0, True) == (result.failed, result.attempted > 0)


# ------------------------------------------------------------------ intra-list diversity

R2 = 1 / math.sqrt(2)  # cosine of 45 degrees

COSINE_ILD_TABLE = [
    # (embeddings in rank order, k, where, expected ILD@k)
    pytest.param([[1, 0], [0, 1]], 2, None, 1.0, id="orthogonal"),
    pytest.param([[1, 0], [-1, 0]], 2, None, 2.0, id="opposite"),
    pytest.param([[1, 0], [3, 0]], 2, None, 0.0, id="same-direction-any-length"),
    pytest.param([[1, 0], [0, 1], [1, 1]], 3, None, (1 + 2 * (1 - R2)) / 3, id="three-pairs"),
    pytest.param([[1, 0], [1, 0], [0, 1]], 2, None, 0.0, id="k-cuts-the-list"),
    pytest.param([[1, 0], [0, 1]], 10, None, 1.0, id="k-beyond-the-list"),
    pytest.param([[0, 0], [1, 0]], 2, None, 1.0, id="zero-row-has-cosine-0"),
    pytest.param([[1, 0], [NAN, INF], [0, 1]], 3, [True, False, True], 1.0, id="mask"),
    pytest.param([[1, 0], [1, 0], [0, 1]], 2, [True, False, True], 0.0, id="mask-inside-k"),
    pytest.param([[1, 0]], 10, None, 0.0, id="one-item-no-pair"),
    pytest.param([[1, 0], [0, 1]], 2, [False, False], 0.0, id="all-masked"),
]


@pytest.mark.parametrize(("features", "k", "where", "expected"), COSINE_ILD_TABLE)
def test_cosine_ild_table(
    features: list[list[float]], k: int, where: list[bool] | None, expected: float
) -> None:
    """ILD@k with 1 - cosine: the mean over pairs in the top k, written as arithmetic."""
    actual = intra_list_diversity(
        jnp.asarray([features], jnp.float32), k=k, where=None if where is None else [where]
    )
    np.testing.assert_allclose([expected], actual, rtol=RTOL, atol=1e-6)


JACCARD_ILD_TABLE = [
    # (category indicator rows in rank order, k, expected ILD@k)
    pytest.param([[1, 0, 0], [1, 1, 0]], 2, 1 - 1 / 2, id="subset"),
    pytest.param([[1, 0, 0], [0, 1, 0]], 2, 1.0, id="disjoint"),
    pytest.param([[1, 1, 0], [0, 1, 1]], 2, 1 - 1 / 3, id="overlap"),
    pytest.param([[1, 1, 0], [1, 1, 0]], 2, 0.0, id="equal-sets"),
    pytest.param([[0, 0, 0], [0, 0, 0]], 2, 0.0, id="both-empty"),
    pytest.param([[0, 0, 0], [1, 0, 0]], 2, 1.0, id="one-empty"),
    pytest.param([[1, 0, 0], [1, 1, 0], [0, 1, 0]], 3, (0.5 + 1 + 0.5) / 3, id="three-pairs"),
    # one-hot rows are single categories: distance 1 exactly when they differ
    pytest.param([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], 4, 5 / 6, id="categorical"),
    pytest.param([[2, 0, 0], [0.5, 0, 0]], 2, 0.0, id="any-non-zero-is-a-member"),
]


@pytest.mark.parametrize(("features", "k", "expected"), JACCARD_ILD_TABLE)
def test_jaccard_ild_table(features: list[list[float]], k: int, expected: float) -> None:
    """ILD@k with 1 - Jaccard of category sets, written as arithmetic."""
    actual = intra_list_diversity(jnp.asarray([features]), k=k, distance_fn=jaccard_distances)
    np.testing.assert_allclose([expected], actual, rtol=RTOL, atol=1e-6)


def test_distance_matrices_are_symmetric_with_a_zero_diagonal() -> None:
    """Both distances are symmetric and 0 between an item and itself (non-zero rows)."""
    rng = np.random.default_rng(0)
    emb = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
    sets = jnp.asarray(rng.random((3, 5, 6)) < 0.5)
    sets = sets.at[..., 0].set(True)  # no empty set: its self-distance is 0 by definition
    for dist in (cosine_distances(emb), jaccard_distances(sets)):
        np.testing.assert_allclose(dist, jnp.swapaxes(dist, -1, -2), atol=1e-6)
        np.testing.assert_allclose(np.zeros((3, 5)), jnp.diagonal(dist, 0, -2, -1), atol=1e-6)


def test_ild_uses_the_injected_distance() -> None:
    """Any [..., n, d] -> [..., n, n] function is a distance: a constant 3 averages to 3."""
    actual = intra_list_diversity(
        jnp.zeros((2, 4, 1)), k=4, distance_fn=lambda x: jnp.full((*x.shape[:-1], 4), 3.0)
    )
    assert [3.0, 3.0] == actual.tolist()


def test_ild_equals_brute_force_mean_over_pairs() -> None:
    """ILD@k equals a float64 loop over the valid pairs of the top k, list by list."""
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(16, 12, 8)).astype(np.float32)
    where = rng.random((16, 12)) < 0.7
    actual = intra_list_diversity(jnp.asarray(emb), k=5, where=jnp.asarray(where))
    expected = []
    for x, w in zip(emb.astype(np.float64), where, strict=True):
        top = [v / np.linalg.norm(v) for v, ok in zip(x[:5], w[:5], strict=True) if ok]
        pairs = [1 - a @ b for i, a in enumerate(top) for b in top[i + 1 :]]
        expected.append(np.mean(pairs) if pairs else 0.0)
    np.testing.assert_allclose(expected, actual, rtol=1e-5, atol=1e-6)


def test_ild_padding_never_matters() -> None:
    """Appending masked positions (NaN features) changes no list's ILD."""
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(4, 6, 3)).astype(np.float32)
    padded = np.concatenate([emb, np.full((4, 3, 3), np.nan, np.float32)], axis=1)
    where = np.concatenate([np.ones((4, 6), bool), np.zeros((4, 3), bool)], axis=1)
    before = intra_list_diversity(jnp.asarray(emb), k=10)
    after = intra_list_diversity(jnp.asarray(padded), k=10, where=jnp.asarray(where))
    np.testing.assert_array_equal(before, after)


def test_ild_jit_and_vmap_equal_eager() -> None:
    """jit (k static) and vmap over lists give the batched eager values."""
    rng = np.random.default_rng(3)
    emb = jnp.asarray(rng.normal(size=(5, 7, 4)), jnp.float32)
    eager = intra_list_diversity(emb, k=4)
    jitted = jax.jit(intra_list_diversity, static_argnames=("k", "distance_fn"))(emb, k=4)
    mapped = jax.vmap(lambda e: intra_list_diversity(e, k=4))(emb)
    np.testing.assert_allclose(eager, jitted, rtol=1e-6)
    np.testing.assert_allclose(eager, mapped, rtol=1e-6)


def test_ild_grad_is_finite_with_zero_and_masked_rows() -> None:
    """The gradient of cosine ILD is finite with an all-zero row and NaN padding."""
    emb = jnp.array([[[1.0, 0.0], [0.0, 0.0], [NAN, NAN], [0.5, 0.5]]])
    where = jnp.array([[True, True, False, True]])
    grad = jax.grad(lambda e: intra_list_diversity(e, k=4, where=where).sum())(emb)
    assert bool(jnp.all(jnp.isfinite(grad)))


@pytest.mark.parametrize(
    ("shape", "k", "where_shape", "match"),
    [
        ((2, 3, 4), 0, None, "k must be a positive int"),
        ((3,), 2, None, r"features must be \[\.\.\., list_size, dim\]"),
        ((2, 3, 4), 2, (2, 4), "where shape"),
    ],
)
def test_ild_static_misuse_raises(
    shape: tuple[int, ...], k: int, where_shape: tuple[int, ...] | None, match: str
) -> None:
    """A bad cutoff or mismatched shapes are rejected, naming the argument."""
    where = None if where_shape is None else jnp.ones(where_shape, bool)
    with pytest.raises(ValueError, match=match):
        intra_list_diversity(jnp.ones(shape), k=k, where=where)
