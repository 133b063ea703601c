"""
Train a small model from the event log, for a daemon started without a model file.

DESIGN.md asks the daemon, started with no model file configured, to "train a small
model from the log on first start, or serve popularity and decayed-interest scores
until one exists". This module is the training half: :func:`train_from_log` is a
blocking function the service runs on a background thread; it reads the log, trains a
small SASRec encoder with :func:`kernels.train.fit` and writes a model file with
:func:`kernels.modelfile.save_model` (atomically), or says why it did not.

Reading. The daemon's writer thread keeps appending while this reads, so the log is
opened on a separate, read-only SQLite connection (``mode=ro``: it can neither write
nor create the file). In WAL mode a reader never blocks the writer, but a long read
transaction would block erasure, which truncates the WAL and gives up after about two
seconds (``eventstore._checkpoint.truncate_wal``); so events are read in chunks, one
short transaction each, up to the newest offset seen at the start. Erased users are
absent from the log; a user erased *during* the read may already have been read, so
the number of tombstones is compared before and after, and the read starts over when
it changed: nothing erased is ever trained on.

Sequences. Every interaction (view, click, cart, purchase, rating, like, dislike,
skip) puts its item into the user's sequence, in log order, as the fold does for the
state the daemon serves from; impressions, item and forget events do not. Items seen
fewer than ``min_item_count`` times cannot be learned and are left out of the
vocabulary (and the sequences), as the daemon leaves out items a model does not know.

Training data is leave-one-out: each user's newest item is held out for validation
(NDCG@10 over the whole vocabulary, which decides early stopping), and the pairs
before it are training rows. The model served therefore has not seen each user's
newest interaction; a second fit on everything would double the cost.

Time. ``fit`` has no deadline, and every ``fit`` call compiles its training step
(more than ten seconds on a small CPU). So a *probe* ``fit`` of two epochs over at
most 1024 rows measures the compile time and the cost per row; the main ``fit`` then
gets as many epochs as fit into what is left of ``max_seconds``, starting from the
probe's parameters. When not even one epoch over all rows fits, the main ``fit``
takes one epoch over a random subset that does, and when not even that fits, the
probe's model is written. The probe itself cannot be cut short, and the estimates
are rough (a busy machine runs slower than it measured): the budget holds to within
some tens of percent, not to the second.

User ids never leave :func:`sequences_from_log` (only per-user index arrays do), and
no log line holds one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sqlite3
import time
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

import jax
import numpy as np
import structlog

from eventstore import SchemaVersionError, StoreError
from eventstore.log import MIGRATIONS
from eventstore.schema import Event, Interaction, decode_stored_many
from kernels.modelfile import save_model
from kernels.sasrec import SasrecConfig, init_params
from kernels.train import LossName, TrainReport, fit

__all__ = ["AutoTrainResult", "LogSequences", "sequences_from_log", "train_from_log"]

_log = structlog.get_logger("daemon.autotrain")

#: Rows per read transaction: short enough never to hold up an erasure's checkpoint.
_CHUNK_ROWS: Final = 4096
#: Reads that may be spoilt by a concurrent erasure before giving up.
_READ_ATTEMPTS: Final = 3
_SELECT_CHUNK: Final = (
    "SELECT log_offset, body FROM events "
    "WHERE log_offset > ? AND log_offset <= ? ORDER BY log_offset LIMIT ?"
)

_NUM_BLOCKS: Final = 2
_NUM_HEADS: Final = 1
#: Users with at least this many known items have one held out for validation.
_MIN_VALIDATION_ITEMS: Final = 3
#: Rows per training step, at most; small logs take smaller steps (more per epoch).
_MAX_BATCH_SIZE: Final = 128
_MIN_BATCH_SIZE: Final = 32
#: Small logs aim at this many steps per epoch.
_STEPS_PER_EPOCH: Final = 16
#: Full softmax while one step's logits [B, L, V + 1] stay under 128 MiB of float32.
_MAX_FULL_SOFTMAX_LOGITS: Final = 1 << 25
_NUM_NEGATIVES: Final = 256
#: Validation scores [eval batch, V + 1] stay under 64 MiB of float32.
_MAX_EVAL_SCORES: Final = 1 << 24
#: Validation ranks every user against every item each epoch; more users add little.
_MAX_VALIDATION_USERS: Final = 10_000
_PROBE_ROWS: Final = 1024
_PROBE_EPOCHS: Final = 2
#: Fraction of the remaining time planned for epochs: estimates are rough.
_PLAN_FRACTION: Final = 0.85
#: Seconds kept back for writing the model file.
_SAVE_RESERVE_S: Final = 0.5

_INIT_PARAMS = jax.jit(init_params, static_argnums=1)


@dataclasses.dataclass(frozen=True, slots=True)
class LogSequences:
    """
    The interaction sequences of a log, in model indices.

    ``vocabulary[i]`` is the item whose model index is ``i + 1``, in order of first
    appearance in the log; ``sequences`` holds one int32 array per user with at least
    two known items, oldest first, users in order of first appearance; ``events_read``
    counts every event read, ``interactions`` the interaction events among them.

    .. versionadded:: 0.1.0
    """

    vocabulary: tuple[str, ...] = dataclasses.field(repr=False)
    sequences: list[np.ndarray] = dataclasses.field(repr=False)
    events_read: int
    interactions: int


@dataclasses.dataclass(frozen=True, slots=True)
class AutoTrainResult:
    """
    What :func:`train_from_log` did.

    ``path`` is the model file written, or None when training was skipped; then
    ``reason`` says why (counts or the log's path, never an id). ``items`` is the
    vocabulary size; ``users`` the sequences trained on, ``validation_users`` those
    with an item held out (at most 10 000 are validated); ``epochs`` counts every
    epoch run (probe included); ``val_ndcg_at_10`` is the best validation NDCG@10;
    ``time_bound`` says whether ``max_seconds`` cut training short; ``seconds`` is
    the wall-clock time of the whole call.

    .. versionadded:: 0.1.0
    """

    path: Path | None
    reason: str | None
    items: int
    users: int
    validation_users: int
    events_read: int
    epochs: int
    val_ndcg_at_10: float | None
    time_bound: bool
    seconds: float

    @property
    def trained(self) -> bool:
        """Whether a model file was written."""
        return self.path is not None


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(slots=True)
class _Histories:
    """Per-user item histories as dense first-seen indices, and per-item counts."""

    items: dict[str, int] = dataclasses.field(default_factory=dict)
    counts: list[int] = dataclasses.field(default_factory=list)
    users: dict[str, array[int]] = dataclasses.field(default_factory=dict)
    events_read: int = 0
    interactions: int = 0

    def add(self, events: Iterable[Event]) -> None:
        """Fold a chunk of events in log order."""
        items, counts, users = self.items, self.counts, self.users
        for event in events:
            self.events_read += 1
            if not isinstance(event, Interaction):
                continue
            self.interactions += 1
            index = items.setdefault(event.item, len(items))
            if index == len(counts):
                counts.append(0)
            counts[index] += 1
            history = users.get(event.user)
            if history is None:
                history = users[event.user] = array("i")
            history.append(index)


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection to the log (it cannot create the file)."""
    uri = f"{path.resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=5000")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        conn.close()
        raise SchemaVersionError(str(path), version, len(MIGRATIONS))
    return conn


def _tombstones(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM tombstones").fetchone()[0])


def _read_once(conn: sqlite3.Connection) -> _Histories | None:
    """
    The histories of the log up to its newest offset now; None if someone was erased.

    In autocommit mode each statement is its own read transaction, so no snapshot is
    held between chunks.
    """
    erased_before = _tombstones(conn)
    end = conn.execute("SELECT coalesce(max(log_offset), 0) FROM events").fetchone()[0]
    histories, after = _Histories(), 0
    while after < end:
        rows = conn.execute(_SELECT_CHUNK, (after, end, _CHUNK_ROWS)).fetchall()
        if not rows:
            break
        histories.add(decode_stored_many([body for _, body in rows]))
        after = rows[-1][0]
    return histories if _tombstones(conn) == erased_before else None


def _read_histories(path: Path) -> _Histories:
    """Read the log, starting over while erasures interfere."""
    try:
        conn = _connect_readonly(path)
    except sqlite3.Error as e:
        msg = f"{path}: cannot open the event log read-only ({e})"
        raise StoreError(msg) from e
    try:
        for _ in range(_READ_ATTEMPTS):
            histories = _read_once(conn)
            if histories is not None:
                return histories
    except sqlite3.Error as e:
        msg = f"{path}: reading the event log failed ({e})"
        raise StoreError(msg) from e
    finally:
        conn.close()
    msg = f"{path}: users were erased during each of {_READ_ATTEMPTS} reads; try again later"
    raise StoreError(msg)


def _to_sequences(histories: _Histories, *, max_len: int, min_item_count: int) -> LogSequences:
    """Drop rare items, renumber the rest from 1, and keep the last ``max_len + 1``."""
    kept = np.asarray(histories.counts, dtype=np.int64) >= min_item_count
    model_index = np.zeros(len(kept), np.int32)
    model_index[kept] = np.arange(1, int(kept.sum()) + 1, dtype=np.int32)
    vocabulary = tuple(item for item, keep in zip(histories.items, kept, strict=True) if keep)
    sequences = []
    for history in histories.users.values():
        seq = model_index[np.frombuffer(history, dtype=np.intc)]
        seq = seq[seq > 0][-(max_len + 1) :]
        if len(seq) >= 2:  # one input and its next item
            sequences.append(seq)
    return LogSequences(vocabulary, sequences, histories.events_read, histories.interactions)


def sequences_from_log(
    log_path: str | os.PathLike[str], *, max_len: int, min_item_count: int = 2
) -> LogSequences:
    """
    Each user's interaction sequence, from the event log, without disturbing its writer.

    Reads the log through its own read-only connection in short transactions (see the
    module docstring), so the daemon may append and erase meanwhile; what was appended
    after the read began is not included.

    Args:
        log_path: the SQLite event log (``events.db`` in the store's directory).
        max_len: keep each user's last ``max_len + 1`` known items (an input of
            ``max_len`` and its next item).
        min_item_count: items with fewer interaction events are left out.

    Returns:
        The vocabulary, the sequences of users with at least two known items, and
        how many events were read.

    Raises:
        FileNotFoundError: there is no file at ``log_path``.
        ValueError: ``max_len`` or ``min_item_count`` is below 1.
        SchemaVersionError: the log was written by a newer rerankd.
        StoreError: the log cannot be read, or erasures kept interrupting the read.

    .. versionadded:: 0.1.0
    """
    for name, value in (("max_len", max_len), ("min_item_count", min_item_count)):
        if value < 1:
            msg = f"{name}: must be at least 1, got {value}"
            raise ValueError(msg)
    path = Path(log_path)
    if not path.is_file():
        msg = f"{path}: no event log there"
        raise FileNotFoundError(msg)
    histories = _read_histories(path)
    return _to_sequences(histories, max_len=max_len, min_item_count=min_item_count)


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True, slots=True)
class _Split:
    """Leave-one-out data in ``fit``'s layout: rows [N, L] and [N, L]; users [U, L], [U]."""

    train_inputs: np.ndarray
    train_targets: np.ndarray
    val_inputs: np.ndarray
    val_targets: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.train_inputs.shape[0])

    @property
    def users(self) -> int:
        return int(self.val_targets.shape[0])

    def subset(self, rows: int, users: int, rng: np.random.Generator) -> _Split:
        """A random ``rows`` training rows and ``users`` validation users."""
        r = np.sort(rng.permutation(self.rows)[:rows])
        u = np.sort(rng.permutation(self.users)[:users])
        return _Split(
            self.train_inputs[r], self.train_targets[r], self.val_inputs[u], self.val_targets[u]
        )


def _left_padded(rows: Sequence[np.ndarray], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for r, row in enumerate(rows):
        if len(row):
            out[r, -len(row) :] = row
    return out


def _leave_one_out(sequences: Sequence[np.ndarray], max_len: int) -> _Split:
    """
    Hold out each user's newest item (users with at least three items), train on the rest.

    ``sequences`` hold up to ``max_len + 2`` items: held out, up to ``max_len + 1`` are
    left, whose ``max_len`` input slots are all trained, as they are all used in serving.
    """
    train, val_inputs, val_targets = [], [], []
    for seq in sequences:
        rest = seq
        if len(seq) >= _MIN_VALIDATION_ITEMS:
            rest = seq[:-1]
            val_inputs.append(rest[-max_len:])
            val_targets.append(int(seq[-1]))
        train.append(rest[-(max_len + 1) :])
    return _Split(
        _left_padded([s[:-1] for s in train], max_len),
        _left_padded([s[1:] for s in train], max_len),
        _left_padded(val_inputs, max_len),
        np.asarray(val_targets, np.int32),
    )


def _validation_capped(split: _Split, rng: np.random.Generator) -> _Split:
    if split.users <= _MAX_VALIDATION_USERS:
        return split
    return split.subset(split.rows, _MAX_VALIDATION_USERS, rng)


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True, slots=True)
class _Plan:
    """The fixed ``fit`` options for one model (decided once from its size)."""

    config: SasrecConfig
    loss: LossName
    batch_size: int
    eval_batch_size: int
    seed: int
    progress: bool

    def fit(
        self, params: dict[str, jax.Array], data: _Split, *, epochs: int, seed: int
    ) -> tuple[dict[str, jax.Array], TrainReport]:
        """``kernels.train.fit`` on ``data`` with this plan's options."""
        return fit(
            params,
            self.config,
            data.train_inputs,
            data.train_targets,
            val_inputs=data.val_inputs,
            val_targets=data.val_targets,
            epochs=epochs,
            batch_size=self.batch_size,
            seed=seed,
            loss=self.loss,
            num_negatives=_NUM_NEGATIVES,
            eval_batch_size=self.eval_batch_size,
            progress=self.progress,
        )


def _power_of_two(n: int, low: int, high: int) -> int:
    """The largest power of two at most ``n``, clipped to ``[low, high]`` (powers of two)."""
    return max(low, min(high, 1 << max(0, n.bit_length() - 1)))


def _plan(num_items: int, rows: int, *, max_len: int, dim: int, seed: int, progress: bool) -> _Plan:
    """
    The model and ``fit`` options for ``num_items`` items and ``rows`` training rows.

    Full softmax while a step's logits fit the budget, else sampled; the batch size
    gives small logs about 16 steps per epoch (a 200-user log learns in a third of the
    epochs at 32 rows per step than at 128); the validation batch bounds its scores.
    """
    config = SasrecConfig(
        num_items=num_items, max_len=max_len, dim=dim, num_blocks=_NUM_BLOCKS, num_heads=_NUM_HEADS
    )
    batch = _power_of_two(rows // _STEPS_PER_EPOCH, _MIN_BATCH_SIZE, _MAX_BATCH_SIZE)
    full = batch * max_len * (num_items + 1) <= _MAX_FULL_SOFTMAX_LOGITS
    eval_batch = _power_of_two(_MAX_EVAL_SCORES // (num_items + 1), 8, 256)
    return _Plan(config, "full" if full else "sampled", batch, eval_batch, seed, progress)


@dataclasses.dataclass(frozen=True, slots=True)
class _Trained:
    """The parameters to save and how they came about."""

    params: dict[str, jax.Array]
    epochs: int
    val_ndcg_at_10: float
    time_bound: bool


def _best_ndcg(report: TrainReport) -> float:
    return report.epochs[report.best_epoch - 1].val_ndcg_at_10


@dataclasses.dataclass(frozen=True, slots=True)
class _Cost:
    """
    What the probe measured about this machine and model.

    ``per_row_s``: seconds per training row in an epoch, validation included;
    ``overhead_s``: seconds a ``fit`` call spends outside its epochs (compiles, checks).
    """

    per_row_s: float
    overhead_s: float

    @classmethod
    def of_probe(cls, report: TrainReport, rows: int, wall_s: float) -> _Cost:
        epoch_s = report.epochs[-1].wall_s  # the first epoch includes the compiles
        return cls(epoch_s / rows, max(0.0, wall_s - len(report.epochs) * epoch_s))


def _main_data(
    data: _Split, cost: _Cost, *, deadline: float, rng: np.random.Generator
) -> tuple[_Split | None, int]:
    """
    The data and epochs the main ``fit`` can afford before ``deadline``.

    All rows for one epoch or more; else a random subset for one epoch; else nothing
    (None), when the subset would be no larger than the probe's.
    """
    left_s = (deadline - time.perf_counter() - _SAVE_RESERVE_S) * _PLAN_FRACTION
    rows = int(max(0.0, left_s - cost.overhead_s) / cost.per_row_s)
    if rows >= data.rows:
        return data, rows // data.rows
    if rows <= min(data.rows, _PROBE_ROWS):  # no better than the probe
        return None, 0
    return data.subset(rows, max(1, math.ceil(data.users * rows / data.rows)), rng), 1


def _train(plan: _Plan, data: _Split, *, deadline: float, max_epochs: int) -> _Trained:
    """The probe, then as many epochs as fit before ``deadline`` (module docstring)."""
    rng = np.random.default_rng(plan.seed)
    probe_rows = min(data.rows, _PROBE_ROWS)
    probe_users = max(1, min(data.users, math.ceil(data.users * probe_rows / data.rows)))
    started = time.perf_counter()
    params = _INIT_PARAMS(jax.random.key(plan.seed), plan.config)
    probe = data.subset(probe_rows, probe_users, rng)
    params, report = plan.fit(params, probe, epochs=_PROBE_EPOCHS, seed=plan.seed)
    cost = _Cost.of_probe(report, probe_rows, time.perf_counter() - started)
    main, affordable = _main_data(data, cost, deadline=deadline, rng=rng)
    if main is None:
        return _Trained(params, _PROBE_EPOCHS, _best_ndcg(report), time_bound=True)
    epochs = min(max_epochs, affordable)
    params, report = plan.fit(params, main, epochs=epochs, seed=plan.seed + 1)
    bound = main is not data or (epochs < max_epochs and not report.stopped_early)
    return _Trained(params, _PROBE_EPOCHS + len(report.epochs), _best_ndcg(report), bound)


def _check_options(
    max_seconds: float, *, seed: int, max_len: int, dim: int, min_users: int, max_epochs: int
) -> None:
    if not max_seconds > 0:
        msg = f"max_seconds: must be above 0, got {max_seconds}"
        raise ValueError(msg)
    if seed < 0:
        msg = f"seed: must be at least 0, got {seed}"
        raise ValueError(msg)
    counts = {"max_len": max_len, "dim": dim, "min_users": min_users, "max_epochs": max_epochs}
    for name, value in counts.items():
        if value < 1:
            msg = f"{name}: must be at least 1, got {value}"
            raise ValueError(msg)


def _too_little(data: LogSequences, split: _Split, min_users: int) -> str | None:
    """Why the data cannot train a model, or None."""
    if split.users < min_users:
        return (
            f"too little data: {split.users} users with at least {_MIN_VALIDATION_ITEMS} "
            f"interactions with items seen twice or more, need {min_users}"
        )
    if len(data.vocabulary) < 2:  # ranking needs a choice
        return f"too little data: {len(data.vocabulary)} item seen twice or more, need 2"
    return None


def _skipped(reason: str, started: float, data: LogSequences | None = None) -> AutoTrainResult:
    seconds = time.perf_counter() - started
    _log.info("autotrain_skipped", reason=reason, seconds=round(seconds, 3))
    return AutoTrainResult(
        path=None,
        reason=reason,
        items=0 if data is None else len(data.vocabulary),
        users=0 if data is None else len(data.sequences),
        validation_users=0,
        events_read=0 if data is None else data.events_read,
        epochs=0,
        val_ndcg_at_10=None,
        time_bound=False,
        seconds=seconds,
    )


def train_from_log(
    log_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    max_seconds: float = 300.0,
    seed: int = 0,
    max_len: int = 50,
    dim: int = 64,
    min_users: int = 20,
    max_epochs: int = 200,
    progress: bool = False,
) -> AutoTrainResult:
    """
    Train a small SASRec model (2 blocks, 1 head) on the log and write it to ``out_path``.

    Reads the log as :func:`sequences_from_log` does (items seen at least twice), holds
    out each user's newest item for validation, trains with early stopping on
    validation NDCG@10 within about ``max_seconds`` (see the module docstring for how
    the time is planned), and writes the model atomically with its vocabulary
    (``vocabulary[i]`` has model index ``i + 1``). Skips, writing nothing, when there is
    no log or fewer than ``min_users`` users with at least three interactions. Blocks:
    run it on a thread of its own. The same seed and log give the same parameters
    whenever ``max_seconds`` does not cut training short.

    Args:
        log_path: the SQLite event log (``events.db`` in the store's directory).
        out_path: the model file to write; its directory is created if missing.
        max_seconds: the time budget of the whole call.
        seed: seeds initialisation, shuffling, dropout and subsets.
        max_len: the model's sequence length L.
        dim: the model's width d.
        min_users: the fewest users with a held-out item that are worth a model.
        max_epochs: the most epochs of the main fit.
        progress: show ``fit``'s progress bars.

    Returns:
        What was done: the model written, or why nothing was.

    Raises:
        ValueError: an option is out of range.
        SchemaVersionError: the log was written by a newer rerankd.
        StoreError: the log cannot be read.
        OSError: the model file cannot be written; an existing one is untouched.

    .. versionadded:: 0.1.0
    """
    started = time.perf_counter()
    _check_options(
        max_seconds, seed=seed, max_len=max_len, dim=dim, min_users=min_users, max_epochs=max_epochs
    )
    try:
        # one item more than fit's inputs: the held-out one
        data = sequences_from_log(log_path, max_len=max_len + 1)
    except FileNotFoundError:
        return _skipped(f"no event log at {log_path}", started)
    split = _leave_one_out(data.sequences, max_len)
    reason = _too_little(data, split, min_users)
    if reason is not None:
        return _skipped(reason, started, data)
    split = _validation_capped(split, np.random.default_rng(seed))
    plan = _plan(
        len(data.vocabulary), split.rows, max_len=max_len, dim=dim, seed=seed, progress=progress
    )
    trained = _train(plan, split, deadline=started + max_seconds, max_epochs=max_epochs)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = AutoTrainResult(
        path=out,
        reason=None,
        items=len(data.vocabulary),
        users=split.rows,
        validation_users=split.users,
        events_read=data.events_read,
        epochs=trained.epochs,
        val_ndcg_at_10=trained.val_ndcg_at_10,
        time_bound=trained.time_bound,
        seconds=0.0,
    )
    summary = {"trained_by": "daemon.autotrain", "seed": seed, **_figures(result)}
    del summary["seconds"]  # not known yet
    save_model(out, trained.params, plan.config, vocabulary=data.vocabulary, extra=summary)
    result = dataclasses.replace(result, seconds=time.perf_counter() - started)
    _log.info("autotrain_done", path=str(out), **_figures(result))
    return result


def _figures(result: AutoTrainResult) -> dict[str, object]:
    """The result's counts and scores, for the log line and the model's manifest."""
    return {
        "items": result.items,
        "users": result.users,
        "validation_users": result.validation_users,
        "events_read": result.events_read,
        "epochs": result.epochs,
        "val_ndcg_at_10": round(result.val_ndcg_at_10 or 0.0, 4),
        "time_bound": result.time_bound,
        "seconds": round(result.seconds, 3),
    }
