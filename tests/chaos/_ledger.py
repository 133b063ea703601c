"""
What the feed chaos tests (test_network.py, test_kill_loop.py) check a daemon against:
its SQLite log, read over read-only connections, counted by event id, and its state,
compared with a fresh fold of that log made in the test process.

Two state checks:

- :func:`check_live_state`: through the socket API of a running daemon that nothing
  writes to (all sources paused, everything arrived): its ``stats``, each test user's
  ``user`` view and each item's counters (``export``) equal those of a fresh fold.
- :func:`check_stopped_state`: after a clean stop, the snapshot the daemon wrote on
  its way out equals a fresh fold byte for byte, at the same log offset.

And :func:`check_restore`: on a copy of a killed daemon's directory, what a restart
restores (newest valid snapshot + replay of the tail) equals a fresh fold, byte for byte.

The events come from :func:`event`: varied types over 40 users and 60 items, with
catalogue events giving items categories, so the fold exercises sequences, interests,
categories, purchases and item counters.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from daemon._export import item_aggregates
from daemon._plugins import load_plugins
from daemon.client import Client, RequestFailedError
from daemon.config import Config, load_config
from eventstore import FoldConfig, SnapshotStore, State, Store, project
from eventstore.schema import decode_stored_many

if TYPE_CHECKING:
    from daemons import Daemon

__all__ = [
    "NOW",
    "check_live_state",
    "check_restore",
    "check_stopped_state",
    "event",
    "fold_log",
    "log_ids",
    "once_each",
    "positions",
]

#: Event time of the tests' events: a minute ago (the decoder refuses future ones).
NOW = time.time() - 60
KINDS = ("click", "view", "click", "cart", "purchase", "rating", "like", "skip")


def event(key: str, n: int, *, users: int = 40, items: int = 60) -> bytes:
    """Event ``key`` (the n-th of its source) as JSON: varied types, users and items."""
    obj: dict[str, Any] = {"id": key, "ts": NOW + n * 1e-4}
    if n % 23 == 0:  # catalogue: gives items a category (category interests)
        obj |= {"type": "item", "item": f"i-{n % items}",
                "fields": {"category": f"c-{n % 5}", "price": 1.0 + n % 7}}  # fmt: skip
    else:
        obj |= {"type": KINDS[n % len(KINDS)], "user": f"u-{n % users}",
                "item": f"i-{(n * 7) % items}"}  # fmt: skip
        if obj["type"] == "rating":
            obj["value"] = float(1 + n % 5)
    return json.dumps(obj).encode()


def user_of(payload: bytes) -> bytes | None:
    """The Kafka record key of an :func:`event`: its user (None for item events)."""
    user = json.loads(payload).get("user")
    return user.encode() if user else None


def _connect(data_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{data_dir / 'events.db'}?mode=ro", uri=True, timeout=30)


def log_ids(data_dir: Path) -> list[str]:
    """Every event id in the log, in log order ([] before the log exists)."""
    if not (data_dir / "events.db").exists():
        return []
    with contextlib.closing(_connect(data_dir)) as db:
        return [row[0] for row in db.execute("SELECT id FROM events ORDER BY log_offset")]


def positions(data_dir: Path, feed: str) -> dict[str, Any]:
    """The feed positions stored in the log for ``feed``, by partition."""
    if not (data_dir / "events.db").exists():
        return {}
    with contextlib.closing(_connect(data_dir)) as db:
        rows = db.execute("SELECT partition, position FROM feed_positions WHERE feed = ?", (feed,))
        return dict(rows.fetchall())


def once_each(logged: Iterable[str], expected: Iterable[str]) -> dict[str, int]:
    """The ids of ``expected`` that are not in ``logged`` exactly once, with their counts."""
    counts = Counter(logged)
    return {key: counts[key] for key in expected if counts[key] != 1}


def fold_log(data_dir: Path, fold: FoldConfig) -> State:
    """A fresh fold of the whole log from scratch, with the offset of its last event."""
    with contextlib.closing(_connect(data_dir)) as db:
        rows = db.execute("SELECT log_offset, body FROM events ORDER BY log_offset").fetchall()
    state = project(State(fold), decode_stored_many([body for _, body in rows]))
    state.offset = rows[-1][0] if rows else 0
    return state


def _config(daemon: Daemon) -> Config:
    return load_config(daemon.config)


def _user_views(client: Client, users: Iterable[str]) -> dict[str, Any]:
    views: dict[str, Any] = {}
    for user in users:
        try:
            views[user] = client.request("user", user=user)["user"]
        except RequestFailedError as error:
            if error.code != "not_found":
                raise
            views[user] = None
    return views


def _exported_counts(client: Client) -> dict[str, tuple[int, int, int]]:
    counts: dict[str, tuple[int, int, int]] = {}
    offset: int | None = 0
    while offset is not None:
        page = client.request("export", offset=offset, limit=1000)
        counts |= {row["item"]: (row["impressions"], row["clicks"], row["interactions"])
                   for row in page["items"]}  # fmt: skip
        offset = page["next_offset"]
    return counts


def check_live_state(daemon: Daemon, users: Iterable[str]) -> State:
    """
    Assert that a running daemon's state is a fresh fold of its log; return that fold.

    Nothing may write to the daemon meanwhile. Compared: the log offset, user and item
    counts (``stats``), the ``user`` view of each of ``users`` (raw ids: the daemon's
    privacy plugins map them, and so does this check, with the daemon's own key) and
    every item's impressions, clicks and interactions (``export``).
    """
    config = _config(daemon)
    users = list(users)
    with daemon.client() as client:
        stats = client.request("stats")
        views = _user_views(client, users)
        exported = _exported_counts(client)
    fresh = fold_log(config.store.data_dir, config.fold)
    privacy = load_plugins(config).privacy
    expected_views = {user: fresh.user_view(privacy.user_id(user)) for user in users}
    page = item_aggregates(fresh, lambda _state, rows: rows * 0.0, offset=0, limit=fresh.n_items)
    expected_counts = {row["item"]: (row["impressions"], row["clicks"], row["interactions"])
                       for row in page["items"]}  # fmt: skip
    live = (stats["events"]["log_offset"], stats["users"], stats["items"])
    assert (fresh.offset, len(fresh.user_index), fresh.n_items) == live
    # the daemon's answer went through msgspec's JSON: so does the expected view
    assert msgspec.json.decode(msgspec.json.encode(expected_views)) == views
    assert expected_counts == exported
    return fresh


def check_stopped_state(daemon: Daemon) -> State:
    """
    Assert that the snapshot a cleanly stopped daemon wrote is a fresh fold of its log.

    Byte for byte, at the same offset; returns the fold.
    """
    config = _config(daemon)
    fresh = fold_log(config.store.data_dir, config.fold)
    snapshot = SnapshotStore(config.store.data_dir / "snapshots").newest_valid(config.fold)
    assert snapshot is not None
    assert fresh.offset == snapshot.offset
    assert fresh.to_bytes() == snapshot.to_bytes()
    return fresh


def check_restore(directory: Path, fold: FoldConfig) -> int:
    """
    Assert that opening ``directory`` restores a fresh fold of its log, byte for byte.

    ``directory`` is a copy of a stopped or killed daemon's data directory (opening a
    store recovers and checkpoints its WAL): what a restart would open, the newest
    valid snapshot plus the log after it. Returns that snapshot's offset (0: none).
    """
    snapshot = SnapshotStore(directory / "snapshots").newest_valid(fold)
    fresh = fold_log(directory, fold)
    store = Store(directory, fold=fold, snapshot_every=0)
    try:
        assert fresh.offset == store.state.offset
        assert fresh.to_bytes() == store.state.to_bytes()
    finally:
        store.close(snapshot=False)
    return snapshot.offset if snapshot else 0
