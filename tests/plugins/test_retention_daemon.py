"""
Retention in the real daemon: `rerankd run` processes (tests/daemons.py) with the
``retention`` privacy plugin at an age of a few seconds, fed through the socket and
checked through the socket, the metrics endpoint and the bytes of the files it wrote.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from brokers import free_ports
from daemons import Daemon, poll, user_view

#: How old an event may get in the log, in seconds (max_age_days is a float).
AGE_S = 3.0
SWEEP_S = 0.5
ALICE, BOB, CAROL = "alice@example.com", "bob@example.org", "carol@example.net"
CANDIDATES = ["hat-1", "shoe-2"]
#: Every context value of the first (old) events starts with this.
OLD_CTX = "ctx-old-retention-"
TIMEOUT_S = 90.0
RETENTION = (
    f"[plugins.retention]\nmax_age_days = {AGE_S / 86_400!r}\nsweep_interval_s = {SWEEP_S}\n"
)


def event(eid: str, kind: str, user: str, item: str, **fields: Any) -> dict[str, Any]:
    return {"id": eid, "type": kind, "user": user, "item": item, "ts": time.time() - 1,
            **fields}  # fmt: skip


def old_events() -> list[dict[str, Any]]:
    """The catalogue, two users' interactions and an impression, all with marked contexts."""
    items = [("shoe-1", "shoes"), ("shoe-2", "shoes"), ("hat-1", "hats")]
    catalogue = [{"id": f"old-item-{i}", "type": "item", "item": i, "ts": time.time() - 1,
                  "fields": {"category": c}} for i, c in items]  # fmt: skip
    ctx = {"context": {"query": f"{OLD_CTX}q"}}
    return [
        *catalogue,
        event("old-1", "purchase", ALICE, "shoe-1", **ctx),
        event("old-2", "click", ALICE, "shoe-2", **ctx),
        event("old-3", "view", BOB, "hat-1", **ctx),
        {
            "id": "old-4",
            "type": "impression",
            "user": BOB,
            "items": ["hat-1", "shoe-1"],
            "ts": time.time() - 1,
            "context": {"page": f"{OLD_CTX}p"},
        },
    ]


def query(daemon: Daemon, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` on the daemon's log, over a read-only connection."""
    uri = f"file:{daemon.tmp / 'data' / 'events.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        return db.execute(sql, args).fetchall()


def logged(daemon: Daemon, prefix: str) -> list[tuple[str, float]]:
    """(id, ingest_ts) of the logged events whose id starts with ``prefix``."""
    return query(daemon, "SELECT id, ingest_ts FROM events WHERE id LIKE ? ORDER BY log_offset",
                 f"{prefix}%")  # fmt: skip


def ranked(daemon: Daemon, user: str) -> list[str]:
    with daemon.client() as client:
        items: list[str] = client.request("rank", user=user, candidates=CANDIDATES)["items"]
    return items


def wait_until(read: Callable[[], Any], done: Callable[[Any], bool]) -> Any:
    """``read()`` until ``done(value)``; fails with the last value after the timeout."""
    value = poll(read, done, TIMEOUT_S)
    if not done(value):
        pytest.fail(f"timed out; last value: {value!r}")
    return value


def files_holding(directory: Path, needle: bytes) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and needle in p.read_bytes())  # fmt: skip


def metric(port: int, name: str) -> float:
    """The value of sample ``name`` on the daemon's Prometheus page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        for line in page.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    return 0.0


#: Impressions stay out of these logs: only the events the tests send are counted.
NO_IMPRESSIONS = "record_impressions = false\n"
WITH_RETENTION = f'{NO_IMPRESSIONS}[plugins]\nprivacy = ["pseudonymize", "retention"]\n{RETENTION}'


def test_old_events_leave_the_log_while_the_state_keeps_them(
    start: Callable[..., Daemon],
) -> None:
    """
    With ``retention`` at a few seconds: every event leaves the log (rows and bytes in
    every file) once it is older than the age and not before; ``user`` and ``rank``
    answer as before, also after a restart; events ingested later stay until their own
    time; an event already older than the age is dropped on arrival; the deletions are
    counted in ``stats`` and on the metrics endpoint.
    """
    (port,) = free_ports(1)
    daemon = start(NO_IMPRESSIONS + f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
                   f'[plugins]\nprivacy = ["pseudonymize", "retention"]\n{RETENTION}')  # fmt: skip
    with daemon.client() as client:
        answer = client.request("ingest", events=old_events())
        too_old = client.request(
            "ingest",
            events=[
                {**event("ancient-1", "click", CAROL, "hat-1"), "ts": time.time() - AGE_S - 60}
            ],
        )
    views = {u: user_view(daemon, u) for u in (ALICE, BOB)}
    order = ranked(daemon, ALICE)
    old = logged(daemon, "old-")

    gone = wait_until(lambda: logged(daemon, "old-"), lambda rows: not rows)
    gone_at = time.time()
    after = ({u: user_view(daemon, u) for u in (ALICE, BOB)}, ranked(daemon, ALICE))
    with daemon.client() as client:
        young_sent = time.time()
        client.request(
            "ingest",
            events=[
                event("young-1", "click", CAROL, "hat-1"),
                event("young-2", "view", BOB, "shoe-2"),
            ],
        )
        sweeps = wait_until(
            lambda: client.request("stats")["retention"],
            lambda last: last["ts"] > young_sent + 2 * SWEEP_S,
        )
    young = logged(daemon, "young-")
    before_stop = {u: user_view(daemon, u) for u in (ALICE, BOB, CAROL)}
    deleted = metric(port, "rerankd_retention_deleted_total")
    held = files_holding(daemon.tmp / "data", OLD_CTX.encode())
    assert 0 == daemon.stop()

    assert ((7, 0), (0, 1)) == (
        (answer["accepted"], answer.get("dropped", 0)),
        (too_old["accepted"], too_old["dropped"]),
    )
    assert 7 == len(old)
    assert ([], True) == (gone, gone_at >= max(ts for _, ts in old) + AGE_S)
    assert (views, order) == after
    assert (7.0, []) == (deleted, held)
    assert (["young-1", "young-2"], True) == ([i for i, _ in young], sweeps["ok"])

    daemon = start(WITH_RETENTION)
    restarted = {u: user_view(daemon, u) for u in (ALICE, BOB, CAROL)}
    order_again = ranked(daemon, ALICE)
    young_gone = wait_until(lambda: logged(daemon, "young-"), lambda rows: not rows)
    young_gone_at = time.time()
    assert 0 == daemon.stop()

    assert (before_stop, order) == (restarted, order_again)
    assert ([], True) == (young_gone, young_gone_at >= max(ts for _, ts in young) + AGE_S)


def test_a_reload_switches_retention_on_and_off(start: Callable[..., Daemon]) -> None:
    """
    A SIGHUP that adds ``retention`` deletes the events already old enough at once; one
    that removes it keeps later events past their age.
    """
    daemon = start(NO_IMPRESSIONS + '[plugins]\nprivacy = ["pseudonymize"]\n')
    log = daemon.tmp / "daemon.log"
    config = daemon.config.read_text()
    with daemon.client() as client:
        client.request("ingest", events=old_events())
        time.sleep(AGE_S)  # old enough, but nothing asks for retention yet
        kept = logged(daemon, "old-")
        daemon.config.write_text(config.replace('privacy = ["pseudonymize"]',
                                                'privacy = ["pseudonymize", "retention"]')
                                 + RETENTION)  # fmt: skip
        daemon.proc.send_signal(signal.SIGHUP)
        gone = wait_until(lambda: logged(daemon, "old-"), lambda rows: not rows)
        daemon.config.write_text(config)
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(log.read_text, lambda text: text.count('"reloaded"') == 2)
        client.request("ingest", events=[event("young-1", "click", CAROL, "hat-1")])
        time.sleep(AGE_S + 4 * SWEEP_S)
        young = logged(daemon, "young-")
        stats = client.request("stats")
    assert 0 == daemon.stop()

    assert (7, [], ["young-1"]) == (len(kept), gone, [i for i, _ in young])
    assert (["pseudonymize"], True) == (stats["plugins"]["privacy"], stats["retention"]["ok"])
