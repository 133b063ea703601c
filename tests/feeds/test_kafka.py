"""
The Kafka feed in-process against the real broker: a real :class:`eventstore.Store`
on a temporary directory behind a real :class:`GroupCommitter` and :class:`FeedSink`,
the feed running as a task, events produced with :func:`daemon.feeds.kafka.publish`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from brokers import KafkaBroker, unique_name

from daemon.config import KafkaSection
from daemon.feeds import FeedSink
from daemon.feeds.kafka import KafkaFeed, publish
from eventstore import EventDecoder, GroupCommitter, Store

pytestmark = pytest.mark.brokers

#: Bound on each wait for the feed (far above what it needs).
TIMEOUT_S = 60
#: Event time of ``e-0``: tests/conftest.py's T0, which its ``decoder`` takes as past.
T0 = 1764250000.0


def event(k: int, **fields: Any) -> bytes:
    """Click ``e-<k>`` as JSON; ``field=...`` leaves a field out."""
    obj = {"type": "click", "id": f"e-{k}", "user": f"u-{k % 40}", "item": f"i-{k % 11}",
           "ts": T0 + k} | fields  # fmt: skip
    return json.dumps({name: value for name, value in obj.items() if value is not ...}).encode()


def payloads(first: int, n: int) -> list[bytes]:
    """Events ``e-<first>`` .. ``e-<first + n - 1>``, spread over 40 users."""
    return [event(k) for k in range(first, first + n)]


def section(broker: KafkaBroker, topic: str, **fields: Any) -> KafkaSection:
    """A ``[kafka]`` section for one test: its own group and instance id."""
    group = unique_name("group")
    return replace(
        KafkaSection(bootstrap=broker.bootstrap, topics=(topic,), group_id=group,
                     instance_id=f"{group}-a", session_timeout_s=10.0),
        **fields,
    )  # fmt: skip


def log_ids(store: Store) -> list[str]:
    """Every event id in the store's log, read on a connection of our own."""
    with contextlib.closing(sqlite3.connect(f"file:{store.log.path}?mode=ro", uri=True)) as db:
        return [row[0] for row in db.execute("SELECT id FROM events")]


def stored_positions(store: Store, topic: str) -> dict[str, Any]:
    path = store.log.path
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT partition, position FROM feed_positions WHERE feed = ?", (f"kafka:{topic}",)
        )
        return dict(rows.fetchall())


async def end_offsets(broker: KafkaBroker, topic: str, partitions: int) -> dict[str, int]:
    """Each partition's end offset (the next offset to be written), by partition number."""
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return {str(tp.partition): offset for tp, offset in ends.items()}


async def committed_in_kafka(broker: KafkaBroker, group: str) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


async def wait_until(check: Callable[[], bool], what: str, *feeds: KafkaFeed,
                     timeout_s: float = TIMEOUT_S) -> None:  # fmt: skip
    """Poll ``check`` until it holds; fail naming ``what`` (and the ``feeds``' stats)."""
    try:
        async with asyncio.timeout(timeout_s):
            while not check():  # noqa: ASYNC110 - the feed has no event to wait on
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}: {[feed.stats() for feed in feeds]}")


@contextlib.asynccontextmanager
async def running(store: Store, decoder: EventDecoder, config: KafkaSection,
                  ) -> AsyncIterator[KafkaFeed]:  # fmt: skip
    """The feed on ``store`` as a task, cancelled (as SIGTERM does) on the way out."""
    committer = GroupCommitter(store.append, dead_letter_sink=store.log.dead_letters)
    feed = KafkaFeed(config, FeedSink(committer, decoder, store.log.path), retry_min_s=0.2)
    task = asyncio.create_task(feed.run(), name="test.kafka_feed")
    try:
        yield feed
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.to_thread(committer.close)


async def make_topic(broker: KafkaBroker, partitions: int = 4) -> str:
    topic = unique_name("events")
    await broker.create_topic(topic, partitions=partitions)
    return topic


async def send(broker: KafkaBroker, topic: str, items: Iterable[bytes]) -> int:
    return await publish(broker.bootstrap, topic, items)


async def test_events_across_partitions_arrive_exactly_once(
    kafka_broker: KafkaBroker, store: Store, decoder: EventDecoder
) -> None:
    """
    Events published over 4 partitions are each in the log once, and the stored
    positions are each partition's end offset.
    """
    topic = await make_topic(kafka_broker)
    sent = payloads(0, 600)
    assert 300 == await send(kafka_broker, topic, sent[:300])
    async with running(store, decoder, section(kafka_broker, topic)) as feed:
        assert 300 == await send(kafka_broker, topic, sent[300:])  # while it runs
        await wait_until(lambda: feed.stats()["records"] >= 600, "600 records")
        stats = feed.stats()
    ends = await end_offsets(kafka_broker, topic, 4)
    ids = log_ids(store)
    assert sorted(f"e-{k}" for k in range(600)) == sorted(ids)
    assert 4 == sum(1 for offset in ends.values() if offset > 0)  # every partition used
    assert ends == stored_positions(store, topic)
    assert (600, 600, 0) == (stats["records"], stats["accepted"], stats["duplicates"])


async def test_bad_records_are_dead_lettered_and_do_not_block(
    kafka_broker: KafkaBroker, store: Store, decoder: EventDecoder
) -> None:
    """
    Records with no value, not JSON, invalid or oversized are dead letters with their
    reasons; the good records after them on the same partition still arrive.
    """
    topic = await make_topic(kafka_broker, partitions=1)
    oversized = event(90, item="x" * 70_000)
    bad = [b"{not json", event(91, item=...), oversized]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
    await producer.start()
    try:
        for value in [*payloads(0, 5), None, *bad, *payloads(5, 5)]:
            await producer.send_and_wait(topic, value, key=b"k")
    finally:
        await producer.stop()
    async with running(store, decoder, section(kafka_broker, topic)) as feed:
        await wait_until(lambda: feed.stats()["records"] >= 14, "14 records")
        stats = feed.stats()
    dead = sorted(store.log.read_dead_letters(), key=lambda d: d.seq)
    assert sorted(f"e-{k}" for k in range(10)) == sorted(log_ids(store))
    assert (4, 10) == (stats["dead_lettered"], stats["accepted"])
    assert [b"", b"{not json", bad[1], oversized] == [d.raw for d in dead]
    assert ["kafka"] * 4 == [d.source for d in dead]
    assert "no value" in dead[0].reason
    assert "JSON" in dead[1].reason or "json" in dead[1].reason
    assert "item" in dead[2].reason
    assert "larger than" in dead[3].reason
    assert {"0": 14} == stored_positions(store, topic)


async def test_restart_resumes_from_the_log_without_kafka_offsets(
    kafka_broker: KafkaBroker, store: Store, decoder: EventDecoder
) -> None:
    """
    With ``commit_offsets = false`` Kafka holds no offsets for the group; a restarted
    feed reads on from the positions in the log: nothing again, new events still.
    """
    topic = await make_topic(kafka_broker)
    config = section(kafka_broker, topic, commit_offsets=False)
    await send(kafka_broker, topic, payloads(0, 200))
    async with running(store, decoder, config) as feed:
        await wait_until(lambda: feed.stats()["records"] >= 200, "200 records")
    assert {} == await committed_in_kafka(kafka_broker, config.group_id)
    await send(kafka_broker, topic, payloads(200, 100))
    async with running(store, decoder, config) as feed:
        await wait_until(lambda: feed.stats()["records"] >= 100, "100 new records")
        await asyncio.sleep(0.5)  # a re-read from the start would still be coming
        stats = feed.stats()
    assert (100, 100, 0) == (stats["records"], stats["accepted"], stats["duplicates"])
    assert sorted(f"e-{k}" for k in range(300)) == sorted(log_ids(store))


async def test_commits_durable_offsets_to_kafka(
    kafka_broker: KafkaBroker, store: Store, decoder: EventDecoder
) -> None:
    """With ``commit_offsets`` on, Kafka's committed offsets reach the stored positions."""
    topic = await make_topic(kafka_broker)
    config = section(kafka_broker, topic)
    await send(kafka_broker, topic, payloads(0, 300))
    async with running(store, decoder, config) as feed:
        await wait_until(lambda: feed.stats()["records"] >= 300, "300 records")
        await wait_until(lambda: feed.stats()["commits"] >= 1, "a commit")
        committed: dict[TopicPartition, int] = {}
        for _ in range(100):
            committed = await committed_in_kafka(kafka_broker, config.group_id)
            if {str(tp.partition): o for tp, o in committed.items()} == stored_positions(
                store, topic
            ):
                break
            await asyncio.sleep(0.1)
    assert stored_positions(store, topic) == {str(tp.partition): o for tp, o in committed.items()}


async def trickle(broker: KafkaBroker, topic: str, until: Callable[[], bool]) -> int:
    """Publish chunks of 100 events (from ``e-0``) until ``until()``, then 5 more; the count."""
    sent, extra = 0, 5
    while extra:
        sent += await send(broker, topic, payloads(sent, 100))
        extra -= until()
        await asyncio.sleep(0.05)
    return sent


async def test_a_second_member_takes_over_without_overlap(
    kafka_broker: KafkaBroker, tmp_path: Path, decoder: EventDecoder
) -> None:
    """
    A second feed joining the group mid-stream takes half the partitions over where
    the first one stopped: across both logs every event is there exactly once. With
    ``commit_offsets`` off, only the commit on revocation tells it where that was.
    """
    topic = await make_topic(kafka_broker)
    first = section(kafka_broker, topic, commit_offsets=False)
    second = replace(first, instance_id=f"{first.group_id}-b")
    stores = [Store(tmp_path / name, decoder=decoder, snapshot_every=0) for name in "ab"]
    try:
        async with running(stores[0], decoder, first) as a:
            feeds = [a]
            second_has_some = lambda: len(feeds) > 1 and feeds[1].stats()["records"] > 0  # noqa: E731
            producing = asyncio.create_task(trickle(kafka_broker, topic, second_has_some))
            await wait_until(lambda: a.stats()["records"] >= 300, "300 records in a")
            async with running(stores[1], decoder, second) as b:
                feeds.append(b)
                sent = await producing
                await wait_until(lambda: a.stats()["records"] + b.stats()["records"] >= sent,
                                 f"{sent} records in a and b", a, b)  # fmt: skip
                await asyncio.sleep(0.5)  # a repeat would still be coming
                stats = [a.stats(), b.stats()]
        ids = [log_ids(s) for s in stores]
    finally:
        for s in stores:
            s.close(snapshot=False)
    assert sorted(f"e-{k}" for k in range(sent)) == sorted(ids[0] + ids[1])
    assert [2, 2] == [s["partitions"] for s in stats]
    assert stats[0]["rebalances"] >= 2  # the first assignment, then the hand-over
    assert [0, 0] == [s["duplicates"] for s in stats]


async def read_topic(broker: KafkaBroker, topic: str, n: int) -> list[Any]:
    """The first ``n`` records of ``topic`` (all partitions), read without a group."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=broker.bootstrap, group_id=None,
                                auto_offset_reset="earliest")  # fmt: skip
    await consumer.start()
    records: list[Any] = []
    try:
        async with asyncio.timeout(TIMEOUT_S):
            while len(records) < n:
                batches = await consumer.getmany(timeout_ms=500)
                records += [r for batch in batches.values() for r in batch]
    finally:
        await consumer.stop()
    return records


async def test_publish_keys_each_event_by_its_user(kafka_broker: KafkaBroker) -> None:
    """
    publish keys records by the event's user (so a user's events share a partition),
    leaves records it cannot read a user from unkeyed, and reports every send.
    """
    topic = await make_topic(kafka_broker)
    events = [event(k, user=f"p-{k % 5}") for k in range(200)]
    unkeyed = [b"[" + event(500) + b"]", b"not json", event(501, user=...)]
    acknowledged: list[int] = []
    sent = await publish(kafka_broker.bootstrap, topic, [*events, *unkeyed],
                         on_sent=acknowledged.append, max_in_flight=16)  # fmt: skip
    records = await read_topic(kafka_broker, topic, 203)
    partitions: dict[bytes, set[int]] = {}
    for r in records:
        if r.key is not None:
            partitions.setdefault(r.key, set()).add(r.partition)
    assert (203, 203) == (sent, sum(acknowledged))
    assert {f"p-{u}".encode(): 1 for u in range(5)} == {k: len(p) for k, p in partitions.items()}
    assert {json.loads(r.value)["user"].encode() for r in records if r.key} == set(partitions)
    assert sorted(unkeyed) == sorted(r.value for r in records if r.key is None)


async def test_dead_letters_are_also_produced_to_the_dead_letter_topic(
    kafka_broker: KafkaBroker, store: Store, decoder: EventDecoder
) -> None:
    """With ``dead_letter_topic`` set, a rejected record is produced there with its reason."""
    topic, dead_topic = await make_topic(kafka_broker, 1), await make_topic(kafka_broker, 1)
    await send(kafka_broker, topic, [event(0), b"{not json", event(1)])
    config = section(kafka_broker, topic, dead_letter_topic=dead_topic)
    async with running(store, decoder, config) as feed:
        await wait_until(lambda: feed.stats()["dead_letters_produced"] >= 1, "a dead letter")
        stats = feed.stats()
    (record,) = await read_topic(kafka_broker, dead_topic, 1)
    headers = dict(record.headers)
    assert b"{not json" == record.value
    assert store.log.read_dead_letters()[0].reason.encode() == headers["rerankd-reason"]
    assert f"{topic}/0@1".encode() == headers["rerankd-origin"]
    assert (2, 1, 0) == (
        stats["accepted"],
        stats["dead_lettered"],
        stats["dead_letters_not_produced"],
    )


async def test_a_feed_started_while_the_broker_is_down_connects_when_it_is_up(
    kafka_broker: KafkaBroker, store: Store, decoder: EventDecoder
) -> None:
    """The feed retries a failed start with back-off, and consumes once the broker is back."""
    topic = await make_topic(kafka_broker)
    await send(kafka_broker, topic, payloads(0, 100))
    try:
        await asyncio.to_thread(kafka_broker.stop)
        async with running(store, decoder, section(kafka_broker, topic)) as feed:
            await wait_until(lambda: feed.stats()["errors"] >= 2, "two failed starts")
            down = feed.stats()
            await asyncio.to_thread(kafka_broker.start)
            await wait_until(lambda: feed.stats()["records"] >= 100, "100 records")
            up = feed.stats()
    finally:
        await asyncio.to_thread(kafka_broker.start)
    assert (False, 0) == (down["connected"], down["connects"])
    assert (True, 1) == (up["connected"], up["connects"])
    assert sorted(f"e-{k}" for k in range(100)) == sorted(log_ids(store))


class _GatedSink(FeedSink):
    """A FeedSink whose appends wait at a gate (the writer is behind) and are counted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.calls: list[int] = []  # events per append, in call order

    async def append(self, events: Any, **kwargs: Any) -> Any:
        self.calls.append(len(events))
        await self.gate.wait()
        return await super().append(events, **kwargs)


async def test_the_feed_stops_fetching_while_an_append_waits(
    kafka_broker: KafkaBroker, store: Store, decoder: EventDecoder
) -> None:
    """
    While the writer is behind, the feed holds one batch (at most max_batch records)
    and asks for no more, however long the backlog; once the writer catches up, every
    record arrives once.
    """
    topic = await make_topic(kafka_broker, partitions=1)
    assert 2_000 == await send(kafka_broker, topic, payloads(0, 2_000))
    committer = GroupCommitter(store.append, dead_letter_sink=store.log.dead_letters)
    sink = _GatedSink(committer, decoder, store.log.path)
    feed = KafkaFeed(section(kafka_broker, topic, max_batch=100), sink, retry_min_s=0.2)
    task = asyncio.create_task(feed.run(), name="test.kafka_feed")
    try:
        await wait_until(lambda: len(sink.calls) >= 1, "the first append", feed)
        await asyncio.sleep(1.0)  # time enough for more getmany calls, were there any
        held = list(sink.calls)
        records_while_held = feed.stats()["records"]
        sink.gate.set()
        await wait_until(lambda: feed.stats()["records"] >= 2_000, "2,000 records", feed)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.to_thread(committer.close)
    assert 1 == len(held)
    assert 0 < held[0] <= 100
    assert 0 == records_while_held
    assert sorted(f"e-{k}" for k in range(2_000)) == sorted(log_ids(store))
    assert all(n <= 100 for n in sink.calls)
