"""
The Kafka feed in real `rerankd run` processes against the real broker: rankings,
SIGKILL and restart, a broker restart, two daemons in one group, dead letters.

Each daemon has its own directory; its log is read on a read-only SQLite connection.
Sessions time out after 15 s: a killed daemon here is back (READY, then joined) in
about 5 to 8 s, so it rejoins as the same static member, without a rebalance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from brokers import KafkaBroker, unique_name
from daemons import Daemon

from daemon.feeds.kafka import publish

pytestmark = pytest.mark.brokers

#: Bound on each wait for a daemon's log (far above what it needs).
TIMEOUT_S = 90
SESSION_TIMEOUT_S = 15.0
NOW = time.time()


def event(k: int, kind: str = "click", *, user: str | None = None, item: str | None = None,
          ) -> bytes:  # fmt: skip
    """Event ``e-<k>`` as JSON, a minute old; by default spread over 50 users and 20 items."""
    return json.dumps({
        "type": kind, "id": f"e-{k}", "user": user or f"u-{k % 50}",
        "item": item or f"i-{k % 20}", "ts": NOW - 60 + k * 1e-4,
    }).encode()  # fmt: skip


def kafka_config(broker: KafkaBroker, topic: str, group: str, instance: str) -> str:
    return (
        f'[kafka]\nbootstrap = "{broker.bootstrap}"\ntopics = ["{topic}"]\n'
        f'group_id = "{group}"\ninstance_id = "{instance}"\n'
        f"session_timeout_s = {SESSION_TIMEOUT_S}\n"
        "[ranking]\ntrain_on_start = false\n"
    )


class Daemons:
    """Starts daemons, each on a directory of its own under ``tmp``; closes them all."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[Daemon] = []

    def start(self, name: str, config: str) -> Daemon:
        """Start (or restart, on the same directory) daemon ``name``; do not wait."""
        directory = self.tmp / name
        directory.mkdir(exist_ok=True)
        daemon = Daemon(directory, config)
        self.started.append(daemon)
        return daemon

    async def ready(self, *daemons: Daemon) -> None:
        await asyncio.gather(*(asyncio.to_thread(d.wait_for, "READY=1") for d in daemons))

    def close(self) -> None:
        for daemon in self.started:
            daemon.close()


@pytest.fixture(name="daemons")
def fixture_daemons(tmp_path: Path) -> Iterator[Daemons]:
    started = Daemons(tmp_path)
    try:
        yield started
    finally:
        started.close()


def query(daemon: Daemon, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` on the daemon's log, read-only ([] before the log exists)."""
    path = daemon.tmp / "data" / "events.db"
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as db:
        return db.execute(sql).fetchall()


def count(daemon: Daemon) -> int:
    """Events in the daemon's log."""
    rows = query(daemon, "SELECT count(*) FROM events")
    return int(rows[0][0]) if rows else 0


def ids(daemon: Daemon) -> list[str]:
    return [row[0] for row in query(daemon, "SELECT id FROM events")]


def feed_stats(daemon: Daemon) -> dict[str, Any]:
    with daemon.client() as client:
        stats: dict[str, Any] = client.request("stats")["feeds"]["kafka"]
    return stats


async def wait_until(check: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
    """Poll ``check`` (in a thread: it may read SQLite) until it holds, or fail."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def stream(broker: KafkaBroker, topic: str, n: int, *, chunk: int = 500) -> int:
    """Publish events ``e-0`` .. ``e-<n - 1>`` in chunks, a short pause between them."""
    sent = 0
    while sent < n:
        size = min(chunk, n - sent)
        sent += await publish(broker.bootstrap, topic, [event(k) for k in range(sent, sent + size)])
        await asyncio.sleep(0.05)
    return sent


def names() -> tuple[str, str]:
    """A fresh topic name and group for one test."""
    return unique_name("events"), unique_name("group")


async def test_published_events_change_the_ranking(
    kafka_broker: KafkaBroker, daemons: Daemons
) -> None:
    """
    Purchases published to Kafka reach the daemon: the purchased item ranks first.
    SIGTERM then stops the daemon, feed included, with exit status 0.
    """
    topic, group = names()
    await kafka_broker.create_topic(topic, partitions=4)
    daemon = daemons.start("a", kafka_config(kafka_broker, topic, group, f"{group}-a"))
    await daemons.ready(daemon)
    with daemon.client() as client:
        before = client.request("rank", user="u-1", candidates=["a", "b", "c"])["items"]
    purchases = [event(k, "purchase", user=f"buyer-{k}", item="c") for k in range(5)]
    assert 5 == await publish(kafka_broker.bootstrap, topic, purchases)

    def c_first() -> bool:
        with daemon.client() as client:
            return client.request("rank", user="u-1", candidates=["a", "b", "c"])["items"][0] == "c"

    await wait_until(c_first, "c to rank first")
    accepted = feed_stats(daemon)["accepted"]
    assert 0 == await asyncio.to_thread(daemon.stop)
    assert ["a", "b", "c"] == before  # nothing known: the given order
    assert 5 == accepted


async def test_sigkill_mid_stream_and_restart_keeps_every_event_once(
    kafka_broker: KafkaBroker, daemons: Daemons
) -> None:
    """
    A daemon killed in the middle of a 20,000-event stream and restarted within the
    session timeout ends with every event in its log exactly once, and reads nothing
    twice after the restart.
    """
    topic, group = names()
    await kafka_broker.create_topic(topic, partitions=4)
    config = kafka_config(kafka_broker, topic, group, f"{group}-a")
    daemon = daemons.start("a", config)
    await daemons.ready(daemon)
    producing = asyncio.create_task(stream(kafka_broker, topic, 20_000))
    await wait_until(lambda: count(daemon) >= 3000, "3000 events before the kill")
    daemon.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(daemon.proc.wait, 30)
    at_kill = count(daemon)
    daemon.close()
    again = daemons.start("a", config)
    await daemons.ready(again)
    assert 20_000 == await producing
    await wait_until(lambda: count(again) >= 20_000, "20000 events after the restart")
    await asyncio.sleep(0.5)  # a repeat would still be coming
    logged = ids(again)
    stats = feed_stats(again)
    assert 3000 <= at_kill < 20_000  # killed in the middle of the stream
    assert (20_000, 20_000) == (len(logged), len(set(logged)))
    assert {f"e-{k}" for k in range(20_000)} == set(logged)
    assert (0, 20_000 - at_kill) == (stats["duplicates"], stats["accepted"])


async def test_broker_restart_is_survived_without_loss(
    kafka_broker: KafkaBroker, daemons: Daemons
) -> None:
    """
    The broker stopped and started again while the daemon runs: the daemon reconnects
    by itself and every event, before and after, arrives once.
    """
    topic, group = names()
    await kafka_broker.create_topic(topic, partitions=4)
    daemon = daemons.start("a", kafka_config(kafka_broker, topic, group, f"{group}-a"))
    await daemons.ready(daemon)
    await wait_until(lambda: feed_stats(daemon)["connected"], "the feed to connect")
    before = [event(k) for k in range(1000)]
    assert 1000 == await publish(kafka_broker.bootstrap, topic, before)
    try:
        await asyncio.to_thread(kafka_broker.stop)
        await wait_until(lambda: not feed_stats(daemon)["connected"], "the feed to notice")
    finally:
        await asyncio.to_thread(kafka_broker.start)
    after = [event(k) for k in range(1000, 2000)]
    assert 1000 == await publish(kafka_broker.bootstrap, topic, after)
    await wait_until(lambda: count(daemon) >= 2000, "2000 events")
    await asyncio.sleep(0.5)  # a repeat would still be coming
    logged = ids(daemon)
    assert sorted(f"e-{k}" for k in range(2000)) == sorted(logged)
    # "connected" follows the group coordinator, which a restarted broker may move or
    # reload more than once before it settles: ask for it to come back, not for a moment
    await wait_until(lambda: feed_stats(daemon)["connected"], "the feed to reconnect")
    stats = feed_stats(daemon)
    assert stats["connects"] >= 2
    assert 0 == stats["duplicates"]
    log = (daemon.tmp / "daemon.log").read_text()
    assert log.index('"kafka_disconnected"') < log.rindex('"kafka_connected"')


async def test_two_daemons_in_a_group_survive_a_kill_with_every_event_once(
    kafka_broker: KafkaBroker, daemons: Daemons
) -> None:
    """
    Two daemons share a 4-partition topic; one is killed mid-stream and restarted
    within the session timeout: across both logs every event is there exactly once,
    and the survivor saw no rebalance (static membership).
    """
    topic, group = names()
    await kafka_broker.create_topic(topic, partitions=4)
    configs = [kafka_config(kafka_broker, topic, group, f"{group}-{n}") for n in "ab"]
    a = daemons.start("a", configs[0])
    await daemons.ready(a)
    await wait_until(lambda: feed_stats(a)["partitions"] == 4, "a to have the partitions")
    b = daemons.start("b", configs[1])
    await daemons.ready(b)
    await wait_until(lambda: feed_stats(b)["partitions"] == 2, "b to have 2 partitions")
    await wait_until(lambda: feed_stats(a)["partitions"] == 2, "a to give 2 up")
    producing = asyncio.create_task(stream(kafka_broker, topic, 12_000))
    await wait_until(lambda: count(b) >= 1500, "1500 events in b")
    rebalances = feed_stats(a)["rebalances"]
    b.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(b.proc.wait, 30)
    b.close()
    b = daemons.start("b", configs[1])
    await daemons.ready(b)
    assert 12_000 == await producing
    await wait_until(lambda: count(a) + count(b) >= 12_000, "12000 events in a and b")
    await asyncio.sleep(0.5)  # a repeat would still be coming
    in_a, in_b = ids(a), ids(b)
    stats = [feed_stats(a), feed_stats(b)]
    assert sorted(f"e-{k}" for k in range(12_000)) == sorted(in_a + in_b)
    assert [2, 2] == [s["partitions"] for s in stats]
    assert rebalances == stats[0]["rebalances"]


async def test_bad_events_are_dead_lettered_while_good_ones_flow(
    kafka_broker: KafkaBroker, daemons: Daemons
) -> None:
    """Bad records are in the dead_letters table with their reasons; good ones arrive."""
    topic, group = names()
    await kafka_broker.create_topic(topic, partitions=1)
    daemon = daemons.start("a", kafka_config(kafka_broker, topic, group, f"{group}-a"))
    await daemons.ready(daemon)
    bad = [b"{not json", b'{"type": "click", "id": "x-1"}', event(0, "nonsense")]
    mixed = [event(k) for k in range(1, 50)] + bad + [event(k) for k in range(50, 100)]
    assert 102 == await publish(kafka_broker.bootstrap, topic, mixed)
    await wait_until(lambda: count(daemon) >= 99, "99 good events")
    await wait_until(lambda: len(query(daemon, "SELECT 1 FROM dead_letters")) >= 3, "3 dead")
    dead = query(daemon, "SELECT source, reason, raw FROM dead_letters ORDER BY seq")
    assert sorted(f"e-{k}" for k in range(1, 100)) == sorted(ids(daemon))
    assert bad == [raw for _, _, raw in dead]
    assert {"kafka"} == {source for source, _, _ in dead}
    assert all(reason for _, reason, _ in dead)
    assert "type" in dead[2][1]
