"""
The store: the log, the state and the snapshots, kept consistent.

``Store`` is what the daemon, the importers and the CLI use. Its invariant: the
state equals the newest snapshot plus a fold of the log after the snapshot's offset.
Every method keeps it, on one thread (the writer).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from eventstore._config import FoldConfig
from eventstore._errors import CorruptSnapshotError, StoreFullError
from eventstore.fold import project
from eventstore.log import AppendResult, EventLog, Positions, Synchronous
from eventstore.schema import Event, EventDecoder, Rejection, UserForgotten
from eventstore.snapshots import SnapshotStore
from eventstore.state import State

__all__ = ["IngestResult", "Store"]

LOG_FILE: Final = "events.db"
SNAPSHOT_DIR: Final = "snapshots"
#: After an automatic snapshot failed (disk full, read-only), the next one waits this long.
SNAPSHOT_RETRY_S: Final = 10.0
#: Free space `Store.recover` wants before it lets appends resume after a storage error.
RESUME_FREE_BYTES: Final = 4 << 20
_log = structlog.get_logger("eventstore.store")


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What :meth:`Store.ingest` did with one raw input."""

    appended: AppendResult
    rejected: list[Rejection]


class Store:
    """
    Open (or create) the store in ``directory`` and restore the state.

    Restore = the newest valid snapshot + replay of the log after its offset; users
    with a tombstone are dropped from a restored snapshot (an erasure interrupted
    between deleting events and rewriting snapshots is completed here).

    Args:
        directory: holds ``events.db`` and ``snapshots/``.
        fold: the fold configuration.
        synchronous: SQLite durability level (``FULL``: acknowledged means on disk).
        snapshot_every: write a snapshot after this many appended events (0: never
            automatically).
        keep_snapshots: how many snapshot files to keep.
        decoder: the decoder :meth:`ingest` uses (its limits and clock).
    """

    def __init__(self, directory: str | os.PathLike[str], *, fold: FoldConfig | None = None,
                 synchronous: Synchronous = "FULL", snapshot_every: int = 100_000,
                 keep_snapshots: int = 2, decoder: EventDecoder | None = None) -> None:
        self.directory = Path(directory)
        self.decoder = decoder or EventDecoder()
        self.config = fold or FoldConfig()
        self.log = EventLog(self.directory / LOG_FILE, synchronous=synchronous)
        self.snapshots = SnapshotStore(self.directory / SNAPSHOT_DIR, keep=keep_snapshots)
        self.snapshot_every = snapshot_every
        self._closed = False
        self.state = self._restore()
        self.log.prepare_writes()
        self._since_snapshot = 0
        self._snapshot_failed_at: float | None = None  # monotonic time of the last failure

    def _restore(self) -> State:
        started = time.perf_counter()
        state = self.snapshots.newest_valid(self.config)
        from_snapshot = state is not None
        if state is None:
            state = State(self.config)
        erased = [u for u in state.user_index if self.log.is_forgotten(u)]
        if erased:
            # An erasure was interrupted after the log forgot these users but before
            # the snapshots were rewritten: finish it.
            state = self._without(state, erased)
        covered = state.offset
        replayed = self.replay(state)
        if erased:
            self.snapshots.write(state)
            self.snapshots.drop_all_but_newest()
        self._warn_if_incomplete(covered, from_snapshot=from_snapshot)
        _log.info("state_restored", from_snapshot=from_snapshot, offset=state.offset,
                  replayed=replayed, users=len(state.user_index), items=state.n_items,
                  seconds=round(time.perf_counter() - started, 3))
        return state

    def _warn_if_incomplete(self, covered: int, *, from_snapshot: bool) -> None:
        """
        Warn when retention deleted events the restored snapshot does not cover.

        Retention deletes only what every kept snapshot covers, so this happens only
        when the snapshots that covered them are gone or damaged (or were made under
        another ``[fold]``): the state then holds only what the log still has after
        ``covered``. The store opens anyway
        (the alternative, refusing to start, would not bring the events back); writing
        new snapshots makes the restored state the reference from then on.
        """
        mark = self.log.truncated_before
        if mark is not None and covered < mark - 1:
            _log.warning("state_incomplete", from_snapshot=from_snapshot, snapshot_offset=covered,
                         truncated_before=mark,
                         reason="retention deleted events that no valid snapshot covers: "
                                "the state holds only the events the log kept")

    def _without(self, state: State, users: Iterable[str]) -> State:
        """
        ``state`` with ``users`` erased.

        While the log is complete the answer is a fresh fold of it (the users' events
        are already deleted there), so the state stays exactly a cache of the log:
        the items' counters and popularity no longer include the users either. Once
        retention has deleted old events, the log alone cannot rebuild the state; the
        users' rows are dropped and their anonymous share of item statistics stays.
        """
        if self.log.is_complete:
            fresh = State(self.config)
            self.replay(fresh)
            # the erased events may have been the newest: the state still covers them
            fresh.offset = max(fresh.offset, state.offset)
            return fresh
        for user in users:
            state.drop_user(user)
        return state

    def replay(self, state: State) -> int:
        """Fold every logged event after ``state.offset`` into ``state``; returns how many."""
        total = 0
        for offsets, events in self.log.read_chunks(after=state.offset, index_ids=True):
            project(state, events)
            state.offset = offsets[-1]
            total += len(events)
        return total

    def ingest(self, data: bytes, *, source: str, positions: Positions | None = None,
               ingest_ts: float | None = None) -> IngestResult:
        """
        Decode raw JSON (one event or a list), keep what is invalid in the dead-letter
        table with its reason, and append the valid events with ``positions``.

        The dead letters are committed before the events and positions, so a crash
        in between can only repeat a dead letter, never lose one.
        """
        decoded = self.decoder.decode(data)
        if decoded.rejected:
            self.log.dead_letters([(r.raw, str(r.error)) for r in decoded.rejected],
                                  source=source)
        return IngestResult(self.append(decoded.events, positions=positions,
                                        ingest_ts=ingest_ts), decoded.rejected)

    def append(self, events: Sequence[Event], *, positions: Positions | None = None,
               ingest_ts: float | None = None) -> AppendResult:
        """
        Make ``events`` durable (one transaction with ``positions``), then fold them.

        ``forget`` events are carried out in their place in the sequence (see
        :meth:`forget`) and reported as accepted without an offset.
        """
        if not any(isinstance(e, UserForgotten) for e in events):
            return self._append(events, positions, ingest_ts)
        status: list[str] = []
        offsets: list[int | None] = []
        appended: list[tuple[int, Event]] = []
        segments = _split_at_forgets(events)
        for k, segment in enumerate(segments):
            if isinstance(segment, UserForgotten):
                self.forget(segment.user)
                status.append("accepted")
                offsets.append(None)
                continue
            last = k == len(segments) - 1
            part = self._append(segment, positions if last else None, ingest_ts)
            status += part.status
            offsets += part.offsets
            appended += part.appended
        if positions and isinstance(segments[-1], UserForgotten):
            self._append([], positions, ingest_ts)
        return AppendResult(status, offsets, appended)

    def _append(self, events: Sequence[Event], positions: Positions | None,
                ingest_ts: float | None) -> AppendResult:
        result = self.log.append(events, positions=positions, ingest_ts=ingest_ts)
        if result.appended:
            project(self.state, (event for _, event in result.appended))
            self.state.offset = result.appended[-1][0]
            self._since_snapshot += len(result.appended)
            if self.snapshot_every and self._since_snapshot >= self.snapshot_every:
                self.snapshot_if_possible()
        return result

    def snapshot(self) -> Path:
        """Write a snapshot of the current state now."""
        path = self.snapshots.write(self.state)
        self._since_snapshot = 0
        self._snapshot_failed_at = None
        return path

    def snapshot_if_possible(self) -> Path | None:
        """
        An automatic snapshot: written now, or None when it failed or was held back.

        A snapshot is only a shortcut for restoring (the log has every event), so one
        that cannot be written (disk full, read-only file system) is logged and
        skipped, never raised: the append that triggered it has committed and must
        be acknowledged. The half-written temporary file is removed
        (`SnapshotStore.write`), the snapshots already there stay as they were, and
        the next attempt waits `SNAPSHOT_RETRY_S`, so a full disk is not hit with a
        state-sized write after every append.
        """
        failed_at = self._snapshot_failed_at
        if failed_at is not None and time.monotonic() - failed_at < SNAPSHOT_RETRY_S:
            return None
        try:
            return self.snapshot()
        except OSError as e:
            self._snapshot_failed_at = time.monotonic()
            _log.warning("snapshot_failed", error=f"{type(e).__name__}: {e.strerror or e}",
                         offset=self.state.offset, retry_s=SNAPSHOT_RETRY_S)
            return None

    def recover(self) -> int:
        """
        After a storage error: make the log writable again, or raise.

        First the file system must have `RESUME_FREE_BYTES` free: a disk that filled
        up has room for a small write long before it has room for the next group, and
        resuming at the first free page would only fail again (and again). Then the
        log is reopened when an I/O error latched it (`EventLog.reopen`), and one small
        durable write is made (`EventLog.check_writable`). Last, anything the log
        holds beyond the state is folded in: a commit that reported an I/O error may
        have reached the file all the same, and the state must stay a fold of the
        log. Such events were never acknowledged (their append failed); a retry
        finds them as duplicates. Runs on the writer thread.

        Returns:
            How many events were folded in that way (normally 0).

        Raises:
            StoreFullError: the log still cannot be written.
        """
        free = shutil.disk_usage(self.directory).free
        if free < RESUME_FREE_BYTES:
            raise StoreFullError(str(self.log.path), f"SQLITE_FULL: {free} bytes free, "
                                 f"appends resume at {RESUME_FREE_BYTES}")
        if self.log.failed is not None:
            self.log.reopen()
            self.log.prepare_writes()
        self.log.check_writable()
        caught_up = self.replay(self.state)
        if caught_up:
            self._since_snapshot += caught_up
            _log.warning("state_caught_up", events=caught_up, offset=self.state.offset,
                         reason="a commit that reported a storage error reached the log")
        return caught_up

    def retain(self, ingested_before: float) -> int:
        """
        Retention: delete the events appended before ``ingested_before`` that a snapshot covers.

        First a snapshot of the current state is written if the newest one is older.
        Then the events ingested before ``ingested_before`` that the snapshots cover are
        deleted in one transaction, and so are the dead letters received before it. The
        state keeps what the fold derived from them. Runs on the writer thread.

        Which snapshots "cover" (see :meth:`_retention_cover`): normally the *oldest*
        kept one, so that a restore falling back to it (the newest being damaged)
        still replays a log tail without gaps; the newest only when old events lie
        beyond the oldest (a quiet log), after reading it back.

        Returns:
            How many events were deleted.
        """
        started = time.perf_counter()
        offsets = self.snapshots.offsets()
        wrote = not offsets or offsets[0] < self.state.offset
        if wrote:
            self.snapshot()
        cover = self._retention_cover(ingested_before)
        deleted = self.log.delete_before(cover + 1, ingested_before=ingested_before)
        dead = self.log.delete_dead_letters(ingested_before)
        _log.info("retention_swept", events_deleted=deleted, dead_letters_deleted=dead,
                  covered_offset=cover, snapshot_written=wrote,
                  seconds=round(time.perf_counter() - started, 3))
        return deleted

    def _retention_cover(self, ingested_before: float) -> int:
        """
        The offset up to which retention may delete events.

        The oldest kept snapshot's, so every kept snapshot is a gap-free fallback.
        With steady traffic and an age above the sweep interval that deletes all that
        is old enough: what the oldest does not cover arrived after it was written.
        But when events old enough lie between the oldest and the newest snapshot (no
        new events came to push another snapshot, or the age is below the interval),
        waiting would keep them forever: then the newest snapshot is read back and
        verified, the older ones, which could only restore with a gap, are removed,
        and the newest covers. A newest that fails to verify is written again (the
        next sweep checks it) and the oldest covers this time.
        """
        offsets = self.snapshots.offsets()
        oldest, newest = offsets[-1], offsets[0]
        if oldest == newest or not self.log.has_ingested_before(
                ingested_before, after=oldest, upto=newest):  # fmt: skip
            return oldest
        try:
            self.snapshots.load(self.snapshots.paths()[0], self.config)
        except (CorruptSnapshotError, OSError) as e:
            _log.warning("retention_held_back", reason=str(e), snapshot_offset=newest)
            if newest == self.state.offset:
                self.snapshot()
            return oldest
        self.snapshots.drop_all_but_newest()
        return newest

    def forget(self, user: str) -> int:
        """
        Erase ``user`` from the log, the state and every snapshot, and keep a tombstone.

        Cost: while the log is complete, a replay of the whole log (the state is
        rebuilt without the user, see :meth:`_without`); afterwards, constant.

        Returns:
            How many of the user's events were deleted from the log.
        """
        started = time.perf_counter()
        deleted = self.log.forget(user)
        self.state = self._without(self.state, [user])
        # Old snapshots still hold the user: replace them all by one written now.
        self.snapshot()
        self.snapshots.drop_all_but_newest()
        _log.info("user_forgotten", events_deleted=deleted,
                  seconds=round(time.perf_counter() - started, 3))
        return deleted

    def close(self, *, snapshot: bool = True) -> None:
        """Optionally snapshot, then checkpoint and close the log. Closing twice is a no-op."""
        if self._closed:
            return
        self._closed = True
        if snapshot and self._since_snapshot:
            try:
                self.snapshot()
            except OSError as e:  # the log has every event: the next start replays them
                _log.warning("snapshot_failed", error=f"{type(e).__name__}: {e.strerror or e}",
                             offset=self.state.offset, at="close")
        self.log.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(snapshot=exc[0] is None)


def _split_at_forgets(events: Iterable[Event]) -> list[Sequence[Event] | UserForgotten]:
    """[a, b, forget, c] -> [[a, b], forget, [c]]; empty runs are dropped."""
    out: list[Sequence[Event] | UserForgotten] = []
    run: list[Event] = []
    for event in events:
        if isinstance(event, UserForgotten):
            if run:
                out.append(run)
                run = []
            out.append(event)
        else:
            run.append(event)
    if run:
        out.append(run)
    return out
