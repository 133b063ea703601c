"""
The SIGKILL loop: a real daemon killed at random moments, again and again, while
events stream in over Kafka, MQTT and the socket and rank queries are served.

Sources, all running throughout (kills and restarts included), in the test's loop:

- a Kafka producer (``acks=all``, idempotent): an event counts as published once the
  broker acknowledged it, and the test notes its partition and offset;
- an MQTT publisher (QoS 1) to a Mosquitto of the module's own: published once the
  broker sent the PUBACK;
- two socket clients sending ``ingest`` batches: acknowledged when the daemon answers
  ``ok``; a batch whose answer never came (the daemon died) is sent again, same ids,
  after the restart, as a client that wants its events in must;
- two socket clients asking ``rank`` (each answer also appends an impression).

Schedule (seeded): every fifth kill lands while the daemon starts (0.2-2 s after it
was spawned: importing, restoring the snapshot, replaying), the others 0.05-1.5 s after
READY=1. Snapshots are written every 500 events or 2 s, so kills land in them too.

After each kill, on the dead daemon's files:

a. no event id is in the log twice, and every id in it was sent by a source;
b. every event the daemon acknowledged over the socket is in the log;
c. per Kafka partition, the log holds exactly the published records below the
   position stored with them (no gap, nothing beyond it);
d. what the restart will restore (newest valid snapshot + tail, on a copy) is a fresh
   fold of the log, byte for byte.

Halfway and at the end, with the sources paused and caught up, the running daemon's
state (``stats``, every user's view, every item's counters) equals a fresh fold of
its log. At the end every published or acknowledged event is in the log exactly once
and nothing else of the sources is, and the snapshot of a clean stop equals a fresh
fold byte for byte.

Default: 10 kills, checks a-d after each, the live check after the 5th and the last
(about 30 s on 2 quiet cores; each round is mostly the daemon's start, 2-4 s).
``pytest --long``: 200 kills, d. after every 5th, the live check every 25 (9 minutes
on 2 quiet cores, over 20 on busy ones).
``RERANKD_CHAOS_KILLS=N`` sets the number of kills of either.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import shutil
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from _ledger import (
    check_live_state,
    check_restore,
    check_stopped_state,
    event,
    log_ids,
    once_each,
    positions,
    user_of,
)
from aiokafka import AIOKafkaProducer
from brokers import KafkaBroker, MqttBroker, free_ports, unique_name
from daemons import Daemon

from daemon.config import load_config
from eventstore import FoldConfig

pytestmark = [pytest.mark.chaos, pytest.mark.brokers]

SEED = 20261129
#: Snapshots often, so that kills land in them and restarts replay short tails.
STORE = "snapshot_every_events = 500\nsnapshot_interval_s = 2.0\n"
#: Small rings and few slots, so sequences wrap and interest slots get evicted.
CONFIG = """
[fold]
seq_len = 8
categories_per_user = 4
purchases_per_user = 4
[ranking]
train_on_start = false
"""
SOURCE_BATCH = 5
SOURCE_PAUSE_S = 0.1
USERS = [f"u-{k}" for k in range(40)]  # the users of _ledger.event
ITEMS = [f"i-{k}" for k in range(60)]
SOURCE_PREFIXES = ("k-", "m-", "s0-", "s1-")
#: Bound on the sources' events reaching the log once the daemon runs.
CATCH_UP_S = 120.0


@pytest.fixture(name="mqtt", scope="module")
def fixture_mqtt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MqttBroker]:
    """
    A Mosquitto of this module's own that saves its state every million changes.

    The shared one saves after every change (so that a broker kill loses nothing),
    rewriting its whole file each time: with the backlog that builds up while the
    daemon is down, that made Mosquitto the bottleneck of a 200-kill run (13,000
    messages behind at the end). This test never kills the broker.
    """
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RERANKD_MQTT_AUTOSAVE_CHANGES", "1000000")
        broker = MqttBroker(tmp_path_factory.mktemp("mosquitto-chaos"), free_ports(1)[0])
        broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@dataclass
class Ledger:
    """What the sources handed over and what was acknowledged to them."""

    sent: set[str] = field(default_factory=set)
    acked: dict[str, set[str]] = field(
        default_factory=lambda: {"kafka": set(), "mqtt": set(), "socket": set()})
    kafka_offsets: dict[str, tuple[int, int]] = field(default_factory=dict)  # id: (p, offset)
    ranked: int = 0
    resent: int = 0  # socket batches sent again after the connection broke unanswered
    duplicates: int = 0  # ... of whose events the daemon already had some

    def all_acked(self) -> set[str]:
        return set().union(*self.acked.values())

    def copy(self) -> Ledger:
        """What the checks of one moment need: sent, acknowledged, Kafka offsets."""
        return Ledger(set(self.sent), {k: set(v) for k, v in self.acked.items()},
                      dict(self.kafka_offsets))  # fmt: skip


@dataclass
class Tally:
    kills: int = 0
    before_ready: int = 0
    checks: int = 0
    restored_from_snapshot: int = 0
    live_checks: int = 0
    grew: int = 0  # kills after which the log held more events than at the one before
    ready_s: list[float] = field(default_factory=list)  # spawn to READY=1, each start
    check_s: list[float] = field(default_factory=list)  # checks a-d, each kill


class Sources:
    """The load: source tasks that run until stopped, pausable for a quiescent check."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.stopping = False
        self._idle: list[asyncio.Event] = []
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, name: str, body: Callable[[Callable[[], Awaitable[bool]]], Awaitable[None]],
              ) -> None:  # fmt: skip
        idle = asyncio.Event()
        self._idle.append(idle)

        async def turn() -> bool:
            """Between two operations: wait while paused; False once stopping."""
            idle.set()
            await self.flowing.wait()
            idle.clear()
            return not self.stopping

        self._tasks.append(asyncio.create_task(body(turn), name=name))

    async def pause(self) -> None:
        """Let every source finish its operation in progress, and hold them there."""
        self.flowing.clear()
        await self._settled()

    def resume(self) -> None:
        self.flowing.set()

    async def stop(self) -> None:
        """Stop the sources; socket clients first get their last batch acknowledged."""
        self.stopping = True
        self.flowing.set()
        async with asyncio.timeout(CATCH_UP_S):
            await asyncio.gather(*self._tasks)

    async def _settled(self) -> None:
        async with asyncio.timeout(CATCH_UP_S):
            while not all(idle.is_set() for idle in self._idle):
                self.check()
                await asyncio.sleep(0.05)

    def check(self) -> None:
        """Raise the failure of a source that failed."""
        for task in self._tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()


# ----------------------------------------------------------------------- sources


def kafka_source(broker: KafkaBroker, topic: str, ledger: Ledger) -> Any:
    async def run(turn: Callable[[], Awaitable[bool]]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all",
                                    enable_idempotence=True)  # fmt: skip
        await producer.start()
        n = itertools.count()
        try:
            while await turn():
                batch = [(f"k-{k}", k) for k in itertools.islice(n, SOURCE_BATCH)]
                ledger.sent.update(key for key, _ in batch)
                payloads = [event(key, k) for key, k in batch]
                futures = [await producer.send(topic, p, key=user_of(p)) for p in payloads]
                for (key, _), meta in zip(batch, await asyncio.gather(*futures), strict=True):
                    ledger.kafka_offsets[key] = (meta.partition, meta.offset)
                    ledger.acked["kafka"].add(key)
                await asyncio.sleep(SOURCE_PAUSE_S)
        finally:
            await producer.stop()

    return run


def mqtt_source(broker: MqttBroker, topic: str, ledger: Ledger) -> Any:
    async def run(turn: Callable[[], Awaitable[bool]]) -> None:
        n = itertools.count()
        client = aiomqtt.Client(broker.host, broker.port, protocol=aiomqtt.ProtocolVersion.V5)
        async with client:
            while await turn():
                batch = [(f"m-{k}", k) for k in itertools.islice(n, SOURCE_BATCH)]
                ledger.sent.update(key for key, _ in batch)
                # aiomqtt's publish at QoS 1 returns once the broker sent PUBACK
                await asyncio.gather(*(client.publish(topic, event(key, k), qos=1)
                                       for key, k in batch))  # fmt: skip
                ledger.acked["mqtt"].update(key for key, _ in batch)
                await asyncio.sleep(SOURCE_PAUSE_S)

    return run


class Line:
    """One connection to the daemon's socket, one request at a time (None: not connected)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.ids = itertools.count(1)

    async def request(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The answer; None when there is no daemon or it went away before answering."""
        try:
            if self.conn is None:
                self.conn = await asyncio.open_unix_connection(self.path)
            reader, writer = self.conn
            writer.write(json.dumps({"id": next(self.ids), **body}).encode() + b"\n")
            async with asyncio.timeout(30):
                line = await reader.readline()
            if line:
                answer: dict[str, Any] = json.loads(line)
                return answer
        except (OSError, TimeoutError):
            pass
        self.close()
        await asyncio.sleep(0.05)
        return None

    def close(self) -> None:
        if self.conn is not None:
            self.conn[1].close()
            self.conn = None


def socket_source(path: Path, name: str, ledger: Ledger) -> Any:
    async def run(turn: Callable[[], Awaitable[bool]]) -> None:
        line = Line(path)
        n = itertools.count()
        pending: list[tuple[str, int]] = []
        attempts = 0
        try:
            while await turn() or pending:
                if not pending:
                    pending = [(f"{name}-{k}", k) for k in itertools.islice(n, SOURCE_BATCH)]
                    ledger.sent.update(key for key, _ in pending)
                    attempts = 0
                events = [json.loads(event(key, k)) for key, k in pending]
                answer = await line.request({"op": "ingest", "events": events})
                attempts += answer is None
                if answer is None or answer.get("error", {}).get("code") == "busy":
                    continue
                assert answer["ok"], answer
                assert len(pending) == answer["accepted"] + answer["duplicates"], answer
                ledger.acked["socket"].update(key for key, _ in pending)
                ledger.resent += attempts > 0
                ledger.duplicates += answer["duplicates"] > 0
                pending = []
                await asyncio.sleep(SOURCE_PAUSE_S)
        finally:
            line.close()

    return run


def rank_source(path: Path, seed: int, ledger: Ledger) -> Any:
    async def run(turn: Callable[[], Awaitable[bool]]) -> None:
        rng = random.Random(seed)  # noqa: S311 - test load
        line = Line(path)
        try:
            while await turn():
                answer = await line.request({
                    "op": "rank", "user": rng.choice(USERS), "candidates": rng.sample(ITEMS, 20),
                })  # fmt: skip
                if answer is not None and answer.get("ok"):
                    assert answer["items"], answer
                    ledger.ranked += 1
                await asyncio.sleep(0.05)
        finally:
            line.close()

    return run


# ------------------------------------------------------------------------ checks


def check_after_kill(copy: Path, topic: str, ledger: Ledger, fold: FoldConfig | None,
                     ) -> tuple[int, int]:  # fmt: skip
    """
    Checks a-d of the module docstring on ``copy``, a copy of the killed daemon's data
    made while ``ledger`` (a copy too) was as it is; d. only with a ``fold``.

    Returns (events in the log, offset of the snapshot restored).
    """
    ids = log_ids(copy)
    counts = Counter(ids)
    assert [] == [key for key, n in counts.items() if n > 1]  # a.
    sources = {key for key in counts if key.startswith(SOURCE_PREFIXES)}
    assert set() == sources - ledger.sent  # a.
    assert set() == ledger.acked["socket"] - sources  # b.
    stored = {int(p): offset for p, offset in positions(copy, f"kafka:{topic}").items()}
    wrong = {key: (p, o, stored.get(p, 0)) for key, (p, o) in ledger.kafka_offsets.items()
             if (key in counts) != (o < stored.get(p, 0))}  # fmt: skip
    assert {} == wrong  # c.
    return len(ids), check_restore(copy, fold) if fold is not None else 0  # d.


async def caught_up(daemon: Daemon, ledger: Ledger) -> None:
    """
    Wait until every acknowledged event is in the daemon's log and the log stands
    still (the impressions of the last answers are appended a moment after them).
    """
    wanted = ledger.all_acked()
    deadline = time.monotonic() + CATCH_UP_S
    before: list[str] = []
    while True:
        ids = await asyncio.to_thread(log_ids, daemon.tmp / "data")
        missing = wanted - set(ids)
        if not missing and ids == before:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{len(missing)} acknowledged events not in the log, e.g. "
                        f"{sorted(missing)[:5]}; {len(ids) - len(before)} more in 0.5 s")
        before = ids
        await asyncio.sleep(0.5)


# -------------------------------------------------------------------------- loop


class KillLoop:
    """The daemon under load, killed and restarted; what happened, for the assertions."""

    def __init__(self, tmp: Path, kafka: KafkaBroker, mqtt: MqttBroker, topic: str) -> None:
        self.tmp = tmp
        self.data = tmp / "data"
        self.topic = topic
        group = unique_name("group")
        self.config = CONFIG + (
            f'[kafka]\nbootstrap = "{kafka.bootstrap}"\ntopics = ["{topic}"]\n'
            f'group_id = "{group}"\ninstance_id = "{group}-a"\nsession_timeout_s = 15.0\n'
            f'[mqtt]\nurl = "mqtt://{mqtt.bootstrap}"\ntopics = ["{topic}"]\n'
            f'client_id = "{unique_name("rerankd")}"\n'
            "reconnect_min_s = 0.1\nreconnect_max_s = 1.0\n"
        )
        self.ledger = Ledger()
        self.tally = Tally()
        self.sources = Sources(self.ledger)
        self.daemon = Daemon(tmp, self.config, store=STORE)
        self.fold = load_config(self.daemon.config).fold
        self._kafka, self._mqtt = kafka, mqtt
        self._logged = 0
        self._spawned = time.monotonic()

    async def start_sources(self) -> None:
        """Once the first daemon's MQTT feed subscribed (nothing is kept for it before)."""
        await asyncio.to_thread(self.daemon.wait_for, "READY=1")
        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(self._mqtt_connected):
            assert time.monotonic() < deadline, "the MQTT feed did not connect"
            await asyncio.sleep(0.1)
        ledger, path = self.ledger, self.daemon.socket_path
        self.sources.start("kafka", kafka_source(self._kafka, self.topic, ledger))
        self.sources.start("mqtt", mqtt_source(self._mqtt, self.topic, ledger))
        for name in ("s0", "s1"):
            self.sources.start(name, socket_source(path, name, ledger))
        for seed in (1, 2):
            self.sources.start(f"rank{seed}", rank_source(path, seed, ledger))

    def _mqtt_connected(self) -> bool:
        with self.daemon.client() as client:
            return bool(client.request("stats")["feeds"]["mqtt"]["connected"])

    async def kill(self, delay_s: float, *, while_starting: bool, deep: bool) -> None:
        """
        SIGKILL the daemon ``delay_s`` after it was spawned (``while_starting``) or
        after READY=1; copy its files, restart it and check the copy meanwhile.
        """
        daemon = self.daemon
        if not while_starting:
            await asyncio.to_thread(daemon.wait_for, "READY=1")
            self.tally.ready_s.append(round(time.monotonic() - self._spawned, 1))
        await asyncio.sleep(delay_s)
        self.sources.check()  # a source that failed fails the test now
        assert daemon.proc.poll() is None, (self.tmp / "daemon.log").read_text()[-3000:]
        self.tally.before_ready += "READY=1" not in daemon.received()
        daemon.proc.send_signal(signal.SIGKILL)
        assert -signal.SIGKILL == await asyncio.to_thread(daemon.proc.wait, 30)
        daemon.close()
        self.tally.kills += 1
        copy = self.tmp / "check"
        await asyncio.to_thread(shutil.rmtree, copy, ignore_errors=True)
        await asyncio.to_thread(shutil.copytree, self.data, copy)
        ledger = self.ledger.copy()  # the sources go on while the daemon restarts
        self.daemon = Daemon(self.tmp, self.config, store=STORE)  # its imports overlap the check
        self._spawned = t0 = time.monotonic()
        count, snapshot_offset = await asyncio.to_thread(
            check_after_kill, copy, self.topic, ledger, self.fold if deep else None)
        self.tally.check_s.append(round(time.monotonic() - t0, 1))
        self.tally.checks += 1
        self.tally.grew += count > self._logged
        self.tally.restored_from_snapshot += snapshot_offset > 0
        self._logged = count

    async def live_check(self) -> None:
        """With the sources paused and caught up, the daemon's state is a fresh fold."""
        await asyncio.to_thread(self.daemon.wait_for, "READY=1")
        await self.sources.pause()
        try:
            await caught_up(self.daemon, self.ledger)
            await asyncio.to_thread(check_live_state, self.daemon, USERS)
            self.tally.live_checks += 1
        finally:
            self.sources.resume()

    async def finish(self) -> None:
        """Stop the sources, check the live state, stop cleanly, check the snapshot."""
        await asyncio.to_thread(self.daemon.wait_for, "READY=1")
        await self.sources.stop()
        await caught_up(self.daemon, self.ledger)
        await asyncio.to_thread(check_live_state, self.daemon, USERS)
        self.tally.live_checks += 1
        assert 0 == await asyncio.to_thread(self.daemon.stop)
        await asyncio.to_thread(check_stopped_state, self.daemon)

    def close(self) -> None:
        self.sources.cancel()
        self.daemon.close()


# -------------------------------------------------------------------------- test


async def test_sigkill_loop_keeps_every_acknowledged_event_once_and_state_a_fold(
    tmp_path: Path, kafka_broker: KafkaBroker, mqtt: MqttBroker, long_run
) -> None:
    """
    SIGKILLed at random moments under Kafka, MQTT, socket ingest and rank load, and
    restarted each time, the daemon never loses or doubles an acknowledged event and
    its state is always a fold of its log (checks a-d, live and stop-snapshot checks).
    """
    kills = int(os.environ.get("RERANKD_CHAOS_KILLS", "200" if long_run else "10"))
    deep_every = 5 if long_run else 1
    live_every = 25 if long_run else max(1, kills // 2)
    rng = random.Random(SEED)  # noqa: S311 - reproducible schedule
    topic = unique_name("chaos")
    await kafka_broker.create_topic(topic, partitions=2)
    started = time.monotonic()
    loop = KillLoop(tmp_path, kafka_broker, mqtt, topic)
    try:
        await loop.start_sources()
        for kill in range(kills):
            starting = kill % 5 == 4
            delay = rng.uniform(0.2, 2.0) if starting else rng.uniform(0.05, 1.5)
            await loop.kill(delay, while_starting=starting, deep=kill % deep_every == 0)
            if (kill + 1) % live_every == 0 and kill + 1 < kills:
                await loop.live_check()
        await loop.finish()
    finally:
        loop.close()
    ledger, tally = loop.ledger, loop.tally
    ids = log_ids(tmp_path / "data")
    acked = ledger.all_acked()
    ours = [key for key in ids if key.startswith(SOURCE_PREFIXES)]
    kafka_ends: dict[str, int] = {}  # the next offset of each partition
    for partition, offset in ledger.kafka_offsets.values():
        kafka_ends[str(partition)] = max(kafka_ends.get(str(partition), 0), offset + 1)
    print(f"\n{tally}, {len(ids)} events ({len(ours)} from the sources: "  # noqa: T201
          f"{ {k: len(v) for k, v in ledger.acked.items()} }), {ledger.ranked} ranked, "
          f"{ledger.resent} socket batches resent ({ledger.duplicates} with duplicates), "
          f"{time.monotonic() - started:.0f} s")
    assert ledger.sent == acked  # every source got its last events acknowledged
    assert {} == once_each(ids, acked)
    assert sorted(acked) == sorted(ours)
    assert len(ids) == len(set(ids))
    assert kafka_ends == positions(tmp_path / "data", f"kafka:{topic}")
    assert (kills, kills) == (tally.kills, tally.checks)
    assert tally.before_ready >= 1, tally
    assert tally.grew >= kills // 2, tally
    assert tally.restored_from_snapshot >= 1, tally
    assert tally.live_checks >= 2, tally
    assert ledger.ranked >= kills, ledger.ranked
    assert all(len(v) >= kills for v in ledger.acked.values()), ledger.acked
