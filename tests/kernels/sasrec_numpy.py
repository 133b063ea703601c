"""
The SASRec encoder written again in plain numpy, straight from the definition, with
no code shared with `kernels.sasrec`: the float64 reference of the tests (and of
bench/bench_kernels.py's correctness check; its timed numpy baseline is the batched
bench/_numpy_baseline.py).

Padded query slots are skipped outright here (the kernel computes and then zeroes
them), so a leak from padding would show up as a difference.
"""

from __future__ import annotations

import math

import numpy as np


def layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def gelu(x):
    """The tanh approximation of GELU (Hendrycks and Gimpel 2016, eq. in section 2)."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def attention(p, prefix, q_in, kv_in, heads):
    """Attention of the rows of q_in [Q, d] over kv_in [T, d]; query j may see keys <= its slot."""
    d = q_in.shape[-1]
    c = d // heads
    q = (q_in @ p[prefix + "wq"] + p[prefix + "bq"]).reshape(-1, heads, c)
    k = (kv_in @ p[prefix + "wk"] + p[prefix + "bk"]).reshape(-1, heads, c)
    v = (kv_in @ p[prefix + "wv"] + p[prefix + "bv"]).reshape(-1, heads, c)
    out = np.empty_like(q)
    for j in range(q.shape[0]):  # query j is the (T - Q + j)-th slot of kv_in
        visible = kv_in.shape[0] - q.shape[0] + j + 1
        for h in range(heads):
            w = softmax(k[:visible, h] @ q[j, h] / math.sqrt(c))
            out[j, h] = w @ v[:visible, h]
    return out.reshape(-1, d) @ p[prefix + "wo"] + p[prefix + "bo"]


def encode_row(p, seq, *, num_blocks, num_heads, all_slots=False):
    """
    One user's output: the vector at the last slot, or with all_slots the outputs
    [L, d] with zero rows at padded slots. `seq` is left-padded with 0.
    """
    length = len(seq)
    d = p["item_emb"].shape[1]
    # A padded slot's state is zero through every block, so its output is LN(0).
    pad_out = layer_norm(np.zeros(d, p["item_emb"].dtype), p["ln_final.scale"], p["ln_final.bias"])
    real = [t for t in range(length) if seq[t] > 0]
    if not real:
        return np.tile(pad_out, (length, 1)) if all_slots else pad_out
    first = real[0]
    x = p["item_emb"][seq[first:]] * math.sqrt(d) + p["pos_emb"][first:]
    for i in range(num_blocks):
        b = f"block{i}."
        h = layer_norm(x, p[b + "ln_attn.scale"], p[b + "ln_attn.bias"])
        x = x + attention(p, b + "attn.", h, h, num_heads)
        h = layer_norm(x, p[b + "ln_ffn.scale"], p[b + "ln_ffn.bias"])
        x = x + gelu(h @ p[b + "ffn.w1"] + p[b + "ffn.b1"]) @ p[b + "ffn.w2"] + p[b + "ffn.b2"]
    out = layer_norm(x, p["ln_final.scale"], p["ln_final.bias"])
    if not all_slots:
        return out[-1]
    full = np.tile(pad_out, (length, 1))
    full[first:] = out
    return full


def encode_users(p, seqs, *, num_blocks, num_heads, dtype=np.float64):
    """User vectors [B, d] for left-padded `seqs` [B, L], computed row by row in `dtype`."""
    q = {name: np.asarray(value, dtype) for name, value in p.items()}
    return np.stack(
        [encode_row(q, row, num_blocks=num_blocks, num_heads=num_heads) for row in np.asarray(seqs)]
    )
