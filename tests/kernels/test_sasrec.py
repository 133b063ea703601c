"""
`kernels.sasrec` against the float64 numpy reference in sasrec_numpy.py, on fresh
random inputs: user vectors, every slot's output, padding and causality, dropout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sasrec_numpy as ref

from kernels.sasrec import (
    SasrecConfig,
    encode_users,
    init_params,
    item_logits,
    item_table,
    members_of,
    param_shapes,
    sequence_outputs,
)

#: Relative error bounds (max abs error / max abs reference value) per dtype.
_REL_BOUND = {jnp.float32: 2e-5, jnp.bfloat16: 6e-2}

_CONFIGS = [
    SasrecConfig(num_items=40, max_len=10, dim=16, num_blocks=1, num_heads=1),
    SasrecConfig(num_items=40, max_len=10, dim=16, num_blocks=2, num_heads=2),
    SasrecConfig(num_items=90, max_len=7, dim=24, num_blocks=3, num_heads=4, ffn_dim=40),
]


def _random_params(config: SasrecConfig, seed: int) -> dict[str, jax.Array]:
    """Init params with every bias and layer-norm parameter perturbed, so each one matters."""
    params = init_params(jax.random.key(seed), config)
    rng = np.random.default_rng(seed)
    return {
        name: value + 0.3 * rng.standard_normal(value.shape).astype(np.float32)
        if value.ndim == 1
        else value
        for name, value in params.items()
    }


def _random_seqs(config: SasrecConfig, rng: np.random.Generator, rows: int) -> np.ndarray:
    """Left-padded rows of every length from 0 to L (cycled), random items."""
    seqs = np.zeros((rows, config.max_len), np.int32)
    for r in range(rows):
        n = r % (config.max_len + 1)
        if n:
            seqs[r, -n:] = rng.integers(1, config.num_items + 1, n)
    return seqs


def _rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max())


def _np(params: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    return {name: np.asarray(value, np.float64) for name, value in params.items()}


@pytest.mark.parametrize("config", _CONFIGS, ids=lambda c: f"b{c.num_blocks}h{c.num_heads}")
@pytest.mark.parametrize("seed", [0, 1])
def test_user_vectors_match_float64_reference(config: SasrecConfig, seed: int) -> None:
    """encode_users in float32 is within the float32 bound of the float64 reference."""
    params = _random_params(config, seed)
    seqs = _random_seqs(config, np.random.default_rng(seed), 2 * (config.max_len + 1))
    expected = ref.encode_users(
        _np(params), seqs, num_blocks=config.num_blocks, num_heads=config.num_heads
    )
    actual = jax.jit(encode_users, static_argnames="config")(params, seqs, config=config)
    assert actual.shape == (seqs.shape[0], config.dim)
    assert _rel_error(actual, expected) < _REL_BOUND[jnp.float32]


def test_user_vectors_in_bfloat16_within_bound() -> None:
    """With bfloat16 parameters the user vectors stay within the bfloat16 bound."""
    config = _CONFIGS[1]
    params = _random_params(config, 3)
    seqs = _random_seqs(config, np.random.default_rng(3), 22)
    expected = ref.encode_users(_np(params), seqs, num_blocks=2, num_heads=2)
    low = {name: value.astype(jnp.bfloat16) for name, value in params.items()}
    actual = encode_users(low, seqs, config=config)
    assert actual.dtype == jnp.bfloat16
    assert _rel_error(actual, expected) < _REL_BOUND[jnp.bfloat16]


@pytest.mark.parametrize("config", _CONFIGS[:2], ids=["b1h1", "b2h2"])
def test_every_slot_matches_reference(config: SasrecConfig) -> None:
    """sequence_outputs matches the reference at every slot, padded slots included."""
    params = _random_params(config, 5)
    seqs = _random_seqs(config, np.random.default_rng(5), config.max_len + 1)
    p64 = _np(params)
    expected = np.stack(
        [
            ref.encode_row(
                p64, row, num_blocks=config.num_blocks, num_heads=config.num_heads, all_slots=True
            )
            for row in seqs
        ]
    )
    actual = sequence_outputs(params, seqs, config=config)
    assert _rel_error(actual, expected) < _REL_BOUND[jnp.float32]


def test_last_slot_shortcut_equals_full_pass() -> None:
    """encode_users (last block computes only the last query) equals the full pass's last slot."""
    config = _CONFIGS[2]
    params = _random_params(config, 7)
    seqs = _random_seqs(config, np.random.default_rng(7), 16)
    full = sequence_outputs(params, seqs, config=config)[:, -1]
    np.testing.assert_allclose(encode_users(params, seqs, config=config), full, rtol=0, atol=2e-6)


def test_padding_never_leaks() -> None:
    """The padding row of the item table and the position rows of padded slots change nothing."""
    config = _CONFIGS[1]
    params = _random_params(config, 11)
    seqs = np.zeros((3, config.max_len), np.int32)
    seqs[0, -4:] = [5, 6, 7, 8]
    seqs[1, -1:] = [9]
    seqs[2, -9:] = np.arange(1, 10)
    rng = np.random.default_rng(11)
    noisy = dict(params)
    noisy["item_emb"] = params["item_emb"].at[0].set(rng.standard_normal(config.dim) * 5)
    first_real = config.max_len - 9  # the earliest real slot of any row
    noise = rng.standard_normal((first_real, config.dim)) * 5
    noisy["pos_emb"] = params["pos_emb"].at[:first_real].set(noise)
    expected = encode_users(params, seqs, config=config)
    np.testing.assert_array_equal(expected, encode_users(noisy, seqs, config=config))


def test_causal_slot_ignores_later_items() -> None:
    """Slot t's output does not change when an item after t changes."""
    config = _CONFIGS[1]
    params = _random_params(config, 13)
    seqs = np.tile(np.arange(1, config.max_len + 1, dtype=np.int32), (1, 1))
    changed = seqs.copy()
    changed[0, -1] = 33
    before = sequence_outputs(params, seqs, config=config)
    after = sequence_outputs(params, changed, config=config)
    np.testing.assert_array_equal(before[:, :-1], after[:, :-1])
    assert not np.allclose(before[:, -1], after[:, -1])


def test_rows_are_independent() -> None:
    """A row's vector does not depend on the other rows of the batch (nor on their order)."""
    config = _CONFIGS[0]
    params = _random_params(config, 17)
    seqs = _random_seqs(config, np.random.default_rng(17), 11)
    batch = encode_users(params, seqs, config=config)
    perm = np.random.default_rng(1).permutation(len(seqs))
    np.testing.assert_allclose(
        encode_users(params, seqs[perm], config=config), batch[perm], atol=1e-6
    )
    np.testing.assert_allclose(
        encode_users(params, seqs[3:4], config=config), batch[3:4], atol=1e-6
    )


def test_empty_history_gives_finite_vector() -> None:
    """An all-padding row gets a finite vector (the final layer norm's bias)."""
    config = _CONFIGS[1]
    params = _random_params(config, 19)
    out = encode_users(params, np.zeros((2, config.max_len), np.int32), config=config)
    np.testing.assert_allclose(out, np.tile(params["ln_final.bias"], (2, 1)), atol=1e-6)


def test_dropout_only_with_a_key() -> None:
    """No key: deterministic; with keys: differs per key; rate 0 ignores keys."""
    config = _CONFIGS[1]
    params = _random_params(config, 23)
    seqs = _random_seqs(config, np.random.default_rng(23), 11)
    plain = sequence_outputs(params, seqs, config=config)
    a = sequence_outputs(params, seqs, config=config, key=jax.random.key(1))
    b = sequence_outputs(params, seqs, config=config, key=jax.random.key(2))
    assert not np.allclose(a, plain)
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(
        a, sequence_outputs(params, seqs, config=config, key=jax.random.key(1))
    )
    off = dataclasses.replace(config, dropout=0.0)
    np.testing.assert_array_equal(
        plain, sequence_outputs(params, seqs, config=off, key=jax.random.key(1))
    )


def test_gradient_is_finite_with_padding_rows() -> None:
    """The gradient of a loss over a batch with an all-padding row has no NaN or inf."""
    config = _CONFIGS[1]
    params = _random_params(config, 29)
    seqs = _random_seqs(config, np.random.default_rng(29), 4)
    assert (seqs[0] == 0).all()

    def loss(p: dict[str, jax.Array]) -> jax.Array:
        out = sequence_outputs(p, seqs, config=config, key=jax.random.key(0))
        return jnp.mean(item_logits(p, out) ** 2)

    grads = jax.grad(loss)(params)
    assert all(bool(jnp.isfinite(g).all()) for g in grads.values())


def test_item_logits_use_the_shared_table() -> None:
    """item_logits are dot products with rows of item_emb, all of them or the ones asked for."""
    config = _CONFIGS[0]
    params = _random_params(config, 31)
    out = jax.random.normal(jax.random.key(0), (3, config.dim))
    full = item_logits(params, out)
    assert full.shape == (3, config.num_items + 1)
    np.testing.assert_allclose(full, np.asarray(out) @ np.asarray(params["item_emb"]).T, rtol=1e-5)
    some = item_logits(params, out, jnp.array([4, 2]))
    np.testing.assert_allclose(some, full[:, [4, 2]], rtol=1e-6)


def test_init_shapes_and_padding_row() -> None:
    """init_params gives exactly param_shapes, float32, with a zero padding row."""
    config = _CONFIGS[2]
    params = init_params(jax.random.key(0), config)
    assert {n: tuple(v.shape) for n, v in params.items()} == param_shapes(config)
    assert all(v.dtype == jnp.float32 for v in params.values())
    assert not params["item_emb"][0].any()
    assert config.ffn_dim == 40
    assert SasrecConfig(num_items=3, dim=8).ffn_dim == 8


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_items": 0}, "num_items"),
        ({"num_items": 5, "dim": 10, "num_heads": 3}, "dim"),
        ({"num_items": 5, "dropout": 1.0}, "dropout"),
        ({"num_items": 5, "max_len": 0}, "max_len"),
        ({"num_items": 5, "members": 0}, "members"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, float], field: str) -> None:
    """A bad hyper-parameter is refused with a message naming it."""
    with pytest.raises(ValueError, match=f"SasrecConfig.{field}:"):
        SasrecConfig(**kwargs)  # type: ignore[arg-type]


def test_wrong_sequence_length_is_refused() -> None:
    """Sequences longer than max_len are refused, naming the expected shape."""
    config = _CONFIGS[0]
    params = init_params(jax.random.key(0), config)
    with pytest.raises(ValueError, match=r"seqs: expected shape \[batch, 10\]"):
        encode_users(params, np.zeros((2, 11), np.int32), config=config)


def test_narrow_window_equals_the_newest_slots_of_the_full_width() -> None:
    """Rows that fit in W slots give the same outputs from a [B, W] window as from [B, L]."""
    config = _CONFIGS[0]
    params = init_params(jax.random.key(1), config)
    full = np.zeros((2, config.max_len), np.int32)
    full[0, -3:] = [4, 2, 7]
    full[1, -1:] = [5]
    narrow = full[:, -4:]
    np.testing.assert_allclose(
        np.asarray(sequence_outputs(params, narrow, config=config)),
        np.asarray(sequence_outputs(params, full, config=config))[:, -4:],
        rtol=1e-5, atol=1e-5,
    )
    np.testing.assert_allclose(
        np.asarray(encode_users(params, narrow, config=config)),
        np.asarray(encode_users(params, full, config=config)),
        rtol=1e-5, atol=1e-5,
    )


def test_config_round_trips_through_dict() -> None:
    """SasrecConfig(**config.to_dict()) == config."""
    config = _CONFIGS[2]
    assert SasrecConfig(**config.to_dict()) == config


# ----------------------------------------------------------------------------- ensembles


def _member(params: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    return {name: value[k] for name, value in params.items()}


def test_an_ensemble_scores_the_mean_of_its_members() -> None:
    """
    A 3-member model's user vectors against its item table give, for every item, the
    mean of the three members' own scores, at the last slot and at every slot.
    """
    config = dataclasses.replace(_CONFIGS[1], members=3)
    params = init_params(jax.random.key(5), config)
    seqs = _random_seqs(config, np.random.default_rng(5), 12)
    users = np.asarray(encode_users(params, seqs, config=config))
    table = np.asarray(item_table(params))
    assert (users.shape, table.shape) == ((12, 48), (41, 48))
    member = config.member
    alone = [
        np.asarray(encode_users(_member(params, k), seqs, config=member))
        @ np.asarray(_member(params, k)["item_emb"]).T
        for k in range(3)
    ]
    np.testing.assert_allclose(users @ table.T, np.mean(alone, axis=0), rtol=1e-4, atol=1e-5)
    outputs = np.asarray(sequence_outputs(params, seqs, config=config))
    np.testing.assert_allclose(outputs[:, -1], users, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(item_logits(params, jnp.asarray(users), jnp.array([3, 9]))),
        (users @ table.T)[:, [3, 9]], rtol=1e-5, atol=1e-6,
    )


def test_an_ensemble_has_a_member_axis_and_distinct_members() -> None:
    """Every parameter gains a leading axis of size members; members start differently."""
    config = dataclasses.replace(_CONFIGS[0], members=2)
    params = init_params(jax.random.key(0), config)
    single = param_shapes(config.member)
    assert {n: (2, *shape) for n, shape in single.items()} == param_shapes(config)
    assert {n: tuple(v.shape) for n, v in params.items()} == param_shapes(config)
    assert (members_of(params), members_of(_member(params, 0))) == (2, 1)
    assert not params["item_emb"][:, 0].any()  # both padding rows
    assert not np.allclose(params["item_emb"][0], params["item_emb"][1])
    assert (config.vector_dim, config.member.vector_dim, config.member.members) == (32, 16, 1)


def test_one_member_is_the_plain_model() -> None:
    """With one member the item table is item_emb itself, and shapes have no member axis."""
    config = _CONFIGS[0]
    params = init_params(jax.random.key(2), config)
    assert item_table(params) is params["item_emb"]
    assert param_shapes(config)["item_emb"] == (41, 16)
