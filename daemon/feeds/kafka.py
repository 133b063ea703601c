"""
The Kafka feed: a consumer group member whose offsets live in the event log.

Each batch from :meth:`AIOKafkaConsumer.getmany` becomes one :meth:`FeedSink.append`:
the good events, the bad records with their reasons (dead letters) and, per
partition, the next offset to read (the last consumed offset + 1, Kafka's
convention) under ``("kafka:<topic>", "<partition>")``, all in one transaction. The
log is therefore the authority on what this daemon has consumed, and auto-commit is
off: aiokafka's auto-commit commits what ``getmany`` handed out, not what was made
durable (see ``RELIABILITY.md``).

Where reading starts. On every assignment the feed seeks each partition to the
larger of the position stored in its own log and the offset committed in Kafka
(either may be missing; neither: the partition's first offset, as
``auto_offset_reset="earliest"`` would, so nothing is skipped silently). The log is
authoritative for what this daemon made durable; the Kafka offset can only be larger
when another member consumed the partition further (and it commits only after its
own durable appends). If those seeks fail, the feed starts over with a new consumer
rather than read from an unknown position.

Rebalances. Before a partition leaves, ``on_partitions_revoked`` waits for the batch
being appended to be durable (a lock is held around "append a batch") and commits
the stored offsets of the revoked partitions to Kafka, so the next owner starts
exactly where this one stopped. A commit that fails there (``CommitFailedError``,
``IllegalStateError`` during a rebalance: aiokafka #933, #929) is logged and counted,
never raised. Records fetched across a rebalance and not yet appended are dropped,
and each partition still owned is sought back to the next offset not in the log, so
they are read again by whoever owns them now.

Static membership (``group_instance_id``, KIP-345). A daemon that is killed and
restarted within ``session_timeout_s`` rejoins as the same member and gets its
partitions back without a rebalance, so no other member consumed them meanwhile;
it resumes from its own log. A clean stop does not leave the group either (static
members never send LeaveGroup), so a daemon taken away for good holds its partitions
for ``session_timeout_s``. The honest limit: when a member is gone for *longer* than
the session timeout, the others take its partitions over from the offsets committed
in Kafka. Events the gone member made durable but whose Kafka commit had not landed
(the last batch or so, or everything since the broker went away) are then consumed,
and applied, by a second daemon too. Nothing is lost, but those events are in two
logs.

Commits. With ``commit_offsets`` on, the offsets of each durable batch are also
committed to Kafka (for lag tooling, and so that a member gone for good hands over
little twice) by a task of their own, coalesced, so a slow or failing commit never
holds the feed back; a failure is logged and counted and is never a reason to
re-apply anything. The hand-over commit on revocation is made whatever
``commit_offsets`` says: without it, the daemons of a group would read each other's
partitions again at every rebalance.

Backpressure. ``FeedSink.append`` waits while the writer is behind, and the loop does
not call ``getmany`` meanwhile; aiokafka prefetches at most one fetch response per
partition (``max_partition_fetch_bytes``) ahead of it. A wait longer than
``max_poll_interval_ms`` (aiokafka's default, 300 s) makes the group consider the
member stuck and rebalance; a rebalance that starts while an append waits is held up
by that wait (up to the rebalance timeout, ``session_timeout_s`` here).

Broker loss. aiokafka reconnects by itself inside ``getmany``; the feed watches the
group coordinator and logs ``kafka_disconnected`` / ``kafka_connected`` as it goes
and comes. When ``consumer.start()`` fails (the broker is down at start-up) or the
loop meets a Kafka error, the feed logs it, stops the consumer, backs off (jittered,
exponential) and starts a new one. Cancellation (SIGTERM) stops the consumer; with
auto-commit off it commits nothing of its own, so only durable offsets ever reach
Kafka.

Bad records (no value, not JSON, invalid, oversized) are dead-lettered with their
reason in the batch's own append and never block their partition; with
``dead_letter_topic`` set they are also produced there, once durable, by a task with
a bounded queue (what does not fit is counted as dropped: the table keeps it).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaError,
    RebalanceInProgressError,
)

from daemon.config import KafkaSection
from daemon.feeds.sink import Backoff, FeedSink, raise_if_cancelling, read_secret

__all__ = ["KafkaFeed", "client_options", "publish"]

_log = structlog.get_logger("daemon.feeds.kafka")

FEED: Final = "kafka"
#: Longest wait of one ``getmany`` for records (it returns at once when some are there).
_POLL_MS: Final = 1000
#: How often the coordinator's presence is checked for kafka_connected/_disconnected.
_WATCH_S: Final = 0.5
#: Bound on closing a consumer or producer (a dead broker must not hold up shutdown).
_CLOSE_S: Final = 5.0
#: Dead letters waiting for the dead-letter topic; beyond it they are counted as dropped.
_DEAD_LETTER_QUEUE: Final = 10_000
#: Errors that mean "the group moved on": the offsets may belong to another member now.
_REBALANCE_ERRORS: Final = (CommitFailedError, IllegalStateError, RebalanceInProgressError)

Batches = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]


@dataclass(slots=True)
class _Counters:
    """What the feed did since the daemon started (the ``stats`` op's figures)."""

    connects: int = 0
    errors: int = 0
    rebalances: int = 0
    batches: int = 0
    records: int = 0
    accepted: int = 0
    duplicates: int = 0
    erased: int = 0
    dead_lettered: int = 0
    dropped_after_rebalance: int = 0
    commits: int = 0
    commit_failures: int = 0
    dead_letters_produced: int = 0
    dead_letters_not_produced: int = 0


def client_options(section: KafkaSection) -> dict[str, Any]:
    """
    The connection keywords of aiokafka's clients for ``section`` (TLS, SASL).

    Raises:
        ValueError: the SASL password file cannot be read.
    """
    options: dict[str, Any] = {
        "bootstrap_servers": section.bootstrap,
        "security_protocol": section.security_protocol,
    }
    if section.security_protocol in {"SSL", "SASL_SSL"}:
        options["ssl_context"] = ssl.create_default_context(cafile=section.ca_file or None)
    if section.security_protocol.startswith("SASL_"):
        options["sasl_mechanism"] = section.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = section.sasl_username
        if section.sasl_password_file:
            options["sasl_plain_password"] = read_secret(
                section.sasl_password_file, what="[kafka].sasl_password_file"
            )
    return options


class KafkaFeed:
    """
    The ``[kafka]`` feed: consume ``topics`` as a member of ``group_id`` into the log.

    Args:
        section: the ``[kafka]`` configuration.
        sink: the daemon's :class:`FeedSink`.
        retry_min_s: the first back-off after a failure.
        retry_max_s: the longest back-off.

    Raises:
        ValueError: the SASL password file cannot be read (so a bad file stops the
            daemon's start instead of failing every connection).
    """

    name = FEED

    def __init__(self, section: KafkaSection, sink: FeedSink, *,
                 retry_min_s: float = 0.5, retry_max_s: float = 30.0) -> None:  # fmt: skip
        self.section = section
        self.sink = sink
        self.instance_id = section.instance_id or f"{section.group_id}-{socket.gethostname()}"
        self._options = client_options(section)
        self._backoff = Backoff(retry_min_s, retry_max_s)
        self.counters = _Counters()
        self.connected = False
        self._session: _Session | None = None

    async def run(self) -> None:
        """Consume until cancelled; broker trouble is logged and retried, never raised."""
        _log.info("kafka_starting", bootstrap=self.section.bootstrap, group=self.section.group_id,
                  instance=self.instance_id, topics=list(self.section.topics))  # fmt: skip
        loop = asyncio.get_running_loop()
        try:
            while True:
                started = loop.time()
                try:
                    await self._run_session()
                except Exception as e:  # noqa: BLE001 - the feed outlives any one consumer
                    raise_if_cancelling(e)
                    self._failed(e)
                raise_if_cancelling()
                # a consumer that ran a while was healthy: its end starts a new series
                # of retries; one that fails soon after each start backs off further
                if loop.time() - started > self._backoff.max_s:
                    self._backoff.reset()
                await asyncio.sleep(self._backoff.next())
        finally:
            self._set_connected(connected=False)

    def stats(self) -> dict[str, Any]:
        """
        Counters since the start, and the current assignment's size and lag.

        ``rebalances`` counts the assignments received (the first one too);
        ``dropped_after_rebalance`` the records fetched across one and read again;
        ``lag`` the records in the assigned partitions not yet in the log. No
        payloads, no ids.
        """
        session = self._session
        return {
            "connected": self.connected,
            "partitions": session.partitions if session else 0,
            "lag": session.lag() if session else None,
            **asdict(self.counters),
        }

    # ----------------------------------------------------------------- sessions

    async def _run_session(self) -> None:
        """One consumer from start to failure or cancellation."""
        consumer = self._make_consumer()
        producer = self._make_producer() if self.section.dead_letter_topic else None
        session = _Session(self, consumer, producer, on_connection=self._set_connected)
        consumer.subscribe(topics=list(self.section.topics), listener=session)
        self._session = session
        try:
            if producer is not None:
                await producer.start()
            await consumer.start()  # bootstraps and waits for the first assignment
            raise_if_cancelling()
            self._set_connected(connected=True)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(session.consume(), name="daemon[feeds].kafka.consume")
                tg.create_task(session.watch(), name="daemon[feeds].kafka.watch")
                if self.section.commit_offsets:
                    tg.create_task(session.commit_loop(), name="daemon[feeds].kafka.commit")
                if producer is not None:
                    tg.create_task(session.produce_dead_letters(),
                                   name="daemon[feeds].kafka.dead_letters")  # fmt: skip
        finally:
            self._set_connected(connected=False)
            self._session = None
            await session.close()

    def _make_consumer(self) -> AIOKafkaConsumer:
        s = self.section
        session_ms = round(s.session_timeout_s * 1000)
        return AIOKafkaConsumer(
            group_id=s.group_id,
            group_instance_id=self.instance_id,
            client_id=f"rerankd-{self.instance_id}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=min(3000, session_ms // 3),
            max_poll_records=s.max_batch,
            # events of an aborted transaction never happened
            isolation_level="read_committed",
            **self._options,
        )

    def _make_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            acks="all", enable_idempotence=True, client_id=f"rerankd-{self.instance_id}-dlq",
            **self._options,
        )  # fmt: skip

    def _failed(self, error: Exception) -> None:
        """Log a session's end by ``error`` (Kafka's own errors without a traceback)."""
        self.counters.errors += 1
        errors = _leaves(error)
        if all(isinstance(e, KafkaError | OSError | TimeoutError) for e in errors):
            _log.warning("kafka_error", errors=[f"{type(e).__name__}: {e}" for e in errors],
                         failures=self._backoff.failures + 1)  # fmt: skip
        else:
            _log.error("kafka_failed", exc_info=error, failures=self._backoff.failures + 1)

    def _set_connected(self, connected: bool) -> None:  # noqa: FBT001
        if connected == self.connected:
            return
        self.connected = connected
        if connected:
            self.counters.connects += 1
        session = self._session
        _log.info("kafka_connected" if connected else "kafka_disconnected",
                  partitions=session.partitions if session else 0)  # fmt: skip
        metrics = self.sink.metrics
        if metrics is not None:
            if connected:
                metrics.feed_connects.labels(feed=FEED).inc()
            metrics.feed_connected.labels(feed=FEED).set(1 if connected else 0)


class _Session(ConsumerRebalanceListener):
    """
    One consumer's life: the consume loop, the rebalance callbacks, the commits.

    ``_epoch`` moves on at every revocation and assignment: a batch fetched under an
    older epoch is not appended (its partitions are sought back instead), since it may
    belong to another member by now, or precede the seek to the stored positions.
    """

    def __init__(self, feed: KafkaFeed, consumer: AIOKafkaConsumer,
                 producer: AIOKafkaProducer | None, *,
                 on_connection: Callable[[bool], None]) -> None:  # fmt: skip
        self._feed = feed
        self._on_connection = on_connection
        self._sink = feed.sink
        self._counters = feed.counters
        self._consumer = consumer
        self._producer = producer
        self._append_lock = asyncio.Lock()  # held while a batch is on its way to disk
        self._commit_lock = asyncio.Lock()  # one Kafka commit at a time, in order
        self._ready = asyncio.Event()  # set once an assignment's seeks are done
        self._epoch = 0
        self._durable: dict[TopicPartition, int] = {}  # next offset in the log, per partition
        self._failure: Exception | None = None  # the last assignment could not be sought
        self._uncommitted: dict[TopicPartition, int] = {}
        self._commit_wake = asyncio.Event()
        self._dead_letters: asyncio.Queue[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]
        self._dead_letters = asyncio.Queue(maxsize=_DEAD_LETTER_QUEUE)

    @property
    def partitions(self) -> int:
        """How many partitions are assigned to this member now."""
        return len(self._consumer.assignment())

    def lag(self) -> int | None:
        """Records in the assigned partitions not yet in the log (None: not known yet)."""
        total, known = 0, False
        for tp in self._consumer.assignment():
            end, done = self._consumer.highwater(tp), self._durable.get(tp)
            if end is not None and done is not None:
                total, known = total + max(0, end - done), True
        return total if known else None

    # ------------------------------------------------------- rebalance listener

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Let the batch in flight become durable, then hand the revoked offsets over."""
        self._ready.clear()
        self._epoch += 1
        async with self._append_lock:
            mine = {tp: self._durable[tp] for tp in revoked if tp in self._durable}
            async with self._commit_lock:
                # the commit task must not commit these (older) offsets after us
                for tp in revoked:
                    self._uncommitted.pop(tp, None)
                if mine:
                    await self._commit(mine, when="revoke")
            for tp in revoked:
                self._durable.pop(tp, None)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """
        Seek every assigned partition to where it continues.

        That is max(stored in the log, committed in Kafka), or its first offset when
        neither is known.
        """
        try:
            async with self._append_lock:
                self._epoch += 1
                self._counters.rebalances += 1
                starts, known = await self._start_offsets(assigned)
                for tp, offset in starts.items():
                    self._consumer.seek(tp, offset)
                    self._durable[tp] = offset
                _log.info("kafka_assigned", partitions=len(assigned), from_log_or_kafka=known,
                          epoch=self._epoch)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - aiokafka would only log it
            # without the seeks there is no telling where to read: the consume loop
            # raises this, and the feed starts over with a new consumer
            self._failure = e
        finally:
            self._ready.set()

    async def _start_offsets(self, assigned: set[TopicPartition],
                             ) -> tuple[dict[TopicPartition, int], int]:  # fmt: skip
        """Where each partition starts, and for how many the log or Kafka knew it."""
        tps = sorted(assigned)
        committed = await asyncio.gather(*(self._consumer.committed(tp) for tp in tps))
        stored: dict[str, dict[str, Any]] = {}
        for topic in {tp.topic for tp in tps}:
            stored[topic] = await asyncio.to_thread(self._sink.stored_positions, f"kafka:{topic}")
        starts: dict[TopicPartition, int] = {}
        for tp, kafka_offset in zip(tps, committed, strict=True):
            log_offset = stored[tp.topic].get(str(tp.partition))
            known = [o for o in (log_offset, kafka_offset) if isinstance(o, int)]
            if known:
                starts[tp] = max(known)
        known_count = len(starts)
        unknown = [tp for tp in tps if tp not in starts]
        if unknown:  # auto_offset_reset="earliest", resolved here so the start is known
            starts |= await self._consumer.beginning_offsets(unknown)
        return starts, known_count

    # ------------------------------------------------------------- the loop

    async def consume(self) -> None:
        """Fetch a batch, append it durably, repeat; never fetch while appending."""
        consumer = self._consumer
        while True:
            await self._ready.wait()
            if self._failure is not None:
                raise self._failure
            epoch = self._epoch
            batches: Batches = await consumer.getmany(timeout_ms=_POLL_MS)
            if not batches:
                continue
            async with self._append_lock:
                if epoch != self._epoch:
                    self._reposition(batches)
                    continue
                await self._append(batches)

    def _reposition(self, batches: Batches) -> None:
        """
        Drop a batch fetched across a rebalance.

        It may precede the new assignment's seeks, or belong to another member by now.
        Each partition still ours goes back to the next offset not in the log. One
        whose assignment has not been sought yet is left to that seek.
        """
        for tp, records in batches.items():
            self._counters.dropped_after_rebalance += len(records)
            if tp in self._durable:
                with contextlib.suppress(IllegalStateError):  # revoked meanwhile
                    self._consumer.seek(tp, self._durable[tp])

    async def _append(self, batches: Batches) -> None:
        events: list[Any] = []
        dead: list[tuple[bytes, str]] = []
        forward: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = []
        positions: dict[tuple[str, str], int] = {}
        for tp, records in batches.items():
            for record in records:
                good: list[Any]
                if record.value is None:
                    good, bad = [], [(b"", "no value (a tombstone or empty record)")]
                else:
                    good, bad = self._sink.decode(record.value)
                events += good
                if bad:
                    dead += bad
                    if self._producer is not None:
                        forward += [(record.key, raw, _headers(reason, record))
                                    for raw, reason in bad]  # fmt: skip
            positions[(f"kafka:{tp.topic}", str(tp.partition))] = records[-1].offset + 1
        result = await self._sink.append(events, source=FEED, positions=positions,
                                         dead_letters=dead)  # fmt: skip
        self._count(batches, result.status, len(dead))
        for tp, records in batches.items():
            self._durable[tp] = records[-1].offset + 1
            self._uncommitted[tp] = records[-1].offset + 1
        self._commit_wake.set()
        for item in forward:
            try:
                self._dead_letters.put_nowait(item)
            except asyncio.QueueFull:
                self._counters.dead_letters_not_produced += 1

    def _count(self, batches: Batches, status: list[str], dead: int) -> None:
        c = self._counters
        c.batches += 1
        c.records += sum(map(len, batches.values()))
        c.accepted += status.count("accepted")
        c.duplicates += status.count("duplicate")
        c.erased += status.count("erased")
        c.dead_lettered += dead

    # --------------------------------------------------------------- commits

    async def commit_loop(self) -> None:
        """Commit the durable offsets to Kafka as they come, coalesced, one at a time."""
        while True:
            await self._commit_wake.wait()
            self._commit_wake.clear()
            async with self._commit_lock:
                offsets, self._uncommitted = self._uncommitted, {}
                if offsets and not await self._commit(offsets, when="append"):
                    # a transient failure: retry what is still ours and not superseded
                    mine = self._consumer.assignment()
                    for tp, offset in offsets.items():
                        if tp in mine:
                            self._uncommitted.setdefault(tp, offset)
            if self._uncommitted:
                await asyncio.sleep(1.0)
                self._commit_wake.set()

    async def _commit(self, offsets: dict[TopicPartition, int], *, when: str) -> bool:
        """
        Commit ``offsets`` to Kafka; failures are logged and counted, never raised.

        Returns True when done, or when a retry makes no sense (the group moved on).
        """
        try:
            async with asyncio.timeout(min(10.0, self._feed.section.session_timeout_s)):
                await self._consumer.commit(offsets)
        except _REBALANCE_ERRORS as e:
            self._commit_failed(e, when)
            return True
        except (KafkaError, TimeoutError) as e:
            self._commit_failed(e, when)
            return False
        self._counters.commits += 1
        return True

    def _commit_failed(self, error: Exception, when: str) -> None:
        self._counters.commit_failures += 1
        _log.warning("kafka_commit_failed", when=when, error=f"{type(error).__name__}: {error}")

    # ------------------------------------------------- watching, dead letters

    async def watch(self) -> None:
        """Follow the group coordinator's presence: connected while it is known."""
        while True:
            await asyncio.sleep(_WATCH_S)
            self._on_connection(_coordinator_known(self._consumer))

    async def produce_dead_letters(self) -> None:
        """Produce durable dead letters to ``dead_letter_topic``; a failure is counted."""
        assert self._producer is not None
        topic = self._feed.section.dead_letter_topic
        while True:
            key, raw, headers = await self._dead_letters.get()
            try:
                await self._producer.send_and_wait(topic, raw, key=key, headers=headers)
            except KafkaError as e:
                self._counters.dead_letters_not_produced += 1
                _log.warning("kafka_dead_letter_not_produced", error=type(e).__name__)
            else:
                self._counters.dead_letters_produced += 1

    async def close(self) -> None:
        """Commit what is durable and not yet committed (best effort), then stop."""
        self._ready.clear()
        self._epoch += 1
        if self._uncommitted and self._feed.section.commit_offsets:
            with contextlib.suppress(TimeoutError, KafkaError):
                async with asyncio.timeout(_CLOSE_S), self._commit_lock:
                    offsets, self._uncommitted = self._uncommitted, {}
                    await self._commit(offsets, when="stop")
        for client in (self._consumer, self._producer):
            if client is None:
                continue
            try:
                async with asyncio.timeout(_CLOSE_S):
                    await client.stop()
            except (TimeoutError, KafkaError, OSError) as e:
                _log.warning("kafka_close_failed", error=type(e).__name__)


def _coordinator_known(consumer: AIOKafkaConsumer) -> bool:
    """
    Whether the consumer knows its group coordinator.

    aiokafka forgets the coordinator when a request to it fails and looks it up again
    in the background. It has no public connection state; without the attribute the
    answer is "yes".
    """
    coordinator = getattr(consumer, "_coordinator", None)
    return getattr(coordinator, "coordinator_id", 0) is not None


def _headers(reason: str, record: ConsumerRecord[bytes, bytes]) -> list[tuple[str, bytes]]:
    """Where a dead letter came from and why, as Kafka record headers."""
    return [
        ("rerankd-reason", reason.encode()),
        ("rerankd-origin", f"{record.topic}/{record.partition}@{record.offset}".encode()),
    ]


def _leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``[error]``."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for e in error.exceptions for leaf in _leaves(e)]
    return [error]


# ------------------------------------------------------------------- publishing


class _UserField(msgspec.Struct):
    user: str | None = None


_user_decoder: Final = msgspec.json.Decoder(_UserField)


def _key_of(payload: bytes) -> bytes | None:
    """
    The event's ``user`` as the record key: one user's events share a partition.

    None for a list, a non-object or an event without a (string) user.
    """
    try:
        user = _user_decoder.decode(payload).user
    except msgspec.DecodeError:
        return None
    return user.encode() if user else None


async def publish(bootstrap: str, topic: str, payloads: Iterable[bytes], *,
                  on_sent: Callable[[int], None] | None = None,
                  max_in_flight: int = 1000,
                  options: Mapping[str, Any] | None = None) -> int:  # fmt: skip
    """
    Produce ``payloads`` to ``topic``, each keyed by its event's user.

    The producer waits for all in-sync replicas (``acks="all"``) and is idempotent, so
    a retried send is not written twice and each partition keeps the order given. At
    most ``max_in_flight`` sends wait for the broker at a time.

    Args:
        bootstrap: ``host:port[,host:port...]``.
        topic: where to produce.
        payloads: one event (or JSON list of events) per record.
        on_sent: called with the number of records the broker just acknowledged.
        max_in_flight: most unacknowledged sends.
        options: more :class:`AIOKafkaProducer` keywords, e.g. the TLS and SASL ones
            of :func:`client_options` (its ``bootstrap_servers`` gives way to
            ``bootstrap``).

    Returns:
        How many records were sent (and acknowledged).

    Raises:
        KafkaError: the broker refused a record or could not be reached.
    """
    producer = AIOKafkaProducer(**{
        **(options or {}), "bootstrap_servers": bootstrap, "acks": "all",
        "enable_idempotence": True,
    })  # fmt: skip
    await producer.start()
    sent = 0
    pending: set[asyncio.Future[Any]] = set()
    try:
        for payload in payloads:
            if len(pending) >= max_in_flight:
                sent += await _settle(pending, on_sent, asyncio.FIRST_COMPLETED)
            pending.add(await producer.send(topic, payload, key=_key_of(payload)))
        if pending:
            sent += await _settle(pending, on_sent, asyncio.ALL_COMPLETED)
    finally:
        await producer.stop()
    return sent


async def _settle(pending: set[asyncio.Future[Any]], on_sent: Callable[[int], None] | None,
                  return_when: str) -> int:  # fmt: skip
    """Wait for some (or all) of ``pending``; raise the first failure; count the rest."""
    done, _ = await asyncio.wait(pending, return_when=return_when)
    pending -= done
    for future in done:
        future.result()
    if on_sent is not None:
        on_sent(len(done))
    return len(done)
