"""
`kernels.diversity.mmr_select` against a plain-Python float64 greedy MMR.

Near-ties: the random inputs are drawn, run through the float64 reference, and redrawn
until every step's winner beats the runner-up by more than `_MIN_GAP` (float32 error is
~1e-6 here), so float32 and float64 must pick the same items. The one allowed exception
is an exact tie that is exact in any precision: with lambda = 0 every objective at step
0 is exactly 0, and both sides then take the lowest valid index.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.diversity import mmr_select

_MIN_GAP = 1e-3
_ATOL = 2e-5


def _greedy_row(scores, unit, where, k, lam):
    """
    Greedy MMR over one row: (chosen indices, their objective values, min non-zero gap).

    `unit` holds the L2-normalised embeddings as lists of Python floats.
    """

    def sim(i, j):
        return math.fsum(x * y for x, y in zip(unit[i], unit[j], strict=True))

    chosen, values, min_gap = [], [], math.inf
    for _ in range(k):
        objs = [
            (lam * scores[c] - (1 - lam) * (max(sim(c, j) for j in chosen) if chosen else 0.0), c)
            for c in range(len(scores))
            if where[c] and c not in chosen
        ]
        if not objs:
            break
        best_val, best_c = objs[0]
        for val, c in objs[1:]:
            if val > best_val:  # strict: ties keep the lowest index
                best_val, best_c = val, c
        runner_up = max((val for val, c in objs if c != best_c), default=-math.inf)
        if best_val - runner_up > 0:
            min_gap = min(min_gap, best_val - runner_up)
        chosen.append(best_c)
        values.append(best_val)
    return chosen, values, min_gap


def mmr_reference(scores, embeddings, k, lam, where=None):
    """
    Greedy MMR in plain Python floats (float64), one row at a time.

    Returns (indices, values, valid, min_gap), the first three as [B][k] lists with the
    kernel's padding convention (-1, 0.0, False), and min_gap the smallest non-zero
    winner-vs-runner-up gap over all steps (inf if none).
    """
    scores = np.asarray(scores, np.float64)
    embeddings = np.asarray(embeddings, np.float64)
    batch, n = scores.shape
    where = np.ones((batch, n), bool) if where is None else np.asarray(where, bool)
    out_idx, out_val, out_ok = [], [], []
    min_gap = math.inf
    for b in range(batch):
        unit = []
        for c in range(n):
            vec = [float(x) for x in embeddings[b, c]]
            norm = math.sqrt(math.fsum(x * x for x in vec))
            unit.append([x / norm for x in vec] if norm > 0 else [0.0] * len(vec))
        row_scores = [float(x) for x in scores[b]]
        chosen, values, gap = _greedy_row(row_scores, unit, where[b].tolist(), k, lam)
        min_gap = min(min_gap, gap)
        pad = k - len(chosen)
        out_idx.append(chosen + [-1] * pad)
        out_val.append(values + [0.0] * pad)
        out_ok.append([True] * len(chosen) + [False] * pad)
    return out_idx, out_val, out_ok, min_gap


def _draw(rng, shape, *, k, lam, mask_prob):
    """Float32 random inputs whose MMR run has no near-ties (see module docstring)."""
    batch, n, dim = shape
    for _ in range(200):
        scores = rng.normal(size=(batch, n)).astype(np.float32)
        emb = rng.normal(size=(batch, n, dim)).astype(np.float32)
        where = rng.random((batch, n)) >= mask_prob
        *_, gap = mmr_reference(scores, emb, k, lam, where)
        if gap > _MIN_GAP:
            return scores, emb, where
    pytest.fail("could not draw inputs without near-ties")
    return None  # unreachable


#: Jitted once at the boundary as callers do; lambda_ is traced, so it does not recompile.
_mmr_jit = jax.jit(mmr_select, static_argnames=("k",))


def _run(scores, emb, k, lam=0.7, where=None):
    idx, val, ok = _mmr_jit(
        jnp.asarray(scores),
        jnp.asarray(emb),
        k=k,
        lambda_=jnp.float32(lam),
        where=None if where is None else jnp.asarray(where),
    )
    return np.asarray(idx), np.asarray(val), np.asarray(ok)


@pytest.mark.parametrize(
    ("shape", "k", "lam", "mask_prob"),
    [
        ((1, 5, 3), 3, 0.7, 0.0),
        ((4, 16, 8), 5, 0.5, 0.3),
        ((3, 33, 4), 10, 0.0, 0.2),
        ((2, 64, 16), 8, 1.0, 0.25),
        ((5, 20, 2), 20, 0.3, 0.4),
        ((2, 7, 5), 12, 0.9, 0.3),
    ],
)
def test_matches_python_greedy_reference(shape, k, lam, mask_prob):
    """Indices, objective values and validity equal the float64 Python greedy MMR."""
    rng = np.random.default_rng([*shape, k, int(lam * 10)])
    scores, emb, where = _draw(rng, shape, k=k, lam=lam, mask_prob=mask_prob)
    exp_idx, exp_val, exp_ok, _ = mmr_reference(scores, emb, k, lam, where)

    idx, val, ok = _run(scores, emb, k, lam, where)

    np.testing.assert_array_equal(np.array(exp_idx), idx)
    np.testing.assert_array_equal(np.array(exp_ok), ok)
    np.testing.assert_allclose(np.array(exp_val), val, atol=_ATOL, rtol=1e-5)


def test_lambda_one_is_top_k_by_score():
    """With lambda = 1 the selection is the top-k valid candidates by descending score."""
    rng = np.random.default_rng(11)
    scores = rng.permutation(np.arange(40, dtype=np.float32)).reshape(2, 20) / 7
    emb = rng.normal(size=(2, 20, 6)).astype(np.float32)
    where = rng.random((2, 20)) >= 0.3

    idx, val, _ = _run(scores, emb, 6, 1.0, where)

    for b in range(2):
        valid_sorted = [c for c in np.argsort(-scores[b], kind="stable") if where[b, c]]
        assert valid_sorted[:6] == idx[b].tolist()
        np.testing.assert_allclose(scores[b, valid_sorted[:6]], val[b], rtol=1e-6)


def test_masked_positions_do_not_leak():
    """Changing scores/embeddings at masked positions (even to NaN or huge) changes nothing."""
    rng = np.random.default_rng(3)
    scores, emb, where = _draw(rng, (4, 24, 8), k=10, lam=0.6, mask_prob=0.4)
    scores2, emb2 = scores.copy(), emb.copy()
    scores2[~where] = np.where(rng.random((~where).sum()) < 0.5, 1e6, np.nan)
    emb2[~where] = rng.normal(size=((~where).sum(), 8)) * 1e3
    emb2[~where, 0] = np.nan

    base = _run(scores, emb, 10, 0.6, where)
    changed = _run(scores2, emb2, 10, 0.6, where)

    for expected, actual in zip(base, changed, strict=True):
        np.testing.assert_array_equal(expected, actual)


def test_masked_candidates_are_never_chosen():
    """Every index in a valid slot is a real candidate, and no candidate is chosen twice."""
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(6, 30)).astype(np.float32)
    scores[:, ::2] += 100.0  # the masked half would win on score alone
    emb = rng.normal(size=(6, 30, 4)).astype(np.float32)
    where = np.ones((6, 30), bool)
    where[:, ::2] = False

    idx, _, ok = _run(scores, emb, 12, 0.8, where)

    assert ok.all()
    assert where[np.arange(6)[:, None], idx].all()
    assert [12] * 6 == [len(set(row)) for row in idx.tolist()]


def test_padding_invariance():
    """Appending padded (masked) candidates gives the same result as the unpadded input."""
    rng = np.random.default_rng(5)
    scores, emb, _ = _draw(rng, (3, 10, 5), k=6, lam=0.5, mask_prob=0.0)
    pad_scores = np.concatenate([scores, rng.normal(size=(3, 22)).astype(np.float32) + 50], 1)
    pad_emb = np.concatenate([emb, rng.normal(size=(3, 22, 5)).astype(np.float32)], 1)
    pad_where = np.arange(32)[None, :].repeat(3, 0) < 10

    idx, val, ok = _run(scores, emb, 6, 0.5)
    p_idx, p_val, p_ok = _run(pad_scores, pad_emb, 6, 0.5, pad_where)

    np.testing.assert_array_equal(idx, p_idx)
    np.testing.assert_array_equal(ok, p_ok)
    np.testing.assert_allclose(val, p_val, atol=1e-6)


def test_fewer_valid_than_k_pads_with_invalid_slots():
    """With 3 valid candidates and k = 6 the first 3 slots are them, then -1 / 0 / False."""
    rng = np.random.default_rng(6)
    scores = rng.normal(size=(1, 8)).astype(np.float32)
    emb = rng.normal(size=(1, 8, 4)).astype(np.float32)
    where = np.array([[False, True, False, False, True, False, True, False]])

    idx, val, ok = _run(scores, emb, 6, 0.7, where)

    assert [1, 4, 6] == sorted(idx[0, :3].tolist())
    assert [-1, -1, -1] == idx[0, 3:].tolist()
    assert [True, True, True, False, False, False] == ok[0].tolist()
    assert [0.0, 0.0, 0.0] == val[0, 3:].tolist()


def test_all_masked_row_is_all_invalid_and_isolated():
    """An all-masked row yields only invalid slots and leaves the other rows unchanged."""
    rng = np.random.default_rng(7)
    scores, emb, where = _draw(rng, (3, 12, 6), k=4, lam=0.7, mask_prob=0.1)
    where[1] = False

    idx, val, ok = _run(scores, emb, 4, 0.7, where)
    alone = [_run(scores[[b]], emb[[b]], 4, 0.7, where[[b]]) for b in (0, 2)]

    assert [-1] * 4 == idx[1].tolist()
    assert [False] * 4 == ok[1].tolist()
    assert [0.0] * 4 == val[1].tolist()
    for b, (a_idx, a_val, _) in zip((0, 2), alone, strict=True):
        np.testing.assert_array_equal(a_idx[0], idx[b])
        np.testing.assert_allclose(a_val[0], val[b], atol=1e-6)


def test_jit_equals_eager():
    """`jax.jit(mmr_select, static_argnames=("k",))` returns the un-jitted result."""
    rng = np.random.default_rng(8)
    scores, emb, where = _draw(rng, (4, 40, 8), k=7, lam=0.6, mask_prob=0.2)
    args = (jnp.asarray(scores), jnp.asarray(emb))
    jitted = jax.jit(mmr_select, static_argnames=("k",))

    eager = mmr_select(*args, k=7, lambda_=0.6, where=jnp.asarray(where))
    compiled = jitted(*args, k=7, lambda_=jnp.float32(0.6), where=jnp.asarray(where))

    np.testing.assert_array_equal(np.asarray(eager[0]), np.asarray(compiled[0]))
    np.testing.assert_allclose(np.asarray(eager[1]), np.asarray(compiled[1]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(eager[2]), np.asarray(compiled[2]))


def test_vmap_over_outer_axis_equals_per_slice():
    """`vmap` over an extra leading axis equals calling the kernel slice by slice."""
    rng = np.random.default_rng(9)
    scores = rng.normal(size=(3, 2, 15)).astype(np.float32)
    emb = rng.normal(size=(3, 2, 15, 4)).astype(np.float32)
    where = rng.random((3, 2, 15)) >= 0.2
    fn = functools.partial(mmr_select, k=5, lambda_=0.5)

    v_idx, v_val, _ = jax.jit(jax.vmap(fn))(
        jnp.asarray(scores), jnp.asarray(emb), where=jnp.asarray(where)
    )

    for i in range(3):
        s_idx, s_val, _ = _run(scores[i], emb[i], 5, 0.5, where[i])
        np.testing.assert_array_equal(s_idx, np.asarray(v_idx[i]))
        np.testing.assert_allclose(s_val, np.asarray(v_val[i]), atol=1e-6)


@pytest.mark.parametrize(
    ("scores", "emb", "lam", "expected_idx", "expected_val"),
    [
        # e0 = e1 = (1, 0) after normalising (2, 0); e2 = (0.6, 0.8), cos(e0, e2) = 0.6.
        # t0: 0.5*[1.0, 0.9, 0.8] -> item 0.  t1: item 1: 0.5*0.9 - 0.5*1.0 = -0.05,
        # item 2: 0.5*0.8 - 0.5*0.6 = 0.1 -> item 2.  t2: item 1, max(1.0, 0.6) = 1.0.
        (
            [1.0, 0.9, 0.8],
            [[1.0, 0.0], [2.0, 0.0], [3.0, 4.0]],
            0.5,
            [0, 2, 1],
            [0.5 * 1.0, 0.5 * 0.8 - 0.5 * 0.6, 0.5 * 0.9 - 0.5 * 1.0],
        ),
        # Opposite vectors have cosine -1, which *raises* the MMR value.
        # t0: 0.7*[0.2, 1.0, 0.6] -> item 1.  t1: item 0: 0.7*0.2 - 0.3*0 = 0.14,
        # item 2: 0.7*0.6 - 0.3*(-1) = 0.72 -> item 2.  t2: item 0, max(0, 0) = 0.
        (
            [0.2, 1.0, 0.6],
            [[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]],
            0.7,
            [1, 2, 0],
            [0.7 * 1.0, 0.7 * 0.6 + 0.3 * 1.0, 0.7 * 0.2 - 0.3 * 0.0],
        ),
    ],
)
def test_hand_computed_three_items(scores, emb, lam, expected_idx, expected_val):
    """A 3-item case worked by hand: selection order and MMR values."""
    idx, val, ok = _run(np.array([scores], np.float32), np.array([emb], np.float32), 3, lam)

    assert expected_idx == idx[0].tolist()
    assert [True] * 3 == ok[0].tolist()
    np.testing.assert_allclose(expected_val, val[0], atol=1e-6)


def test_near_duplicate_of_top_item_is_not_second():
    """At lambda = 0.5 a near-duplicate of the top item is not picked second (at 1.0 it is)."""
    rng = np.random.default_rng(10)
    batch, n, dim = 8, 12, 16
    emb = rng.normal(size=(batch, n, dim)).astype(np.float32)
    emb[:, 1] = emb[:, 0] + 1e-3 * rng.normal(size=(batch, dim))
    scores = rng.uniform(0.5, 0.9, size=(batch, n)).astype(np.float32)
    scores[:, 0], scores[:, 1] = 1.0, 0.95

    diverse, _, _ = _run(scores, emb, 3, 0.5)
    relevance_only, _, _ = _run(scores, emb, 3, 1.0)

    assert [0] * batch == diverse[:, 0].tolist()
    assert not (diverse[:, 1] == 1).any()
    assert [1] * batch == relevance_only[:, 1].tolist()


def test_ties_break_to_lowest_index():
    """Equal objectives resolve to the lowest index, step after step."""
    scores = np.array([[0.5, 1.0, 0.2, 1.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
    emb = np.ones((2, 4, 3), np.float32)

    idx, _, _ = _run(scores, emb, 4, 1.0)
    flat, _, _ = _run(scores, emb, 4, 0.0)

    assert [[1, 3, 0, 2], [0, 1, 2, 3]] == idx.tolist()
    assert [[0, 1, 2, 3], [0, 1, 2, 3]] == flat.tolist()


def test_gradient_is_finite_and_flows_to_chosen_scores():
    """d sum(mmr_values) / d scores is lambda at chosen items and 0 elsewhere; no NaN."""
    rng = np.random.default_rng(12)
    scores, emb, where = _draw(rng, (2, 10, 4), k=4, lam=0.7, mask_prob=0.3)
    emb[0, np.flatnonzero(where[0])[0]] = 0.0  # a zero vector among the real candidates
    emb[~where] = np.nan

    def total(s, e):
        return mmr_select(s, e, k=4, lambda_=0.7, where=jnp.asarray(where))[1].sum()

    g_s, g_e = jax.jit(jax.grad(total, argnums=(0, 1)))(jnp.asarray(scores), jnp.asarray(emb))
    idx, _, ok = _run(scores, np.nan_to_num(emb), 4, 0.7, where)
    expected = np.zeros_like(scores)
    for b in range(2):
        expected[b, idx[b][ok[b]]] = 0.7

    np.testing.assert_allclose(expected, np.asarray(g_s), atol=1e-6)
    assert np.isfinite(np.asarray(g_e)).all()


@pytest.mark.parametrize(
    ("scores_shape", "emb_shape", "k", "lam"),
    [
        ((2, 5), (2, 5, 3), -1, 0.5),
        ((2, 5), (2, 5, 3), 2, 1.5),
        ((2, 5), (2, 4, 3), 2, 0.5),
        ((5,), (5, 3), 2, 0.5),
    ],
)
def test_static_misuse_raises_at_trace_time(scores_shape, emb_shape, k, lam):
    """A negative k, lambda outside [0, 1] or mismatched shapes raise ValueError."""
    with pytest.raises(ValueError, match=r"k must|lambda_ must|must be \["):
        mmr_select(jnp.zeros(scores_shape), jnp.zeros(emb_shape), k=k, lambda_=lam)


def test_k_zero_returns_empty_slots():
    """k = 0 returns [batch, 0] arrays of the documented dtypes."""
    idx, val, ok = mmr_select(jnp.zeros((3, 4)), jnp.ones((3, 4, 2)), k=0)

    assert [(3, 0), (3, 0), (3, 0)] == [idx.shape, val.shape, ok.shape]
    assert [jnp.int32, jnp.float32, jnp.bool_] == [idx.dtype, val.dtype, ok.dtype]
