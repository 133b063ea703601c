"""
Feeds benchmark: real Kafka and Mosquitto brokers into a real `rerankd run`.

    python bench/bench_feeds.py            # full run, about 4 minutes
    python bench/bench_feeds.py --quick    # about 2 minutes
    python bench/bench_feeds.py --smoke    # small backlogs, 3 s probes: bench/run --quick's

For each feed, against the brokers of ``scripts/kafka`` and ``scripts/mosquitto`` on
loopback and a daemon with the sequential model on (bench_daemon's random SASRec model
of 10,000 items), it measures:

- sustained events/s into the durable log with the fold: a backlog of N events (one
  event per message) waits on the broker (Kafka: a topic of 4 partitions; MQTT: the
  daemon's persistent session, made before the backlog is published), then the daemon
  starts and drains it; the rate is taken from the daemon's own counters (events made
  durable and folded), sampled every 100 ms, over the whole drain (the targets' figure)
  and over its middle 80%;
- event-to-visible latency at 1,000 events/s: while a stream of 1,000 view events/s
  flows through the broker, probe events (a purchase of a fresh item) are published one
  at a time; each probe's latency runs from just before its publish to the first rank
  answer, polled on the socket, that puts the fresh item first.

Brokers, daemon and load generator share this machine's cores, so the figures are end
to end on one machine. Writes bench/out/feeds.json (or under ``$RERANKD_BENCH_OUT``), with
each feed's probe latencies themselves (``samples_ms``), and prints a table with the
targets (Kafka >= 50,000 events/s, MQTT >= 10,000 events/s, p99 <= 20 ms on either feed).
A smoke run's drains last well under a second: its rates only show that the path works.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from bench_daemon import (  # noqa: E402
    N_ITEMS,
    N_USERS,
    Conn,
    judge,
    make_model,
    start_daemon,
    summarize,
    write_results,
)  # fmt: skip
from brokers import KafkaBroker, MqttBroker, free_ports  # noqa: E402

STREAM_RATE = 1000  # events/s behind the latency probes
GATEWAY_BATCH = 10  # events per MQTT message in the batched case
TOPIC = "bench-events"
MQTT_TOPIC = "rerankd/events/bench"
CLIENT_ID = "rerankd-bench"
_enc = msgspec.json.Encoder()

Send = Callable[[Sequence[bytes]], Awaitable[None]]


def _view(n: int) -> bytes:
    return _enc.encode({"id": f"e-{n}", "type": "view", "user": f"user-{n % N_USERS}",
                        "item": f"sku-{(n * 7) % N_ITEMS}", "ts": time.time()})  # fmt: skip


def _views(n: int, size: int) -> bytes:
    """One event, or a JSON list of ``size`` events (an edge gateway's batch)."""
    if size == 1:
        return _view(n)
    return b"[" + b",".join(_view(n + j) for j in range(size)) + b"]"


def _purchase(n: int, item: str) -> bytes:
    return _enc.encode({"id": f"p-{n}", "type": "purchase", "user": "buyer", "item": item,
                        "ts": time.time()})  # fmt: skip


# ------------------------------------------------------------------- measuring


async def drain_rate(path: Path, feed: str, total: int, timeout_s: float) -> dict[str, Any]:
    """Sample the durable count every 100 ms until ``total``; the sustained rates."""
    conn = await Conn.open(path)
    samples: list[tuple[float, int]] = []
    deadline = time.perf_counter() + timeout_s
    key = "accepted" if feed == "kafka" else "events"
    while time.perf_counter() < deadline:
        done = int((await conn.call("stats"))["feeds"][feed][key])
        samples.append((time.perf_counter(), done))
        if done >= total:
            break
        await asyncio.sleep(0.1)
    await conn.close()
    times = np.array([t for t, _ in samples])
    counts = np.array([c for _, c in samples])
    if counts[-1] < total:
        msg = f"{feed}: only {counts[-1]} of {total} events durable after {timeout_s} s"
        raise RuntimeError(msg)
    started = times[np.argmax(counts > 0)]  # first sample with anything in
    low, high = np.searchsorted(counts, [0.1 * total, 0.9 * total])
    # a short drain (a smoke run's) may fall between two samples: no middle then
    middle = (float((counts[high] - counts[low]) / (times[high] - times[low]))
              if times[high] > times[low] else None)  # fmt: skip
    return {
        "events": total,
        "drain_s": round(float(times[-1] - started), 2),
        "per_s_whole": round(total / max(float(times[-1] - started), 1e-3), 1),
        "per_s_middle_80pct": None if middle is None else round(middle, 1),
        # (seconds since the first event was durable, events durable): the drain's curve
        "timeline": [(round(float(t - started), 3), int(c)) for t, c in samples if t >= started],
    }


async def visible_latency(path: Path, send: Send, seconds: float, tag: str) -> dict[str, Any]:
    """Probe latencies (publish to a rank that shows it) under a 1,000 events/s stream."""
    stop = asyncio.Event()
    streamed = [0]

    async def stream() -> None:
        n, next_at = 0, time.perf_counter()
        per_tick = STREAM_RATE // 100
        while not stop.is_set():
            await send([_view(50_000_000 + n + j) for j in range(per_tick)])
            n += per_tick
            streamed[0] += per_tick
            next_at += 0.01
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    reader = await Conn.open(path)
    delays: list[float] = []
    background = asyncio.create_task(stream())
    started = time.perf_counter()
    await asyncio.sleep(1.0)  # the stream runs before the first probe
    r = 0
    while time.perf_counter() - started < seconds:
        fresh = f"fresh-{tag}-{r}"
        sent = time.perf_counter()
        await send([_purchase(r, fresh)])
        while True:
            ranked = await reader.call("rank", user="viewer", candidates=["never-seen", fresh])
            if ranked["items"][0] == fresh:
                delays.append(time.perf_counter() - sent)
                break
        r += 1
        await asyncio.sleep(0.02)
    stop.set()
    await background
    wall = time.perf_counter() - started
    await reader.close()
    figures = summarize(delays, None, keep=True)
    figures["stream_per_s"] = round(streamed[0] / wall, 1)
    return figures


def _brief(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in figures.items() if k not in {"timeline", "samples_ms"}}


# ------------------------------------------------------------------ the feeds


async def bench_kafka(tmp: Path, broker: KafkaBroker, backlog: int, seconds: float,
                      ) -> dict[str, Any]:  # fmt: skip
    from aiokafka import AIOKafkaProducer  # noqa: PLC0415

    from daemon.feeds.kafka import publish  # noqa: PLC0415

    await broker.create_topic(TOPIC, partitions=4)
    started = time.perf_counter()
    await publish(broker.bootstrap, TOPIC, (_view(n) for n in range(backlog)))
    published_s = time.perf_counter() - started
    print(f"kafka: {backlog} events published in {published_s:.1f} s", flush=True)
    run_dir = tmp / "kafka"
    run_dir.mkdir()
    (run_dir / "model.safetensors").symlink_to(tmp / "model.safetensors")
    proc, path = start_daemon(run_dir, f'[kafka]\nbootstrap = "{broker.bootstrap}"\n'
                                       f'topics = ["{TOPIC}"]\ngroup_id = "bench"\n')  # fmt: skip
    try:
        results: dict[str, Any] = {"published_s": round(published_s, 1)}
        results["throughput"] = await drain_rate(path, "kafka", backlog, timeout_s=600)
        print(f"kafka throughput: {_brief(results['throughput'])}", flush=True)
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all",
                                    enable_idempotence=True)  # fmt: skip
        await producer.start()
        try:

            async def send(payloads: Sequence[bytes]) -> None:
                for payload in payloads:
                    await producer.send(TOPIC, payload)  # queued; the ack is not awaited

            results["event_to_visible"] = await visible_latency(path, send, seconds, "kafka")
        finally:
            await producer.stop()
        print(f"kafka event to visible: {_brief(results['event_to_visible'])}", flush=True)
        return results
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _session_properties() -> Any:
    from paho.mqtt.packettypes import PacketTypes  # noqa: PLC0415
    from paho.mqtt.properties import Properties  # noqa: PLC0415

    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 3600
    properties.ReceiveMaximum = 1000
    return properties


async def _mqtt_backlog(broker: MqttBroker, client_id: str, payloads: Iterable[bytes]) -> float:
    """Make ``client_id``'s persistent session, then queue ``payloads`` for it; seconds."""
    import aiomqtt  # noqa: PLC0415

    from daemon.feeds.mqtt import publish  # noqa: PLC0415

    async with aiomqtt.Client("127.0.0.1", broker.port, identifier=client_id,
                              protocol=aiomqtt.ProtocolVersion.V5, clean_start=False,
                              properties=_session_properties()) as client:  # fmt: skip
        await client.subscribe("rerankd/events/#", qos=1)
    started = time.perf_counter()
    await publish(f"mqtt://127.0.0.1:{broker.port}", MQTT_TOPIC, payloads)
    return time.perf_counter() - started


async def mqtt_client_ceiling(broker: MqttBroker, messages: int) -> dict[str, Any]:
    """
    The MQTT client stack alone: a bare aiomqtt (paho) MQTT 5 subscriber that takes
    and acknowledges messages as the feed does, draining a backlog, doing nothing else.
    """
    import aiomqtt  # noqa: PLC0415

    from daemon.feeds.mqtt import _Inbox, _Paho  # noqa: PLC0415 - the feed's own path

    await _mqtt_backlog(broker, "bench-bare", (_view(n) for n in range(messages)))
    client = aiomqtt.Client("127.0.0.1", broker.port, identifier="bench-bare",
                            protocol=aiomqtt.ProtocolVersion.V5, clean_start=False,
                            properties=_session_properties(), queue_type=_Inbox,
                            max_queued_incoming_messages=0)  # fmt: skip
    paho = _Paho(client)
    async with client:
        started, n = time.perf_counter(), 0
        while n < messages:  # as the feed takes them: batches of up to 1000, then the acks
            batch = [await anext(client.messages)]
            _Inbox.of(client).take(batch, 1000)
            paho.ack(batch)
            n += len(batch)
        seconds = time.perf_counter() - started
    return {"messages": messages, "per_s": round(messages / seconds, 1)}


async def _mqtt_latency(broker: MqttBroker, path: Path, seconds: float) -> dict[str, Any]:
    import aiomqtt  # noqa: PLC0415

    async with aiomqtt.Client("127.0.0.1", broker.port, max_inflight_messages=1000,
                              protocol=aiomqtt.ProtocolVersion.V5) as client:  # fmt: skip
        client.pending_calls_threshold = 10_000
        in_flight: set[asyncio.Task[None]] = set()

        async def send(payloads: Sequence[bytes]) -> None:
            for payload in payloads:  # QoS 1; the PUBACK is not awaited here
                task = asyncio.create_task(client.publish(MQTT_TOPIC, payload, qos=1))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)

        figures = await visible_latency(path, send, seconds, "mqtt")
        await asyncio.gather(*in_flight)
    return figures


async def bench_mqtt(tmp: Path, broker: MqttBroker, backlog: int, seconds: float,
                     ) -> dict[str, Any]:  # fmt: skip
    results: dict[str, Any] = {"client_ceiling": await mqtt_client_ceiling(broker, backlog)}
    print(f"mqtt client alone: {results['client_ceiling']}", flush=True)
    url = f"mqtt://127.0.0.1:{broker.port}"
    config = f'[mqtt]\nurl = "{url}"\nclient_id = "{CLIENT_ID}"\n'
    # the batched drain is fast: five times the events, so that it lasts long enough to sample
    per_message = {1: backlog, GATEWAY_BATCH: 5 * backlog // GATEWAY_BATCH}
    for size, messages in per_message.items():
        published_s = await _mqtt_backlog(
            broker, CLIENT_ID, (_views(n, size) for n in range(0, messages * size, size))
        )
        print(f"mqtt: {messages * size} events in {messages} messages published in "
              f"{published_s:.1f} s", flush=True)  # fmt: skip
        run_dir = tmp / f"mqtt-{size}"
        run_dir.mkdir()
        (run_dir / "model.safetensors").symlink_to(tmp / "model.safetensors")
        proc, path = start_daemon(run_dir, config)
        try:
            figures = await drain_rate(path, "mqtt", messages * size, timeout_s=600)
            figures["events_per_message"] = size
            results[f"throughput_{size}_per_message"] = figures
            print(f"mqtt throughput, {size} events per message: {_brief(figures)}", flush=True)
            if size != 1:
                continue
            results["event_to_visible"] = await _mqtt_latency(broker, path, seconds)
            print(f"mqtt event to visible: {_brief(results['event_to_visible'])}", flush=True)
            conn = await Conn.open(path)
            mqtt = (await conn.call("stats"))["feeds"]["mqtt"]
            await conn.close()
            # Mosquitto < 2.0.13 ignores the Receive Maximum after the first window
            results["max_unacked"] = mqtt["max_unacked"]
            results["receive_maximum_exceeded"] = mqtt["receive_maximum_exceeded"]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return results


# ------------------------------------------------------------------------ main


def verdicts(r: dict[str, Any]) -> list[dict[str, str]]:
    checks = [
        # the whole drain, not its middle: with Mosquitto < 2.0.13 the backlog floods
        # in, and the middle of the drain is the burst after it
        (">= 50,000 events/s from Kafka", r["kafka"]["throughput"]["per_s_whole"],
         50_000.0, "ge"),
        (">= 10,000 events/s from MQTT, one event per message",
         r["mqtt"]["throughput_1_per_message"]["per_s_whole"], 10_000.0, "ge"),
        (f">= 10,000 events/s from MQTT, {GATEWAY_BATCH} events per message",
         r["mqtt"][f"throughput_{GATEWAY_BATCH}_per_message"]["per_s_whole"], 10_000.0,
         "ge"),
        ("Kafka event to visible p99 <= 20 ms", r["kafka"]["event_to_visible"]["p99_ms"],
         20.0, "le"),
        ("MQTT event to visible p99 <= 20 ms", r["mqtt"]["event_to_visible"]["p99_ms"],
         20.0, "le"),
    ]  # fmt: skip
    return judge(checks)


#: (Kafka backlog, MQTT backlog, seconds of probes) per mode
SIZES = {"full": (200_000, 60_000, 15.0), "quick": (50_000, 20_000, 5.0),
         "smoke": (20_000, 4_000, 3.0)}  # fmt: skip


async def run_all(tmp: Path, mode: str) -> dict[str, Any]:
    kafka_backlog, mqtt_backlog, seconds = SIZES[mode]
    kafka_port, controller_port, mqtt_port = free_ports(3)
    kafka = KafkaBroker(tmp / "kafka-broker", kafka_port, controller_port)
    mqtt = MqttBroker(tmp / "mosquitto", mqtt_port)
    for broker in (kafka, mqtt):
        broker.directory.mkdir()
        broker.start()
    try:
        return {
            "kafka": await bench_kafka(tmp, kafka, kafka_backlog, seconds),
            "mqtt": await bench_mqtt(tmp, mqtt, mqtt_backlog, seconds),
        }
    finally:
        for broker in (kafka, mqtt):
            broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--quick", action="store_true", help="smaller backlogs, 5 s probes")
    parser.add_argument("--smoke", action="store_true",
                        help="small backlogs, 3 s probes: checks that it runs")
    args = parser.parse_args()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    # Mosquitto saves its whole state file every N changes (the tests' brokers: every
    # change); a backlog of many thousand messages would rewrite it each time
    os.environ.setdefault("RERANKD_MQTT_AUTOSAVE_CHANGES", "1000000")
    subprocess.run([str(ROOT / "scripts" / "kafka"), "fetch"], check=True)  # noqa: S603
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        make_model(tmp / "model.safetensors")
        results = asyncio.run(run_all(tmp, mode))
    results["targets"] = verdicts(results)
    write_results(results, "feeds", quick=args.quick, smoke=args.smoke)


if __name__ == "__main__":
    main()
