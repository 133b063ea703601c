"""
What a feed needs from the daemon: decoding, durable appends, stored positions.

:class:`FeedSink` wraps the daemon's :class:`~eventstore.GroupCommitter`. A feed calls
:meth:`FeedSink.decode` on each payload (decoding, then the privacy plugins: user ids
pseudonymized, personal data masked) and :meth:`FeedSink.append` with the good
events, the bad payloads with their reasons, and the positions the batch covers; the
call returns once everything is committed, and only then may the feed acknowledge.
While the writer is behind (or the disk refuses writes) ``append`` waits and retries
instead of buffering: that wait is where a feed pauses, and since the feed reads no
more until it returns, nothing piles up in memory.

Storage faults. When the log cannot be written (disk full, read-only or failing file
system), the committer holds a storage condition until its probe finds the log
writable again (`eventstore.committer`). ``append`` then waits for that condition to
end, polling it every ``_STORAGE_POLL_S``, and retries the same batch: the feed holds
its messages unacknowledged meanwhile (no PUBACK, no Kafka offset past what is in
the log), logs ``feed_paused`` once and ``feed_resumed`` when the batch is durable.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog

from eventstore import BackpressureError, EventDecoder, StoreError, StoreFullError
from eventstore.log import AppendResult, Position, Positions
from eventstore.schema import Event, EventRejectedError

__all__ = ["Backoff", "FeedSink", "raise_if_cancelling", "read_secret"]

_log = structlog.get_logger("daemon.feeds")
#: How often a paused append checks whether the storage condition has ended.
_STORAGE_POLL_S = 0.1


class Backoff:
    """
    Exponential backoff with full jitter.

    ``next()`` gives a delay in ``[min_s / 2, min(max_s, min_s * 2^k))`` for the k-th
    failure; ``reset()`` after a success.
    """

    def __init__(self, min_s: float, max_s: float, *, rng: random.Random | None = None) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self.failures = 0
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets

    def next(self) -> float:
        """The delay before the next attempt (and count the failure)."""
        cap = min(self.max_s, self.min_s * 2.0**self.failures)
        self.failures += 1
        return max(self.min_s / 2, self._rng.uniform(0, cap))

    def reset(self) -> None:
        """The last attempt succeeded."""
        self.failures = 0


def read_secret(name: str, *, what: str) -> str:
    """
    The secret in file ``name``, without a trailing newline.

    A relative name is looked up in ``$CREDENTIALS_DIRECTORY`` (systemd's
    LoadCredential) first, then relative to the working directory.

    Raises:
        ValueError: the file cannot be read; the message names ``what`` (the config
            key), never the secret.
    """
    path = Path(name)
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not path.is_absolute() and creds and (Path(creds) / path).is_file():
        path = Path(creds) / path
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as e:
        msg = f"{what}: cannot read {path} ({e.strerror})"
        raise ValueError(msg) from None


def raise_if_cancelling(cause: BaseException | None = None) -> None:
    """
    Raise CancelledError if the running task was cancelled but carries on.

    aiomqtt awaits the broker with ``asyncio.wait_for``, which on Python 3.11 returns
    the result, swallowing the cancellation, when both arrive in the same turn
    (fixed in 3.12); its ``__aexit__`` can replace a CancelledError with an
    MqttError; aiokafka's ``start`` and ``stop`` await tasks of their own that they
    cancel and that end without raising. Each would keep a feed running through the
    daemon's shutdown.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from cause


class FeedSink:
    """
    The daemon's side of a feed.

    Args:
        committer: the daemon's writer (it must have a ``dead_letter_sink``).
        decoder: the daemon's event decoder (its limits apply to feeds too).
        log_path: the event log's file, read (read-only) for stored positions.
        metrics: the daemon's :class:`~daemon.metrics.Metrics`, or None.
        retry_s: how long to wait before retrying when the disk refused a write.
        privacy: the privacy plugins' ``ingest`` (`Service.privacy_ingest`), applied to
            every decoded event before it can be appended; None: events as decoded.
    """

    def __init__(self, committer: Any, decoder: EventDecoder, log_path: Path,
                 metrics: Any = None, *, retry_s: float = 1.0,
                 privacy: Callable[[Sequence[Event]], list[Event]] | None = None,
                 ) -> None:  # fmt: skip
        self._committer = committer
        self._decoder = decoder
        self._privacy = privacy
        self._log_path = log_path
        self.metrics = metrics  # the daemon's Metrics (None in some tests)
        self._retry_s = retry_s
        self.paused_s = 0.0  # total time appends waited for the writer
        self.paused: set[str] = set()  # sources whose append waits for storage now

    def decode(self, payload: bytes) -> tuple[list[Event], list[tuple[bytes, str]]]:
        """
        The valid events of a payload, through the privacy plugins, and its bad parts.

        The payload is one event or a list; the good events come back as the privacy
        plugins let them be stored, the bad parts as (raw, reason).

        A privacy plugin that fails makes the whole payload a dead letter: an event
        that was not through every plugin is never appended.
        """
        try:
            result = self._decoder.decode(payload)
        except EventRejectedError as e:  # defensive: decode reports, not raises
            return [], [(payload, str(e))]
        dead = [(r.raw, str(r.error)) for r in result.rejected]
        if self._privacy is None or not result.events:
            return result.events, dead
        try:
            return self._privacy(result.events), dead
        except Exception as e:  # noqa: BLE001 - a plugin's bug must not stop the feed
            _log.exception("feed_privacy_failed")
            return [], [(payload, f"privacy: a privacy plugin failed ({type(e).__name__})")]

    async def append(self, events: Sequence[Event], *, source: str,
                     positions: Positions | None = None,
                     dead_letters: Sequence[tuple[bytes, str]] = ()) -> AppendResult:  # fmt: skip
        """
        Make ``events``, ``dead_letters`` and ``positions`` durable.

        Returns the events' :class:`AppendResult` (accepted, duplicate or erased each).

        Waits while the writer is behind or the disk refuses writes, retrying until
        it succeeds or the task is cancelled; counts per-outcome metrics under ``source``.
        """
        loop = asyncio.get_running_loop()
        waited_from: float | None = None
        try:
            while True:
                try:
                    future = self._committer.submit(
                        events, positions=positions, dead_letters=dead_letters, source=source
                    )
                    result: AppendResult = await asyncio.wrap_future(future)
                except BackpressureError as e:
                    waited_from = waited_from or loop.time()
                    await asyncio.sleep(e.retry_after_s)
                    continue
                except StoreError as e:  # disk full, read-only, I/O error: nothing committed
                    waited_from = waited_from or loop.time()
                    await self._wait_for_storage(source, e)
                    continue
                break
        except BaseException:  # cancelled (a stop, a rebalance): no longer waiting
            self.paused.discard(source)
            raise
        if source in self.paused:
            self.paused.discard(source)
            _log.info("feed_resumed", source=source,
                      paused_s=round(loop.time() - (waited_from or loop.time()), 3))
        if waited_from is not None:
            self.paused_s += loop.time() - waited_from
        self._count(source, result, len(dead_letters))
        return result

    async def _wait_for_storage(self, source: str, error: StoreError) -> None:
        """
        After a failed append: wait until the committer's storage condition ends.

        Logged once per pause (``feed_paused``), without any event. An error that is
        not a storage condition (the committer holds none) is retried after ``retry_s``.
        """
        if source not in self.paused:
            self.paused.add(source)
            _log.warning("feed_paused", source=source, error=type(error).__name__,
                         cause=getattr(error, "cause", None),
                         effect="messages held unacknowledged until the log can be written")
        available = getattr(self._committer, "storage_available", None)
        if not isinstance(error, StoreFullError) or available is None or available:
            await asyncio.sleep(self._retry_s)
            return
        # the writer thread ends the condition: a flag polled, not an Event set across threads
        while not self._committer.storage_available:  # noqa: ASYNC110
            await asyncio.sleep(_STORAGE_POLL_S)

    def _count(self, source: str, result: AppendResult, rejected: int) -> None:
        m = self.metrics
        if m is None:
            return
        status = result.status
        for outcome, n in (
            ("accepted", status.count("accepted")),
            ("duplicate", status.count("duplicate")),
            ("erased", status.count("erased")),
            ("rejected", rejected),
        ):
            if n:
                m.feed_events.labels(feed=source.split(":", 1)[0], outcome=outcome).inc(n)

    def stored_positions(self, feed: str) -> dict[str, Position]:
        """The positions stored for ``feed``, by partition (read-only, any thread)."""
        if not self._log_path.exists():
            return {}
        conn = sqlite3.connect(f"file:{self._log_path}?mode=ro", uri=True, timeout=10)
        try:
            rows = conn.execute(
                "SELECT partition, position FROM feed_positions WHERE feed = ?", (feed,)
            ).fetchall()
        finally:
            conn.close()
        return {str(part): pos for part, pos in rows}
