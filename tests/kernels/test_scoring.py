"""
`kernels.scoring` and the host loop `kernels._hostscore` against float64 numpy, on fresh
random inputs: fused scores, masks, top k, padding, permutations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels._hostscore import BAD_FEATURE, BAD_INDEX, BAD_USER, OK, fused_scores_host
from kernels.scoring import (
    candidate_scores,
    fuse_scores,
    fuse_top_k,
    gather_score_top_k,
    top_k_candidates,
)

_REL_BOUND = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _problem(seed: int, *, b: int = 4, n: int = 37, d: int = 16, f: int = 3, v: int = 60) -> dict:
    """A random scoring problem: table (row 0 zero), users, indices, features, weights, mask."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((v + 1, d)).astype(np.float32)
    table[0] = 0
    where = rng.random((b, n)) < 0.8
    where[0, :] = True
    where[-1, :] = False  # one fully masked row
    return {
        "table": table,
        "users": rng.standard_normal((b, d)).astype(np.float32),
        "idx": rng.integers(0, v + 1, (b, n)).astype(np.int32),
        "features": rng.random((b, n, f)).astype(np.float32),
        "weights": rng.standard_normal(f).astype(np.float32),
        "where": where,
    }


def _reference_scores(p: dict) -> np.ndarray:
    """float64: <u_b, table[idx_bn]> + features_bn . w, -inf where masked."""
    t, u = p["table"].astype(np.float64), p["users"].astype(np.float64)
    dots = np.einsum("bd,bnd->bn", u, t[p["idx"]])
    fused = dots + p["features"].astype(np.float64) @ p["weights"].astype(np.float64)
    return np.where(p["where"], fused, -np.inf)


def _reference_top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best first, ties to the lowest index, -1 / -inf past the valid (finite) entries."""
    idx = np.full((scores.shape[0], k), -1)
    val = np.full((scores.shape[0], k), -np.inf)
    for r, row in enumerate(scores):
        order = [
            i for i in sorted(range(len(row)), key=lambda i: (-row[i], i)) if np.isfinite(row[i])
        ]
        idx[r, : len(order[:k])] = order[:k]
        val[r, : len(order[:k])] = row[order[:k]]
    return val, idx


def _assert_close_scores(actual: np.ndarray, expected: np.ndarray, bound: float) -> None:
    actual = np.asarray(actual, np.float64)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(actual), finite)
    err = np.abs(actual[finite] - expected[finite]).max() / np.abs(expected[finite]).max()
    assert err < bound


@pytest.mark.parametrize("seed", range(3))
def test_candidate_scores_match_float64(seed: int) -> None:
    """candidate_scores on gathered rows equals the float64 reference; masked slots are -inf."""
    p = _problem(seed)
    actual = candidate_scores(
        p["users"],
        p["table"][p["idx"]],
        features=p["features"],
        weights=p["weights"],
        where=p["where"],
    )
    assert actual.dtype == jnp.float32
    _assert_close_scores(actual, _reference_scores(p), _REL_BOUND[jnp.float32])


def test_candidate_scores_in_bfloat16_within_bound() -> None:
    """bfloat16 users and embeddings give float32 scores within the bfloat16 bound."""
    p = _problem(5)
    actual = candidate_scores(
        jnp.asarray(p["users"], jnp.bfloat16),
        jnp.asarray(p["table"][p["idx"]], jnp.bfloat16),
        features=p["features"],
        weights=p["weights"],
        where=p["where"],
    )
    assert actual.dtype == jnp.float32
    _assert_close_scores(actual, _reference_scores(p), _REL_BOUND[jnp.bfloat16])


@pytest.mark.parametrize("seed", range(3))
def test_host_loop_matches_float64(seed: int) -> None:
    """The numba host loop gives the same fused scores as the reference, -inf where masked."""
    p = _problem(seed)
    out = np.full((6, 40), 7.0, np.float32)  # larger than the request: corner only
    fused_scores_host(
        p["table"], p["users"], p["idx"], p["where"], p["features"], p["weights"], out
    )
    _assert_close_scores(out[:4, :37], _reference_scores(p), _REL_BOUND[jnp.float32])
    assert (out[4:] == 7.0).all()
    assert (out[:, 37:] == 7.0).all()


@pytest.mark.parametrize("k", [1, 5, 37])
def test_top_k_matches_stable_reference(k: int) -> None:
    """top_k_candidates picks best first, ties to the lowest index, -1 past the valid ones."""
    rng = np.random.default_rng(k)
    scores = rng.integers(0, 6, (5, 37)).astype(np.float32)  # many exact ties
    where = rng.random((5, 37)) < 0.7
    where[2] = False
    where[3] = False
    where[3, [4, 9]] = True  # fewer valid than k
    masked = np.where(where, scores, -np.inf)
    exp_val, exp_idx = _reference_top_k(masked, k)
    val, idx = top_k_candidates(jnp.asarray(scores), k=k, where=jnp.asarray(where))
    np.testing.assert_array_equal(idx, exp_idx)
    np.testing.assert_array_equal(val, exp_val)


def test_top_k_treats_nan_and_minus_inf_as_invalid() -> None:
    """A NaN or -inf score never reaches the top k, even without a mask."""
    scores = jnp.array([[1.0, jnp.nan, -jnp.inf, 0.5]])
    val, idx = top_k_candidates(scores, k=4)
    np.testing.assert_array_equal(idx, [[0, 3, -1, -1]])
    np.testing.assert_array_equal(val, [[1.0, 0.5, -np.inf, -np.inf]])


def test_top_k_refuses_k_out_of_range() -> None:
    """k larger than the candidate count is refused at trace time, naming k."""
    with pytest.raises(ValueError, match=r"k: must be in \[1, 3\]"):
        top_k_candidates(jnp.zeros((1, 3)), k=4)


@pytest.mark.parametrize("seed", range(2))
def test_gather_path_equals_gathered_path(seed: int) -> None:
    """gather_score_top_k (device gather) equals fuse_top_k over reference scores."""
    p = _problem(seed)
    scores, val, idx = jax.jit(gather_score_top_k, static_argnames="k")(
        p["table"],
        p["users"],
        p["idx"],
        k=10,
        features=p["features"],
        weights=p["weights"],
        where=p["where"],
    )
    expected = _reference_scores(p)
    _assert_close_scores(scores, expected, _REL_BOUND[jnp.float32])
    exp_val, exp_idx = _reference_top_k(expected, 10)
    np.testing.assert_array_equal(idx, exp_idx)
    np.testing.assert_allclose(val, exp_val, rtol=1e-5)


def test_padding_index_scores_by_features_alone() -> None:
    """Index 0 (an item the model does not know) scores exactly features . weights."""
    p = _problem(1)
    p["idx"][:] = 0
    scores = fuse_scores(
        jnp.einsum("bd,bnd->bn", p["users"], p["table"][p["idx"]]),
        features=p["features"],
        weights=p["weights"],
    )
    np.testing.assert_allclose(scores, p["features"] @ p["weights"], rtol=1e-6)


def test_features_require_weights() -> None:
    """Features without weights are refused, naming weights."""
    with pytest.raises(ValueError, match="weights: required"):
        fuse_scores(jnp.zeros((1, 2)), features=jnp.zeros((1, 2, 1)))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), extra=st.integers(1, 9))
def test_permutation_equivariant_and_padding_invariant(seed: int, extra: int) -> None:
    """
    Permuting candidates permutes scores and keeps the chosen items; appending masked
    candidates changes neither the scores of the others nor the result.
    """
    p = _problem(seed % 1000, b=2, n=12)
    p["where"][:] = True
    k = 5
    scores, _, idx = fuse_top_k(
        candidate_scores(p["users"], p["table"][p["idx"]]),
        k=k,
        features=p["features"],
        weights=p["weights"],
    )
    perm = np.random.default_rng(seed).permutation(12)
    s2, _, idx2 = fuse_top_k(
        candidate_scores(p["users"], p["table"][p["idx"][:, perm]]),
        k=k,
        features=p["features"][:, perm],
        weights=p["weights"],
    )
    np.testing.assert_allclose(s2, np.asarray(scores)[:, perm], rtol=1e-6, atol=1e-5)
    for row in range(2):
        picked = {int(p["idx"][row, i]) for i in np.asarray(idx)[row]}
        assert picked == {int(p["idx"][row, perm[i]]) for i in np.asarray(idx2)[row]}
    pad_idx = np.concatenate([p["idx"], np.zeros((2, extra), np.int32)], axis=1)
    pad_feat = np.concatenate([p["features"], np.full((2, extra, 3), 1e6, np.float32)], axis=1)
    where = np.arange(12 + extra) < 12
    s3, _, idx3 = fuse_top_k(
        candidate_scores(p["users"], p["table"][pad_idx]),
        k=k,
        features=pad_feat,
        weights=p["weights"],
        where=np.broadcast_to(where, (2, 12 + extra)),
    )
    np.testing.assert_allclose(np.asarray(s3)[:, :12], scores, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(idx3, idx)


def test_vmap_over_requests() -> None:
    """vmap of fuse_top_k over a leading request axis equals a loop of calls."""
    p = _problem(3)
    dots = jnp.einsum("bd,bnd->bn", p["users"], p["table"][p["idx"]])
    stacked = jnp.stack([dots, dots * 2])
    batched = jax.vmap(lambda s: fuse_top_k(s, k=4, where=jnp.asarray(p["where"])))(stacked)
    for i in range(2):
        single = fuse_top_k(stacked[i], k=4, where=jnp.asarray(p["where"]))
        for a, b in zip(batched, single, strict=True):
            np.testing.assert_array_equal(a[i], b)


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [("idx", 61, BAD_INDEX), ("idx", -1, BAD_INDEX), ("users", np.nan, BAD_USER),
     ("features", np.inf, BAD_FEATURE)],
)  # fmt: skip
def test_host_loop_reports_bad_values(field: str, value: float, code: int) -> None:
    """The host loop checks what it reads: an index off the table or a non-finite value."""
    p = _problem(7)
    assert fused_scores_host(
        p["table"], p["users"], p["idx"], p["where"], p["features"], p["weights"],
        np.zeros((4, 37), np.float32),
    ) == OK  # fmt: skip
    p[field][(1,) * p[field].ndim] = value
    out = np.zeros((4, 37), np.float32)
    got = fused_scores_host(
        p["table"], p["users"], p["idx"], p["where"], p["features"], p["weights"], out
    )
    assert got == code
