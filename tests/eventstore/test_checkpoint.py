"""WAL checkpoints run on a background thread, and erasure truncates the WAL."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from eventstore import EventLog
from eventstore.schema import Clicked

T0 = 1_764_250_000.0


def clicks(n: int, start: int = 0) -> list[Clicked]:
    return [Clicked(id=f"c{k}", ts=T0 + k, user=f"u{k % 5}", item=f"i{k % 7}")
            for k in range(start, start + n)]


def wal_frames(path: Path) -> tuple[int, int]:
    """(frames in the WAL, frames already checkpointed), read by a fresh connection."""
    conn = sqlite3.connect(path)
    try:
        _, frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        conn.close()
    return frames, done


def test_first_write_starts_the_checkpointer_which_copies_the_wal(tmp_path: Path) -> None:
    """After appends and one interval, the background thread has checkpointed the WAL."""
    log = EventLog(tmp_path / "events.db")
    assert log._checkpointer is None  # noqa: SLF001 - readers never start it
    for k in range(5):
        log.append(clicks(200, start=k * 200))
    checkpointer = log._checkpointer  # noqa: SLF001
    assert checkpointer is not None
    deadline = time.monotonic() + 10
    while checkpointer.checkpoints < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpointer.checkpoints >= 2
    frames, done = wal_frames(tmp_path / "events.db")
    assert frames == done
    log.close()
    assert not checkpointer._thread.is_alive()  # noqa: SLF001


def test_forget_leaves_an_empty_wal(tmp_path: Path) -> None:
    """Erasure truncates the WAL to zero bytes even while the checkpointer runs."""
    log = EventLog(tmp_path / "events.db")
    log.append(clicks(500))
    assert 100 == log.forget("u1")
    assert 0 == (tmp_path / "events.db-wal").stat().st_size
    log.close()
