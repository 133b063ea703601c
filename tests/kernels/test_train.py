"""
`kernels.train`: losses against float64 numpy, NaN safety, overfitting, determinism,
early stopping, compile counts, the weight-decay mask and argument checks.

Every `fit` builds a fresh jitted step, and compiling one takes seconds on a small
machine; the module therefore turns on JAX's persistent compilation cache (in a temp
dir), so that identical steps are loaded instead of compiled again, and turns most XLA
optimisations off. The configurations, optimiser and batch shapes are shared between
tests for the same reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jaxcache import fast_compiles

from kernels import train
from kernels.sasrec import (
    SasrecConfig,
    encode_users,
    init_params,
    members_of,
    param_shapes,
    sequence_outputs,
)
from kernels.train import (
    EpochRecord,
    TrainReport,
    default_optimizer,
    epoch_work,
    fit,
    full_softmax_loss,
    init_optimizer_state,
    make_evaluator,
    make_train_step,
    sampled_softmax_loss,
    weight_decay_mask,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

CONFIG = SasrecConfig(num_items=30, max_len=8, dim=16, num_blocks=1, num_heads=1, dropout=0.0)
DROPOUT_CONFIG = dataclasses.replace(CONFIG, dropout=0.2)
#: Eight items and eight slots: a user who has seen all items leaves only the target
#: rankable, so validation NDCG@10 is 1.0 whatever the parameters.
TINY_CONFIG = dataclasses.replace(CONFIG, num_items=8)
OPTIMIZER = default_optimizer(1e-2)
BATCH = 3  # 8 training rows: two full batches and one padded to 3
NEGATIVES = 8
#: float32 kernel against the float64 reference on the same encoder outputs.
RTOL = 1e-5

# Jitted once here: op by op, every random draw and layer would compile on its own,
# which takes seconds on a small machine.
_INIT = jax.jit(init_params, static_argnums=1)
ENCODE = jax.jit(encode_users, static_argnames=("config",))


@pytest.fixture(name="fast_compiles", autouse=True, scope="module")
def fixture_fast_compiles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """
    For this module: JAX's persistent compilation cache in a temp dir (identical jitted
    steps of separate `fit` calls load instead of compiling again) and most XLA
    optimisations off (compiling takes half as long, and these tiny models run as fast).
    Both settings are restored afterwards.
    """
    with fast_compiles(tmp_path_factory.mktemp("xla_cache")):
        yield


# ----------------------------------------------------------------------------- data


def left_padded(rows: list[list[int]], length: int) -> np.ndarray:
    """int32 [len(rows), length], each row right-aligned after zeros."""
    out = np.zeros((len(rows), length), np.int32)
    for r, row in enumerate(rows):
        if row:
            out[r, length - len(row) :] = row
    return out


def sequences(num_items: int, count: int = 8, seed: int = 0) -> list[list[int]]:
    """`count` fixed sequences of 4..9 distinct items."""
    rng = np.random.default_rng(seed)
    return [
        [
            int(i)
            for i in rng.choice(np.arange(1, num_items + 1), rng.integers(4, 10), replace=False)
        ]
        for _ in range(count)
    ]


def next_item_data(seqs: list[list[int]], length: int) -> dict[str, np.ndarray]:
    """Training pairs (s[:-1] -> s[1:]) and validation (s[:-1] -> s[-1]), left-padded."""
    inputs = left_padded([s[:-1] for s in seqs], length)
    return {
        "train_inputs": inputs,
        "train_targets": left_padded([s[1:] for s in seqs], length),
        "val_inputs": inputs,
        "val_targets": np.array([s[-1] for s in seqs], np.int32),
    }


DATA = next_item_data(sequences(CONFIG.num_items), CONFIG.max_len)


def fresh_params(seed: int, config: SasrecConfig) -> dict[str, jax.Array]:
    """`init_params(key(seed), config)`."""
    return _INIT(jax.random.key(seed), config)


def run_fit(config: SasrecConfig, data: dict[str, np.ndarray], **options: Any) -> tuple:
    """`fit` with this module's defaults (seed 0, BATCH, OPTIMIZER, no progress bar)."""
    defaults = {"epochs": 3, "batch_size": BATCH, "seed": 0, "optimizer": OPTIMIZER}
    params = fresh_params(1, config)
    return fit(params, config, **data, **(defaults | {"progress": False} | options))


# ----------------------------------------------------------------------------- reference


def logsumexp64(z: np.ndarray) -> float:
    m = float(np.max(z))
    return m + math.log(float(np.sum(np.exp(z - m))))


def reference_loss(
    outputs: np.ndarray, emb: np.ndarray, targets: np.ndarray, negatives: list[int] | None
) -> float:
    """
    Mean over target slots of -log softmax, in float64, slot by slot: over items
    1..V, or over [target] + the negatives other than the target (accidental hits).
    """
    losses = []
    for b, t in zip(*np.nonzero(targets), strict=True):
        target = int(targets[b, t])
        if negatives is None:
            candidates = list(range(1, emb.shape[0]))
        else:
            candidates = [target, *(n for n in negatives if n != target)]
        z = emb[candidates] @ outputs[b, t]
        losses.append(logsumexp64(z) - float(z[candidates.index(target)]))
    return math.fsum(losses) / len(losses) if losses else 0.0


def _loss(
    params: dict[str, jax.Array],
    inputs: jax.Array,
    targets: jax.Array,
    negatives: jax.Array,
    key: jax.Array | None,
    *,
    kind: str,
    config: SasrecConfig,
) -> jax.Array:
    """The full loss, or the sampled one with these `negatives`; one signature for both."""
    if kind == "full":
        return full_softmax_loss(params, inputs, targets, config=config, key=key)
    return sampled_softmax_loss(params, inputs, targets, negatives, config=config, key=key)


LOSS = jax.jit(_loss, static_argnames=("kind", "config"))
LOSS_AND_GRAD = jax.jit(jax.value_and_grad(_loss), static_argnames=("kind", "config"))
OUTPUTS = jax.jit(sequence_outputs, static_argnames=("config",))

#: Row 1 has an item but no target, row 2 is all padding, row 3 has a 0 target mid-row.
LOSS_INPUTS = left_padded([[3, 7, 1, 9], [2], [], [5, 6, 7, 8, 9, 10, 11, 12]], CONFIG.max_len)
LOSS_TARGETS = left_padded([[7, 1, 9, 4], [0], [], [6, 7, 0, 9, 10, 11, 12, 13]], CONFIG.max_len)
#: 7 and 9 are targets at several slots (accidental hits there); 20 comes twice.
FIXED_NEGATIVES = [7, 20, 9, 20, 30]


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("kind", ["full", "sampled"])
def test_loss_equals_float64_reference(kind: str) -> None:
    """
    Both losses equal a float64 numpy computation on the same encoder outputs: the mean
    over target slots only, accidental hits not counted as negatives.
    """
    params = fresh_params(0, CONFIG)
    outputs = np.asarray(OUTPUTS(params, LOSS_INPUTS, config=CONFIG), np.float64)
    emb = np.asarray(params["item_emb"], np.float64)
    negatives = FIXED_NEGATIVES if kind == "sampled" else None
    expected = reference_loss(outputs, emb, LOSS_TARGETS, negatives)
    actual = LOSS(
        params,
        LOSS_INPUTS,
        LOSS_TARGETS,
        jnp.array(FIXED_NEGATIVES),
        None,
        kind=kind,
        config=CONFIG,
    )
    assert expected == pytest.approx(float(actual), rel=RTOL)


def test_sampled_loss_is_zero_when_every_negative_is_a_hit() -> None:
    """With all negatives equal to the target, only the target column is left: loss 0."""
    params = fresh_params(0, CONFIG)
    targets = np.where(LOSS_TARGETS > 0, 7, 0)
    negatives = jnp.full(len(FIXED_NEGATIVES), 7)
    actual = LOSS(params, LOSS_INPUTS, targets, negatives, None, kind="sampled", config=CONFIG)
    assert 0.0 == float(actual)


@pytest.mark.parametrize("kind", ["full", "sampled"])
def test_no_target_at_all_gives_zero_loss_and_zero_gradient(kind: str) -> None:
    """A batch without any target has loss 0.0 and an all-zero (not NaN) gradient."""
    params = fresh_params(0, CONFIG)
    value, grads = LOSS_AND_GRAD(
        params,
        LOSS_INPUTS,
        np.zeros_like(LOSS_TARGETS),
        jnp.array(FIXED_NEGATIVES),
        None,
        kind=kind,
        config=CONFIG,
    )
    assert (0.0, []) == (float(value), [n for n, g in grads.items() if bool(jnp.any(g != 0))])


@pytest.mark.parametrize("kind", ["full", "sampled"])
def test_gradients_are_finite_with_an_all_padding_row(kind: str) -> None:
    """With an all-padding row and a row without targets, loss and gradients are finite."""
    params = fresh_params(0, CONFIG)
    value, grads = LOSS_AND_GRAD(
        params,
        LOSS_INPUTS,
        LOSS_TARGETS,
        jnp.array(FIXED_NEGATIVES),
        None,
        kind=kind,
        config=CONFIG,
    )
    not_finite = [n for n, g in grads.items() if not bool(jnp.all(jnp.isfinite(g)))]
    assert (True, []) == (math.isfinite(float(value)), not_finite)


# ----------------------------------------------------------------------------- optimiser


def test_weight_decay_mask_selects_matrices_and_embeddings() -> None:
    """Decay applies to embeddings and weight matrices, never to biases or layer norms."""
    config = dataclasses.replace(CONFIG, num_blocks=2)
    matrices = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.w1", "ffn.w2")
    expected = {"item_emb", "pos_emb"} | {f"block{i}.{m}" for i in range(2) for m in matrices}
    mask = weight_decay_mask({n: np.zeros(shape) for n, shape in param_shapes(config).items()})
    assert expected == {name for name, decayed in mask.items() if decayed}


def test_default_optimizer_decays_only_masked_parameters() -> None:
    """With zero gradients one update scales decayed tensors by 1 - lr*wd, others stay."""
    params = fresh_params(0, CONFIG)
    optimizer = default_optimizer(0.1, weight_decay=0.5)

    @jax.jit
    def one_update(p: dict[str, jax.Array]) -> dict[str, jax.Array]:
        zeros = jax.tree.map(jnp.zeros_like, p)
        return optax.apply_updates(p, optimizer.update(zeros, optimizer.init(p), p)[0])

    new, mask = one_update(params), weight_decay_mask(params)
    expected = {n: np.asarray(v) * (0.95 if mask[n] else 1.0) for n, v in params.items()}
    assert [] == [n for n in params if not np.allclose(expected[n], new[n], rtol=1e-6, atol=0)]


def test_step_keeps_padding_row_zero() -> None:
    """After a step, row 0 of item_emb is zero even if it was not before."""
    params = fresh_params(0, CONFIG)
    params["item_emb"] = params["item_emb"].at[0].set(1.0)
    step = make_train_step(CONFIG, OPTIMIZER)
    x, y = DATA["train_inputs"][:BATCH], DATA["train_targets"][:BATCH]
    new, _, _ = step(params, OPTIMIZER.init(params), x, y, jax.random.key(0))
    assert [0.0] * CONFIG.dim == np.asarray(new["item_emb"][0]).tolist()


# ----------------------------------------------------------------------------- validation


def reference_rows(
    scores: np.ndarray, inputs: np.ndarray, targets: np.ndarray, k: int
) -> list[tuple[float, float]]:
    """Per user (NDCG@k, HR@k) by brute force: item 0 and seen items (not the target) excluded."""
    rows = []
    for row, seen, target in zip(scores, inputs, targets, strict=True):
        rivals = [i for i in range(1, len(row)) if i != target and i not in set(seen.tolist())]
        rank = 1 + sum(1 for i in rivals if row[i] >= row[target])
        rows.append((1.0 / math.log2(rank + 1) if rank <= k else 0.0, 1.0 if rank <= k else 0.0))
    return rows


RANKING_SEQS = sequences(CONFIG.num_items, count=5, seed=4)
RANKING_INPUTS = left_padded([s[:-1] for s in RANKING_SEQS], CONFIG.max_len)
#: The last user's target is an item already in their inputs: it must stay rankable.
RANKING_TARGETS = np.array([s[-1] for s in RANKING_SEQS[:4]] + [RANKING_SEQS[4][0]], np.int32)
METRICS = jax.jit(train.full_ranking_metrics, static_argnames=("config", "k"))


def ranking_reference(params: dict[str, jax.Array], k: int) -> list[tuple[float, float]]:
    """`reference_rows` on float64 scores from the kernel's user vectors."""
    users = np.asarray(ENCODE(params, RANKING_INPUTS, config=CONFIG), np.float64)
    scores = users @ np.asarray(params["item_emb"], np.float64).T
    return reference_rows(scores, RANKING_INPUTS, RANKING_TARGETS, k)


@pytest.mark.parametrize("k", [10, CONFIG.num_items])
def test_full_ranking_metrics_match_brute_force(k: int) -> None:
    """Per-user NDCG@k and HR@k equal a brute-force full ranking (k = V: every rank shows)."""
    params = fresh_params(2, CONFIG)
    ndcg, hit_rate, valid = METRICS(params, RANKING_INPUTS, RANKING_TARGETS, config=CONFIG, k=k)
    actual = np.stack([ndcg, hit_rate], axis=1)  # [user, (ndcg, hr)]
    assert np.array(ranking_reference(params, k)) == pytest.approx(actual, rel=RTOL)
    assert [True] * 5 == valid.tolist()


def test_evaluator_averages_over_real_users_only() -> None:
    """The evaluator's means equal the brute-force means over 5 users, whatever the pad rows."""
    params = fresh_params(2, CONFIG)
    rows = ranking_reference(params, CONFIG.num_items)
    expected = tuple(math.fsum(column) / len(rows) for column in zip(*rows, strict=True))
    evaluate = make_evaluator(CONFIG, batch_size=4, k=CONFIG.num_items)  # 5 users: 3 pad rows
    assert expected == pytest.approx(evaluate(params, RANKING_INPUTS, RANKING_TARGETS), rel=RTOL)


def test_evaluator_compiles_once_for_any_number_of_users(monkeypatch: pytest.MonkeyPatch) -> None:
    """Padding the last block keeps one trace of the metrics kernel for 5 and 11 users."""
    traces = []
    real = train.full_ranking_metrics

    def counted(*args: Any, **kwargs: Any) -> Any:
        traces.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "full_ranking_metrics", counted)
    evaluate = make_evaluator(CONFIG, batch_size=4)
    params = fresh_params(0, CONFIG)
    for users in (5, 11):
        evaluate(
            params,
            DATA["val_inputs"][np.arange(users) % 8],
            DATA["val_targets"][np.arange(users) % 8],
        )
    assert [1] == traces


# ----------------------------------------------------------------------------- fit


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_fit_overfits_a_few_sequences(loss: str) -> None:
    """After fit on 8 sequences, every sequence's next item is ranked first (HR@1 = 1)."""
    best, report = run_fit(
        CONFIG, DATA, loss=loss, num_negatives=NEGATIVES, epochs=150, patience=10
    )
    hit_rate = make_evaluator(CONFIG, k=1)(best, DATA["val_inputs"], DATA["val_targets"])[1]
    assert (1.0, 1.0) == (hit_rate, report.epochs[report.best_epoch - 1].val_ndcg_at_10)


def test_fit_is_deterministic_given_the_seed() -> None:
    """Same seed: bit-identical params and losses; another seed: different params."""
    options = {"loss": "sampled", "num_negatives": NEGATIVES}
    first, report_1 = run_fit(DROPOUT_CONFIG, DATA, seed=5, **options)
    second, report_2 = run_fit(DROPOUT_CONFIG, DATA, seed=5, **options)
    other, _ = run_fit(DROPOUT_CONFIG, DATA, seed=6, **options)
    assert [] == [n for n in first if not np.array_equal(first[n], second[n])]
    assert [r.train_loss for r in report_1.epochs] == [r.train_loss for r in report_2.epochs]
    assert any(not np.array_equal(first[n], other[n]) for n in first)


def test_fit_stops_early_and_returns_the_best_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """With NDCG constant and patience 1, fit stops after epoch 2 and returns epoch 1's params."""
    seen_params = []
    real = train.make_train_step

    def spy(*args: Any, **kwargs: Any) -> Any:
        step = real(*args, **kwargs)

        def recorded(*step_args: Any) -> Any:
            out = step(*step_args)
            seen_params.append(out[0])
            return out

        return recorded

    monkeypatch.setattr(train, "make_train_step", spy)
    perms = [list(np.random.default_rng(s).permutation(8) + 1) for s in range(8)]
    data = next_item_data(perms, TINY_CONFIG.max_len)
    data["val_inputs"] = left_padded(perms, TINY_CONFIG.max_len)  # every item seen
    best, report = run_fit(TINY_CONFIG, data, epochs=5, patience=1)
    epoch_1_end = seen_params[math.ceil(8 / BATCH) - 1]
    assert (2, True, 1) == (len(report.epochs), report.stopped_early, report.best_epoch)
    assert [1.0, 1.0] == [r.val_ndcg_at_10 for r in report.epochs]
    assert all(np.array_equal(epoch_1_end[n], best[n]) for n in best)
    assert not np.array_equal(seen_params[-1]["item_emb"], best["item_emb"])


def test_fit_compiles_the_step_once_with_a_partial_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over 3 epochs in batches of 3 (the last padded), the step compiles once per window."""
    steps = []
    real = train.make_train_step

    def spy(*args: Any, **kwargs: Any) -> Any:
        steps.append(real(*args, **kwargs))
        return steps[-1]

    monkeypatch.setattr(train, "make_train_step", spy)
    run_fit(CONFIG, DATA, epochs=3)
    widths = len(train._length_buckets(DATA["train_inputs"]))  # noqa: SLF001
    assert widths >= 2  # the test data has short and long rows
    assert [widths] == [step._cache_size() for step in steps]  # noqa: SLF001  (compile count)


def test_fit_progress_bar_shows_the_running_loss(capsys: pytest.CaptureFixture[str]) -> None:
    """With progress=True, tqdm writes the epoch and a loss figure to stderr."""
    run_fit(CONFIG, DATA, epochs=1, progress=True)
    err = capsys.readouterr().err
    assert ("epoch 1/1" in err, "loss=" in err) == (True, True)


def test_train_report_to_dict_is_json() -> None:
    """to_dict gives the records as dicts, and survives a JSON round trip."""
    report = TrainReport(
        (EpochRecord(1, 2.5, 0.25, 0.5, 0.125),), best_epoch=1, stopped_early=False, members=3
    )
    expected = {
        "epochs": [
            {
                "epoch": 1,
                "train_loss": 2.5,
                "val_ndcg_at_10": 0.25,
                "val_hr_at_10": 0.5,
                "wall_s": 0.125,
            }
        ],
        "best_epoch": 1,
        "stopped_early": False,
        "time_bound": False,
        "members": 3,
    }
    assert expected == json.loads(json.dumps(report.to_dict()))


# ----------------------------------------------------------------------------- arguments


BAD_ARGUMENTS = [
    ("epochs", {"epochs": 0}),
    ("batch_size", {"batch_size": 0}),
    ("patience", {"patience": 0}),
    ("seed", {"seed": -1}),
    ("epochs", {"epochs": 2.0}),
    ("train_inputs", {"train_inputs": DATA["train_inputs"].astype(np.float32)}),
    ("train_inputs", {"train_inputs": DATA["train_inputs"][:, 1:]}),
    ("train_inputs", {"train_inputs": DATA["train_inputs"].tolist()}),
    ("train_targets", {"train_targets": DATA["train_targets"][:4]}),
    (
        "train_inputs",
        {"train_inputs": np.where(DATA["train_inputs"] == 3, 9999, DATA["train_inputs"])},
    ),
    ("train_inputs", {"train_inputs": DATA["train_inputs"][:, ::-1].copy()}),  # right-padded
    ("train_targets", {"train_targets": np.ones_like(DATA["train_targets"])}),  # at padding
    ("val_targets", {"val_targets": np.zeros_like(DATA["val_targets"])}),
    ("val_inputs", {"val_inputs": DATA["val_inputs"][:, :4]}),
    ("loss", {"loss": "bogus"}),
    ("num_negatives", {"num_negatives": 0}),
]


@pytest.mark.parametrize(("argument", "override"), BAD_ARGUMENTS)
def test_fit_rejects_bad_arguments_naming_them(argument: str, override: dict[str, Any]) -> None:
    """Each broken rule raises ValueError("<argument>: ..."), without echoing data values."""
    data = DATA | {k: v for k, v in override.items() if k in DATA}
    options = {k: v for k, v in override.items() if k not in DATA}
    with pytest.raises(ValueError, match=rf"^{argument}: ") as caught:
        run_fit(CONFIG, data, **options)
    assert "9999" not in str(caught.value)


def test_fit_rejects_params_of_another_config() -> None:
    """Parameters whose shapes do not match the config are rejected, naming params."""
    params = fresh_params(0, TINY_CONFIG)
    with pytest.raises(ValueError, match=r"^params: "):
        fit(params, CONFIG, **DATA, epochs=1, batch_size=BATCH, seed=0, progress=False)


# ----------------------------------------------------------------------------- ensembles

ENSEMBLE = dataclasses.replace(DROPOUT_CONFIG, members=2)


def _member(tree: Any, k: int) -> Any:
    return jax.tree.map(lambda a: a[k], tree)


@pytest.mark.parametrize("loss", ["full", "sampled", "bce"])
def test_an_ensemble_step_trains_each_member_as_if_alone(loss: str) -> None:
    """
    One step of a 2-member model equals, member by member, the one-member step with
    that member's parameters, optimiser state and key (``split(key, 2)[k]``): members
    share the batch and nothing else. The loss is the members' mean.
    """
    params = fresh_params(3, ENSEMBLE)
    state = init_optimizer_state(OPTIMIZER, params)
    x, y = DATA["train_inputs"][:BATCH], DATA["train_targets"][:BATCH]
    key = jax.random.key(9)
    both = make_train_step(ENSEMBLE, OPTIMIZER, loss=loss, num_negatives=NEGATIVES)
    new, new_state, value = both(params, state, x, y, key)
    alone = make_train_step(ENSEMBLE.member, OPTIMIZER, loss=loss, num_negatives=NEGATIVES)
    values = []
    for k, member_key in enumerate(jax.random.split(key, 2)):
        want, want_state, want_value = alone(_member(params, k), _member(state, k), x, y,
                                             member_key)  # fmt: skip
        for name in want:
            np.testing.assert_allclose(new[name][k], want[name], rtol=1e-5, atol=1e-6)
        leaves = zip(jax.tree.leaves(_member(new_state, k)), jax.tree.leaves(want_state),
                          strict=True)  # fmt: skip
        for got_leaf, want_leaf in leaves:
            np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5, atol=1e-6)
        values.append(float(want_value))
    assert float(value) == pytest.approx(np.mean(values), rel=1e-5)
    assert not np.allclose(new["item_emb"][0], new["item_emb"][1])
    assert not new["item_emb"][:, 0].any()


def test_epoch_work_counts_the_bucketed_steps() -> None:
    """
    Rows of 1, 2, 3 and 8 items at L = 8 go to windows 1, 2, 4 and 8 (batches of 2:
    one padded step each): slots 2 * (1 + 2 + 4 + 8), pairs 2 * (1 + 4 + 16 + 64).
    Three more 1-item rows make the width-1 bucket two steps.
    """
    rows = left_padded([[3], [1, 2], [4, 5, 6], list(range(1, 9))], 8)
    assert (30, 170) == epoch_work(rows, 2)
    more = np.concatenate([rows, left_padded([[7], [8], [9]], 8)])
    assert (32, 172) == epoch_work(more, 2)


def test_fit_trains_an_ensemble() -> None:
    """fit with a 2-member config returns 2 members, both trained, and says so."""
    start = fresh_params(1, ENSEMBLE)
    params, report = run_fit(ENSEMBLE, DATA, epochs=2)
    assert (report.members, members_of(params)) == (2, 2)
    for k in range(2):
        assert not np.allclose(params["item_emb"][k], start["item_emb"][k])
    ndcg, _ = make_evaluator(ENSEMBLE)(params, DATA["val_inputs"], DATA["val_targets"])
    assert ndcg == pytest.approx(report.epochs[report.best_epoch - 1].val_ndcg_at_10)
