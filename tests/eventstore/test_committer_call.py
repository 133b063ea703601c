"""`GroupCommitter.call`: a function run on the writer thread, in order with the appends."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from eventstore import AppendResult, BackpressureError, Event, EventLog, GroupCommitter

MakeEvent = Callable[..., Event]


class GatedSink:
    """Appends to a log; its first call blocks until ``release`` is set."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, events: list[Event], *, positions: object = None) -> AppendResult:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.release.wait(10)
        return self.log.append(events, positions=positions)  # type: ignore[arg-type]


@pytest.fixture(name="log")
def fixture_log(store_dir: Path) -> Iterator[EventLog]:
    log = EventLog(store_dir / "events.db", synchronous="OFF")
    yield log
    log.close()


def test_a_call_runs_after_what_was_submitted_before_and_before_what_after(
    log: EventLog, make_event: MakeEvent
) -> None:
    """
    A call queued behind two requests sees them committed; a request queued behind the
    call is committed after it, in a group of its own.
    """
    sink = GatedSink(log)
    committer = GroupCommitter(sink, name="writer-under-test")
    committer.submit([make_event("click", 0)])
    assert sink.entered.wait(10)
    committer.submit([make_event("click", 1)])
    committer.submit([make_event("click", 2)])
    seen = committer.call(log.ids)
    committer.submit([make_event("click", 3)])
    sink.release.set()
    committer.close()

    assert (["e-0", "e-1", "e-2"], ["e-0", "e-1", "e-2", "e-3"], 3) == (
        seen.result(timeout=10),
        log.ids(),
        sink.calls,
    )


def test_a_call_runs_on_the_writer_thread(log: EventLog) -> None:
    """The function runs on the committer's thread, not the caller's."""
    committer = GroupCommitter(log.append, name="writer-under-test")

    name = committer.call(lambda: threading.current_thread().name).result(timeout=10)
    committer.close()

    assert "writer-under-test" == name


def test_a_failing_call_reaches_its_future_and_the_writer_goes_on(
    log: EventLog, make_event: MakeEvent
) -> None:
    """The call's exception is the future's; the next append is committed as usual."""
    committer = GroupCommitter(log.append)

    failed = committer.call(lambda: 1 / 0)
    after = committer.submit([make_event("click", 0)])
    committer.close()

    assert (ZeroDivisionError, ["accepted"]) == (
        type(failed.exception(timeout=10)),
        after.result(timeout=10).status,
    )


def test_a_call_on_a_full_queue_raises_backpressure(log: EventLog, make_event: MakeEvent) -> None:
    """Calls share the bounded queue with requests: a full one pushes back."""
    sink = GatedSink(log)
    committer = GroupCommitter(sink, max_pending=1)
    committer.submit([make_event("click", 0)])
    assert sink.entered.wait(10)
    waiting = committer.call(lambda: "ran")

    with pytest.raises(BackpressureError):
        committer.call(lambda: "never")

    sink.release.set()
    committer.close()
    assert "ran" == waiting.result(timeout=10)


def test_close_runs_the_calls_already_queued(log: EventLog, make_event: MakeEvent) -> None:
    """close() lets every queued call run, like every queued request."""
    sink = GatedSink(log)
    committer = GroupCommitter(sink)
    committer.submit([make_event("click", 0)])
    assert sink.entered.wait(10)
    calls = [committer.call(lambda n=n: n) for n in range(3)]
    threading.Timer(0.05, sink.release.set).start()

    committer.close()

    assert [0, 1, 2] == [c.result(timeout=10) for c in calls]
