"""
Network faults between rerankd and its brokers: latency, dropped connections and a
black hole, each injected by a TCP proxy on loopback (``proxy.FaultProxy``) in front
of Kafka and in front of Mosquitto while events keep being published to both.

Kafka clients connect to the broker's *advertised* address after bootstrapping, so the
Kafka here is a broker of this module's own with a second listener that advertises the
proxy's port (``KafkaBroker(proxied=...)``): the daemon bootstraps through the proxy
and stays behind it, while the test's producer uses the direct listener. Mosquitto is
the session's shared broker, reached through a proxy of each test's own.

Each test asserts that the daemon recovers by itself (the same process throughout, no
restart) within a bound, that every published event is in its log exactly once and
nothing else is, and that its state equals a fresh fold of the log, live (through the
socket API) and in the snapshot it writes on a clean stop.

Timeouts that matter: the daemon's MQTT keep-alive is 5 s (paho gives up after about
two silent intervals; short enough to notice, long enough for a loaded CI machine
under 200 ms of latency) and its Kafka session 6 s; aiokafka's request timeout stays at its
default, 40 s: only then does a black-holed consumer drop its group coordinator, which
is when the feed reports ``connected: false``. The black hole therefore lasts until
both feeds report it (about 45 s; 120 s at least under ``--long``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _ledger import check_live_state, check_stopped_state, event, log_ids, once_each
from brokers import KafkaBroker, MqttBroker, free_ports, unique_name
from daemons import Daemon
from proxy import FaultProxy

from daemon.feeds.kafka import publish as kafka_publish
from daemon.feeds.mqtt import publish as mqtt_publish

pytestmark = [pytest.mark.chaos, pytest.mark.brokers]

SESSION_TIMEOUT_S = 6.0
KEEPALIVE_S = 5
#: After a fault ends, the bound on everything published having arrived.
RECOVER_S = 90.0
#: Bound on both feeds reporting the black hole (aiokafka's 40 s request timeout + slack).
NOTICE_S = 100.0
LATENCY_S = 0.2
USERS = [f"u-{k}" for k in range(40)]  # the users of _ledger.event


@pytest.fixture(name="proxied_kafka", scope="module")
def fixture_proxied_kafka(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[KafkaBroker, FaultProxy]]:
    """A Kafka of this module's own whose second listener is reached through a proxy."""
    port, controller_port, proxied_port, proxy_port = free_ports(4)
    with FaultProxy(("127.0.0.1", proxied_port), port=proxy_port) as proxy:
        broker = KafkaBroker(tmp_path_factory.mktemp("kafka-proxied"), port, controller_port,
                             proxied=(proxied_port, proxy_port))  # fmt: skip
        try:
            broker.start()
            yield broker, proxy
        finally:
            broker.stop()


@dataclass
class Net:
    """A daemon whose feeds both go through proxies, and what was published to them."""

    daemon: Daemon
    kafka: KafkaBroker
    mqtt: MqttBroker
    kafka_proxy: FaultProxy
    mqtt_proxy: FaultProxy
    topic: str
    published: list[str] = field(default_factory=list)
    _n: Iterator[int] = field(default_factory=itertools.count)

    @property
    def proxies(self) -> tuple[FaultProxy, FaultProxy]:
        return self.kafka_proxy, self.mqtt_proxy

    async def publish(self, tag: str, n: int = 100) -> list[str]:
        """``n`` new events to Kafka and ``n`` to MQTT, straight to the brokers."""
        kafka = [(f"{tag}-k{k}", next(self._n)) for k in range(n)]
        mqtt = [(f"{tag}-m{k}", next(self._n)) for k in range(n)]
        assert n == await kafka_publish(self.kafka.bootstrap, self.topic,
                                        [event(key, i) for key, i in kafka])  # fmt: skip
        assert n == await mqtt_publish(f"mqtt://{self.mqtt.bootstrap}", self.topic,
                                       [event(key, i) for key, i in mqtt])  # fmt: skip
        ids = [key for key, _ in kafka + mqtt]
        self.published += ids
        return ids

    def ids(self) -> list[str]:
        return log_ids(self.daemon.tmp / "data")

    def feeds(self) -> dict[str, Any]:
        with self.daemon.client() as client:
            feeds: dict[str, Any] = client.request("stats")["feeds"]
        return feeds

    def connected(self) -> tuple[bool, bool]:
        feeds = self.feeds()
        return feeds["kafka"]["connected"], feeds["mqtt"]["connected"]

    async def until(self, check: Any, what: str, timeout_s: float) -> float:
        """Poll ``check`` (in a thread) until true; the seconds it took, or fail."""
        t0 = time.monotonic()
        while not await asyncio.to_thread(check):
            if time.monotonic() - t0 > timeout_s:
                pytest.fail(f"not within {timeout_s:.0f} s: {what}")
            await asyncio.sleep(0.2)
        return time.monotonic() - t0

    async def arrived(self, ids: list[str], timeout_s: float = RECOVER_S) -> float:
        wanted = set(ids)
        return await self.until(lambda: wanted <= set(self.ids()),
                                f"{len(ids)} events in the log", timeout_s)  # fmt: skip


@pytest.fixture(name="net")
async def fixture_net(
    tmp_path: Path, proxied_kafka: tuple[KafkaBroker, FaultProxy], mqtt_broker: MqttBroker
) -> AsyncIterator[Net]:
    """A daemon on fresh topics behind both proxies, READY and with both feeds connected."""
    kafka, kafka_proxy = proxied_kafka
    topic = unique_name("net")
    await kafka.create_topic(topic, partitions=2)
    with FaultProxy(("127.0.0.1", mqtt_broker.port)) as mqtt_proxy:
        group = unique_name("group")
        config = (
            f'[kafka]\nbootstrap = "{kafka_proxy.address}"\ntopics = ["{topic}"]\n'
            f'group_id = "{group}"\ninstance_id = "{group}-a"\n'
            f"session_timeout_s = {SESSION_TIMEOUT_S}\n"
            f'[mqtt]\nurl = "mqtt://{mqtt_proxy.address}"\ntopics = ["{topic}"]\n'
            f'client_id = "{unique_name("rerankd")}"\nkeepalive_s = {KEEPALIVE_S}\n'
            "reconnect_min_s = 0.1\nreconnect_max_s = 1.0\n"
            "[ranking]\ntrain_on_start = false\n"
        )
        daemon = Daemon(tmp_path, config)
        net = Net(daemon, kafka, mqtt_broker, kafka_proxy, mqtt_proxy, topic)
        try:
            await asyncio.to_thread(daemon.wait_for, "READY=1")
            # MQTT keeps nothing for a client id before its first subscription
            await net.until(lambda: all(net.connected()), "both feeds connected", 60)
            yield net
        finally:
            kafka_proxy.heal()
            daemon.close()


async def finish(net: Net) -> None:
    """
    The same daemon process ran throughout; every published event is in the log once
    and nothing else is; its live state, then its stop snapshot, equal a fresh fold.
    """
    await net.arrived(net.published)
    await asyncio.sleep(1.0)  # a repeat would still be coming
    logged = net.ids()
    assert {} == once_each(logged, net.published)
    assert sorted(net.published) == sorted(logged)
    assert net.daemon.proc.poll() is None
    assert 1 == net.daemon.received().count("READY=1")  # never restarted
    await asyncio.to_thread(check_live_state, net.daemon, USERS)
    assert 0 == await asyncio.to_thread(net.daemon.stop)
    await asyncio.to_thread(check_stopped_state, net.daemon)


async def test_latency_slows_both_feeds_but_loses_nothing(net: Net) -> None:
    """
    With 200 ms added each way on both feeds, events published meanwhile arrive without
    a reconnect; after healing, later ones too; each exactly once.
    """
    before = await net.publish("before")
    await net.arrived(before)
    for proxy in net.proxies:
        proxy.latency(LATENCY_S)
    during = await net.publish("during")
    await net.arrived(during)
    stats = await asyncio.to_thread(net.feeds)
    for proxy in net.proxies:
        proxy.heal()
    await net.publish("after")
    await finish(net)
    assert (True, 1) == (stats["kafka"]["connected"], stats["kafka"]["connects"])
    assert (True, 1, 0) == (stats["mqtt"]["connected"], stats["mqtt"]["connects"],
                            stats["mqtt"]["disconnects"])  # fmt: skip


async def test_dropped_connections_are_reopened_without_loss(net: Net, long_run) -> None:
    """
    Both proxies reset every connection (RST) again and again while events are
    published: the feeds reconnect by themselves, and every event arrives once.
    """
    drops = 10 if long_run else 3
    await net.arrived(await net.publish("before"))
    accepted = [proxy.accepted for proxy in net.proxies]
    reset = [0, 0]
    for k in range(drops):
        publishing = asyncio.create_task(net.publish(f"drop{k}"))
        await asyncio.sleep(0.3)
        for j, proxy in enumerate(net.proxies):
            reset[j] += proxy.drop()
        await publishing
        await asyncio.sleep(1.0)
    await net.publish("after")
    took = await net.arrived(net.published)
    stats = await asyncio.to_thread(net.feeds)
    await finish(net)
    assert took < RECOVER_S
    assert all(n >= 1 for n in reset), reset  # the drops found connections to reset
    assert all(proxy.accepted > n for proxy, n in zip(net.proxies, accepted, strict=True))
    assert stats["mqtt"]["disconnects"] >= 1
    assert stats["kafka"]["connected"]
    assert stats["mqtt"]["connected"]


async def test_blackhole_longer_than_client_timeouts_then_heal(net: Net, long_run) -> None:
    """
    Both proxies black-hole everything until both feeds report being disconnected
    (and for at least 120 s under --long); nothing published meanwhile gets through.
    After healing, both feeds reconnect by themselves and every event arrives once.
    """
    hold_s = 120.0 if long_run else 0.0
    await net.arrived(await net.publish("before"))
    for proxy in net.proxies:
        proxy.blackhole(True)  # noqa: FBT003
    started = time.monotonic()
    during = await net.publish("during")
    noticed = await net.until(lambda: not any(net.connected()), "both feeds disconnected",
                              NOTICE_S)  # fmt: skip
    await asyncio.sleep(max(0.0, hold_s - (time.monotonic() - started)))
    through = set(during) & set(net.ids())
    held = time.monotonic() - started
    for proxy in net.proxies:
        proxy.heal()
    reconnected = await net.until(lambda: all(net.connected()), "both feeds reconnected",
                                  RECOVER_S)  # fmt: skip
    await net.publish("after")
    took = await net.arrived(net.published)
    stats = await asyncio.to_thread(net.feeds)
    await finish(net)
    assert set() == through
    assert held > SESSION_TIMEOUT_S + 2 * KEEPALIVE_S
    assert noticed < NOTICE_S
    assert reconnected + took < 2 * RECOVER_S
    assert stats["mqtt"]["disconnects"] >= 1
    assert stats["kafka"]["connects"] >= 2
