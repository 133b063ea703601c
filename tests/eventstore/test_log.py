"""The SQLite event log and the group committer in front of it."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

from eventstore import (
    AppendResult,
    BackpressureError,
    Event,
    EventLog,
    GroupCommitter,
    SchemaVersionError,
    StoreError,
    StoreFullError,
)
from eventstore.log import MIGRATIONS

if TYPE_CHECKING:
    from concurrent.futures import Future
    from pathlib import Path

    import sqlite_utils

MakeEvent = Callable[..., Event]


@pytest.fixture(name="log_path")
def fixture_log_path(store_dir: Path) -> Path:
    """Where the test's log file lives."""
    return store_dir / "events.db"


@pytest.fixture(name="log")
def fixture_log(log_path: Path) -> Iterator[EventLog]:
    """A fresh log with the default (FULL) durability."""
    log = EventLog(log_path)
    yield log
    log.close()


def pragma(log: EventLog, statement: str) -> object:
    """Run ``PRAGMA <statement>`` on the log's own connection and return the first value."""
    return log._conn.execute(f"PRAGMA {statement}").fetchone()[0]  # noqa: SLF001 - the seam


def clicks(make_event: MakeEvent, ids: range | list[int], **fields: object) -> list[Event]:
    """Click events ``e-<n>`` for every n in ``ids``."""
    return [make_event("click", n, **fields) for n in ids]


# --- offsets and duplicates ----------------------------------------------------------


def test_offsets_increase_across_appends_and_reopen(log_path: Path, make_event: MakeEvent) -> None:
    """Offsets handed out are strictly increasing, also after the log is reopened."""
    offsets: list[int] = []
    for batch in (range(3), range(3, 4), range(4, 9)):
        log = EventLog(log_path)
        offsets += [o for o in log.append(clicks(make_event, batch)).offsets if o is not None]
        log.close()

    assert (9, sorted(set(offsets))) == (len(offsets), offsets)


def test_offsets_stay_above_an_erased_tail(log_path: Path, make_event: MakeEvent) -> None:
    """When forget deletes the highest events, the next offset is still above every old one."""
    log = EventLog(log_path)
    log.append(clicks(make_event, range(3), user="keep"))
    top = log.append(clicks(make_event, range(3, 6), user="gone")).offsets
    log.forget("gone")
    log.close()
    log = EventLog(log_path)

    after = log.append(clicks(make_event, range(6, 7), user="keep")).offsets[0]
    log.close()

    assert after is not None
    assert max(o for o in top if o is not None) < after


def test_offsets_stay_above_a_duplicate_tail(log: EventLog, make_event: MakeEvent) -> None:
    """An append whose last events are duplicates still leaves the next offset above all used."""
    first = log.append(clicks(make_event, range(3))).offsets
    log.append(clicks(make_event, [5, 0, 1]))  # the tail is duplicate

    nxt = log.append(clicks(make_event, [9])).offsets[0]

    assert nxt is not None
    assert max(o for o in first if o is not None) < nxt
    assert [o for o, _ in log.read()] == sorted(o for o, _ in log.read())


def test_duplicate_of_logged_event_is_not_stored_again(log: EventLog,
                                                       make_event: MakeEvent) -> None:
    """Re-appending logged ids reports "duplicate" with no offset and stores nothing."""
    log.append(clicks(make_event, range(3)))

    result = log.append(clicks(make_event, [1, 3, 2]))

    assert (["duplicate", "accepted", "duplicate"], [True, False, True], 1,
            ["e-0", "e-1", "e-2", "e-3"]) == (
        result.status, [o is None for o in result.offsets], result.accepted, log.ids())


def test_duplicate_within_one_batch_keeps_the_first(log: EventLog, make_event: MakeEvent) -> None:
    """An id repeated inside one batch is stored once (the first copy) and then "duplicate"."""
    first = make_event("click", 1, item="first")
    again = make_event("view", 1, item="second")

    result = log.append([first, make_event("click", 2), again])

    assert (["accepted", "accepted", "duplicate"], [first, make_event("click", 2)]) == (
        result.status, [e for _, e in log.read()])


def test_appended_offsets_match_what_read_returns(log: EventLog, make_event: MakeEvent) -> None:
    """The (offset, event) pairs an append reports are exactly what the log reads back."""
    log.append(clicks(make_event, range(2)))
    result = log.append(clicks(make_event, [1, 2, 3]))

    assert result.appended == list(log.read(after=result.appended[0][0] - 1))


def test_read_after_iterates_in_offset_order(log: EventLog, make_event: MakeEvent) -> None:
    """read(after=o) yields every event above o, in offset order, and honours limit."""
    offsets: list[int] = []
    for batch in (range(4), range(4, 6), range(6, 10)):
        offsets += [o for o in log.append(clicks(make_event, batch)).offsets if o is not None]

    tail = [(o, e.id) for o, e in log.read(after=offsets[3])]
    limited = [o for o, _ in log.read(after=offsets[3], limit=2)]

    assert ([(o, f"e-{k}") for k, o in enumerate(offsets)][4:], offsets[4:6]) == (tail, limited)


def test_forget_events_are_refused_by_the_log(log: EventLog, make_event: MakeEvent) -> None:
    """EventLog.append rejects forget events (Store.append turns them into EventLog.forget)."""
    with pytest.raises(ValueError, match="forget"):
        log.append([make_event("click", 1), make_event("forget", 2)])

    assert 0 == log.count()


# --- feed positions --------------------------------------------------------------------


def test_positions_are_stored_with_the_events(log_path: Path, make_event: MakeEvent) -> None:
    """Positions passed to append are there after reopening, next to the events."""
    log = EventLog(log_path)
    log.append(clicks(make_event, range(2)), positions={("kafka:events", "0"): 2})
    log.append(clicks(make_event, [2]), positions={("kafka:events", "0"): 3,
                                                    ("mqtt:events", "-"): "m-17"})
    log.close()
    log = EventLog(log_path)

    found = (log.positions(), log.positions("mqtt:events"), log.count())
    log.close()

    assert ({("kafka:events", "0"): 3, ("mqtt:events", "-"): "m-17"},
            {("mqtt:events", "-"): "m-17"}, 3) == found


def test_positions_move_on_an_all_duplicate_append(log: EventLog, make_event: MakeEvent) -> None:
    """A redelivered batch of duplicates still moves the feed position (it was consumed)."""
    log.append(clicks(make_event, range(2)), positions={("kafka:events", "0"): 2})

    log.append(clicks(make_event, range(2)), positions={("kafka:events", "0"): 4})

    assert ({("kafka:events", "0"): 4}, 2) == (log.positions(), log.count())


def test_full_disk_appends_nothing_and_moves_no_position(log_path: Path,
                                                          make_event: MakeEvent) -> None:
    """
    An append that hits SQLITE_FULL raises StoreFullError and leaves the events,
    the positions and the next offset as they were, also after reopening.
    """
    log = EventLog(log_path)
    log.append(clicks(make_event, range(3)), positions={("kafka:events", "0"): 3})
    before = (log.ids(), log.positions(), log.next_offset)
    pages = pragma(log, "page_count")
    pragma(log, f"max_page_count = {pages}")
    big = clicks(make_event, range(3, 300), context={"pad": "x" * 2000})

    with pytest.raises(StoreFullError) as info:
        log.append(big, positions={("kafka:events", "0"): 300})

    during = (log.ids(), log.positions(), log.next_offset)
    log.close()
    log = EventLog(log_path)
    after = (log.ids(), log.positions(), log.next_offset)
    log.close()
    assert (str(log_path), before, before) == (info.value.path, during, after)


def test_log_accepts_appends_again_after_a_full_disk(log: EventLog, make_event: MakeEvent) -> None:
    """Once space is back (SQLITE_FULL is not an I/O error), the next append succeeds."""
    log.append(clicks(make_event, range(3)))
    pages = pragma(log, "page_count")
    pragma(log, f"max_page_count = {pages}")
    with pytest.raises(StoreError):  # StoreFullError: see the test above
        log.append(clicks(make_event, range(3, 300), context={"pad": "x" * 2000}))
    pragma(log, "max_page_count = 1073741823")

    result = log.append(clicks(make_event, range(3, 5)))

    assert (["accepted", "accepted"], 5) == (result.status, log.count())


# --- pragmas and schema ----------------------------------------------------------------


def test_synchronous_is_full_and_journal_is_wal_by_default(log: EventLog) -> None:
    """By default a commit is durable when append returns (FULL = 2) and the journal is WAL."""
    sync = pragma(log, "synchronous")
    mode = pragma(log, "journal_mode")

    assert (2, "wal") == (sync, mode)


@pytest.mark.parametrize(("level", "code"), [("OFF", 0), ("NORMAL", 1), ("FULL", 2), ("EXTRA", 3)])
def test_synchronous_is_configurable(log_path: Path, level: str, code: int) -> None:
    """The synchronous level passed in is the one the connection runs with."""
    log = EventLog(log_path, synchronous=level)  # type: ignore[arg-type]
    found = pragma(log, "synchronous")
    log.close()

    assert code == found


def test_invalid_synchronous_is_a_value_error_naming_it(log_path: Path) -> None:
    """An unknown synchronous level is refused before the file is touched."""
    with pytest.raises(ValueError, match="synchronous") as info:
        EventLog(log_path, synchronous="SOMETIMES")  # type: ignore[arg-type]

    assert ("synchronous: expected OFF, NORMAL, FULL or EXTRA, got 'SOMETIMES'", False) == (
        str(info.value), log_path.exists())


def test_user_version_is_the_number_of_migrations(log: EventLog) -> None:
    """A new log records every known migration in PRAGMA user_version."""
    version = pragma(log, "user_version")

    assert (len(MIGRATIONS), len(MIGRATIONS)) == (version, log.schema_version)


def test_newer_log_is_refused_with_a_helpful_message(log_path: Path) -> None:
    """A log from a newer rerankd raises SchemaVersionError naming the path, versions and fix."""
    EventLog(log_path).close()
    with sqlite3.connect(log_path) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 3}")
    conn.close()

    with pytest.raises(SchemaVersionError) as info:
        EventLog(log_path)

    assert ((f"{log_path}: log schema version {len(MIGRATIONS) + 3} is newer than this rerankd "
             f"knows ({len(MIGRATIONS)}); upgrade rerankd or restore a log written by this "
             "version"), str(log_path), len(MIGRATIONS) + 3, len(MIGRATIONS)) == (
        str(info.value), info.value.path, info.value.found, info.value.known)


def test_a_new_migration_is_applied_once_on_reopen(log_path: Path, make_event: MakeEvent) -> None:
    """A longer migration list upgrades an existing log exactly once and keeps its events."""
    calls: list[int] = []

    def add_labels(db: sqlite_utils.Database) -> None:
        calls.append(1)
        db["labels"].insert({"name": "first"})

    longer = [*MIGRATIONS, ("add labels", add_labels)]
    log = EventLog(log_path)
    log.append(clicks(make_event, range(2)))
    log.close()
    for _ in range(2):
        log = EventLog(log_path, migrations=longer)
        log.close()

    log = EventLog(log_path, migrations=longer)
    found = (len(calls), log.db["labels"].count, log.schema_version,
             pragma(log, "user_version"), log.ids())
    log.close()
    assert (1, 1, len(longer), len(longer), ["e-0", "e-1"]) == found


def test_failed_migration_leaves_the_version_unchanged(log_path: Path) -> None:
    """A migration that raises is rolled back: the version stays and it runs again next time."""
    def broken(db: sqlite_utils.Database) -> None:
        db["half"].insert({"x": 1})
        msg = "boom"
        raise RuntimeError(msg)

    EventLog(log_path).close()
    with pytest.raises(RuntimeError, match="boom"):
        EventLog(log_path, migrations=[*MIGRATIONS, ("broken", broken)])

    log = EventLog(log_path)
    found = (pragma(log, "user_version"), log.db["half"].exists())
    log.close()
    assert (len(MIGRATIONS), False) == found


# --- dead letters ----------------------------------------------------------------------


def test_dead_letters_keep_reason_source_and_raw(log: EventLog) -> None:
    """A dead letter holds its raw bytes, size, reason and source; newest first."""
    log.dead_letter(b'{"id":1}', "id: expected a string, got an integer", source="mqtt:a")
    log.dead_letters([(b"\xff", "json: invalid UTF-8"), (b"[", "json: malformed")],
                     source="socket")

    letters = log.read_dead_letters()

    assert [("socket", "json: malformed", 1, b"["),
            ("socket", "json: invalid UTF-8", 1, b"\xff"),
            ("mqtt:a", "id: expected a string, got an integer", 8, b'{"id":1}')] == [
        (d.source, d.reason, d.size, d.raw) for d in letters]


def test_dead_letter_over_one_mib_is_truncated_with_its_size(log: EventLog) -> None:
    """Raw input over 1 MiB is cut to its first MiB; the full size is recorded."""
    raw = bytes(range(256)) * 8192 + b"tail"  # 2 MiB + 4 bytes

    log.dead_letter(raw, "event: larger than 65536 bytes", source="kafka:events")

    (letter,) = log.read_dead_letters()
    assert (len(raw), raw[: 1 << 20]) == (letter.size, letter.raw)


# --- group commit ----------------------------------------------------------------------


def test_concurrent_submits_land_exactly_once(log_path: Path, make_event: MakeEvent) -> None:
    """
    Many threads submitting overlapping ids get, per request, the statuses of their own
    events; every id is stored exactly once and accepted by exactly one request.
    """
    log = EventLog(log_path, synchronous="OFF")
    committer = GroupCommitter(log.append, max_events=64)
    futures: dict[int, list[tuple[list[Event], Future[AppendResult]]]] = {}

    def producer(t: int) -> None:
        mine = futures.setdefault(t, [])
        for r in range(40):
            # thread t sends ids 4r+t, 4r+t+1, 4r+t+2 (mod 4): every id comes from 3 threads,
            # each with its own user, so the stored copy tells which request won
            batch = [make_event("click", 4 * r + (t + k) % 4, user=f"u-{t}") for k in range(3)]
            mine.append((batch, committer.submit(batch, block=True)))

    threads = [threading.Thread(target=producer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    committer.close()
    results = [(batch, f.result(timeout=10)) for reqs in futures.values() for batch, f in reqs]
    stored = dict(log.read())
    log.close()

    accepted = [(o, e) for batch, r in results for o, e in zip(r.offsets, batch, strict=True)
                if o is not None]
    statuses = {s for _, r in results for s in r.status}
    submitted_ids = {e.id for batch, _ in results for e in batch}
    assert (statuses, len(accepted), stored) == (
        {"accepted", "duplicate"}, len(submitted_ids), dict(accepted))
    assert all(len(r.status) == len(batch) for batch, r in results)
    assert all(r.appended == [(o, e) for o, e in zip(r.offsets, batch, strict=True)
                              if o is not None] for batch, r in results)


class GatedSink:
    """A sink that blocks on its first call until ``release`` is set, then appends to a log."""

    def __init__(self, log: EventLog, *, fail_after_first: bool = False) -> None:
        self.log = log
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self.fail_after_first = fail_after_first

    def __call__(self, events: list[Event], *, positions: object = None) -> AppendResult:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            assert self.release.wait(10)
        elif self.fail_after_first:
            msg = "disk on fire"
            raise OSError(msg)
        return self.log.append(events, positions=positions)  # type: ignore[arg-type]


def test_full_queue_raises_backpressure(log: EventLog, make_event: MakeEvent) -> None:
    """With the writer stuck and max_pending requests waiting, submit raises BackpressureError."""
    sink = GatedSink(log)
    committer = GroupCommitter(sink, max_pending=3)
    first = committer.submit([make_event("click", 0)])
    assert sink.entered.wait(10)
    waiting = [committer.submit([make_event("click", n)]) for n in (1, 2, 3)]

    with pytest.raises(BackpressureError) as info:
        committer.submit([make_event("click", 4)])

    sink.release.set()
    committer.close()
    assert (3, ["e-0", "e-1", "e-2", "e-3"]) == (info.value.pending, log.ids())
    assert [["accepted"]] * 4 == [f.result(timeout=10).status for f in [first, *waiting]]


def test_sink_exception_reaches_every_waiting_future(log: EventLog, make_event: MakeEvent) -> None:
    """When the sink raises, every request of that group fails with that exception."""
    sink = GatedSink(log, fail_after_first=True)
    committer = GroupCommitter(sink)
    first = committer.submit([make_event("click", 0)])
    assert sink.entered.wait(10)
    group = [committer.submit([make_event("click", n)]) for n in (1, 2, 3)]
    sink.release.set()
    committer.close()

    errors = [f.exception(timeout=10) for f in group]

    assert (["accepted"], 2, ["disk on fire"] * 3, ["e-0"]) == (
        first.result().status, sink.calls, [str(e) for e in errors], log.ids())
    assert all(e is errors[0] for e in errors)


def test_close_commits_what_was_submitted(log: EventLog, make_event: MakeEvent) -> None:
    """close() waits for every request already queued to be committed and resolved."""
    sink = GatedSink(log)
    committer = GroupCommitter(sink)
    futures = [committer.submit([make_event("click", n)], positions={("f", "0"): n})
               for n in range(20)]
    assert sink.entered.wait(10)
    threading.Timer(0.05, sink.release.set).start()

    committer.close()

    assert ([True] * 20, [f"e-{n}" for n in range(20)], {("f", "0"): 19}) == (
        [f.done() for f in futures], log.ids(), log.positions())


def test_group_positions_are_the_latest_of_the_group(log: EventLog, make_event: MakeEvent) -> None:
    """Requests grouped into one transaction record the last request's position per feed."""
    sink = GatedSink(log)
    committer = GroupCommitter(sink)
    committer.submit([make_event("click", 0)], positions={("k", "0"): 1})
    assert sink.entered.wait(10)
    for n in range(1, 5):
        committer.submit([make_event("click", n)], positions={("k", "0"): n + 1, ("k", "1"): 9})
    sink.release.set()
    committer.close()

    assert ({("k", "0"): 5, ("k", "1"): 9}, 2) == (log.positions(), sink.calls)


def test_meta_values_are_kept_across_opens(log: EventLog, log_path: Path) -> None:
    """set_meta stores a value durably; meta reads it back, None for a key never set."""
    assert log.meta("user_id_probe") is None
    log.set_meta("user_id_probe", "p:1")
    log.close()
    again = EventLog(log_path)
    try:
        assert "p:1" == again.meta("user_id_probe")
    finally:
        again.close()


def test_the_logs_own_meta_keys_cannot_be_set(log: EventLog) -> None:
    """next_offset, the tombstone salt and the retention mark belong to the log."""
    for key in ("next_offset", "tombstone_salt", "truncated_before"):
        with pytest.raises(ValueError, match=f"meta: {key} belongs to the log itself"):
            log.set_meta(key, "1")
