"""
The serving runtime: a model resident on one device, one compiled kernel per bucket.

All the executables are built by `Ranker.warmup()` before the first request.

Shapes. Requests are padded up to bucket sizes (batch ``B`` and candidate count
``N``, powers of two by default) and executed by an ahead-of-time compiled function
for that bucket (``jax.jit(...).lower(...).compile()``). A compiled executable accepts
only the exact shapes it was built for, so a request path *cannot* trigger a compile:
a request before `warmup()`, or beyond the largest bucket, is an error instead.

Where the user-item dot products are computed, and why:

- On an accelerator the item table stays on the device and the kernel gathers rows
  and takes the dot products itself (`kernels.scoring.gather_score_top_k`): only
  indices, mask and features go over the bus, and only scores and the top k return.
- On the CPU backend (float32) the fused scores are computed on the host by a
  compiled loop that reads each candidate row once (`kernels._hostscore`, which says
  what XLA's CPU gather costs instead), and the XLA kernel takes the top k
  (`kernels.scoring.top_k_candidates`). This is the path that keeps score + top-k of
  500 candidates for one user under 0.2 ms at p99 (bench/bench_kernels.py prints
  the figures); the host buffers are allocated once per bucket and reused.

The reused buffers make `Ranker` single-threaded per instance: calls are serialised
with a lock (the daemon runs all kernel calls on one worker thread anyway).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels._hostscore import BAD_FEATURE, BAD_INDEX, BAD_USER, OK, fused_scores_host
from kernels.sasrec import SasrecConfig, encode_users, item_table, param_shapes
from kernels.scoring import gather_score_top_k

__all__ = ["BATCH_BUCKETS", "CANDIDATE_BUCKETS", "Ranker", "Scored", "WarmupReport", "bucket_for"]

#: Default batch buckets (rows per kernel call) and candidate-count buckets.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CANDIDATE_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_HOST_ERRORS = {
    BAD_INDEX: "cand_idx: item indices must be in [0, {}]",
    BAD_USER: "user_vecs: must be finite",
    BAD_FEATURE: "features: must be finite",
}


def bucket_for(size: int, buckets: Sequence[int], *, what: str) -> int:
    """The smallest bucket that holds ``size``; ValueError naming ``what`` if none does."""
    for bucket in buckets:
        if size <= bucket:
            return bucket
    msg = f"{what}: at most {buckets[-1]} per call, got {size}"
    raise ValueError(msg)


@dataclasses.dataclass(frozen=True, slots=True)
class Scored:
    """
    One scoring call's result, trimmed to the request's shape ``[B, N]``.

    ``scores [B, N]`` (``-inf`` where masked); ``top_idx [B, k]`` positions in each
    candidate row, best first, ``-1`` past the row's valid candidates; ``top_scores
    [B, k]`` their scores. ``k`` is ``min(top_k, N)``.
    """

    scores: np.ndarray
    top_scores: np.ndarray
    top_idx: np.ndarray


@dataclasses.dataclass(frozen=True, slots=True)
class WarmupReport:
    """How many executables `warmup()` compiled, in how many seconds, on which device."""

    executables: int
    seconds: float
    device: str


class Ranker:
    """
    A model on a device plus its compiled encode and score kernels.

    ``params`` and ``config`` are a `kernels.sasrec` model; ``feature_weights [F]``
    fixes the number of per-item feature columns that `score` fuses (their values can
    change later with `set_feature_weights`, without recompiling). ``compute_dtype``
    ``"bfloat16"`` halves the resident parameters on an accelerator (scores stay
    float32; on the CPU it works but is slower than float32). ``host_scores`` forces
    the CPU path (True) or the accelerator path (False); by default the device decides.
    """

    def __init__(
        self,
        params: dict[str, Any],
        config: SasrecConfig,
        *,
        top_k: int = 20,
        feature_weights: Sequence[float] = (),
        batch_buckets: Sequence[int] = BATCH_BUCKETS,
        candidate_buckets: Sequence[int] = CANDIDATE_BUCKETS,
        device: jax.Device | None = None,
        compute_dtype: str = "float32",
        host_scores: bool | None = None,
    ) -> None:
        _check_params(params, config)
        if compute_dtype not in _DTYPES:
            msg = f"compute_dtype: must be one of {sorted(_DTYPES)}, got {compute_dtype!r}"
            raise ValueError(msg)
        self.config = config
        self.top_k = _positive(top_k, "top_k")
        self.batch_buckets = _buckets(batch_buckets, "batch_buckets")
        self.candidate_buckets = _buckets(candidate_buckets, "candidate_buckets")
        self.device = device or jax.devices()[0]
        self.host_scores = self._choose_host_scores(
            requested=host_scores, compute_dtype=compute_dtype
        )
        self._dtype = _DTYPES[compute_dtype]
        self._params = jax.device_put(
            {name: jnp.asarray(value, self._dtype) for name, value in params.items()},
            self.device,
        )
        # the table scores are taken against: item_emb, or an ensemble's side by side
        self._table = np.ascontiguousarray(item_table(params), np.float32)
        self._device_table = (
            self._params["item_emb"]  # one member: the same array, not a second copy
            if config.members == 1
            else jax.device_put(jnp.asarray(self._table, self._dtype), self.device)
        )
        self._num_features = len(feature_weights)
        self.set_feature_weights(feature_weights)
        self._encoders: dict[int, Any] = {}
        self._scorers: dict[tuple[int, int], Any] = {}
        self._buffers: dict[tuple[int, int], _Buffers] = {}  # device path
        self._host_scores: dict[tuple[int, int], np.ndarray] = {}  # CPU path
        self._all_valid = np.ones((0, 0), bool)
        self._no_features = np.zeros((0, 0, self._num_features), np.float32)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ set-up

    def _choose_host_scores(self, *, requested: bool | None, compute_dtype: str) -> bool:
        """Host-fused scores on a CPU device in float32 unless told otherwise."""
        possible = self.device.platform == "cpu" and compute_dtype == "float32"
        if requested and not possible:
            msg = "host_scores: only possible on a CPU device with compute_dtype float32"
            raise ValueError(msg)
        return possible if requested is None else requested

    def set_feature_weights(self, weights: Sequence[float]) -> None:
        """Replace the fusion weights (same count as at construction); no recompile."""
        if len(weights) != self._num_features:
            msg = f"feature_weights: expected {self._num_features} weights, got {len(weights)}"
            raise ValueError(msg)
        self._host_weights = _float_array(weights, "feature_weights", (self._num_features,))
        self._weights = jax.device_put(self._host_weights, self.device)

    @property
    def item_table(self) -> np.ndarray:
        """
        The item table ``[num_items + 1, vector_dim]`` as a float32 host array (row 0: padding).

        ``item_emb``, or an ensemble's members' tables side by side (`kernels.sasrec.item_table`).
        """
        return self._table

    @property
    def compile_count(self) -> int:
        """Executables compiled so far (fixed after `warmup()`)."""
        return len(self._encoders) + len(self._scorers)

    def warmup(self, *, scorers: bool = True) -> WarmupReport:
        """
        Compile every encode and score bucket; idempotent. Returns what it did.

        ``scorers=False`` compiles the encoders only, for a caller that scores on its
        own (the daemon on a CPU does, see `daemon.ranking`); `score` then refuses.
        """
        start = time.perf_counter()
        for b in self.batch_buckets:
            if b not in self._encoders:
                self._encoders[b] = self._compile_encoder(b)
            for n in self.candidate_buckets if scorers else ():
                if (b, n) not in self._scorers:
                    self._scorers[b, n] = self._compile_scorer(b, n)
                    self._allocate(b, n)
        return WarmupReport(self.compile_count, time.perf_counter() - start, str(self.device))

    def _allocate(self, b: int, n: int) -> None:
        """The host arrays one score bucket reuses: the scores (CPU) or the inputs (device)."""
        if self.host_scores:
            self._host_scores[b, n] = np.full((b, n), -np.inf, np.float32)
            if self._all_valid.shape[0] < b or self._all_valid.shape[1] < n:
                # constants shared by every bucket (sliced): a request without a mask or
                # features reads these instead of allocating its own
                shape = (max(b, self._all_valid.shape[0]), max(n, self._all_valid.shape[1]))
                self._all_valid = np.ones(shape, bool)
                self._no_features = np.zeros((*shape, self._num_features), np.float32)
        else:
            dtype = np.dtype(self._dtype)
            self._buffers[b, n] = _Buffers.allocate(
                b, n, self.config.vector_dim, self._num_features, dtype
            )

    def _compile_encoder(self, b: int) -> Any:
        seqs = jax.ShapeDtypeStruct((b, self.config.max_len), jnp.int32)
        fn = jax.jit(encode_users, static_argnames="config")
        return fn.lower(self._params, seqs, config=self.config).compile()

    def _compile_scorer(self, b: int, n: int) -> Any:
        k = min(self.top_k, n)
        spec = jax.ShapeDtypeStruct
        if self.host_scores:
            fn = jax.jit(_top_k_kernel, static_argnames="k")
            return fn.lower(spec((b, n), jnp.float32), k=k).compile()
        fn = jax.jit(_device_kernel, static_argnames="k")
        return fn.lower(
            self._device_table,
            spec((b, n), jnp.int32),
            spec((b, self.config.vector_dim), self._dtype),
            spec((b, n), jnp.bool_),
            spec((b, n, self._num_features), jnp.float32),
            self._weights,
            k=k,
        ).compile()

    # ---------------------------------------------------------------- requests

    def encode(self, seqs: np.ndarray) -> np.ndarray:
        """
        User vectors ``[B, d]`` float32 for left-padded item-index rows ``seqs [B, L]``.

        Items are ``1 .. num_items``, 0 is padding; rows are padded to the batch bucket.
        """
        seqs = _index_array(seqs, "seqs", self.config.num_items)
        if seqs.ndim != 2 or seqs.shape[1] != self.config.max_len:
            msg = f"seqs: expected shape [batch, {self.config.max_len}], got {list(seqs.shape)}"
            raise ValueError(msg)
        rows = seqs.shape[0]
        b = bucket_for(rows, self.batch_buckets, what="seqs rows")
        with self._lock:
            compiled = self._compiled(self._encoders, b)
            padded = np.zeros((b, self.config.max_len), np.int32)
            padded[:rows] = seqs
            return np.asarray(compiled(self._params, padded), np.float32)[:rows]

    def score(
        self,
        user_vecs: np.ndarray,
        cand_idx: np.ndarray,
        *,
        where: np.ndarray | None = None,
        features: np.ndarray | None = None,
    ) -> Scored:
        """
        Score candidates for users, fuse features, and take the top k.

        ``cand_idx [B, N]`` are model item indices (0 = an item the model does not
        know, scored by its features alone), ``user_vecs [B, d]``, ``features [B, N,
        F]`` fused by the feature weights; ``where [B, N]`` masks positions out.
        """
        user_vecs, cand_idx, where, features = self._check_score_shapes(
            user_vecs, cand_idx, where, features
        )
        rows, cols = cand_idx.shape
        b = bucket_for(rows, self.batch_buckets, what="user_vecs rows")
        n = bucket_for(cols, self.candidate_buckets, what="candidates")
        with self._lock:
            compiled = self._compiled(self._scorers, (b, n))
            if self.host_scores:
                out = self._host_scores[b, n]
                out.fill(-np.inf)
                code = fused_scores_host(
                    self._table,
                    user_vecs,
                    cand_idx,
                    self._all_valid[:rows, :cols] if where is None else where,
                    self._no_features[:rows, :cols] if features is None else features,
                    self._host_weights,
                    out,
                )
                if code != OK:
                    raise ValueError(_HOST_ERRORS[code].format(self.config.num_items))
                top_scores, top_idx = (np.asarray(x) for x in compiled(out))
                top_idx = np.where(top_scores > -np.inf, top_idx, -1)
                scores = out[:rows, :cols].copy()
            else:
                buf = self._buffers[b, n]
                self._check_values(user_vecs, cand_idx, features)
                buf.fill(user_vecs, cand_idx, where, features)
                out = compiled(
                    self._device_table,
                    buf.idx,
                    buf.users,
                    buf.where,
                    buf.features,
                    self._weights,
                )
                scores, top_scores, top_idx = (np.asarray(x) for x in out)
                scores = scores[:rows, :cols]
        k = min(self.top_k, cols)
        return Scored(scores, top_scores[:rows, :k], top_idx[:rows, :k])

    # ----------------------------------------------------------------- helpers

    def _compiled(self, table: dict[Any, Any], key: Any) -> Any:
        try:
            return table[key]
        except KeyError:
            msg = f"no compiled kernel for bucket {key}: call Ranker.warmup() before serving"
            raise RuntimeError(msg) from None

    def _check_score_shapes(
        self,
        user_vecs: np.ndarray,
        cand_idx: np.ndarray,
        where: np.ndarray | None,
        features: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Types and shapes only: the values are checked where they are read (see score)."""
        cand_idx = _index_dtype(cand_idx, "cand_idx")
        if cand_idx.ndim != 2:
            msg = f"cand_idx: expected shape [batch, candidates], got {list(cand_idx.shape)}"
            raise ValueError(msg)
        rows, cols = cand_idx.shape
        user_vecs = _float_shape(user_vecs, "user_vecs", (rows, self.config.vector_dim))
        if where is not None:
            where = _bool_array(where, (rows, cols))
        if features is not None:
            features = _float_shape(features, "features", (rows, cols, self._num_features))
        return user_vecs, cand_idx, where, features

    def _check_values(
        self, user_vecs: np.ndarray, cand_idx: np.ndarray, features: np.ndarray | None
    ) -> None:
        """The value checks the host loop makes as it reads, for the accelerator path."""
        _index_range(cand_idx, "cand_idx", self.config.num_items)
        _finite(user_vecs, "user_vecs")
        if features is not None:
            _finite(features, "features")


def _top_k_kernel(scores: jax.Array, *, k: int) -> tuple[jax.Array, jax.Array]:
    """
    The CPU path's compiled part: ``lax.top_k`` of host-fused scores, and nothing else.

    The host scores are finite or ``-inf`` (masked): the inputs were checked finite.
    So `top_k_candidates`' NaN guard is not needed, and its rewrite of picked ``-inf``
    slots to index -1 is done by the caller in numpy: every extra XLA fusion costs
    tens of microseconds on the CPU backend here (measured: one TopK op 15 µs at
    p50, the same with the guard and the rewrite 65-95 µs), more than the whole host
    loop. The scores are not returned either: the caller has them.
    """
    return lax.top_k(scores, k)


def _device_kernel(  # noqa: PLR0917 - the compiled signature, positional by design
    item_table: jax.Array,
    cand_idx: jax.Array,
    users: jax.Array,
    where: jax.Array,
    features: jax.Array,
    weights: jax.Array,
    *,
    k: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The accelerator path: gather, dot, features, mask, top k, all on the device."""
    return gather_score_top_k(
        item_table, users, cand_idx, k=k, features=features, weights=weights, where=where
    )


@dataclasses.dataclass(slots=True)
class _Buffers:
    """The device path's input arrays of one score bucket, reused (padding stays masked)."""

    users: np.ndarray
    idx: np.ndarray
    where: np.ndarray
    features: np.ndarray

    @classmethod
    def allocate(cls, b: int, n: int, d: int, f: int, dtype: np.dtype) -> _Buffers:
        """Zeroed buffers for a ``[b, n]`` bucket with ``d``-wide users, ``f`` features."""
        return cls(
            users=np.zeros((b, d), dtype),
            idx=np.zeros((b, n), np.int32),
            where=np.zeros((b, n), bool),
            features=np.zeros((b, n, f), np.float32),
        )

    def fill(
        self,
        users: np.ndarray,
        idx: np.ndarray,
        where: np.ndarray | None,
        features: np.ndarray | None,
    ) -> None:
        """Copy a request into the top-left corner; everything else is masked padding."""
        rows, cols = idx.shape
        self.users[:rows] = users
        self.users[rows:] = 0
        self.idx.fill(0)
        self.idx[:rows, :cols] = idx
        self.where.fill(False)  # noqa: FBT003 - numpy's fill takes a positional value
        self.where[:rows, :cols] = True if where is None else where
        self.features.fill(0.0)
        if features is not None:
            self.features[:rows, :cols] = features


# ------------------------------------------------------------------- validation


def _check_params(params: dict[str, Any], config: SasrecConfig) -> None:
    expected = param_shapes(config)
    got = {name: tuple(np.shape(value)) for name, value in params.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        wrong = sorted(n for n in set(got) & set(expected) if got[n] != expected[n])
        msg = (
            f"params: do not match the config (missing {missing}, unexpected {extra}, "
            f"wrong shape {wrong})"
        )
        raise ValueError(msg)


def _positive(value: int, what: str) -> int:
    if not isinstance(value, int) or value < 1:
        msg = f"{what}: must be a positive integer, got {value!r}"
        raise ValueError(msg)
    return value


def _buckets(values: Sequence[int], what: str) -> tuple[int, ...]:
    out = tuple(values)
    if (
        not out
        or any(not isinstance(v, int) or v < 1 for v in out)
        or list(out) != sorted(set(out))
    ):
        msg = f"{what}: must be strictly increasing positive integers, got {list(out)}"
        raise ValueError(msg)
    return out


def _index_dtype(values: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if not np.issubdtype(arr.dtype, np.integer):
        msg = f"{what}: must hold integer item indices, got dtype {arr.dtype}"
        raise ValueError(msg)
    return np.ascontiguousarray(arr, np.int32)


def _index_range(arr: np.ndarray, what: str, num_items: int) -> None:
    if arr.size and (arr.min() < 0 or arr.max() > num_items):
        msg = f"{what}: item indices must be in [0, {num_items}]"
        raise ValueError(msg)


def _index_array(values: np.ndarray, what: str, num_items: int) -> np.ndarray:
    arr = _index_dtype(values, what)
    _index_range(arr, what, num_items)
    return arr


def _float_shape(values: np.ndarray, what: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.ascontiguousarray(values, np.float32)
    if arr.shape != shape:
        msg = f"{what}: expected shape {list(shape)}, got {list(arr.shape)}"
        raise ValueError(msg)
    return arr


def _finite(arr: np.ndarray, what: str) -> None:
    if not np.isfinite(arr).all():
        msg = f"{what}: must be finite"
        raise ValueError(msg)


def _float_array(values: np.ndarray, what: str, shape: tuple[int, ...]) -> np.ndarray:
    arr = _float_shape(values, what, shape)
    _finite(arr, what)
    return arr


def _bool_array(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype != np.bool_ or arr.shape != shape:
        msg = (
            f"where: expected a boolean array of shape {list(shape)}, "
            f"got {arr.dtype} {list(arr.shape)}"
        )
        raise ValueError(msg)
    return arr
