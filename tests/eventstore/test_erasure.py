"""Erasure: after forget, no byte of the user is left in any file, and the user stays gone."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from eventstore import Event, State, Store, project

if TYPE_CHECKING:
    from pathlib import Path

MakeEvent = Callable[..., Event]

GONE = "user-7f3a9c-erase-me"
OTHERS = [f"user-keep-{k}" for k in range(5)]
#: Every forgotten event id starts with this, every forgotten context value with CTX:
#: searching for the prefixes covers all of them at once.
EVT = "evt-erase-me-"
CTX = "ctx-erase-me-"
N = 3000


def needles(user: str = GONE) -> list[bytes]:
    """The byte strings that must not survive erasure of ``user``."""
    return [user.encode(), EVT.encode(), CTX.encode()]


def history(make_event: MakeEvent) -> list[Event]:
    """N events: every sixth belongs to GONE, the rest to five other users; 50 items."""
    out: list[Event] = []
    for n in range(N):
        if n % 6 == 0:
            user, eid, ctx = GONE, f"{EVT}{n:04d}", {"query": f"{CTX}{n:04d}", "page": "search"}
        else:
            user, eid, ctx = OTHERS[n % 5], f"evt-keep-{n:04d}", {"query": "boots"}
        if n % 50 == 3:
            out.append(make_event("item", n, id=f"evt-item-{n}", item=f"item-{n % 50}",
                                  fields={"category": f"cat-{n % 4}"}))
        elif n % 10 == 7:
            out.append(make_event("impression", n, id=eid, user=user, context=ctx,
                                  items=[f"item-{(n + k) % 50}" for k in range(5)]))
        else:
            kind = ("view", "click", "purchase", "rating", "like")[n % 5]
            out.append(make_event(kind, n, id=eid, user=user, item=f"item-{n % 50}",
                                  context=ctx))
    return out


def files_holding(directory: Path, wanted: list[bytes]) -> dict[str, list[bytes]]:
    """{file: the wanted byte strings it contains} for every file under ``directory``."""
    found: dict[str, list[bytes]] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            hits = [w for w in wanted if w in data]
            if hits:
                found[str(path.relative_to(directory))] = hits
    return found


def all_bytes(directory: Path) -> bytes:
    """Every file under ``directory``, concatenated."""
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


@pytest.fixture(name="events")
def fixture_events(make_event: MakeEvent) -> list[Event]:
    """The shared history."""
    return history(make_event)


@pytest.fixture(name="filled")
def fixture_filled(store: Store, events: list[Event]) -> Store:
    """
    A store holding the history, a snapshot taken before the forget (with GONE in
    it), more events after it, and dead letters, one of which names GONE.
    """
    for start in range(0, N // 2, 250):
        store.append(events[start:start + 250])
    store.snapshot()
    for start in range(N // 2, N, 250):
        store.append(events[start:start + 250])
    store.ingest(json.dumps({"id": "bad-1", "type": "click", "user": GONE}).encode(), source="t")
    store.ingest(json.dumps({"id": "bad-2", "type": "click", "user": OTHERS[0]}).encode(),
                 source="t")
    assert GONE.encode() in all_bytes(store.directory)  # the test starts from a real leak
    return store


@pytest.fixture(name="forgotten")
def fixture_forgotten(filled: Store) -> Store:
    """The filled store after Store.forget(GONE)."""
    filled.forget(GONE)
    return filled


def test_forget_reports_how_many_events_it_deleted(filled: Store) -> None:
    """Store.forget returns the number of the user's events removed from the log."""
    before = filled.log.count()

    deleted = filled.forget(GONE)

    assert (N // 6, before - N // 6) == (deleted, filled.log.count())


def test_no_file_holds_the_user_while_open(forgotten: Store) -> None:
    """
    Right after forget, with the store still open, no file (db, WAL, SHM, snapshots)
    holds the user id, an erased event id or an erased context value.
    """
    assert {} == files_holding(forgotten.directory, needles())


def test_no_file_holds_the_user_after_close(forgotten: Store) -> None:
    """After closing (checkpoint, final snapshot), no file holds any trace either."""
    forgotten.close()

    assert {} == files_holding(forgotten.directory, needles())


def test_other_users_are_kept(forgotten: Store) -> None:
    """Forgetting one user leaves everybody else's events, state and dead letters."""
    data = all_bytes(forgotten.directory)

    assert ([True] * 5, [True] * 5, True, N - N // 6, ["bad-2"]) == (
        [u.encode() in data for u in OTHERS],
        [forgotten.state.user_view(u) is not None for u in OTHERS],
        b"evt-keep-0001" in data, forgotten.log.count(),
        [json.loads(d.raw)["id"] for d in forgotten.log.read_dead_letters()])


def test_state_has_no_trace_of_the_user(forgotten: Store) -> None:
    """The user has no view, no id-map entry, and its id is not in the state's bytes."""
    assert (None, False, False) == (
        forgotten.state.user_view(GONE), GONE in forgotten.state.user_ids,
        GONE.encode() in forgotten.state.to_bytes())


def test_old_events_of_a_forgotten_user_are_refused(forgotten: Store,
                                                    events: list[Event]) -> None:
    """Re-sending the user's old events reports them "erased" and does not bring the user back."""
    old = [e for e in events if getattr(e, "user", None) == GONE]

    result = forgotten.append(old)

    assert (["erased"] * len(old), None, {}) == (
        result.status, forgotten.state.user_view(GONE),
        files_holding(forgotten.directory, needles()))


def test_forgotten_user_stays_forgotten_after_reopen(forgotten: Store, events: list[Event],
                                                     store_dir: Path,
                                                     make_event: MakeEvent) -> None:
    """The tombstone survives a restart: after reopening, old and new events are still refused."""
    forgotten.close()
    reopened = Store(store_dir, snapshot_every=0)
    old = [e for e in events if getattr(e, "user", None) == GONE][:10]
    new = make_event("click", N + 1, id=f"{EVT}new", user=GONE)

    result = reopened.append([*old, new])
    view = reopened.state.user_view(GONE)
    reopened.close()

    assert (["erased"] * 11, None, {}) == (result.status, view,
                                           files_holding(store_dir, needles()))


def test_forget_inside_an_append_batch(store: Store, make_event: MakeEvent) -> None:
    """
    A forget event inside a batch erases the events before it, refuses those after it,
    leaves other users' events of the batch alone, and the positions still move.
    """
    store.append([make_event("click", k, id=f"{EVT}{k}", user=GONE,
                             context={"q": f"{CTX}{k}"}) for k in range(200)])
    store.snapshot()
    batch = [
        make_event("click", 300, id=f"{EVT}300", user=GONE, context={"q": f"{CTX}300"}),
        make_event("view", 301, id="keep-301", user=OTHERS[0]),
        make_event("forget", 302, id="forget-302", user=GONE),
        make_event("click", 303, id=f"{EVT}303", user=GONE),
        make_event("view", 304, id="keep-304", user=OTHERS[1]),
    ]

    result = store.append(batch, positions={("kafka:events", "0"): 305})

    assert (["accepted"] * 3 + ["erased", "accepted"], ["keep-301", "keep-304"],
            {("kafka:events", "0"): 305}, None) == (
        result.status, store.log.ids(), store.log.positions(), store.state.user_view(GONE))
    assert {} == files_holding(store.directory, needles())


def test_forget_event_through_ingest(store: Store, event_bytes: Callable[..., bytes]) -> None:
    """A forget event arriving as JSON on a feed erases the user like Store.forget."""
    store.ingest(b"[" + b",".join(event_bytes("click", k, id=f"{EVT}{k}", user=GONE)
                                  for k in range(50)) + b"]", source="mqtt")
    store.snapshot()

    store.ingest(event_bytes("forget", 99, user=GONE), source="mqtt")

    assert (0, None, {}) == (store.log.count(), store.state.user_view(GONE),
                             files_holding(store.directory, needles()))


def test_crash_between_log_forget_and_snapshot_rewrite(filled: Store, store_dir: Path) -> None:
    """
    If the process dies after the log erased the user but before the snapshots were
    rewritten, the next start drops the user from the restored state and rewrites
    the snapshots, so no file holds the user any more.
    """
    filled.log.forget(GONE)  # what Store.forget does first; then the "crash"
    filled.close(snapshot=False)
    assert GONE.encode() in all_bytes(store_dir / "snapshots")  # the stale snapshot

    reopened = Store(store_dir, snapshot_every=0)
    view = reopened.state.user_view(GONE)
    in_state = GONE.encode() in reopened.state.to_bytes()
    reopened.close(snapshot=False)

    assert (None, False, {}) == (view, in_state, files_holding(store_dir, needles()))


def test_state_after_forget_equals_a_replay_of_the_log(forgotten: Store) -> None:
    """
    State is a cache of the log (DESIGN.md): after a forget, the items' counters and
    popularity equal those a fresh fold of the remaining log gives, so losing the
    snapshots does not change rankings.
    """
    replayed = project(State(forgotten.config), (e for _, e in forgotten.log.read()))

    assert {i: replayed.item_view(i) for i in replayed.item_ids} == {
        i: forgotten.state.item_view(i) for i in replayed.item_ids}
