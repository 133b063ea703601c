"""
The sequential user encoder: a SASRec-style transformer over a user's recent items.

A user's history is a row of ``L`` item indices, **left-padded** with 0: the most
recent item is always in the last slot, so the last slot's output is the user's vector
and always sees the same position embedding. Items are ``1 .. num_items``; 0 is
padding and never an item.

Pure functions of ``(params, inputs)``; ``config`` is a hashable dataclass passed as a
static argument (``jax.jit(encode_users, static_argnames="config")``). Parameters are
a flat ``dict[str, Array]`` with dotted names, so they map one to one onto tensors in
a model file.

**Ensembles.** A model of ``members = K > 1`` is K encoders trained side by side from
different initialisations (and dropout): every parameter has a leading axis of size
K. It is still one dot-product model: a user's vector is the concatenation of the
members' vectors divided by K, ``[d * K]``, and the item table the concatenation of
their item embeddings, ``[V + 1, d * K]`` (:func:`item_table`), so a score is the
mean of the members' scores and every consumer of (user vector, item table) serves
an ensemble unchanged. The member count is read from the parameters' shapes, so a
caller may train K members and keep fewer (a slice of the leading axis).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

__all__ = [
    "SasrecConfig",
    "encode_users",
    "init_params",
    "item_logits",
    "item_table",
    "members_of",
    "param_shapes",
    "sequence_outputs",
]

#: Added to attention logits of masked keys. Finite (not -inf) so that a padded query,
#: whose keys are all masked, gets a uniform softmax instead of NaN; its output is
#: zeroed by the timeline mask anyway.
_MASKED_LOGIT = -1e9
_LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True, slots=True)
class SasrecConfig:
    """
    Hyper-parameters of the encoder. Hashable, so it can be a static jit argument.

    ``num_items`` is the item-vocabulary size V (the embedding table has V + 1 rows,
    row 0 being padding); ``max_len`` is L; ``dim`` is d; ``ffn_dim`` defaults to d.
    ``dropout`` applies to embeddings, attention weights and both residual branches,
    only when a dropout key is given (training). ``members`` is the ensemble size
    (module docstring); users and items are then vectors of ``vector_dim = dim *
    members``.
    """

    num_items: int
    max_len: int = 50
    dim: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    ffn_dim: int = 0
    dropout: float = 0.2
    members: int = 1

    def __post_init__(self) -> None:
        for name in ("num_items", "max_len", "dim", "num_blocks", "num_heads", "members"):
            if getattr(self, name) < 1:
                msg = f"SasrecConfig.{name}: must be at least 1, got {getattr(self, name)}"
                raise ValueError(msg)
        if self.dim % self.num_heads:
            msg = (
                f"SasrecConfig.dim: must be divisible by num_heads ({self.num_heads}), "
                f"got {self.dim}"
            )
            raise ValueError(msg)
        if not 0.0 <= self.dropout < 1.0:
            msg = f"SasrecConfig.dropout: must be in [0, 1), got {self.dropout}"
            raise ValueError(msg)
        if self.ffn_dim == 0:
            object.__setattr__(self, "ffn_dim", self.dim)

    @property
    def vector_dim(self) -> int:
        """The width of a user vector and of an item-table row: ``dim * members``."""
        return self.dim * self.members

    @property
    def member(self) -> SasrecConfig:
        """The configuration of one member (``members = 1``)."""
        return dataclasses.replace(self, members=1)

    def to_dict(self) -> dict[str, int | float]:
        """The hyper-parameters as a plain JSON-able dict (``SasrecConfig(**d)`` inverts it)."""
        return dataclasses.asdict(self)


def param_shapes(config: SasrecConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter, in a fixed order."""
    d, f = config.dim, config.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {
        "item_emb": (config.num_items + 1, d),
        "pos_emb": (config.max_len, d),
    }
    for i in range(config.num_blocks):
        p = f"block{i}."
        shapes |= {
            p + "ln_attn.scale": (d,), p + "ln_attn.bias": (d,),
            p + "attn.wq": (d, d), p + "attn.bq": (d,),
            p + "attn.wk": (d, d), p + "attn.bk": (d,),
            p + "attn.wv": (d, d), p + "attn.bv": (d,),
            p + "attn.wo": (d, d), p + "attn.bo": (d,),
            p + "ln_ffn.scale": (d,), p + "ln_ffn.bias": (d,),
            p + "ffn.w1": (d, f), p + "ffn.b1": (f,),
            p + "ffn.w2": (f, d), p + "ffn.b2": (d,),
        }  # fmt: skip
    shapes |= {"ln_final.scale": (d,), "ln_final.bias": (d,)}
    if config.members > 1:
        shapes = {name: (config.members, *shape) for name, shape in shapes.items()}
    return shapes


def init_params(key: jax.Array, config: SasrecConfig) -> dict[str, jax.Array]:
    """
    Fresh float32 parameters for ``config``.

    Embeddings ~ N(0, 1/d) (row 0 zero), weight matrices ~ N(0, 1/fan_in), layer-norm
    scales 1, every bias 0. An ensemble's members are initialised from
    ``split(key, members)``.
    """
    if config.members > 1:
        member = config.member
        return jax.vmap(lambda k: init_params(k, member))(jax.random.split(key, config.members))
    shapes = param_shapes(config)
    keys = dict(zip(shapes, jax.random.split(key, len(shapes)), strict=True))
    params: dict[str, jax.Array] = {}
    for name, shape in shapes.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "scale":
            params[name] = jnp.ones(shape, jnp.float32)
        elif len(shape) == 1:
            params[name] = jnp.zeros(shape, jnp.float32)
        else:
            std = 1.0 / math.sqrt(config.dim if name.endswith("_emb") else shape[0])
            params[name] = std * jax.random.normal(keys[name], shape, jnp.float32)
    params["item_emb"] = params["item_emb"].at[0].set(0.0)
    return params


# ----------------------------------------------------------------------------- pieces


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + _LN_EPS) * scale + bias


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def _split_heads(x: jax.Array, heads: int) -> jax.Array:
    """[B, T, d] -> [B, T, H, d/H]."""
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def _attention(
    params: dict[str, jax.Array],
    prefix: str,
    queries: jax.Array,
    keys: jax.Array,
    allowed: jax.Array,
    *,
    heads: int,
    rate: float,
    key: jax.Array | None,
) -> jax.Array:
    """
    Multi-head attention of ``queries [B, Q, d]`` over ``keys [B, T, d]``.

    The values are the keys; ``allowed [B, Q, T]`` says which key each query may see.
    """
    p = prefix + "attn."
    q = _split_heads(queries @ params[p + "wq"] + params[p + "bq"], heads)
    k = _split_heads(keys @ params[p + "wk"] + params[p + "bk"], heads)
    v = _split_heads(keys @ params[p + "wv"] + params[p + "bv"], heads)
    logits = jnp.einsum("bqhc,bthc->bhqt", q, k) / math.sqrt(q.shape[-1])
    logits = jnp.where(allowed[:, None], logits, _MASKED_LOGIT)
    weights = _dropout(jax.nn.softmax(logits, axis=-1), rate, key)
    out = jnp.einsum("bhqt,bthc->bqhc", weights, v)
    return out.reshape(*queries.shape) @ params[p + "wo"] + params[p + "bo"]


def _feed_forward(params: dict[str, jax.Array], prefix: str, x: jax.Array) -> jax.Array:
    p = prefix + "ffn."
    return (
        jax.nn.gelu(x @ params[p + "w1"] + params[p + "b1"]) @ params[p + "w2"] + params[p + "b2"]
    )


def _block(
    params: dict[str, jax.Array],
    i: int,
    x: jax.Array,
    allowed: jax.Array,
    *,
    config: SasrecConfig,
    last_only: bool,
    keys: list[jax.Array | None],
) -> jax.Array:
    """
    One pre-norm block: ``x + Attn(LN(x))`` then ``+ FFN(LN(.))``.

    With ``last_only`` only the last slot is computed as a query (its keys are all
    slots): the output has one position, and the attention and feed-forward cost
    drops by a factor L.
    """
    p = f"block{i}."
    h = _layer_norm(x, params[p + "ln_attn.scale"], params[p + "ln_attn.bias"])
    q_in, resid = (h[:, -1:], x[:, -1:]) if last_only else (h, x)
    q_allowed = allowed[:, -1:] if last_only else allowed
    a = _attention(
        params, p, q_in, h, q_allowed, heads=config.num_heads, rate=config.dropout, key=keys[0]
    )
    x = resid + _dropout(a, config.dropout, keys[1])
    h = _layer_norm(x, params[p + "ln_ffn.scale"], params[p + "ln_ffn.bias"])
    return x + _dropout(_feed_forward(params, p, h), config.dropout, keys[2])


def _embed(
    params: dict[str, jax.Array], seqs: jax.Array, rate: float, key: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(embedded inputs [B, L, d], real-slot mask [B, L], allowed [B, L, L])."""
    real = seqs > 0
    dim = params["item_emb"].shape[-1]
    length = seqs.shape[-1]
    # a window narrower than max_len holds the newest slots: it takes their positions
    x = params["item_emb"][seqs] * math.sqrt(dim) + params["pos_emb"][-length:]
    x = _dropout(x, rate, key) * real[..., None]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    return x, real, causal[None] & real[:, None, :]


def members_of(params: dict[str, jax.Array]) -> int:
    """How many members ``params`` hold: the leading axis of a 3-D item table, else 1."""
    table = params["item_emb"]
    return int(table.shape[0]) if table.ndim == 3 else 1


def _concat_members(outputs: jax.Array) -> jax.Array:
    """``[K, ..., d]`` member outputs -> ``[..., d * K] / K`` (module docstring)."""
    members = outputs.shape[0]
    moved = jnp.moveaxis(outputs, 0, -2)  # [..., K, d]
    return moved.reshape(*moved.shape[:-2], -1) / members


def item_table(params: dict[str, jax.Array]) -> jax.Array:
    """
    The item table scores are taken against, ``[V + 1, vector_dim]``.

    ``item_emb`` itself for one member; for an ensemble the members' tables side by
    side, so that ``encode_users(...) @ item_table(params).T`` is the members' mean score.
    """
    table = params["item_emb"]
    if table.ndim == 2:
        return table
    moved = jnp.moveaxis(table, 0, 1)  # [V + 1, K, d]
    return moved.reshape(moved.shape[0], -1)


def _run(
    params: dict[str, jax.Array],
    seqs: jax.Array,
    *,
    config: SasrecConfig,
    key: jax.Array | None,
    last_only: bool,
) -> jax.Array:
    if members_of(params) > 1:
        member = config.member
        keys = None if key is None else jax.random.split(key, members_of(params))

        def one(p: dict[str, jax.Array], k: jax.Array | None) -> jax.Array:
            return _run(p, seqs, config=member, key=k, last_only=last_only)

        return _concat_members(jax.vmap(one)(params, keys))
    if seqs.ndim != 2 or not 1 <= seqs.shape[-1] <= config.max_len:
        msg = f"seqs: expected shape [batch, {config.max_len}] (or narrower), got {seqs.shape}"
        raise ValueError(msg)
    n_keys = 1 + 3 * config.num_blocks
    keys: list[jax.Array | None] = (
        [None] * n_keys if key is None else list(jax.random.split(key, n_keys))
    )
    x, real, allowed = _embed(params, seqs, config.dropout, keys[0])
    for i in range(config.num_blocks):
        last = last_only and i == config.num_blocks - 1
        x = _block(
            params, i, x, allowed, config=config, last_only=last, keys=keys[1 + 3 * i : 4 + 3 * i]
        )
        x = x * (real[:, -1:, None] if last else real[..., None])
    return _layer_norm(x, params["ln_final.scale"], params["ln_final.bias"])


# ----------------------------------------------------------------------------- public


def sequence_outputs(
    params: dict[str, jax.Array],
    seqs: jax.Array,
    *,
    config: SasrecConfig,
    key: jax.Array | None = None,
) -> jax.Array:
    r"""
    The encoder's output at every slot, ``[B, L, d]``, for training.

    ``seqs [B, L]`` int, left-padded with 0; a narrower window ``[B, W]`` (``W < L``)
    stands for the newest ``W`` slots of rows whose items all fit in it, and gives the
    same outputs there (training batches short rows this way). Slot ``t``'s output
    depends only on slots ``<= t`` (causal attention) and never on padding. With
    ``key`` given, dropout is on (training); without, the function is deterministic.
    """
    return _run(params, seqs, config=config, key=key, last_only=False)


def encode_users(
    params: dict[str, jax.Array],
    seqs: jax.Array,
    *,
    config: SasrecConfig,
) -> jax.Array:
    r"""
    User vectors ``[B, d]``: the encoder's output at the last slot (the newest item).

    Equals ``sequence_outputs(params, seqs, config=config)[:, -1]``, but the last block
    computes only the last slot as a query, which saves most of that block. A row with
    no items (all padding) gets a finite vector that carries no information; callers
    rank such users by popularity instead.
    """
    return _run(params, seqs, config=config, key=None, last_only=True)[:, -1]


def item_logits(
    params: dict[str, jax.Array], outputs: jax.Array, items: jax.Array | None = None
) -> jax.Array:
    r"""
    Scores of items against encoder outputs through the shared item embedding.

    ``outputs [..., d] @ item_table(params).T`` gives ``[..., V + 1]`` (column 0 is padding; mask
    it); with ``items [K]`` only those columns, ``[..., K]``.
    """
    table = item_table(params)
    table = table if items is None else table[items]
    return outputs @ table.T
