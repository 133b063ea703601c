"""
Training of the SASRec encoder.

Next-item losses (full and sampled softmax), one jitted optimisation step, a
full-ranking validation and an epoch loop with early stopping.

Data layout (as in :mod:`kernels.sasrec`): ``inputs [B, L]`` int, each row a user's
items left-padded with 0; ``targets [B, L]`` int, the next item after each slot, 0 where
there is none (padding, or the newest slot when it is held out). Items are
``1 .. num_items``; 0 is never an item.

The losses are pure kernels (un-jitted, randomness only through ``key``); the step and
the evaluator are built once per configuration and jitted at that boundary; :func:`fit`
is the impure shell (numpy shuffling, tqdm, wall-clock timing).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from kernels.metrics import hit_rate_metric, mean_over_valid_rows, ndcg_metric, target_is_valid
from kernels.sasrec import (
    SasrecConfig,
    encode_users,
    item_logits,
    members_of,
    param_shapes,
    sequence_outputs,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "EpochRecord",
    "TrainReport",
    "bce_loss",
    "default_optimizer",
    "epoch_work",
    "fit",
    "full_ranking_metrics",
    "full_softmax_loss",
    "init_optimizer_state",
    "make_evaluator",
    "make_train_step",
    "sample_negatives",
    "sampled_softmax_loss",
    "weight_decay_mask",
]

Params = dict[str, jax.Array]
#: An integer array as callers give it: numpy or JAX.
IntArray = np.ndarray | jax.Array
LossName = Literal["full", "sampled", "bce"]
TrainStep = Callable[
    [Params, optax.OptState, IntArray, IntArray, jax.Array],
    tuple[Params, optax.OptState, jax.Array],
]
Evaluator = Callable[[Params, IntArray, IntArray], tuple[float, float]]
TrainState = tuple[Params, optax.OptState]
EpochRunner = Callable[[int, TrainState, tqdm], tuple[TrainState, "EpochRecord"]]

#: tqdm's running loss is refreshed every this many steps; reading it waits for the device.
_POSTFIX_EVERY = 16


# ----------------------------------------------------------------------------- losses


def _masked_softmax_ce(
    logits: jax.Array, target_col: jax.Array, *, where: jax.Array, slot_where: jax.Array
) -> jax.Array:
    r"""
    Mean softmax cross-entropy over the slots where ``slot_where`` is True.

    ``loss = sum_s [slot_where_s] (logsumexp_{c: where_{s,c}} z_{s,c} - z_{s,t_s})
    / max(1, #{s : slot_where_s})``, with ``z = logits [..., C]``, ``t = target_col [...]``,
    ``where`` bool broadcastable to ``[..., C]`` and ``slot_where`` bool ``[...]``.
    The target column must be valid wherever ``slot_where`` is; with no such slot the
    loss is 0.0 and its gradient is zero, never NaN.
    """
    lse = jax.nn.logsumexp(jnp.where(where, logits, -jnp.inf), axis=-1)
    # Picked from the unmasked logits, so slots without a target stay finite as well.
    picked = jnp.take_along_axis(logits, target_col[..., None], axis=-1)[..., 0]
    nll = jnp.where(slot_where, lse - picked, 0.0)
    return jnp.sum(nll) / jnp.maximum(jnp.sum(slot_where), 1)


def full_softmax_loss(
    params: Params,
    inputs: jax.Array,
    targets: jax.Array,
    *,
    config: SasrecConfig,
    key: jax.Array | None = None,
) -> jax.Array:
    r"""
    Next-item cross-entropy over the whole vocabulary, averaged over target slots.

    With ``h = sequence_outputs(params, inputs)`` and ``z_{b,t,i} = h_{b,t} . E_i``
    (``E = item_emb``), ``loss = mean_{(b,t): targets_{b,t} > 0}
    (log sum_{i=1..V} exp z_{b,t,i} - z_{b,t,targets_{b,t}})``; column 0 (padding) is
    never a candidate. 0.0 when no slot has a target. Holds ``B * L * (V + 1)`` logits;
    for large vocabularies use :func:`sampled_softmax_loss`.

    Args:
        params: the encoder's parameters.
        inputs: int ``[B, L]``, left-padded with 0.
        targets: int ``[B, L]`` in ``[0, V]``; 0 = no target at that slot.
        config: the encoder's static configuration.
        key: dropout key (training); None = deterministic.

    Returns:
        float32 scalar.

    """
    logits = item_logits(params, sequence_outputs(params, inputs, config=config, key=key))
    not_padding = jnp.arange(config.num_items + 1) > 0
    return _masked_softmax_ce(logits, targets, where=not_padding, slot_where=targets > 0)


def sample_negatives(key: jax.Array, *, num_items: int, num_negatives: int) -> jax.Array:
    """
    ``num_negatives`` item ids drawn uniformly, with replacement, from ``1 .. num_items``.

    Returns:
        int32 ``[num_negatives]``.

    """
    return jax.random.randint(key, (num_negatives,), 1, num_items + 1, dtype=jnp.int32)


def sampled_softmax_loss(
    params: Params,
    inputs: jax.Array,
    targets: jax.Array,
    negatives: jax.Array,
    *,
    config: SasrecConfig,
    key: jax.Array | None = None,
) -> jax.Array:
    r"""
    Next-item cross-entropy over the target and ``K`` negatives shared by the batch.

    Each target slot gets logits ``[z_{target}, z_{n_1}, ..., z_{n_K}]`` and the loss
    is ``log sum_{c valid} exp(logit_c) - z_{target}``, averaged over target slots
    (0.0 when there is none). A negative equal to that slot's target (an accidental
    hit) is not a valid column. No logQ correction is applied: under uniform sampling
    ``log Q(i) = log(K / V)`` is the same for every column, positive included, so
    subtracting it would not change the softmax.

    Args:
        params: the encoder's parameters.
        inputs: int ``[B, L]``, left-padded with 0.
        targets: int ``[B, L]`` in ``[0, V]``; 0 = no target at that slot.
        negatives: int ``[K]`` in ``[1, V]``, e.g. from :func:`sample_negatives`.
        config: the encoder's static configuration.
        key: dropout key (training); None = deterministic.

    Returns:
        float32 scalar.

    """
    outputs = sequence_outputs(params, inputs, config=config, key=key)
    positive = jnp.sum(outputs * params["item_emb"][targets], axis=-1, keepdims=True)
    logits = jnp.concatenate([positive, item_logits(params, outputs, negatives)], axis=-1)
    hits = negatives == targets[..., None]
    where = jnp.concatenate([jnp.ones_like(positive, dtype=bool), ~hits], axis=-1)
    return _masked_softmax_ce(logits, jnp.zeros_like(targets), where=where, slot_where=targets > 0)


def bce_loss(
    params: Params,
    inputs: jax.Array,
    targets: jax.Array,
    negatives: jax.Array,
    *,
    config: SasrecConfig,
    key: jax.Array | None = None,
) -> jax.Array:
    r"""
    The SASRec paper's binary cross-entropy: one negative per target slot.

    ``loss = mean_{(b,t): targets_{b,t} > 0} (-log s(z_{target}) - [n != target]
    log(1 - s(z_n)))`` with ``s`` the logistic function and ``n = negatives_{b,t}``;
    0.0 when no slot has a target.

    Args:
        params: the encoder's parameters.
        inputs: int ``[B, L]``, left-padded with 0.
        targets: int ``[B, L]`` in ``[0, V]``; 0 = no target at that slot.
        negatives: int ``[B, L]`` in ``[1, V]``, one per slot.
        config: the encoder's static configuration.
        key: dropout key (training); None = deterministic.

    Returns:
        float32 scalar.

    """
    outputs = sequence_outputs(params, inputs, config=config, key=key)
    table = params["item_emb"]
    positive = jnp.sum(outputs * table[targets], axis=-1)
    negative = jnp.sum(outputs * table[negatives], axis=-1)
    nll = -jax.nn.log_sigmoid(positive) - jnp.where(
        negatives == targets, 0.0, jax.nn.log_sigmoid(-negative)
    )
    slots = targets > 0
    return jnp.sum(jnp.where(slots, nll, 0.0)) / jnp.maximum(jnp.sum(slots), 1)


# ----------------------------------------------------------------------------- optimiser


def weight_decay_mask(params: dict[str, Any]) -> dict[str, bool]:
    """
    Which parameters weight decay applies to: exactly those with two or more axes.

    In :func:`kernels.sasrec.param_shapes` every 2-D tensor is a weight matrix or an
    embedding table and every 1-D tensor is a bias or a layer-norm scale/bias, so the
    rank is the rule; it holds for names added later, unlike a prefix test on ``b``.
    """
    return {name: len(np.shape(value)) >= 2 for name, value in params.items()}


def default_optimizer(
    learning_rate: float = 1e-3, *, weight_decay: float = 0.01, clip_norm: float = 1.0
) -> optax.GradientTransformation:
    """
    The default optimiser: clipping, then AdamW that decays matrices only.

    Global-norm clipping to ``clip_norm``, then AdamW with decoupled ``weight_decay``
    on matrices and embeddings only (:func:`weight_decay_mask`). The learning rate is
    an injected hyper-parameter (``optax.inject_hyperparams``), so :func:`fit` can
    lower it on a plateau (``lr_decay``).
    """

    def chain(learning_rate: float) -> optax.GradientTransformation:
        return optax.chain(
            optax.clip_by_global_norm(clip_norm),
            optax.adamw(learning_rate, weight_decay=weight_decay, mask=weight_decay_mask),
        )

    return optax.inject_hyperparams(chain)(learning_rate=learning_rate)


def _scaled_learning_rate(opt_state: optax.OptState, factor: float) -> optax.OptState:
    """``opt_state`` with its injected learning rate times ``factor`` (unchanged if none)."""
    hyper = getattr(opt_state, "hyperparams", None)
    if not isinstance(hyper, dict) or "learning_rate" not in hyper:
        return opt_state
    return opt_state._replace(  # type: ignore[union-attr]
        hyperparams={**hyper, "learning_rate": hyper["learning_rate"] * factor}
    )


def _loss_of_key(
    config: SasrecConfig, loss: LossName, num_negatives: int
) -> Callable[[Params, jax.Array, jax.Array, jax.Array], jax.Array]:
    """``f(params, inputs, targets, key) -> loss`` for the chosen loss, decided once."""
    if loss == "full":
        return lambda p, x, y, key: full_softmax_loss(p, x, y, config=config, key=key)

    if loss == "bce":

        def bce(p: Params, x: jax.Array, y: jax.Array, key: jax.Array) -> jax.Array:
            drop_key, neg_key = jax.random.split(key)
            negs = jax.random.randint(neg_key, y.shape, 1, config.num_items + 1, dtype=jnp.int32)
            return bce_loss(p, x, y, negs, config=config, key=drop_key)

        return bce

    def sampled(p: Params, x: jax.Array, y: jax.Array, key: jax.Array) -> jax.Array:
        drop_key, neg_key = jax.random.split(key)
        negs = sample_negatives(neg_key, num_items=config.num_items, num_negatives=num_negatives)
        return sampled_softmax_loss(p, x, y, negs, config=config, key=drop_key)

    return sampled


def make_train_step(
    config: SasrecConfig,
    optimizer: optax.GradientTransformation,
    *,
    loss: LossName = "full",
    num_negatives: int = 128,
) -> TrainStep:
    """
    One jitted optimisation step on the chosen loss.

    ``step(params, opt_state, inputs, targets, key) -> (params, opt_state, loss_value)``:
    ``inputs``/``targets`` are int32 ``[B, L]`` (see the module docstring); ``key``
    drives dropout and, for ``loss="sampled"``, the ``num_negatives`` negatives of this
    step (``loss="bce"``: one negative per target slot). ``config`` and ``optimizer``
    are closed over (static), so the step compiles
    once per batch shape. After the update, row 0 of ``item_emb`` (padding) is reset to
    zero. Buffers are not donated: callers may keep earlier parameters (best epoch).

    An ensemble (parameters with a leading member axis, :mod:`kernels.sasrec`) trains
    each member on the same batch with its own dropout and negatives (``split(key,
    members)``) and its own optimiser state (:func:`init_optimizer_state`); the members
    never share a gradient, and the loss value is their mean.

    Raises:
        ValueError: ``loss`` is not "full"/"sampled"/"bce", or ``num_negatives`` < 1.

    """
    if loss not in {"full", "sampled", "bce"}:
        _fail("loss", 'must be "full", "sampled" or "bce"', repr(loss))
    _check_count("num_negatives", num_negatives)
    loss_fn = _loss_of_key(config.member, loss, num_negatives)

    def member_step(
        params: Params,
        opt_state: optax.OptState,
        inputs: jax.Array,
        targets: jax.Array,
        key: jax.Array,
    ) -> tuple[Params, optax.OptState, jax.Array]:
        value, grads = jax.value_and_grad(loss_fn)(params, inputs, targets, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params = {**params, "item_emb": params["item_emb"].at[0].set(0.0)}
        return params, opt_state, value

    def step(
        params: Params,
        opt_state: optax.OptState,
        inputs: jax.Array,
        targets: jax.Array,
        key: jax.Array,
    ) -> tuple[Params, optax.OptState, jax.Array]:
        members = members_of(params)
        if members == 1:
            return member_step(params, opt_state, inputs, targets, key)
        every = jax.vmap(member_step, in_axes=(0, 0, None, None, 0))
        params, opt_state, values = every(
            params, opt_state, inputs, targets, jax.random.split(key, members)
        )
        return params, opt_state, jnp.mean(values)

    return jax.jit(step)


def init_optimizer_state(optimizer: optax.GradientTransformation, params: Params) -> optax.OptState:
    """``optimizer.init(params)``; for an ensemble, one state per member (a leading axis)."""
    if members_of(params) == 1:
        return optimizer.init(params)
    return jax.vmap(optimizer.init)(params)


def epoch_work(inputs: np.ndarray, batch_size: int) -> tuple[int, int]:
    """
    What one epoch over ``inputs [N, L]`` computes, as :func:`fit` batches it.

    ``(slots, pairs)``: the slots of every step (``batch_size`` rows, padded, times its
    window width; :func:`_length_buckets`), and the query-key pairs of their causal
    attention (``batch_size * width**2`` a step). An epoch's time is about linear in
    the two (``daemon.quality`` sizes ensembles with it).
    """
    slots = pairs = 0
    for width, rows in _length_buckets(np.asarray(inputs)).items():
        steps = -(-len(rows) // batch_size)
        slots += steps * batch_size * width
        pairs += steps * batch_size * width * width
    return slots, pairs


# ----------------------------------------------------------------------------- validation


def _rankable_mask(inputs: jax.Array, targets: jax.Array, num_cols: int) -> jax.Array:
    """
    Which items may be ranked, bool ``[B, num_cols]``.

    True except at padding (column 0) and at the items in the user's ``inputs [B, L]``;
    the target ``[B]`` is always True (when not 0).
    """
    rows = jnp.arange(inputs.shape[0])[:, None]
    seen = jnp.zeros((inputs.shape[0], num_cols), dtype=bool).at[rows, inputs].set(True)
    cols = jnp.arange(num_cols)
    return (~seen | (cols == targets[:, None])) & (cols > 0)


def full_ranking_metrics(
    params: Params, inputs: jax.Array, targets: jax.Array, *, config: SasrecConfig, k: int = 10
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """
    NDCG@k and HR@k of each user's held-out item ranked against the whole vocabulary.

    Scores are ``encode_users(inputs) . item_emb^T`` over columns ``0 .. V``; padding
    and the items already in the user's ``inputs`` are excluded, the target never is
    (see :mod:`kernels.metrics`, "Full ranking").

    Args:
        params: the encoder's parameters.
        inputs: int ``[B, L]``, left-padded with 0.
        targets: int ``[B]``, the held-out item; 0 marks a padding row.
        config: the encoder's static configuration.
        k: static cutoff.

    Returns:
        ``(ndcg [B], hit_rate [B], valid [B])``: float32, float32, bool; ``valid`` is
        False for rows without a rankable target (padding rows).

    """
    scores = item_logits(params, encode_users(params, inputs, config=config))
    where = _rankable_mask(inputs, targets, config.num_items + 1)
    ndcg = ndcg_metric(scores, targets, k=k, where=where)
    hit_rate = hit_rate_metric(scores, targets, k=k, where=where)
    return ndcg, hit_rate, target_is_valid(targets, where=where)


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """``a`` with zero rows appended up to ``rows`` rows."""
    missing = rows - a.shape[0]
    return a if missing == 0 else np.concatenate([a, np.zeros((missing, *a.shape[1:]), a.dtype)])


def _padded_batches(
    arrays: tuple[np.ndarray, ...], batch_size: int
) -> Iterator[tuple[np.ndarray, ...]]:
    """Consecutive blocks of ``batch_size`` rows of each array; the last one zero-padded."""
    for start in range(0, arrays[0].shape[0], batch_size):
        yield tuple(_pad_rows(a[start : start + batch_size], batch_size) for a in arrays)


def make_evaluator(config: SasrecConfig, *, batch_size: int = 256, k: int = 10) -> Evaluator:
    """
    A validation function: mean NDCG@k and HR@k under full ranking.

    ``evaluate(params, inputs [U, L], targets [U]) -> (ndcg, hit_rate)``, floats averaged
    over users with a rankable target (:func:`full_ranking_metrics`).

    Users go through in blocks of ``batch_size``, the last block padded with empty rows
    that are masked out, so the jitted kernel compiles once whatever ``U`` is. Memory
    is about ``batch_size * (V + 1)`` scores.
    """
    _check_count("batch_size", batch_size)
    _check_count("k", k)
    batch_fn = jax.jit(functools.partial(full_ranking_metrics, config=config, k=k))

    def evaluate(params: Params, inputs: IntArray, targets: IntArray) -> tuple[float, float]:
        x = _int_array("inputs", inputs, (None, config.max_len))
        arrays = (x, _int_array("targets", targets, (x.shape[0],)))
        parts = [batch_fn(params, x, t) for x, t in _padded_batches(arrays, batch_size)]
        ndcg, hit_rate, valid = (jnp.concatenate(p) for p in zip(*parts, strict=True))
        return (
            float(mean_over_valid_rows(ndcg, row_where=valid)),
            float(mean_over_valid_rows(hit_rate, row_where=valid)),
        )

    return evaluate


# ----------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True, slots=True)
class EpochRecord:
    """
    One epoch of :func:`fit`.

    ``epoch`` is 1-based; ``train_loss`` the mean over the epoch's target slots;
    validation NDCG@10 and HR@10 after it; ``wall_s`` its wall-clock seconds,
    validation included.
    """

    epoch: int
    train_loss: float
    val_ndcg_at_10: float
    val_hr_at_10: float
    wall_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class TrainReport:
    """
    What :func:`fit` did.

    One record per epoch run; ``best_epoch`` is the 1-based epoch whose parameters were
    returned (best validation NDCG@10, the earliest on ties); ``stopped_early`` says
    whether training stopped before ``epochs``, ``time_bound`` whether the deadline
    (not patience) stopped it, ``members`` how many ensemble members were trained.
    """

    epochs: tuple[EpochRecord, ...]
    best_epoch: int
    stopped_early: bool
    time_bound: bool = False
    #: the ensemble members trained (1: not an ensemble)
    members: int = 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict: ``{"epochs": [{...}, ...], "best_epoch", "stopped_early"}``."""
        return {
            "epochs": [dataclasses.asdict(record) for record in self.epochs],
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "time_bound": self.time_bound,
            "members": self.members,
        }


# ----------------------------------------------------------------------------- checks


def _fail(argument: str, rule: str, got: str) -> NoReturn:
    msg = f"{argument}: {rule}, got {got}"
    raise ValueError(msg)


def _describe(value: object) -> str:
    """The dtype and shape of an array, else the type name -- never the contents."""
    if isinstance(value, np.ndarray | jax.Array):
        return f"{value.dtype} array of shape {tuple(value.shape)}"
    return type(value).__name__


def _check_count(argument: str, value: object, minimum: int = 1) -> None:
    """Raise unless ``value`` is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        _fail(argument, f"must be an int >= {minimum}", type(value).__name__)
    if value < minimum:
        _fail(argument, f"must be an int >= {minimum}", repr(int(value)))


def _int_array(argument: str, value: object, shape: tuple[int | None, ...]) -> np.ndarray:
    """``value`` as int32 if it is an integer array of ``shape`` (None = any size >= 1)."""
    dims = ", ".join("N" if n is None else str(n) for n in shape)
    rule = f"must be an integer array of shape [{dims}]" + (" with N >= 1" if None in shape else "")
    if not isinstance(value, np.ndarray | jax.Array):
        _fail(argument, rule, _describe(value))
    array = np.asarray(value)
    fits = array.ndim == len(shape) and all(
        n >= 1 if want is None else n == want for n, want in zip(array.shape, shape, strict=True)
    )
    if not (fits and np.issubdtype(array.dtype, np.integer)):
        _fail(argument, rule, _describe(value))
    return array.astype(np.int32)


def _check_range(argument: str, array: np.ndarray, low: int, high: int) -> None:
    outside = int(np.count_nonzero((array < low) | (array > high)))
    if outside:
        _fail(argument, f"values must lie in [{low}, {high}]", f"{outside} values outside")


def _check_sequences(inputs: np.ndarray, targets: np.ndarray, num_items: int) -> None:
    """Item range, left padding, and no target where the input slot is padding."""
    _check_range("train_inputs", inputs, 0, num_items)
    _check_range("train_targets", targets, 0, num_items)
    gaps = int(np.count_nonzero(np.any(np.diff((inputs > 0).astype(np.int8), axis=1) < 0, axis=1)))
    if gaps:
        _fail("train_inputs", "rows must be left-padded (no 0 after an item)", f"{gaps} rows")
    orphans = int(np.count_nonzero((inputs == 0) & (targets != 0)))
    if orphans:
        _fail("train_targets", "must be 0 where train_inputs is 0 (padding)", f"{orphans} slots")


def _check_params(params: object, config: SasrecConfig) -> None:
    expected = param_shapes(config)
    got = {n: tuple(np.shape(v)) for n, v in params.items()} if isinstance(params, dict) else None
    if got != expected:
        found = _describe(params) if got is None else f"{len(got)} arrays, not matching"
        _fail("params", "must have the names and shapes of param_shapes(config)", found)


def _checked_data(
    config: SasrecConfig, train: tuple[object, object], val: tuple[object, object]
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The training and validation arrays as int32 numpy, after every check."""
    length = config.max_len
    x = _int_array("train_inputs", train[0], (None, length))
    y = _int_array("train_targets", train[1], x.shape)
    _check_sequences(x, y, config.num_items)
    vx = _int_array("val_inputs", val[0], (None, length))
    vy = _int_array("val_targets", val[1], (vx.shape[0],))
    _check_range("val_inputs", vx, 0, config.num_items)
    _check_range("val_targets", vy, 1, config.num_items)
    return (x, y), (vx, vy)


# ----------------------------------------------------------------------------- loop


@dataclasses.dataclass(slots=True)
class _RunningLoss:
    """Mean of step losses weighted by their target counts; reads the device lazily."""

    total: float = 0.0
    count: int = 0
    pending: list[tuple[jax.Array, int]] = dataclasses.field(default_factory=list)

    def add(self, loss: jax.Array, count: int) -> None:
        self.pending.append((loss, count))

    def value(self) -> float:
        for loss, count in self.pending:
            self.total += float(loss) * count
            self.count += count
        self.pending.clear()
        return self.total / self.count if self.count else 0.0


def _run_epoch(
    step: TrainStep,
    state: TrainState,
    batches: Iterator[tuple[np.ndarray, ...]],
    keys: Callable[[int], jax.Array],
    bar: tqdm,
) -> tuple[Params, optax.OptState, float]:
    """One pass over ``batches``; returns the new state and the epoch's mean loss."""
    params, opt_state = state
    running = _RunningLoss()
    for i, (x, y) in enumerate(batches):
        params, opt_state, loss = step(params, opt_state, x, y, keys(i))
        running.add(loss, int(np.count_nonzero(y)))
        bar.update()
        if i % _POSTFIX_EVERY == 0:
            bar.set_postfix(loss=f"{running.value():.4f}", refresh=False)
    return params, opt_state, running.value()


def _length_buckets(inputs: np.ndarray) -> dict[int, np.ndarray]:
    """
    Training rows by window width: ``{width: row indices}``.

    The widths are ``L``, ``L/2``, ``L/4`` and ``L/8`` (rounded up); each row goes to
    the narrowest window that holds its items. A left-padded row that fits in ``W``
    slots gives the same outputs from its newest ``W`` columns as from all ``L``
    (:func:`kernels.sasrec.sequence_outputs`), so short rows train at a fraction of the
    cost; the step compiles once per width.
    """
    length = inputs.shape[1]
    widths = sorted({max(1, -(-length // d)) for d in (1, 2, 4, 8)})
    used = np.count_nonzero(inputs, axis=1)
    slot = np.searchsorted(np.asarray(widths), used)  # the first width >= used
    return {w: np.flatnonzero(slot == i) for i, w in enumerate(widths) if np.any(slot == i)}


def _bucketed_batches(
    train: tuple[np.ndarray, np.ndarray],
    buckets: dict[int, np.ndarray],
    batch_size: int,
    rng: np.random.Generator,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """
    One epoch's batches: the blocks of all buckets, in a shuffled order.

    Each bucket is shuffled and cut into blocks of ``batch_size`` rows (the last padded).
    """
    blocks = []
    for width, rows in buckets.items():
        order = rows[rng.permutation(len(rows))]
        blocks += [(width, order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
    for b in rng.permutation(len(blocks)):
        width, rows = blocks[b]
        x, y = train[0][rows, -width:], train[1][rows, -width:]
        yield _pad_rows(x, batch_size), _pad_rows(y, batch_size)


@dataclasses.dataclass(frozen=True, slots=True)
class _Best:
    """The best epoch so far: its validation NDCG@10, number and parameters."""

    ndcg: float
    epoch: int
    params: Params


def _epoch_runner(
    step: TrainStep,
    evaluate: Evaluator,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    *,
    batch_size: int,
    seed: int,
) -> EpochRunner:
    """
    The body of one epoch, ``run(epoch, state, bar) -> (state, record)``.

    Shuffles with ``default_rng(seed)``, trains with keys ``fold_in(key(seed),
    global_step)``, then validates.
    """
    rng, base_key = np.random.default_rng(seed), jax.random.key(seed)
    buckets = _length_buckets(train[0])
    n_batches = sum(-(-len(rows) // batch_size) for rows in buckets.values())

    def run(epoch: int, state: TrainState, bar: tqdm) -> tuple[TrainState, EpochRecord]:
        start = time.perf_counter()
        batches = _bucketed_batches(train, buckets, batch_size, rng)
        first = (epoch - 1) * n_batches
        params, opt_state, train_loss = _run_epoch(
            step, state, batches, lambda i: jax.random.fold_in(base_key, first + i), bar
        )
        ndcg, hit_rate = evaluate(params, *val)
        wall_s = time.perf_counter() - start
        return (params, opt_state), EpochRecord(epoch, train_loss, ndcg, hit_rate, wall_s)

    return run


def _train_loop(
    run_epoch: EpochRunner,
    state: TrainState,
    *,
    epochs: int,
    patience: int,
    bar: tqdm,
    deadline: float | None = None,
    lr_decay: tuple[int, float] | None = None,
) -> tuple[Params, TrainReport]:
    """
    Epochs until ``epochs``, ``patience`` epochs without a better NDCG@10, or the deadline.

    Training also stops when another epoch as long as the last would end after
    ``deadline``; with ``lr_decay = (n, f)`` the learning rate is multiplied by ``f``
    after every ``n`` epochs without a better NDCG@10.
    """
    best, records, time_bound = _Best(-math.inf, 0, state[0]), [], False
    for epoch in range(1, epochs + 1):
        bar.set_description(f"epoch {epoch}/{epochs}")
        state, record = run_epoch(epoch, state, bar)
        records.append(record)
        bar.set_postfix(loss=f"{record.train_loss:.4f}", ndcg10=f"{record.val_ndcg_at_10:.4f}")
        if epoch == 1 or record.val_ndcg_at_10 > best.ndcg:
            best = _Best(record.val_ndcg_at_10, epoch, state[0])
        elif epoch - best.epoch >= patience:
            break
        elif lr_decay is not None and (epoch - best.epoch) % lr_decay[0] == 0:
            state = (state[0], _scaled_learning_rate(state[1], lr_decay[1]))
        if (
            deadline is not None
            and epoch < epochs
            and time.perf_counter() + record.wall_s > deadline
        ):
            time_bound = True
            break
    report = TrainReport(tuple(records), best.epoch, stopped_early=len(records) < epochs,
                         time_bound=time_bound, members=members_of(best.params))  # fmt: skip
    return best.params, report


def fit(
    params: Params,
    config: SasrecConfig,
    train_inputs: IntArray,
    train_targets: IntArray,
    *,
    val_inputs: IntArray,
    val_targets: IntArray,
    epochs: int,
    batch_size: int,
    seed: int,
    loss: LossName = "full",
    num_negatives: int = 128,
    optimizer: optax.GradientTransformation | None = None,
    patience: int = 3,
    eval_batch_size: int = 256,
    progress: bool = True,
    deadline: float | None = None,
    evaluator: Evaluator | None = None,
    lr_decay: tuple[int, float] | None = None,
) -> tuple[Params, TrainReport]:
    """
    Train for up to ``epochs`` and return the parameters of the best validation epoch.

    Each epoch shuffles the ``N`` training rows with ``numpy.random.default_rng(seed)``
    within their length buckets (:func:`_length_buckets`: short rows train in a
    narrow window), runs :func:`make_train_step` over blocks of ``batch_size`` (the last
    padded with empty rows, so the step compiles once per window width) in a shuffled
    order, with key ``fold_in(key(seed), step)``, then
    computes validation NDCG@10 and HR@10 (:func:`make_evaluator`). Training stops
    early once NDCG@10 has not improved for ``patience`` epochs. The same arguments
    give bit-identical results on the same machine.

    Args:
        params: initial parameters (:func:`kernels.sasrec.init_params`).
        config: the encoder's configuration.
        train_inputs: int ``[N, L]``, left-padded, items in ``[0, V]``.
        train_targets: int ``[N, L]``, next items; 0 = no target (required at padding).
        val_inputs: int ``[U, L]``, left-padded.
        val_targets: int ``[U]`` in ``[1, V]``, each user's held-out item.
        epochs: maximum number of epochs, >= 1.
        batch_size: training rows per step, >= 1.
        seed: seeds shuffling, dropout and negative sampling.
        loss: "full" (softmax over all items), "sampled" (``num_negatives`` shared) or
            "bce" (the SASRec paper's: one negative per slot).
        num_negatives: negatives per step for ``loss="sampled"``.
        optimizer: an optax transformation; None = :func:`default_optimizer`.
        patience: epochs without improvement before stopping, >= 1.
        eval_batch_size: validation users per jitted call.
        progress: show a tqdm bar with the running loss.
        deadline: a ``time.perf_counter()`` value: no epoch starts that, as long as
            the last one, would end after it (the report says ``time_bound``).
        evaluator: ``evaluate(params, val_inputs, val_targets) -> (ndcg@10, hr@10)``
            in place of full-ranking validation (:func:`make_evaluator`), e.g. another
            protocol; early stopping follows its NDCG@10.
        lr_decay: ``(n, factor)``: multiply the learning rate by ``factor`` after
            every ``n`` epochs without a better validation NDCG@10 (needs an optimizer
            with an injected learning rate, as :func:`default_optimizer` has).

    Returns:
        ``(best_params, report)``.

    Raises:
        ValueError: an argument breaks its rule; the message names it.

    """
    counts = {"epochs": epochs, "batch_size": batch_size, "patience": patience}
    for name, value in (counts | {"eval_batch_size": eval_batch_size}).items():
        _check_count(name, value)
    _check_count("seed", seed, minimum=0)
    _check_params(params, config)
    train, val = _checked_data(config, (train_inputs, train_targets), (val_inputs, val_targets))
    optimizer = default_optimizer() if optimizer is None else optimizer
    step = make_train_step(config, optimizer, loss=loss, num_negatives=num_negatives)
    evaluate = evaluator or make_evaluator(config, batch_size=eval_batch_size)
    run_epoch = _epoch_runner(step, evaluate, train, val, batch_size=batch_size, seed=seed)
    per_epoch = sum(-(-len(rows) // batch_size) for rows in _length_buckets(train[0]).values())
    state = (params, init_optimizer_state(optimizer, params))
    with tqdm(total=epochs * per_epoch, unit="batch", disable=not progress) as bar:
        return _train_loop(run_epoch, state, epochs=epochs, patience=patience, bar=bar,
                           deadline=deadline, lr_decay=lr_decay)  # fmt: skip
