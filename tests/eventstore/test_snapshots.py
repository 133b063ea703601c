"""Snapshots: atomic files, pruning, and restore = newest valid snapshot + replay of the tail."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from structlog.testing import capture_logs

from eventstore import Event, FoldConfig, SnapshotStore, State, Store, project

if TYPE_CHECKING:
    from pathlib import Path

MakeEvent = Callable[..., Event]
SMALL = FoldConfig(seq_len=4, categories_per_user=2, purchases_per_user=2)


def batch(make_event: MakeEvent, start: int, n: int = 50) -> list[Event]:
    """``n`` mixed events with ids from ``start``: item metadata, interactions, impressions."""
    kinds = ["view", "click", "cart", "purchase", "rating", "like", "dislike", "skip"]
    out: list[Event] = []
    for k in range(start, start + n):
        if k % 10 == 0:
            out.append(make_event("item", k, item=f"i-{k % 7}",
                                  fields={"category": f"c-{k % 3}", "price": k / 2}))
        elif k % 10 == 5:
            out.append(make_event("impression", k, user=f"u-{k % 4}",
                                  items=[f"i-{k % 7}", f"i-{(k + 1) % 7}"]))
        else:
            out.append(make_event(kinds[k % 8], k, user=f"u-{k % 4}", item=f"i-{k % 7}",
                                  ts=1764250000.0 + (k * 37) % 500))
    return out


def fresh_fold(store: Store) -> bytes:
    """The state a fold of the whole log from scratch gives, as bytes."""
    logged = list(store.log.read())
    state = project(State(store.config), (e for _, e in logged))
    state.offset = logged[-1][0] if logged else 0
    return state.to_bytes()


def test_snapshot_file_is_named_by_its_offset(store: Store, make_event: MakeEvent) -> None:
    """A snapshot's file name holds the offset it covers, zero-padded, and no .tmp is left."""
    store.append(batch(make_event, 0, 30))

    path = store.snapshot()

    assert (f"snapshot-{store.state.offset:020d}.snap", [path]) == (
        path.name, sorted(store.snapshots.directory.iterdir()))


def test_only_the_newest_keep_snapshots_remain(tmp_path: Path) -> None:
    """After each write, only the ``keep`` newest snapshots are left; paths() is newest first."""
    snaps = SnapshotStore(tmp_path / "snaps", keep=2)
    state = State()
    for offset in (5, 50, 7, 300):
        state.offset = offset
        snaps.write(state)

    assert (["snapshot-00000000000000000300.snap", "snapshot-00000000000000000050.snap"], []) == (
        [p.name for p in snaps.paths()], list(snaps.directory.glob("*.tmp")))


def test_stale_tmp_files_are_cleaned_up(tmp_path: Path) -> None:
    """A temporary file left by a crash mid-write is removed by the next write, never loaded."""
    snaps = SnapshotStore(tmp_path / "snaps")
    (snaps.directory / ".snapshot-00000000000000000009.snap.tmp").write_bytes(b"half a file")

    snaps.write(State())

    assert ["snapshot-00000000000000000000.snap"] == sorted(
        p.name for p in snaps.directory.iterdir())


def test_snapshot_round_trips_the_state(store: Store, make_event: MakeEvent) -> None:
    """Loading a snapshot gives back the state it was written from, byte for byte."""
    store.append(batch(make_event, 0, 80))

    path = store.snapshot()

    assert store.state.to_bytes() == store.snapshots.load(path, store.config).to_bytes()


def test_restore_is_snapshot_plus_tail(store_dir: Path, make_event: MakeEvent) -> None:
    """Reopening = newest snapshot + replay of the events after it = a fresh fold of the log."""
    store = Store(store_dir, fold=SMALL, snapshot_every=0)
    store.append(batch(make_event, 0, 120))
    store.snapshot()
    store.append(batch(make_event, 120, 45))
    store.close(snapshot=False)

    with capture_logs() as logs:
        reopened = Store(store_dir, fold=SMALL, snapshot_every=0)
    restored = reopened.state.to_bytes()
    expected = fresh_fold(reopened)
    reopened.close(snapshot=False)

    assert ([(True, 45)], expected) == (
        [(e["from_snapshot"], e["replayed"]) for e in logs if e["event"] == "state_restored"],
        restored)


def test_automatic_snapshots_every_n_events(store_dir: Path, make_event: MakeEvent) -> None:
    """snapshot_every=N writes a snapshot once N events were appended since the last one."""
    store = Store(store_dir, snapshot_every=40, keep_snapshots=10)
    for start in range(0, 100, 25):
        store.append(batch(make_event, start, 25))
    offsets = [int(p.name[9:29]) for p in store.snapshots.paths()]
    store.close(snapshot=False)

    assert [100, 50] == offsets  # after 50 events, then 50 more (25 + 25)


def damage_flip(path: Path, _: FoldConfig) -> None:
    """Flip one byte in the middle of the file."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def damage_truncate(path: Path, _: FoldConfig) -> None:
    """Cut the file to two thirds (a partial write)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def damage_other_config(path: Path, config: FoldConfig) -> None:
    """Replace the file by a valid snapshot of the same offset made under another config."""
    other = FoldConfig(seq_len=config.seq_len + 1)
    snaps = SnapshotStore(path.parent, keep=100)
    state = State(other)
    state.offset = int(path.name[9:29])
    path.unlink()
    snaps.write(state)


DAMAGE = {"corrupt": damage_flip, "truncated": damage_truncate, "other-config": damage_other_config}
REASONS = {"corrupt": "checksum mismatch (partial or damaged file)",
           "truncated": "checksum mismatch (partial or damaged file)",
           "other-config": "config: the snapshot was made under another fold configuration"}


@pytest.mark.parametrize("damage", DAMAGE)
def test_bad_newest_snapshot_falls_back_to_the_older_one(
        store_dir: Path, make_event: MakeEvent, damage: str) -> None:
    """
    A damaged newest snapshot is skipped with a warning naming it and why; the older
    one plus a longer replay is used, and the state still equals a fresh fold.
    """
    store = Store(store_dir, fold=SMALL, snapshot_every=0, keep_snapshots=3)
    store.append(batch(make_event, 0, 60))
    store.snapshot()
    store.append(batch(make_event, 60, 40))
    newest = store.snapshot()
    store.append(batch(make_event, 100, 10))
    store.close(snapshot=False)
    DAMAGE[damage](newest, SMALL)

    with capture_logs() as logs:
        reopened = Store(store_dir, fold=SMALL, snapshot_every=0)
    restored = reopened.state.to_bytes()
    expected = fresh_fold(reopened)
    reopened.close(snapshot=False)

    assert ([("warning", str(newest), f"{newest}: {REASONS[damage]}")], [(True, 50)]) == (
        [(e["log_level"], e["path"], e["reason"]) for e in logs
         if e["event"] == "snapshot_skipped"],
        [(e["from_snapshot"], e["replayed"]) for e in logs if e["event"] == "state_restored"])
    assert expected == restored


@pytest.mark.parametrize("damage", DAMAGE)
def test_only_snapshot_bad_means_full_replay(store_dir: Path, make_event: MakeEvent,
                                             damage: str) -> None:
    """With no valid snapshot at all, the state is rebuilt from the whole log."""
    store = Store(store_dir, fold=SMALL, snapshot_every=0)
    store.append(batch(make_event, 0, 70))
    only = store.snapshot()
    store.close(snapshot=False)
    DAMAGE[damage](only, SMALL)

    with capture_logs() as logs:
        reopened = Store(store_dir, fold=SMALL, snapshot_every=0)
    restored = reopened.state.to_bytes()
    expected = fresh_fold(reopened)
    reopened.close(snapshot=False)

    assert ([str(only)], [(False, 70)]) == (
        [e["path"] for e in logs if e["event"] == "snapshot_skipped"],
        [(e["from_snapshot"], e["replayed"]) for e in logs if e["event"] == "state_restored"])
    assert expected == restored


def test_snapshot_with_garbage_after_the_magic_is_skipped(tmp_path: Path) -> None:
    """A file with the right name but not a snapshot at all is skipped, not trusted."""
    snaps = SnapshotStore(tmp_path / "snaps")
    (snaps.directory / "snapshot-00000000000000000001.snap").write_bytes(b"RRK")

    with capture_logs() as logs:
        state = snaps.newest_valid(FoldConfig())

    assert (None, ["snapshot_skipped"]) == (state, [e["event"] for e in logs])
