"""
`kernels.runtime.Ranker`: bucketed, ahead-of-time compiled serving on the CPU, in both
the host-scores path and the accelerator (device-gather) path, against float64 numpy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.monitoring
import numpy as np
import pytest
import sasrec_numpy as ref

from kernels.runtime import Ranker, bucket_for
from kernels.sasrec import SasrecConfig, init_params

_CONFIG = SasrecConfig(num_items=50, max_len=6, dim=16, num_blocks=2, num_heads=2)
_BATCH = (1, 4)
_CANDS = (8, 32)
_WEIGHTS = (0.5, -1.5)
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_compiles: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, _secs, **_kw: _compiles.append(name) if name == _COMPILE_EVENT else None
)


@pytest.fixture(name="params", scope="module")
def fixture_params() -> dict[str, np.ndarray]:
    """Random model parameters with non-trivial biases."""
    params = init_params(jax.random.key(0), _CONFIG)
    rng = np.random.default_rng(0)
    return {
        n: np.asarray(v) + (0.2 * rng.standard_normal(v.shape) if v.ndim == 1 else 0)
        for n, v in params.items()
    }


@pytest.fixture(name="ranker", scope="module", params=[True, False], ids=["host", "device"])
def fixture_ranker(request: pytest.FixtureRequest, params: dict[str, np.ndarray]) -> Ranker:
    """A warmed-up Ranker once per scoring path: host (on the CPU) and the default device."""
    ranker = Ranker(
        params,
        _CONFIG,
        top_k=5,
        feature_weights=_WEIGHTS,
        batch_buckets=_BATCH,
        candidate_buckets=_CANDS,
        host_scores=request.param,
        device=jax.devices("cpu")[0] if request.param else None,
    )
    ranker.warmup()
    return ranker


def _request(seed: int, rows: int, cols: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    where = rng.random((rows, cols)) < 0.8
    return {
        "user_vecs": rng.standard_normal((rows, _CONFIG.dim)).astype(np.float32),
        "cand_idx": rng.integers(0, _CONFIG.num_items + 1, (rows, cols)),
        "where": where,
        "features": rng.random((rows, cols, len(_WEIGHTS))).astype(np.float32),
    }


def _reference(params: dict[str, np.ndarray], req: dict[str, np.ndarray]) -> np.ndarray:
    table = params["item_emb"].astype(np.float64)
    dots = np.einsum("bd,bnd->bn", req["user_vecs"].astype(np.float64), table[req["cand_idx"]])
    fused = dots + req["features"].astype(np.float64) @ np.asarray(_WEIGHTS)
    return np.where(req["where"], fused, -np.inf)


@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (1, 8), (3, 9), (4, 32), (2, 20)])
def test_scores_and_top_k_match_float64(ranker: Ranker, params: dict, rows: int, cols: int) -> None:
    """Scores equal float64; the top k is its best-first order; padding never shows."""
    req = _request(rows * 100 + cols, rows, cols)
    out = ranker.score(**req)
    expected = _reference(params, req)
    assert out.scores.shape == (rows, cols)
    np.testing.assert_array_equal(np.isfinite(out.scores), req["where"])
    np.testing.assert_allclose(
        out.scores[req["where"]], expected[req["where"]], rtol=1e-5, atol=1e-5
    )
    k = min(5, cols)
    assert out.top_idx.shape == out.top_scores.shape == (rows, k)
    for r in range(rows):
        valid = np.flatnonzero(req["where"][r])
        order = valid[np.argsort(-expected[r, valid], kind="stable")][:k]
        np.testing.assert_array_equal(out.top_idx[r, : len(order)], order)
        assert (out.top_idx[r, len(order) :] == -1).all()
        np.testing.assert_allclose(out.top_scores[r, : len(order)], expected[r, order], rtol=1e-5)


def test_encode_matches_float64_reference(ranker: Ranker, params: dict) -> None:
    """Ranker.encode equals the numpy reference for rows of every length, across buckets."""
    rng = np.random.default_rng(7)
    for rows in (1, 3, 4):
        seqs = np.zeros((rows, _CONFIG.max_len), np.int64)
        for r in range(rows):
            n = (r * 3 + rows) % (_CONFIG.max_len + 1)
            if n:
                seqs[r, -n:] = rng.integers(1, _CONFIG.num_items + 1, n)
        expected = ref.encode_users(params, seqs, num_blocks=2, num_heads=2)
        np.testing.assert_allclose(ranker.encode(seqs), expected, rtol=1e-5, atol=2e-5)


def test_no_compile_after_warmup(ranker: Ranker) -> None:
    """Many requests of varied shapes after warm-up compile nothing; the count stays fixed."""
    assert ranker.compile_count == len(_BATCH) + len(_BATCH) * len(_CANDS)
    before = len(_compiles)
    rng = np.random.default_rng(3)
    for i in range(60):
        rows, cols = int(rng.integers(1, 5)), int(rng.integers(1, 33))
        ranker.score(**_request(i, rows, cols))
        seqs = rng.integers(0, _CONFIG.num_items + 1, (rows, _CONFIG.max_len))
        ranker.encode(seqs)
    assert len(_compiles) == before
    assert ranker.compile_count == len(_BATCH) + len(_BATCH) * len(_CANDS)
    assert ranker.warmup().executables == ranker.compile_count
    assert len(_compiles) == before  # warm-up again is a no-op


def test_feature_weights_change_without_recompile(params: dict) -> None:
    """set_feature_weights changes the scores and compiles nothing."""
    ranker = Ranker(
        params, _CONFIG, feature_weights=(1.0,), batch_buckets=(1,), candidate_buckets=(8,)
    )
    ranker.warmup()
    before = len(_compiles)
    idx = np.array([[0, 0]])
    feats = np.array([[[2.0], [3.0]]], np.float32)
    vec = np.zeros((1, _CONFIG.dim), np.float32)
    np.testing.assert_allclose(ranker.score(vec, idx, features=feats).scores, [[2.0, 3.0]])
    ranker.set_feature_weights((-1.0,))
    np.testing.assert_allclose(ranker.score(vec, idx, features=feats).scores, [[-2.0, -3.0]])
    assert len(_compiles) == before


def test_request_before_warmup_is_refused(params: dict) -> None:
    """Without warm-up a request is refused instead of compiling on the request path."""
    ranker = Ranker(params, _CONFIG, batch_buckets=(1,), candidate_buckets=(8,))
    with pytest.raises(RuntimeError, match=r"call Ranker.warmup\(\) before serving"):
        ranker.score(np.zeros((1, _CONFIG.dim)), np.zeros((1, 3), np.int32))
    with pytest.raises(RuntimeError, match="warmup"):
        ranker.encode(np.zeros((1, _CONFIG.max_len), np.int32))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cand_idx": np.full((2, 3), 51)}, r"cand_idx: item indices must be in \[0, 50\]"),
        ({"cand_idx": np.full((2, 3), -1)}, r"cand_idx: item indices must be in \[0, 50\]"),
        ({"cand_idx": np.zeros((2, 3), np.float32)}, "cand_idx: must hold integer item indices"),
        (
            {"cand_idx": np.zeros((2, 33), np.int32), "features": np.zeros((2, 33, 2))},
            "candidates: at most 32 per call, got 33",
        ),
        ({"cand_idx": np.zeros(3, np.int32)}, r"cand_idx: expected shape \[batch, candidates\]"),
        ({"user_vecs": np.zeros((2, 15))}, r"user_vecs: expected shape \[2, 16\]"),
        ({"user_vecs": np.full((2, 16), np.nan)}, "user_vecs: must be finite"),
        ({"features": np.full((2, 3, 2), np.inf)}, "features: must be finite"),
        ({"features": np.zeros((2, 3))}, r"features: expected shape \[2, 3, 2\]"),
        ({"where": np.ones((2, 3), np.int8)}, "where: expected a boolean array"),
    ],
)
def test_bad_requests_name_the_field(ranker: Ranker, change: dict, message: str) -> None:
    """Each malformed request is refused with a message naming the field and the rule."""
    req = {
        "user_vecs": np.zeros((2, 16), np.float32),
        "cand_idx": np.zeros((2, 3), np.int32),
        "features": np.zeros((2, 3, 2), np.float32),
    } | change
    with pytest.raises(ValueError, match=message):
        ranker.score(**req)


def test_too_many_rows_is_refused(ranker: Ranker) -> None:
    """More rows than the largest batch bucket are refused, naming the limit."""
    with pytest.raises(ValueError, match="seqs rows: at most 4 per call, got 5"):
        ranker.encode(np.zeros((5, _CONFIG.max_len), np.int32))


def test_bfloat16_scores_within_bound(params: dict) -> None:
    """compute_dtype=bfloat16 (device path) stays within the bfloat16 bound of float64."""
    ranker = Ranker(
        params,
        _CONFIG,
        feature_weights=_WEIGHTS,
        batch_buckets=(4,),
        candidate_buckets=(32,),
        compute_dtype="bfloat16",
    )
    assert not ranker.host_scores
    ranker.warmup()
    req = _request(11, 4, 30)
    out = ranker.score(**req)
    expected = _reference(params, req)
    mask = req["where"]
    err = np.abs(out.scores[mask] - expected[mask]).max() / np.abs(expected[mask]).max()
    assert err < 2e-2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compute_dtype": "float16"}, "compute_dtype: must be one of"),
        ({"top_k": 0}, "top_k: must be a positive integer"),
        ({"batch_buckets": (4, 2)}, "batch_buckets: must be strictly increasing"),
        ({"candidate_buckets": ()}, "candidate_buckets: must be strictly increasing"),
        ({"compute_dtype": "bfloat16", "host_scores": True}, "host_scores: only possible"),
    ],
)
def test_bad_options_are_refused(params: dict, kwargs: dict, message: str) -> None:
    """A bad constructor option is refused with a message naming it."""
    with pytest.raises(ValueError, match=message):
        Ranker(params, _CONFIG, **kwargs)


def test_params_must_match_config(params: dict) -> None:
    """Params of another shape than the config are refused, naming what is wrong."""
    bad = dict(params)
    bad["pos_emb"] = np.zeros((7, 16), np.float32)
    del bad["ln_final.bias"]
    with pytest.raises(ValueError, match=r"missing \['ln_final.bias'\].*wrong shape \['pos_emb'\]"):
        Ranker(bad, _CONFIG)


def test_bucket_for() -> None:
    """bucket_for picks the smallest bucket that fits and names the limit otherwise."""
    assert [bucket_for(n, (1, 4, 16), what="x") for n in (1, 2, 4, 5, 16)] == [1, 4, 4, 16, 16]
    with pytest.raises(ValueError, match="x: at most 16 per call, got 17"):
        bucket_for(17, (1, 4, 16), what="x")


@pytest.mark.parametrize("host", [True, False], ids=["host", "device"])
def test_an_ensemble_ranks_by_the_mean_of_its_members(*, host: bool) -> None:
    """
    A 2-member model on both scoring paths: a user's vector from `encode` against the
    candidates scores the mean of what each member alone scores them (plus features).
    """
    config = dataclasses.replace(_CONFIG, members=2)
    params = {n: np.asarray(v) for n, v in init_params(jax.random.key(3), config).items()}
    ranker = Ranker(params, config, top_k=5, feature_weights=_WEIGHTS, batch_buckets=_BATCH,
                    candidate_buckets=_CANDS, host_scores=host,
                    device=jax.devices("cpu")[0] if host else None)  # fmt: skip
    ranker.warmup()
    assert ranker.item_table.shape == (_CONFIG.num_items + 1, 2 * _CONFIG.dim)
    seqs = np.array([[0, 0, 5, 9, 2, 7], [0, 0, 0, 0, 0, 11]], np.int64)
    users = ranker.encode(seqs)
    assert users.shape == (2, 2 * _CONFIG.dim)
    req = _request(11, 2, 8) | {"user_vecs": users}
    out = ranker.score(**req)
    members = []
    for k in range(2):
        member = {n: v[k] for n, v in params.items()}
        vecs = ref.encode_users(member, seqs, num_blocks=2, num_heads=2)
        members.append(np.einsum("bd,bnd->bn", vecs, member["item_emb"][req["cand_idx"]]))
    expected = np.mean(members, axis=0) + req["features"].astype(np.float64) @ np.asarray(_WEIGHTS)
    np.testing.assert_allclose(out.scores[req["where"]], expected[req["where"]], rtol=1e-4,
                               atol=1e-4)  # fmt: skip
