"""
The MQTT feed in the real daemon: `rerankd run` processes (tests/daemons.py) reading
the real Mosquitto, checked through the socket and the event log's SQLite file.
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
from brokers import MqttBroker, free_ports, unique_name
from daemons import Daemon, poll

from daemon.feeds.mqtt import publish

pytestmark = pytest.mark.brokers

NOW = time.time()
#: Bound on waiting for the daemon to catch up with what was published.
CATCH_UP_S = 90


def event(key: str, kind: str = "click", **fields: Any) -> bytes:
    """Event ``key`` as JSON bytes (``user`` u-1 and ``item`` i-1 unless given)."""
    obj = {"id": key, "type": kind, "user": "u-1", "item": "i-1", "ts": NOW - 60, **fields}
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


def mqtt_config(broker: MqttBroker, topic: str, client_id: str) -> str:
    return (
        f'[mqtt]\nurl = "mqtt://{broker.bootstrap}"\ntopics = ["{topic}"]\n'
        f'client_id = "{client_id}"\nreconnect_min_s = 0.1\nreconnect_max_s = 1.0\n'
        "[ranking]\ntrain_on_start = false\n"
    )


@pytest.fixture(name="bulk_broker")
def fixture_bulk_broker(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[MqttBroker]:
    """
    A Mosquitto of its own for a stream of 20,000 messages: the shared one saves its
    whole state after every change (so that a kill loses nothing), which takes minutes
    for such a backlog; this one saves every million changes and is never killed.
    """
    monkeypatch.setenv("RERANKD_MQTT_AUTOSAVE_CHANGES", "1000000")
    broker = MqttBroker(tmp_path_factory.mktemp("mosquitto-bulk"), free_ports(1)[0])
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


@pytest.fixture(name="start")
def fixture_start(tmp_path: Path) -> Iterator[Callable[[str], Daemon]]:
    """
    start(config) runs a daemon on tmp_path (data kept between starts), waits for READY=1
    and then for its feed to be subscribed: READY=1 does not wait for the broker, and
    what is published before the first subscription of a client id is not kept for it.
    """
    started: list[Daemon] = []

    def start(config: str) -> Daemon:
        daemon = Daemon(tmp_path, config)
        started.append(daemon)
        daemon.wait_for("READY=1")
        assert wait_until(lambda: feed_stats(daemon), lambda stats: stats["connected"])
        return daemon

    yield start
    for daemon in started:
        daemon.close()


def log_ids(daemon: Daemon) -> list[str]:
    """Every event id in the daemon's log, over a read-only connection."""
    with contextlib.closing(sqlite3.connect(f"file:{daemon.tmp / 'data' / 'events.db'}?mode=ro",
                                            uri=True, timeout=10)) as db:  # fmt: skip
        return [row[0] for row in db.execute("SELECT id FROM events")]


def log_dead_letters(daemon: Daemon) -> list[tuple[str, bytes, str]]:
    with contextlib.closing(sqlite3.connect(f"file:{daemon.tmp / 'data' / 'events.db'}?mode=ro",
                                            uri=True, timeout=10)) as db:  # fmt: skip
        rows = db.execute("SELECT source, raw, reason FROM dead_letters ORDER BY seq")
        return [(source, bytes(raw), reason) for source, raw, reason in rows]


def wait_until(read: Callable[[], Any], done: Callable[[Any], bool]) -> Any:
    """``read()`` until ``done(value)`` or CATCH_UP_S; the last value."""
    return poll(read, done, CATCH_UP_S)


def feed_stats(daemon: Daemon) -> dict[str, Any]:
    with daemon.client() as client:
        stats: dict[str, Any] = client.request("stats")["feeds"]["mqtt"]
    return stats


def test_events_from_mqtt_change_the_ranking(mqtt_broker: MqttBroker,
                                             start: Callable[[str], Daemon]) -> None:  # fmt: skip
    """
    Catalogue and click events published to the topic reach the ranking: a user's clicks
    on shoes put the unclicked shoe first; SIGTERM then stops the daemon cleanly.
    """
    topic = unique_name("events")
    daemon = start(mqtt_config(mqtt_broker, topic, unique_name("rerankd")))
    candidates = ["h-1", "h-2", "s-2"]
    with daemon.client() as client:
        before = client.request("rank", user="u-1", candidates=candidates)["items"]
    catalogue = [event(f"item-{item}", "item", user=..., item=item, fields={"category": cat})
                 for item, cat in [("s-1", "shoes"), ("s-2", "shoes"), ("h-1", "hats"),
                                   ("h-2", "hats")]]  # fmt: skip
    clicks = [event(f"click-{n}", item="s-1") for n in range(3)]
    assert 7 == asyncio.run(publish(f"mqtt://{mqtt_broker.bootstrap}", topic, catalogue + clicks))

    def ranked() -> list[str]:
        with daemon.client() as client:
            items: list[str] = client.request("rank", user="u-1", candidates=candidates)["items"]
            return items

    after = wait_until(ranked, lambda items: items[0] == "s-2")
    assert (candidates, "s-2") == (before, after[0])
    stats = wait_until(lambda: feed_stats(daemon), lambda stats: stats["acked"] == 7)
    assert (True, 7) == (stats["connected"], stats["acked"])
    assert 0 == daemon.stop()


def test_bad_events_are_dead_lettered_and_good_ones_keep_flowing(
    mqtt_broker: MqttBroker, start: Callable[[str], Daemon]
) -> None:
    """Bad payloads land in dead_letters with their reasons; the good events around them arrive."""
    topic = unique_name("events")
    daemon = start(mqtt_config(mqtt_broker, topic, unique_name("rerankd")))
    mixed = b"[" + event("good-2") + b', {"id": "bad-3", "type": "click"}]'
    payloads = [event("good-0"), b"{not json", event("bad-1", user=...), mixed,
                event("good-4"), event("bad-5", ts=NOW + 86_400)]  # fmt: skip
    asyncio.run(publish(f"mqtt://{mqtt_broker.bootstrap}", topic, payloads))
    ids = wait_until(lambda: log_ids(daemon), lambda ids: len(ids) >= 3)
    dead = wait_until(lambda: log_dead_letters(daemon), lambda dead: len(dead) >= 4)
    assert ["good-0", "good-2", "good-4"] == sorted(ids)
    assert [b"{not json", event("bad-1", user=...), b'{"id": "bad-3", "type": "click"}',
            event("bad-5", ts=NOW + 86_400)] == [raw for _, raw, _ in dead]  # fmt: skip
    assert {"mqtt"} == {source for source, _, _ in dead}
    reasons = [reason for _, _, reason in dead]
    assert reasons[0].startswith("json:")
    assert reasons[1].startswith("user:")
    assert "ts: more than" in reasons[3]
    # the log can show a batch a moment before the feed has acknowledged it
    stats = wait_until(lambda: feed_stats(daemon), lambda stats: stats["acked"] == 6)
    assert (6, 4, 3) == (stats["acked"], stats["dead_lettered"], stats["events"])


def test_sigkill_mid_stream_leaves_every_event_in_the_log_once(
    bulk_broker: MqttBroker, start: Callable[[str], Daemon]
) -> None:
    """
    A SIGKILL while 20,000 events stream in, then a restart: once caught up, the log
    holds every published id exactly once (redelivered ones deduplicated).
    """
    topic, client_id = unique_name("events"), unique_name("rerankd")
    config = mqtt_config(bulk_broker, topic, client_id)
    daemon = start(config)
    ids = [f"k-{n}" for n in range(20_000)]
    sent = 0

    def on_sent(n: int) -> None:
        nonlocal sent
        sent += n
        if sent >= 10_000 and daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGKILL)

    payloads = (event(key, user=f"u-{n % 97}", item=f"i-{n % 301}") for n, key in enumerate(ids))
    assert 20_000 == asyncio.run(publish(f"mqtt://{bulk_broker.bootstrap}", topic, payloads,
                                         on_sent=on_sent))  # fmt: skip
    assert -signal.SIGKILL == daemon.proc.wait(timeout=30)
    at_kill = len(log_ids(daemon))
    again = start(config)
    logged = wait_until(lambda: log_ids(again), lambda logged: len(logged) >= 20_000)
    assert 0 < at_kill < 20_000  # it died mid-stream
    assert (20_000, 20_000) == (len(logged), len(set(logged)))
    assert set(ids) == set(logged)
    assert feed_stats(again)["session_present"] is True


def test_the_daemon_reconnects_after_a_broker_restart(
    mqtt_broker: MqttBroker, start: Callable[[str], Daemon]
) -> None:
    """
    Mosquitto stopped and started again under a running daemon: it reconnects by itself,
    resumes its session, and the log has every event published before and after, once.
    """
    topic = unique_name("events")
    daemon = start(mqtt_config(mqtt_broker, topic, unique_name("rerankd")))
    url = f"mqtt://{mqtt_broker.bootstrap}"
    before = [f"before-{n}" for n in range(200)]
    asyncio.run(publish(url, topic, [event(key) for key in before]))
    try:
        mqtt_broker.stop()  # some of `before` may still be queued for the daemon
        down = wait_until(lambda: feed_stats(daemon), lambda stats: not stats["connected"])
        assert not down["connected"]
    finally:
        mqtt_broker.start()
    stats = wait_until(lambda: feed_stats(daemon), lambda stats: stats["connected"])
    after = [f"after-{n}" for n in range(200)]
    asyncio.run(publish(url, topic, [event(key) for key in after]))
    logged = wait_until(lambda: log_ids(daemon), lambda logged: len(logged) >= 400)
    assert sorted(before + after) == sorted(logged)
    assert (2, True, 0) == (stats["connects"], stats["session_present"],
                            stats["session_not_present"])  # fmt: skip
