"""
The retention sweeps: old events deleted from the log while the daemon runs.

A privacy plugin of the `plugins.base.RetentionPlugin` shape (the built-in
``retention``) asks for them; `RetentionSweeper.run` carries them out: a sweep when the
daemon starts, then one every ``sweep_interval_s``, each `eventstore.store.Store.retain`
run *on the writer thread* through `eventstore.committer.GroupCommitter.call` (the
SQLite connection and the state belong to the writer; a sweep waits for the groups
queued before it and the groups after it wait for the sweep).

The plugins are read again before every sweep, so a SIGHUP reload that adds, removes
or changes retention takes effect at once (`RetentionSweeper.wake` restarts the wait).
A failed sweep is logged and counted (no personal data: counts and the error's type
and message, which name files, not events) and retried at the next interval; it
never stops the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable
from typing import Any, Final

import structlog

from daemon._plugins import Retention
from daemon.metrics import Metrics
from eventstore import GroupCommitter, Store

__all__ = ["RetentionSweeper"]

_log = structlog.get_logger("daemon.retention")
#: How long a sweep may wait for room in the writer's queue before it counts as failed.
_QUEUE_WAIT_S: Final = 60.0


class RetentionSweeper:
    """
    Runs retention sweeps while privacy plugins ask for them.

    Args:
        store: the daemon's store (used on the writer thread only).
        committer: the writer thread in front of ``store``.
        metrics: where deleted events and failures are counted.
        settings: what the current plugins ask for (``Plugins.retention``), read
            before every sweep.
        on_snapshot: called on the writer thread with the state's offset when a sweep
            wrote a snapshot (the daemon's snapshot interval restarts from it).
    """

    def __init__(self, store: Store, committer: GroupCommitter, metrics: Metrics, *,
                 settings: Callable[[], Retention | None],
                 on_snapshot: Callable[[int], None]) -> None:  # fmt: skip
        self._store = store
        self._committer = committer
        self._metrics = metrics
        self._settings = settings
        self._on_snapshot = on_snapshot
        self._wake = asyncio.Event()
        #: The last sweep, for the ``stats`` op: when, how long, what it deleted, or its error.
        self.last: dict[str, Any] | None = None

    def wake(self) -> None:
        """Sweep now and restart the interval (after a reload changed the plugins)."""
        self._wake.set()

    async def run(self) -> None:
        """Sweep, then wait ``sweep_interval_s`` or for `wake`, forever (idle without retention)."""
        while True:
            self._wake.clear()
            settings = self._settings()
            if settings is not None:
                await self.sweep(settings.max_age_s)
            interval = settings.sweep_interval_s if settings is not None else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()

    async def sweep(self, max_age_s: float) -> int | None:
        """One sweep on the writer thread; how many events it deleted (None: it failed)."""
        started = time.monotonic()
        try:
            # blocking put (in a thread) when the writer's queue is full: the sweep waits
            # its turn rather than being skipped under load
            future = await asyncio.to_thread(
                self._committer.call, functools.partial(self._retain, max_age_s),
                block=True, timeout=_QUEUE_WAIT_S,
            )  # fmt: skip
            deleted = await asyncio.wrap_future(future)
        except Exception as error:  # noqa: BLE001 - retried at the next interval
            self._metrics.retention_failures.inc()
            _log.exception("retention_failed", retry_in_s=self._interval())
            self.last = {"ts": round(time.time(), 3), "ok": False,
                         "error": type(error).__name__}  # fmt: skip
            return None
        self._metrics.retention_deleted.inc(deleted)
        self.last = {"ts": round(time.time(), 3), "ok": True, "deleted": deleted,
                     "max_age_s": max_age_s,
                     "seconds": round(time.monotonic() - started, 3)}  # fmt: skip
        return deleted

    def _interval(self) -> float | None:
        settings = self._settings()
        return settings.sweep_interval_s if settings is not None else None

    def _retain(self, max_age_s: float) -> int:
        """The sweep itself, on the writer thread."""
        store = self._store
        deleted = store.retain(time.time() - max_age_s)
        offsets = store.snapshots.offsets()
        if offsets and offsets[0] == store.state.offset:
            self._on_snapshot(store.state.offset)
        return deleted
