"""
The soak benchmark behind ``bench/soak`` (see its docstring for what it measures).

The load generators are in ``_soakload``; here are the sampler (`Soak`), which starts
them, reads the daemon every period and collects their reports, the verdicts and the
plot, and the set-up (brokers, model, daemon).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from _soakload import KAFKA_PARTITIONS, KAFKA_TOPIC, Load, worker  # noqa: E402
from bench_daemon import (  # noqa: E402
    Conn,
    git_commit,
    judge,
    make_model,
    out_dir,
    start_daemon,
    write_results,
)  # fmt: skip
from brokers import KafkaBroker, MqttBroker, free_ports  # noqa: E402

__all__ = ["main"]

#: Kafka's own JIT options without C1-only (scripts/kafka's default, for quick starts):
#: a broker that runs for half an hour is worth its full JIT.
KAFKA_JIT = ("-server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35"
             " -XX:+ExplicitGCInvokesConcurrent")  # fmt: skip
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -------------------------------------------------------------------- sampler


def _cpu_ticks(pid: int | None) -> int:
    """utime + stime of ``pid`` (all its threads), in clock ticks; 0 when it is gone."""
    if pid is None:
        return 0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all cores since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def _on_disk(pid: int, data_dir: Path) -> tuple[float, int, int]:
    """The daemon's RSS (MB) and open descriptors; its log's bytes (events.db + WAL)."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(next(line.split()[1] for line in status.splitlines()
                      if line.startswith("VmRSS:")))  # fmt: skip
    fds = sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
    log = data_dir / "events.db"
    log_bytes = sum(p.stat().st_size for p in (log, log.with_name("events.db-wal")) if p.exists())
    return rss_kb / 1024, fds, log_bytes


def _pid_of(broker: KafkaBroker | MqttBroker) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int((broker.directory / broker.pid_name).read_text())
    return None


@dataclass(slots=True)
class _Reading:
    """The daemon and the machine at one instant."""

    at: float
    stats: dict[str, Any]
    rss_mb: float
    fds: int
    log_bytes: int
    cpu: dict[str, int]
    machine: tuple[int, int]


class Soak:
    """One soak run against a started daemon and brokers."""

    def __init__(self, load: Load, daemon: subprocess.Popen[bytes], data_dir: Path,
                 brokers: dict[str, int | None], warmup_s: float) -> None:  # fmt: skip
        self.load = load
        self.daemon = daemon
        self.data_dir = data_dir
        self.pids: dict[str, int | None] = {"daemon": daemon.pid, **brokers}
        self.warmup_s = warmup_s
        self.samples: list[dict[str, Any]] = []
        self.latencies: list[np.ndarray] = []  # post-warm-up rank latencies, ms
        self.published = {"kafka": 0, "mqtt": 0}
        self.failed = {"kafka": 0, "mqtt": 0}
        self.tail_ranks = 0  # answers after the last period
        self.tail = LogTail(data_dir / "events.db")  # what the log holds, read as it grows
        self._reports: Any = None
        self._got: dict[tuple[str, str, int], Any] = {}

    async def run(self) -> dict[str, Any]:
        conn = await Conn.open(Path(self.load.socket))
        try:
            await _feeds_up(conn)
            procs, start = self._start_workers()
            try:
                return await self._measure(conn, start)
            finally:
                for proc in procs:
                    proc.join(timeout=30)
                    if proc.is_alive():
                        proc.kill()
        finally:
            await conn.close()

    def _start_workers(self) -> tuple[list[Any], Any]:
        ctx = mp.get_context("spawn")  # this process holds JAX; a fork would copy its threads
        self._reports, start = ctx.Queue(), ctx.Value("d", 0.0)
        procs = [ctx.Process(target=worker, args=(kind, self.load, self._reports, start),
                             name=f"soak-{kind}", daemon=True)
                 for kind in ("rank", "ingest")]  # fmt: skip
        for proc in procs:
            proc.start()
        return procs, start

    async def _measure(self, conn: Conn, start: Any) -> dict[str, Any]:
        load = self.load
        for kind in ("rank", "ingest"):
            self.pids[f"generator_{kind}"] = await self._report("ready", kind, 0, timeout_s=120)
        before = await self._read(conn)
        t0 = time.monotonic() + 0.2
        start.value = t0
        _print_header()
        for k in range(1, load.periods + 1):
            await asyncio.sleep(max(0.0, t0 + k * load.sample_s - time.monotonic()))
            now = await self._read(conn)
            await asyncio.to_thread(self.tail.read)
            rank = await self._report("period", "rank", k)
            ingest = await self._report("period", "ingest", k)
            self._add_sample(k, before, now, rank, ingest)
            before = now
        rank = await self._report("final", "rank", 0, timeout_s=load.timeout_s + 60)
        ingest = await self._report("final", "ingest", 0, timeout_s=load.timeout_s + 90)
        self._add_tail(rank, ingest)
        drain_s = await self._drain(conn)
        return {"drain_s": drain_s, "final_stats": (await conn.call("stats"))}

    async def _report(self, what: str, kind: str, k: int, timeout_s: float | None = None) -> Any:
        """The worker's report ``(what, kind, k)``, keeping others that come first."""
        deadline = time.monotonic() + (timeout_s or self.load.sample_s + 30)
        while (what, kind, k) not in self._got:
            left = deadline - time.monotonic()
            if left <= 0 or self.daemon.poll() is not None:
                msg = f"no {what} report {k} from the {kind} generator (or the daemon died)"
                raise RuntimeError(msg)
            with contextlib.suppress(queue.Empty):
                got = await asyncio.to_thread(self._reports.get, timeout=min(left, 1.0))
                self._got[got[:3]] = got[3]
        return self._got.pop((what, kind, k))

    async def _read(self, conn: Conn) -> _Reading:
        stats = await conn.call("stats")
        rss_mb, fds, log_bytes = _on_disk(self.daemon.pid, self.data_dir)
        return _Reading(
            at=time.monotonic(), stats=stats, rss_mb=rss_mb, fds=fds, log_bytes=log_bytes,
            cpu={name: _cpu_ticks(pid) for name, pid in self.pids.items()},
            machine=_machine_ticks(),
        )  # fmt: skip

    def _add_sample(self, k: int, before: _Reading, now: _Reading, rank: dict[str, Any],
                    ingest: dict[str, Any]) -> None:  # fmt: skip
        load, s0, s1 = self.load, before.stats, now.stats
        lat = rank["latencies_ms"]
        if after_warmup(k * load.sample_s, load.sample_s, self.warmup_s):
            self.latencies.append(lat)
        errors = Counter(rank["errors"]) + _daemon_errors(s0, s1) + self._publish_errors(ingest)
        # a period without answers nor timeouts (a stall shorter than the timeout)
        no_answer = load.timeout_s * 1e3 if load.rank_rate else 0.0
        sample = {
            "t_s": round(k * load.sample_s, 3), "rss_mb": round(now.rss_mb, 2), "fds": now.fds,
            "queues": _queues(s1) | {"rank_unanswered": rank["unanswered"],
                                     "publish_unacked": ingest["unacked"]},
            **{f"rank_{q}_ms": v for q, v in _latency(lat, no_answer).items()},
            "ranks": rank["ranks"], "events": _durable(s1) - _durable(s0),
            **_split(errors), "log_bytes": now.log_bytes,
            # beyond the contract
            "log_offset": s1["events"]["log_offset"],
            "indexed_ids": s1["events"]["indexed_ids"],
            "published": {feed: ingest["acked"].get(feed, 0) - self.published[feed]
                          for feed in self.published},
            "errors": dict(errors), "cpu_pct": _cpu(before, now),
            "send_lag_p99_ms": {"rank": rank["send_lag_p99_ms"],
                                "ingest": ingest["send_lag_p99_ms"]},
        }  # fmt: skip
        self.published = {feed: ingest["acked"].get(feed, 0) for feed in self.published}
        self.failed = {feed: ingest["failed"].get(feed, 0) for feed in self.failed}
        self.samples.append(sample)
        _print_sample(sample, load.sample_s)

    def _publish_errors(self, ingest: dict[str, Any]) -> Counter[str]:
        return Counter({f"publish_failed:{feed}": ingest["failed"].get(feed, 0) - n
                        for feed, n in self.failed.items()})  # fmt: skip

    def _add_tail(self, rank: dict[str, Any], ingest: dict[str, Any]) -> None:
        """
        What came after the last period: its errors go into the last sample (timeouts,
        failed or unacknowledged publishes), its latencies into the run's; its answers
        do not count for the rate (``tail_ranks``).
        """
        last = self.samples[-1]
        self.tail_ranks = rank["ranks"]
        errors = Counter(last["errors"]) + Counter(rank["errors"]) + self._publish_errors(ingest)
        errors["publish_unacked_at_end"] += ingest["unacked"]  # neither acked nor failed
        errors = +errors  # without the kinds at zero
        last["errors"] = dict(errors)
        last.update(_split(errors))
        self.latencies.append(rank["latencies_ms"])
        self.published = {feed: ingest["acked"].get(feed, 0) for feed in self.published}
        self.failed = {feed: ingest["failed"].get(feed, 0) for feed in self.failed}

    async def _drain(self, conn: Conn, timeout_s: float = 120.0) -> float:
        """Seconds until every published event is durable (or the timeout)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            feeds = (await conn.call("stats"))["feeds"]
            if (feeds["kafka"]["accepted"] >= self.published["kafka"]
                    and feeds["mqtt"]["events"] >= self.published["mqtt"]):  # fmt: skip
                break
            await asyncio.sleep(0.2)
        return round(time.monotonic() - started, 2)


def after_warmup(t_s: float, sample_s: float, warmup_s: float) -> bool:
    """Whether the sample ending at ``t_s`` covers a period wholly after the warm-up."""
    return t_s - sample_s >= warmup_s - 1e-6


def _latency(lat_ms: np.ndarray, no_answer: float) -> dict[str, float]:
    """p50, p99, p99.9 and max of a period's latencies (``no_answer`` when it has none)."""
    if not len(lat_ms):
        return dict.fromkeys(("p50", "p99", "p999", "max"), no_answer)
    p50, p99, p999 = np.percentile(lat_ms, [50, 99, 99.9])
    return {"p50": round(float(p50), 3), "p99": round(float(p99), 3),
            "p999": round(float(p999), 3), "max": round(float(lat_ms.max()), 3)}  # fmt: skip


def _split(errors: Counter[str]) -> dict[str, int]:
    """The contract's two error counts: rank_* kinds, and the rest (ingest)."""
    rank = sum(n for kind, n in errors.items() if kind.startswith("rank_"))
    return {"rank_errors": rank, "ingest_errors": sum(errors.values()) - rank}


def _cpu(before: _Reading, now: _Reading) -> dict[str, float]:
    """CPU % of one core for each process between two readings; "machine": all cores."""
    wall = now.at - before.at
    cpu = {name: round(100 * (now.cpu[name] - before.cpu[name]) / _CLK_TCK / wall, 1)
           for name in now.cpu}  # fmt: skip
    cpu["generator"] = round(cpu.pop("generator_rank") + cpu.pop("generator_ingest"), 1)
    busy, total = (b - a for a, b in zip(before.machine, now.machine, strict=True))
    cpu["machine"] = round(100 * busy / max(total, 1) * (os.cpu_count() or 1), 1)
    return cpu


async def _feeds_up(conn: Conn, timeout_s: float = 120.0) -> None:
    """Wait until the Kafka feed holds every partition and the MQTT feed is connected."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        feeds = (await conn.call("stats"))["feeds"]
        if feeds["kafka"]["partitions"] == KAFKA_PARTITIONS and feeds["mqtt"]["connected"]:
            return
        await asyncio.sleep(0.2)
    msg = f"the daemon's feeds did not come up within {timeout_s:g} s"
    raise RuntimeError(msg)


def _durable(stats: dict[str, Any]) -> int:
    """Events of the stream made durable so far, by the feeds' own counters."""
    return int(stats["feeds"]["kafka"]["accepted"]) + int(stats["feeds"]["mqtt"]["events"])


def _daemon_errors(s0: dict[str, Any], s1: dict[str, Any]) -> Counter[str]:
    """What went wrong in the daemon between two ``stats``, by kind."""
    k0, k1 = s0["feeds"]["kafka"], s1["feeds"]["kafka"]
    m0, m1 = s0["feeds"]["mqtt"], s1["feeds"]["mqtt"]
    d = {
        "dead_lettered": k1["dead_lettered"] - k0["dead_lettered"]
        + m1["dead_lettered"] - m0["dead_lettered"],
        "duplicate": k1["duplicates"] - k0["duplicates"],
        # a ping-pong of a feed's connection: a new consumer, a rebalance, a reconnect
        "feed_reconnect": sum(k1[c] - k0[c] for c in ("connects", "errors", "rebalances"))
        + sum(m1[c] - m0[c] for c in ("connects", "disconnects")),
        "impressions_dropped": s1["events"]["impressions_dropped"]
        - s0["events"]["impressions_dropped"],
        # at the sample's instant (kafka: no group coordinator, e.g.)
        "feed_disconnected": (not k1["connected"]) + (not m1["connected"]),
    }
    return Counter({kind: n for kind, n in d.items() if n})


def _queues(stats: dict[str, Any]) -> dict[str, int]:
    """The queue depths the daemon shows, flat."""
    feeds = stats["feeds"]
    return {"writer_pending": stats["writer_pending"], **stats.get("queues", {}),
            "kafka_lag": feeds["kafka"]["lag"] or 0, "mqtt_unacked": feeds["mqtt"]["unacked"],
            "connections": stats["connections"]}  # fmt: skip


_COLUMNS = ("t s", "RSS MB", "fds", "p50 ms", "p99 ms", "rank/s", "ev/s", "errors", "log MB",
            "writer", "lag", "mqtt", "refresh", "cpu d/g/k/m/all %")  # fmt: skip


def _print_header() -> None:
    print("  ".join(f"{c:>8}" for c in _COLUMNS[:-1]) + "  " + _COLUMNS[-1], flush=True)


def _print_sample(s: dict[str, Any], period: float) -> None:
    q, c = s["queues"], s["cpu_pct"]
    cells = (s["t_s"], s["rss_mb"], s["fds"], s["rank_p50_ms"], s["rank_p99_ms"],
             s["ranks"] / period, s["events"] / period, s["rank_errors"] + s["ingest_errors"],
             s["log_bytes"] / 2**20, q["writer_pending"], q["kafka_lag"], q["mqtt_unacked"],
             q.get("vector_refresh", 0))  # fmt: skip
    cpu = "/".join(f"{c[k]:.0f}" for k in ("daemon", "generator", "kafka", "mosquitto", "machine"))
    print("  ".join(f"{v:>8.1f}" if isinstance(v, float) else f"{v:>8}" for v in cells)
          + f"  {cpu}", flush=True)  # fmt: skip


# ------------------------------------------------------------ log, verdicts, plot


class LogTail:
    """
    Reads the daemon's log as it grows and marks each stream event it finds, so the end
    of the run can say that every published event was logged exactly once even when
    retention deleted rows meanwhile.

    The generators number their events per feed (ids ``K<n>`` and ``M<n>``); a row
    marks ``n`` in its feed's counts. Offsets are consecutive (eventstore.log), so a
    gap between two reads means rows went before this read them (retention faster than
    the sampling): counted as ``unread``, which fails the verdict, since nothing can be
    said of those events. Reads go through a read-only connection of its own, in
    chunks, each its own short read transaction (WAL: the writer is not blocked).
    """

    _PREFIX: Final = MappingProxyType({"K": "kafka", "M": "mqtt"})
    _CHUNK: Final = 50_000
    _SQL: Final = ("SELECT log_offset, id FROM events WHERE log_offset > ? "
                   "ORDER BY log_offset LIMIT ?")  # fmt: skip

    def __init__(self, log: Path) -> None:
        self.log = log
        self.after = 0  # the last offset read
        self.counts = {feed: np.zeros(0, dtype=np.uint8) for feed in self._PREFIX.values()}
        self.other = 0  # rows that are not the generators' (the daemon's impressions)
        self.unread = 0  # offsets deleted before they were read

    def read(self) -> int:
        """Read the rows appended since the last read; how many."""
        conn = sqlite3.connect(f"file:{self.log}?mode=ro", uri=True)
        read = 0
        try:
            while rows := conn.execute(self._SQL, (self.after, self._CHUNK)).fetchall():
                self.unread += rows[-1][0] - self.after - len(rows)  # offsets skipped
                self.after = rows[-1][0]
                self._mark([row[1] for row in rows])
                read += len(rows)
        finally:
            conn.close()
        return read

    def _mark(self, ids: list[str]) -> None:
        by_feed: dict[str, list[int]] = {feed: [] for feed in self.counts}
        for event_id in ids:
            feed = self._PREFIX.get(event_id[:1])
            if feed is None or not event_id[1:].isdigit():
                self.other += 1
            else:
                by_feed[feed].append(int(event_id[1:]))
        for feed, numbers in by_feed.items():
            if not numbers:
                continue
            n = np.array(numbers, dtype=np.int64)
            counts = self.counts[feed]
            if n.max() >= len(counts):
                grown = np.zeros(max(int(n.max()) + 1, 2 * len(counts)), dtype=np.uint8)
                grown[: len(counts)] = counts
                counts = self.counts[feed] = grown
            np.add.at(counts, n, 1)

    def verdict(self, published: dict[str, int]) -> dict[str, int]:
        """Against what the brokers acknowledged (events ``0 .. published[feed] - 1``)."""
        out = {"other": self.other, "unread": self.unread, "missing": 0, "duplicates": 0,
               "unpublished": 0}  # fmt: skip
        for feed, counts in self.counts.items():
            sent = counts[: published[feed]]
            out[feed] = int(np.count_nonzero(sent))
            out["missing"] += published[feed] - out[feed]
            out["duplicates"] += int(np.maximum(sent.astype(np.int64) - 1, 0).sum())
            out["unpublished"] += int(np.count_nonzero(counts[published[feed]:]))
        return out


def _spread(values: list[float]) -> tuple[float, str]:
    """(max - min) / first in %, and how it reads."""
    first, low, high = values[0], min(values), max(values)
    pct = 100 * (high - low) / first
    return round(pct, 2), f"{pct:.2f}% (min {low:g}, max {high:g}, first {first:g})"


def verdicts(r: dict[str, Any]) -> list[dict[str, str]]:
    """The issue's targets over the post-warm-up samples (bench/soak's docstring defines them)."""
    post = _post_warmup(r)
    seconds = len(post) * r["sample_s"]
    rss, rss_text = _spread([s["rss_mb"] for s in post])
    growth = r["after_warmup"]
    rss_text += (f"; slope {growth['rss_mb_per_min']:g} MB/min, the log's id index "
                 f"{growth['id_index_mb_per_min']:g} MB/min of it")  # fmt: skip
    # the same less the growth of the log's id index (16 bytes an id, eventstore._ids)
    base = post[0]["indexed_ids"]
    less_index, less_text = _spread([s["rss_mb"] - 16 * (s["indexed_ids"] - base) / 2**20
                                     for s in post])  # fmt: skip
    fds, fds_text = _spread([s["fds"] for s in post])
    first, last = _p99_ends(post)
    ratio = round(last / max(first, 1e-3), 3)  # (no ranks asked: both 0)
    worst = max(s["rank_p99_ms"] for s in post)
    rank_rate = sum(s["ranks"] for s in post) / seconds
    event_rate = sum(s["events"] for s in post) / seconds
    rank_dev = 100 * abs(rank_rate - r["rank_rate"]) / max(r["rank_rate"], 1)
    event_dev = 100 * abs(event_rate - r["event_rate"]) / max(r["event_rate"], 1)
    errors: Counter[str] = Counter()
    for s in r["samples"]:
        errors.update(s["errors"])
    logged = r["logged"]
    wrong = sum(logged[k] for k in ("missing", "duplicates", "unread", "unpublished"))
    rows = [
        ("RSS flat within 5% after warm-up", rss, 5.0, "le", rss_text),
        ("RSS less the id index (16 B an event) flat within 5%", less_index, 5.0, "le",
         less_text),
        ("open fds flat within 5% after warm-up", fds, 5.0, "le", fds_text),
        ("p99 steady: median of the last third of the samples <= 1.5x the first third's",
         ratio, 1.5, "le", f"{last:g} ms vs {first:g} ms ({ratio:.2f}x)"
         + (", at the timeout" if max(first, last) >= r["timeout_s"] * 1e3 else "")),
        (f"p99 <= {r['p99_bound_ms']:g} ms in every sample after warm-up", worst,
         r["p99_bound_ms"], "le", f"worst {worst:g} ms"),
        (f"rank rate within 2% of {r['rank_rate']:,}/s", rank_dev, 2.0, "le",
         f"{rank_rate:,.1f}/s ({rank_dev:.2f}% off)"),
        (f"event rate within 2% of {r['event_rate']:,}/s (durable)", event_dev, 2.0, "le",
         f"{event_rate:,.1f}/s ({event_dev:.2f}% off)"),
        ("zero errors", sum(errors.values()), 0.0, "le",
         ", ".join(f"{k}: {n}" for k, n in sorted(errors.items()) if n) or "0"),
        ("every published event logged exactly once", wrong, 0.0, "le",
         (f"published {r['published']}; logged {logged['kafka']:,} and {logged['mqtt']:,}; "
          f"{logged['missing']} missing, {logged['duplicates']} twice or more, "
          f"{logged['unread']} deleted unread, {logged['unpublished']} not acknowledged, "
          f"(and {logged['other']:,} rows of the daemon's impressions); "
          f"drained in {r['drain_s']} s")),
    ]  # fmt: skip
    judged = judge([row[:4] for row in rows])
    for verdict, row in zip(judged, rows, strict=True):
        verdict["measured"] = row[4]
    return judged


def _p99_ends(post: list[dict[str, Any]]) -> tuple[float, float]:
    """
    The median p99 of the first and of the last third of the samples (one each at least).

    Medians of thirds rather than the first and last sample: one minute's p99 on a
    saturated 2-core machine swings by 3x from sample to sample, so two single samples
    said "steady" or not by chance; a drift upwards still moves the thirds apart.
    """
    third = max(1, len(post) // 3)
    p99 = [s["rank_p99_ms"] for s in post]
    return float(np.median(p99[:third])), float(np.median(p99[-third:]))


def summary(r: dict[str, Any]) -> dict[str, Any]:
    """
    After the warm-up: the RSS slope beside the growth of the log's in-memory id index
    (16 bytes an event by design, eventstore._ids), and the mean CPU % of each process.
    """
    post = _post_warmup(r)
    minutes = [s["t_s"] / 60 for s in post]
    slope = float(np.polyfit(minutes, [s["rss_mb"] for s in post], 1)[0])
    events = (post[-1]["log_offset"] - post[0]["log_offset"]) / (minutes[-1] - minutes[0])
    ids = float(np.polyfit(minutes, [s["indexed_ids"] for s in post], 1)[0])
    cpu = {name: round(float(np.mean([s["cpu_pct"][name] for s in post])), 1)
           for name in post[0]["cpu_pct"]}  # fmt: skip
    return {"rss_mb_per_min": round(slope, 3),
            "id_index_mb_per_min": round(16 * ids / 2**20, 3),
            "log_events_per_min": round(events, 1), "mean_cpu_pct": cpu}  # fmt: skip


def _post_warmup(r: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in r["samples"]
            if after_warmup(s["t_s"], r["sample_s"], r["warmup_minutes"] * 60)]  # fmt: skip


def plot(r: dict[str, Any], path: Path) -> None:
    """
    RSS, fds, rank p50/p99 (log scale) and log size against time, the warm-up shaded
    up to the first sample that the verdicts count.
    """
    import matplotlib as mpl  # noqa: PLC0415

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    t = [s["t_s"] / 60 for s in r["samples"]]
    post = _post_warmup(r)
    warmup = (post[0]["t_s"] - r["sample_s"]) / 60 if post else t[-1]
    fig, axes = plt.subplots(4, 1, figsize=(8, 10), sharex=True)
    panels = [("daemon RSS (MB)", [("RSS", "rss_mb")]), ("open fds", [("fds", "fds")]),
              ("rank latency (ms)", [("p50", "rank_p50_ms"), ("p99", "rank_p99_ms")]),
              ("log on disk (MB)", [("events.db + WAL", "log_bytes")])]  # fmt: skip
    for ax, (title, series) in zip(axes, panels, strict=True):
        for label, key in series:
            scale = 2**-20 if key == "log_bytes" else 1
            ax.plot(t, [s[key] * scale for s in r["samples"]], marker="o", ms=3, label=label)
        ax.axvspan(0, warmup, color="0.85", label="warm-up")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    axes[2].set_yscale("log")
    axes[-1].set_xlabel("minutes")
    fig.suptitle(f"rerankd soak: {r['rank_rate']:,} rank/s, {r['event_rate']:,} events/s "
                 f"({r['kafka_rate']:,} Kafka + {r['mqtt_rate']:,} MQTT)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------- main


def parse_args(doc: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc, prog="bench/soak",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--minutes", type=float, default=30.0, help="length of the load (default 30)")
    add("--rank-rate", type=int, default=1000, help="rank requests/s (default 1000)")
    add("--event-rate", type=int, default=5000, help="events/s over both feeds (default 5000)")
    add("--kafka-share", type=float, default=0.8,
        help="part of the events sent through Kafka, the rest through MQTT (default 0.8)")
    add("--sample-s", type=float, default=60.0, help="seconds per sample (default 60)")
    add("--warmup-minutes", type=float, default=None,
        help="left out of the verdicts (default 10%% of --minutes, and at least "
             "--retention-minutes + 1 with retention on)")
    add("--retention-minutes", type=float, default=3.0,
        help="the daemon's retention: events older than this are deleted from the log "
             "(the retention plugin; default 3; 0: off, the log keeps everything)")
    add("--sweep-s", type=float, default=30.0,
        help="seconds between the daemon's retention sweeps (default 30)")
    add("--candidates", type=int, default=500, help="candidates per rank request (default 500)")
    add("--connections", type=int, default=4, help="rank connections (default 4)")
    add("--users", type=int, default=10_000, help="users at the start (default 10,000)")
    add("--user-growth", type=float, default=2.0, help="new users/s (default 2)")
    add("--timeout-s", type=float, default=5.0,
        help="a rank answer later than this is a timeout (default 5)")
    add("--p99-bound-ms", type=float, default=20.0,
        help="every post-warm-up p99 must be under it (default 20)")
    add("--ranking", action="append", default=[], metavar="KEY=TOML",
        help="a [ranking] setting of the daemon, e.g. refresh_vectors=false (repeatable)")
    add("--out", type=Path, default=None, help="where soak.json and soak.png go (bench/out)")
    args = parser.parse_args(argv)
    args.out = args.out or out_dir()
    if args.retention_minutes < 0 or args.sweep_s < 0.1:
        parser.error("--retention-minutes must be >= 0 and --sweep-s >= 0.1")
    if args.retention_minutes and args.retention_minutes * 60 <= args.sample_s:
        # the log tail reads once a sample: rows must outlive a sample to be seen
        parser.error("--retention-minutes must be longer than --sample-s")
    if args.warmup_minutes is None:
        args.warmup_minutes = max(args.minutes / 10,
                                  args.retention_minutes + 1 if args.retention_minutes else 0)
    args.periods = round(args.minutes * 60 / args.sample_s)
    post = args.periods - math.ceil(args.warmup_minutes * 60 / args.sample_s - 1e-9)
    if post < 2:
        parser.error(f"--minutes must leave at least 2 samples (--sample-s) after the "
                     f"warm-up of {args.warmup_minutes:g} min (--warmup-minutes; with "
                     "retention on it is at least --retention-minutes + 1)")
    if not 0 <= args.kafka_share <= 1:
        parser.error("--kafka-share must be between 0 and 1")
    return args


def _daemon_config(kafka: KafkaBroker, mqtt: MqttBroker, args: argparse.Namespace) -> str:
    """
    More TOML for bench_daemon's config: [ranking] keys (it ends there), the feeds, and
    the retention plugin beside the default pseudonymization when asked for.
    """
    retention = (
        '[plugins]\nprivacy = ["pseudonymize", "retention"]\n[plugins.retention]\n'
        f"max_age_days = {args.retention_minutes / 1440!r}\n"
        f"sweep_interval_s = {args.sweep_s!r}\n" if args.retention_minutes else "")  # fmt: skip
    return "".join(f"{setting}\n" for setting in args.ranking) + (
        f'[kafka]\nbootstrap = "{kafka.bootstrap}"\ntopics = ["{KAFKA_TOPIC}"]\n'
        f'group_id = "soak"\n[mqtt]\nurl = "mqtt://127.0.0.1:{mqtt.port}"\n'
        'client_id = "rerankd-soak"\n') + retention  # fmt: skip


def _run(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Brokers, model, daemon, the soak; the figures."""
    kafka_port, controller_port, mqtt_port = free_ports(3)
    kafka = KafkaBroker(tmp / "kafka", kafka_port, controller_port)
    mqtt = MqttBroker(tmp / "mosquitto", mqtt_port)
    with contextlib.ExitStack() as stack:
        for broker in (kafka, mqtt):
            broker.directory.mkdir()
            stack.callback(broker.stop)
            broker.start()
        asyncio.run(kafka.create_topic(KAFKA_TOPIC, partitions=KAFKA_PARTITIONS))
        make_model(tmp / "model.safetensors")
        daemon, sock = start_daemon(tmp, _daemon_config(kafka, mqtt, args))
        stack.callback(_stop, daemon)
        kafka_rate = round(args.event_rate * args.kafka_share)
        load = Load(socket=str(sock), bootstrap=kafka.bootstrap, mqtt_port=mqtt.port,
                    rank_rate=args.rank_rate, kafka_rate=kafka_rate,
                    mqtt_rate=args.event_rate - kafka_rate, users=args.users,
                    user_growth=args.user_growth, candidates=args.candidates,
                    connections=args.connections, timeout_s=args.timeout_s,
                    sample_s=args.sample_s, periods=args.periods)  # fmt: skip
        soak = Soak(load, daemon, tmp / "data", {"kafka": _pid_of(kafka),
                    "mosquitto": _pid_of(mqtt)}, args.warmup_minutes * 60)  # fmt: skip
        try:
            extra = asyncio.run(soak.run())
        except BaseException:
            print((tmp / "daemon.log").read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            _stop(daemon)
            _keep_log(tmp / "daemon.log", args.out)
        soak.tail.read()  # what the drain added
        return {"samples": soak.samples, "published": soak.published,
                "logged": soak.tail.verdict(soak.published), "drain_s": extra["drain_s"],
                "tail_ranks": soak.tail_ranks,
                "kafka_rate": load.kafka_rate, "mqtt_rate": load.mqtt_rate,
                "latencies": np.concatenate(soak.latencies or [np.zeros(0)]),
                "final_stats": extra["final_stats"]}  # fmt: skip


def _keep_log(log: Path, out: Path) -> None:
    """The daemon's log (warnings and up) as ``out/soak-daemon.log``: what a stall left."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(log, out / "soak-daemon.log")


def _stop(daemon: subprocess.Popen[bytes]) -> None:
    if daemon.poll() is None:
        daemon.terminate()
        daemon.wait(timeout=120)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(doc: str, argv: list[str] | None = None) -> int:
    """``bench/soak``: run, judge, write ``soak.json`` and ``soak.png``; 0 once written."""
    args = parse_args(doc, argv)
    # SIGTERM ends the run like Ctrl-C: the brokers and the daemon are stopped on the way
    # out (Python's default for SIGTERM exits at once and left them running)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    commit = git_commit()  # the code the daemon will run, whatever is committed meanwhile
    os.environ["RERANKD_BENCH_OUT"] = str(args.out)  # write_results' out_dir()
    # Mosquitto saves its state every N changes (the tests' brokers: every change)
    os.environ.setdefault("RERANKD_MQTT_AUTOSAVE_CHANGES", "1000000")
    os.environ.setdefault("KAFKA_JVM_PERFORMANCE_OPTS", KAFKA_JIT)
    subprocess.run([str(ROOT / "scripts" / "kafka"), "fetch"], check=True)  # noqa: S603
    with tempfile.TemporaryDirectory(prefix="rerankd-soak-") as tmp:
        run = _run(Path(tmp), args)
    latencies = run.pop("latencies")
    results: dict[str, Any] = {
        "minutes": args.minutes, "rank_rate": args.rank_rate, "event_rate": args.event_rate,
        "warmup_minutes": args.warmup_minutes, "sample_s": args.sample_s,
        "p99_bound_ms": args.p99_bound_ms, "timeout_s": args.timeout_s,
        "connections": args.connections,
        "candidates": args.candidates, "users": args.users, "user_growth": args.user_growth,
        "ranking": args.ranking, "retention_minutes": args.retention_minutes,
        "sweep_s": args.sweep_s,
        **run,
    }  # fmt: skip
    results["after_warmup"] = {"rank_ms": _latency(latencies, args.timeout_s * 1e3),
                               **summary(results)}
    results["targets"] = verdicts(results)
    print(f"after warm-up: {results['after_warmup']}")
    write_results(results, "soak", quick=args.minutes < 30, commit=commit)
    plot(results, args.out / "soak.png")
    print(f"wrote {args.out / 'soak.png'}")
    return 0
