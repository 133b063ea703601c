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

Storage faults. When the sink raises :class:`~eventstore.StoreFullError` (disk full,
read-only file system, I/O error), the whole group failed: SQLite rolled the
transaction back, nothing of it was folded, and every request in it gets that error,
so nobody acknowledges. The committer then holds a *storage unavailable* condition
(:attr:`GroupCommitter.unavailable`): :meth:`submit` refuses at once with
:class:`StorageUnavailableError`, and requests already queued are failed with it
without touching the disk. Meanwhile the writer thread runs ``probe`` (the daemon's
`Store.recover`: reopen the log if an I/O error latched it, make one small durable
write, fold whatever the log holds beyond the state) with jittered exponential
backoff from ``probe_min_s`` to ``probe_max_s``; the first probe that returns ends
the condition, and requests are committed again. ``on_storage`` hears of each
change on the writer thread (the error when it starts, None when it ends). A disk
that flaps keeps its backoff: it resets only after ``probe_max_s`` x 10 of health.
Calls still run during the condition; one that fails with a storage error starts it.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import structlog

from eventstore._errors import StoreError, StoreFullError
from eventstore.log import AppendResult, Position, Positions
from eventstore.schema import Event

__all__ = ["BackpressureError", "GroupCommitter", "StorageUnavailableError"]

Sink = Callable[..., AppendResult]
#: ``dead_letter_sink(rejected, source=...)``: keeps ``(raw, reason)`` pairs of one source.
DeadLetterSink = Callable[..., None]
#: ``on_storage(error)``: the storage condition began (the error) or ended (None).
StorageListener = Callable[[StoreFullError | None], None]
_STOP: Final = object()
T = TypeVar("T")
_log = structlog.get_logger("eventstore.committer")


class BackpressureError(StoreError):
    """The writer is behind: the request queue is full. Retry after ``retry_after_s``."""

    def __init__(self, pending: int, retry_after_s: float) -> None:
        self.pending = pending
        self.retry_after_s = retry_after_s
        super().__init__(f"writer busy: {pending} requests pending; retry in {retry_after_s:g} s")


class StorageUnavailableError(StoreFullError):
    """
    Refused without trying: storage is unavailable (nothing was appended).

    The log could not be written, and no probe since has found it writable. Retry
    after ``retry_after_s``.
    """

    def __init__(self, cause: StoreFullError, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(cause.path, cause.cause)


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
        probe: after a storage error, called on the writer thread until it returns
            (e.g. ``Store.recover``); it raises while the log cannot be written.
            Without one, the next request is the probe.
        probe_min_s: the first wait before probing.
        probe_max_s: the longest wait between two probes.
        on_storage: told of each change of the storage condition, on the writer thread.
    """

    def __init__(self, sink: Sink, *, max_events: int = 5_000, max_delay_s: float = 0.0,
                 max_pending: int = 1_000, name: str = "eventstore.writer",
                 dead_letter_sink: DeadLetterSink | None = None,
                 probe: Callable[[], object] | None = None, probe_min_s: float = 0.05,
                 probe_max_s: float = 2.0, on_storage: StorageListener | None = None,
                 ) -> None:  # fmt: skip
        self._sink = sink
        self._dead_letter_sink = dead_letter_sink
        self.max_events = max_events
        self.max_delay_s = max_delay_s
        self._queue: queue.Queue[_Request | _Call | object] = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.groups = 0  # transactions committed, for stats
        self._probe = probe
        self.probe_min_s = probe_min_s
        self.probe_max_s = probe_max_s
        self._on_storage = on_storage
        #: The storage error that began the current condition (None: writable).
        self.unavailable: StoreFullError | None = None
        self.unavailable_since: float | None = None  # time.monotonic() at its start
        self.last_unavailable_s = 0.0  # how long the last condition lasted
        self.episodes = 0  # storage conditions so far
        self.refused = 0  # requests refused during them
        self.probes_failed = 0
        self._probe_at = 0.0
        self._probe_failures = 0
        self._healthy_since = time.monotonic()
        self._rng = random.Random()  # noqa: S311 - jitter, not secrets
        self._thread.start()

    @property
    def pending(self) -> int:
        """Requests waiting for the writer."""
        return self._queue.qsize()

    @property
    def storage_available(self) -> bool:
        """No storage condition holds: requests are committed (see the module docstring)."""
        return self.unavailable is None

    def retry_after_s(self) -> float:
        """How long until the next probe (a retry hint while storage is unavailable)."""
        return max(self.probe_min_s, self._probe_at - time.monotonic())

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
            StorageUnavailableError: a storage condition holds; nothing was queued.
            ValueError: dead letters without a ``dead_letter_sink`` or a ``source``.
        """
        if dead_letters and (self._dead_letter_sink is None or not source):
            msg = "dead_letters: needs a dead_letter_sink on the committer and a source"
            raise ValueError(msg)
        cause = self.unavailable
        if cause is not None:
            self.refused += 1
            raise StorageUnavailableError(cause, self.retry_after_s())
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
            item, after = (self._next() if after is None else after), None
            if item is _STOP:
                return
            if isinstance(item, _Call):
                item.run()
                error = None if item.future.cancelled() else item.future.exception()
                if isinstance(error, StoreFullError) and self.unavailable is None:
                    self._begin_unavailable(error)
                continue
            if self.unavailable is not None:
                self._refuse(item)  # type: ignore[arg-type]
                continue
            group, after = self._gather(item)  # type: ignore[arg-type]
            self._commit(group)

    def _next(self) -> object:
        """The next queued item; while storage is unavailable, probe when due meanwhile."""
        while self.unavailable is not None and self._probe is not None:
            wait = self._probe_at - time.monotonic()
            if wait > 0:
                try:
                    return self._queue.get(timeout=wait)
                except queue.Empty:
                    pass
            self._run_probe()
        return self._queue.get()

    def _run_probe(self) -> None:
        assert self._probe is not None
        try:
            self._probe()
        except StoreError:
            self._probe_failed()
        except Exception:  # noqa: BLE001 - a bug in the probe: keep refusing, say so
            _log.exception("storage_probe_failed")
            self._probe_failed()
        else:
            self._end_unavailable()

    def _probe_failed(self) -> None:
        self.probes_failed += 1
        self._probe_failures += 1
        self._schedule_probe()

    def _schedule_probe(self) -> None:
        """Full-jitter exponential backoff between probe_min_s and probe_max_s."""
        cap = min(self.probe_max_s, self.probe_min_s * 2.0 ** self._probe_failures)
        self._probe_at = time.monotonic() + max(self.probe_min_s, self._rng.uniform(0, cap))

    def _begin_unavailable(self, error: StoreFullError) -> None:
        if self._probe is None:  # no probe: the next request tries the disk again
            return
        now = time.monotonic()
        if now - self._healthy_since >= 10 * self.probe_max_s:
            self._probe_failures = 0  # healthy long enough: not a flapping disk
        self.unavailable = error
        self.unavailable_since = now
        self.episodes += 1
        self._schedule_probe()
        self._notify(error)

    def _end_unavailable(self) -> None:
        if self.unavailable_since is not None:
            self.last_unavailable_s = time.monotonic() - self.unavailable_since
        self.unavailable = None
        self.unavailable_since = None
        self._healthy_since = time.monotonic()
        self._notify(None)

    def _notify(self, error: StoreFullError | None) -> None:
        if self._on_storage is None:
            return
        try:
            self._on_storage(error)
        except Exception:  # noqa: BLE001 - a listener's bug must not stop the writer
            _log.exception("storage_listener_failed")

    def _refuse(self, request: _Request) -> None:
        """Fail a request queued before (or during) the condition, without a write."""
        assert self.unavailable is not None
        self.refused += 1
        request.future.set_exception(StorageUnavailableError(self.unavailable,
                                                             self.retry_after_s()))

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
            if isinstance(e, StoreFullError):
                self._begin_unavailable(e)  # before the waiters hear: their retry is refused
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
