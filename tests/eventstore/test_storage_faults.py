"""
Storage faults in the event store: the writer's storage condition (refuse, probe,
resume), `Store.recover` after an I/O error, and snapshots that cannot be written.

The real faults (a full tmpfs, a read-only file system, under the real daemon) are in
tests/chaos/test_disk.py; here the sink or the snapshot writer fails at one seam.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from eventstore import (
    AppendResult,
    Event,
    EventDecoder,
    EventLog,
    GroupCommitter,
    State,
    Store,
    StoreFullError,
    project,
)
from eventstore import snapshots as snapshots_module
from eventstore.committer import StorageUnavailableError

MakeEvent = Callable[..., Event]


class FailingSink:
    """Appends to ``store``; while ``full`` is set every call fails with SQLITE_FULL."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.full = threading.Event()
        self.calls = 0
        self.gate = threading.Event()  # the first call waits for it
        self.gate_entered = threading.Event()

    def __call__(self, events: list[Event], *, positions: Any = None) -> AppendResult:
        self.calls += 1
        if self.calls == 1:
            self.gate_entered.set()
            assert self.gate.wait(10)
        if self.full.is_set():
            raise StoreFullError(str(self.store.log.path), "SQLITE_FULL")
        return self.store.append(events, positions=positions)


class Probe:
    """Fails while ``full`` is set (as `Store.recover` does), counting its calls."""

    def __init__(self, full: threading.Event) -> None:
        self.full = full
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.full.is_set():
            raise StoreFullError("events.db", "SQLITE_FULL: 0 bytes free")


def wait_for(check: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check() and time.monotonic() < deadline:
        time.sleep(0.005)
    return check()


def test_a_storage_error_fails_the_group_refuses_the_rest_and_a_probe_ends_it(
    store: Store, make_event: MakeEvent
) -> None:
    """
    The group that met the full disk fails as a whole (each waiter hears SQLITE_FULL);
    requests queued behind it and submitted meanwhile are refused without touching the
    disk; the probe runs until the disk is writable, and then appends commit again.
    Nothing refused is in the log or the state.
    """
    sink = FailingSink(store)
    probe = Probe(sink.full)
    heard: list[str | None] = []
    committer = GroupCommitter(sink, probe=probe, probe_min_s=0.01, probe_max_s=0.05,
                               on_storage=lambda e: heard.append(e and e.cause))  # fmt: skip
    before = store.state.to_bytes()
    try:
        sink.full.set()
        first = committer.submit([make_event("click", 1)])
        assert sink.gate_entered.wait(10)
        queued = committer.submit([make_event("click", 2)])  # behind the failing group
        sink.gate.set()
        with pytest.raises(StoreFullError, match="SQLITE_FULL") as failed:
            first.result(10)
        with pytest.raises(StorageUnavailableError) as refused_queued:
            queued.result(10)
        with pytest.raises(StorageUnavailableError) as refused_now:
            committer.submit([make_event("click", 3)])
        assert wait_for(lambda: probe.calls >= 2)  # probing, and failing, meanwhile
        held = (committer.storage_available, store.log.count(),
                store.state.to_bytes() == before)  # fmt: skip
        sink.full.clear()
        assert wait_for(lambda: committer.storage_available)
        after = committer.submit([make_event("click", 4)]).result(10)
    finally:
        sink.gate.set()
        committer.close()
    assert not isinstance(failed.value, StorageUnavailableError)
    assert refused_queued.value.retry_after_s > 0
    assert "SQLITE_FULL" == refused_now.value.cause
    assert (False, 0, True) == held
    assert ["SQLITE_FULL", None] == heard
    assert (1, 2) == (committer.episodes, committer.refused)
    assert 2 == sink.calls  # the failing group, then e-4: the refused never reached it
    assert (["accepted"], ["e-4"]) == (after.status, [e.id for _, e in store.log.read()])


def test_without_a_probe_the_next_request_tries_the_disk_again(
    store: Store, make_event: MakeEvent
) -> None:
    """A committer with no probe holds no condition: each request is its own attempt."""
    sink = FailingSink(store)
    sink.gate.set()
    committer = GroupCommitter(sink)
    try:
        sink.full.set()
        with pytest.raises(StoreFullError):
            committer.submit([make_event("click", 1)]).result(10)
        available = committer.storage_available
        sink.full.clear()
        result = committer.submit([make_event("click", 2)]).result(10)
    finally:
        committer.close()
    assert (True, ["accepted"], 0) == (available, result.status, committer.episodes)


def test_recover_reopens_a_latched_log_and_folds_what_reached_it(
    store: Store, make_event: MakeEvent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    After an I/O error latched the log, `Store.recover` reopens it: a commit that
    reported the error but reached the file (here: written by a second handle) is
    folded, so the state is again a fold of the log, its ids are known as duplicates,
    and appends go on at the right offset.
    """
    store.append([make_event("click", 1)])
    other = EventLog(store.log.path)
    other.append([make_event("purchase", 2, item="i-2")])  # the "failed" commit
    other.close()
    monkeypatch.setattr(store.log, "_failed", "I/O error (test); reopen the log")
    with pytest.raises(StoreFullError, match="I/O error"):
        store.append([make_event("click", 3)])
    caught_up = store.recover()
    again = store.append([make_event("purchase", 2, item="i-2"), make_event("click", 3)])
    fresh = project(State(store.config), (e for _, e in store.log.read()))
    fresh.offset = store.log.next_offset - 1
    assert (1, None) == (caught_up, store.log.failed)
    assert (["duplicate", "accepted"], [None, 3]) == (again.status, again.offsets)
    assert fresh.to_bytes() == store.state.to_bytes()


def test_recover_waits_for_free_space(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """With less than RESUME_FREE_BYTES free, recover refuses: a full disk is not back."""
    usage = type("usage", (), {"free": 4096})
    monkeypatch.setattr("eventstore.store.shutil.disk_usage", lambda _: usage)
    with pytest.raises(StoreFullError, match="4096 bytes free"):
        store.recover()


def test_a_snapshot_that_meets_a_full_disk_is_skipped_and_leaves_nothing_behind(
    store_dir: Path, decoder: EventDecoder, make_event: MakeEvent,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """
    An automatic snapshot failing with ENOSPC does not fail the append that triggered
    it (which committed), removes its temporary file, keeps the older snapshots, and
    is not tried again before SNAPSHOT_RETRY_S.
    """
    store = Store(store_dir, decoder=decoder, snapshot_every=1)
    try:
        store.append([make_event("click", 1)])  # a good snapshot at offset 1
        good = store.snapshots.paths()
        calls = 0

        def full(fd: int, data: bytes) -> None:
            nonlocal calls
            calls += 1
            os.write(fd, data[:100])
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(snapshots_module, "_write_all", full)
        results = [store.append([make_event("click", n)]).status for n in (2, 3)]
        left = sorted(p.name for p in store.snapshots.directory.iterdir())
    finally:
        monkeypatch.undo()
        store.close()
    assert [["accepted"], ["accepted"]] == results
    assert 1 == calls  # the second append did not try again so soon
    assert [p.name for p in good] == left
    assert 1 == store.snapshots.load(good[0], store.config).offset
