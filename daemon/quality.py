"""
Model quality: train the sequential ranker on a data set and evaluate it offline.

The functions behind ``rerankd train`` and ``rerankd eval`` (``daemon/_quality_cli.py``
is their command line). A data set is read with the store's own importers
(:mod:`eventstore.importers`: SASRec's ``user item`` lines, MovieLens directories) or
from the daemon's event log (:func:`daemon.autotrain.sequences_from_log`), and becomes
one item sequence per user, oldest first, in model indices (``vocabulary[i]`` has index
``i + 1``, items in order of first appearance).

Split and protocols: :mod:`kernels.evaluation` (leave-one-out; ``sampled-100`` and
``full``). Training is :func:`kernels.train.fit` on the leave-one-out training rows,
early stopping on validation NDCG@10 (full ranking over at most 10,000 validation
users), within a time budget.

Defaults that generalize (chosen from the data, never from the file's name):

- ``max_len``: the 90th percentile of the users' sequence lengths rounded up to a
  multiple of 50, within [50, 200]: 50 for short-sequence data such as the Amazon
  sets, 200 for MovieLens-1M, as in the SASRec paper.
- ``dropout``: 0.5 when the median user has fewer than 20 interactions (sparse data
  overfits), else 0.2, SASRec's two settings.
- loss: the full softmax (cross-entropy over every item) while one step's logits
  stay under :data:`FULL_SOFTMAX_LOGITS`, else the sampled softmax with
  :data:`NEGATIVES` uniform negatives shared by the batch.
- epochs: until validation NDCG@10 has not improved for ``patience`` epochs, at most
  ``max_epochs``, and never past the time budget (``max_minutes``).
- ``members``: an ensemble of :data:`MEMBERS` encoders trained side by side from
  different initialisations, their scores averaged (:mod:`kernels.sasrec`). Members
  cost time in proportion, so training has as many as leave time for
  :data:`ENSEMBLE_MIN_EPOCHS` epochs within the budget by an estimate of an epoch's
  time from the training rows (:func:`affordable_members`; a large data set gets
  one). An estimate, not a measurement, so that the same seed gives the same model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from eventstore.importers import movielens_events, sasrec_events
from eventstore.schema import Event, Interaction, ItemUpdated

__all__ = [
    "Dataset",
    "TrainOptions",
    "TrainResult",
    "affordable_members",
    "evaluate_model",
    "load_dataset",
    "load_log",
    "plan",
    "train",
]

DatasetFormat = Literal["sasrec", "movielens"]
#: A step's logits [members, B, L, V + 1] of the full softmax, at most (float32: 64 MiB).
FULL_SOFTMAX_LOGITS: Final = 1 << 24
NEGATIVES: Final = 256
#: Ensemble members by default, and the epochs each must have time for (see above).
MEMBERS: Final = 3
ENSEMBLE_MIN_EPOCHS: Final = 40
#: One member's epoch, in seconds per padded slot and per attention pair
#: (:func:`kernels.train.epoch_work`), fitted to the epochs of sasrec-video (8.0 s:
#: 0.32M slots, 5.7M pairs) and ml-100k (7.5 s: 0.12M slots, 18.7M pairs) on the 2-core
#: development VM, validation included.
SECONDS_PER_SLOT: Final = 20e-6
SECONDS_PER_PAIR: Final = 0.27e-6
#: Learning-rate decay on a validation plateau: halve it after 3 epochs without gain.
LR_DECAY_AFTER, LR_DECAY_FACTOR = 3, 0.5
#: Validation ranks every item for each user each epoch; more users add little.
MAX_VALIDATION_USERS: Final = 10_000
_MIN_LEN, _MAX_LEN, _LEN_STEP = 50, 200, 50
_SPARSE_MEDIAN = 20


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True, slots=True)
class Dataset:
    """
    Users' item sequences in model indices, and what is known about the items.

    ``sequences[u]`` int32, oldest first; ``vocabulary[i]`` is the item id of index
    ``i + 1``; ``tags`` maps an item id to its categories and tags where the source has
    them (MovieLens genres), else is empty; ``events`` are the source's events in
    order, for the replay (None for a log).
    """

    name: str
    vocabulary: tuple[str, ...]
    sequences: list[np.ndarray]
    tags: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    events: list[Event] | None = dataclasses.field(default=None, repr=False)

    @property
    def num_items(self) -> int:
        """The number of items in the vocabulary."""
        return len(self.vocabulary)

    @property
    def interactions(self) -> int:
        """The number of interactions over all users' sequences."""
        return sum(len(s) for s in self.sequences)

    def describe(self) -> dict[str, Any]:
        """The data set's name, user, item and interaction counts and median sequence length."""
        lengths = np.asarray([len(s) for s in self.sequences])
        return {
            "dataset": self.name,
            "users": len(self.sequences),
            "items": self.num_items,
            "interactions": int(lengths.sum()),
            "median_length": float(np.median(lengths)) if len(lengths) else 0.0,
        }


def _from_events(name: str, events: list[Event]) -> Dataset:
    index: dict[str, int] = {}
    users: dict[str, list[int]] = {}
    tags: dict[str, tuple[str, ...]] = {}
    for event in events:
        if isinstance(event, Interaction):
            i = index.setdefault(event.item, len(index) + 1)
            users.setdefault(event.user, []).append(i)
        elif isinstance(event, ItemUpdated):
            names = list(event.fields.get("tags") or ())
            category = event.fields.get("category")
            if isinstance(category, str) and category not in names:
                names.insert(0, category)
            tags[event.item] = tuple(str(n) for n in names)
    return Dataset(
        name=name,
        vocabulary=tuple(index),
        sequences=[np.asarray(s, np.int32) for s in users.values()],
        tags=tags,
        events=events,
    )


def load_dataset(path: str | Path, fmt: DatasetFormat) -> Dataset:
    """
    Read a data set file (``sasrec``) or directory/ratings file (``movielens``).

    MovieLens ratings are put in time order (the importer sorts them); every rating
    counts as an interaction, whatever its value, as in SASRec's preprocessing.

    Raises:
        ValueError: an unknown format, or a malformed line (named by the importer).
        OSError: the file cannot be read.

    """
    path = Path(path)
    if fmt == "sasrec":
        events: list[Event] = list(sasrec_events(path))
    elif fmt == "movielens":
        events = movielens_events(path)[0]
    else:
        msg = f"format: must be sasrec or movielens, got {fmt!r}"
        raise ValueError(msg)
    data = _from_events(path.stem if path.is_file() else path.name, events)
    if not data.sequences:
        msg = f"{path}: no interactions in this file"
        raise ValueError(msg)
    return data


def load_log(log_path: str | Path) -> Dataset:
    """The daemon's log as a data set (every interaction of items seen at least twice)."""
    from daemon.autotrain import sequences_from_log  # noqa: PLC0415 - pulls in jax

    data = sequences_from_log(log_path, max_len=1 << 30)
    if not data.sequences:
        msg = f"{log_path}: no user with two interactions with known items in this log"
        raise ValueError(msg)
    return Dataset(name="log", vocabulary=data.vocabulary, sequences=list(data.sequences))


def history_only(data: Dataset, holdout: float) -> Dataset:
    """
    ``data`` without each user's last ``holdout`` share of interactions (at least one).

    That is the part :mod:`daemon.replay` holds out: a model trained on the rest has not
    seen it.
    """
    if not 0.0 < holdout < 1.0:
        msg = f"holdout: must be between 0 and 1 (exclusive), got {holdout}"
        raise ValueError(msg)
    kept = [s[: len(s) - max(1, int(holdout * len(s)))] for s in data.sequences]
    return dataclasses.replace(data, sequences=[s for s in kept if len(s)], events=None)


def remap(data: Dataset, vocabulary: Sequence[str]) -> tuple[list[np.ndarray], int]:
    """
    ``data``'s sequences in another vocabulary's indices (a model's), and a drop count.

    The count is how many interactions were dropped because the vocabulary lacks their
    item.
    """
    index = {item: i + 1 for i, item in enumerate(vocabulary)}
    lookup = np.zeros(data.num_items + 1, np.int32)
    for i, item in enumerate(data.vocabulary):
        lookup[i + 1] = index.get(item, 0)
    out, dropped = [], 0
    for seq in data.sequences:
        mapped = lookup[seq]
        kept = mapped[mapped > 0]
        dropped += len(mapped) - len(kept)
        out.append(kept)
    return out, dropped


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True, slots=True)
class TrainOptions:
    """``rerankd train``'s options; None = chosen from the data (module docstring)."""

    seed: int = 0
    max_len: int | None = None
    dim: int = 64
    members: int = MEMBERS
    blocks: int = 2
    heads: int = 1
    dropout: float | None = None
    loss: Literal["full", "sampled", "bce"] | None = None
    negatives: int = NEGATIVES
    batch_size: int = 128
    learning_rate: float = 2e-3
    max_epochs: int = 200
    patience: int = 10
    max_minutes: float = 18.0
    progress: bool = True
    #: train only on each user's history before this held-out share (`rerankd replay`)
    holdout: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What :func:`plan` chose: the model's shape and the loss."""

    config: Any  # kernels.sasrec.SasrecConfig (imported lazily: jax)
    loss: Literal["full", "sampled", "bce"]
    negatives: int


def _percentile_len(data: Dataset) -> int:
    lengths = np.asarray([len(s) for s in data.sequences])
    p90 = float(np.percentile(lengths, 90))
    return int(min(_MAX_LEN, max(_MIN_LEN, _LEN_STEP * math.ceil(p90 / _LEN_STEP))))


def affordable_members(train_inputs: np.ndarray, options: TrainOptions) -> tuple[int, float]:
    """
    How many of ``options.members`` fit :data:`ENSEMBLE_MIN_EPOCHS` epochs in the budget.

    ``(members, estimated seconds of one member's epoch)``: the most members ``k`` with
    ``k * epoch_s * ENSEMBLE_MIN_EPOCHS <= max_minutes``, at least 1, where ``epoch_s``
    comes from the work of an epoch over ``train_inputs`` (:data:`SECONDS_PER_SLOT`).
    """
    from kernels.train import epoch_work  # noqa: PLC0415

    slots, pairs = epoch_work(train_inputs, options.batch_size)
    epoch_s = slots * SECONDS_PER_SLOT + pairs * SECONDS_PER_PAIR
    budget_s = options.max_minutes * 60.0
    for members in range(options.members, 1, -1):
        if members * epoch_s * ENSEMBLE_MIN_EPOCHS <= budget_s:
            return members, epoch_s
    return 1, epoch_s


def plan(data: Dataset, options: TrainOptions) -> Plan:
    """The model configuration and loss for ``data`` (module docstring)."""
    from kernels.sasrec import SasrecConfig  # noqa: PLC0415

    max_len = options.max_len or _percentile_len(data)
    median = float(np.median([len(s) for s in data.sequences]))
    dropout = options.dropout
    if dropout is None:
        dropout = 0.5 if median < _SPARSE_MEDIAN else 0.2
    config = SasrecConfig(
        num_items=data.num_items,
        max_len=max_len,
        dim=options.dim,
        num_blocks=options.blocks,
        num_heads=options.heads,
        dropout=dropout,
        members=options.members,
    )
    loss = options.loss
    if loss is None:
        # every member holds its own logits in a step
        logits = options.batch_size * max_len * (data.num_items + 1) * options.members
        loss = "full" if logits <= FULL_SOFTMAX_LOGITS else "sampled"
    return Plan(config, loss, options.negatives)


@dataclasses.dataclass(frozen=True, slots=True)
class TrainResult:
    """What :func:`train` did: the model file, its report, and the figures."""

    model: Path
    report: dict[str, Any]


def train(
    data: Dataset,
    out: str | Path,
    options: TrainOptions,
    *,
    report_dir: str | Path | None = None,
) -> TrainResult:
    """
    Train on ``data``'s leave-one-out training rows and write the model to ``out``.

    Writes, next to the model (or in ``report_dir``), ``<model>.train.json`` (options,
    plan, data, one record per epoch with loss and validation NDCG@10/HR@10, the best
    epoch, seconds) and ``<model>.train.png`` (loss and validation NDCG@10 per epoch).
    The model file is written atomically; its manifest keeps the report's summary.
    The same data, options and machine give the same model.
    """
    import jax  # noqa: PLC0415

    from kernels.evaluation import leave_one_out, sampled_validator  # noqa: PLC0415
    from kernels.modelfile import save_model  # noqa: PLC0415
    from kernels.sasrec import init_params  # noqa: PLC0415
    from kernels.train import default_optimizer, fit  # noqa: PLC0415

    started = time.perf_counter()
    deadline = started + options.max_minutes * 60.0
    if options.holdout is not None:
        data = history_only(data, options.holdout)
    chosen = plan(data, options)
    config = chosen.config
    split = leave_one_out(data.sequences, config.max_len)
    if len(split.val_targets) == 0 or len(split.train_inputs) == 0:
        msg = "dataset: no user has three interactions, so nothing can be validated"
        raise ValueError(msg)
    rng = np.random.default_rng(options.seed)
    val = np.arange(len(split.val_targets))
    if len(val) > MAX_VALIDATION_USERS:
        val = np.sort(rng.choice(len(val), MAX_VALIDATION_USERS, replace=False))
    train_inputs, train_targets = _training_rows(data.sequences, split, val, config.max_len)
    members, epoch_s = affordable_members(train_inputs, options)
    config = dataclasses.replace(config, members=members)
    seen = [split.seen_of(int(u)) for u in val]
    indptr = np.zeros(len(seen) + 1, np.int64)
    np.cumsum([len(x) for x in seen], out=indptr[1:])
    validate = sampled_validator(config, indptr, np.concatenate(seen), seed=options.seed)
    params = jax.jit(init_params, static_argnums=1)(jax.random.key(options.seed), config)
    params, report = fit(
        params,
        config,
        train_inputs,
        train_targets,
        val_inputs=split.val_inputs[val],
        val_targets=split.val_targets[val],
        epochs=options.max_epochs,
        batch_size=options.batch_size,
        seed=options.seed,
        loss=chosen.loss,
        num_negatives=chosen.negatives,
        optimizer=default_optimizer(options.learning_rate),
        patience=options.patience,
        progress=options.progress,
        deadline=deadline,
        evaluator=validate,
        lr_decay=(LR_DECAY_AFTER, LR_DECAY_FACTOR),
    )
    best = report.epochs[report.best_epoch - 1]
    summary = {
        "trained_by": "rerankd train",
        **data.describe(),
        "seed": options.seed,
        "members": members,
        "estimated_epoch_s": round(epoch_s, 1),  # one member's, as affordable_members says
        "loss": chosen.loss,
        "negatives": chosen.negatives if chosen.loss == "sampled" else None,
        "epochs": len(report.epochs),
        "best_epoch": report.best_epoch,
        "val_ndcg@10": round(best.val_ndcg_at_10, 5),
        "val_hr@10": round(best.val_hr_at_10, 5),
        "validation_users": len(val),
        "time_bound": report.time_bound,
        "holdout": options.holdout,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(out, params, config, vocabulary=data.vocabulary, extra=summary)
    full = {
        **summary,
        "seconds": round(time.perf_counter() - started, 1),
        "config": config.to_dict(),
        "options": dataclasses.asdict(options),
        "history": report.to_dict()["epochs"],
    }
    where = Path(report_dir) if report_dir is not None else out.parent
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{out.name}.train.json").write_text(json.dumps(full, indent=2) + "\n")
    _plot_training(full["history"], where / f"{out.name}.train.png")
    return TrainResult(out, full)


def _training_rows(
    sequences: Sequence[np.ndarray], split: Any, val: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """
    ``fit``'s rows: every user's items but the test item.

    The validation users ``val`` (positions in ``split.users``) also leave out their
    validation item.

    The test item is never trained on. The validation item of a user who is not among
    the (at most 10,000) validation users is the freshest transition there is, and
    nothing is measured on it, so it trains.
    """
    from kernels.evaluation import MIN_EVALUATED, left_padded  # noqa: PLC0415

    held = set(split.users[val].tolist())
    rows = []
    for u, seq in enumerate(sequences):
        trained = seq
        if len(seq) >= MIN_EVALUATED:
            trained = seq[:-2] if u in held else seq[:-1]
        if len(trained) >= 2:  # an input and a target
            rows.append(trained[-(max_len + 1) :])
    return (left_padded([r[:-1] for r in rows], max_len),
            left_padded([r[1:] for r in rows], max_len))  # fmt: skip


def _pyplot() -> Any:
    import matplotlib as mpl  # noqa: PLC0415 - only the reports need it

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _plot_training(history: Sequence[Mapping[str, Any]], path: Path) -> None:
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(epochs, [h["train_loss"] for h in history], marker=".")
    left.set(xlabel="epoch", ylabel="training loss", title="Loss")
    right.plot(epochs, [h["val_ndcg_at_10"] for h in history], marker=".", label="NDCG@10")
    right.plot(epochs, [h["val_hr_at_10"] for h in history], marker=".", label="HR@10")
    right.set(xlabel="epoch", title="Validation (full ranking)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- evaluation


def evaluate_model(
    model_path: str | Path,
    data: Dataset,
    *,
    protocol: str,
    seed: int = 0,
    max_users: int | None = None,
) -> tuple[dict[str, Any], Any]:
    """
    Evaluate a model file on ``data`` under ``protocol`` (:mod:`kernels.evaluation`).

    Returns ``(summary, result)``: the summary has ``hr@10``, ``ndcg@10``, ``mrr``,
    ``coverage@10``, ``ild@10``, ``novelty@10``, ``users``, ``protocol``, ``seconds``,
    and how many interactions were dropped for items the model does not know;
    ``result`` is the :class:`kernels.evaluation.ProtocolResult` (per-user ranks).

    Raises:
        kernels.modelfile.ModelFileError: the model file cannot be used.
        ValueError: a bad protocol, or no user left to evaluate.

    """
    import jax.numpy as jnp  # noqa: PLC0415

    from kernels.evaluation import evaluate, leave_one_out  # noqa: PLC0415
    from kernels.modelfile import load_model  # noqa: PLC0415

    started = time.perf_counter()
    model = load_model(model_path)
    config = model.manifest.config
    sequences, dropped = remap(data, model.manifest.vocabulary)
    split = leave_one_out(sequences, config.max_len)
    if len(split.test_targets) == 0:
        msg = "dataset: no user has three interactions with items the model knows"
        raise ValueError(msg)
    params = {name: jnp.asarray(value, jnp.float32) for name, value in model.params.items()}
    result = evaluate(params, config, split, protocol=protocol,  # type: ignore[arg-type]
                      seed=seed, max_users=max_users)  # fmt: skip
    summary = {
        **result.summary(),
        "seconds": round(time.perf_counter() - started, 2),
        "dataset": data.name,
        "dropped_interactions": dropped,
        "seed": seed,
    }
    return summary, result


def write_eval_report(summary: Mapping[str, Any], result: Any, path: Path) -> Path:
    """A markdown report with the figures and two plots (rank distribution, HR@k curve)."""
    plt = _pyplot()
    ranks = np.asarray(result.ranks)
    stem = path.with_suffix("")
    ks = np.arange(1, 51)
    hr = [(ranks <= k).mean() for k in ks]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(ks, hr)
    ax.set(xlabel="k", ylabel="HR@k", title=f"HR@k ({summary['protocol']})")
    fig.tight_layout()
    fig.savefig(f"{stem}.hr.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.hist(np.log10(ranks), bins=40)
    ax.set(xlabel="log10 rank of the test item", ylabel="users", title="Rank distribution")
    fig.tight_layout()
    fig.savefig(f"{stem}.ranks.png", dpi=100)
    plt.close(fig)
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in summary.items())
    path.write_text(
        f"# Evaluation of the model on {summary.get('dataset')}\n\n"
        f"Protocol `{summary['protocol']}` (leave-one-out; see kernels/evaluation.py).\n\n"
        f"| figure | value |\n|---|---:|\n{rows}\n\n"
        f"![HR@k]({Path(f'{stem}.hr.png').name})\n\n"
        f"![ranks]({Path(f'{stem}.ranks.png').name})\n"
    )
    return path


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def table(rows: Iterable[tuple[str, object]]) -> str:
    """Two aligned columns."""
    pairs = [(k, _fmt(v)) for k, v in rows]
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in pairs)
