"""
The append-only event log: one SQLite file in WAL mode.

One global sequence, ``log_offset INTEGER PRIMARY KEY``; accepted events get
consecutive offsets. Event ids are unique: a duplicate id (already logged, or
repeated within a batch) is a no-op reported as ``"duplicate"``, decided by the
in-memory :class:`~eventstore._ids.IdIndex` (verified against the stored ids) rather
than a UNIQUE index, whose random page writes dominated appends into a large log.
Each :meth:`EventLog.append` is one transaction holding the events *and* the feed
positions they cover, so a consumer that resumes from :meth:`EventLog.positions`
resumes exactly where the durable log ends. ``synchronous=FULL`` by default: a commit
has reached the disk when ``append`` returns, and only then may a caller acknowledge.

sqlite-utils creates the schema and serves inspection; the hot path uses the raw
``sqlite3`` connection (sqlite-utils' ``insert_all`` costs several µs per row in
Python). One thread writes (see :class:`eventstore.committer.GroupCommitter`);
readers open their own connections with :meth:`EventLog.reader`.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import sqlite_utils

from eventstore._checkpoint import Checkpointer, truncate_wal
from eventstore._errors import SchemaVersionError, StoreError, StoreFullError
from eventstore._ids import IdIndex
from eventstore.schema import Event, UserForgotten, decode_stored_many, encode_event

__all__ = [
    "MIGRATIONS",
    "AppendResult",
    "DeadLetter",
    "EventLog",
    "Position",
    "Synchronous",
]

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]
#: A feed position: a Kafka next-offset (int) or an MQTT mark (str).
Position = int | str
#: (feed, partition) -> position, e.g. ``("kafka:events", "3") -> 1042``.
Positions = Mapping[tuple[str, str], Position]

ACCEPTED: Final = "accepted"
DUPLICATE: Final = "duplicate"
ERASED: Final = "erased"
_MAX_DEAD_LETTER_BYTES: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class AppendResult:
    """
    What one append did, per input event and in input order.

    ``status[k]`` is ``"accepted"`` (then ``offsets[k]`` is its log offset),
    ``"duplicate"`` (the id was already in the log or earlier in the batch) or
    ``"erased"`` (the user was forgotten; a tombstone keeps them out).
    """

    status: list[str]
    offsets: list[int | None]
    appended: list[tuple[int, Event]] = field(repr=False)

    @property
    def accepted(self) -> int:
        """How many events were appended."""
        return len(self.appended)

    @property
    def duplicates(self) -> int:
        """How many events were duplicates."""
        return self.status.count(DUPLICATE)

    @property
    def erased(self) -> int:
        """How many events belonged to forgotten users."""
        return self.status.count(ERASED)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A rejected raw input, kept for inspection."""

    seq: int
    received_ts: float
    source: str
    reason: str
    size: int
    raw: bytes


def _checked_position(position: Position) -> Position:
    if isinstance(position, bool) or not isinstance(position, int | str):
        msg = f"positions: expected an int (Kafka offset) or a str (mark), got {type(position).__name__}"
        raise TypeError(msg)
    return position


# --- schema and migrations --------------------------------------------------------

def _create_v1(db: sqlite_utils.Database) -> None:
    db["events"].create(
        {"log_offset": int, "id": str, "type": str, "user": str, "ts": float,
         "ingest_ts": float, "body": bytes},
        pk="log_offset", not_null={"id", "type", "ts", "ingest_ts", "body"},
    )
    # UNIQUE on id was the idempotency check in version 1; version 2 drops it.
    db["events"].create_index(["id"], unique=True, index_name="events_id")
    db["feed_positions"].create(
        # position is declared BLOB, which in SQLite means "no affinity": an int stays an
        # int and a str a str (Kafka offsets vs MQTT marks), with no guessing on read.
        {"feed": str, "partition": str, "position": bytes, "log_offset": int,
         "updated_ts": float},
        pk=("feed", "partition"),
    )
    db["dead_letters"].create(
        {"seq": int, "received_ts": float, "source": str, "reason": str, "size": int,
         "raw": bytes},
        pk="seq",
    )
    db["tombstones"].create({"user_hash": bytes, "forgotten_ts": float}, pk="user_hash")
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["meta"].insert_all([
        {"key": "next_offset", "value": "1"},
        {"key": "tombstone_salt", "value": os.urandom(16).hex()},
    ])


def _drop_id_index_v2(db: sqlite_utils.Database) -> None:
    # Ids are checked by the in-memory IdIndex (see eventstore._ids for why), and
    # erasures, being rare, scan for the user: the events table needs no index.
    db.execute("DROP INDEX IF EXISTS events_id")


def _drop_redundant_columns_v3(db: sqlite_utils.Database) -> None:
    # type and ts are in the body; binding them cost ~1 µs of every appended event.
    db.execute("ALTER TABLE events DROP COLUMN type")
    db.execute("ALTER TABLE events DROP COLUMN ts")


#: Named schema migrations, applied in order, each in its own transaction; the
#: file's ``PRAGMA user_version`` is the number applied. Append, never edit.
MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("create event log", _create_v1),
    ("drop the UNIQUE id index: ids are checked in memory", _drop_id_index_v2),
    ("drop the type and ts columns: the body holds them", _drop_redundant_columns_v3),
]


def _migrate(conn: sqlite3.Connection, path: str,
             migrations: Sequence[tuple[str, Callable[[sqlite_utils.Database], None]]]) -> int:
    db = sqlite_utils.Database(conn)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(migrations):
        raise SchemaVersionError(path, version, len(migrations))
    for number, (_name, migrate) in enumerate(migrations[version:], start=version + 1):
        with _transaction(conn):
            migrate(db)
            conn.execute(f"PRAGMA user_version = {number:d}")
    return len(migrations)


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """
    BEGIN IMMEDIATE ... COMMIT; roll back on any exception, KeyboardInterrupt included.

    SQLite may already have rolled back by itself (SQLITE_FULL, SQLITE_IOERR): then
    there is nothing to roll back, and the original error is the one that matters.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with suppress(sqlite3.Error):  # never mask the error that got us here
                conn.execute("ROLLBACK")
        raise


# --- the log -------------------------------------------------------------------------

class EventLog:
    """
    The append-only log in one SQLite file.

    Args:
        path: the database file (created with its directory when missing).
        synchronous: SQLite ``synchronous`` level; ``FULL`` makes every commit durable
            before :meth:`append` returns. ``NORMAL`` in WAL mode may lose the last
            commits on power loss: do not acknowledge on it.
        migrations: the migration list (tests pass a longer one).
    """

    def __init__(self, path: str | os.PathLike[str], *, synchronous: Synchronous = "FULL",
                 migrations: Sequence[tuple[str, Callable[[sqlite_utils.Database], None]]]
                 = MIGRATIONS) -> None:
        if synchronous not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            msg = f"synchronous: expected OFF, NORMAL, FULL or EXTRA, got {synchronous!r}"
            raise ValueError(msg)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._synchronous = synchronous
        self._conn = self._connect(self.path)
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self.schema_version = _migrate(self._conn, str(self.path), migrations)
        meta = dict(self._conn.execute("SELECT key, value FROM meta"))
        self._next = int(meta["next_offset"])
        self._salt = bytes.fromhex(meta["tombstone_salt"])
        self._tombstones = {row[0] for row in self._conn.execute("SELECT user_hash FROM tombstones")}
        self._failed: str | None = None
        self._ids: IdIndex | None = None  # built on the first append (readers never need it)
        self._checkpointer: Checkpointer | None = None  # started by the first write

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # erased rows are overwritten with zeros, not just unlinked (see forget)
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA cache_size=-65536")
        # Checkpoints run on a background thread (eventstore._checkpoint); the inline
        # automatic one stays as a safety net, at 400 MB of WAL instead of 4 MB.
        conn.execute("PRAGMA wal_autocheckpoint=100000")
        return conn

    def reader(self) -> EventLog:
        """A second handle on the same file for reading from another thread."""
        return EventLog(self.path, synchronous="NORMAL")

    @property
    def db(self) -> sqlite_utils.Database:
        """sqlite-utils view of the file, for inspection (not for the hot path)."""
        return sqlite_utils.Database(self._conn)

    @property
    def next_offset(self) -> int:
        """The offset the next appended event will get."""
        return self._next

    def close(self) -> None:
        """Stop the checkpointer, checkpoint the WAL into the main file, and close."""
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        with suppress(sqlite3.Error):  # closing must not fail; the WAL is replayed on open
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()

    def prepare_writes(self) -> None:
        """
        Build the id index now (about 0.6 s per million logged events here) instead of
        inside the first append, where it would be one slow acknowledgement.
        """
        self._id_index()

    def _started(self) -> None:
        """Start the background checkpointer with the first write."""
        if self._checkpointer is None:
            self._checkpointer = Checkpointer(self.path)

    # --- writing ------------------------------------------------------------------------

    def append(self, events: Sequence[Event], *, positions: Positions | None = None,
               ingest_ts: float | None = None) -> AppendResult:
        """
        Append ``events`` and record ``positions`` in one durable transaction.

        Duplicate ids (already logged, or repeated in ``events``) are no-ops reported
        as ``"duplicate"``; events of forgotten users are refused as ``"erased"``.
        Accepted events get consecutive offsets.

        Raises:
            StoreFullError: the disk is full, read-only or failing; nothing was
                appended and no position moved.
            ValueError: a ``forget`` event was passed (use :meth:`forget`).
        """
        self._check_usable()
        if any(type(e) is UserForgotten for e in events):
            msg = "type: forget events are not appended; call EventLog.forget"
            raise ValueError(msg)
        now = time.time() if ingest_ts is None else ingest_ts
        off = self._next
        index = self._id_index()
        ids = [e.id for e in events]
        erased = self._erased(events) if self._tombstones else set()
        logged = index.logged(ids)
        if not erased and not logged and len(set(ids)) == len(ids):  # the common case
            accepted = list(enumerate(events, start=off))
            status = [ACCEPTED] * len(events)
            offsets: list[int | None] = list(range(off, off + len(events)))
        else:
            accepted, status, offsets = self._sort_out(events, erased, logged, off)
        encode = encode_event
        try:  # interactions and impressions all have a user; item events do not
            rows = [(o, e.id, e.user, now, encode(e)) for o, e in accepted]  # type: ignore[attr-defined]
        except AttributeError:
            rows = [(o, e.id, getattr(e, "user", None), now, encode(e)) for o, e in accepted]
        next_offset = off + len(accepted)
        self._write(rows, next_offset, positions or {}, now)
        self._next = next_offset
        index.add((e.id, o) for o, e in accepted)
        return AppendResult(status, offsets, accepted)

    @staticmethod
    def _sort_out(events: Sequence[Event], erased: set[int], logged: set[int], off: int,
                  ) -> tuple[list[tuple[int, Event]], list[str], list[int | None]]:
        """Status and offset of each event when some are erased or duplicates."""
        accepted: list[tuple[int, Event]] = []
        status: list[str] = []
        offsets: list[int | None] = []
        in_batch: set[str] = set()
        for k, event in enumerate(events):
            if k in erased:
                status.append(ERASED)
                offsets.append(None)
            elif k in logged or event.id in in_batch:
                status.append(DUPLICATE)
                offsets.append(None)
            else:
                in_batch.add(event.id)
                accepted.append((off, event))
                status.append(ACCEPTED)
                offsets.append(off)
                off += 1
        return accepted, status, offsets

    def _erased(self, events: Sequence[Event]) -> set[int]:
        """Positions of events whose user has a tombstone."""
        users = {getattr(e, "user", None) for e in events} - {None}
        gone = {u for u in users if self._user_hash(u) in self._tombstones}  # type: ignore[arg-type]
        if not gone:
            return set()
        return {k for k, e in enumerate(events) if getattr(e, "user", None) in gone}

    def _id_index(self) -> IdIndex:
        """The in-memory id index, built from the log on first use after opening."""
        if self._ids is None:
            hashes: list[int] = []
            offsets: list[int] = []
            cursor = self._conn.execute("SELECT id, log_offset FROM events")
            while rows := cursor.fetchmany(1 << 16):
                hashes += [hash(i) for i, _ in rows]
                offsets += [o for _, o in rows]
            self._ids = IdIndex.from_log(self._ids_at, hashes, offsets)
        return self._ids

    def _ids_at(self, offsets: list[int]) -> dict[int, str]:
        found: dict[int, str] = {}
        for k in range(0, len(offsets), 900):
            chunk = offsets[k:k + 900]
            marks = ",".join("?" * len(chunk))
            found.update(self._conn.execute(
                f"SELECT log_offset, id FROM events WHERE log_offset IN ({marks})",  # noqa: S608
                chunk))
        return found

    def _write(self, rows: list[tuple[Any, ...]], next_offset: int, positions: Positions,
               now: float) -> None:
        """One transaction: the rows, the high-water mark, the positions."""
        if not rows and not positions:
            return
        self._started()
        try:
            with _transaction(self._conn):
                self._conn.executemany(
                    "INSERT INTO events (log_offset, id, user, ingest_ts, body) VALUES (?,?,?,?,?)",
                    rows)
                self._conn.execute("UPDATE meta SET value=? WHERE key='next_offset'",
                                   (str(next_offset),))
                self._conn.executemany(
                    "INSERT OR REPLACE INTO feed_positions VALUES (?,?,?,?,?)",
                    [(feed, part, _checked_position(pos), next_offset - 1, now)
                     for (feed, part), pos in positions.items()])
        except sqlite3.Error as e:
            raise self._translate(e) from e

    def _translate(self, error: sqlite3.Error) -> StoreError:
        code = getattr(error, "sqlite_errorcode", 0) & 0xFF
        if code == sqlite3.SQLITE_IOERR:
            # After a failed fsync the page cache may not match the disk: never retry
            # and carry on (the "fsyncgate" lesson). Refuse writes until reopened.
            self._failed = f"I/O error ({error}); reopen the log to replay and continue"
        if code in {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY,
                    sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM}:
            return StoreFullError(str(self.path), getattr(error, "sqlite_errorname", str(error)))
        return StoreError(f"{self.path}: {error}")

    def _check_usable(self) -> None:
        if self._failed:
            raise StoreFullError(str(self.path), self._failed)

    @property
    def failed(self) -> str | None:
        """Why writes are refused until :meth:`reopen` (an I/O error), or None."""
        return self._failed

    def reopen(self) -> None:
        """
        Replace the connection by a new one on the same file, after an I/O error.

        The new connection reads the file afresh (the next offset, the tombstones, and
        the id index on the next append). Then the whole WAL is checkpointed into the
        database file, fsynced, and truncated: pages the failed connection wrote whose
        write-back failed are written again (a failed fsync may have left them clean
        in the page cache, the "fsyncgate" trap), so nothing appended afterwards rests
        on them. A commit that reported the error may still be in the log: the caller
        folds whatever lies beyond its state (`Store.recover`).

        Raises:
            StoreFullError: the file still cannot be opened or written; the log stays
                refused and ``reopen`` may be called again.
        """
        try:
            conn = self._connect(self.path)
        except sqlite3.Error as e:
            raise self._translate(e) from e
        try:
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            tombstones = {row[0] for row in conn.execute("SELECT user_hash FROM tombstones")}
        except sqlite3.Error as e:
            conn.close()
            raise self._translate(e) from e
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        with suppress(sqlite3.Error):
            self._conn.close()
        self._conn = conn
        self._next = int(meta["next_offset"])
        self._tombstones = tombstones
        self._ids = None
        try:
            truncate_wal(conn, None)
        except sqlite3.Error as e:
            raise self._translate(e) from e
        self._failed = None

    def check_writable(self) -> None:
        """
        Whether the log can be written again after a storage error: raise if not.

        One small durable transaction writes the ``write_probe_ts`` meta key.

        Raises:
            StoreFullError: it cannot.
        """
        self._check_usable()
        self._started()
        try:
            with _transaction(self._conn):
                self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('write_probe_ts', ?)",
                                   (repr(time.time()),))
        except sqlite3.Error as e:
            raise self._translate(e) from e

    def dead_letter(self, raw: bytes, reason: str, *, source: str) -> None:
        """Keep a rejected input (at most its first MiB) with the reason it was rejected."""
        self.dead_letters([(raw, reason)], source=source)

    def dead_letters(self, rejected: Sequence[tuple[bytes, str]], *, source: str) -> None:
        """Keep several rejected inputs in one transaction."""
        if not rejected:
            return
        self._check_usable()
        self._started()
        now = time.time()
        rows = [(now, source, reason, len(raw), raw[:_MAX_DEAD_LETTER_BYTES])
                for raw, reason in rejected]
        try:
            with _transaction(self._conn):
                self._conn.executemany(
                    "INSERT INTO dead_letters (received_ts, source, reason, size, raw) "
                    "VALUES (?,?,?,?,?)", rows)
        except sqlite3.Error as e:
            raise self._translate(e) from e

    # --- erasure ------------------------------------------------------------------------

    def _user_hash(self, user: str) -> bytes:
        return hashlib.sha256(self._salt + user.encode()).digest()

    def is_forgotten(self, user: str) -> bool:
        """Whether ``user`` has a tombstone."""
        return bool(self._tombstones) and self._user_hash(user) in self._tombstones

    def forget(self, user: str) -> int:
        """
        Erase ``user``: delete their events and any dead letter that mentions their id,
        keep a tombstone (a salted SHA-256 of the id, never the id), and checkpoint
        the WAL so no old page image survives. With ``secure_delete`` the freed
        bytes are overwritten with zeros.

        Returns:
            How many events were deleted.
        """
        self._check_usable()
        digest = self._user_hash(user)
        try:
            with _transaction(self._conn):
                deleted = self._conn.execute("DELETE FROM events WHERE user = ?", (user,)).rowcount
                self._conn.execute("DELETE FROM dead_letters WHERE instr(raw, ?) > 0",
                                   (user.encode(),))
                self._conn.execute("INSERT OR IGNORE INTO tombstones VALUES (?, ?)",
                                   (digest, time.time()))
            truncate_wal(self._conn, self._checkpointer.lock if self._checkpointer else None)
        except sqlite3.Error as e:
            raise self._translate(e) from e
        self._tombstones.add(digest)
        # The id index still holds the deleted ids' hashes; that is harmless, since a
        # hash hit is verified against the log, and they are gone at the next open.
        return deleted

    def delete_before(self, offset: int, *, ingested_before: float | None = None) -> int:
        """
        Delete events with offsets below ``offset`` (retention, once a snapshot covers them).

        One transaction; with ``secure_delete`` the freed bytes are zeroed, and the WAL
        is truncated afterwards so no page image of a deleted event survives. When any
        event was deleted, the ``truncated_before`` mark is raised to ``offset`` (it never
        goes down): from then on the log alone no longer rebuilds the state
        (`is_complete`).

        Args:
            offset: events at this offset and above are kept.
            ingested_before: when given, only the events below ``offset`` appended
                before this time (their ``ingest_ts``) are deleted.

        Returns:
            How many events were deleted.
        """
        self._check_usable()
        where, args = "log_offset < ?", [offset]
        if ingested_before is not None:
            where, args = where + " AND ingest_ts < ?", [*args, ingested_before]
        try:
            with _transaction(self._conn):
                n = self._conn.execute(f"DELETE FROM events WHERE {where}", args).rowcount  # noqa: S608
                if n:
                    mark = max(offset, self.truncated_before or 0)
                    self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('truncated_before', ?)",
                                       (str(mark),))
            if n:
                self._truncate_wal()
                self._forget_deleted_ids()
        except sqlite3.Error as e:
            raise self._translate(e) from e
        return n

    def _forget_deleted_ids(self) -> None:
        """
        Shrink the id index after a deletion.

        Every offset below the oldest kept event is gone. With ``ingested_before``, a
        kept older event keeps its entry, and an entry of a deleted event above it
        stays until a later sweep: a stale entry is harmless, since a hit is verified
        against the stored ids.
        """
        if self._ids is None:
            return
        row = self._conn.execute("SELECT MIN(log_offset) FROM events").fetchone()
        oldest = self._next if row is None or row[0] is None else int(row[0])
        self._ids.forget_below(oldest)

    def has_ingested_before(self, ingested_before: float, *, after: int, upto: int) -> bool:
        """Whether an event with an offset in ``(after, upto]`` was appended before that time."""
        row = self._conn.execute(
            "SELECT 1 FROM events WHERE log_offset > ? AND log_offset <= ? AND ingest_ts < ? "
            "LIMIT 1", (after, upto, ingested_before)).fetchone()
        return row is not None

    def delete_dead_letters(self, received_before: float) -> int:
        """
        Delete the dead letters received before ``received_before``; returns how many.

        Retention: they hold raw inputs. The WAL is truncated afterwards.
        """
        self._check_usable()
        try:
            with _transaction(self._conn):
                n = self._conn.execute("DELETE FROM dead_letters WHERE received_ts < ?",
                                       (received_before,)).rowcount
            if n:
                self._truncate_wal()
        except sqlite3.Error as e:
            raise self._translate(e) from e
        return n

    def _truncate_wal(self) -> None:
        truncate_wal(self._conn, self._checkpointer.lock if self._checkpointer else None)

    @property
    def truncated_before(self) -> int | None:
        """
        The retention mark: events below this offset may have been deleted (None: never).

        Events below it that are still in the log were kept on purpose (too young).
        """
        value = self.meta("truncated_before")
        return None if value is None else int(value)

    def meta(self, key: str) -> str | None:
        """The value stored under ``key`` in the ``meta`` table, or None."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """
        Store ``value`` under ``key`` in the ``meta`` table, durably.

        For facts about the log that its users keep with it (the daemon records how
        user ids were mapped); the log's own keys are not for callers to change.
        """
        if key in {"next_offset", "tombstone_salt", "truncated_before", "write_probe_ts"}:
            msg = f"meta: {key} belongs to the log itself"
            raise ValueError(msg)
        self._check_usable()
        try:
            with _transaction(self._conn):
                self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
        except sqlite3.Error as e:
            raise self._translate(e) from e

    @property
    def indexed_ids(self) -> int:
        """Entries of the in-memory id index (0 until the first append builds it)."""
        return 0 if self._ids is None else len(self._ids)

    @property
    def is_complete(self) -> bool:
        """Whether the log still holds every event ever appended (retention deleted none)."""
        row = self._conn.execute("SELECT 1 FROM meta WHERE key = 'truncated_before'").fetchone()
        return row is None

    # --- reading ------------------------------------------------------------------------

    def read(self, *, after: int = 0, limit: int | None = None) -> Iterator[tuple[int, Event]]:
        """(offset, event) for every event with an offset above ``after``, in order."""
        for offsets, events in self.read_chunks(after=after, limit=limit):
            yield from zip(offsets, events, strict=True)

    def read_chunks(self, *, after: int = 0, limit: int | None = None, size: int = 4096,
                    index_ids: bool = False) -> Iterator[tuple[list[int], list[Event]]]:
        """
        The events above ``after`` in chunks of up to ``size``: (offsets, events).

        Each chunk is decoded in one msgspec call; replay uses this directly. With
        ``index_ids``, a read of the whole log (``after=0``, no limit) read to its end
        also builds the id index, sparing :meth:`prepare_writes` a second scan.
        """
        sql = "SELECT log_offset, body FROM events WHERE log_offset > ? ORDER BY log_offset"
        params: tuple[int, ...] = (after,)
        if limit is not None:
            sql += " LIMIT ?"
            params = (after, limit)
        building = index_ids and self._ids is None and after == 0 and limit is None
        hashes: list[int] = []
        all_offsets: list[int] = []
        cursor = self._conn.execute(sql, params)
        while rows := cursor.fetchmany(size):
            offsets, bodies = zip(*rows, strict=True)
            events = decode_stored_many(list(bodies))
            if building:
                hashes += [hash(e.id) for e in events]
                all_offsets += offsets
            yield list(offsets), events
        if building and self._ids is None:
            self._ids = IdIndex.from_log(self._ids_at, hashes, all_offsets)

    def count(self) -> int:
        """Events in the log."""
        return self._conn.execute("SELECT count(*) FROM events").fetchone()[0]

    def ids(self) -> list[str]:
        """Every event id in offset order (for tests and audits)."""
        return [r[0] for r in self._conn.execute("SELECT id FROM events ORDER BY log_offset")]

    def positions(self, feed: str | None = None) -> dict[tuple[str, str], Position]:
        """The stored feed positions, optionally of one feed."""
        sql = "SELECT feed, partition, position FROM feed_positions"
        rows = self._conn.execute(sql + " WHERE feed = ?", (feed,)) if feed else self._conn.execute(sql)
        return {(f, p): v for f, p, v in rows}

    def read_dead_letters(self, *, limit: int = 100) -> list[DeadLetter]:
        """The most recent dead letters, newest first."""
        rows = self._conn.execute(
            "SELECT seq, received_ts, source, reason, size, raw FROM dead_letters "
            "ORDER BY seq DESC LIMIT ?", (limit,))
        return [DeadLetter(*row) for row in rows]

    def stats(self) -> dict[str, int]:
        """Row counts per table and the file sizes (for ``rerankd log``)."""
        db = self.db
        out = {name: db[name].count for name in
               ("events", "feed_positions", "dead_letters", "tombstones")}
        out["next_offset"] = self._next
        out["schema_version"] = self.schema_version
        for suffix in ("", "-wal"):
            f = Path(f"{self.path}{suffix}")
            out[f"bytes{suffix or '_db'}"] = f.stat().st_size if f.exists() else 0
        return out
