"""
The "plain numpy" baseline of bench/bench_kernels.py: the rerankd model written the
obvious way, vectorised over the batch, in float32.

The encoder computes every one of the ``L`` slots of every block (boolean masks for
causality and left padding, padded slots zeroed after each block) and takes the last
slot; scoring gathers ``table[idx]``, takes the dot products with ``matmul``, adds the
features times their weights, and picks the top k with ``argpartition`` plus an
``argsort`` of the k. Imports only numpy, so it is also a model of what a numpy
deployment of the same model would cost.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["encode_users", "score_top_k"]

_LN_EPS = 1e-6
_MASKED_LOGIT = np.float32(-1e9)
_GELU_C = math.sqrt(2.0 / math.pi)


def _layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = np.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + _LN_EPS) * scale + bias


def _gelu(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation."""
    return 0.5 * x * (1.0 + np.tanh(_GELU_C * (x + 0.044715 * x**3)))


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _heads(x: np.ndarray, heads: int) -> np.ndarray:
    """[B, T, d] -> [B, H, T, d/H]."""
    b, t, d = x.shape
    return x.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3)


def _attention(
    p: dict[str, np.ndarray], pre: str, h: np.ndarray, allowed: np.ndarray, heads: int
) -> np.ndarray:
    q = _heads(h @ p[pre + "wq"] + p[pre + "bq"], heads)
    k = _heads(h @ p[pre + "wk"] + p[pre + "bk"], heads)
    v = _heads(h @ p[pre + "wv"] + p[pre + "bv"], heads)
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    weights = _softmax(np.where(allowed[:, None], logits, _MASKED_LOGIT))
    out = (weights @ v).transpose(0, 2, 1, 3).reshape(h.shape)
    return out @ p[pre + "wo"] + p[pre + "bo"]


def encode_users(
    p: dict[str, np.ndarray], seqs: np.ndarray, *, num_blocks: int, num_heads: int
) -> np.ndarray:
    """User vectors ``[B, d]`` float32 for left-padded item rows ``seqs [B, L]``."""
    real = seqs > 0
    length, dim = p["pos_emb"].shape
    x = (p["item_emb"][seqs] * math.sqrt(dim) + p["pos_emb"]) * real[..., None]
    allowed = np.tril(np.ones((length, length), bool))[None] & real[:, None, :]
    for i in range(num_blocks):
        b = f"block{i}."
        h = _layer_norm(x, p[b + "ln_attn.scale"], p[b + "ln_attn.bias"])
        x = x + _attention(p, b + "attn.", h, allowed, num_heads)
        h = _layer_norm(x, p[b + "ln_ffn.scale"], p[b + "ln_ffn.bias"])
        x = x + _gelu(h @ p[b + "ffn.w1"] + p[b + "ffn.b1"]) @ p[b + "ffn.w2"] + p[b + "ffn.b2"]
        x *= real[..., None]
    return _layer_norm(x[:, -1], p["ln_final.scale"], p["ln_final.bias"])


def score_top_k(
    table: np.ndarray,
    users: np.ndarray,
    idx: np.ndarray,
    features: np.ndarray,
    weights: np.ndarray,
    *,
    k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """
    ``(scores [B, N], top scores [B, k], top positions [B, k])``, best first.

    ``scores = <users[b], table[idx[b, n]]> + features[b, n] @ weights``.
    """
    dots = (table[idx] @ users[:, :, None])[..., 0]
    scores = dots + features @ weights
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    top_idx = np.take_along_axis(part, order, axis=1)
    return scores, np.take_along_axis(part_scores, order, axis=1), top_idx
