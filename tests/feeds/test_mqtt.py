"""
The MQTT feed in-process against the real Mosquitto: a real store, writer and
FeedSink, the feed running as a task, events published at QoS 1 by ``publish``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from brokers import MqttBroker, unique_name
from paho.mqtt import client as paho_client
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.config import MqttSection
from daemon.feeds import FeedSink
from daemon.feeds.mqtt import BrokerAddress, MqttFeed, parse_url, publish, read_in_bursts
from daemon.metrics import Metrics
from eventstore import EventDecoder, GroupCommitter, Store, StoreFullError

pytestmark = pytest.mark.brokers

#: Bound on each test's broker traffic: far above what it needs.
TIMEOUT_S = 30
T0 = 1764250000.0  # tests/conftest.py's event time


def event(n: int, **fields: Any) -> bytes:
    """A click ``e-<n>`` as JSON bytes (``field=...`` leaves the field out)."""
    obj = {"id": f"e-{n}", "type": "click", "user": "u-1", "item": "i-1", "ts": T0 + n, **fields}
    return json.dumps({k: v for k, v in obj.items() if v is not ...}).encode()


def section(broker: MqttBroker, topic: str, **overrides: Any) -> MqttSection:
    """A feed config on ``topic`` with a client id of its own and quick reconnects."""
    options: dict[str, Any] = {
        "url": f"mqtt://{broker.bootstrap}", "topics": (topic,),
        "client_id": unique_name("feed"), "reconnect_min_s": 0.05, "reconnect_max_s": 0.5,
    }  # fmt: skip
    return MqttSection(**{**options, **overrides})


def logged_ids(store: Store) -> list[str]:
    """The ids in the log, read over a connection of its own (the writer owns the store's)."""
    with contextlib.closing(sqlite3.connect(f"file:{store.log.path}?mode=ro", uri=True)) as db:
        return [row[0] for row in db.execute("SELECT id FROM events ORDER BY log_offset")]


def dead_letters(store: Store) -> list[tuple[str, bytes, str]]:
    """``(source, raw, reason)`` of every dead letter, oldest first."""
    with contextlib.closing(sqlite3.connect(f"file:{store.log.path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT source, raw, reason FROM dead_letters ORDER BY seq")
        return [(source, bytes(raw), reason) for source, raw, reason in rows]


@pytest.fixture(name="committer")
def fixture_committer(store: Store) -> Iterator[GroupCommitter]:
    """The daemon's writer in front of ``store``, with its dead-letter sink."""
    committer = GroupCommitter(store.append, dead_letter_sink=store.log.dead_letters)
    yield committer
    committer.close()


@pytest.fixture(name="sink")
def fixture_sink(store: Store, committer: GroupCommitter, decoder: EventDecoder) -> FeedSink:
    return FeedSink(committer, decoder, store.log.path, Metrics(), retry_s=0.05)


@contextlib.asynccontextmanager
async def running(feed: MqttFeed) -> AsyncIterator[asyncio.Task[None]]:
    """``feed.run()`` as a task, connected before the body, cancelled after it."""
    task = asyncio.create_task(feed.run(), name="test.mqtt-feed")
    try:
        await until(lambda: feed.connected, task)
        yield task
    finally:
        task.cancel()
        await asyncio.wait([task], timeout=TIMEOUT_S)
    assert task.done(), "the feed carried on after its cancellation"
    if not task.cancelled():
        task.result()  # the feed's own exception, if it died of one


async def until(done: Callable[[], bool], task: asyncio.Task[None] | None = None) -> None:
    """Poll ``done()`` until true (failing after TIMEOUT_S, or if the feed task ended)."""
    async with asyncio.timeout(TIMEOUT_S):
        while not done():
            if task is not None and task.done():
                task.result()
                pytest.fail("the feed's run() returned")
            await asyncio.sleep(0.02)


async def send(broker: MqttBroker, topic: str, payloads: Sequence[bytes]) -> None:
    """Publish ``payloads`` at QoS 1, each acknowledged by the broker."""
    assert len(payloads) == await publish(f"mqtt://{broker.bootstrap}", topic, payloads)


class StuckSink(FeedSink):
    """A FeedSink whose event appends never complete (the writer hangs)."""

    async def append(self, events: Sequence[Any], **kwargs: Any) -> Any:
        if not events:  # the feed's session mark: let it through
            return await super().append(events, **kwargs)
        await asyncio.Event().wait()
        raise AssertionError  # pragma: no cover - never set


class SlowSink(FeedSink):
    """A FeedSink whose appends take 20 ms more (a slow disk)."""

    async def append(self, events: Sequence[Any], **kwargs: Any) -> Any:
        await asyncio.sleep(0.02)
        return await super().append(events, **kwargs)


async def test_good_events_arrive_once_and_bad_payloads_are_dead_lettered(
    mqtt_broker: MqttBroker, sink: FeedSink, store: Store
) -> None:
    """
    Each good event is in the log once, even when published twice; not-JSON, invalid and
    oversized payloads land in dead_letters with their reasons, and the good events
    published after them still arrive.
    """
    topic = unique_name("events")
    feed = MqttFeed(section(mqtt_broker, topic), sink)
    oversized = event(900, pad="x" * 70_000)
    bad = [b"{not json", event(901, user=...), oversized]
    good = [event(n) for n in range(30)]
    async with running(feed) as task:
        await send(mqtt_broker, topic, [*bad, *good, *good[:10]])
        await until(lambda: feed.acked == 43, task)
    assert [f"e-{n}" for n in range(30)] == logged_ids(store)
    dead = dead_letters(store)
    assert [("mqtt", raw) for raw in bad] == [(source, raw) for source, raw, _ in dead]
    reasons = [reason.split(":")[0] for _, _, reason in dead]
    assert ["json", "user", "event"] == reasons
    assert "larger than 65536 bytes" in dead[2][2]
    stats = feed.stats()
    assert (43, 43, 3, 40) == (stats["messages"], stats["acked"], stats["dead_lettered"],
                               stats["events"])  # fmt: skip
    m = sink.metrics
    assert 1 == m.total("rerankd_feed_connects_total", feed="mqtt")
    assert 0 == m.total("rerankd_feed_connected", feed="mqtt")  # stopped
    outcomes = ("accepted", "duplicate", "rejected")
    assert [30, 10, 3] == [m.total("rerankd_feed_events_total", feed="mqtt", outcome=o)
                           for o in outcomes]  # fmt: skip


async def test_unacknowledged_messages_are_delivered_again(
    mqtt_broker: MqttBroker,
    sink: FeedSink,
    store: Store,
    committer: GroupCommitter,
    decoder: EventDecoder,
) -> None:
    """
    Messages taken by a feed whose append never completes are not acknowledged: after
    it is cancelled, the next feed with the same client id gets them (aiomqtt's default
    acknowledges on receipt, and they would be gone).
    """
    topic = unique_name("events")
    config = section(mqtt_broker, topic)
    stuck = MqttFeed(config, StuckSink(committer, decoder, store.log.path))
    async with running(stuck) as task:
        await send(mqtt_broker, topic, [event(n) for n in range(5)])
        await until(lambda: stuck.stats()["unacked"] == 5, task)  # taken or queued
    assert 0 == stuck.acked
    again = MqttFeed(config, sink)
    async with running(again) as task:
        await until(lambda: again.acked == 5, task)
    assert [f"e-{n}" for n in range(5)] == logged_ids(store)
    assert again.session_present is True


async def test_a_payload_is_not_acknowledged_while_the_disk_refuses_it(
    mqtt_broker: MqttBroker, store: Store, decoder: EventDecoder
) -> None:
    """
    While appends fail with a StoreError the message stays unacknowledged; it is in the
    log once the disk takes writes again.
    """
    disk_ok = threading.Event()
    refusals: list[int] = []

    def flaky_append(events: Any, **kwargs: Any) -> Any:
        if events and not disk_ok.is_set():
            refusals.append(len(events))
            raise StoreFullError(str(store.log.path), "disk full (test)")
        return store.append(events, **kwargs)

    committer = GroupCommitter(flaky_append, dead_letter_sink=store.log.dead_letters)
    topic = unique_name("events")
    feed = MqttFeed(section(mqtt_broker, topic), FeedSink(committer, decoder, store.log.path,
                                                          retry_s=0.05))  # fmt: skip
    try:
        async with running(feed) as task:
            await send(mqtt_broker, topic, [event(1)])
            await until(lambda: len(refusals) >= 3, task)
            assert (1, 0) == (feed.messages, feed.acked)
            disk_ok.set()
            await until(lambda: feed.acked == 1, task)
    finally:
        committer.close()
    assert ["e-1"] == logged_ids(store)


async def test_persistent_session_keeps_messages_published_while_away(
    mqtt_broker: MqttBroker, sink: FeedSink, store: Store
) -> None:
    """A restarted feed resumes its session and gets what was published while it was away."""
    topic = unique_name("events")
    config = section(mqtt_broker, topic)
    first = MqttFeed(config, sink)
    async with running(first) as task:
        await send(mqtt_broker, topic, [event(0)])
        await until(lambda: first.acked == 1, task)
    assert first.session_present is False  # the first start of this client id
    await send(mqtt_broker, topic, [event(n) for n in range(1, 21)])
    second = MqttFeed(config, sink)
    async with running(second) as task:
        await until(lambda: second.acked == 20, task)
    assert [f"e-{n}" for n in range(21)] == logged_ids(store)
    assert (True, 0) == (second.session_present, second.session_not_present)


async def test_a_lost_session_is_counted(
    mqtt_broker: MqttBroker, sink: FeedSink, store: Store
) -> None:
    """
    A connect that finds no session for a client id that had one here (the log keeps a
    mark) counts ``session_not_present``; the first start of a client id does not.
    """
    topic = unique_name("events")
    config = section(mqtt_broker, topic)
    first = MqttFeed(config, sink)
    async with running(first) as task:
        await until(lambda: config.client_id in sink.stored_positions("mqtt"), task)
    assert (False, 0) == (first.session_present, first.session_not_present)
    # the broker forgets the session: Clean Start with the same client id
    async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port, identifier=config.client_id,
                              protocol=aiomqtt.ProtocolVersion.V5, clean_start=True):  # fmt: skip
        pass
    second = MqttFeed(config, sink)
    async with running(second) as task:
        await send(mqtt_broker, topic, [event(1)])
        await until(lambda: second.acked == 1, task)
    assert (False, 1) == (second.session_present, second.session_not_present)
    assert ["e-1"] == logged_ids(store)
    assert {config.client_id: "session"} == sink.stored_positions("mqtt")


async def test_receive_maximum_holds_back_the_broker_while_the_writer_waits(
    mqtt_broker: MqttBroker,
    store: Store,
    committer: GroupCommitter,
    decoder: EventDecoder,
) -> None:
    """
    With receive_maximum 5, a feed whose append waits holds 5 unacknowledged messages of
    a 60-message backlog and no more (without the Receive Maximum the broker would send
    them all); the next start, with a slow writer, gets every one of them once.

    Once acknowledgements flow, Mosquitto 2.0.11 sends past the Receive Maximum (see
    daemon/feeds/mqtt.py): the feed then says so in ``receive_maximum_exceeded``.
    """
    topic = unique_name("events")
    config = section(mqtt_broker, topic, receive_maximum=5)
    stuck = MqttFeed(config, StuckSink(committer, decoder, store.log.path))
    async with running(stuck) as task:
        await send(mqtt_broker, topic, [event(n) for n in range(60)])
        await until(lambda: stuck.stats()["unacked"] >= 5, task)
        await asyncio.sleep(0.5)  # time for more to arrive, if the broker sent more
        assert 5 == stuck.stats()["unacked"]
        assert 0 == stuck.acked
    again = MqttFeed(config, SlowSink(committer, decoder, store.log.path))
    async with running(again) as task:
        await until(lambda: again.acked == 60, task)
    assert [f"e-{n}" for n in range(60)] == logged_ids(store)
    stats = again.stats()
    assert (stats["max_unacked"] > 5) == (stats["receive_maximum_exceeded"] == 1)


async def test_dead_letters_are_copied_to_the_dead_letter_topic(
    mqtt_broker: MqttBroker, sink: FeedSink, store: Store
) -> None:
    """With dead_letter_topic set, a rejected payload is also published there, with its reason."""
    topic, dead_topic = unique_name("events"), unique_name("dead")
    feed = MqttFeed(section(mqtt_broker, topic, dead_letter_topic=dead_topic), sink)
    async with (
        aiomqtt.Client(
            mqtt_broker.host, mqtt_broker.port, protocol=aiomqtt.ProtocolVersion.V5
        ) as watcher,  # fmt: skip
        running(feed) as task,
    ):
        await watcher.subscribe(dead_topic, qos=1)
        await send(mqtt_broker, topic, [b"{not json", event(1)])
        await until(lambda: feed.acked == 2, task)
        async with asyncio.timeout(TIMEOUT_S):
            copy = await anext(watcher.messages)
        # the count follows the broker's PUBACK, which may come after the watcher's copy
        await until(lambda: feed.stats()["dead_letters_published"] >= 1, task)
    assert b"{not json" == copy.payload
    reason = dict(copy.properties.UserProperty)["reason"]  # type: ignore[union-attr]
    assert [("mqtt", b"{not json", reason)] == dead_letters(store)
    assert ["e-1"] == logged_ids(store)
    assert 1 == feed.stats()["dead_letters_published"]


async def test_publish_sends_every_payload_in_order_and_reports_progress(
    mqtt_broker: MqttBroker,
) -> None:
    """
    publish() with a window of 300 (held to Mosquitto's Receive Maximum of 100) sends
    every payload, in order; its on_sent calls add up to the count it returns.
    """
    topic, identifier = unique_name("events"), unique_name("sub")
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 60
    sent: list[int] = []
    async with aiomqtt.Client(mqtt_broker.host, mqtt_broker.port, identifier=identifier,
                              protocol=aiomqtt.ProtocolVersion.V5, clean_start=True,
                              properties=properties) as client:  # fmt: skip
        await client.subscribe(topic, qos=1)
        payloads = [str(n).encode() for n in range(300)]
        count = await publish(f"mqtt://{mqtt_broker.bootstrap}", topic, payloads,
                              on_sent=sent.append, window=300)  # fmt: skip
        received: list[bytes] = []
        async with asyncio.timeout(TIMEOUT_S):
            async for message in client.messages:
                received.append(message.payload)  # type: ignore[arg-type]
                if len(received) == 300:
                    break
    assert (300, 300) == (count, sum(sent))
    assert payloads == received


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker", BrokerAddress("broker", 1883, tls=False)),
        ("mqtts://broker", BrokerAddress("broker", 8883, tls=True)),
        ("mqtt://10.0.0.1:1999/", BrokerAddress("10.0.0.1", 1999, tls=False)),
        ("mqtt://[::1]:1884", BrokerAddress("::1", 1884, tls=False)),
        (
            "mqtt://me:p%40ss@broker",
            BrokerAddress("broker", 1883, tls=False, username="me", password="p@ss"),  # noqa: S106
        ),
    ],
)
def test_urls_give_host_port_and_tls(url: str, expected: BrokerAddress) -> None:
    """Default ports are 1883 (mqtt://) and 8883 (mqtts://, TLS)."""
    assert expected == parse_url(url, what="[mqtt].url")


@pytest.mark.parametrize(
    "url",
    ["http://broker", "mqtt://", "mqtt://broker:99999", "mqtt://broker/topic",
     "mqtt://me:secret@broker?x=1", "broker:1883"],
)  # fmt: skip
def test_bad_urls_are_refused_naming_the_key(url: str) -> None:
    """A bad url is a ValueError naming [mqtt].url, without the password in it."""
    with pytest.raises(ValueError, match=r"^\[mqtt\]\.url: expected mqtt://") as error:
        parse_url(url, what="[mqtt].url")
    assert "secret" not in str(error.value)


def test_bad_settings_stop_the_feed_at_construction(tmp_path: Path, sink: FeedSink) -> None:
    """Credentials in the url, an unreadable password file or CA bundle: errors naming the key."""
    with pytest.raises(ValueError, match=r"\[mqtt\]\.url: no credentials"):
        MqttFeed(MqttSection(url="mqtt://me:secret@broker"), sink)
    with pytest.raises(ValueError, match=r"\[mqtt\]\.password_file: cannot read"):
        MqttFeed(MqttSection(url="mqtt://broker", password_file=str(tmp_path / "nope")), sink)
    (tmp_path / "ca.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match=r"\[mqtt\]\.ca_file: cannot load"):
        MqttFeed(MqttSection(url="mqtts://broker", ca_file=str(tmp_path / "ca.pem")), sink)


async def test_one_read_takes_every_message_waiting(mqtt_broker: MqttBroker) -> None:
    """
    paho reads one packet per ``loop_read()`` (aiomqtt calls it once per readable event
    of the socket); with `read_in_bursts` one call takes every message already there.
    """
    topic, waiting = unique_name("burst"), 20
    got: list[bytes] = []
    sub = paho_client.Client(CallbackAPIVersion.VERSION2, client_id=unique_name("sub"),
                             protocol=paho_client.MQTTv5)  # fmt: skip
    sub.on_message = lambda _c, _u, message: got.append(message.payload)
    sub.connect(mqtt_broker.host, mqtt_broker.port)
    try:
        sub.subscribe(topic, qos=1)
        for _ in range(20):  # CONNACK, SUBACK
            sub.loop(timeout=0.05)
        url = f"mqtt://{mqtt_broker.host}:{mqtt_broker.port}"
        await publish(url, topic, [b"m%d" % k for k in range(waiting)])
        await asyncio.sleep(0.5)  # all of them in the subscriber's socket buffer
        sub.loop_read()
        assert [b"m0"] == got  # paho alone: one packet
        read_in_bursts(sub)
        sub.loop_read()
        assert [b"m%d" % k for k in range(waiting)] == got
    finally:
        sub.disconnect()
