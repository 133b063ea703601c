"""
WAL checkpoints on a background thread, off the append path.

SQLite's automatic checkpoint runs inside the commit that crosses the threshold, so
one append in a few hundred waited for tens of megabytes of page copies (p99 of a
1000-event commit into a 1M-event log: 0.5 s). Here a thread with its own
connection runs ``PRAGMA wal_checkpoint(PASSIVE)`` every ``interval_s``: PASSIVE
never blocks the writer, and sqlite3 releases the GIL while it copies. The writer's
own automatic checkpoint stays on, at a much higher threshold, as a safety net.

Checkpoints that must *complete* (erasure truncates the WAL so no deleted page image
survives) take :attr:`Checkpointer.lock`, so they never race the background one.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Final

import structlog

__all__ = ["Checkpointer", "truncate_wal"]

_log = structlog.get_logger("eventstore.checkpoint")
_TRUNCATE_TRIES: Final = 100


class Checkpointer:
    """
    A daemon thread checkpointing the WAL of ``path`` every ``interval_s``.

    Args:
        path: the database file.
        interval_s: time between PASSIVE checkpoints.
    """

    def __init__(self, path: Path, *, interval_s: float = 0.5) -> None:
        self.path = path
        self.interval_s = interval_s
        self.lock = threading.Lock()
        self.checkpoints = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eventstore.checkpointer",
                                         daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        failing = False  # logged once per run of failures, not every interval
        try:
            conn.execute("PRAGMA busy_timeout=100")
            while not self._stop.wait(self.interval_s):
                with self.lock:
                    try:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                        self.checkpoints += 1
                    except sqlite3.Error as e:  # e.g. disk full: the next round retries
                        if not failing:
                            _log.warning("checkpoint_failed", error=str(e),
                                         retry_s=self.interval_s)
                        failing = True
                        continue
                if failing:
                    failing = False
                    _log.info("checkpoint_recovered")
        finally:
            conn.close()

    def close(self) -> None:
        """Stop the thread (after the checkpoint in progress, if any)."""
        self._stop.set()
        self._thread.join()


def truncate_wal(conn: sqlite3.Connection, lock: threading.Lock | None) -> None:
    """
    Checkpoint everything and truncate the WAL file to zero bytes.

    Retries while another connection (a reader) keeps it busy.

    Raises:
        sqlite3.OperationalError: still busy after about two seconds.
    """
    for _ in range(_TRUNCATE_TRIES):
        if lock is None:
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        else:
            with lock:
                busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        if not busy:
            return
        time.sleep(0.02)
    msg = "database is busy: the WAL could not be truncated (a reader keeps it open)"
    raise sqlite3.OperationalError(msg)
