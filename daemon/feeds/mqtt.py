"""
The MQTT feed: events from an MQTT 5 broker, acknowledged once they are durable.

:class:`MqttFeed` keeps a persistent session on the broker (a stable client id, Clean
Start off on every connect, a Session Expiry Interval), so messages published while
the daemon is away wait for it. It takes messages in batches, decodes them, appends
the good events and dead-letters the bad payloads in one :meth:`FeedSink.append`, and
only then sends the PUBACKs, in the order the messages arrived. The CONNECT's Receive
Maximum caps the messages the broker sends without a PUBACK, so while the writer is
behind the broker stops sending: that is the feed's backpressure, and nothing piles up
in memory. A message received but not acknowledged when the connection drops (or the
daemon dies) is sent again on the next connect; the log drops the duplicate by its
event id, so it holds each event once. A mark in the log's feed positions
(``mqtt``, client id) records that the client id had a session, so a later connect
whose CONNACK says "no session" is counted and logged as a lost session
(``session_not_present``) rather than taken for a first start.

Mosquitto before 2.0.13 (Debian 12 ships 2.0.11) honours the Receive Maximum only for
the first window: each in-order PUBACK then lets up to ``receive_maximum`` more
messages through (eclipse-mosquitto#2301), so a backlog floods into memory. Nothing is
lost or acknowledged early, but the bound is gone: the feed counts such connections
(``receive_maximum_exceeded``) and logs ``mqtt_receive_maximum_exceeded`` once per
connection. Dropping the connection would not help, since the broker then resends
every message in flight at once. Run Mosquitto 2.0.13 or later.

aiomqtt 2.x acknowledges QoS 1 messages before our code sees them and has no
manual-ack API (it comes in 3.0); :class:`_Paho` is the one place that reaches into
its paho-mqtt client to switch manual acknowledgement on and to read CONNACK's
"session present" flag. :class:`_Inbox` is aiomqtt's message queue, made from our
class through its ``queue_type`` option, so that a batch is taken from it at once
(aiomqtt's iterator costs a task per message). :func:`publish` is the other
direction: QoS 1 publishes, each acknowledged by the broker (``rerankd publish --mqtt``
and the tests).
"""

from __future__ import annotations

import asyncio
import select
import ssl
import urllib.parse
from collections.abc import Callable, Iterable, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Final

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from daemon.config import MqttSection
from daemon.feeds.sink import Backoff, FeedSink, raise_if_cancelling, read_secret

__all__ = ["BrokerAddress", "MqttFeed", "parse_url", "publish", "read_in_bursts"]

_log = structlog.get_logger("daemon.feeds.mqtt")

_FEED: Final = "mqtt"
#: Most MQTT packets read per readable event of the socket (see `read_in_bursts`).
READ_BURST: Final = 64
#: The feed_positions value that says "this client id had a session here before".
_SESSION_MARK: Final = "session"
#: Publishes in flight in :func:`publish` (the broker's Receive Maximum may lower it).
PUBLISH_WINDOW: Final = 100


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where an ``mqtt://`` or ``mqtts://`` url points (credentials only from the url)."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None


def parse_url(url: str, *, what: str) -> BrokerAddress:
    """
    ``mqtt://host[:port]`` (default port 1883) or ``mqtts://host[:port]`` (TLS, 8883).

    Raises:
        ValueError: not such a url; the message names ``what`` (the config key or
            option) and never repeats a password.
    """
    parts = urllib.parse.urlsplit(url)
    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    try:
        port = parts.port
    except ValueError:
        port = -1
    if (parts.scheme not in {"mqtt", "mqtts"} or not parts.hostname or port == -1
            or parts.path not in {"", "/"} or parts.query or parts.fragment):  # fmt: skip
        msg = f"{what}: expected mqtt://host[:port] or mqtts://host[:port], got {shown!r}"
        raise ValueError(msg)
    tls = parts.scheme == "mqtts"
    return BrokerAddress(
        parts.hostname, port or (8883 if tls else 1883), tls,
        urllib.parse.unquote(parts.username) if parts.username else None,
        urllib.parse.unquote(parts.password) if parts.password else None,
    )  # fmt: skip


class _Paho:
    """
    The one place that reaches under aiomqtt 2.x into its paho-mqtt 2 client.

    aiomqtt 2.x sends the PUBACK of a QoS 1 message as soon as it is queued, before
    our code sees it (aiomqtt #108, #345); paho can leave that to the caller
    (``manual_ack_set`` before connecting, then ``ack(mid, qos)``). aiomqtt also
    keeps CONNACK's "session present" flag and properties to itself, so the
    ``on_connect`` callback it installs is wrapped to record them first. Both need
    a fresh client, before ``__aenter__``; ``tests/feeds/test_mqtt.py`` checks that
    an unacknowledged message really is sent again.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        self._paho = client._client  # noqa: SLF001 - see the class docstring
        self._paho.manual_ack_set(True)  # noqa: FBT003 - paho's signature
        self.session_present = False
        self.server_receive_maximum = 65_535  # MQTT 5's default when CONNACK omits it
        aiomqtt_on_connect: Any = self._paho.on_connect

        def on_connect(paho: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
            self.session_present = bool(flags.session_present)
            limit = getattr(properties, "ReceiveMaximum", None)
            if limit:
                self.server_receive_maximum = int(limit)
            aiomqtt_on_connect(paho, userdata, flags, reason, properties)

        self._paho.on_connect = on_connect
        read_in_bursts(self._paho)

    def ack(self, messages: Iterable[aiomqtt.Message]) -> None:
        """Send the PUBACKs of ``messages``, in that order (nothing for QoS 0)."""
        ack = self._paho.ack
        for message in messages:
            if message.qos:
                ack(message.mid, message.qos)


def read_in_bursts(paho: Any, burst: int = READ_BURST) -> None:
    """
    Make ``paho.loop_read()`` read every packet already waiting, up to ``burst``.

    aiomqtt calls ``loop_read()`` once each time the event loop finds the socket
    readable, and paho then reads one packet (it reads as many as it has messages of
    its own in flight, at least one: a subscriber has none). So the feed took one
    message per turn of the loop, and a loop kept busy by ranks and the Kafka feed
    turned about 730 times a second: in the 30-minute soak (bench/soak, 1,000 MQTT
    messages/s) the broker's queue for the daemon grew by 270 messages a second. Here
    ``loop_read`` goes on while the socket (or TLS's buffer) still holds bytes; the
    burst bounds the turn (a packet costs paho a few µs of Python).
    """
    read_one = paho.loop_read

    def loop_read(max_packets: int = 1) -> Any:
        rc = read_one(max_packets)
        for _ in range(burst - 1):
            sock = paho.socket()
            if rc or sock is None or not _waiting(sock):
                break
            rc = read_one(max_packets)
        return rc

    paho.loop_read = loop_read


def _waiting(sock: Any) -> bool:
    """Bytes to read: in TLS's buffer, or on the socket (a poll that does not block)."""
    pending = getattr(sock, "pending", None)
    if pending is not None and pending() > 0:
        return True
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


class MqttFeed:
    """
    The ``[mqtt]`` feed: subscribe, append durably, then acknowledge.

    Args:
        section: the ``[mqtt]`` config.
        sink: the daemon's side (decoding, durable appends, stored marks, metrics).

    Raises:
        ValueError: a bad ``[mqtt].url``, an unreadable ``password_file`` or ``ca_file``.
    """

    name = "mqtt"

    def __init__(self, section: MqttSection, sink: FeedSink) -> None:
        self._section = section
        self._sink = sink
        self._broker = parse_url(section.url, what="[mqtt].url")
        if self._broker.username or self._broker.password:
            msg = "[mqtt].url: no credentials in the url; use [mqtt].username and password_file"
            raise ValueError(msg)
        self._password = (read_secret(section.password_file, what="[mqtt].password_file")
                          if section.password_file else None)  # fmt: skip
        self._tls = (
            _tls_context(section.ca_file, what="[mqtt].ca_file") if self._broker.tls else None
        )
        self._backoff = Backoff(section.reconnect_min_s, section.reconnect_max_s)
        self._had_session = False  # this client id had a session here (mark in the log)
        self.connected = False
        self.connects = 0
        self.disconnects = 0
        self.session_present: bool | None = None
        self.session_not_present = 0
        self.messages = 0
        self.acked = 0
        self.events = 0
        self.dead_lettered = 0
        self.dead_letters_published = 0
        self.batches = 0
        self.max_unacked = 0
        self.receive_maximum_exceeded = 0
        self._queued: Sized = ()  # the connection's received, not yet taken messages
        self._in_hand = 0  # messages of the batch being appended

    def stats(self) -> dict[str, Any]:
        """Counters for the daemon's ``stats`` op (no payloads, no user data)."""
        return {
            "connected": self.connected,
            "connects": self.connects,
            "disconnects": self.disconnects,
            "session_present": self.session_present,
            "session_not_present": self.session_not_present,
            "messages": self.messages,
            "acked": self.acked,
            "events": self.events,
            "dead_lettered": self.dead_lettered,
            "dead_letters_published": self.dead_letters_published,
            "batches": self.batches,
            "unacked": self._in_hand + len(self._queued) if self.connected else 0,
            "max_unacked": self.max_unacked,
            "receive_maximum": self._section.receive_maximum,
            "receive_maximum_exceeded": self.receive_maximum_exceeded,
            "reconnect_failures": self._backoff.failures,
        }

    async def run(self) -> None:
        """Consume until cancelled, reconnecting (with backoff) on any broker trouble."""
        marks = await asyncio.to_thread(self._sink.stored_positions, _FEED)
        self._had_session = self._section.client_id in marks
        while True:
            try:
                await self._connect_and_consume()
            except aiomqtt.MqttError as e:
                raise_if_cancelling(e)  # aiomqtt's __aexit__ replaced our CancelledError
                was_up = self.connected
                if was_up:
                    self.disconnects += 1
                self._set_connected(up=False)
                delay = self._backoff.next()
                _log.warning("mqtt_disconnected" if was_up else "mqtt_connect_failed",
                             broker=self._where(), error=str(e) or type(e).__name__,
                             retry_s=round(delay, 3))  # fmt: skip
                await asyncio.sleep(delay)
            finally:
                self._set_connected(up=False)
                self._queued, self._in_hand = (), 0

    # ---------------------------------------------------------------- one connection

    async def _connect_and_consume(self) -> None:
        client, paho = self._client()
        async with client:
            await self._subscribe(client)
            raise_if_cancelling()
            self._on_connected(session_present=paho.session_present)  # connected: consuming
            self._backoff.reset()
            if not self._had_session:
                # a durable mark, so that a later start can tell a lost session from
                # the first start of this client id
                mark = {(_FEED, self._section.client_id): _SESSION_MARK}
                await self._sink.append([], source=_FEED, positions=mark)
                self._had_session = True
            await self._consume(client, paho)

    def _client(self) -> tuple[aiomqtt.Client, _Paho]:
        """A fresh client per connection: no ack of one connection goes out on the next."""
        s = self._section
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = s.session_expiry_s
        properties.ReceiveMaximum = s.receive_maximum
        client = aiomqtt.Client(
            self._broker.host, self._broker.port, identifier=s.client_id,
            protocol=aiomqtt.ProtocolVersion.V5, clean_start=False, properties=properties,
            keepalive=s.keepalive_s, username=s.username or None, password=self._password,
            tls_context=self._tls,
            max_queued_incoming_messages=0,  # unbounded: a full queue would drop messages
            queue_type=_Inbox,
        )  # fmt: skip
        return client, _Paho(client)

    def _on_connected(self, *, session_present: bool) -> None:
        self.connects += 1
        self.session_present = session_present
        self._set_connected(up=True)
        if self._sink.metrics is not None:
            self._sink.metrics.feed_connects.labels(feed=_FEED).inc()
        _log.info("mqtt_connected", broker=self._where(), client_id=self._section.client_id,
                  session_present=session_present)  # fmt: skip
        if not session_present and self._had_session:
            self.session_not_present += 1
            _log.warning(
                "mqtt_session_not_present", client_id=self._section.client_id,
                hint="the broker lost this client's session (expired, or not persisted): "
                "messages published while the feed was away may be lost",
            )  # fmt: skip

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        # retained messages only on a new subscription, not again on every reconnect
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        topics = self._section.topics
        codes = await client.subscribe([(topic, options) for topic in topics])
        refused = [f"{t}: {c}" for t, c in zip(topics, codes, strict=False)
                   if not isinstance(c, ReasonCode) or c.is_failure or c.value < 1]  # fmt: skip
        if refused or len(codes) != len(topics):
            msg = f"subscription refused or below QoS 1: {', '.join(refused) or codes}"
            raise aiomqtt.MqttError(msg)

    async def _consume(self, client: aiomqtt.Client, paho: _Paho) -> None:
        """Batches until the connection drops: append, then acknowledge in order."""
        messages = self._queued = client.messages
        inbox = _Inbox.of(client)
        most = self._section.receive_maximum
        flooded = False
        while True:
            raise_if_cancelling()
            # the first one through aiomqtt (it raises when the connection drops), the
            # rest of the batch straight from the queue: aiomqtt's iterator costs a
            # task and an asyncio.wait per message, which under load is most of the feed
            batch = [await anext(messages)]
            inbox.take(batch, most)
            self.messages += len(batch)
            self._in_hand = len(batch)
            dead = await self._append(batch)
            # what we hold unacknowledged is at its most now: the batch and what came meanwhile
            unacked = len(batch) + len(messages)
            self.max_unacked = max(self.max_unacked, unacked)
            if unacked > most and not flooded:
                flooded = True
                self._flooded(unacked)
            paho.ack(batch)
            self._in_hand = 0
            self.acked += len(batch)
            self.batches += 1
            if dead and self._section.dead_letter_topic:
                await self._publish_dead_letters(client, dead)

    async def _append(self, batch: Sequence[aiomqtt.Message]) -> list[tuple[bytes, str]]:
        """Decode ``batch``, make it durable (events and dead letters); the dead letters."""
        events: list[Any] = []
        dead: list[tuple[bytes, str]] = []
        decode = self._sink.decode
        for message in batch:
            good, bad = decode(_payload(message))
            events += good
            dead += bad
        await self._sink.append(events, source=_FEED, dead_letters=dead)
        self.events += len(events)
        self.dead_lettered += len(dead)
        return dead

    async def _publish_dead_letters(self, client: aiomqtt.Client,
                                    dead: Sequence[tuple[bytes, str]]) -> None:  # fmt: skip
        """
        Copy rejected payloads to ``dead_letter_topic`` (QoS 1; the reason as a property).

        Best effort, after the batch is acknowledged: the dead_letters table is the record.
        """
        for raw, reason in dead:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.UserProperty = [("reason", reason)]
            await client.publish(self._section.dead_letter_topic, raw, qos=1, properties=properties)
            self.dead_letters_published += 1

    def _flooded(self, unacked: int) -> None:
        self.receive_maximum_exceeded += 1
        _log.warning(
            "mqtt_receive_maximum_exceeded", unacked=unacked,
            receive_maximum=self._section.receive_maximum,
            hint="the broker ignores the Receive Maximum (Mosquitto before 2.0.13 does): "
            "memory is bounded only by its backlog; upgrade the broker",
        )  # fmt: skip

    def _set_connected(self, *, up: bool) -> None:
        self.connected = up
        if self._sink.metrics is not None:
            self._sink.metrics.feed_connected.labels(feed=_FEED).set(1 if up else 0)

    def _where(self) -> str:
        return f"{self._broker.host}:{self._broker.port}"


class _Inbox(asyncio.Queue[aiomqtt.Message]):
    """
    aiomqtt's incoming-message queue, which the feed also drains directly.

    aiomqtt makes it from this class (its ``queue_type`` option); :meth:`take` moves
    what is already there without awaiting, so a batch costs one trip through the
    event loop, not one per message.
    """

    @classmethod
    def of(cls, client: aiomqtt.Client) -> _Inbox:
        """The queue that ``client`` (made with ``queue_type=_Inbox``) fills."""
        queue = client._queue  # noqa: SLF001 - aiomqtt made it from our class
        assert isinstance(queue, cls)
        return queue

    def take(self, batch: list[aiomqtt.Message], most: int) -> None:
        """Append queued messages to ``batch`` until it holds ``most`` or none are left."""
        while len(batch) < most:
            try:
                batch.append(self.get_nowait())
            except asyncio.QueueEmpty:
                return


def _payload(message: aiomqtt.Message) -> bytes:
    payload = message.payload  # paho always delivers bytes; aiomqtt's type is wider
    return payload if isinstance(payload, bytes) else str(payload).encode()


def _tls_context(ca_file: str, *, what: str) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as e:
        msg = f"{what}: cannot load {ca_file!r} as a CA bundle ({e})"
        raise ValueError(msg) from None


async def publish(url: str, topic: str, payloads: Iterable[bytes], *,
                  on_sent: Callable[[int], None] | None = None,
                  window: int = PUBLISH_WINDOW) -> int:  # fmt: skip
    """
    Publish each of ``payloads`` to ``topic`` at QoS 1, each acknowledged by the broker.

    Up to ``window`` publishes are in flight at once (fewer if the broker's Receive
    Maximum says so); ``on_sent(n)`` is called as ``n`` more are acknowledged (a
    progress bar's ``update``). Credentials may be given in the url
    (``mqtt://user:password@host``).

    Returns:
        How many were published.

    Raises:
        ValueError: ``url`` is not an MQTT url.
        aiomqtt.MqttError: the broker could not be reached or a publish failed.
    """
    broker = parse_url(url, what="MQTT url")
    client = aiomqtt.Client(
        broker.host, broker.port, username=broker.username, password=broker.password,
        protocol=aiomqtt.ProtocolVersion.V5, max_inflight_messages=window,
        tls_context=_tls_context("", what="MQTT url") if broker.tls else None,
    )  # fmt: skip
    client.pending_calls_threshold = window + 1  # aiomqtt warns past it; the window is the bound
    paho = _Paho(client)
    sent = 0

    async def one(payload: bytes, slots: asyncio.Semaphore) -> None:
        nonlocal sent
        try:
            await client.publish(topic, payload, qos=1)
        finally:
            slots.release()
        sent += 1
        if on_sent is not None:
            on_sent(1)

    try:
        async with client, asyncio.TaskGroup() as tasks:
            # paho ignores the broker's Receive Maximum, which a broker may enforce by
            # disconnecting us (MQTT 5 section 4.9)
            slots = asyncio.Semaphore(max(1, min(window, paho.server_receive_maximum)))
            for payload in payloads:
                await slots.acquire()
                tasks.create_task(one(payload, slots), name="mqtt.publish")
    except* Exception as group:  # noqa: BLE001 - re-raised: the first failure, for the CLI
        raise group.exceptions[0] from None
    return sent
