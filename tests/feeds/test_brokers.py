"""
Smoke tests of the real brokers the feeds will read: what aiokafka and aiomqtt get
from them across consumer groups, disconnections, clean restarts and kills.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import aiomqtt
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from brokers import KafkaBroker, MqttBroker, unique_name
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

pytestmark = pytest.mark.brokers

#: Bound on each test's broker traffic (restarts excluded): far above what it needs.
TIMEOUT_S = 30


async def produce(broker: KafkaBroker, topic: str, n: int) -> None:
    """Send ``n`` keyed messages (value ``str(i)``), each acknowledged by the broker."""
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    try:
        for i in range(n):
            await producer.send_and_wait(topic, str(i).encode(), key=f"key-{i}".encode())
    finally:
        await producer.stop()


async def consume(consumer: AIOKafkaConsumer, n: int) -> list[tuple[int, int, str]]:
    """
    ``(partition, offset, value)`` of the next ``n`` records, after checking that no
    further record arrives within 0.5 s.
    """
    records: list[tuple[int, int, str]] = []
    while len(records) < n:
        batches = await consumer.getmany(timeout_ms=500)
        records += [(r.partition, r.offset, r.value.decode()) for b in batches.values() for r in b]
    extra = await consumer.getmany(timeout_ms=500)
    assert {} == extra
    return records


async def read_back(broker: KafkaBroker, topic: str, n: int) -> list[str]:
    """The values of ``topic``'s first ``n`` records, read from the start without a group."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=broker.bootstrap, group_id=None,
        enable_auto_commit=False, auto_offset_reset="earliest",
    )  # fmt: skip
    await consumer.start()
    try:
        return sorted((value for _, _, value in await consume(consumer, n)), key=int)
    finally:
        await consumer.stop()


async def test_kafka_group_consumes_every_message_once(kafka_broker: KafkaBroker) -> None:
    """
    100 keyed messages on a 4-partition topic reach a consumer group (auto-commit off)
    each exactly once, in offset order per partition, and its explicit commit is kept.
    """
    topic = unique_name("smoke")
    async with asyncio.timeout(TIMEOUT_S):
        await kafka_broker.create_topic(topic, partitions=4)
        await produce(kafka_broker, topic, 100)
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=kafka_broker.bootstrap, group_id=unique_name("group"),
            enable_auto_commit=False, auto_offset_reset="earliest",
        )  # fmt: skip
        await consumer.start()
        try:
            records = await consume(consumer, 100)
            await consumer.commit()
            committed = {p: await consumer.committed(TopicPartition(topic, p)) for p in range(4)}
        finally:
            await consumer.stop()
    per_partition = Counter(partition for partition, _, _ in records)
    assert [str(i) for i in range(100)] == sorted((v for _, _, v in records), key=int)
    assert {0, 1, 2, 3} == set(per_partition)  # 100 distinct keys hash onto every partition
    for p, count in per_partition.items():
        assert list(range(count)) == [o for q, o, _ in records if q == p]
    assert dict(per_partition) == committed


async def test_kafka_restart_keeps_messages(kafka_broker: KafkaBroker) -> None:
    """Messages acknowledged before a clean stop are all there after a start on the same dir."""
    topic = unique_name("restart")
    async with asyncio.timeout(TIMEOUT_S):
        await kafka_broker.create_topic(topic, partitions=2)
        await produce(kafka_broker, topic, 20)
    try:
        await asyncio.to_thread(kafka_broker.stop)
        assert not kafka_broker.running
    finally:
        await asyncio.to_thread(kafka_broker.start)
    async with asyncio.timeout(TIMEOUT_S):
        assert [str(i) for i in range(20)] == await read_back(kafka_broker, topic, 20)


async def test_kafka_kill_keeps_acknowledged_messages(kafka_broker: KafkaBroker) -> None:
    """
    A SIGKILL of the broker loses no acknowledged message: the segments are in the page
    cache, which outlives the process (a power cut would not be covered).
    """
    topic = unique_name("kill")
    async with asyncio.timeout(TIMEOUT_S):
        await kafka_broker.create_topic(topic, partitions=2)
        await produce(kafka_broker, topic, 20)
    try:
        await asyncio.to_thread(kafka_broker.kill)
        assert not kafka_broker.running
    finally:
        await asyncio.to_thread(kafka_broker.start)
    async with asyncio.timeout(TIMEOUT_S):
        assert [str(i) for i in range(20)] == await read_back(kafka_broker, topic, 20)


def mqtt_client(broker: MqttBroker, identifier: str | None = None) -> aiomqtt.Client:
    """
    An MQTT 5 client. With ``identifier`` its session is persistent: Clean Start = 0 on
    every connect (aiomqtt's default cleans the first one of each Client) and a session
    expiry of an hour (0, the default, would end the session at disconnect).
    """
    if identifier is None:
        return aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 3600
    return aiomqtt.Client(
        broker.host, broker.port, identifier=identifier, protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False, properties=properties,
    )  # fmt: skip


async def subscribe_and_leave(broker: MqttBroker, identifier: str, topic: str) -> None:
    """Open ``identifier``'s session with a QoS 1 subscription to ``topic``, then disconnect."""
    async with mqtt_client(broker, identifier) as client:
        await client.subscribe(topic, qos=1)


async def publish(broker: MqttBroker, topic: str, n: int) -> None:
    """Publish ``str(i)`` for i < n at QoS 1; each call returns after the broker's PUBACK."""
    async with mqtt_client(broker) as client:
        for i in range(n):
            await client.publish(topic, str(i), qos=1)


async def receive(broker: MqttBroker, identifier: str, n: int) -> list[str]:
    """Reconnect ``identifier`` (no new subscription) and take the first ``n`` messages."""
    payloads: list[str] = []
    async with mqtt_client(broker, identifier) as client:
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            payloads.append(message.payload.decode())
            if len(payloads) == n:
                break
    return payloads


async def test_mqtt_persistent_session_gets_messages_sent_while_away(
    mqtt_broker: MqttBroker,
) -> None:
    """QoS 1 messages published while a persistent-session subscriber is away reach it."""
    identifier, topic = unique_name("sub"), unique_name("events")
    async with asyncio.timeout(TIMEOUT_S):
        await subscribe_and_leave(mqtt_broker, identifier, topic)
        await publish(mqtt_broker, topic, 50)
        assert [str(i) for i in range(50)] == await receive(mqtt_broker, identifier, 50)


async def test_mqtt_restart_keeps_queued_messages(mqtt_broker: MqttBroker) -> None:
    """A persistent session's queued QoS 1 messages survive a clean restart of Mosquitto."""
    identifier, topic = unique_name("sub"), unique_name("events")
    async with asyncio.timeout(TIMEOUT_S):
        await subscribe_and_leave(mqtt_broker, identifier, topic)
        await publish(mqtt_broker, topic, 50)
        try:
            await asyncio.to_thread(mqtt_broker.stop)
            assert not mqtt_broker.running
        finally:
            await asyncio.to_thread(mqtt_broker.start)
        assert [str(i) for i in range(50)] == await receive(mqtt_broker, identifier, 50)


async def test_mqtt_kill_keeps_saved_queued_messages(mqtt_broker: MqttBroker) -> None:
    """
    With a save after every change (scripts/mosquitto), queued QoS 1 messages survive a
    SIGKILL of Mosquitto once it has saved them. It saves at the end of the loop turn
    in which it sent the PUBACK, so a kill right after a PUBACK can still lose that
    turn's messages: the test gives the broker that turn before it kills.
    """
    identifier, topic = unique_name("sub"), unique_name("events")
    async with asyncio.timeout(TIMEOUT_S):
        await subscribe_and_leave(mqtt_broker, identifier, topic)
        await publish(mqtt_broker, topic, 50)
        await asyncio.sleep(0.2)
        try:
            await asyncio.to_thread(mqtt_broker.kill)
            assert not mqtt_broker.running
        finally:
            await asyncio.to_thread(mqtt_broker.start)
        assert [str(i) for i in range(50)] == await receive(mqtt_broker, identifier, 50)
