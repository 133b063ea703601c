"""
The soak's load generators (``bench/soak``): open-loop rank requests over the socket,
events at fixed rates through Kafka and MQTT, each in a process of its own.

`worker` is the process target. Each generator reports to the parent through a queue:
``("ready", kind, 0, pid)``, then ``("period", kind, k, figures)`` at the end of each
sample period k, then ``("final", kind, 0, figures)`` once its answers or
acknowledgements are in (or given up).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Any

import msgspec
import numpy as np
from bench_daemon import N_ITEMS

__all__ = ["KAFKA_PARTITIONS", "KAFKA_TOPIC", "MQTT_TOPIC", "Load", "die_with_parent", "worker"]

KAFKA_TOPIC = "soak-events"
KAFKA_PARTITIONS = 4
MQTT_TOPIC = "rerankd/events/soak"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: Event types of the stream, in proportion (mostly views, as a shop's clickstream).
_KINDS = (b"view",) * 16 + (b"click",) * 3 + (b"cart", b"purchase")


@dataclass(frozen=True, slots=True)
class Load:
    """What the generators do (pickled into their processes)."""

    socket: str
    bootstrap: str
    mqtt_port: int
    rank_rate: float
    kafka_rate: float
    mqtt_rate: float
    users: int  # the population at the start ...
    user_growth: float  # ... and its growth, users/s
    candidates: int
    connections: int
    timeout_s: float
    sample_s: float
    periods: int

    def population(self, t: float) -> int:
        """Users ``u-0`` ... ``u-<n-1>`` exist ``t`` seconds into the run."""
        return self.users + int(self.user_growth * max(t, 0.0))


# ----------------------------------------------------------------- generators


def worker(kind: str, load: Load, reports: Any, start: Any) -> None:
    """A generator process (``kind``: "rank" or "ingest"); reports go to ``reports``."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends us on Ctrl-C
    generator = RankLoad(load, reports) if kind == "rank" else IngestLoad(load, reports)
    try:
        import uvloop  # noqa: PLC0415 - as the daemon: a cheaper loop leaves more CPU to it

        uvloop.run(generator.main(start))
    except ImportError:
        asyncio.run(generator.main(start))


def die_with_parent() -> None:
    """
    Have the kernel kill this process when its parent dies (Linux's PR_SET_PDEATHSIG).

    A soak killed with SIGKILL (or a crash) left its generators running: one kept
    sending into a closed socket at 67% of a core and skewed the next run's figures.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() == 1:  # the parent died before the call
        os._exit(1)


class _Generator:
    """What both generators share: the start, the period reports, the send lags."""

    kind = ""

    def __init__(self, load: Load, reports: Any) -> None:
        self.load = load
        self.reports = reports
        self.lags: list[float] = []  # how late each send was, seconds

    async def main(self, start: Any) -> None:
        """Connect, say ready, wait for the common start, load, report; then the final."""
        await self.connect()
        self.reports.put(("ready", self.kind, 0, os.getpid()))
        while start.value == 0.0:  # noqa: ASYNC110 - a shared memory value has no wait
            await asyncio.sleep(0.005)
        t0 = float(start.value)
        # a task of its own: a send that blocks (a full producer buffer) delays no report
        reporter = asyncio.create_task(self._report(t0), name=f"soak.{self.kind}.report")
        try:
            await self.send(t0)
            await reporter
            await self.settle()
        finally:
            reporter.cancel()
            await self.close()
        self.reports.put(("final", self.kind, 0, self.take()))

    async def _report(self, t0: float) -> None:
        for period in range(1, self.load.periods + 1):
            await asyncio.sleep(max(0.0, t0 + period * self.load.sample_s - time.monotonic()))
            self.reports.put(("period", self.kind, period, self.take()))

    def lag_p99_ms(self) -> float:
        """p99 of the send lags since the last call, in ms."""
        p99 = round(float(np.percentile(self.lags, 99)) * 1e3, 3) if self.lags else 0.0
        self.lags.clear()
        return p99

    # what each generator defines
    async def connect(self) -> None: ...
    async def send(self, t0: float) -> None: ...
    async def settle(self) -> None: ...
    async def close(self) -> None: ...
    def take(self) -> dict[str, Any]: ...


class _Answer(msgspec.Struct):
    id: int
    ok: bool
    error: dict[str, Any] | None = None


class RankLoad(_Generator):
    """
    Open-loop rank requests: request i is due at ``t0 + i / rank_rate``, whatever the
    answers do, spread round-robin over the connections (pipelined: many may be in
    flight on one). Its latency runs from when it was due, not from when it went out,
    so a stall (of the daemon or of this generator) counts against every request it
    delayed (no coordinated omission). A request not answered within ``timeout_s`` is a
    timeout; its latency counts as its age when the sweep (every 100 ms) gives it up.
    """

    kind = "rank"

    def __init__(self, load: Load, reports: Any) -> None:
        super().__init__(load, reports)
        self.pending: dict[int, float] = {}  # request id -> when it was due
        self.latencies: list[float] = []  # answers in time and timeouts
        self.answered = 0  # ok answers in time
        self.errors: Counter[str] = Counter()
        self._streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._readers: list[asyncio.Task[None]] = []

    async def connect(self) -> None:
        self._streams = [await asyncio.open_unix_connection(self.load.socket, limit=1 << 24)
                         for _ in range(self.load.connections)]  # fmt: skip
        self._readers = [asyncio.create_task(self._read(r), name=f"soak.rank.read[{k}]")
                         for k, (r, _) in enumerate(self._streams)]  # fmt: skip

    async def send(self, t0: float) -> None:
        load, rate, pending, lags = self.load, self.load.rank_rate, self.pending, self.lags
        writers = [w for _, w in self._streams]
        rng = np.random.default_rng(0)
        cands = [msgspec.json.encode([f"sku-{i}" for i in
                                      rng.choice(N_ITEMS, load.candidates, replace=False)])
                 for _ in range(8)]  # fmt: skip
        uniform = random.Random(1).random
        total, n, sweep = int(load.periods * load.sample_s * rate), 0, t0
        while n < total:
            await asyncio.sleep(0.001)
            now = time.monotonic()
            if now >= sweep:
                self._expire(now, load.timeout_s)
                sweep = now + 0.1
            due = min(int((now - t0) * rate), total)
            if due <= n:
                continue
            population = load.population(now - t0)
            chunks: list[list[bytes]] = [[] for _ in writers]
            for i in range(n, due):
                pending[i] = at = t0 + i / rate
                lags.append(now - at)
                chunks[i % len(writers)].append(
                    b'{"id":%d,"op":"rank","user":"u-%d","k":20,"candidates":%b}\n'
                    % (i, int(uniform() * population), cands[i % len(cands)]))  # fmt: skip
            for writer, chunk in zip(writers, chunks, strict=True):
                if chunk:
                    writer.write(b"".join(chunk))
            n = due

    async def settle(self) -> None:
        deadline = time.monotonic() + self.load.timeout_s
        while self.pending and time.monotonic() < deadline:  # noqa: ASYNC110 - answers empty it
            await asyncio.sleep(0.05)
        self._expire(time.monotonic(), 0.0)  # what is still unanswered has timed out

    async def close(self) -> None:
        for task in self._readers:
            task.cancel()
        for _, writer in self._streams:
            writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        decode = msgspec.json.Decoder(_Answer).decode
        pending, latencies, errors = self.pending, self.latencies, self.errors
        timeout_s = self.load.timeout_s
        while line := await reader.readline():
            now = time.monotonic()
            answer = decode(line)
            due = pending.pop(answer.id, None)
            if due is None:  # answered after the sweep gave it up: a timeout already
                continue
            if not answer.ok:
                errors[f"rank_error:{(answer.error or {}).get('code', 'unknown')}"] += 1
                continue
            latencies.append(now - due)
            if now - due > timeout_s:  # between two sweeps
                errors["rank_timeout"] += 1
            else:
                self.answered += 1

    def _expire(self, now: float, timeout_s: float) -> None:
        """Give up the requests unanswered ``timeout_s`` after they were due: timeouts."""
        before = now - timeout_s
        old = list(itertools.takewhile(lambda kv: kv[1] < before, self.pending.items()))
        for i, due in old:
            del self.pending[i]
            self.latencies.append(now - due)
        if old:
            self.errors["rank_timeout"] += len(old)

    def take(self) -> dict[str, Any]:
        """This period's figures; the counters start again."""
        taken = {"ranks": self.answered,
                 "latencies_ms": (np.asarray(self.latencies) * 1e3).astype(np.float32),
                 "errors": dict(self.errors), "unanswered": len(self.pending),
                 "send_lag_p99_ms": self.lag_p99_ms()}  # fmt: skip
        self.latencies.clear()
        self.errors.clear()
        self.answered = 0
        return taken


class IngestLoad(_Generator):
    """
    Events at fixed rates, every 10 ms what is due: to Kafka (one event a record, keyed
    by user, one producer batch per partition a tick, ``acks=all``, idempotent) and to
    MQTT (one event a message, QoS 1, each PUBACK awaited by a task). Payloads are
    formatted bytes, not encoded dicts. An event counts as published when its broker
    acknowledged it, as failed when the send raised.
    """

    kind = "ingest"

    def __init__(self, load: Load, reports: Any) -> None:
        super().__init__(load, reports)
        self.sent: Counter[str] = Counter()
        self.acked: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._uniform = random.Random(2).random
        self._producer: Any = None
        self._mqtt: Any = None

    async def connect(self) -> None:
        import aiomqtt  # noqa: PLC0415 - the clients only in the generator's process
        from aiokafka import AIOKafkaProducer  # noqa: PLC0415

        self._producer = AIOKafkaProducer(bootstrap_servers=self.load.bootstrap, acks="all",
                                          enable_idempotence=True)  # fmt: skip
        await self._producer.start()
        self._mqtt = aiomqtt.Client("127.0.0.1", self.load.mqtt_port, max_inflight_messages=1000,
                                    protocol=aiomqtt.ProtocolVersion.V5)  # fmt: skip
        await self._mqtt.__aenter__()
        self._mqtt.pending_calls_threshold = 1 << 20  # the rate bounds what is in flight

    async def send(self, t0: float) -> None:
        load, sent = self.load, self.sent
        end = load.periods * load.sample_s
        rates = {"kafka": load.kafka_rate, "mqtt": load.mqtt_rate}
        totals = {feed: int(end * rate) for feed, rate in rates.items()}
        while any(sent[feed] < total for feed, total in totals.items()):
            now = time.monotonic()
            t = min(now - t0, end)
            population, ts = load.population(t), time.time()
            for feed, rate in rates.items():
                due = int(t * rate)
                if due > sent[feed]:
                    self.lags.append(now - t0 - sent[feed] / rate)
                    payloads = [self._event(feed, n, population, ts)
                                for n in range(sent[feed], due)]  # fmt: skip
                    sent[feed] = due
                    if feed == "kafka":
                        await self._kafka(payloads)
                    else:
                        self._publish_mqtt(payloads)
            await asyncio.sleep(0.01)

    async def settle(self) -> None:
        """Wait for the brokers' acknowledgements, boundedly: a broker may be stuck."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.load.timeout_s + 30):
                await self._producer.flush()
                if self._tasks:
                    await asyncio.wait(self._tasks)

    async def close(self) -> None:
        if self._mqtt is not None:
            await self._mqtt.__aexit__(None, None, None)
        if self._producer is not None:
            await self._producer.stop()

    def _event(self, feed: str, n: int, population: int, ts: float) -> tuple[int, bytes]:
        u = self._uniform
        user = int(u() * population)
        return user, (b'{"id":"%b%d","type":"%b","user":"u-%d","item":"sku-%d","ts":%.3f}'
                      % (b"K" if feed == "kafka" else b"M", n, _KINDS[n % len(_KINDS)], user,
                         int(N_ITEMS * u() ** 2), ts))  # fmt: skip

    async def _kafka(self, payloads: list[tuple[int, bytes]]) -> None:
        producer = self._producer
        batches: dict[int, Any] = {}
        for user, value in payloads:
            partition, key = user % KAFKA_PARTITIONS, b"u-%d" % user
            batch = batches.get(partition) or batches.setdefault(partition, producer.create_batch())
            if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it
                await self._send_batch(partition, batch)
                batch = batches[partition] = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        for partition, batch in batches.items():
            await self._send_batch(partition, batch)

    async def _send_batch(self, partition: int, batch: Any) -> None:
        count = batch.record_count()
        try:
            future = await self._producer.send_batch(batch, KAFKA_TOPIC, partition=partition)
        except Exception:  # noqa: BLE001 - a failed publish is a figure of the soak
            self.failed["kafka"] += count
            return
        future.add_done_callback(partial(self._settled, "kafka", count))

    def _publish_mqtt(self, payloads: list[tuple[int, bytes]]) -> None:
        for _, value in payloads:
            task = asyncio.create_task(self._mqtt.publish(MQTT_TOPIC, value, qos=1))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(partial(self._settled, "mqtt", 1))

    def _settled(self, feed: str, count: int, future: asyncio.Future[Any]) -> None:
        failed = future.cancelled() or future.exception() is not None
        (self.failed if failed else self.acked)[feed] += count

    def take(self) -> dict[str, Any]:
        """Totals so far (the sampler takes differences) and this period's send lag."""
        unacked = sum(self.sent.values()) - sum(self.acked.values()) - sum(self.failed.values())
        return {"sent": dict(self.sent), "acked": dict(self.acked), "failed": dict(self.failed),
                "unacked": unacked, "send_lag_p99_ms": self.lag_p99_ms()}  # fmt: skip
