"""
`daemon.autotrain`: sequences from a real SQLite log, and real training from it.

Compiling a training step takes seconds on a small machine, so, as in
`tests/kernels/test_train.py`, the module turns on JAX's persistent compilation cache
(in a temp dir) and turns most XLA optimisations off; and every training test uses one
model shape (30 items, L = 10, d = 16, at least 2048 training rows, hence 128 rows
per step), so the step compiles once and later `fit` calls load it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import jax
import numpy as np
import pytest
from jaxcache import fast_compiles

from daemon import autotrain
from daemon.autotrain import sequences_from_log, train_from_log
from eventstore import Event, Store
from eventstore.schema import Clicked, ItemsShown, ItemUpdated, Purchased, Viewed
from kernels.modelfile import load_model
from kernels.sasrec import encode_users, item_logits

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

T0 = 1764250000.0
ITEMS = 30
MAX_LEN = 10
DIM = 16
MODEL = {"max_len": MAX_LEN, "dim": DIM}

ENCODE = jax.jit(encode_users, static_argnames=("config",))


@pytest.fixture(name="fast_compiles", autouse=True, scope="module")
def fixture_fast_compiles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """JAX's persistent compilation cache in a temp dir and few XLA optimisations."""
    with fast_compiles(tmp_path_factory.mktemp("xla_cache")):
        yield


def cycle_walks(users: int, *, seed: int = 0) -> list[list[int]]:
    """Each user walks 5..12 consecutive items of the cycle 0 -> 1 -> ... -> 29 -> 0."""
    rng = np.random.default_rng(seed)
    walks = []
    for _ in range(users):
        start, length = int(rng.integers(ITEMS)), int(rng.integers(5, 13))
        walks.append([(start + k) % ITEMS for k in range(length)])
    return walks


def walk_events(walks: list[list[int]], *, first: int = 0, user_base: int = 0) -> list[Event]:
    """The walks as click events, users interleaved step by step (as a live log is)."""
    events: list[Event] = []
    for step in range(max(map(len, walks))):
        for u, walk in enumerate(walks):
            if step < len(walk):
                n = first + len(events)
                user, item = f"u-{user_base + u}", f"i-{walk[step]}"
                events.append(Clicked(id=f"e-{n}", ts=T0 + n, user=user, item=item))
    return events


def write_log(directory: Path, events: list[Event]) -> Path:
    """A closed store in ``directory`` holding ``events``; returns its log file."""
    with Store(directory, snapshot_every=0, synchronous="OFF") as store:
        store.append(events)
        return store.log.path


@pytest.fixture(name="cycle_log", scope="module")
def fixture_cycle_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]]]:
    """A log of 2500 users' cycle walks, and the walks."""
    walks = cycle_walks(2500)
    return write_log(tmp_path_factory.mktemp("cycle") / "data", walk_events(walks)), walks


@pytest.fixture(name="seed3_model", scope="module")
def fixture_seed3_model(
    cycle_log: tuple[Path, list[list[int]]], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """
    A model trained on the cycle log with seed 3 for one epoch after the probe.

    Training it also compiles the tests' model shape into the persistent cache, so a
    test that times training does not time a compile from scratch.
    """
    out = tmp_path_factory.mktemp("seed3") / "model.safetensors"
    train_from_log(cycle_log[0], out, seed=3, max_epochs=1, **MODEL)
    return out


def hit_rate_at_5(model_path: Path, walks: list[list[int]]) -> float:
    """How often the item after each walk is in the model's top 5 of all items."""
    model = load_model(model_path)
    index = {item: k + 1 for k, item in enumerate(model.manifest.vocabulary)}
    inputs = np.zeros((len(walks), model.config.max_len), np.int32)
    for row, walk in enumerate(walks):
        seq = [index[f"i-{i}"] for i in walk][-model.config.max_len :]
        inputs[row, -len(seq) :] = seq
    params = {name: jax.numpy.asarray(value) for name, value in model.params.items()}
    scores = np.array(item_logits(params, ENCODE(params, inputs, config=model.config)))
    scores[:, 0] = -np.inf  # padding
    top5 = np.argsort(-scores, axis=1)[:, :5]
    nexts = np.array([index[f"i-{(walk[-1] + 1) % ITEMS}"] for walk in walks])
    return float(np.mean(np.any(top5 == nexts[:, None], axis=1)))


# ----------------------------------------------------------------------------- training


def test_trained_model_predicts_the_next_item(
    cycle_log: tuple[Path, list[list[int]]], tmp_path: Path
) -> None:
    """The model file loads, knows every item, and ranks the true next item in its top 5."""
    log_path, walks = cycle_log
    out = tmp_path / "model.safetensors"

    result = train_from_log(log_path, out, max_epochs=6, **MODEL)

    model = load_model(out)
    assert out == result.path
    assert {f"i-{k}" for k in range(ITEMS)} == set(model.manifest.vocabulary)
    assert (ITEMS, len(walks), len(walks)) == (result.items, result.users, result.validation_users)
    assert sum(map(len, walks)) == result.events_read
    assert (MAX_LEN, DIM, 2, 1) == (
        model.config.max_len,
        model.config.dim,
        model.config.num_blocks,
        model.config.num_heads,
    )
    # a random ranking puts the next item in the top 5 of 30 for 1 user in 6
    assert hit_rate_at_5(out, walks[:500]) > 0.5


def test_same_seed_gives_the_same_parameters(
    cycle_log: tuple[Path, list[list[int]]], seed3_model: Path, tmp_path: Path
) -> None:
    """Two trainings with one seed (not cut short by time) write identical parameters."""
    out = tmp_path / "model.safetensors"

    train_from_log(cycle_log[0], out, seed=3, max_epochs=1, **MODEL)

    a, b = load_model(seed3_model), load_model(out)
    assert a.manifest.vocabulary == b.manifest.vocabulary
    assert list(a.params) == list(b.params)
    assert all(np.array_equal(a.params[name], b.params[name]) for name in a.params)


def test_max_seconds_bounds_training(seed3_model: Path, tmp_path: Path) -> None:
    """
    On a log whose epochs take seconds, training stops within its time budget.

    ``seed3_model`` has compiled this model shape: the probe, which cannot be cut
    short, then costs well under the budget, as it does in a daemon on a fast machine.
    """
    assert seed3_model.exists()
    log_path = write_log(tmp_path / "data", walk_events(cycle_walks(20_000, seed=1)))
    max_seconds = 8.0

    result = train_from_log(
        log_path, tmp_path / "model.safetensors", max_seconds=max_seconds, **MODEL
    )

    assert (True, True) == (result.trained, result.time_bound)
    assert result.seconds < max_seconds * 1.5


def test_too_little_data_is_skipped(tmp_path: Path) -> None:
    """Fewer users than min_users with three interactions: nothing written, counts given."""
    walks = [[k, k + 1, k + 2, k + 3] for k in range(7)]
    log_path = write_log(tmp_path / "data", walk_events(walks))
    out = tmp_path / "model.safetensors"

    result = train_from_log(log_path, out, **MODEL)

    assert (
        "too little data: 7 users with at least 3 interactions with items seen twice or more, "
        "need 20"
    ) == result.reason
    assert (None, False, 0) == (result.path, result.trained, result.epochs)
    assert not out.exists()


def test_a_missing_log_is_skipped_and_not_created(tmp_path: Path) -> None:
    """Without a log there is nothing to train on, and no log is created by looking."""
    log_path = tmp_path / "data" / "events.db"

    result = train_from_log(log_path, tmp_path / "model.safetensors", **MODEL)

    assert f"no event log at {log_path}" == result.reason
    assert not log_path.parent.exists()


# ----------------------------------------------------------------------------- sequences


def test_sequences_follow_log_order_per_user(tmp_path: Path) -> None:
    """Interactions of every type enter per user in log order; other events do not."""
    events: list[Event] = [
        Viewed(id="e-1", ts=T0 + 1, user="u-1", item="a"),
        ItemUpdated(id="e-2", ts=T0 + 2, item="b", fields={"category": "x"}),
        Clicked(id="e-3", ts=T0 + 3, user="u-2", item="b"),
        ItemsShown(id="e-4", ts=T0 + 4, user="u-1", items=["c", "a"]),
        Purchased(id="e-5", ts=T0 + 5, user="u-1", item="b"),
        Clicked(id="e-6", ts=T0 + 0.5, user="u-2", item="a"),  # late: log order counts
    ]

    data = sequences_from_log(write_log(tmp_path / "data", events), max_len=MAX_LEN)

    assert ("a", "b") == data.vocabulary
    assert [[1, 2], [2, 1]] == [s.tolist() for s in data.sequences]
    assert (6, 4) == (data.events_read, data.interactions)


def test_items_seen_once_are_left_out(tmp_path: Path) -> None:
    """An item with one interaction is in no sequence and not in the vocabulary."""
    walks = [[0, 1, 2], [0, 1, 2, 3], [1, 2, 4]]  # items 3 and 4 once each

    data = sequences_from_log(write_log(tmp_path / "data", walk_events(walks)), max_len=MAX_LEN)

    assert ("i-0", "i-1", "i-2") == data.vocabulary
    assert [[1, 2, 3], [1, 2, 3], [2, 3]] == [s.tolist() for s in data.sequences]


def test_sequences_keep_the_last_max_len_plus_one_items(tmp_path: Path) -> None:
    """A long history is cut to its newest max_len + 1 items."""
    walks = [list(range(ITEMS)), list(range(ITEMS))]

    data = sequences_from_log(write_log(tmp_path / "data", walk_events(walks)), max_len=4)

    assert [list(range(26, 31))] * 2 == [s.tolist() for s in data.sequences]


def test_forgotten_users_are_not_used(store: Store) -> None:
    """After a forget, the user's sequence and the items only they had are gone."""
    walks = [[0, 1, 2, 0, 1, 2]] * 4 + [[5, 6, 5, 6]]
    store.append(walk_events(walks))
    store.forget("u-4")

    data = sequences_from_log(store.log.path, max_len=MAX_LEN)

    assert ("i-0", "i-1", "i-2") == data.vocabulary
    assert 4 == len(data.sequences)


# ----------------------------------------------------------------------------- concurrency


def test_reading_never_blocks_the_writer(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The store appends while a thread is in the middle of reading the log; the read
    covers the log as it was when it began.
    """
    store.append(walk_events(cycle_walks(1000)))
    before = store.log.count()
    assert before > 4096  # more than one chunk
    reading, appended = threading.Event(), threading.Event()
    decode = autotrain.decode_stored_many

    def pause_after_first_chunk(bodies: list[bytes]) -> list[Event]:
        if not reading.is_set():
            reading.set()
            appended.wait(timeout=30)
        return decode(bodies)

    monkeypatch.setattr(autotrain, "decode_stored_many", pause_after_first_chunk)
    results: list[autotrain.LogSequences] = []
    reader = threading.Thread(
        target=lambda: results.append(sequences_from_log(store.log.path, max_len=MAX_LEN))
    )
    reader.start()
    assert reading.wait(timeout=30)
    accepted = [
        store.append(walk_events(cycle_walks(10, seed=k), first=10**6 + 1000 * k)).accepted
        for k in range(5)
    ]
    appended.set()
    reader.join()

    assert all(accepted)
    assert before == results[0].events_read
    assert before + sum(accepted) == store.log.count()


def test_a_user_forgotten_during_the_read_is_not_used(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forget between two chunks of the read makes the read start over without them."""
    walks = cycle_walks(1000)
    store.append(walk_events(walks))
    assert store.log.count() > 4096  # more than one chunk
    decode = autotrain.decode_stored_many
    calls = 0

    def forget_after_first_chunk(bodies: list[bytes]) -> list[Event]:
        nonlocal calls
        calls += 1
        if calls == 2:  # the reader holds no transaction between chunks
            store.forget("u-0")
        return decode(bodies)

    monkeypatch.setattr(autotrain, "decode_stored_many", forget_after_first_chunk)

    data = sequences_from_log(store.log.path, max_len=MAX_LEN)

    assert len(walks) - 1 == len(data.sequences)
    assert sum(map(len, walks[1:])) == data.interactions
