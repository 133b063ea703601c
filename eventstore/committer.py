"""
Group commit: one writer thread, many producers, one transaction per group.

Producers (socket connections, feeds) :meth:`~GroupCommitter.submit` a list of events
with the feed positions they cover and get a :class:`concurrent.futures.Future`
that resolves, with that request's own :class:`AppendResult`, once the group holding
it has committed (``synchronous=FULL``: on disk) and been folded. Only then may the
producer acknowledge.

The writer takes the first waiting request, then everything else already waiting,
up to ``max_events`` events or ``max_delay_s`` of waiting for more, and commits it
as one transaction: a lone request is never delayed by default (``max_delay_s=0``),
and under load the groups grow by themselves while the previous one is on disk.
The request queue is bounded: when it is full, :meth:`submit` raises
:class:`BackpressureError` (or blocks, if asked to) instead of buffering without
bound.

Feeds pass the inputs they rejected along with the events (``dead_letters``); the
writer commits a group's dead letters first, then its events and positions, so a
crash in between can repeat a dead letter on redelivery but never lose one.

Other work on what the writer owns (the SQLite connection, the state), such as a
retention sweep, is queued with :meth:`~GroupCommitter.call`: it runs on the writer
thread between groups, after every request submitted before it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from eventstore._errors import StoreError
from eventstore.log import AppendResult, Position, Positions
from eventstore.schema import Event

__all__ = ["BackpressureError", "GroupCommitter"]

Sink = Callable[..., AppendResult]
#: ``dead_letter_sink(rejected, source=...)``: keeps ``(raw, reason)`` pairs of one source.
DeadLetterSink = Callable[..., None]
_STOP: Final = object()
T = TypeVar("T")


class BackpressureError(StoreError):
    """The writer is behind: the request queue is full. Retry after ``retry_after_s``."""

    def __init__(self, pending: int, retry_after_s: float) -> None:
        self.pending = pending
        self.retry_after_s = retry_after_s
        super().__init__(f"writer busy: {pending} requests pending; retry in {retry_after_s:g} s")


@dataclass(slots=True)
class _Request:
    events: Sequence[Event]
    positions: Positions
    dead_letters: Sequence[tuple[bytes, str]] = ()
    source: str = ""
    future: Future[AppendResult] = field(default_factory=Future)


@dataclass(slots=True)
class _Call:
    """A function to run on the writer thread between groups (see GroupCommitter.call)."""

    fn: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)

    def run(self) -> None:
        try:
            result = self.fn()
        except BaseException as e:  # noqa: BLE001 - the caller hears of every failure
            self.future.set_exception(e)
        else:
            self.future.set_result(result)


class GroupCommitter:
    """
    The writer thread in front of a sink (``Store.append`` or ``EventLog.append``).

    Args:
        sink: ``sink(events, positions=...) -> AppendResult``, called on the writer thread only.
        max_events: most events per transaction.
        max_delay_s: how long the writer may wait for more requests once it has one.
        max_pending: most requests waiting; beyond it ``submit`` pushes back.
        dead_letter_sink: where submitted ``dead_letters`` go (e.g.
            ``EventLog.dead_letters``), called on the writer thread only.
    """

    def __init__(self, sink: Sink, *, max_events: int = 5_000, max_delay_s: float = 0.0,
                 max_pending: int = 1_000, name: str = "eventstore.writer",
                 dead_letter_sink: DeadLetterSink | None = None) -> None:
        self._sink = sink
        self._dead_letter_sink = dead_letter_sink
        self.max_events = max_events
        self.max_delay_s = max_delay_s
        self._queue: queue.Queue[_Request | _Call | object] = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.groups = 0  # transactions committed, for stats
        self._thread.start()

    @property
    def pending(self) -> int:
        """Requests waiting for the writer."""
        return self._queue.qsize()

    def submit(self, events: Sequence[Event], *, positions: Positions | None = None,
               block: bool = False, timeout: float | None = None,
               dead_letters: Sequence[tuple[bytes, str]] = (), source: str = "",
               ) -> Future[AppendResult]:
        """
        Queue ``events`` (and the positions they cover) for the next group.

        ``dead_letters`` are the ``(raw, reason)`` inputs ``source`` rejected on the way.

        Raises:
            BackpressureError: the queue is full (and ``block`` is false, or
                ``timeout`` passed).
            ValueError: dead letters without a ``dead_letter_sink`` or a ``source``.
        """
        if dead_letters and (self._dead_letter_sink is None or not source):
            msg = "dead_letters: needs a dead_letter_sink on the committer and a source"
            raise ValueError(msg)
        request = _Request(events, positions or {}, dead_letters, source)
        try:
            self._queue.put(request, block=block, timeout=timeout)
        except queue.Full:
            raise BackpressureError(self._queue.qsize(), retry_after_s=0.05) from None
        return request.future

    def call(self, fn: Callable[[], T], *, block: bool = False,
             timeout: float | None = None) -> Future[T]:
        """
        Run ``fn()`` on the writer thread, after the requests submitted before it.

        It runs between two groups, never inside one, so it may use what the sink
        uses (the store's connection and state). Its result or exception goes to the
        returned future; an exception never stops the writer.

        Raises:
            BackpressureError: the queue is full (and ``block`` is false, or
                ``timeout`` passed).
        """
        call = _Call(fn)
        try:
            self._queue.put(call, block=block, timeout=timeout)
        except queue.Full:
            raise BackpressureError(self._queue.qsize(), retry_after_s=0.05) from None
        return call.future

    def close(self, *, timeout: float | None = None) -> None:
        """Commit everything already submitted, then stop the writer thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        after: object = None  # what ended the last group: a call, _STOP or nothing
        while True:
            item, after = (self._queue.get() if after is None else after), None
            if item is _STOP:
                return
            if isinstance(item, _Call):
                item.run()
                continue
            group, after = self._gather(item)  # type: ignore[arg-type]
            self._commit(group)

    def _gather(self, first: _Request) -> tuple[list[_Request], object]:
        """The group starting with ``first``, and the call or stop that ended it (or None)."""
        group = [first]
        size = len(first.events)
        deadline = time.monotonic() + self.max_delay_s
        while size < self.max_events:
            wait = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP or isinstance(item, _Call):
                return group, item
            group.append(item)  # type: ignore[arg-type]
            size += len(item.events)  # type: ignore[union-attr]
        return group, None

    def _commit(self, group: list[_Request]) -> None:
        events: list[Event] = []
        positions: dict[tuple[str, str], Position] = {}
        rejected: dict[str, list[tuple[bytes, str]]] = {}
        for request in group:
            events.extend(request.events)
            positions.update(request.positions)  # later requests hold later positions
            if request.dead_letters:
                rejected.setdefault(request.source, []).extend(request.dead_letters)
        try:
            for source, dead in rejected.items():
                self._dead_letter_sink(dead, source=source)  # type: ignore[misc]
            result = self._sink(events, positions=positions)
        except BaseException as e:  # noqa: BLE001 - every waiter must hear of the failure
            for request in group:
                request.future.set_exception(e)
            return
        self.groups += 1
        start = 0
        for request in group:
            end = start + len(request.events)
            mine = result.offsets[start:end]
            request.future.set_result(AppendResult(
                result.status[start:end], mine,
                [(o, e) for o, e in zip(mine, request.events, strict=True) if o is not None]))
            start = end
