"""
Retention in the store: `Store.retain` deletes exactly the events ingested before the
cut-off that the oldest kept snapshot covers, and the state survives it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from eventstore import Event, EventLog, Store

MakeEvent = Callable[..., Event]

#: The three batches' ingest times; the store is built as A, snapshot, B, snapshot, C.
A_TS, B_TS, C_TS = 100.0, 200.0, 300.0
USERS = ("user-old-1", "user-old-2", "user-both")
#: Every context value of the batches starts with this and the batch's letter.
CTX = "ctx-retention-"


def batch(make_event: MakeEvent, letter: str, start: int, n: int = 10) -> list[Event]:
    """``n`` events of batch ``letter``: catalogue items, interactions and impressions."""
    out: list[Event] = []
    for k in range(start, start + n):
        eid = f"{letter}-{k}"
        if k % 7 == 0:
            out.append(
                make_event("item", k, id=eid, item=f"i-{k % 5}", fields={"category": f"c-{k % 2}"})
            )
        elif k % 5 == 0:
            out.append(
                make_event(
                    "impression",
                    k,
                    id=eid,
                    user=USERS[k % 3],
                    items=[f"i-{k % 5}", f"i-{(k + 1) % 5}"],
                    context={"page": f"{CTX}{letter}-{k}"},
                )
            )
        else:
            kind = ("view", "click", "cart", "purchase", "like")[k % 5]
            out.append(
                make_event(
                    kind,
                    k,
                    id=eid,
                    user=USERS[k % 3],
                    item=f"i-{k % 5}",
                    context={"query": f"{CTX}{letter}-{k}"},
                )
            )
    return out


@pytest.fixture(name="filled")
def fixture_filled(store: Store, make_event: MakeEvent) -> Store:
    """
    Batch A (offsets 1-10, ingested at 100), a snapshot at 10, batch B (11-20, at 200),
    a snapshot at 20, batch C (21-30, at 300) that no snapshot covers yet.
    """
    store.append(batch(make_event, "a", 0), ingest_ts=A_TS)
    store.snapshot()
    store.append(batch(make_event, "b", 10), ingest_ts=B_TS)
    store.snapshot()
    store.append(batch(make_event, "c", 20), ingest_ts=C_TS)
    assert ([20, 10], 30) == (store.snapshots.offsets(), store.state.offset)
    return store


def ids_of(*letters: str) -> list[str]:
    starts = {"a": 0, "b": 10, "c": 20, "d": 30}
    return [f"{x}-{k}" for x in letters for k in range(starts[x], starts[x] + 10)]


def files_holding(directory: Path, needle: bytes) -> list[str]:
    """The files under ``directory`` whose bytes contain ``needle``."""
    return sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("*")
        if p.is_file() and needle in p.read_bytes()
    )


def damage(path: Path) -> None:
    """Flip a byte in the middle of ``path``: its checksum no longer matches."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def reopen(store: Store) -> Store:
    store.close()
    return Store(store.directory, decoder=store.decoder, snapshot_every=0)


@pytest.fixture(name="reopened")
def fixture_reopened() -> Iterator[list[Store]]:
    """Stores a test reopened, closed at the end."""
    opened: list[Store] = []
    yield opened
    for store in opened:
        store.close(snapshot=False)


# --- what is deleted -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cutoff", "deleted", "kept", "snapshots"),
    [
        pytest.param(50.0, 0, "abc", [30, 20], id="nothing-old-enough"),
        pytest.param(150.0, 10, "bc", [30, 20], id="only-a-old-enough"),
        # what the oldest kept snapshot (20) covers: both snapshots stay fallbacks
        pytest.param(250.0, 20, "c", [30, 20], id="a-and-b"),
        # C is old enough too, and only the newest (30) covers it: the oldest could
        # then only restore with a gap, so it goes, and everything old enough goes
        pytest.param(1000.0, 30, "", [30], id="c-beyond-the-oldest-snapshot"),
    ],
)
def test_retain_deletes_exactly_the_old_events_a_snapshot_covers(
    filled: Store, cutoff: float, deleted: int, kept: str, snapshots: list[int]
) -> None:
    """
    retain writes a snapshot of the state (30), keeps the two newest (20, 30), and
    deletes the events ingested before the cut-off that a kept snapshot covers, every
    kept snapshot covering all of them; nothing else.
    """
    n = filled.retain(cutoff)

    assert (deleted, ids_of(*kept), snapshots) == (n, filled.log.ids(), filled.snapshots.offsets())


def test_a_later_sweep_deletes_what_a_newer_snapshot_then_covers(
    filled: Store, make_event: MakeEvent
) -> None:
    """C (300) goes once a sweep's snapshot (40, after D) makes 30 the oldest kept one."""
    filled.retain(250.0)
    filled.append(batch(make_event, "d", 30), ingest_ts=400.0)

    n = filled.retain(350.0)

    assert (10, ids_of("d"), [40, 30]) == (n, filled.log.ids(), filled.snapshots.offsets())


def test_retain_writes_no_snapshot_when_the_newest_covers_the_state(filled: Store) -> None:
    """With the state already snapshotted, retain writes none and the cover stays the oldest."""
    filled.snapshot()  # 30; keeps 20 and 30
    before = [p.stat().st_mtime_ns for p in filled.snapshots.paths()]

    filled.retain(250.0)

    assert (before, ids_of("c")) == (
        [p.stat().st_mtime_ns for p in filled.snapshots.paths()],
        filled.log.ids(),
    )


def test_a_damaged_newest_snapshot_holds_retention_back_and_is_rewritten(
    filled: Store,
) -> None:
    """
    On a quiet log whose newest snapshot fails to verify, only what the oldest covers
    is deleted, the newest is written again, and the next sweep deletes the rest.
    """
    damage(filled.snapshot())  # 30, current; 20 is the oldest

    with capture_logs() as logs:
        first = filled.retain(1000.0)
    second = filled.retain(1000.0)

    assert (20, 10, [], [30]) == (first, second, filled.log.ids(), filled.snapshots.offsets())
    assert ["retention_held_back"] == [e["event"] for e in logs if e["log_level"] == "warning"]


def test_no_file_holds_a_deleted_events_context(filled: Store) -> None:
    """The deleted events' bytes are gone from every file (db, WAL, snapshots), the kept stay."""
    assert files_holding(filled.directory, f"{CTX}a-".encode())  # the test starts from a copy

    filled.retain(250.0)

    assert ([], ["events.db"]) == (
        files_holding(filled.directory, f"{CTX}a-".encode())
        + files_holding(filled.directory, f"{CTX}b-".encode()),
        files_holding(filled.directory, f"{CTX}c-".encode()),
    )


def test_retain_marks_the_log_incomplete_only_when_it_deleted(filled: Store) -> None:
    """truncated_before is the cover + 1 once events were deleted; no deletion, no mark."""
    filled.retain(50.0)
    untouched = (filled.log.is_complete, filled.log.truncated_before)

    filled.retain(250.0)

    assert ((True, None), (False, 21)) == (
        untouched,
        (filled.log.is_complete, filled.log.truncated_before),
    )


def test_retain_deletes_dead_letters_received_before_the_cutoff(filled: Store) -> None:
    """Dead letters (raw inputs) go with the old events; younger ones stay."""
    filled.ingest(b'{"id": "bad-1", "type": "click"}', source="test")
    filled.retain(50.0)
    young = len(filled.log.read_dead_letters())

    filled.retain(1e12)

    assert (1, []) == (young, filled.log.read_dead_letters())


def test_delete_before_without_an_ingest_time_deletes_every_event_below(
    filled: Store,
) -> None:
    """The plain form deletes by offset alone, and the mark never goes down."""
    n = filled.log.delete_before(21)
    filled.log.delete_before(5, ingested_before=1e12)  # nothing left below 5

    assert (20, ids_of("c"), 21) == (n, filled.log.ids(), filled.log.truncated_before)


def test_deleting_old_events_shrinks_the_id_index_and_keeps_duplicates_of_the_rest(
    filled: Store, make_event: MakeEvent,
) -> None:
    """
    The index forgets the deleted events, so a log with retention holds it at the
    log's size; the kept events' ids are still refused, a deleted one is new again.
    """
    before = filled.log.indexed_ids
    filled.log.delete_before(21)
    after = filled.log.indexed_ids
    again = filled.append(batch(make_event, "c", 20, n=2) + batch(make_event, "a", 1, n=1))

    assert (30, 10) == (before, after)
    assert ["duplicate", "duplicate", "accepted"] == again.status
    assert 11 == filled.log.indexed_ids


# --- the state survives ----------------------------------------------------------------


@pytest.mark.parametrize(("cutoff", "kept"), [(250.0, "c"), (1000.0, "")])
def test_the_state_after_reopening_equals_the_state_before_retention(
    filled: Store, reopened: list[Store], cutoff: float, kept: str
) -> None:
    """Snapshot + the kept tail rebuild the very state the deleted events had made."""
    before = filled.state.to_bytes()
    filled.retain(cutoff)

    again = reopen(filled)
    reopened.append(again)

    assert (before, ids_of(*kept)) == (again.state.to_bytes(), again.log.ids())


def test_a_damaged_newest_snapshot_falls_back_to_the_oldest_without_a_gap(
    filled: Store, reopened: list[Store]
) -> None:
    """
    The cover is the *oldest* kept snapshot: with the newest damaged, the older one plus
    the log after it still rebuild the same state, and no warning is logged.
    """
    before = filled.state.to_bytes()
    filled.retain(250.0)
    filled.close()
    damage(filled.snapshots.paths()[0])

    with capture_logs() as logs:
        again = Store(filled.directory, decoder=filled.decoder, snapshot_every=0)
    reopened.append(again)

    events = [entry["event"] for entry in logs]
    assert (before, "snapshot_skipped", False) == (
        again.state.to_bytes(),
        events[0],
        "state_incomplete" in events,
    )


def test_user_views_survive_retention_and_reopening(filled: Store, reopened: list[Store]) -> None:
    """`user` answers for users whose every event was deleted are what they were."""
    before = {u: filled.state.user_view(u) for u in USERS}
    filled.retain(1000.0)

    again = reopen(filled)
    reopened.append(again)

    assert before == {u: again.state.user_view(u) for u in USERS}


def test_no_valid_snapshot_after_retention_warns_and_keeps_what_the_log_has(
    filled: Store, make_event: MakeEvent, reopened: list[Store]
) -> None:
    """
    With every snapshot damaged, the store opens with the state of the kept events only
    and logs ``state_incomplete`` with offsets, not users.
    """
    filled.retain(250.0)
    filled.close()
    for path in filled.snapshots.paths():
        path.write_bytes(b"damaged")

    with capture_logs() as logs:
        again = Store(filled.directory, decoder=filled.decoder, snapshot_every=0)
    reopened.append(again)

    (warning,) = [entry for entry in logs if entry["event"] == "state_incomplete"]
    only_c = Store(filled.directory.parent / "only-c", snapshot_every=0)
    reopened.append(only_c)
    only_c.append(batch(make_event, "c", 20))
    assert ("warning", 0, 21, False) == (
        warning["log_level"],
        warning["snapshot_offset"],
        warning["truncated_before"],
        warning["from_snapshot"],
    )
    assert not any(u in str(entry) for entry in logs for u in USERS)
    assert only_c.state.user_view("user-both") == again.state.user_view("user-both")


# --- erasure after retention ------------------------------------------------------------


def test_forget_after_retention_leaves_no_trace_and_keeps_the_others(
    filled: Store, reopened: list[Store]
) -> None:
    """
    After retention, forget drops the user from the state and every file, the other
    users' views stay as they were, and a reopened store agrees.
    """
    gone, others = USERS[0], USERS[1:]
    views = {u: filled.state.user_view(u) for u in others}
    filled.retain(250.0)

    filled.forget(gone)
    again = reopen(filled)
    reopened.append(again)

    assert ([], None, views) == (
        files_holding(again.directory, gone.encode()),
        again.state.user_view(gone),
        {u: again.state.user_view(u) for u in others},
    )


def test_retention_needs_no_snapshot_directory_entries_to_start(
    store: Store, make_event: MakeEvent
) -> None:
    """On a store without snapshots retain writes the first one and deletes what it covers."""
    store.append(batch(make_event, "a", 0), ingest_ts=A_TS)

    n = store.retain(1000.0)

    assert (10, [], [10]) == (n, store.log.ids(), store.snapshots.offsets())


def test_a_log_reader_sees_the_retention_mark(filled: Store) -> None:
    """The mark is in the file: another connection reads it (is_complete, truncated_before)."""
    filled.retain(250.0)
    reader = EventLog(filled.log.path, synchronous="NORMAL")
    try:
        assert (False, 21) == (reader.is_complete, reader.truncated_before)
    finally:
        reader.close()
